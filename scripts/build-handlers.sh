#!/usr/bin/env bash
# Builds the guest SDK and the example handlers in modules/ (their own cargo workspace, target
# wasm32-unknown-unknown per modules/.cargo/config.toml) and lists the .wasm files produced.
# Extra arguments go to cargo, e.g. `scripts/build-handlers.sh -j1`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=wasm32-unknown-unknown
# (grep without -q reads all input, so rustup never gets SIGPIPE under pipefail.)
if ! rustup target list --installed | grep -x "$target" >/dev/null; then
    rustup target add "$target"
fi

# Cargo reads .cargo/config.toml from the working directory, not the manifest's, so name it.
# Always into modules/target (where the tests and the demo look), whatever CARGO_TARGET_DIR says.
cargo build --release --manifest-path modules/Cargo.toml --config modules/.cargo/config.toml \
    --target-dir modules/target "$@"

# One module per example (modules/examples/NAME builds NAME.wasm); a missing one means an
# example is not a workspace member or not a cdylib.
for dir in modules/examples/*/; do
    name=$(basename "$dir")
    f=modules/target/"$target"/release/"$name".wasm
    if [[ ! -f $f ]]; then
        echo "no $f: is modules/examples/$name a member of modules/Cargo.toml?" >&2
        exit 1
    fi
    printf '%s\t%s bytes\n' "$f" "$(stat -c %s "$f")"
done
