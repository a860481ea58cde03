//! Group commit. [`CommitQueue`] is the pure state machine: items arrive from every
//! connection in processing order; when no group is in flight, everything pending becomes one
//! [`Group`] (one atomic batch: state, outbox entries, dead letters and the devices' new
//! high-water marks); its acks, nacks, welcomes and busy answers are released only by
//! [`CommitQueue::flushed`], which the driver calls after the flush returned. [`run`] is the
//! driver thread that moves the bytes to sled. The items and answers are the pipeline's
//! (`crate::pipeline`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};

use super::{keys, Store, StoreError};
use crate::pipeline::{Class, Item, ItemKind, Reply, Settled};

/// An outbox entry written by a group, for the uplink's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewEntry {
    pub seq: u64,
    pub class: Class,
    pub bytes: u64,
    /// Stamped on an unset clock ([`crate::pipeline::OutboxWrite::unset_clock`]).
    pub unset_clock: bool,
}

/// One atomic write and what it releases once durable.
#[derive(Debug, Default)]
pub struct Group {
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub replies: Vec<(Reply, Settled)>,
    pub overlay: Vec<(Vec<Vec<u8>>, u64)>,
    pub entries: Vec<NewEntry>,
    pub events: usize,
    /// Items in the group (events, nacks, resends, welcomes, busy answers).
    pub items: usize,
    /// The new dead letters (encoded; [`Store::commit`] gives them ids), and how many letters
    /// the write dropped to stay under the cap.
    pub dead: Vec<Vec<u8>>,
    pub dead_dropped: u64,
    /// What the group's items hold ([`ItemKind::bytes`]), released from the [`Backlog`] once
    /// the group is durable.
    pub bytes: u64,
}

/// What was submitted to the committer and is not durable yet, bounded in bytes (the channel
/// bounds the count): a handler writing large state or many dead letters cannot make the
/// queue and the group hold more than `max_bytes`. Submitting blocks while the bound is
/// reached (backpressure, as a full channel does), unless nothing is in flight.
#[derive(Debug)]
pub struct Backlog {
    items: std::sync::atomic::AtomicUsize,
    bytes: Mutex<u64>,
    freed: Condvar,
    max_bytes: u64,
}

impl Backlog {
    pub fn new(max_bytes: u64) -> Self {
        Backlog {
            items: Default::default(),
            bytes: Mutex::new(0),
            freed: Condvar::new(),
            max_bytes,
        }
    }

    /// Waits until `bytes` more fit (or nothing is in flight), then counts one item of them.
    pub fn enter(&self, bytes: u64) {
        let mut used = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && used.saturating_add(bytes) > self.max_bytes {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += bytes;
        self.items.fetch_add(1, Ordering::Relaxed);
    }

    /// `items` items holding `bytes` left the backlog (committed, or never sent).
    pub fn leave(&self, items: usize, bytes: u64) {
        self.items.fetch_sub(items, Ordering::Relaxed);
        let mut used = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(bytes);
        self.freed.notify_all();
    }

    /// Items submitted and not yet durable.
    pub fn items(&self) -> usize {
        self.items.load(Ordering::Relaxed)
    }

    /// Whether three quarters of the byte bound are taken (datagrams are shed from there, so
    /// best-effort traffic never waits for room).
    pub fn is_nearly_full(&self) -> bool {
        self.bytes() >= self.max_bytes / 4 * 3
    }

    /// Bytes submitted and not yet durable.
    pub fn bytes(&self) -> u64 {
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The pure group-commit state machine.
pub struct CommitQueue {
    /// High-water marks as written by the groups so far (durable once their flush returned).
    hwm: HashMap<Arc<str>, u64>,
    next_outbox: u64,
    pending: Vec<Item>,
    pending_bytes: u64,
    in_flight: bool,
}

impl CommitQueue {
    pub fn new(next_outbox: u64) -> Self {
        CommitQueue {
            hwm: HashMap::new(),
            next_outbox,
            pending: Vec::new(),
            pending_bytes: 0,
            in_flight: false,
        }
    }

    pub fn push(&mut self, item: Item) {
        self.pending_bytes += item.kind.bytes();
        self.pending.push(item);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// The next group to write, unless one is in flight or nothing is pending.
    /// `durable_hwm` reads a device's mark from the store the first time it is seen.
    pub fn next_group(&mut self, mut durable_hwm: impl FnMut(&str) -> u64) -> Option<Group> {
        if self.in_flight || self.pending.is_empty() {
            return None;
        }
        self.in_flight = true;
        let mut g = Group {
            bytes: std::mem::take(&mut self.pending_bytes),
            ..Group::default()
        };
        let mut touched: Vec<Arc<str>> = Vec::new();
        for item in std::mem::take(&mut self.pending) {
            g.items += 1;
            let hwm = self
                .hwm
                .entry(item.device.clone())
                .or_insert_with(|| durable_hwm(&item.device));
            let advances = item.seq > *hwm && item.kind.moves_mark();
            let settled = match item.kind {
                ItemKind::Event(ws) => {
                    let ws = *ws;
                    g.events += 1;
                    let mut keys_written = Vec::with_capacity(ws.state.len());
                    for (k, v) in ws.state {
                        keys_written.push(k.clone());
                        g.ops.push((k, v));
                    }
                    if !keys_written.is_empty() {
                        g.overlay.push((keys_written, ws.tag));
                    }
                    for rec in ws.outbox {
                        let seq = self.next_outbox;
                        self.next_outbox += 1;
                        g.entries.push(NewEntry {
                            seq,
                            class: rec.class,
                            bytes: rec.entry.len() as u64,
                            unset_clock: rec.unset_clock,
                        });
                        g.ops.push((keys::outbox(seq), Some(rec.entry)));
                    }
                    g.dead.extend(ws.dead);
                    (item.seq > 0).then_some(Settled::Ack(item.seq))
                }
                ItemKind::Nack { code, reason } => Some(Settled::Nack {
                    seq: item.seq,
                    code,
                    reason,
                }),
                ItemKind::Resend => Some(Settled::Ack(item.seq)),
                ItemKind::Welcome => Some(Settled::Welcome { hwm: *hwm }),
                ItemKind::Busy { retry_after_ms } => Some(Settled::Busy {
                    seq: item.seq,
                    retry_after_ms,
                }),
            };
            if advances {
                *hwm = item.seq;
                if !touched.contains(&item.device) {
                    touched.push(item.device.clone());
                }
            }
            if let (Some(reply), Some(s)) = (item.reply, settled) {
                g.replies.push((reply, s));
            }
        }
        for d in touched {
            g.ops
                .push((keys::hwm(&d), Some(self.hwm[&d].to_be_bytes().to_vec())));
        }
        Some(g)
    }

    /// Marks the in-flight group durable and hands back what it releases. Call only after the
    /// flush that covers `group` has returned.
    pub fn flushed(&mut self, group: Group) -> Group {
        self.in_flight = false;
        group
    }
}

/// Largest number of items in one group.
const MAX_GROUP_ITEMS: usize = 16_384;

/// A group takes at most this share of the backlog's byte bound (one item may exceed it).
pub const GROUP_SHARE_OF_BACKLOG: u64 = 4;

/// Hooks the driver calls around each durable group.
pub trait AfterFlush: Send {
    /// A key and value to write along with the group about to be written (the clock floor):
    /// it costs no sync of its own and never wakes an idle disk.
    fn ride_along(&mut self) -> Option<(&'static [u8], Vec<u8>)> {
        None
    }

    fn after_flush(&mut self, group: &Group);
}

/// The committer thread: gathers what arrived since the last flush, writes it as one batch,
/// makes it durable ([`Store::sync`]: flush + fdatasync), then releases the replies. A group
/// holds at most [`MAX_GROUP_ITEMS`] items and about `max_group_bytes`. Returns when every
/// sender is gone (shutdown) or on the first store error (the caller reports it and exits: no
/// ack goes out after a failed write).
pub fn run(
    store: &Store,
    rx: Receiver<Item>,
    next_outbox: u64,
    max_group_bytes: u64,
    mut hooks: impl AfterFlush,
) -> Result<(), StoreError> {
    let mut q = CommitQueue::new(next_outbox);
    let mut read_error = None;
    loop {
        match rx.recv() {
            Ok(item) => q.push(item),
            Err(_) => return Ok(()),
        }
        while q.pending() < MAX_GROUP_ITEMS && q.pending_bytes() < max_group_bytes {
            match rx.try_recv() {
                Ok(item) => q.push(item),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let Some(group) = q.next_group(|d| match store.hwm(d) {
            Ok(h) => h,
            Err(e) => {
                read_error.get_or_insert(e);
                u64::MAX
            }
        }) else {
            continue;
        };
        if let Some(e) = read_error.take() {
            return Err(e);
        }
        let mut batch = sled::Batch::default();
        for (k, v) in &group.ops {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                None => batch.remove(k.as_slice()),
            }
        }
        if let Some((k, v)) = hooks.ride_along() {
            batch.insert(k, v);
        }
        let mut group = group;
        let dead_dropped = store.commit(batch, std::mem::take(&mut group.dead))?;
        let mut group = q.flushed(group);
        group.dead_dropped = dead_dropped;
        release(group, &store.overlay, &mut hooks);
    }
}

/// What follows a group's sync (the committer's, and the simulator's): its state writes leave
/// the overlay, the hooks see it (the outbox index, the backlog), then its answers go out.
pub fn release(group: Group, overlay: &super::Overlay, hooks: &mut impl AfterFlush) {
    for (keys, tag) in &group.overlay {
        overlay.forget_durable(keys.iter(), *tag);
    }
    hooks.after_flush(&group);
    for (reply, settled) in group.replies {
        // A connection that went away no longer needs its answer.
        let _ = reply.send(settled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{OutboxWrite, WriteSet};
    use crate::proto::msg::NackCode;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    fn item(dev: &str, seq: u64, kind: ItemKind, reply: &Reply) -> Item {
        Item {
            device: dev.into(),
            seq,
            kind,
            reply: Some(reply.clone()),
        }
    }

    fn event(state: &[(&str, &str)]) -> ItemKind {
        ItemKind::Event(Box::new(WriteSet {
            state: state
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec())))
                .collect(),
            ..Default::default()
        }))
    }

    /// A disk that knows what was written and what is durable.
    #[derive(Default)]
    struct Disk {
        written: HashMap<Vec<u8>, Option<Vec<u8>>>,
        durable: HashMap<Vec<u8>, Option<Vec<u8>>>,
    }

    impl Disk {
        fn write(&mut self, g: &Group) {
            for (k, v) in &g.ops {
                self.written.insert(k.clone(), v.clone());
            }
        }
        fn flush(&mut self) {
            self.durable = self.written.clone();
        }
        fn hwm(&self, dev: &str) -> u64 {
            self.durable
                .get(&keys::hwm(dev))
                .cloned()
                .flatten()
                .and_then(|v| keys::u64_value(&v))
                .unwrap_or(0)
        }
    }

    /// Sends a group's replies the way the driver does, checking each against the durable disk.
    fn release(q: &mut CommitQueue, g: Group, disk: &mut Disk, dev: &str) {
        disk.flush();
        for (reply, s) in q.flushed(g).replies {
            match &s {
                Settled::Ack(seq) | Settled::Nack { seq, .. } => {
                    assert!(
                        disk.hwm(dev) >= *seq,
                        "{s:?} released before durable (hwm {})",
                        disk.hwm(dev)
                    )
                }
                // The mark at the hello's place in the order: durable, and covering what preceded it.
                Settled::Welcome { hwm } => {
                    assert!(*hwm <= disk.hwm(dev), "welcome {hwm} is not durable")
                }
                Settled::Busy { .. } => {}
            }
            reply.send(s).unwrap();
        }
    }

    fn drain(rx: &mut UnboundedReceiver<Settled>) -> Vec<Settled> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn nothing_is_released_before_the_flush_that_covers_it() {
        let (tx, mut rx) = unbounded_channel();
        let mut disk = Disk::default();
        let mut q = CommitQueue::new(1);
        q.push(item("d", 1, event(&[("s/h\0k", "1")]), &tx));
        q.push(item("d", 2, event(&[]), &tx));
        let g1 = q.next_group(|_| 0).unwrap();
        disk.write(&g1);
        // While g1 is in flight: a resend of seq 2 (from a new connection) and a hello.
        q.push(item("d", 2, ItemKind::Resend, &tx));
        q.push(item("d", 0, ItemKind::Welcome, &tx));
        q.push(item("d", 3, event(&[]), &tx));
        assert!(
            q.next_group(|_| 0).is_none(),
            "a second group may not start while one is in flight"
        );
        assert!(
            drain(&mut rx).is_empty(),
            "nothing goes out before the flush"
        );
        release(&mut q, g1, &mut disk, "d");
        assert_eq!(drain(&mut rx), vec![Settled::Ack(1), Settled::Ack(2)]);
        let g2 = q.next_group(|_| 0).unwrap();
        disk.write(&g2);
        assert!(drain(&mut rx).is_empty());
        release(&mut q, g2, &mut disk, "d");
        assert_eq!(
            drain(&mut rx),
            vec![
                Settled::Ack(2),
                Settled::Welcome { hwm: 2 },
                Settled::Ack(3)
            ]
        );
    }

    #[test]
    fn interleaved_devices_groups_and_nacks_keep_the_invariant() {
        // A deterministic pseudo-random schedule of pushes and flushes over three devices;
        // each device has its own reply channel, checked against its own durable mark.
        let devs = ["a", "b", "c"];
        let chans: Vec<_> = devs
            .iter()
            .map(|_| unbounded_channel::<Settled>())
            .collect();
        let mut disk = Disk::default();
        let mut q = CommitQueue::new(1);
        let mut next = [1u64; 3];
        let mut submitted = [0u64; 3];
        let mut in_flight: Option<Group> = None;
        let mut rng = fastrand::Rng::with_seed(7);
        let mut released = 0;
        for _ in 0..3000 {
            let d = rng.usize(0..3);
            let tx = &chans[d].0;
            match rng.u8(0..10) {
                0..=4 => {
                    q.push(item(devs[d], next[d], event(&[]), tx));
                    submitted[d] = next[d];
                    next[d] += 1;
                }
                5 => {
                    q.push(item(
                        devs[d],
                        next[d],
                        ItemKind::Nack {
                            code: NackCode::Acl,
                            reason: "x".into(),
                        },
                        tx,
                    ));
                    submitted[d] = next[d];
                    next[d] += 1;
                }
                6 if next[d] > 1 => q.push(item(devs[d], next[d] - 1, ItemKind::Resend, tx)),
                7 => q.push(item(devs[d], 0, ItemKind::Welcome, tx)),
                _ => {
                    if let Some(g) = in_flight.take() {
                        disk.flush();
                        for (reply, s) in q.flushed(g).replies {
                            let i = chans
                                .iter()
                                .position(|(t, _)| t.same_channel(&reply))
                                .unwrap();
                            match &s {
                                Settled::Ack(seq) | Settled::Nack { seq, .. } => {
                                    assert!(
                                        disk.hwm(devs[i]) >= *seq,
                                        "{s:?} of {} before durable",
                                        devs[i]
                                    )
                                }
                                Settled::Welcome { hwm } => assert!(*hwm <= disk.hwm(devs[i])),
                                Settled::Busy { .. } => {}
                            }
                            released += 1;
                        }
                    }
                    // Nothing is released while a group is in flight.
                    if let Some(g) = q.next_group(|_| 0) {
                        disk.write(&g);
                        assert!(q.next_group(|_| 0).is_none());
                        in_flight = Some(g);
                    }
                }
            }
        }
        assert!(released > 500, "the schedule released {released} answers");
        assert!(submitted.iter().all(|s| *s > 100));
    }

    #[test]
    fn the_backlog_holds_a_submitter_back_until_bytes_are_durable() {
        let b = Arc::new(Backlog::new(1000));
        b.enter(5000); // alone, an item larger than the bound still goes in
        let (b2, done) = (
            b.clone(),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        let d2 = done.clone();
        let t = std::thread::spawn(move || {
            b2.enter(10);
            d2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "held back while 5000 bytes are in flight"
        );
        b.leave(1, 5000);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert_eq!((b.items(), b.bytes()), (1, 10));
    }

    struct Groups(Arc<std::sync::Mutex<Vec<(usize, u64)>>>);
    impl AfterFlush for Groups {
        fn after_flush(&mut self, g: &Group) {
            self.0.lock().unwrap().push((g.items, g.bytes));
        }
    }

    #[test]
    fn a_group_is_bounded_in_bytes_as_well_as_items() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        let mib = 1 << 20;
        // 20 events of 1 MiB state each, all queued before the committer starts.
        for seq in 1..=20u64 {
            let ws = WriteSet {
                state: vec![(keys::state("h", &seq.to_be_bytes()), Some(vec![7; mib]))],
                ..Default::default()
            };
            tx.send(Item {
                device: "d".into(),
                seq,
                kind: ItemKind::Event(Box::new(ws)),
                reply: None,
            })
            .unwrap();
        }
        drop(tx);
        let groups = Arc::new(std::sync::Mutex::new(Vec::new()));
        run(&store, rx, 1, 4 * mib as u64, Groups(groups.clone())).unwrap();
        let groups = groups.lock().unwrap();
        assert_eq!(groups.iter().map(|g| g.0).sum::<usize>(), 20);
        assert!(
            groups.iter().all(|(_, bytes)| *bytes <= 5 * mib as u64),
            "a group holds at most its bound plus one item: {groups:?}"
        );
        assert_eq!(store.hwm("d").unwrap(), 20);
    }

    #[test]
    fn a_bad_frame_nack_moves_no_mark_but_a_nacked_publish_does() {
        let (tx, _rx) = unbounded_channel();
        let mut q = CommitQueue::new(1);
        let nack = |code| ItemKind::Nack {
            code,
            reason: "x".into(),
        };
        q.push(item("d", 1000, nack(NackCode::BadFrame), &tx));
        q.push(item("d", u64::MAX, nack(NackCode::BadFrame), &tx));
        q.push(item("d", 3, nack(NackCode::Acl), &tx));
        let g = q.next_group(|_| 2).unwrap();
        let marks: Vec<_> = g
            .ops
            .iter()
            .filter(|(k, _)| k.starts_with(keys::HWM))
            .collect();
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].1.as_deref(), Some(&3u64.to_be_bytes()[..]));
    }

    #[test]
    fn a_group_is_one_write_with_one_hwm_per_device_and_welcome_reads_it() {
        let (tx, mut rx) = unbounded_channel();
        let mut q = CommitQueue::new(10);
        let mut ws = WriteSet::default();
        ws.outbox.push(OutboxWrite {
            class: Class::Urgent,
            entry: b"e".to_vec(),
            unset_clock: false,
        });
        q.push(item("d", 5, ItemKind::Event(Box::new(ws)), &tx));
        q.push(item(
            "d",
            6,
            ItemKind::Nack {
                code: NackCode::Acl,
                reason: "no".into(),
            },
            &tx,
        ));
        q.push(item(
            "d",
            7,
            ItemKind::Busy {
                retry_after_ms: 100,
            },
            &tx,
        ));
        q.push(item("d", 0, ItemKind::Welcome, &tx));
        let g = q.next_group(|_| 4).unwrap();
        let hwm_ops: Vec<_> = g
            .ops
            .iter()
            .filter(|(k, _)| k.starts_with(keys::HWM))
            .collect();
        assert_eq!(hwm_ops.len(), 1);
        assert_eq!(
            hwm_ops[0].1.as_deref(),
            Some(&6u64.to_be_bytes()[..]),
            "busy does not advance the mark"
        );
        assert_eq!(
            g.entries,
            vec![NewEntry {
                seq: 10,
                class: Class::Urgent,
                bytes: 1,
                unset_clock: false,
            }]
        );
        let g = q.flushed(g);
        for (r, s) in g.replies {
            r.send(s).unwrap();
        }
        assert_eq!(
            drain(&mut rx),
            vec![
                Settled::Ack(5),
                Settled::Nack {
                    seq: 6,
                    code: NackCode::Acl,
                    reason: "no".into()
                },
                Settled::Busy {
                    seq: 7,
                    retry_after_ms: 100
                },
                Settled::Welcome { hwm: 6 },
            ]
        );
    }
}
