//! The store: one sled tree with kind-prefixed keys (see [`keys`]), the overlay of pending
//! writes, group commit, what makes a write durable ([`Store::sync`]), and the reads the rest
//! of the gateway needs (high-water marks, handler state, outbox and dead letters).
//!
//! Durability, checked in sled 0.34.7's source: `Db::flush` writes each log buffer with
//! `pwrite` and then `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)` on its range
//! (`pagecache/iobuf.rs`, the non-io_uring path); `sync_all` runs only when that call returns
//! ENOSYS, or in the periodic flusher, which we turn off. `sync_file_range` neither empties
//! the disk's write cache nor records a longer file, so a flushed group that extended the log
//! can vanish at a power cut. Pages larger than about a quarter of a segment (~128 KiB) go to
//! their own file under `blobs/`, written with `write_all` and never synced
//! (`pagecache/blob_io.rs`); the `conf` file is written once, unsynced (`config.rs`). So
//! [`Store::sync`] follows every flush with an `fdatasync` of the log and an `fsync` of each
//! new blob file (and of `blobs/`), and [`Store::open`] syncs every file once.

pub mod commit;
pub mod keys;
pub mod overlay;

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::jsonl::Line;
use crate::sandbox::StateSource;
pub use overlay::Overlay;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store at {path} has schema version {found}; this build reads version {expected}")]
    Schema {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
    #[error("store: corrupt record under {0}")]
    Corrupt(String),
}

/// Stops the process on a store error: no ack may go out after one, and the supervisor
/// restarts the gateway (exit code 70, EX_SOFTWARE).
pub fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    tracing::error!("{what}: {e}; stopping so that the supervisor restarts the gateway");
    std::process::exit(70)
}

/// An event that could not be handled, with the reason (`tidepool dead-letters export`
/// writes them as the JSON lines `tidepool invoke` reads). A failed timer call has an empty
/// topic, `received_ms` = the time it ran and `ts` = the time it was due.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetter {
    pub device: String,
    pub seq: u64,
    pub topic: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub handler: String,
    pub reason: String,
    pub received_ms: u64,
    /// The device's own timestamp, if it sent one.
    #[serde(default)]
    pub ts: Option<u64>,
}

impl DeadLetter {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("CBOR encoding into a Vec");
        out
    }

    /// A stored letter ([`DeadLetter::encode`]); `None` when it does not decode.
    pub fn decode(bytes: &[u8]) -> Option<DeadLetter> {
        ciborium::from_reader(bytes).ok()
    }
}

impl DeadLetter {
    /// The letter as a line `tidepool invoke` can replay (a failed timer call as a timer tick).
    pub fn to_line(&self) -> Line {
        let base = if self.topic.is_empty() {
            Line {
                timer: true,
                now_ms: Some(self.received_ms),
                due_ms: self.ts,
                ..Line::default()
            }
        } else {
            Line {
                device: Some(self.device.clone()).filter(|d| !d.is_empty()),
                seq: Some(self.seq).filter(|s| *s > 0),
                ts: self.ts,
                received_ms: Some(self.received_ms),
                ..Line::event(&self.topic, &self.payload)
            }
        };
        Line {
            handler: Some(self.handler.clone()).filter(|h| !h.is_empty()),
            reason: Some(self.reason.clone()),
            ..base
        }
    }
}

/// What the registry holds for one handler name (`r/<name>\0...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registered {
    /// The bundle it runs, as signed.
    pub current: Option<Vec<u8>>,
    /// The bundle it ran before (what `rollback` goes back to).
    pub previous: Option<Vec<u8>>,
    /// The highest version ever installed under the name.
    pub floor: u64,
    /// When its current version's probation started (wall ms), while it is on one.
    pub probation_since: Option<u64>,
    /// What last happened to it, when it was not a deploy (a rollback, a removal) and why.
    pub note: Option<String>,
}

/// The open store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    overlay: Arc<Overlay>,
    /// Held for every write ([`Store::commit`]) and sync: one writer at a time, so a sync
    /// never lists a blob file that another writer is still writing, and dead-letter ids are
    /// taken and trimmed in order. Also holds the dead-letter tree's bound.
    writer: Arc<Mutex<DeadBound>>,
    durable: Arc<Durable>,
}

/// The files behind sled, synced after each flush (sled's flush is not an fsync).
struct Durable {
    dir: PathBuf,
    /// The log, `<dir>/db`.
    log: File,
    /// Blob files already synced (rebuilt from each listing, so it stays as small as `blobs/`).
    blobs: Mutex<HashSet<OsString>>,
}

impl Durable {
    fn open(dir: &Path) -> std::io::Result<Durable> {
        let d = Durable {
            dir: dir.to_path_buf(),
            log: File::open(dir.join("db"))?,
            blobs: Mutex::default(),
        };
        // Once at open: every file sled made or left unsynced (conf, a snapshot), the
        // directories holding them, and the data dir holding `db/`.
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_file() {
                File::open(&path)?.sync_all()?;
            }
        }
        d.sync_blobs()?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(d)
    }

    /// fsyncs blob files not synced yet, then `blobs/` itself if any was new.
    fn sync_blobs(&self) -> std::io::Result<()> {
        let blob_dir = self.dir.join("blobs");
        let listing = match std::fs::read_dir(&blob_dir) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = HashSet::with_capacity(synced.len());
        let mut new = false;
        for entry in listing {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Removed by sled's blob GC since the listing: nothing to sync.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            now.insert(name);
        }
        *synced = now;
        if new {
            sync_dir(&blob_dir)?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Bytes the dead-letter tree holds, the oldest id still in it, the next id, and the cap.
#[derive(Debug, Default)]
struct DeadBound {
    bytes: u64,
    oldest: u64,
    next_id: u64,
    max_bytes: u64,
}

impl DeadBound {
    /// Adds `letters` to `batch` under fresh ids, with the removals that keep the tree under
    /// its cap: the oldest letters in the tree first, then, when the new letters alone exceed
    /// the cap, the oldest of them. Returns how many letters (old or new) the write drops.
    fn add(
        &mut self,
        tree: &sled::Tree,
        batch: &mut sled::Batch,
        letters: Vec<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        let mut new = Vec::with_capacity(letters.len());
        for l in letters {
            let key = keys::dead(self.next_id);
            self.next_id += 1;
            self.bytes += l.len() as u64;
            new.push((key.clone(), l.len() as u64));
            batch.insert(key, l);
        }
        let mut dropped = 0;
        if self.bytes <= self.max_bytes {
            return Ok(dropped);
        }
        for kv in tree.range(keys::dead(self.oldest)..keys::dead(u64::MAX)) {
            if self.bytes <= self.max_bytes {
                break;
            }
            let (k, v) = kv?;
            self.bytes = self.bytes.saturating_sub(v.len() as u64);
            self.oldest = keys::seq_of(&k).map_or(self.oldest, |s| s + 1);
            batch.remove(k);
            dropped += 1;
        }
        for (k, n) in new {
            if self.bytes <= self.max_bytes {
                break;
            }
            self.bytes = self.bytes.saturating_sub(n);
            self.oldest = keys::seq_of(&k).map_or(self.oldest, |s| s + 1);
            batch.remove(k);
            dropped += 1;
        }
        Ok(dropped)
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`. A store that sled cannot open is moved aside
    /// (never wiped) and a fresh one is created; a newer schema is refused.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Store, StoreError> {
        let cfg = || {
            sled::Config::new()
                .path(dir)
                .cache_capacity(cache_capacity)
                .flush_every_ms(None)
                .mode(sled::Mode::LowSpace)
        };
        let db = match cfg().open() {
            Ok(db) => db,
            // Only a corrupt store is moved aside; any other error (a lock held by another
            // process, an option sled cannot apply to this store) stops the start, data untouched.
            Err(e @ sled::Error::Corruption { .. }) => {
                let aside = dir.with_extension(format!("unreadable-{}", crate::clock::now_ms()));
                std::fs::rename(dir, &aside)?;
                tracing::error!(error = %e, moved_to = %aside.display(), "store would not open; moved it aside and started a new one");
                cfg().open()?
            }
            Err(e) => return Err(e.into()),
        };
        let tree = db.open_tree("tidepool")?;
        match tree.get(keys::SCHEMA)? {
            None => {
                tree.insert(keys::SCHEMA, &keys::SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = <[u8; 4]>::try_from(&*v)
                    .map(u32::from_be_bytes)
                    .unwrap_or(u32::MAX);
                if found != keys::SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        path: dir.to_path_buf(),
                        found,
                        expected: keys::SCHEMA_VERSION,
                    });
                }
            }
        }
        let mut store = Store {
            db,
            tree,
            overlay: Arc::new(Overlay::default()),
            writer: Arc::default(),
            durable: Arc::new(Durable::open(dir)?),
        };
        let next_dead = last_seq(&store, keys::DEAD)?.map_or(1, |s| s + 1);
        let mut bound = DeadBound {
            max_bytes: u64::MAX,
            oldest: next_dead,
            next_id: next_dead,
            bytes: 0,
        };
        for kv in store.tree.scan_prefix(keys::DEAD) {
            let (k, v) = kv?;
            if bound.bytes == 0 {
                bound.oldest = keys::seq_of(&k).unwrap_or(next_dead);
            }
            bound.bytes += v.len() as u64;
        }
        store.writer = Arc::new(Mutex::new(bound));
        Ok(store)
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, DeadBound> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The one way to write: `batch` plus new dead letters (fresh ids; the oldest letters
    /// removed in the same write to keep the tree under its cap), applied atomically and made
    /// durable ([`Store::sync`]), one writer at a time. Returns how many letters it dropped.
    /// Outside the store, writes go through the typed operations below.
    pub(crate) fn commit(
        &self,
        mut batch: sled::Batch,
        dead: Vec<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        let mut w = self.lock_writer();
        let dropped = if dead.is_empty() {
            0
        } else {
            w.add(&self.tree, &mut batch, dead)?
        };
        self.tree.apply_batch(batch)?;
        self.sync_locked()?;
        Ok(dropped)
    }

    /// Removes outbox entries (by key: delivered, or found undecodable) and adds `letters` in
    /// one durable write ([`Store::commit`]); returns how many old letters the cap dropped.
    pub fn clear_outbox(
        &self,
        keys: impl IntoIterator<Item = Vec<u8>>,
        letters: Vec<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.commit(batch, letters)
    }

    /// Writes outbox entries anew (encoded, by outbox seq) in one durable write.
    pub fn rewrite_outbox(&self, entries: Vec<(u64, Vec<u8>)>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (seq, e) in entries {
            batch.insert(keys::outbox(seq), e);
        }
        self.commit(batch, Vec::new()).map(|_| ())
    }

    /// Writes `handler`'s state (`None` deletes) in one durable write: `tidepool invoke` on a
    /// stopped gateway's store.
    pub fn put_state(
        &self,
        handler: &str,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(keys::state(handler, k), v.as_slice()),
                None => batch.remove(keys::state(handler, k)),
            }
        }
        self.commit(batch, Vec::new()).map(|_| ())
    }

    /// The store's files' size on disk (file system calls: not on an async runtime's worker).
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    /// The clock floor last written (Unix seconds).
    pub fn clock_floor(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree
            .get(keys::CLOCK_FLOOR)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    /// Writes the clock floor in one durable write (at shutdown; while running it rides along
    /// with a group commit instead).
    pub fn put_clock_floor(&self, floor_s: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(keys::CLOCK_FLOOR, &floor_s.to_be_bytes());
        self.commit(batch, Vec::new()).map(|_| ())
    }

    /// The encoded entry at outbox seq `seq`.
    pub fn outbox_entry(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(keys::outbox(seq))?.map(|v| v.to_vec()))
    }

    /// Every outbox key and encoded entry, in seq order.
    pub fn outbox_scan(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        self.tree.scan_prefix(keys::OUTBOX).map(|kv| {
            kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(Into::into)
        })
    }

    /// Every dead letter, oldest first, decoded as it is read.
    pub fn dead_letter_scan(&self) -> impl Iterator<Item = Result<DeadLetter, StoreError>> + '_ {
        self.tree.scan_prefix(keys::DEAD).map(|kv| {
            let (_, v) = kv?;
            DeadLetter::decode(&v).ok_or_else(|| StoreError::Corrupt("d/".into()))
        })
    }

    /// The raw tree, for tests and benchmarks that must reach under the typed operations (to
    /// plant a corrupt entry, or to measure sled alone). The gateway's code never uses it
    /// (`tidy.rs` checks).
    #[doc(hidden)]
    pub fn raw_tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The raw database, for benchmarks (a tree of their own) and tests; see [`Store::raw_tree`].
    #[doc(hidden)]
    pub fn raw_db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes everything written so far durable: sled's `flush`, then `fdatasync` of the log
    /// and `fsync` of new blob files (see the module doc: the flush alone survives a crash of
    /// the process, not a power cut).
    pub fn sync(&self) -> Result<(), StoreError> {
        let _w = self.lock_writer();
        self.sync_locked()
    }

    fn sync_locked(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.durable.log.sync_data()?;
        self.durable.sync_blobs()?;
        Ok(())
    }

    /// Caps the dead-letter tree at `max_bytes` (the oldest are dropped first).
    pub fn bound_dead_letters(&self, max_bytes: u64) {
        self.lock_writer().max_bytes = max_bytes;
    }

    /// The durable high-water mark of a device (0 when none).
    pub fn hwm(&self, device: &str) -> Result<u64, StoreError> {
        Ok(self
            .tree
            .get(keys::hwm(device))?
            .and_then(|v| keys::u64_value(&v))
            .unwrap_or(0))
    }

    /// Bytes (keys + values) a handler's state holds on disk.
    pub fn state_bytes(&self, handler: &str) -> Result<u64, StoreError> {
        let prefix = keys::state_prefix(handler);
        let mut total = 0u64;
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            total += (k.len() - prefix.len() + v.len()) as u64;
        }
        Ok(total)
    }

    /// The durable next due time of `handler`'s timer, and its epoch.
    pub fn timer_due(&self, handler: &str) -> Result<Option<crate::timers::Due>, StoreError> {
        Ok(self
            .tree
            .get(keys::timer(handler))?
            .and_then(|v| keys::read_timer_value(&v))
            .map(|(due_ms, epoch)| crate::timers::Due { due_ms, epoch }))
    }

    /// A handler's stored quarantine (`sandbox::quarantine::Quarantine::encode`), if any.
    pub fn quarantine(&self, handler: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree
            .get(keys::quarantine(handler))?
            .map(|v| v.to_vec()))
    }

    /// The deployed bundles (`r/<name>\0current`), by handler name.
    pub fn deployed(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for name in self.registry_names()? {
            if let Some(b) = self.tree.get(keys::registry(&name, "current"))? {
                out.push((name, b.to_vec()));
            }
        }
        Ok(out)
    }

    /// Every name the registry holds something for (a removed handler keeps its floor).
    pub fn registry_names(&self) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = Vec::new();
        for k in self.tree.scan_prefix(keys::REGISTRY).keys() {
            let k = k?;
            let rest = &k[keys::REGISTRY.len()..];
            let Some(end) = rest.iter().position(|b| *b == 0) else {
                continue;
            };
            let name = String::from_utf8_lossy(&rest[..end]).into_owned();
            if out.last() != Some(&name) {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// What the registry holds for `handler`.
    pub fn registered(&self, handler: &str) -> Result<Registered, StoreError> {
        let get = |slot| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self
                .tree
                .get(keys::registry(handler, slot))?
                .map(|v| v.to_vec()))
        };
        Ok(Registered {
            current: get("current")?,
            previous: get("previous")?,
            floor: self.version_floor(handler)?,
            probation_since: get("probation")?.and_then(|v| keys::u64_value(&v)),
            note: get("note")?.map(|v| String::from_utf8_lossy(&v).into_owned()),
        })
    }

    /// The highest version ever installed from a bundle under `handler` (0: none).
    pub fn version_floor(&self, handler: &str) -> Result<u64, StoreError> {
        Ok(self
            .tree
            .get(keys::registry(handler, "floor"))?
            .and_then(|v| keys::u64_value(&v))
            .unwrap_or(0))
    }

    /// Records `bundle` (version `version`) as what `handler` runs, the one before as its
    /// previous, raises its floor, and starts its probation at `probation_since` (wall ms) if
    /// it has one; durable (synced) on return.
    pub fn record_deploy(
        &self,
        handler: &str,
        bundle: &[u8],
        version: u64,
        probation_since: Option<u64>,
    ) -> Result<(), StoreError> {
        let current = self.tree.get(keys::registry(handler, "current"))?;
        let floor = self.version_floor(handler)?.max(version);
        let mut b = sled::Batch::default();
        if let Some(c) = current {
            b.insert(keys::registry(handler, "previous"), c);
        }
        b.insert(keys::registry(handler, "current"), bundle);
        b.insert(keys::registry(handler, "floor"), &floor.to_be_bytes());
        match probation_since {
            Some(t) => b.insert(keys::registry(handler, "probation"), &t.to_be_bytes()),
            None => b.remove(keys::registry(handler, "probation")),
        }
        b.remove(keys::registry(handler, "note"));
        self.tree.apply_batch(b)?;
        self.sync()
    }

    /// Records a rollback of `handler`: its previous bundle is what it runs, none is kept
    /// before it, its floor stays, and `note` says why; durable on return.
    pub fn record_rollback(&self, handler: &str, note: &str) -> Result<(), StoreError> {
        let Some(previous) = self.tree.get(keys::registry(handler, "previous"))? else {
            return Ok(());
        };
        let mut b = sled::Batch::default();
        b.insert(keys::registry(handler, "current"), previous);
        b.remove(keys::registry(handler, "previous"));
        b.remove(keys::registry(handler, "probation"));
        b.insert(keys::registry(handler, "note"), note.as_bytes());
        self.tree.apply_batch(b)?;
        self.sync()
    }

    /// Records the removal of `handler`: no bundle is kept, its floor stays (an old bundle
    /// cannot come back), and `note` says why; durable on return.
    pub fn record_remove(&self, handler: &str, note: &str) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for slot in ["current", "previous", "probation"] {
            b.remove(keys::registry(handler, slot));
        }
        b.insert(keys::registry(handler, "note"), note.as_bytes());
        self.tree.apply_batch(b)?;
        self.sync()
    }

    /// Ends `handler`'s probation in the registry (it passed); durable on return.
    pub fn record_passed(&self, handler: &str) -> Result<(), StoreError> {
        self.tree.remove(keys::registry(handler, "probation"))?;
        self.sync()
    }

    /// A committed state value, ignoring the overlay.
    pub fn state_durable(&self, handler: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree
            .get(keys::state(handler, key))?
            .map(|v| v.to_vec()))
    }

    /// All dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letter_scan().collect()
    }
}

/// The sequence number of the last key under `prefix` (`o/` or `d/`).
pub(crate) fn last_seq(store: &Store, prefix: &[u8]) -> Result<Option<u64>, StoreError> {
    Ok(store
        .tree
        .scan_prefix(prefix)
        .next_back()
        .transpose()?
        .and_then(|(k, _)| keys::seq_of(&k)))
}

impl crate::dispatch::Durable for Store {
    fn hwm(&self, device: &str) -> Result<u64, StoreError> {
        Store::hwm(self, device)
    }
    fn timer_due(&self, handler: &str) -> Result<Option<crate::timers::Due>, StoreError> {
        Store::timer_due(self, handler)
    }
    fn quarantine(&self, handler: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Store::quarantine(self, handler)
    }
    fn state_keys(&self, handler: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.tree
            .scan_prefix(keys::state_prefix(handler))
            .keys()
            .map(|k| Ok(k?.to_vec()))
            .collect()
    }
    fn overlay(&self) -> &Overlay {
        &self.overlay
    }
}

impl StateSource for Store {
    fn get(&self, handler: &str, key: &[u8]) -> Option<Vec<u8>> {
        let full = keys::state(handler, key);
        if let Some(pending) = self.overlay.get(&full) {
            return pending;
        }
        match self.tree.get(full) {
            Ok(v) => v.map(|v| v.to_vec()),
            // A handler must never act on a false "not found".
            Err(e) => fatal("reading handler state", e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(i: u64) -> DeadLetter {
        DeadLetter {
            device: "d".into(),
            seq: i,
            topic: "t".into(),
            payload: vec![0; 100],
            handler: "h".into(),
            reason: "limit:fuel".into(),
            received_ms: 0,
            ts: None,
        }
    }

    /// Writes letters the way every writer does.
    fn write(store: &Store, n: u64) -> usize {
        let letters = (0..n).map(|i| letter(i).encode()).collect();
        store.commit(sled::Batch::default(), letters).unwrap() as usize
    }

    #[test]
    fn the_dead_letter_tree_stays_under_its_cap_dropping_the_oldest_also_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let one = letter(0).encode().len() as u64;
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            store.bound_dead_letters(10 * one);
            assert_eq!(write(&store, 8), 0);
            assert_eq!(write(&store, 5), 3, "the 3 oldest make room");
            let left = store.dead_letters().unwrap();
            assert_eq!(left.len(), 10);
            assert_eq!(left[0].seq, 3, "the oldest went first");
            store.db.flush().unwrap();
        }
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        store.bound_dead_letters(10 * one);
        assert_eq!(
            write(&store, 2),
            2,
            "the size is known again after a reopen"
        );
        assert_eq!(store.dead_letters().unwrap().len(), 10);
    }

    #[test]
    fn new_letters_alone_over_the_cap_are_trimmed_within_their_own_write() {
        let dir = tempfile::tempdir().unwrap();
        let one = letter(0).encode().len() as u64;
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        store.bound_dead_letters(10 * one);
        assert_eq!(write(&store, 3), 0);
        assert_eq!(write(&store, 15), 8, "3 old and 5 of the 15 new");
        let left = store.dead_letters().unwrap();
        assert_eq!(left.len(), 10);
        assert_eq!(left[0].seq, 5, "the newest ten of the fifteen are kept");
        assert_eq!(write(&store, 1), 1, "the size is still right");
    }
}
