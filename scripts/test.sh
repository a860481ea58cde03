#!/usr/bin/env bash
# The README's test command: builds everything (the gateway and the Wasm handlers) and runs
# every test. Installs what it needs by itself (the wasm32 target; fuse3, libfuse2 and fusepy for
# the power-cut test; mosquitto and nats-server for the sinks'). Non-interactive. The gateway is
# tested with every feature (the NATS sink is the cargo feature `nats`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== test prerequisites: FUSE (the power-cut test's lazyfs), Mosquitto and nats-server (the sinks')"
missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2' || missing+=(libfuse2)
[ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v nats-server >/dev/null || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -c 'import fuse' 2>/dev/null || python3 -m pip install -q fusepy

echo "== building the handlers (modules/, wasm32-unknown-unknown)"
scripts/build-handlers.sh

echo "== guest SDK and example handler tests (modules/ workspace, host target)"
cargo test --manifest-path modules/Cargo.toml --config modules/.cargo/config.toml \
    --workspace --target "$(rustc -vV | sed -n 's/^host: //p')"

echo "== gateway: unit and end-to-end tests"
cargo test --workspace --all-features
