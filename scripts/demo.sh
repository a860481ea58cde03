#!/usr/bin/env bash
# The README's run command: a gateway on embedded defaults in a temp data dir, with the
# threshold handler, a local HTTP endpoint standing in for the cloud, and simulated devices.
# Prints what happened, then stops everything it started.
#
#   scripts/demo.sh [--devices N] [--events N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
. scripts/lib.sh

devices=5
events=400
while (($#)); do
    case $1 in
        --devices) devices=$2; shift 2 ;;
        --events) events=$2; shift 2 ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
command -v python3 >/dev/null || { echo "demo.sh needs python3 for the stand-in cloud" >&2; exit 1; }

echo "== building tidepool (release) and the handlers"
cargo build --release --quiet -p tidepool
scripts/build-handlers.sh >/dev/null
bin=$root/target/release/tidepool

tp_workdir -t tidepool-demo.XXXXXX

# The stand-in cloud: counts what it receives.
tp_start_cloud

# Embedded defaults, plus only what a demo must say: where the cloud is, and the handler.
cat >"$work/tidepool.toml" <<TOML
[gateway]
id = "demo-gw"
listen = "127.0.0.1:0"
data_dir = "$work/data"
log = "warn"
[uplink]
url = "http://127.0.0.1:$cloud_port/ingest"
TOML
tp_threshold_handler >>"$work/tidepool.toml"

echo "== starting the gateway (data dir $work/data)"
tp_start_gateway "$work/tidepool.toml" "$work/gateway.log"
echo "   $ready"

echo "== $devices devices send $events temperature readings each (alarm above 30, clear below 29)"
for d in $(seq 1 "$devices"); do
    "$bin" certs device "sensor-$d" --config "$work/tidepool.toml" --out "$work/certs" >/dev/null
done
for d in $(seq 1 "$devices"); do
    id="sensor-$d"
    # A random walk around 25 degrees that now and then crosses 30.
    awk -v n="$events" -v seed="$d" 'BEGIN { srand(seed); t = 24; for (i = 0; i < n; i++) {
        t += (rand() - 0.5) * 1.6; if (t < 18) t = 18; if (t > 34) t = 34;
        printf "{\"v\": %.2f}\n", t } }' |
        "$bin" send --gateway "localhost:$port" --stdin \
            --cert "$work/certs/$id.crt" --key "$work/certs/$id.key" --ca "$work/certs/ca.crt" \
            --topic "devices/$id/temp" | sed "s/^/   $id: /" &
done
tp_wait_jobs

echo "== tidepool status (asked through the running gateway's control socket)"
"$bin" status --config "$work/tidepool.toml" | sed 's/^/   /'

# Urgent forwards go up at once; give the uplink a moment to finish, then stop gracefully.
sleep 1
tp_stop_gateway
m=$work/data/metrics.json
get() { python3 -c "import json,sys; print(json.load(open('$m'))['$1'])"; }
cloud_events=$(python3 -c "import json; print(sum(len(json.loads(l)['events']) for l in open('$work/cloud.jsonl')))" 2>/dev/null || echo 0)
cloud_batches=$( [ -f "$work/cloud.jsonl" ] && wc -l <"$work/cloud.jsonl" || echo 0)

echo
echo "== what happened"
printf '   %-34s %s\n' \
    "events received from devices" "$(get events_in)" \
    "handler calls (threshold)" "$(get handler_calls)" \
    "handler errors (dead letters)" "$(get handler_errors)" \
    "group commits (fsyncs)" "$(get groups)" \
    "forwards (alarms and clears)" "$(get forwards)" \
    "uplink wake-ups" "$(get uplink_wakeups)" \
    "batches the cloud received" "$cloud_batches" \
    "events the cloud received" "$cloud_events" \
    "bytes in from devices" "$(get bytes_in)" \
    "bytes sent up to the cloud" "$(get bytes_up)"
python3 - "$m" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
if m["bytes_up"]:
    print(f"   => the cloud saw {m['bytes_up'] / m['bytes_in']:.1%} of the bytes the devices sent, "
          f"in {m['uplink_wakeups']} uplink wake-up{'' if m['uplink_wakeups'] == 1 else 's'} for {m['events_in']} events")
PY
