#!/usr/bin/env bash
# The README's test command: builds everything (the gateway and the Wasm handlers) and runs
# every test. Installs what it needs by itself (the wasm32 target; fuse3, libfuse2 and fusepy for
# the power-cut test; mosquitto and nats-server for the sinks'; qemu-user-static, and through
# scripts/build.sh the aarch64 cross toolchain, for the board test). Non-interactive. The gateway is
# tested with every feature (the NATS sink is the cargo feature `nats`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== test prerequisites: FUSE (the power-cut test's lazyfs), Mosquitto and nats-server (the sinks')"
missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2' || missing+=(libfuse2)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
[ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v nats-server >/dev/null || missing+=(nats-server)
# tests/board.rs runs the aarch64 board build (scripts/build.sh installs its cross toolchain).
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
# tests/flash.rs makes a disk image (sfdisk, mkfs.ext4) and checks the unit (systemd-analyze).
command -v sfdisk >/dev/null || missing+=(fdisk)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v systemd-analyze >/dev/null || missing+=(systemd)
# tests/clock.rs runs the gateway at 1970 and 2099 under libfaketime.
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || missing+=(faketime)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import fuse' 2>/dev/null; then
    # A distribution's Python may refuse pip (PEP 668) or lack it: then Debian's package.
    python3 -m pip install -q fusepy 2>/dev/null \
        || python3 -m pip install -q --break-system-packages fusepy 2>/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-fusepy >/dev/null; }
fi

echo "== building the handlers (modules/, wasm32-unknown-unknown)"
scripts/build-handlers.sh

echo "== guest SDK and example handler tests (modules/ workspace, host target)"
cargo test --manifest-path modules/Cargo.toml --config modules/.cargo/config.toml \
    --workspace --target "$(rustc -vV | sed -n 's/^host: //p')"

echo "== gateway: unit and end-to-end tests"
cargo test --workspace --all-features
