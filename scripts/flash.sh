#!/usr/bin/env bash
# Installs Tidepool into a board's root file system: a directory (--rootfs), or the root
# partition of a disk image or card (--image), which it finds, mounts, fills and unmounts.
#
#   scripts/flash.sh --board NAME (--rootfs DIR | --image FILE|/dev/sdX) [--config FILE]
#       [--device-ca CRT] [--operator-ca CRT] [--trusted-key PUB] [--uplink URL]
#       [--binary FILE] [--partition N]
#
# What it installs (the board's files in board/NAME/):
#   /usr/bin/tidepool                      the static binary (scripts/build.sh --board NAME,
#                                          run unless --binary names one already built)
#   /etc/tidepool/tidepool.toml            --config FILE, else the board's tidepool.toml
#   /etc/tidepool/pki/{device,operator}-ca.crt   --device-ca / --operator-ca: the fleet's CAs,
#                                          named in the config as pki.device_ca/operator_ca
#   /usr/lib/systemd/system/tidepool.service, enabled (multi-user.target.wants)
#   /usr/lib/sysusers.d/tidepool.conf, /usr/lib/tmpfiles.d/tidepool.conf: the system user and
#                                          the state dir /var/lib/tidepool, made at boot (and
#                                          now, when the host has systemd-sysusers/-tmpfiles)
# With --image, the root partition is the GPT root partition, else the largest Linux one, or
# partition N (--partition, as sfdisk numbers them); it must hold etc/passwd or etc/os-release,
# and no partition of the target may be mounted already.
# --uplink URL sets uplink.url, --trusted-key PUB (a file with an `ed25519:…` line, as
# `tidepool keys generate` writes) adds to deploy.trusted_keys.
#
# Flashing again upgrades in place: the binary and the unit files are replaced; the state dir
# is never touched; an installed tidepool.toml is kept with its local edits (the board's copy
# goes beside it as tidepool.toml.dist) unless --config names a new one (the old one is kept
# as tidepool.toml.old). The options above are applied to whichever config is installed.
set -euo pipefail
# Paths given relative to where it was started, resolved before moving to the repo.
abs() { [ -z "$1" ] && return 0; realpath -m -- "$1"; }
here=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "flash.sh: $*" >&2; exit 2; }
board="" rootfs="" image="" config="" device_ca="" operator_ca="" trusted_key="" uplink="" binary="" partition=""
while (($#)); do
    case $1 in
        --board) board=${2:?--board needs a name}; shift 2 ;;
        --rootfs) rootfs=${2:?--rootfs needs a directory}; shift 2 ;;
        --image) image=${2:?--image needs a file or device}; shift 2 ;;
        --config) config=${2:?--config needs a file}; shift 2 ;;
        --device-ca) device_ca=${2:?--device-ca needs a certificate}; shift 2 ;;
        --operator-ca) operator_ca=${2:?--operator-ca needs a certificate}; shift 2 ;;
        --trusted-key) trusted_key=${2:?--trusted-key needs a public key file}; shift 2 ;;
        --uplink) uplink=${2:?--uplink needs a URL}; shift 2 ;;
        --binary) binary=${2:?--binary needs a file}; shift 2 ;;
        --partition) partition=${2:?--partition needs a number}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (try --help)" ;;
    esac
done
cd "$here"
for v in rootfs image config device_ca operator_ca trusted_key binary; do
    printf -v "$v" '%s' "$(abs "${!v}")"
done
cd "$root"
[ -z "$partition" ] || [[ $partition =~ ^[0-9]+$ ]] || die "--partition takes a number, not $partition"
[ -n "$board" ] || die "--board NAME is required; boards: $(ls board | tr '\n' ' ')"
[ -d "board/$board" ] || die "no board '$board' (no board/$board); boards: $(ls board | tr '\n' ' ')"
[ -n "$rootfs$image" ] || die "give --rootfs DIR or --image FILE|/dev/sdX"
[ -z "$rootfs" ] || [ -z "$image" ] || die "give --rootfs or --image, not both"
for f in "$config" "$device_ca" "$operator_ca" "$trusted_key" "$binary"; do
    [ -z "$f" ] || [ -f "$f" ] || die "$f: no such file"
done
for ca in "$device_ca" "$operator_ca"; do
    [ -z "$ca" ] || grep -q -- "-----BEGIN CERTIFICATE-----" "$ca" || die "$ca: not a PEM certificate"
done
if [ -n "$device_ca" ] && [ -n "$operator_ca" ] && cmp -s "$device_ca" "$operator_ca"; then
    die "--device-ca and --operator-ca are the same certificate: every device would be an operator (tidepool certs init makes two CAs)"
fi
key_line=""
if [ -n "$trusted_key" ]; then
    key_line=$(grep -m1 -oE 'ed25519:[A-Za-z0-9+/]{43}=' "$trusted_key") \
        || die "$trusted_key: no ed25519:<base64 of 32 bytes> public key in it (tidepool keys generate writes one)"
fi
if [ -n "$config" ]; then
    # A broken config is refused here, not at the box's first boot.
    python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$config" \
        || die "$config: not valid TOML"
fi

# --- the binary -----------------------------------------------------------------------------
if [ -z "$binary" ]; then
    binary=$(scripts/build.sh --board "$board" | tail -n1)
fi
target=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["target"])' "board/$board/board.toml")
case $target in
    aarch64-*) want=183 ;;   # EM_AARCH64
    armv7-*) want=40 ;;      # EM_ARM
    x86_64-*) want=62 ;;     # EM_X86_64
    *) want="" ;;
esac
machine=$(od -An -t u2 -j 18 -N 2 "$binary" | tr -d ' ')
[ -z "$want" ] || [ "$machine" = "$want" ] || die "$binary is for ELF machine $machine, not board $board's $target"

# --- the root file system -------------------------------------------------------------------
mnt="" loop=""
cleanup() {
    if [ -n "$mnt" ]; then umount "$mnt" 2>/dev/null || true; rmdir "$mnt" 2>/dev/null || true; fi
    if [ -n "$loop" ]; then losetup -d "$loop" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ -n "$image" ]; then
    [ -e "$image" ] || die "$image: no such file or device"
    command -v sfdisk >/dev/null || die "sfdisk is missing (apt-get install fdisk)"
    # Two mounts of one file system corrupt it: a card a desktop mounted, an image in use.
    if [ -b "$image" ] && lsblk -nro MOUNTPOINT "$image" | grep -q .; then
        die "$image: a partition of it is mounted ($(lsblk -nro NAME,MOUNTPOINT "$image" | awk '$2 != ""' | tr '\n' ' ')): unmount it first"
    fi
    if [ -f "$image" ] && [ -n "$(losetup -j "$image")" ]; then
        die "$image: attached to a loop device already ($(losetup -j "$image" | cut -d: -f1)): detach it first"
    fi
    read -r start size < <(sfdisk -J "$image" | python3 -c '
import json, sys
import re
want = sys.argv[1]
t = json.load(sys.stdin)["partitiontable"]
parts = t.get("partitions", [])
root_types = {"B921B045-1DF0-41C3-AF44-4C6F280D3FAE", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
              "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3", "44479540-F297-41B2-9AF7-D131D5F0458A"}
linux = root_types | {"83", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"}
kind = lambda p: str(p.get("type", "")).upper()
number = lambda p: (re.search(r"(\d+)$", p.get("node", "")) or [None, ""])[1]
if want:
    pick = [p for p in parts if number(p) == want]
    if not pick:
        sys.exit(f"no partition {want} in the partition table")
    p = pick[0]
else:
    roots = [p for p in parts if kind(p) in root_types]
    pool = roots or [p for p in parts if kind(p) in linux]
    if not pool:
        sys.exit("no Linux partition in the partition table (give --partition N)")
    p = max(pool, key=lambda p: p["size"])
sector = t.get("sectorsize", 512)
print(p["start"] * sector, p["size"] * sector)
' "$partition") || die "$image: cannot find its root partition"
    loop=$(losetup --find --show --offset "$start" --sizelimit "$size" "$image")
    fstype=$(blkid -p -o value -s TYPE "$loop" 2>/dev/null || true)
    [ "$fstype" = ext4 ] || die "$image: the root partition (at byte $start) is '${fstype:-unformatted}', not ext4"
    mnt=$(mktemp -d)
    mount "$loop" "$mnt"
    rootfs=$mnt
    [ -e "$rootfs/etc/passwd" ] || [ -e "$rootfs/etc/os-release" ] || [ -e "$rootfs/usr/lib/os-release" ] \
        || die "$image: the partition at byte $start holds no root file system (no etc/passwd or os-release); give --partition N"
fi
[ -d "$rootfs" ] || die "$rootfs: no such directory"

# Every folder written to must stay inside the root file system: an absolute symlink in the
# image (/etc/tidepool -> /data/...) would otherwise resolve on this host.
top=$(realpath "$rootfs")
for d in usr/bin usr/lib/systemd/system usr/lib/sysusers.d usr/lib/tmpfiles.d \
         etc/systemd/system/multi-user.target.wants etc/tidepool etc/tidepool/pki; do
    case $(realpath -m "$rootfs/$d") in
        "$top"/*) ;;
        *) die "$rootfs/$d leads out of the root file system (a symlink?): $(realpath -m "$rootfs/$d")" ;;
    esac
done

etc=$rootfs/etc/tidepool
cfg=$etc/tidepool.toml
# The config to install, made and checked before anything is written: --config, else the
# installed one (its local edits kept), else the board's; then the options applied to it.
if [ -n "$config" ]; then base=$config; what="config from $config"
elif [ -f "$cfg" ]; then base=$cfg; what="the installed config kept (the board's copy: tidepool.toml.dist)"
else base=board/$board/tidepool.toml; what="the board's config"
fi
new_cfg=$(mktemp)
trap 'rm -f "$new_cfg"; cleanup' EXIT
python3 - "$base" "$new_cfg" "$uplink" "${device_ca:+pki/device-ca.crt}" "${operator_ca:+pki/operator-ca.crt}" "$key_line" <<'PY'
import json, re, sys, tomllib
src, dst, uplink, device_ca, operator_ca, key = sys.argv[1:]
text = open(src).read()
try:
    before = tomllib.loads(text)
except tomllib.TOMLDecodeError as e:
    sys.exit(f"flash.sh: {src} is not valid TOML ({e})")

def table_span(lines, table):
    head = re.compile(r"^\s*\[\s*" + re.escape(table) + r"\s*\]\s*(#.*)?$")
    start = next((i for i, l in enumerate(lines) if head.match(l)), None)
    if start is None:
        return None, None
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
    return start, end

def value_end(lines, i):
    """The last line of an array value that starts on line i (it may span lines)."""
    depth, j = 0, i
    while True:
        depth += lines[j].count("[") - lines[j].count("]")
        if depth <= 0 or j + 1 >= len(lines):
            return j
        j += 1

def put(text, table, key, value):
    lines = text.split("\n")
    start, end = table_span(lines, table)
    line = f"{key} = {value}"
    if start is None:
        return text.rstrip("\n") + f"\n\n[{table}]\n{line}\n"
    pat = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    for i in range(start + 1, end):
        if pat.match(lines[i]):
            last = value_end(lines, i) if lines[i].split("=", 1)[1].strip().startswith("[") else i
            lines[i : last + 1] = [line]
            return "\n".join(lines)
    lines.insert(start + 1, line)
    return "\n".join(lines)

want = {}
for table, k, v in (("uplink", "url", uplink), ("pki", "device_ca", device_ca),
                    ("pki", "operator_ca", operator_ca)):
    if v and before.get(table, {}).get(k) != v:
        text = put(text, table, k, json.dumps(v))
    if v:
        want[(table, k)] = v
if key:
    keys = before.get("deploy", {}).get("trusted_keys", [])
    if key not in keys:
        text = put(text, "deploy", "trusted_keys", json.dumps(keys + [key]))
try:
    got = tomllib.loads(text)
except tomllib.TOMLDecodeError as e:
    sys.exit(f"flash.sh: editing {src} would break it ({e}); edit it by hand")
for (table, k), v in want.items():
    if got.get(table, {}).get(k) != v:
        sys.exit(f"flash.sh: could not set {table}.{k} in {src} (dotted keys or inline tables?); edit it by hand")
if key and key not in got.get("deploy", {}).get("trusted_keys", []):
    sys.exit(f"flash.sh: could not add the key to deploy.trusted_keys in {src}; edit it by hand")
open(dst, "w").write(text.rstrip("\n") + "\n")
PY

echo "== installing Tidepool ($board) into ${image:-$rootfs}" >&2
install_file() { # MODE SRC DEST: written beside DEST, then renamed over it (never half a file)
    install -D -m "$1" "$2" "$3.flash-new"
    mv -f "$3.flash-new" "$3"
}
install_file 0755 "$binary" "$rootfs/usr/bin/tidepool"
install_file 0644 "board/$board/tidepool.service" "$rootfs/usr/lib/systemd/system/tidepool.service"
install_file 0644 "board/$board/sysusers.conf" "$rootfs/usr/lib/sysusers.d/tidepool.conf"
install_file 0644 "board/$board/tmpfiles.conf" "$rootfs/usr/lib/tmpfiles.d/tidepool.conf"
mkdir -p "$rootfs/etc/systemd/system/multi-user.target.wants"
ln -sfn /usr/lib/systemd/system/tidepool.service \
    "$rootfs/etc/systemd/system/multi-user.target.wants/tidepool.service"
mkdir -p "$etc"
if [ -n "$config" ] && [ -f "$cfg" ]; then cp -p "$cfg" "$cfg.old"; fi
install_file 0640 "$new_cfg" "$cfg"
install_file 0644 "board/$board/tidepool.toml" "$etc/tidepool.toml.dist"
[ -z "$device_ca" ] || install_file 0644 "$device_ca" "$etc/pki/device-ca.crt"
[ -z "$operator_ca" ] || install_file 0644 "$operator_ca" "$etc/pki/operator-ca.crt"

# The user and the state dir now, when this host can make them offline (else at first boot).
if command -v systemd-sysusers >/dev/null && [ -f "$rootfs/etc/passwd" ]; then
    systemd-sysusers --root="$rootfs" "$rootfs/usr/lib/sysusers.d/tidepool.conf" >&2 || true
fi
if command -v systemd-tmpfiles >/dev/null && [ -f "$rootfs/etc/passwd" ]; then
    systemd-tmpfiles --root="$rootfs" --create "$rootfs/usr/lib/tmpfiles.d/tidepool.conf" >&2 || true
fi
size=$(stat -c %s "$rootfs/usr/bin/tidepool")
sync
if [ -n "$mnt" ]; then
    umount "$mnt" || die "cannot unmount $mnt ($image): do not remove or copy the card until it is unmounted"
    rmdir "$mnt"
    mnt=""
fi
echo "== installed: the $size-byte binary, $what, tidepool.service enabled" >&2
