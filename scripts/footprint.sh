#!/usr/bin/env bash
# Footprint: stripped binary size, idle RSS and idle wake-ups of the release gateway with the
# demo's set-up (threshold handler, an uplink URL, no connections), measured over an idle
# minute, then again over an idle minute after a load run (8 devices x 20000 events).
# Wake-ups = the sum of voluntary context switches of all threads (/proc/PID/task/*/status).
#
#   scripts/footprint.sh [--idle SECONDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
. scripts/lib.sh
idle=60
while (($#)); do
    case $1 in
        --idle) idle=$2; shift 2 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

cargo build --release --quiet -p tidepool
cargo build --profile bench-fast --quiet -p tidepool --example loadgen
scripts/build-handlers.sh >/dev/null
bin=$root/target/release/tidepool
tp_workdir -p "$root/target" footprint.XXXXXX

cat >"$work/tidepool.toml" <<TOML
[gateway]
id = "footprint"
listen = "127.0.0.1:0"
data_dir = "$work/data"
log = "warn"
[ingress]
# A load run measures the box, not the per-device limit.
device_events_per_s = 0
[uplink]
url = "http://127.0.0.1:9/ingest"
TOML
tp_threshold_handler >>"$work/tidepool.toml"
for i in $(seq 1 8); do "$bin" certs device "dev-$i" --config "$work/tidepool.toml" --out "$work/certs" >/dev/null; done

tp_start_gateway "$work/tidepool.toml" "$work/gateway.log"
pid=$GW_PID

switches() { cat /proc/"$pid"/task/*/status | awk '/^voluntary_ctxt_switches/ { s += $2 } END { print s }'; }
measure() {
    local a b
    a=$(switches); sleep "$idle"; b=$(switches)
    printf '   %-22s rss_kb=%s wakeups_per_s=%s threads=%s\n' "$1" \
        "$(awk '/^VmRSS/ { print $2 }' /proc/"$pid"/status)" \
        "$(python3 -c "print(round(($b - $a) / $idle, 2))")" "$(ls /proc/"$pid"/task | wc -l)"
}

echo "== stripped release binary: $(stat -c %s "$bin") bytes"
echo "== idle ${idle} s after start"
measure "idle"
"$root/target/bench-fast/examples/loadgen" tidepool --gateway "localhost:$port" --certs "$work/certs" \
    --devices 8 --events-per-device 20000 | sed 's/^/   load: /'
echo "== idle ${idle} s after the load run"
measure "idle after load"
