//! The outbox: forwards waiting for the uplink. Entries live in sled (`o/` keys, written by
//! group commit); this module keeps the in-memory index of flushed entries per class, the
//! byte budget applied at admission, and the batch selection. The wake policy is in [`policy`].

pub mod policy;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::{FullPolicy, OutboxConfig};
use crate::pipeline::Class;
use crate::pipeline::OutboxWrite;
use crate::store::commit::NewEntry;
use crate::store::{keys, Store, StoreError};
pub use policy::{Action, Pending, WakePolicy};

/// One forward on its way to the cloud.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// Derived: `gateway:device:seq:handler:index`, so a reprocessed event yields the same id.
    pub id: String,
    pub device: String,
    pub topic: String,
    pub class: Class,
    /// The event's time: the device's `ts`, else when the gateway received it (ms since epoch).
    pub ts: u64,
    /// When the gateway queued it (its wall clock, ms since epoch): after a restart, the
    /// entry's `max_delay`/`bulk_window` clock resumes from here instead of starting over.
    /// 0 in entries written before this field existed (they count as queued at load).
    #[serde(default)]
    pub queued_ms: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The Tidepool sink's tier seq, written into the entry (synced) before its first send and
    /// kept for every resend, so the upstream sees one seq per entry, rising in send order
    /// (`uplink/tier`). Absent for every other sink: their entries' bytes are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_seq: Option<u64>,
    /// The upstream's nack of this entry (Tidepool sink), written as it arrives: the
    /// upstream's mark covers the seq from then on, so a retry must not count it as held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_nack: Option<String>,
    /// Set when `ts` is the gateway's receipt time and its wall clock was not set then (a board
    /// without a real-time clock, before NTP): where in which boot it was received, so that
    /// `ts` is computed again once the clock is set ([`Entry::restamp`]). Absent otherwise:
    /// such entries' bytes are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootTime>,
}

/// When in which boot a forward was received, for a `ts` taken from an unset clock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BootTime {
    /// The Linux boot id of the boot it was received in ([`crate::clock::boot_id`]).
    pub boot_id: String,
    /// Milliseconds since that boot at receipt ([`crate::clock::boot_ms`]).
    pub mono_ms: u64,
    /// `ts` was computed again from these once the clock was set.
    #[serde(default)]
    pub restamped: bool,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("CBOR encoding into a Vec");
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        ciborium::from_reader(bytes).ok()
    }

    /// Computes `ts` again for an entry received in this boot (`boot_id`) before the clock was
    /// set, now that it is: the wall clock now (`wall_ms`) less the time since receipt on the
    /// boot clock (`boot_ms` now). Returns whether it changed the entry. An entry from another
    /// boot keeps its `ts` (the time between that boot's receipt and now is unknown), as does
    /// one re-stamped already. Pure.
    pub fn restamp(&mut self, boot_id: &str, wall_ms: u64, boot_ms: u64) -> bool {
        if !self.restampable(boot_id) {
            return false;
        }
        let Some(b) = self.boot.as_mut() else {
            return false;
        };
        self.ts = wall_ms.saturating_sub(boot_ms.saturating_sub(b.mono_ms));
        b.restamped = true;
        true
    }

    /// Whether [`Entry::restamp`] would change it in boot `boot_id`: received in that boot
    /// before the clock was set, and not re-stamped yet. Pure.
    pub fn restampable(&self, boot_id: &str) -> bool {
        self.boot
            .as_ref()
            .is_some_and(|b| !b.restamped && !boot_id.is_empty() && b.boot_id == boot_id)
    }
}

/// The derived id of a forward.
pub fn entry_id(gateway: &str, device: &str, seq: &str, handler: &str, index: usize) -> String {
    format!("{gateway}:{device}:{seq}:{handler}:{index}")
}

/// The answer of admission control for one event's forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Admitted after dropping this many bulk forwards.
    DroppedBulk(usize),
    /// Does not fit now: answer `busy`.
    Full,
    /// Larger than the whole outbox: it never will fit.
    TooLarge(u64),
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    bytes: u64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Index {
    /// Flushed entries by class, in outbox order.
    classes: [BTreeMap<u64, Meta>; 3],
    normal_bytes: u64,
}

impl Index {
    fn insert(&mut self, e: &NewEntry, at: Instant) {
        self.classes[slot(e.class)].insert(e.seq, Meta { bytes: e.bytes, at });
        if e.class == Class::Normal {
            self.normal_bytes += e.bytes;
        }
    }
}

/// Moves outbox entries that do not decode to the dead letters, durably: the start goes on
/// and the bytes are kept for a person to look at (`tidepool dead-letters export`).
fn dead_letter_corrupt(
    store: &Store,
    corrupt: &[(Vec<u8>, Vec<u8>)],
    now_ms: u64,
) -> Result<u64, StoreError> {
    let mut letters = Vec::with_capacity(corrupt.len());
    for (k, v) in corrupt {
        let seq = keys::seq_of(k);
        tracing::error!(key = ?k, bytes = v.len(), "an outbox entry does not decode; moved to the dead letters");
        let d = crate::store::DeadLetter {
            device: String::new(),
            seq: 0,
            topic: "tidepool/outbox/corrupt".into(),
            payload: v.clone(),
            handler: "outbox".into(),
            reason: format!("outbox entry {seq:?} does not decode"),
            received_ms: now_ms,
            ts: None,
        };
        letters.push(d.encode());
    }
    store.clear_outbox(corrupt.iter().map(|(k, _)| k.clone()), letters)
}

/// What [`Outbox::load`] found besides the entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The seq the next entry gets (above every `o/` key found, undecodable ones included).
    pub next_seq: u64,
    /// Entries that did not decode, now dead letters, and old letters dropped to make room.
    pub corrupt: u64,
    pub dead_dropped: u64,
    /// Entries that carry a tier seq (given by the Tidepool sink before the restart), as
    /// (tier seq, outbox seq) in tier seq order: they go before any new entry.
    pub tier_seqs: Vec<(u64, u64)>,
}

/// The outbox shared by the dispatcher (admission), the committer (new entries) and the uplink.
pub struct Outbox {
    index: Mutex<Index>,
    used: AtomicU64,
    max_bytes: u64,
    full_policy: FullPolicy,
    /// Woken when flushed entries arrive.
    pub wake: Notify,
    /// Entries indexed so far (found at start or flushed since) whose `ts` was taken on an
    /// unset clock: when it moved, entries may wait for a re-stamp (the uplink's sweep).
    unset_clock: AtomicU64,
}

fn slot(c: Class) -> usize {
    c.as_abi() as usize
}

impl Outbox {
    /// Rebuilds the index from the store. An entry's age is `now_ms - queued_ms` (0 when the
    /// clock went back), so its delay and bulk window keep running across restarts. An entry
    /// that does not decode is moved to the dead letters (with its bytes) in one durable write.
    /// Call before the committer and the uplink start: the next seq is read here.
    pub fn load(
        store: &Store,
        cfg: &OutboxConfig,
        now_ms: u64,
    ) -> Result<(Outbox, Loaded), StoreError> {
        let next_seq = crate::store::last_seq(store, keys::OUTBOX)?.map_or(1, |s| s + 1);
        let ob = Outbox::new(cfg);
        let now = Instant::now();
        let mut found = Vec::new();
        let mut corrupt = Vec::new();
        let mut tier_seqs = Vec::new();
        let boot_id = crate::clock::boot_id();
        for kv in store.outbox_scan() {
            let (k, v) = kv?;
            let (Some(seq), Some(e)) = (keys::seq_of(&k), Entry::decode(&v)) else {
                corrupt.push((k.to_vec(), v.to_vec()));
                continue;
            };
            let age_ms = match e.queued_ms {
                0 => 0,
                q => now_ms.saturating_sub(q),
            };
            let at = now.checked_sub(Duration::from_millis(age_ms));
            if let Some(t) = e.tier_seq {
                tier_seqs.push((t, seq));
            }
            let entry = NewEntry {
                seq,
                class: e.class,
                bytes: v.len() as u64,
                unset_clock: e.restampable(&boot_id),
            };
            found.push((entry, at.unwrap_or(now)));
        }
        let dead_dropped = if corrupt.is_empty() {
            0
        } else {
            dead_letter_corrupt(store, &corrupt, now_ms)?
        };
        ob.restore(&found);
        tier_seqs.sort_unstable();
        let loaded = Loaded {
            next_seq,
            corrupt: corrupt.len() as u64,
            dead_dropped,
            tier_seqs,
        };
        Ok((ob, loaded))
    }

    /// An empty outbox.
    pub fn new(cfg: &OutboxConfig) -> Outbox {
        Outbox {
            index: Mutex::new(Index::default()),
            used: AtomicU64::new(0),
            max_bytes: cfg.max_bytes,
            full_policy: cfg.full_policy,
            wake: Notify::new(),
            unset_clock: AtomicU64::new(0),
        }
    }

    /// How many entries stamped on an unset clock were indexed so far (counted after they
    /// are in the index: one counted and no longer indexed was sent).
    pub fn unset_clock_entries(&self) -> u64 {
        self.unset_clock.load(Ordering::Acquire)
    }

    /// Whether no entry waits.
    pub fn is_empty(&self) -> bool {
        self.lock().classes.iter().all(|c| c.is_empty())
    }

    /// Entries found durable at start (each with when it was queued): indexed, and counted
    /// against the budget.
    pub fn restore(&self, found: &[(NewEntry, Instant)]) {
        let bytes: u64 = found.iter().map(|(e, _)| e.bytes).sum();
        self.used.fetch_add(bytes, Ordering::Relaxed);
        let mut ix = self.lock();
        for (e, at) in found {
            ix.insert(e, *at);
        }
        drop(ix);
        self.count_unset_clock(found.iter().map(|(e, _)| e));
    }

    /// Counts the entries stamped on an unset clock among `entries`, once they are indexed.
    fn count_unset_clock<'a>(&self, entries: impl Iterator<Item = &'a NewEntry>) {
        let n = entries.filter(|e| e.unset_clock).count() as u64;
        if n > 0 {
            self.unset_clock.fetch_add(n, Ordering::Release);
        }
    }

    /// Admission control for one event's forwards (before anything is written).
    pub fn admit(&self, records: &mut Vec<OutboxWrite>) -> Admission {
        let size = |rs: &mut dyn Iterator<Item = &OutboxWrite>| {
            rs.map(|r| r.entry.len() as u64).sum::<u64>()
        };
        let need = size(&mut records.iter());
        if need == 0 || (need <= self.max_bytes && self.reserve(need)) {
            return Admission::Admitted;
        }
        // What must be kept: everything, or under drop_bulk_first only the urgent and normal ones.
        let keep = match self.full_policy {
            FullPolicy::DropBulkFirst => {
                size(&mut records.iter().filter(|r| r.class != Class::Bulk))
            }
            FullPolicy::Backpressure => need,
        };
        if keep > self.max_bytes {
            return Admission::TooLarge(keep);
        }
        if keep < need && (keep == 0 || self.reserve(keep)) {
            let before = records.len();
            records.retain(|r| r.class != Class::Bulk);
            return Admission::DroppedBulk(before - records.len());
        }
        Admission::Full
    }

    fn reserve(&self, need: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(need).filter(|n| *n <= self.max_bytes)
            })
            .is_ok()
    }

    /// Entries that a group made durable.
    pub fn add(&self, entries: &[NewEntry], now: Instant) {
        if entries.is_empty() {
            return;
        }
        let mut ix = self.lock();
        for e in entries {
            ix.insert(e, now);
        }
        drop(ix);
        self.count_unset_clock(entries.iter());
        self.wake.notify_one();
    }

    /// What is waiting, for the wake policy.
    pub fn pending(&self) -> Pending {
        let ix = self.lock();
        // Entries arrive in outbox order with non-decreasing times: the first is the oldest.
        let oldest = |c: Class| ix.classes[slot(c)].first_key_value().map(|(_, m)| m.at);
        Pending {
            urgent: ix.classes[0].len(),
            normal: ix.classes[1].len(),
            normal_bytes: ix.normal_bytes as usize,
            bulk: ix.classes[2].len(),
            oldest_normal: oldest(Class::Normal),
            oldest_bulk: oldest(Class::Bulk),
        }
    }

    /// The next batch: urgent first, then normal, then bulk, each in outbox order, up to
    /// `max_events` entries and `max_bytes` (at least one entry), leaving out `exclude` (the
    /// uplink's entries set aside after a refusal; a few at most); only urgent ones when
    /// `urgent_only` (the uplink's budget is spent).
    pub fn next_batch(
        &self,
        max_events: usize,
        max_bytes: usize,
        exclude: &[u64],
        urgent_only: bool,
    ) -> Vec<u64> {
        let ix = self.lock();
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let classes = if urgent_only { 1 } else { ix.classes.len() };
        for class in &ix.classes[..classes] {
            for (seq, m) in class {
                if exclude.contains(seq) {
                    continue;
                }
                if out.len() >= max_events
                    || (!out.is_empty() && bytes + m.bytes > max_bytes as u64)
                {
                    return out;
                }
                bytes += m.bytes;
                out.push(*seq);
            }
        }
        out
    }

    /// Forgets delivered (or dead-lettered) entries and frees their budget.
    pub fn remove(&self, seqs: &[u64]) {
        let mut ix = self.lock();
        let mut freed = 0;
        for seq in seqs {
            for (i, class) in ix.classes.iter_mut().enumerate() {
                if let Some(m) = class.remove(seq) {
                    freed += m.bytes;
                    if i == 1 {
                        ix.normal_bytes -= m.bytes;
                    }
                    break;
                }
            }
        }
        self.used.fetch_sub(freed, Ordering::AcqRel);
    }

    /// Bytes admitted and not yet delivered.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn outbox(max_bytes: u64, full_policy: FullPolicy) -> Outbox {
        Outbox {
            index: Mutex::default(),
            used: AtomicU64::new(0),
            max_bytes,
            full_policy,
            wake: Notify::new(),
            unset_clock: AtomicU64::new(0),
        }
    }

    fn rec(class: Class, n: usize) -> OutboxWrite {
        OutboxWrite {
            class,
            entry: vec![0; n],
            unset_clock: false,
        }
    }

    #[test]
    fn drop_bulk_first_keeps_urgent_and_answers_busy_when_it_cannot() {
        let ob = outbox(100, FullPolicy::DropBulkFirst);
        let mut r = vec![rec(Class::Urgent, 60), rec(Class::Bulk, 60)];
        assert_eq!(ob.admit(&mut r), Admission::DroppedBulk(1));
        assert_eq!(r.len(), 1);
        let mut r = vec![rec(Class::Normal, 50)];
        assert_eq!(ob.admit(&mut r), Admission::Full);
        assert_eq!(ob.used_bytes(), 60);
        let bp = outbox(100, FullPolicy::Backpressure);
        let mut r = vec![rec(Class::Urgent, 60), rec(Class::Bulk, 30)];
        assert_eq!(bp.admit(&mut r), Admission::Admitted);
        let mut r = vec![rec(Class::Urgent, 60)];
        assert_eq!(
            bp.admit(&mut r),
            Admission::Full,
            "90 of 100 bytes are taken"
        );
        assert_eq!(bp.used_bytes(), 90);
        // More than the whole outbox never fits: not busy, but too large.
        let mut r = vec![rec(Class::Normal, 101)];
        assert_eq!(bp.admit(&mut r), Admission::TooLarge(101));
        let mut r = vec![rec(Class::Normal, 101), rec(Class::Bulk, 5)];
        assert_eq!(ob.admit(&mut r), Admission::TooLarge(101));
    }

    #[test]
    fn batches_take_urgent_first_and_respect_the_limits() {
        let ob = outbox(1000, FullPolicy::Backpressure);
        let now = Instant::now();
        ob.add(
            &[
                NewEntry {
                    seq: 1,
                    class: Class::Bulk,
                    bytes: 10,
                    unset_clock: false,
                },
                NewEntry {
                    seq: 2,
                    class: Class::Normal,
                    bytes: 10,
                    unset_clock: false,
                },
                NewEntry {
                    seq: 3,
                    class: Class::Urgent,
                    bytes: 10,
                    unset_clock: false,
                },
            ],
            now,
        );
        assert_eq!(ob.next_batch(10, 1000, &[], false), vec![3, 2, 1]);
        assert_eq!(ob.next_batch(2, 1000, &[], false), vec![3, 2]);
        assert_eq!(ob.next_batch(10, 15, &[], false), vec![3]);
        assert_eq!(ob.next_batch(10, 1000, &[2], false), vec![3, 1]);
        assert_eq!(ob.next_batch(10, 1000, &[], true), vec![3]);
        assert_eq!(ob.pending().normal_bytes, 10);
        ob.remove(&[2]);
        assert_eq!(ob.pending().normal, 0);
        let _ = Config::defaults();
    }

    #[test]
    fn entries_loaded_at_start_keep_their_age_and_a_bad_one_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let hour = 3_600_000;
        let now_ms = 10 * hour;
        let entry = |class, queued_ms| Entry {
            id: "gw:d:1::0".into(),
            device: "d".into(),
            topic: "t".into(),
            class,
            ts: 1,
            queued_ms,
            payload: vec![],
            tier_seq: None,
            tier_nack: None,
            boot: None,
        };
        let puts = [
            (1, entry(Class::Bulk, now_ms - 2 * hour).encode()),
            (2, b"garbage".to_vec()),
            (3, entry(Class::Normal, now_ms - 1000).encode()),
            // Queued "in the future": the clock went back since. Counts as new, not negative.
            (4, entry(Class::Normal, now_ms + hour).encode()),
        ];
        for (seq, v) in &puts {
            store
                .raw_tree()
                .insert(keys::outbox(*seq), v.as_slice())
                .unwrap();
        }
        let before = Instant::now();
        let (ob, loaded) = Outbox::load(&store, &Config::defaults().outbox, now_ms).unwrap();
        assert_eq!((loaded.corrupt, loaded.next_seq), (1, 5));
        let p = ob.pending();
        let bulk_age = before.saturating_duration_since(p.oldest_bulk.unwrap());
        assert!(
            bulk_age >= Duration::from_millis(2 * hour - 1000),
            "{bulk_age:?}"
        );
        let normal_age = Instant::now().duration_since(p.oldest_normal.unwrap());
        assert!(normal_age >= Duration::from_millis(1000), "{normal_age:?}");
        assert!(normal_age < Duration::from_secs(60), "{normal_age:?}");
        assert_eq!((p.bulk, p.normal), (1, 2));
        assert!(store.raw_tree().get(keys::outbox(2)).unwrap().is_none());
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].payload, b"garbage");
    }

    #[test]
    fn entries_round_trip() {
        let e = Entry {
            id: entry_id("gw", "d1", "5", "threshold", 0),
            device: "d1".into(),
            topic: "devices/d1/temp".into(),
            class: Class::Urgent,
            ts: 9,
            queued_ms: 0,
            payload: b"{}".to_vec(),
            tier_seq: None,
            tier_nack: None,
            boot: None,
        };
        assert_eq!(e.id, "gw:d1:5:threshold:0");
        assert_eq!(Entry::decode(&e.encode()), Some(e));
    }

    #[test]
    fn an_entry_from_this_boot_is_restamped_once_and_one_from_another_boot_never() {
        let unset = |boot_id: &str| Entry {
            id: "gw:d1:5:threshold:0".into(),
            device: "d1".into(),
            topic: "t".into(),
            class: Class::Normal,
            // Received at 1970-01-01T00:01:40 by a box without a clock, 5 s after boot.
            ts: 100_000,
            queued_ms: 100_000,
            payload: vec![],
            tier_seq: None,
            tier_nack: None,
            boot: Some(BootTime {
                boot_id: boot_id.into(),
                mono_ms: 5_000,
                restamped: false,
            }),
        };
        let now = 1_800_000_000_000;
        let mut e = unset("b1");
        // NTP answered; 65 s since boot: received 60 s ago.
        assert!(e.restamp("b1", now, 65_000));
        assert_eq!(e.ts, now - 60_000);
        assert!(e.boot.as_ref().unwrap().restamped);
        let bytes = e.encode();
        assert_eq!(Entry::decode(&bytes), Some(e.clone()));
        // Once only: a later look changes nothing, so every send carries the same bytes.
        assert!(!e.restamp("b1", now + 5_000, 70_000));
        assert_eq!(e.encode(), bytes);
        // Another boot's entry (the box rebooted before the clock was set) keeps its ts.
        let mut other = unset("b0");
        assert!(!other.restamp("b1", now, 65_000));
        assert_eq!((other.ts, other.boot.unwrap().restamped), (100_000, false));
        // An unreadable boot id (empty) never matches.
        assert!(!unset("").restamp("", now, 65_000));
        // Entries that never had an unset clock are written as before: no `boot` key.
        let mut plain = unset("b1");
        plain.boot = None;
        assert!(!plain.restamp("b1", now, 65_000));
        let text = format!(
            "{:?}",
            ciborium::from_reader::<ciborium::Value, _>(plain.encode().as_slice()).unwrap()
        );
        assert!(!text.contains("boot"), "{text}");
    }
}
