#!/usr/bin/env bash
# Builds the gateway for a board: a static, stripped binary for the board's target
# (board/NAME/board.toml), with the `board` cargo profile (the release profile at opt-level "z",
# fat LTO, panic=abort; sled at opt-level 3), and checks it: no dynamic loader, and no larger
# than the board's size budget. Installs what it needs on a fresh Debian machine (the rustup
# target, the cross compiler and musl's headers, from Debian's packages).
#
#   scripts/build.sh --board NAME [--features LIST] [--no-default-features] [--out DIR]
#
# Prints the binary's path on the last line: target/board/NAME/tidepool unless --out is given.
# Boards: the folders in board/ (rpi-aarch64, rpi-armv7, x86_64).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
board="" features="" out="" nodefault=""
while (($#)); do
    case $1 in
        --board) board=${2:?--board needs a name}; shift 2 ;;
        --features) features=${2:?--features needs a list}; shift 2 ;;
        --no-default-features) nodefault=1; shift ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$board" ]; then
    echo "build.sh: --board NAME is required; boards: $(ls board | tr '\n' ' ')" >&2
    exit 2
fi
profile=board/$board/board.toml
if [ ! -f "$profile" ]; then
    echo "build.sh: no board '$board' (no $profile); boards: $(ls board | tr '\n' ' ')" >&2
    exit 2
fi

# The profile's keys as shell variables (python3's tomllib reads TOML; no TOML in bash).
eval "$(python3 - "$profile" <<'PY'
import shlex, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
for key in ("target", "cc", "cflags", "linker", "rustflags", "qemu"):
    print(f"b_{key}={shlex.quote(str(p.get(key, '')))}")
print(f"b_size_budget={int(p['size_budget'])}")
print("b_packages=(" + " ".join(shlex.quote(x) for x in p.get("packages", [])) + ")")
PY
)"

# --- what the build needs -------------------------------------------------------------------
if ! rustup target list --installed | grep -qx "$b_target"; then
    echo "== rustup target add $b_target" >&2
    rustup target add "$b_target" >&2
fi
missing=()
for pkg in "${b_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]} (Debian packages)" >&2
    for pkg in "${missing[@]}"; do
        case $pkg in
            *:*) arch=${pkg##*:}
                 dpkg --print-foreign-architectures | grep -qx "$arch" || dpkg --add-architecture "$arch" ;;
        esac
    done
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- the build ------------------------------------------------------------------------------
# cargo's per-target variables: the cc crate (ring, mimalloc) and rustc's linker.
triple_env=$(echo "$b_target" | tr 'a-z-' 'A-Z_')
triple_cc=$(echo "$b_target" | tr '-' '_')
export "CC_${triple_cc}=$b_cc"
export "CFLAGS_${triple_cc}=$b_cflags"
[ -n "$b_linker" ] && export "CARGO_TARGET_${triple_env}_LINKER=$b_linker"
# Target-scoped so build scripts and proc macros (built for the host) are not affected.
# `{root}` in them is this checkout (the board's linker script fragment lives there).
case $root in *" "*) echo "build.sh: the checkout's path has a space ($root): rustflags cannot carry it" >&2; exit 2 ;; esac
export "CARGO_TARGET_${triple_env}_RUSTFLAGS=${b_rustflags//\{root\}/"$root"}"

args=(build --profile board --target "$b_target" -p tidepool --bin tidepool --locked)
[ -n "$features" ] && args+=(--features "$features")
[ -n "$nodefault" ] && args+=(--no-default-features)
echo "== cargo ${args[*]}" >&2
cargo "${args[@]}" >&2

built=$root/target/$b_target/board/tidepool
out=${out:-$root/target/board/$board}
mkdir -p "$out"
cp "$built" "$out/tidepool"
bin=$out/tidepool

# --- the checks -----------------------------------------------------------------------------
# Static: no program interpreter (dynamic loader) and no shared libraries needed.
if readelf -lW "$bin" | grep -q INTERP || readelf -dW "$bin" 2>/dev/null | grep -q NEEDED; then
    echo "build.sh: $bin is dynamically linked (it must be static for the board):" >&2
    readelf -lW "$bin" | grep -A1 INTERP >&2 || true
    readelf -dW "$bin" | grep NEEDED >&2 || true
    exit 1
fi
size=$(stat -c %s "$bin")
if [ -z "$features$nodefault" ] && [ "$size" -gt "$b_size_budget" ]; then
    echo "build.sh: $bin is $size bytes, over board $board's budget of $b_size_budget (size_budget in $profile)" >&2
    exit 1
fi
echo "== $board: $b_target, static, $size bytes stripped (budget $b_size_budget)" >&2
echo "$bin"
