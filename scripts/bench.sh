#!/usr/bin/env bash
# Load test: N devices publishing 100-byte readings through the threshold handler, against
# two baselines measured in the same run on the same disk:
#   1. raw sled: batched inserts of one 100-byte value per event, one flush + fdatasync per 1000
#      (the same Store::sync the gateway pays per group);
#   2. Mosquitto QoS 1 ingest of the same events with the same number of publishers
#      (mosquitto_pub -q 1 -l, persistence on).
# Then the ack latency at a fixed 20k events/s, fsyncs per second and events per group, and what
# the fdatasync costs at small group sizes. The load generator runs on the same 2 cores.
# First, the sandbox path alone (no disk, one thread): trivial and threshold handlers in WAT and
# with the SDK, against the same logic in native Rust, and the examples' load times and sizes.
#
#   scripts/bench.sh [--devices N] [--events N (per device)] [--window N] [--sandbox-only]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
. scripts/lib.sh

devices=8
events=20000
window=512
sandbox_only=
while (($#)); do
    case $1 in
        --devices) devices=$2; shift 2 ;;
        --events) events=$2; shift 2 ;;
        --window) window=$2; shift 2 ;;
        --sandbox-only) sandbox_only=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$sandbox_only" ] && { ! command -v mosquitto_pub >/dev/null || ! [ -x /usr/sbin/mosquitto ]; }; then
    echo "== installing mosquitto (baseline)"
    apt-get update -qq && apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

echo "== building (release gateway, load generator, handlers)"
cargo build --profile bench-fast --quiet -p tidepool --example loadgen --example sandbox
scripts/build-handlers.sh >/dev/null
bin=$root/target/release/tidepool
loadgen=$root/target/bench-fast/examples/loadgen

echo "== the sandbox path alone: copy the event in, run, collect the effects (no disk, one thread)"
"$root/target/bench-fast/examples/sandbox" --modules "$root/modules" | sed 's/^/   /'
[ -n "$sandbox_only" ] && exit 0
cargo build --release --quiet -p tidepool

tp_workdir -p "${BENCH_DIR:-$root/target}" bench.XXXXXX

tp_bench_gateway "$work" "$devices"


total=$((devices * events))
rate() { sed -n 's/.*events_per_s=\([0-9]*\).*/\1/p' <<<"$1"; }
echo "== tidepool: $devices devices x $events events, window $window, threshold handler, ack after fsync"
tp_start_gateway "$work/tidepool.toml" "$work/gateway.log"
tp=$("$loadgen" tidepool --gateway "localhost:$port" --certs "$work/certs" \
    --devices "$devices" --events-per-device "$events" --window "$window")
echo "   $tp"
syncs=$("$bin" status --json --config "$work/tidepool.toml" | python3 -c "import json,sys; m=json.load(sys.stdin)['metrics']; print(m['groups'], m['store_syncs'], m.get('handler_cpu_refusals', 0))")
read -r groups store_syncs cpu_refusals <<<"$syncs"
echo "   threshold invocations refused over its CPU share (limits.cpu_percent): $cpu_refusals"
tp_secs=$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' <<<"$tp")
echo "   fsyncs (flush + fdatasync): $store_syncs, $(python3 -c "print(f'{$store_syncs / $tp_secs:.0f}/s, {$total / $groups:.1f} events per group commit')")"
echo "== tidepool at a fixed 20k events/s for 5 s (latency)"
lat=$("$loadgen" tidepool --gateway "localhost:$port" --certs "$work/certs" \
    --devices "$devices" --events-per-device $((100000 / devices)) --window 4096 --rate 20000)
echo "   $lat"

# One hostile device floods (as fast as answers come, straight back after each busy) next to 4
# devices publishing 2,000 events/s in all; their p99 ack against the same 4 alone, with the
# per-device limit off (as above) and at its default (ingress.device_events_per_s).
flood() {
    "$loadgen" tidepool --gateway "localhost:$port" --certs "$work/certs" --devices $((4 + $1)) \
        --flooders "$1" --events-per-device 2500 --window 64 --rate 2000
}
p99() { sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$1"; }
if [ "$devices" -ge 5 ]; then
    for limit in off default; do
        if [ $limit = default ]; then
            tp_stop_gateway
            sed -i '/^device_events_per_s = 0$/d' "$work/tidepool.toml"
            tp_start_gateway "$work/tidepool.toml" "$work/gateway.log"
        fi
        alone=$(flood 0)
        flooded=$(flood 1)
        echo "== 4 devices at 2,000 events/s, per-device limit $limit"
        echo "   alone:                 $alone"
        echo "   next to a flooding one: $flooded"
        echo "   p99 next to the flood / alone: $(python3 -c "print(f'{$(p99 "$flooded") / $(p99 "$alone"):.2f}x')") (target <= 2x with the limit)"
    done
fi
tp_stop_gateway

echo "== sled alone: $total inserts of 100 bytes, one Store::sync (flush + fdatasync) per 1000"
sl=$("$loadgen" sled --dir "$work/sled" --events "$total" --batch 1000 --value-bytes 100)
echo "   $sl"

echo "== the commit's write shape (2 keys per event + 1 mark per group, a sync per group):"
echo "   one-tree batch (what the gateway does) vs three-tree transaction, at group sizes 40 and 1000"
for group in 40 1000; do
    for mode in batch txn; do
        echo "   group=$group $("$loadgen" sled-group --dir "$work/sled-$mode-$group" --events 60000 --group "$group" --mode "$mode")"
    done
done
echo "== what the fdatasync costs: the batch shape with sled's flush alone (not power-cut safe)"
for group in 1 10 40; do
    ev=$((group * 1500))
    a=$("$loadgen" sled-group --dir "$work/fs-sync-$group" --events "$ev" --group "$group" --mode batch)
    b=$("$loadgen" sled-group --dir "$work/fs-flush-$group" --events "$ev" --group "$group" --mode batch --flush-only)
    echo "   group=$group  with fdatasync: $a"
    echo "   group=$group  flush only:     $b   -> $(python3 -c "print(f'{$(rate "$a") / $(rate "$b"):.2f}x')")"
done

echo "== mosquitto: $devices publishers (mosquitto_pub -q 1 -l), $events messages each, persistence on"
mq_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/mq"
cat >"$work/mq/mosquitto.conf" <<CONF
listener $mq_port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $work/mq/
CONF
/usr/sbin/mosquitto -c "$work/mq/mosquitto.conf" >"$work/mq/log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$mq_port") 2>/dev/null && break; sleep 0.1; done
python3 - "$events" >"$work/mq/lines" <<'PY'
import random, sys
random.seed(1)
for _ in range(int(sys.argv[1])):
    head = '{"v": %.1f, "pad": "' % (20 + random.random() * 12)
    print(head + "x" * (100 - len(head) - 2) + '"}')
PY
mq_start=$(date +%s.%N)
for i in $(seq 1 "$devices"); do
    mosquitto_pub -h 127.0.0.1 -p "$mq_port" -q 1 -l -t "devices/dev-$i/temp" -i "pub-$i" <"$work/mq/lines" &
done
tp_wait_jobs
mq_end=$(date +%s.%N)
mq=$(python3 -c "print(f'mosquitto events=$total seconds={$mq_end - $mq_start:.3f} events_per_s={$total / ($mq_end - $mq_start):.0f}')")
echo "   $mq"

python3 - "$(rate "$tp")" "$(rate "$sl")" "$(rate "$mq")" "$lat" <<'PY'
import sys
tp, sl, mq = map(float, sys.argv[1:4])
print()
print("== results (same run, same disk, load generator on the same 2 cores)")
print(f"   tidepool durable events/s through the threshold handler: {tp:.0f}")
print(f"   vs raw sled batched inserts ({sl:.0f}/s):     {tp / sl:.2f}x   (target >= 0.4x)")
print(f"   vs mosquitto QoS 1 ingest ({mq:.0f}/s):       {tp / mq:.2f}x   (target >= 1x, aim 1.5x)")
print(f"   at 20k events/s: {sys.argv[4]}")
print("   Mosquitto acks a QoS 1 publish before anything is on disk (persistence writes on its")
print("   autosave interval); Tidepool acks after the fsync of the group and after running the handler.")
PY
