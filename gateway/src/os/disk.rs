//! The free-space watch: the gateway answers `busy` while the file system holding the data dir
//! has less than `store.min_free_bytes` available, so the store never meets a full disk in
//! normal running (sled latches an I/O error until it is reopened; should one happen anyway
//! the committer stops acking and the process exits for its supervisor). The committer
//! rechecks after every group; while low, a publish rechecks at most every
//! [`RECHECK`], so the gateway recovers as soon as space returns.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How stale the answer may be while the disk is low.
pub const RECHECK: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct DiskWatch {
    path: PathBuf,
    min_free: u64,
    low: AtomicBool,
    free: AtomicU64,
    checked: Mutex<Instant>,
}

impl DiskWatch {
    /// Watches the file system holding `path`; 0 for `min_free` turns the watch off.
    pub fn new(path: &Path, min_free: u64) -> DiskWatch {
        let w = DiskWatch {
            path: path.to_path_buf(),
            min_free,
            low: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            checked: Mutex::new(Instant::now()),
        };
        w.check();
        w
    }

    /// Reads the free space now; returns whether it is below the reserve.
    pub fn check(&self) -> bool {
        if self.min_free == 0 {
            return false;
        }
        *self.checked.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        // The fields are u32 on 32-bit ARM (the board issue's armv7), u64 here.
        #[allow(clippy::unnecessary_cast)]
        let free = match nix::sys::statvfs::statvfs(&self.path) {
            Ok(s) => (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64),
            Err(e) => {
                // Unknown is not low: the store's own error handling still stands behind it.
                tracing::warn!(path = %self.path.display(), "cannot read free space: {e}");
                return self.low.load(Ordering::Relaxed);
            }
        };
        self.free.store(free, Ordering::Relaxed);
        let low = free < self.min_free;
        let was = self.low.swap(low, Ordering::Relaxed);
        if low && !was {
            tracing::warn!(free_bytes = free, reserve = self.min_free, path = %self.path.display(), "disk space is below the reserve: answering busy until it returns");
        } else if was && !low {
            tracing::info!(
                free_bytes = free,
                "disk space is back above the reserve: accepting events again"
            );
        }
        low
    }

    /// Whether the disk is below the reserve; rechecked when the last answer said so and is
    /// older than [`RECHECK`].
    pub fn is_low(&self) -> bool {
        if !self.low.load(Ordering::Relaxed) {
            return false;
        }
        let stale = self
            .checked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            >= RECHECK;
        if stale {
            self.check()
        } else {
            true
        }
    }

    /// Bytes available at the last check (`u64::MAX` before the first, or when off).
    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_above_the_free_space_is_low_and_zero_is_off() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DiskWatch::new(dir.path(), u64::MAX).is_low());
        assert!(!DiskWatch::new(dir.path(), 1).is_low());
        let off = DiskWatch::new(dir.path(), 0);
        assert!(!off.check() && !off.is_low());
    }
}
