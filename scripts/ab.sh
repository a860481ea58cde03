#!/usr/bin/env bash
# Before and after: the durable load of scripts/bench.sh (N devices through the threshold
# handler, ack after fsync) and its ack latency at a fixed 20k events/s, against two gateway
# binaries taken in turn (A B A B ...), each on a fresh data dir. The ratio is taken pair by
# pair, so the machine's drift during the run does not move it; the median is what to quote.
#
#   scripts/ab.sh --a BIN --b BIN [--rounds N] [--devices N] [--events N (per device)] [--window N]
#
# Build a baseline with e.g.
#   git worktree add /tmp/base <rev> && (cd /tmp/base && CARGO_TARGET_DIR=$PWD/target cargo build --release)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
. scripts/lib.sh

a= b= rounds=3 devices=8 events=20000 window=512
while (($#)); do
    case $1 in
        --a) a=$2; shift 2 ;;
        --b) b=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --devices) devices=$2; shift 2 ;;
        --events) events=$2; shift 2 ;;
        --window) window=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
[ -x "$a" ] && [ -x "$b" ] || { echo "need --a BIN and --b BIN (executables)" >&2; exit 2; }

echo "== building (load generator, handlers)"
cargo build --profile bench-fast --quiet -p tidepool --example loadgen
scripts/build-handlers.sh >/dev/null
loadgen=$root/target/bench-fast/examples/loadgen
tp_workdir -p "${BENCH_DIR:-$root/target}" ab.XXXXXX

# One run of `bin` on a fresh data dir: "<events/s> <p99 ms at 20k/s>".
run() {
    bin=$1
    local dir
    dir=$(mktemp -d "$work/run.XXXXXX")
    tp_bench_gateway "$dir" "$devices"
    tp_start_gateway "$dir/tidepool.toml" "$dir/gateway.log"
    local tp lat
    tp=$("$loadgen" tidepool --gateway "localhost:$port" --certs "$dir/certs" \
        --devices "$devices" --events-per-device "$events" --window "$window")
    lat=$("$loadgen" tidepool --gateway "localhost:$port" --certs "$dir/certs" \
        --devices "$devices" --events-per-device $((100000 / devices)) --window 4096 --rate 20000)
    tp_stop_gateway
    echo "$(sed -n 's/.*events_per_s=\([0-9]*\).*/\1/p' <<<"$tp") $(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$lat")"
}

echo "== $rounds rounds: $devices devices x $events events, window $window; then 20k events/s for 5 s"
results=()
for r in $(seq 1 "$rounds"); do
    ra=$(run "$a")
    rb=$(run "$b")
    echo "   round $r: A $ra   B $rb   (events/s, p99 ms)"
    results+=("$ra $rb")
done
python3 - "${results[@]}" <<'PY'
import statistics, sys
rows = [list(map(float, r.split())) for r in sys.argv[1:]]
thr = [a / b for a, _, b, _ in rows]
p99 = [a / b for _, a, _, b in rows]
med = statistics.median
print("== results (pair by pair, median of the pairs)")
print(f"   durable events/s A/B: {med(thr):.2f}x  (pairs {', '.join(f'{x:.2f}' for x in thr)}); A {med(r[0] for r in rows):.0f}/s, B {med(r[2] for r in rows):.0f}/s")
print(f"   p99 ack latency at 20k/s A/B: {med(p99):.2f}x  (pairs {', '.join(f'{x:.2f}' for x in p99)}); A {med(r[1] for r in rows):.2f} ms, B {med(r[3] for r in rows):.2f} ms")
PY
