#!/usr/bin/env bash
# Installs Tidepool into a board's root file system: a directory (--rootfs), or the root
# partition of a disk image or card (--image), which it finds, mounts, fills and unmounts.
#
#   scripts/flash.sh --board NAME (--rootfs DIR | --image FILE|/dev/sdX) [--config FILE]
#       [--device-ca CRT] [--operator-ca CRT] [--trusted-key PUB] [--uplink URL]
#       [--binary FILE]
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
# --uplink URL sets uplink.url, --trusted-key PUB (a file with an `ed25519:…` line, as
# `tidepool keys generate` writes) adds to deploy.trusted_keys.
#
# Flashing again upgrades in place: the binary and the unit files are replaced; the state dir
# is never touched; an installed tidepool.toml is kept with its local edits (the board's copy
# goes beside it as tidepool.toml.dist) unless --config names a new one (the old one is kept
# as tidepool.toml.old). The options above are applied to whichever config is installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "flash.sh: $*" >&2; exit 2; }
board="" rootfs="" image="" config="" device_ca="" operator_ca="" trusted_key="" uplink="" binary=""
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
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (try --help)" ;;
    esac
done
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
key_line=""
if [ -n "$trusted_key" ]; then
    key_line=$(grep -m1 -o 'ed25519:[A-Za-z0-9+/=]*' "$trusted_key") \
        || die "$trusted_key: no ed25519:<base64> public key in it (tidepool keys generate writes one)"
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
if [ -n "$image" ]; then
    [ -e "$image" ] || die "$image: no such file or device"
    command -v sfdisk >/dev/null || die "sfdisk is missing (apt-get install fdisk)"
    # The root partition: the largest Linux one (MBR type 83, or a GPT Linux filesystem or
    # root partition type).
    read -r start size < <(sfdisk -J "$image" | python3 -c '
import json, sys
t = json.load(sys.stdin)["partitiontable"]
linux = {"83", "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
         "B921B045-1DF0-41C3-AF44-4C6F280D3FAE", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
         "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3", "44479540-F297-41B2-9AF7-D131D5F0458A"}
parts = [p for p in t.get("partitions", []) if str(p.get("type", "")).upper() in linux]
if not parts:
    sys.exit("no Linux partition in the partition table")
p = max(parts, key=lambda p: p["size"])
sector = t.get("sectorsize", 512)
print(p["start"] * sector, p["size"] * sector)
') || die "$image: cannot find its root partition"
    loop=$(losetup --find --show --offset "$start" --sizelimit "$size" "$image")
    fstype=$(blkid -p -o value -s TYPE "$loop" 2>/dev/null || true)
    [ "$fstype" = ext4 ] || die "$image: the root partition (at byte $start) is '${fstype:-unformatted}', not ext4"
    mnt=$(mktemp -d)
    mount "$loop" "$mnt"
    rootfs=$mnt
fi
[ -d "$rootfs" ] || die "$rootfs: no such directory"

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

etc=$rootfs/etc/tidepool
cfg=$etc/tidepool.toml
mkdir -p "$etc"
if [ -n "$config" ]; then
    [ ! -f "$cfg" ] || cp -p "$cfg" "$cfg.old"
    install_file 0640 "$config" "$cfg"
    what="config from $config"
elif [ -f "$cfg" ]; then
    what="the installed config kept (the board's copy: tidepool.toml.dist)"
else
    install_file 0640 "board/$board/tidepool.toml" "$cfg"
    what="the board's config"
fi
install_file 0644 "board/$board/tidepool.toml" "$etc/tidepool.toml.dist"
[ -z "$device_ca" ] || install_file 0644 "$device_ca" "$etc/pki/device-ca.crt"
[ -z "$operator_ca" ] || install_file 0644 "$operator_ca" "$etc/pki/operator-ca.crt"

# The options, applied to the installed config: a key is replaced in its table, or added to
# it, or the table is added; then the file is read back to check each one took.
python3 - "$cfg" "$uplink" "${device_ca:+pki/device-ca.crt}" "${operator_ca:+pki/operator-ca.crt}" "$key_line" <<'PY'
import json, re, sys, tomllib
path, uplink, device_ca, operator_ca, key = sys.argv[1:]
text = open(path).read()

def table_span(lines, table):
    head = re.compile(r"^\s*\[\s*" + re.escape(table) + r"\s*\]\s*(#.*)?$")
    start = next((i for i, l in enumerate(lines) if head.match(l)), None)
    if start is None:
        return None, None
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
    return start, end

def put(text, table, key, value):
    lines = text.split("\n")
    start, end = table_span(lines, table)
    line = f"{key} = {value}"
    if start is None:
        return text.rstrip("\n") + f"\n\n[{table}]\n{line}\n"
    pat = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    for i in range(start + 1, end):
        if pat.match(lines[i]):
            lines[i] = line
            return "\n".join(lines)
    lines.insert(start + 1, line)
    return "\n".join(lines)

want = {}
if uplink:
    text = put(text, "uplink", "url", json.dumps(uplink)); want[("uplink", "url")] = uplink
if device_ca:
    text = put(text, "pki", "device_ca", json.dumps(device_ca)); want[("pki", "device_ca")] = device_ca
if operator_ca:
    text = put(text, "pki", "operator_ca", json.dumps(operator_ca)); want[("pki", "operator_ca")] = operator_ca
if key:
    keys = tomllib.loads(text).get("deploy", {}).get("trusted_keys", [])
    if key not in keys:
        keys = keys + [key]
    text = put(text, "deploy", "trusted_keys", json.dumps(keys))
try:
    got = tomllib.loads(text)
except tomllib.TOMLDecodeError as e:
    sys.exit(f"flash.sh: editing {path} would break it ({e}); edit it by hand")
for (table, k), v in want.items():
    if got.get(table, {}).get(k) != v:
        sys.exit(f"flash.sh: could not set {table}.{k} in {path} (dotted keys or inline tables?); edit it by hand")
if key and key not in got.get("deploy", {}).get("trusted_keys", []):
    sys.exit(f"flash.sh: could not add the key to deploy.trusted_keys in {path}; edit it by hand")
tmp = path + ".flash-new"
open(tmp, "w").write(text.rstrip("\n") + "\n")
PY
if [ -f "$cfg.flash-new" ]; then chmod 0640 "$cfg.flash-new"; mv -f "$cfg.flash-new" "$cfg"; fi

# The user and the state dir now, when this host can make them offline (else at first boot).
if command -v systemd-sysusers >/dev/null && [ -f "$rootfs/etc/passwd" ]; then
    systemd-sysusers --root="$rootfs" "$rootfs/usr/lib/sysusers.d/tidepool.conf" >&2 || true
fi
if command -v systemd-tmpfiles >/dev/null && [ -f "$rootfs/etc/passwd" ]; then
    systemd-tmpfiles --root="$rootfs" --create "$rootfs/usr/lib/tmpfiles.d/tidepool.conf" >&2 || true
fi
sync
echo "== installed: the $(stat -c %s "$rootfs/usr/bin/tidepool")-byte binary, $what, tidepool.service enabled" >&2
