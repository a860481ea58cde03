#!/usr/bin/env bash
# A real power cut: the gateway runs in a qemu VM (emulated; TIDEPOOL_VM_KVM=1 for KVM) on an ext4 disk
# image, 4 devices publishing to it from inside the VM (each event an outbox entry, no uplink);
# the VM is killed (SIGKILL to qemu: the guest's page cache, its unsaved file sizes and its
# uncommitted ext4 journal are gone, as at a power cut), then booted again to ask the gateway
# each device's durable high-water mark (`hello` → `welcome`) and its outbox count. Every ack
# the devices printed before the cut must be at or below the mark, the outbox must hold at
# least the acked events and at most the marked ones, the store must open, and the next cycle
# publishes on the same disk.
#
#   scripts/powercut-vm.sh [--cycles N] [--seed S] [--bin PATH]
#
# What it does not model: a disk's own volatile write cache (the host keeps what qemu wrote);
# tests/powercut.rs (lazyfs) drops every unsynced write at the file level for that. Installs
# qemu-system-x86, a Debian cloud kernel, busybox-static and cpio when missing (root).
# --bin runs another build of the gateway (to show a build without the fsync fail).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

cycles=3 seed=$(date +%s) bin=
while (($#)); do
    case $1 in
        --cycles) cycles=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "powercut-vm.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

kernel=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | tail -1 || true)
if ! command -v qemu-system-x86_64 >/dev/null || [ -z "$kernel" ] || ! [ -x /bin/busybox ] ||
    ! command -v cpio >/dev/null || ! command -v mkfs.ext4 >/dev/null; then
    echo "== installing qemu, a cloud kernel, busybox-static, cpio"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio e2fsprogs >/dev/null
    kernel=$(ls /boot/vmlinuz-*-cloud-amd64 | tail -1)
fi
kver=${kernel#/boot/vmlinuz-}
modules=/lib/modules/$kver/kernel/drivers

echo "== building (release gateway, load generator)"
cargo build --release --quiet -p tidepool
cargo build --profile bench-fast --quiet -p tidepool --example loadgen
bin=${bin:-$root/target/release/tidepool}
loadgen=$root/target/bench-fast/examples/loadgen

work=$(mktemp -d "${TMPDIR:-/tmp}/powercut-vm.XXXXXX")
qpid= keep=
# The VM logs are kept when a cycle fails (the path is printed).
trap '[ -n "$qpid" ] && kill -9 "$qpid" 2>/dev/null; [ -n "$keep" ] || rm -rf "$work"' EXIT
fail() { keep=1; echo "powercut-vm: $* (seed $seed; logs in $work)" >&2; exit 1; }

# The initramfs: busybox, the two binaries and their libraries, the virtio modules, an init.
r=$work/root
mkdir -p "$r"/{bin,proc,sys,dev,data,tmp,tp,modules}
cp /bin/busybox "$r/bin/busybox"
cp "$bin" "$r/tp/tidepool"
cp "$loadgen" "$r/tp/loadgen"
for lib in $( (ldd "$bin"; ldd "$loadgen") | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$r$(dirname "$lib")"
    cp -L "$lib" "$r$lib"
done
for m in virtio/virtio virtio/virtio_ring virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev \
    virtio/virtio_pci block/virtio_blk; do
    cp "$modules/$m.ko" "$r/modules/"
done
# Every event becomes an outbox entry (no uplink: they stay): the check counts them too.
cat >"$r/tp/tidepool.toml" <<'TOML'
[gateway]
id = "vm"
listen = "127.0.0.1:7700"
data_dir = "/data/gw"
log = "warn"
[ingress]
# The load runs as fast as it can: the per-device limit would only slow it.
device_events_per_s = 0
[router]
unrouted = "forward"
[outbox]
max_bytes = 268435456
TOML
cat >"$r/init" <<'SH'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /modules/$m.ko
done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 /dev/vda /data || { echo "TP: the data disk does not mount"; poweroff -f; }
ip link set lo up
mode=$(sed -n 's/.*tp=\([a-z]*\).*/\1/p' /proc/cmdline)
/tp/tidepool run --config /tp/tidepool.toml >/tmp/ready 2>/dev/console &
i=0; while ! grep -q listening /tmp/ready && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
grep -q listening /tmp/ready || { echo "TP: the gateway did not start"; poweroff -f; }
if [ ! -f /data/certs/dev-4.key ]; then
    for d in 1 2 3 4; do /tp/tidepool certs device dev-$d --config /tp/tidepool.toml --out /data/certs >/dev/null; done
fi
echo "TP: ready"
if [ "$mode" = load ]; then
    /tp/loadgen tidepool --gateway 127.0.0.1:7700 --certs /data/certs --devices 4 \
        --events-per-device 1000000 --window 64 --progress
else
    /tp/loadgen marks --gateway 127.0.0.1:7700 --certs /data/certs --devices 4 &&
        echo "status $(/tp/tidepool status --json --config /tp/tidepool.toml | tr -d '\n')" &&
        echo "TP: checked"
fi
poweroff -f
SH
chmod +x "$r/init"
(cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"

truncate -s 512M "$work/data.img"
mkfs.ext4 -q -F "$work/data.img"

# TCG (emulation) by default: KVM nested in this workplace's VMs fails to emulate cmpxchg16b in
# the guest kernel. TIDEPOOL_VM_KVM=1 tries KVM where it works.
accel=(-accel tcg -cpu max)
[ "${TIDEPOOL_VM_KVM:-}" = 1 ] && [ -w /dev/kvm ] && accel=(-enable-kvm -cpu host)
vm() { # vm MODE LOG: boots the VM in the background; sets $qpid
    qemu-system-x86_64 "${accel[@]}" -m 512 -smp 2 -kernel "$kernel" -initrd "$work/initrd.gz" \
        -append "console=ttyS0 quiet panic=-1 tp=$1" \
        -drive "file=$work/data.img,format=raw,if=virtio,cache=writeback" \
        -display none -monitor none -nic none -no-reboot -serial "file:$2" &
    qpid=$!
}
wait_for() { # wait_for SECONDS PATTERN FILE
    local i=0
    until grep -q "$2" "$3" 2>/dev/null; do
        i=$((i + 1))
        [ $i -gt $(($1 * 10)) ] && return 1
        sleep 0.1
    done
}

RANDOM=$seed
lost=0
echo "== $cycles power cuts, seed $seed (${accel[*]})"
for c in $(seq 1 "$cycles"); do
    vm load "$work/load-$c.log"
    wait_for 300 "^acked" "$work/load-$c.log" || fail "cycle $c: no acks"
    # Cut after 1 to 4 s of load.
    sleep "$((1 + RANDOM % 3)).$((RANDOM % 10))"
    kill -0 "$qpid" 2>/dev/null || fail "cycle $c: the load VM stopped before the cut (a crash?)"
    kill -9 "$qpid"; wait "$qpid" 2>/dev/null || true; qpid=
    vm check "$work/check-$c.log"
    # The check VM powers itself off; one that hangs is killed after 5 minutes (and fails).
    i=0; while kill -0 "$qpid" 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
    kill -9 "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true; qpid=
    grep -q "TP: checked" "$work/check-$c.log" ||
        fail "cycle $c: the VM after the cut did not answer (the store did not open, or the gateway did not start)"
    r=0
    python3 - "$work/load-$c.log" "$work/check-$c.log" "$c" <<'PY' || r=$?
import re, sys
import json
acked, marks, entries = {}, {}, None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"acked (\S+) (\d+)$", line.strip())
    if m: acked[m[1]] = max(acked.get(m[1], 0), int(m[2]))
for line in open(sys.argv[2], errors="replace"):
    m = re.match(r"mark (\S+) (\d+)$", line.strip())
    if m: marks[m[1]] = int(m[2])
    if line.startswith("status "):
        entries = json.loads(line[7:])["outbox"]["entries"]
c = sys.argv[3]
missing = [d for d in acked if d not in marks]
if missing or entries is None:
    print(f"cycle {c}: no mark for {missing} or no outbox count after the cut: the check failed, not durability")
    sys.exit(2)
bad = {d: (a, marks[d]) for d, a in acked.items() if marks[d] < a}
# One outbox entry per kept event (all devices, every cycle so far; no uplink drains them).
low, high = sum(acked.values()), sum(marks.values())
if not low <= entries <= high:
    bad["outbox"] = (f"{entries} entries", f"acked {low}, marks {high}")
print(f"cycle {c}: acked up to {dict(sorted(acked.items()))}, marks after the cut {dict(sorted(marks.items()))}, "
      f"{entries} outbox entries: " + ("ok" if not bad else f"LOST acks (acked, after the cut): {bad}"))
sys.exit(3 if bad else 0)
PY
    # 3: acks lost; anything else: the check itself failed.
    if [ $r = 3 ]; then lost=1; elif [ $r != 0 ]; then fail "cycle $c: the check after the cut failed"; fi
done
if [ $lost = 1 ]; then fail "acked events lost"; fi
echo "powercut-vm: $cycles cuts, no acked event lost"
