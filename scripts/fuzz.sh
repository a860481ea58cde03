#!/usr/bin/env bash
# Fuzzes what a peer, a device or an operator's file can hand the gateway, each target for a
# bounded time: the frame decoder (`frame`), the CBOR messages (`message`), topics, patterns and
# the ACL (`topic`), the config (`config`), signed bundles and handler manifests (`bundle`).
# Targets are in fuzz/fuzz_targets, seeds in
# fuzz/seeds (copied into a scratch corpus, so a run never changes the repository).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 30 s each, every target)
#
# Installs what it needs on a fresh machine: the nightly toolchain and cargo-fuzz. A crash
# leaves its input in fuzz/artifacts/TARGET/ and fails the run; replay it with
#   cargo +nightly fuzz run -s none TARGET fuzz/artifacts/TARGET/crash-...
# (run from the repository root). No sanitizer: the code under test is safe Rust, and the
# build stays a few minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-30}
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(frame message topic config bundle)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

corpus=$(mktemp -d "${TMPDIR:-/tmp}/tidepool-fuzz.XXXXXX")
trap 'rm -rf "$corpus"' EXIT
echo "== building the fuzz targets (nightly, coverage instrumentation)"
cargo +nightly fuzz build -s none --release
for t in "${targets[@]}"; do
    # Only this run's crashes count.
    rm -rf "fuzz/artifacts/$t"
    mkdir -p "$corpus/$t"
    cp fuzz/seeds/"$t"/* "$corpus/$t"/
    echo "== fuzz $t for ${seconds}s"
    cargo +nightly fuzz run -s none --release "$t" "$corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>&1 |
        grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|==[0-9]+== ERROR|SUMMARY|thread .* panicked)|Done [0-9]+ runs' || true
    # cargo fuzz exits non-zero on a crash, but the grep above hides that: look for artifacts.
    if compgen -G "fuzz/artifacts/$t/*" >/dev/null; then
        echo "fuzz $t: found a crash: $(ls fuzz/artifacts/"$t")" >&2
        exit 1
    fi
done
echo "fuzz: no crash in ${#targets[@]} targets, ${seconds}s each"
