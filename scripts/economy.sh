#!/usr/bin/env bash
# Uplink economy: many devices at a steady rate through the threshold handler, the cloud a
# local stand-in; reports how often the uplink woke, how long it stayed awake, and bytes up
# against bytes in (from the gateway's metrics, same run).
#
#   scripts/economy.sh [--devices N] [--minutes M] [--rate EVENTS_PER_S] [--noise]
#
# Defaults: 1000 devices at 1 event/s each (1000/s) for 5 minutes, each device's readings a
# slow random walk (a real sensor); --noise makes them uniform in 20..32 around the threshold
# of 30 (a crossing every few readings: the worst case). The last run's figures are in
# docs/performance.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
. scripts/lib.sh

devices=1000 minutes=5 rate= signal=--walk readings="a slow random walk"
while (($#)); do
    case $1 in
        --devices) devices=$2; shift 2 ;;
        --minutes) minutes=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --noise) signal= readings="uniform noise in 20..32"; shift ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "economy.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
rate=${rate:-$devices}

echo "== building (release gateway, load generator, handlers)"
cargo build --release --quiet -p tidepool
cargo build --profile bench-fast --quiet -p tidepool --example loadgen
scripts/build-handlers.sh >/dev/null
bin=$root/target/release/tidepool
loadgen=$root/target/bench-fast/examples/loadgen

tp_workdir -p "${BENCH_DIR:-$root/target}" economy.XXXXXX
tp_start_cloud
cat >"$work/tidepool.toml" <<TOML
[gateway]
id = "economy"
listen = "127.0.0.1:0"
data_dir = "$work/data"
log = "warn"
[ingress]
max_connections = $((devices + 64))
# Every simulated device connects at once from 127.0.0.1: lift the per-address handshake share.
max_handshakes = $((devices + 64))
max_handshakes_per_address = $((devices + 64))
[uplink]
url = "http://127.0.0.1:$cloud_port/ingest"
$(tp_threshold_handler)
TOML
echo "== $devices device certificates"
for i in $(seq 1 "$devices"); do
    "$bin" certs device "dev-$i" --init --config "$work/tidepool.toml" --out "$work/certs" >/dev/null
done
per_device=$((rate * minutes * 60 / devices))
echo "== $devices devices, $rate events/s in all, $minutes min ($per_device events each), readings: $readings"
tp_start_gateway "$work/tidepool.toml" "$work/gateway.log"
started=$(date +%s.%N)
"$loadgen" tidepool --gateway "localhost:$port" --certs "$work/certs" --devices "$devices" \
    --events-per-device "$per_device" --window 4 --rate "$rate" $signal | sed 's/^/   /'
tp_stop_gateway
ended=$(date +%s.%N)
python3 - "$work/data/metrics.json" "$started" "$ended" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
secs = float(sys.argv[3]) - float(sys.argv[2])
w = max(m["uplink_wakeups"], 1)
print(f"   events in {m['events_in']}, forwards {m['forwards']}, sent {m['events_sent']} in {m['batches_sent']} batches")
print(f"   uplink wake-ups: {m['uplink_wakeups']} ({m['uplink_wakeups'] / (secs / 60):.2f} per minute)")
print(f"   time awake: {m['uplink_awake_ms'] / 1000:.1f} s of {secs:.0f} s ({m['uplink_awake_ms'] / 1000 / secs:.1%})")
print(f"   per wake-up: {m['events_sent'] / w:.1f} events, {m['bytes_up'] / w:.0f} bytes")
print(f"   bytes up / bytes in: {m['bytes_up']} / {m['bytes_in']} = {m['bytes_up'] / max(m['bytes_in'], 1):.3%}")
PY
