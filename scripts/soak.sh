#!/usr/bin/env bash
# The long run of the delivery promises (docs/delivery.md): the kill -9 test for many more
# cycles, the power-cut test (lazyfs) for many more cuts, and real power cuts of a VM
# (scripts/powercut-vm.sh), on new seeds each run unless given.
#
#   scripts/soak.sh [--cycles N] [--cuts N] [--vm-cuts N] [--seed S]
#
# Defaults: 200 kill -9 cycles, 50 lazyfs power cuts, 5 VM power cuts, seed = the current time.
# A failure prints the seed; `scripts/soak.sh --seed S` replays the same schedule (the VM cuts
# replay their timing, not the guest's scheduling). Needs root (FUSE, like scripts/test.sh,
# which installs fuse3, libfuse2 and fusepy; the VM script installs qemu and a kernel).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cycles=200 cuts=50 vm_cuts=5 seed=$(date +%s)
while [ $# -gt 0 ]; do
    case $1 in
        --cycles) cycles=$2; shift 2 ;;
        --cuts) cuts=$2; shift 2 ;;
        --vm-cuts) vm_cuts=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

python3 -c 'import fuse' 2>/dev/null && command -v fusermount3 >/dev/null || {
    echo "soak.sh: lazyfs needs fuse3, libfuse2 and fusepy: run scripts/test.sh once (it installs them)" >&2
    exit 2
}
scripts/build-handlers.sh >/dev/null
out=$(mktemp)
trap 'rm -f "$out"' EXIT
started=$(date +%s)
echo "== kill -9 under load: $cycles cycles, seed $seed"
TIDEPOOL_CRASH_CYCLES=$cycles TIDEPOOL_CRASH_SEED=$seed \
    cargo test -q --test crash -- --nocapture 2>&1 | tee "$out" | grep -E '^(crash|test result)|panicked|seed' || true
grep -q '^crash: ' "$out" || { echo "soak.sh: the kill -9 run failed (seed $seed)" >&2; exit 1; }
echo "== power cuts (lazyfs): $cuts cuts, seed $seed"
TIDEPOOL_POWERCUT_CYCLES=$cuts TIDEPOOL_POWERCUT_SEED=$seed \
    cargo test -q --test powercut -- --nocapture 2>&1 | tee "$out" | grep -E '^(powercut|test result)|panicked|cycle' || true
grep -q '^powercut: ' "$out" || { echo "soak.sh: the power-cut run failed (seed $seed)" >&2; exit 1; }
if [ "$vm_cuts" -gt 0 ]; then
    echo "== real power cuts (a VM killed under load): $vm_cuts cuts, seed $seed"
    scripts/powercut-vm.sh --cycles "$vm_cuts" --seed "$seed" 2>&1 | tee "$out" |
        grep -E '^(cycle|powercut-vm|==)' || true
    grep -q '^powercut-vm: .* no acked event lost' "$out" ||
        { echo "soak.sh: the VM power-cut run failed (seed $seed)" >&2; exit 1; }
fi
echo "soak passed in $(( $(date +%s) - started )) s"
