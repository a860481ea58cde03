#!/usr/bin/env bash
# Deploys, measured on loopback with the release build:
# 1. The swap pause: 8 devices publish 5,000 events/s in all through the threshold handler,
#    deployed from a signed bundle through the offline inbox; their p99 ack with no deploy,
#    then with two deploys of new versions while they publish, then with none again (the same
#    gateway, one run). Every event must be acked (the load generator fails otherwise).
# 2. Deploy latency over the admin channel: `tidepool deploy --profile` of 10 new versions,
#    from the command's start to its return (the new version runs the next event), next to
#    `tidepool list` over the same channel (the connection and the process, without a deploy).
# 3. A fleet: 20 gateways on loopback ports, `fleet deploy --wave 25%` (4 waves of 5, each
#    waiting for its probation, here passed by time: deploy.probation_s = 2), next to the same
#    command for one gateway in the same run.
#
#   scripts/deploy-bench.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
echo "== building (release gateway, load generator, handlers)" >&2
cargo build --release --quiet -p tidepool
cargo build --profile bench-fast --quiet -p tidepool --example loadgen
scripts/build-handlers.sh >/dev/null
bin=$root/target/release/tidepool
loadgen=$root/target/bench-fast/examples/loadgen
w=$(mktemp -d)
trap 'kill "${GW_PID:-}" 2>/dev/null || true; cat "$w"/*/pids 2>/dev/null | xargs -r kill 2>/dev/null || true; rm -rf "$w"' EXIT
$bin keys generate --out $w/keys >/dev/null
pub=$(cat $w/keys/signing.pub)
cat > $w/tidepool.toml <<TOML
[gateway]
id = "swap"
listen = "127.0.0.1:0"
data_dir = "$w/data"
log = "info"
[deploy]
trusted_keys = ["$pub"]
TOML
for i in $(seq 1 8); do $bin certs device dev-$i --init --config $w/tidepool.toml --out $w/certs >/dev/null; done
wasm=$root/modules/target/wasm32-unknown-unknown/release/threshold.wasm
for v in 1 2 3; do
  sed "s/^version = .*/version = $v/" $root/modules/examples/threshold/threshold.toml > $w/m$v.toml
  $bin bundle build --manifest $w/m$v.toml --wasm $wasm --key $w/keys/signing.key --out $w/t$v.tpb >/dev/null
done
coproc GW { exec $bin run --config $w/tidepool.toml 2>>$w/gw.log; }
read -r -u "${GW[0]}" ready
port=${ready##*:}
drop() { cp $w/t$1.tpb $w/data/inbox/t$1.part; mv $w/data/inbox/t$1.part $w/data/inbox/t$1.tpb; while [ ! -e $w/data/inbox/done/t$1.tpb ]; do sleep 0.01; done; }
drop 1
run() { $loadgen tidepool --gateway localhost:$port --certs $w/certs --devices 8 --events-per-device 5000 --window 512 --rate 5000; }
echo "no deploy:    $(run)"
( sleep 2; t0=$(date +%s.%N); drop 2; t1=$(date +%s.%N); sleep 3; drop 3; t2=$(date +%s.%N); echo "   deploys took $(python3 -c "print(f'{($t1-$t0)*1000:.0f} ms and {($t2-$t1-3)*1000:.0f} ms')") (rename to done/)" ) & bg=$!
echo "two deploys:  $(run)"
wait $bg
echo "no deploy:    $(run)"
kill -TERM $GW_PID; wait $GW_PID || true
echo "deploys logged: $(grep -c 'deployed: ' $w/gw.log)"

echo "== deploy latency over the admin channel (10 deploys, and 10 lists for the baseline)"
coproc GW { exec $bin run --config $w/tidepool.toml 2>>$w/gw.log; }
read -r -u "${GW[0]}" ready
port=${ready##*:}
$bin certs operator bench --config $w/tidepool.toml --out $w/ops --gateway 127.0.0.1:$port >/dev/null
for v in $(seq 4 13); do
  sed "s/^version = .*/version = $v/" $root/modules/examples/threshold/threshold.toml > $w/m$v.toml
  $bin bundle build --manifest $w/m$v.toml --wasm $wasm --key $w/keys/signing.key --out $w/t$v.tpb >/dev/null
done
ms() { python3 -c "import sys; print(f'{(float(sys.argv[2])-float(sys.argv[1]))*1000:.1f}')" "$@"; }
deploys=(); lists=()
for v in $(seq 4 13); do
  t0=$(date +%s.%N); $bin list --profile $w/ops/bench.toml >/dev/null; t1=$(date +%s.%N)
  $bin deploy $w/t$v.tpb --profile $w/ops/bench.toml >/dev/null; t2=$(date +%s.%N)
  lists+=("$(ms $t0 $t1)"); deploys+=("$(ms $t1 $t2)")
done
python3 - "${deploys[*]}" "${lists[*]}" <<'PY'
import statistics, sys
d = [float(x) for x in sys.argv[1].split()]; l = [float(x) for x in sys.argv[2].split()]
md, ml = statistics.median(d), statistics.median(l)
print(f"deploy: median {md:.1f} ms, max {max(d):.1f} ms; list: median {ml:.1f} ms; deploy/list {md/ml:.2f}x")
PY
kill -TERM $GW_PID; wait $GW_PID || true

echo "== fleet deploy: 20 gateways in 4 waves, next to 1 gateway"
fleet() { # fleet N DIR: N gateways under DIR, their inventory in DIR/fleet.toml
  local n=$1 d=$2; mkdir -p $d
  : > $d/fleet.toml
  for i in $(seq 1 $n); do
    cat > $d/gw$i.toml <<TOML
[gateway]
id = "fleet-$i"
listen = "127.0.0.1:0"
data_dir = "$d/data$i"
log = "warn"
[deploy]
trusted_keys = ["$pub"]
probation_s = 2
TOML
    $bin run --config $d/gw$i.toml > $d/ready$i 2>>$d/gw.log &
    echo $! >> $d/pids
  done
  for i in $(seq 1 $n); do
    while ! grep -q listening $d/ready$i 2>/dev/null; do sleep 0.05; done
    p=$(sed -n 's/.*://p' $d/ready$i)
    $bin certs operator bench --config $d/gw$i.toml --out $d/ops$i --gateway 127.0.0.1:$p >/dev/null
    printf '[[gateway]]\nname = "gw%s"\naddress = "127.0.0.1:%s"\nca = "ops%s/ca.crt"\ncert = "ops%s/bench.crt"\nkey = "ops%s/bench.key"\n' $i $p $i $i $i >> $d/fleet.toml
  done
}
fleet 1 $w/one
fleet 20 $w/twenty
t0=$(date +%s.%N); $bin fleet deploy $w/t1.tpb --inventory $w/one/fleet.toml --wave 1 >/dev/null 2>$w/one.err; t1=$(date +%s.%N)
$bin fleet deploy $w/t1.tpb --inventory $w/twenty/fleet.toml --wave 25% >/dev/null 2>$w/twenty.err; t2=$(date +%s.%N)
kill -TERM $(cat $w/one/pids $w/twenty/pids) 2>/dev/null || true
grep -h "gateways run" $w/one.err $w/twenty.err
python3 -c "import sys; a,b,c=map(float,sys.argv[1:]); print(f'1 gateway: {b-a:.1f} s; 20 in 4 waves: {c-b:.1f} s ({(c-b)/(b-a):.2f}x, of which at least 4 x 2 s of probation)')" $t0 $t1 $t2
