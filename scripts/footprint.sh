#!/usr/bin/env bash
# Footprint: stripped binary size, idle RSS and idle wake-ups of the release gateway with the
# demo's set-up (threshold handler, an uplink URL, no connections), measured over an idle
# minute, then again over an idle minute after a load run (8 devices x 20000 events).
# Thread wake-ups = the sum of voluntary context switches of all threads
# (/proc/PID/task/*/status). CPU wake-ups = the distinct milliseconds in which a thread's
# timed wait ended by timing out (strace -f -tt of futex/epoll/nanosleep over the idle
# period, after the switches were counted over one; timers the kernel fired together count
# once: what a timer slack folds).
#
#   scripts/footprint.sh [--idle SECONDS] [--bin FILE] [--slack MS] [--events N] [--hold N]
#                        [--rate EVENTS_PER_S --sustain SECONDS] [--cloud] [--cache BYTES]
#
# Disk bytes written (/proc/PID/io write_bytes) per hour while idle, and per event over the load.
# Between the two idle minutes: RSS with --hold devices (default 1000) connected and idle (each
# its own QUIC connection with its hello answered), then the load run.
# --bin measures another build of the gateway (a board's static x86_64 musl binary from
# scripts/build.sh --board x86_64, say); --slack sets gateway.timer_slack_ms; --events is the
# load run's events per device (default 20000). --rate R --sustain S makes the load run a
# steady R events/s for S seconds instead (readings that cross the threshold rarely, as a real
# sensor's), with RSS sampled every second: its peak, and where it stood at each fifth of the run
# (flat, or still growing).
#
# --cloud delivers the forwards to a local HTTP endpoint (default: the uplink points at a closed
# port, and the load's forwards stay in the outbox, in the store and its index: the worst case
# for memory after a load); --cache sets store.cache_capacity_bytes (sled's page cache).
#
#   scripts/footprint.sh --rate 20000 --sustain 300      # the issue's 5 minutes at 20k events/s
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
. scripts/lib.sh
idle=60 bin="" slack=0 events=20000 hold=1000 rate=0 sustain=0 cloud=0 cache=4194304
while (($#)); do
    case $1 in
        --idle) idle=$2; shift 2 ;;
        --bin) bin=$(realpath "$2"); shift 2 ;;
        --slack) slack=$2; shift 2 ;;
        --events) events=$2; shift 2 ;;
        --hold) hold=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --sustain) sustain=$2; shift 2 ;;
        --cloud) cloud=1; shift ;;
        --cache) cache=$2; shift 2 ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$bin" ]; then
    cargo build --release --quiet -p tidepool
    bin=$root/target/release/tidepool
fi
cargo build --profile bench-fast --quiet -p tidepool --example loadgen
scripts/build-handlers.sh >/dev/null
command -v strace >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null; }
tp_workdir -p "$root/target" footprint.XXXXXX
uplink=http://127.0.0.1:9/ingest
if ((cloud)); then
    tp_start_cloud
    uplink=http://127.0.0.1:$cloud_port/ingest
fi

cat >"$work/tidepool.toml" <<TOML
[gateway]
id = "footprint"
listen = "127.0.0.1:0"
data_dir = "$work/data"
log = "warn"
timer_slack_ms = $slack
[ingress]
# A load run measures the box, not the per-device limit.
device_events_per_s = 0
max_connections = $((hold + 16))
[uplink]
url = "$uplink"
[store]
cache_capacity_bytes = $cache
TOML
tp_threshold_handler >>"$work/tidepool.toml"
devices=$((hold > 8 ? hold : 8))
for i in $(seq 1 "$devices"); do "$bin" certs device "dev-$i" --init --config "$work/tidepool.toml" --out "$work/certs" >/dev/null; done

t0=$(date +%s%N)
tp_start_gateway "$work/tidepool.toml" "$work/gateway.log"
t1=$(date +%s%N)
pid=$GW_PID

# Bytes the gateway caused to be written to the disk (/proc/PID/io write_bytes: what reaches
# the block layer, the SD card's wear).
written() { awk '/^write_bytes/ { print $2 }' /proc/"$pid"/io; }
# "tid switches" per thread: a thread that ends (tokio's blocking pool lets an idle one go
# after 10 s) must not count as negative wake-ups.
switches() { for t in /proc/"$pid"/task/*; do echo "${t##*/} $(awk '/^voluntary_ctxt_switches/ { print $2 }' "$t"/status 2>/dev/null)"; done; }
measure() {
    # Counted apart: strace's stops would add switches of their own.
    local a b w0 w1 trace=$work/strace.$RANDOM
    switches >"$work/sw.a"; w0=$(written); sleep "$idle"; switches >"$work/sw.b"; w1=$(written)
    timeout -s INT "$idle" strace -f -tt -q -p "$pid" -e trace=futex,epoll_wait,epoll_pwait,nanosleep,clock_nanosleep -o "$trace" 2>/dev/null || true
    printf '   %-22s rss_kb=%s disk_bytes_written_per_h=%s thread_wakeups_per_s=%s cpu_wakeups_per_s=%s threads=%s\n' "$1" \
        "$(awk '/^VmRSS/ { print $2 }' /proc/"$pid"/status)" \
        "$(python3 -c "print(round(($w1 - $w0) * 3600 / $idle))")" \
        "$(python3 - "$work/sw.a" "$work/sw.b" "$idle" <<'PY'
import sys
a, b = ({t: int(n) for t, n in (l.split() for l in open(f)) if n} for f in sys.argv[1:3])
print(round(sum(b[t] - a[t] for t in b if t in a) / float(sys.argv[3]), 2))
PY
)" \
        "$(python3 - "$trace" "$idle" <<'PY'
import re, sys
ms = set()
for line in open(sys.argv[1]):
    # A timed wait that ended by its timeout: the kernel fired a timer for it.
    if "ETIMEDOUT" in line or re.search(r"epoll_p?wait\(.*\) = 0$", line.strip()) or ("nanosleep" in line and "= 0" in line):
        t = line.split()[1]
        h, m, sec = t.split(":")
        ms.add(int((int(h) * 3600 + int(m) * 60 + float(sec)) * 1000))
print(round(len(ms) / float(sys.argv[2]), 2))
PY
)" "$(ls /proc/"$pid"/task | wc -l)"
    rm -f "$trace"
}

echo "== stripped release binary: $(stat -c %s "$bin") bytes"
echo "== start: $(((t1 - t0) / 1000000)) ms to the ready line (store open, handlers loaded, port bound; a new data dir, its CA and certificates made by the certs step before)"
echo "== idle ${idle} s after start"
measure "idle"
rss() { awk '/^VmRSS/ { print $2 }' /proc/"$pid"/status; }
if ((hold > 0)); then
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    r0=$(rss)
    "$root/target/bench-fast/examples/loadgen" hold --gateway "localhost:$port" --certs "$work/certs" \
        --devices "$hold" >"$work/hold.out" 2>&1 &
    holder=$!
    # Wait for the holder's own word that every device is in (for 5 minutes at most).
    deadline=$((SECONDS + 300))
    while ! grep -q '^connected' "$work/hold.out"; do
        kill -0 "$holder" 2>/dev/null || { cat "$work/hold.out" >&2; echo "footprint: the holder failed" >&2; exit 1; }
        ((SECONDS < deadline)) || { kill "$holder"; echo "footprint: $hold devices not connected in 5 minutes" >&2; exit 1; }
        sleep 0.2
    done
    r1=$(rss)
    echo "== $hold idle devices connected: rss_kb=$r1 (+$((r1 - r0)) kB, $(python3 -c "print(round(($r1 - $r0) * 1024 / $hold))") bytes per device) threads=$(ls /proc/"$pid"/task | wc -l)"
    kill -TERM "$holder"; wait "$holder" || true
fi
w_before=$(written)
load=(--devices 8 --events-per-device "$events")
if ((sustain > 0)); then
    ((rate > 0)) || { echo "--sustain needs --rate" >&2; exit 2; }
    load=(--devices 8 --events-per-device $((rate * sustain / 8)) --rate "$rate" --walk)
fi
( while kill -0 "$pid" 2>/dev/null; do rss; sleep 1; done ) >"$work/rss.samples" &
sampler=$!
"$root/target/bench-fast/examples/loadgen" tidepool --gateway "localhost:$port" --certs "$work/certs" \
    "${load[@]}" | sed 's/^/   load: /'
kill "$sampler"; wait "$sampler" 2>/dev/null || true
w_after=$(written)
echo "   load: disk bytes written per event: $(python3 -c "print(round(($w_after - $w_before) / (8 * ${load[3]}), 1))") (write_bytes over the run, / events)"
python3 - "$work/rss.samples" <<'PY'
import sys
s = [int(l) for l in open(sys.argv[1]) if l.strip()]
if s:
    fifths = [s[min(len(s) - 1, len(s) * k // 5)] for k in range(1, 5)] + [s[-1]]
    print(f"   load: rss_kb peak={max(s)} at each fifth of the run: {' '.join(map(str, fifths))} ({len(s)} samples)")
PY
"$bin" status --config "$work/tidepool.toml" --json | python3 -c '
import json, sys
o = json.load(sys.stdin)["outbox"]
e, b = o["entries"], o["bytes"]
print(f"   load: outbox after the run: {e} entries, {b} bytes undelivered")'
echo "== idle ${idle} s after the load run"
measure "idle after load"
