# Shared by demo.sh, bench.sh and footprint.sh: sourced, not run. Expects $root (the repo) and
# $bin (the tidepool binary) where it says so.

# tp_workdir MKTEMP-ARGS...: makes $work, and on exit kills everything in $pids and removes it.
tp_workdir() {
    work=$(mktemp -d "$@")
    pids=()
    trap tp_cleanup EXIT
}

tp_cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}

# The [[handler]] entry of the threshold example (built by scripts/build-handlers.sh).
tp_threshold_handler() {
    cat <<TOML
[[handler]]
wasm = "$root/modules/target/wasm32-unknown-unknown/release/threshold.wasm"
manifest = "$root/modules/examples/threshold/threshold.toml"
TOML
}

# tp_start_gateway CONFIG LOG: runs `$bin run` with stderr appended to LOG, waits for its ready
# line, and sets $GW_PID (also added to $pids), $ready, $addr and $port.
tp_start_gateway() {
    coproc GW { exec "$bin" run --config "$1" 2>>"$2"; }
    pids+=("$GW_PID")
    read -r -u "${GW[0]}" ready || { cat "$2" >&2; return 1; }
    addr=${ready#tidepool listening on }
    port=${addr##*:}
}

# Waits for the background jobs that are not in $pids (the load, not the servers).
tp_wait_jobs() {
    for j in $(jobs -p); do
        case " ${pids[*]} " in *" $j "*) ;; *) wait "$j" ;; esac
    done
}

# Stops the gateway gracefully (SIGTERM: it settles, answers and writes metrics.json).
tp_stop_gateway() {
    kill -TERM "$GW_PID"
    wait "$GW_PID" || true
}

# tp_start_cloud: a stand-in cloud on loopback that answers 200 and appends each batch to
# $work/cloud.jsonl as {"bytes", "events"}; sets $cloud_port (its process is in $pids).
tp_start_cloud() {
    cat >"$work/cloud.py" <<'PY'
import http.server, json, sys
class Cloud(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(sys.argv[1], "a") as f:
            f.write(json.dumps({"bytes": len(body), "events": json.loads(body)["events"]}) + "\n")
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cloud)
print(srv.server_address[1], flush=True)
srv.serve_forever()
PY
    python3 "$work/cloud.py" "$work/cloud.jsonl" >"$work/cloud.port" &
    pids+=($!)
    for _ in $(seq 50); do [ -s "$work/cloud.port" ] && break; sleep 0.1; done
    cloud_port=$(head -1 "$work/cloud.port")
}

# The load test's gateway in DIR: DIR/tidepool.toml (port 0, the threshold handler, a large
# outbox, data in DIR/data) and certificates for dev-1..dev-N in DIR/certs, issued by $bin.
tp_bench_gateway() {
    cat >"$1/tidepool.toml" <<TOML
[gateway]
id = "bench"
listen = "127.0.0.1:0"
data_dir = "$1/data"
log = "warn"
[ingress]
# A load run measures the box, not the per-device limit.
device_events_per_s = 0
[outbox]
max_bytes = 268435456
TOML
    tp_threshold_handler >>"$1/tidepool.toml"
    for i in $(seq 1 "$2"); do
        "$bin" certs device "dev-$i" --init --config "$1/tidepool.toml" --out "$1/certs" >/dev/null
    done
}
