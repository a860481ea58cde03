#!/usr/bin/env bash
# The README's test command: builds everything (the gateway and the Wasm handlers) and runs
# every test. Installs what it needs by itself (the wasm32 target). Non-interactive.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== building the handlers (modules/, wasm32-unknown-unknown)"
scripts/build-handlers.sh

echo "== guest SDK and example handler tests (modules/ workspace, host target)"
cargo test --manifest-path modules/Cargo.toml --config modules/.cargo/config.toml \
    --workspace --target "$(rustc -vV | sed -n 's/^host: //p')"

echo "== gateway: unit and end-to-end tests"
cargo test --workspace
