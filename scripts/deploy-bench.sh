#!/usr/bin/env bash
# The swap pause of a deploy: 8 devices publish 5,000 events/s in all through the threshold
# handler, deployed from a signed bundle through the offline inbox; their p99 ack with no deploy,
# then with two deploys of new versions while they publish, then with none again (the same
# gateway, one run). Every event must be acked (the load generator fails otherwise).
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
trap 'kill "${GW_PID:-}" 2>/dev/null || true; rm -rf "$w"' EXIT
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
for i in $(seq 1 8); do $bin certs device dev-$i --config $w/tidepool.toml --out $w/certs >/dev/null; done
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
echo "deploys logged: $(grep -c 'deployed from the inbox' $w/gw.log)"
