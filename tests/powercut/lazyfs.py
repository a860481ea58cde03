#!/usr/bin/env python3
"""lazyfs.py - a tiny FUSE file system that simulates power cuts (after Jepsen's LazyFS).

Usage:  python3 lazyfs.py [--durable-report] [-v] STATE_DIR MOUNTPOINT

STATE_DIR holds two trees:
  live/     what programs see; every write lands here at once (the "page cache").
  durable/  what survives a power cut.

At every start the file system makes live/ an exact copy of durable/, so each
unmount (or kill) followed by a remount is a power cut: data that was not
fsync'ed/fdatasync'ed is gone.

Data: write and truncate change only live/ and record the file's dirty byte
ranges. fsync and fdatasync copy those ranges to the durable file and give it
live's size. flush/close/release do NOT make anything durable.
Metadata (create, mknod, mkdir, rmdir, unlink, rename, chmod, chown, symlink,
link, utimens) is applied to both trees at once.  Files opened with O_SYNC or
O_DSYNC make every write durable, as the real thing would.
Unix sockets (and device nodes) cannot be created: mknod fails with EPERM.

Stats (fsync/fdatasync counts) are printed on stderr at unmount and on SIGUSR1.
With --durable-report the files that still hold unsynced data (what a power cut
now would lose) are listed too.

Runs in the foreground until unmounted (fusermount3 -u MOUNTPOINT) or sent
SIGINT/SIGTERM (which unmount cleanly).  After SIGKILL the mount is stale: clear
it with `fusermount3 -u -z MOUNTPOINT` (or `umount -l MOUNTPOINT`).
"""

import argparse
import bisect
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

INSTALL_HINT = (
    "lazyfs.py needs the fusepy module and libfuse2 (plus fuse3 for fusermount3):\n"
    "    apt-get update && apt-get install -y fuse3 libfuse2\n"
    "    pip install fusepy\n"
)

try:
    import fuse as _fuse  # fusepy
    if not hasattr(_fuse, "FUSE") or not hasattr(_fuse, "FuseOSError"):
        raise ImportError("the 'fuse' module found is not fusepy (fuse-python?)")
    from fuse import FUSE, FuseOSError
except ImportError as e:
    sys.stderr.write("lazyfs: cannot import fusepy (%s)\n%s" % (e, INSTALL_HINT))
    sys.exit(2)
except (OSError, EnvironmentError) as e:  # fusepy raises this when libfuse.so.2 is missing
    sys.stderr.write("lazyfs: fusepy cannot load libfuse2 (%s)\n%s" % (e, INSTALL_HINT))
    sys.exit(2)

CHUNK = 1 << 20
HIDDEN_PREFIX = ".fuse_hidden"  # libfuse2 renames unlinked-but-open files to this


def log(msg):
    sys.stderr.write("lazyfs: %s\n" % msg)
    sys.stderr.flush()


class Dirty(object):
    """Unsynced state of one live inode: sorted, disjoint, merged byte ranges
    [start, end) plus the smallest size the file was truncated to since the
    last sync (None if it was never shrunk)."""

    __slots__ = ("starts", "ends", "min_size", "path")

    def __init__(self, path):
        self.starts = []
        self.ends = []
        self.min_size = None
        self.path = path  # last path it was written through (for reports only)

    def add(self, s, e):
        if e <= s:
            return
        starts, ends = self.starts, self.ends
        # Fast path: appends and in-place rewrites of the tail (the common case).
        if not starts or s > ends[-1]:
            if not starts or s >= starts[-1]:
                starts.append(s)
                ends.append(e)
                return
        elif s >= starts[-1]:
            if e > ends[-1]:
                ends[-1] = e
            return
        i = bisect.bisect_left(ends, s)     # first range ending at/after s
        j = bisect.bisect_right(starts, e)  # ranges i..j-1 overlap or touch [s, e)
        if i == j:
            starts.insert(i, s)
            ends.insert(i, e)
        else:
            ns = min(s, starts[i])
            ne = max(e, ends[j - 1])
            starts[i:j] = [ns]
            ends[i:j] = [ne]

    def truncate(self, size):
        k = bisect.bisect_left(self.starts, size)
        del self.starts[k:]
        del self.ends[k:]
        if self.ends and self.ends[-1] > size:
            self.ends[-1] = size
        if self.min_size is None or size < self.min_size:
            self.min_size = size

    def nbytes(self):
        return sum(e - s for s, e in zip(self.starts, self.ends))


class LazyFS(object):
    use_ns = True  # fusepy: nanosecond timestamps in utimens/getattr

    def __init__(self, state_dir, report=False, verbose=False):
        self.live = os.path.join(state_dir, "live")
        self.durable = os.path.join(state_dir, "durable")
        self.report = report
        self.verbose = verbose
        self.dirty = {}      # live st_ino -> Dirty
        self.fh_ino = {}     # open fd -> live st_ino
        self.sync_fh = set() # fds opened with O_SYNC/O_DSYNC
        self._mutex = threading.Lock()  # (not "lock": fusepy would take it for the lock op)
        self.stats = dict(fsync=0, fdatasync=0, fsyncdir=0, osync_writes=0,
                          writes=0, bytes_written=0, bytes_persisted=0,
                          durable_errors=0)

    # ---- plumbing -------------------------------------------------------
    def __call__(self, op, *args):
        fn = getattr(self, op, None)
        if fn is None:
            raise FuseOSError(errno.ENOSYS)
        with self._mutex:
            return fn(*args)

    def L(self, path):
        return os.path.join(self.live, path.lstrip("/"))

    def D(self, path):
        return os.path.join(self.durable, path.lstrip("/"))

    def _both(self, what, path, fn):
        """Apply a metadata change to live (errors go to the caller), then to durable."""
        fn(self.L)
        try:
            fn(self.D)
        except OSError as e:
            self.stats["durable_errors"] += 1
            log("WARNING: %s %s applied to live but not durable: %s" % (what, path, e))

    @staticmethod
    def _fh(fi):
        return fi.fh if fi is not None else None

    # ---- power cut ---------------------------------------------------------
    def init(self, path):
        # Called by libfuse once the file system is mounted: tell whoever waits for it.
        sys.stdout.write("lazyfs: mounted\n")
        sys.stdout.flush()

    def reset(self):
        """live := exact copy of durable (run before mounting)."""
        os.makedirs(self.durable, exist_ok=True)
        # Files that were unlinked while open (renamed to .fuse_hidden*) are
        # orphans a real file system frees after a crash.
        for root, _dirs, files in os.walk(self.durable):
            for f in files:
                if f.startswith(HIDDEN_PREFIX):
                    os.unlink(os.path.join(root, f))
        if os.path.lexists(self.live):
            shutil.rmtree(self.live)
        try:
            r = subprocess.run(["cp", "-a", "--reflink=auto", "--", self.durable, self.live],
                               stderr=subprocess.PIPE)
            ok = r.returncode == 0
            if not ok:
                log("cp -a failed (%s), falling back to shutil" % r.stderr.decode().strip())
        except OSError:
            ok = False
        if not ok:
            if os.path.lexists(self.live):
                shutil.rmtree(self.live)
            shutil.copytree(self.durable, self.live, symlinks=True)
            shutil.copystat(self.durable, self.live)

    # ---- making data durable -------------------------------------------------
    def _persist(self, path, fd, why):
        ino = self.fh_ino.get(fd)
        if ino is None:
            ino = os.fstat(fd).st_ino
        rec = self.dirty.pop(ino, None)
        size = os.fstat(fd).st_size
        dpath = self.D(path)
        if rec is None:
            try:
                if os.lstat(dpath).st_size == size:
                    return 0
            except FileNotFoundError:
                pass
        try:
            dfd = os.open(dpath, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(dpath), exist_ok=True)
            dfd = os.open(dpath, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        copied = 0
        rfd = None
        try:
            if rec is not None:
                if rec.min_size is not None:
                    os.ftruncate(dfd, rec.min_size)
                src = fd
                for s, e in zip(rec.starts, rec.ends):
                    e = min(e, size)
                    if e <= s:
                        continue
                    try:
                        copied += self._copy(src, dfd, s, e)
                    except OSError as ex:
                        if ex.errno != errno.EBADF or rfd is not None:
                            raise
                        # fd not readable (write-only open): read via the path
                        rfd = os.open(self.L(path), os.O_RDONLY | os.O_CLOEXEC)
                        src = rfd
                        copied += self._copy(src, dfd, s, e)
            os.ftruncate(dfd, size)
        except OSError:
            if rec is not None:  # keep it dirty so a retry can work
                self.dirty[ino] = rec
            raise
        finally:
            os.close(dfd)
            if rfd is not None:
                os.close(rfd)
        self.stats["bytes_persisted"] += copied
        if self.verbose:
            log("%s %s: %d bytes in %d range(s), size %d" % (
                why, path, copied, len(rec.starts) if rec else 0, size))
        return 0

    @staticmethod
    def _copy(src, dst, s, e):
        off = s
        use_cfr = hasattr(os, "copy_file_range")
        while off < e:
            n = min(CHUNK, e - off)
            if use_cfr:
                try:
                    k = os.copy_file_range(src, dst, n, off, off)
                except OSError as ex:
                    if ex.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        use_cfr = False
                        continue
                    raise
            else:
                data = os.pread(src, n, off)
                k = os.pwrite(dst, data, off) if data else 0
            if k <= 0:
                break  # live file shorter than expected; ftruncate fixes the size
            off += k
        return off - s

    def _record(self, ino, path):
        rec = self.dirty.get(ino)
        if rec is None:
            rec = self.dirty[ino] = Dirty(path)
        else:
            rec.path = path
        return rec

    # ---- files ---------------------------------------------------------------
    @staticmethod
    def _live_flags(flags):
        fl = flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY |
                       getattr(os, "O_DIRECT", 0) | os.O_SYNC | os.O_DSYNC)
        if fl & os.O_ACCMODE == os.O_WRONLY:  # make fsync able to read it back
            fl = (fl & ~os.O_ACCMODE) | os.O_RDWR
        return fl | os.O_CLOEXEC

    def _opened(self, fd, flags, path, fi):
        ino = os.fstat(fd).st_ino
        self.fh_ino[fd] = ino
        if flags & os.O_DSYNC:  # O_SYNC includes the O_DSYNC bit
            self.sync_fh.add(fd)
        fi.fh = fd
        return 0

    def open(self, path, fi):
        flags = fi.flags
        try:
            fd = os.open(self.L(path), self._live_flags(flags))
        except PermissionError:
            fd = os.open(self.L(path), (self._live_flags(flags) & ~os.O_ACCMODE) |
                         (flags & os.O_ACCMODE))
        self._opened(fd, flags, path, fi)
        if flags & os.O_TRUNC:  # only if the kernel negotiated atomic_o_trunc
            os.ftruncate(fd, 0)
            self._record(self.fh_ino[fd], path).truncate(0)
        return 0

    def create(self, path, mode, fi):
        flags = fi.flags
        lp = self.L(path)
        fd = os.open(lp, self._live_flags(flags) | os.O_CREAT | os.O_EXCL, mode & 0o7777)
        try:
            dfd = os.open(self.D(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                          mode & 0o7777)
            os.close(dfd)
        except OSError as e:
            self.stats["durable_errors"] += 1
            log("WARNING: create %s applied to live but not durable: %s" % (path, e))
        self._opened(fd, flags, path, fi)
        self.dirty.pop(self.fh_ino[fd], None)  # fresh inode: forget stale state
        return 0

    def read(self, path, size, offset, fi):
        return os.pread(fi.fh, size, offset)

    def write(self, path, data, offset, fi):
        fd = fi.fh
        n = os.pwrite(fd, data, offset)
        self.stats["writes"] += 1
        self.stats["bytes_written"] += n
        ino = self.fh_ino.get(fd)
        if ino is None:
            ino = self.fh_ino[fd] = os.fstat(fd).st_ino
        self._record(ino, path).add(offset, offset + n)
        if fd in self.sync_fh and path is not None:
            self.stats["osync_writes"] += 1
            self._persist(path, fd, "O_DSYNC write")
        return n

    def truncate(self, path, length, fi=None):
        fd = self._fh(fi)
        if fd is not None:
            os.ftruncate(fd, length)
            ino = self.fh_ino.get(fd) or os.fstat(fd).st_ino
        else:
            lp = self.L(path)
            os.truncate(lp, length)
            ino = os.lstat(lp).st_ino
        self._record(ino, path).truncate(length)
        return 0

    def flush(self, path, fi):
        return 0  # close() does not make data durable

    def release(self, path, fi):
        fd = fi.fh
        self.fh_ino.pop(fd, None)
        self.sync_fh.discard(fd)
        os.close(fd)
        return 0

    def fsync(self, path, datasync, fi):
        self.stats["fdatasync" if datasync else "fsync"] += 1
        if path is None:  # unlinked file: nothing left to make durable
            return 0
        return self._persist(path, fi.fh, "fdatasync" if datasync else "fsync")

    def fsyncdir(self, path, datasync, fh):
        self.stats["fsyncdir"] += 1
        return 0

    # ---- reads / attributes (from live) -------------------------------------
    def getattr(self, path, fi=None):
        fd = self._fh(fi)
        st = os.fstat(fd) if fd is not None else os.lstat(self.L(path))
        return dict(st_mode=st.st_mode, st_ino=st.st_ino, st_nlink=st.st_nlink,
                    st_uid=st.st_uid, st_gid=st.st_gid, st_rdev=st.st_rdev,
                    st_size=st.st_size, st_blocks=st.st_blocks,
                    st_blksize=st.st_blksize, st_atime=st.st_atime_ns,
                    st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self.L(path))

    def readlink(self, path):
        return os.readlink(self.L(path))

    def access(self, path, mode):
        if not os.access(self.L(path), mode):
            raise FuseOSError(errno.EACCES)
        return 0

    def statfs(self, path):
        sv = os.statvfs(self.L(path))
        return dict((k, getattr(sv, k)) for k in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
            "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax"))

    # ---- metadata (live and durable at once) ---------------------------------
    def mknod(self, path, mode, dev):
        if stat.S_ISREG(mode) or stat.S_ISFIFO(mode):
            self._both("mknod", path, lambda T: os.mknod(T(path), mode))
            if stat.S_ISREG(mode):
                self.dirty.pop(os.lstat(self.L(path)).st_ino, None)
            return 0
        raise FuseOSError(errno.EPERM)  # sockets, devices

    def mkdir(self, path, mode):
        self._both("mkdir", path, lambda T: os.mkdir(T(path), mode & 0o7777))
        return 0

    def rmdir(self, path):
        self._both("rmdir", path, lambda T: os.rmdir(T(path)))
        return 0

    def unlink(self, path):
        st = os.lstat(self.L(path))
        self._both("unlink", path, lambda T: os.unlink(T(path)))
        if st.st_nlink <= 1 and st.st_ino not in self.fh_ino.values():
            self.dirty.pop(st.st_ino, None)
        return 0

    def rename(self, old, new):
        # Dirty ranges are keyed by live inode, so they follow the file.
        self._both("rename", old + " -> " + new, lambda T: os.rename(T(old), T(new)))
        return 0

    def symlink(self, target, source):  # fusepy: target is the new link, source its text
        self._both("symlink", target, lambda T: os.symlink(source, T(target)))
        return 0

    def link(self, target, source):  # fusepy: target is the new name
        self._both("link", target, lambda T: os.link(T(source), T(target)))
        return 0

    def chmod(self, path, mode):
        self._both("chmod", path, lambda T: os.chmod(T(path), mode & 0o7777))
        return 0

    def chown(self, path, uid, gid):
        self._both("chown", path, lambda T: os.lchown(T(path), uid, gid))
        return 0

    def utimens(self, path, times=None):
        if times is None:
            self._both("utimens", path, lambda T: os.utime(T(path), follow_symlinks=False))
        else:
            self._both("utimens", path,
                       lambda T: os.utime(T(path), ns=tuple(times), follow_symlinks=False))
        return 0

    # ---- reporting -------------------------------------------------------------
    def summary(self):
        s = self.stats
        lines = ["fsync=%d fdatasync=%d (total %d) fsyncdir=%d osync_writes=%d "
                 "writes=%d bytes_written=%d bytes_persisted=%d durable_errors=%d" % (
                     s["fsync"], s["fdatasync"], s["fsync"] + s["fdatasync"],
                     s["fsyncdir"], s["osync_writes"], s["writes"], s["bytes_written"],
                     s["bytes_persisted"], s["durable_errors"])]
        if self.report:
            try:
                items = list(self.dirty.items())
            except RuntimeError:
                items = []
            items = [(ino, r) for ino, r in items if r.starts or r.min_size is not None]
            lines.append("%d file(s) with unsynced changes (lost at a power cut now):"
                         % len(items))
            for ino, r in sorted(items, key=lambda x: x[1].path or ""):
                lines.append("  %s (ino %d): %d dirty bytes in %d range(s)%s" % (
                    r.path, ino, r.nbytes(), len(r.starts),
                    "" if r.min_size is None else ", truncated to %d" % r.min_size))
        return "\n".join("lazyfs: " + l for l in lines) + "\n"


def start_sigusr1_reporter(fs):
    """Prints fs.summary() on SIGUSR1, from a thread (the main thread sits in libfuse's C loop)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    def loop():
        while True:
            signal.sigwait({signal.SIGUSR1})
            sys.stderr.write(fs.summary())
            sys.stderr.flush()

    threading.Thread(target=loop, name="sigusr1", daemon=True).start()


def main():
    ap = argparse.ArgumentParser(description="FUSE file system that keeps only fsynced data "
                                 "across remounts (power-cut simulator)")
    ap.add_argument("state_dir")
    ap.add_argument("mountpoint")
    ap.add_argument("--durable-report", action="store_true",
                    help="also list files with unsynced data at exit / on SIGUSR1")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every fsync")
    ap.add_argument("--debug", action="store_true", help="libfuse debug output")
    a = ap.parse_args()

    state = os.path.realpath(a.state_dir)
    mnt = os.path.realpath(a.mountpoint)
    if not os.path.isdir(mnt):
        ap.error("mountpoint %s is not a directory" % mnt)
    if os.path.ismount(mnt):
        ap.error("%s is already a mount point (stale? try: fusermount3 -u -z %s)" % (mnt, mnt))
    if mnt == state or mnt.startswith(state + os.sep) or state.startswith(mnt + os.sep):
        ap.error("STATE_DIR and MOUNTPOINT must not contain each other")
    if os.geteuid() != 0 and not (shutil.which("fusermount") or shutil.which("fusermount3")):
        log("warning: not root and no fusermount found; mounting will likely fail")

    os.makedirs(state, exist_ok=True)
    fs = LazyFS(state, report=a.durable_report, verbose=a.verbose)
    t0 = time.time()
    fs.reset()
    os.umask(0)  # from now on: the kernel already applied the caller's umask to modes
    log("power-on: live reset from durable in %.2fs; mounting %s" % (time.time() - t0, mnt))
    start_sigusr1_reporter(fs)
    try:
        FUSE(fs, mnt, raw_fi=True, foreground=True, nothreads=True, debug=a.debug,
             fsname="lazyfs", big_writes=True, use_ino=True)
    finally:
        sys.stderr.write(fs.summary())
        sys.stderr.flush()


if __name__ == "__main__":
    main()
