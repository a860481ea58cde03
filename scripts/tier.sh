#!/usr/bin/env bash
# The Tidepool tier sink's throughput: an edge gateway drains a backlog of forwards into a site
# gateway over the device protocol (one stream per batch: hello, the batch, its acks), against a
# baseline measured in the same run on the same site: one device publishing the same number of
# events with as many in flight as the tier's batch (the load generator's window). Both make
# one outbox entry per event at the site (unrouted forwards), ack after fsync.
#
#   scripts/tier.sh [--events N] [--batches "100 1000"]
#
# The last run's figures are in docs/performance.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
. scripts/lib.sh

events=50000 batches="100 1000"
while (($#)); do
    case $1 in
        --events) events=$2; shift 2 ;;
        --batches) batches=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "tier.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

echo "== building (release gateway, load generator)"
cargo build --release --quiet -p tidepool
cargo build --profile bench-fast --quiet -p tidepool --example loadgen
bin=$root/target/release/tidepool
loadgen=$root/target/bench-fast/examples/loadgen
tp_workdir -p "${BENCH_DIR:-$root/target}" tier.XXXXXX

# gateway_config NAME EXTRA: a gateway with its data in $work/NAME, unrouted events forwarded.
gateway_config() {
    cat >"$work/$1.toml" <<TOML
[gateway]
id = "$1"
listen = "127.0.0.1:0"
data_dir = "$work/$1"
log = "warn"
[ingress]
# A load run measures the box, not the per-device limit.
device_events_per_s = 0
[router]
unrouted = "forward"
[outbox]
max_bytes = 1073741824
$2
TOML
}

# outbox_entries CONFIG: the running gateway's outbox entry count.
outbox_entries() {
    "$bin" status --json --config "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['outbox']['entries'])"
}

gateway_config site "[acl]
tiers = [\"edge\"]"
tp_start_gateway "$work/site.toml" "$work/site.log"
site_pid=$GW_PID site_port=$port
"$bin" certs device edge --config "$work/site.toml" --out "$work/edge-certs" >/dev/null
"$bin" certs device dev-1 --config "$work/site.toml" --out "$work/site-certs" >/dev/null

rate() { sed -n 's/.*events_per_s=\([0-9]*\).*/\1/p' <<<"$1"; }
for batch in $batches; do
    echo "== batch $batch: one device, window $batch, $events events to the site"
    out=$("$loadgen" tidepool --gateway "localhost:$site_port" --certs "$work/site-certs" \
        --devices 1 --events-per-device "$events" --window "$batch")
    echo "   $out"
    base=$(rate "$out")

    echo "== batch $batch: the edge drains $events queued forwards into the site"
    rm -rf "$work/edge" "$work/edge-dev"
    gateway_config edge "max_batch_events = $batch
max_batch_bytes = 16777216
max_delay_ms = 0
[uplink]
sink = \"tidepool\"
url = \"\"
[uplink.tier]
ca_file = \"$work/edge-certs/ca.crt\"
cert_file = \"$work/edge-certs/edge.crt\"
key_file = \"$work/edge-certs/edge.key\""
    tp_start_gateway "$work/edge.toml" "$work/edge.log"
    for i in $(seq 1 8); do
        "$bin" certs device "dev-$i" --config "$work/edge.toml" --out "$work/edge-dev" >/dev/null
    done
    "$loadgen" tidepool --gateway "localhost:$port" --certs "$work/edge-dev" --devices 8 \
        --events-per-device $((events / 8)) --window 512 >/dev/null
    tp_stop_gateway
    sed -i "s|^url = \"\"|url = \"tidepool://127.0.0.1:$site_port\"|" "$work/edge.toml"
    tp_start_gateway "$work/edge.toml" "$work/edge.log"
    started=$(date +%s.%N)
    while [ "$(outbox_entries "$work/edge.toml")" != 0 ]; do sleep 0.05; done
    ended=$(date +%s.%N)
    tp_stop_gateway
    python3 - "$started" "$ended" "$((events / 8 * 8))" "$base" "$work/edge/metrics.json" <<'PY'
import json, sys
secs = float(sys.argv[2]) - float(sys.argv[1])
n, base = int(sys.argv[3]), int(sys.argv[4])
m = json.load(open(sys.argv[5]))
print(f"   drained {n} in {secs:.2f} s: {n / secs:.0f} events/s = {n / secs / base:.2f}x the device "
      f"({m['batches_sent']} batches, {m['bytes_up'] / n:.0f} bytes up per event)")
PY
done
GW_PID=$site_pid tp_stop_gateway
