#!/usr/bin/env bash
# Self-test for lazyfs.py: fsynced data survives a simulated power cut, the rest does not.
# Usage: tests/powercut/selftest.sh        (needs root, fuse3, libfuse2, fusepy)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAZYFS="$HERE/lazyfs.py"
TMP="$(mktemp -d /tmp/lazyfs-selftest.XXXXXX)"
STATE="$TMP/state"
MNT="$TMP/mnt"
LOG="$TMP/lazyfs.log"
PID=""
mkdir -p "$MNT"

if command -v fusermount3 >/dev/null; then FUSERMOUNT=fusermount3
elif command -v fusermount >/dev/null; then FUSERMOUNT=fusermount
else FUSERMOUNT=""; fi

unmount() { # $1: extra flag, e.g. -z
    if [ -n "$FUSERMOUNT" ]; then "$FUSERMOUNT" -u ${1:-} "$MNT"; else umount ${1:+-l} "$MNT"; fi
}

cleanup() {
    local rc=$?
    if mountpoint -q "$MNT" 2>/dev/null; then unmount -z || true; fi
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then kill "$PID" 2>/dev/null || true; fi
    if [ $rc -ne 0 ]; then
        echo "FAIL (rc=$rc); lazyfs log:" >&2
        sed 's/^/  | /' "$LOG" >&2 2>/dev/null || true
    fi
    rm -rf "$TMP"
    exit $rc
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "PASS: $*"; }

mount_fs() {
    python3 "$LAZYFS" --durable-report "$STATE" "$MNT" 2>>"$LOG" &
    PID=$!
    for _ in $(seq 1 200); do             # up to ~10 s
        mountpoint -q "$MNT" && return 0
        kill -0 "$PID" 2>/dev/null || fail "lazyfs exited before mounting"
        sleep 0.05
    done
    fail "mount did not appear"
}

wait_exit() {
    for _ in $(seq 1 200); do
        kill -0 "$PID" 2>/dev/null || { wait "$PID" 2>/dev/null || true; PID=""; return 0; }
        sleep 0.05
    done
    fail "lazyfs did not exit after unmount"
}

powercut() {  # clean unmount + remount: everything not fsynced is lost
    unmount
    wait_exit
    mount_fs
}

size() { stat -c %s "$1"; }

# ---------------------------------------------------------------- write phase
mount_fs
pass "mounted $MNT"

python3 - "$MNT" <<'EOF'
import os, sys
m = sys.argv[1]
# A: write + fsync
with open(f"{m}/A", "wb") as f:
    f.write(b"alpha-durable\n"); f.flush(); os.fsync(f.fileno())
# B: write, no fsync (close is not a sync)
with open(f"{m}/B", "wb") as f:
    f.write(b"bravo-volatile\n")
# C: 1 MB fsynced, then 100 KB appended without fsync
data = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
with open(f"{m}/C", "wb") as f:
    f.write(data); f.flush(); os.fsync(f.fileno())
with open(f"{m}/C", "ab") as f:
    f.write(b"x" * 100 * 1024)
# D: fdatasync
fd = os.open(f"{m}/D", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"delta-fdatasync\n"); os.fdatasync(fd); os.close(fd)
# G: write tmp, fsync, rename (atomic-replace pattern); H: dirty data follows a rename
with open(f"{m}/G.tmp", "wb") as f:
    f.write(b"golf\n"); f.flush(); os.fsync(f.fileno())
os.rename(f"{m}/G.tmp", f"{m}/G")
os.mkdir(f"{m}/dir")
f = open(f"{m}/dir/H.tmp", "wb")
f.write(b"hotel\n"); f.flush()
os.rename(f"{m}/dir/H.tmp", f"{m}/dir/H")
os.fsync(f.fileno()); f.close()
# T: truncate-then-rewrite shorter, synced: no stale tail may survive
with open(f"{m}/T", "wb") as f:
    f.write(b"0123456789" * 10); f.flush(); os.fsync(f.fileno())
    f.truncate(0); f.seek(50); f.write(b"XY"); f.flush(); os.fsync(f.fileno())
# S: O_DSYNC writes are durable without an explicit fsync
fd = os.open(f"{m}/S", os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
os.write(fd, b"sierra-odsync\n"); os.close(fd)
EOF
# E: dd conv=fdatasync (durable); F: plain dd (not durable)
dd if=/dev/zero of="$MNT/E" bs=64k count=4 conv=fdatasync status=none
dd if=/dev/zero of="$MNT/F" bs=64k count=4 status=none

[ "$(size "$MNT/B")" = 15 ] || fail "B should be visible (15 bytes) before the power cut"
[ "$(size "$MNT/C")" = $((1024 * 1024 + 100 * 1024)) ] || fail "C size before cut"
pass "before power cut: live view has all writes (B=15 bytes, C=1.1 MB)"

# Unix sockets are refused (EPERM); the program is expected to cope.
if python3 -c "import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])" "$MNT/sock" 2>/dev/null; then
    fail "socket bind unexpectedly worked"
fi
pass "unix socket bind is refused"

# ---------------------------------------------------------------- power cut
powercut
pass "power cut (unmount + remount)"

[ "$(cat "$MNT/A")" = "alpha-durable" ] || fail "A lost its fsynced content"
pass "A (write+fsync) survived"

[ -e "$MNT/B" ] || fail "B should exist (metadata is synchronous)"
[ "$(size "$MNT/B")" = 0 ] || fail "B should be empty, is $(size "$MNT/B") bytes"
pass "B (no fsync) exists with size 0"

[ "$(size "$MNT/C")" = $((1024 * 1024)) ] || fail "C should be 1048576 bytes, is $(size "$MNT/C")"
python3 - "$MNT/C" <<'EOF' || fail "C content differs from the fsynced 1 MB"
import sys
want = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
sys.exit(0 if open(sys.argv[1], "rb").read() == want else 1)
EOF
pass "C is exactly the fsynced 1 MB (unsynced 100 KB append gone)"

[ "$(cat "$MNT/D")" = "delta-fdatasync" ] || fail "D (os.fdatasync) lost"
pass "D (os.fdatasync) survived"
[ "$(size "$MNT/E")" = 262144 ] || fail "E (dd conv=fdatasync) should be 262144 bytes"
pass "E (dd conv=fdatasync) survived"
[ "$(size "$MNT/F")" = 0 ] || fail "F (dd without sync) should be empty"
pass "F (dd without sync) is empty"
[ "$(cat "$MNT/G")" = "golf" ] && [ ! -e "$MNT/G.tmp" ] || fail "G rename-after-fsync"
pass "G (fsync then rename) survived under the new name"
[ "$(cat "$MNT/dir/H")" = "hotel" ] || fail "H dirty data did not follow the rename"
pass "H (rename then fsync) survived"
python3 -c "import sys; d=open(sys.argv[1],'rb').read(); sys.exit(0 if d==bytes(50)+b'XY' else 1)" "$MNT/T" \
    || fail "T should be 50 zero bytes + XY"
pass "T (truncate + rewrite + fsync) has no stale data"
[ "$(cat "$MNT/S")" = "sierra-odsync" ] || fail "S (O_DSYNC write) lost"
pass "S (O_DSYNC write) survived"

# fsync/fdatasync counters printed at unmount
last=$(grep 'lazyfs: fsync=' "$LOG" | tail -1)
echo "      $last"
fds=$(sed -n 's/.*fdatasync=\([0-9]*\) .*/\1/p' <<<"$last")
[ "${fds:-0}" -ge 2 ] || fail "expected >= 2 fdatasync calls (os.fdatasync, dd conv=fdatasync), got ${fds:-?}"
pass "fdatasync calls counted ($fds)"

# ---------------------------------------------------------------- sqlite
python3 - "$MNT/db.sqlite" <<'EOF'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("create table t(x)")
with c:
    c.executemany("insert into t values(?)", [(i,) for i in range(100)])
c.execute("pragma synchronous=off")   # no fsync at all: these commits are not durable
with c:
    c.executemany("insert into t values(?)", [(i,) for i in range(100, 200)])
assert c.execute("select count(*) from t").fetchone()[0] == 200
c.close()
EOF
powercut
python3 - "$MNT/db.sqlite" <<'EOF' || fail "sqlite after power cut"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
ok = c.execute("pragma integrity_check").fetchone()[0]
n = c.execute("select count(*) from t").fetchone()[0]
print("      sqlite: integrity_check=%s rows=%d" % (ok, n))
sys.exit(0 if ok == "ok" and n == 100 else 1)
EOF
pass "sqlite: synced commit kept, synchronous=off commit lost, db intact"

# ---------------------------------------------------------------- SIGKILL = power cut too
printf 'kilo' > "$MNT/K"
kill -9 "$PID"; wait "$PID" 2>/dev/null || true; PID=""
if ls "$MNT" >/dev/null 2>&1; then fail "expected a stale mount after SIGKILL"; fi
unmount -z
mountpoint -q "$MNT" && fail "stale mount not cleared"
pass "SIGKILL leaves a stale mount ('Transport endpoint is not connected'); $FUSERMOUNT -u -z clears it"
mount_fs
[ -e "$MNT/K" ] && [ "$(size "$MNT/K")" = 0 ] || fail "K after SIGKILL should exist and be empty"
[ "$(cat "$MNT/A")" = "alpha-durable" ] || fail "A after SIGKILL"
pass "after SIGKILL + remount: synced data kept, unsynced data gone"

# ---------------------------------------------------------------- timing
t0=$(date +%s%N)
dd if=/dev/zero of="$MNT/big" bs=1M count=20 conv=fsync status=none
t1=$(date +%s%N)
python3 - "$MNT/small" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
buf = b"s" * 4096
for _ in range(20 * 256):
    os.write(fd, buf)
os.fsync(fd); os.close(fd)
EOF
t2=$(date +%s%N)
ms1=$(( (t1 - t0) / 1000000 )); ms2=$(( (t2 - t1) / 1000000 ))
echo "TIME: 20 MB sequential write (1 MiB blocks) + fsync through lazyfs: ${ms1} ms"
echo "TIME: 20 MB sequential write (4 KiB writes) + fsync through lazyfs: ${ms2} ms"
[ "$(size "$MNT/big")" = $((20 * 1024 * 1024)) ] || fail "big file size"

unmount
wait_exit
grep 'lazyfs: fsync=' "$LOG" | tail -1 | sed 's/^/      /'
echo "ALL PASS"
