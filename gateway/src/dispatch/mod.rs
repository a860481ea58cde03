//! The sequencer: one event at a time, in the order the committer will see them. It checks a
//! publish against the high-water mark (resend) and the busy floor, the topic rules and the
//! ACL, has the event tree (`tree.rs`) run the handlers, applies outbox admission, leaves the
//! kept tree's state writes in the overlay and submits its write set to the committer.
//! Everything here is synchronous and free of network I/O; it runs on its own thread
//! (`thread.rs`), which owns it. The wall clock comes in as arguments (`now`,
//! `received_ms`); a store that cannot be read comes back as a [`Fault`], and only the
//! thread stops the process.

pub mod thread;
mod tree;
mod turns;

pub use tree::{EventState, ProbationEnd};

use std::collections::HashMap;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use crate::clock::Stamp;
use crate::config::Config;
use crate::jsonl::Line;
use crate::metrics::Metrics;
use crate::os::disk::DiskWatch;
use crate::outbox::{Admission, Outbox};
use crate::pipeline::Class;
use crate::pipeline::{Item, ItemKind, Reply, WriteSet};
use crate::proto::msg::{NackCode, Publish};
use crate::proto::topic;
use crate::record::{Offer, RecordTap};
use crate::sandbox::quarantine::Quarantine;
use crate::sandbox::{Handler, Limit, StateSource};
use crate::store::commit::Backlog;
use crate::store::{keys, Overlay, StoreError};
use crate::timers::{Due, Firing, Timers};
use tree::{dead_letter, Ctx, Grown, Origin, Root, Tree};

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Queued for the committer; its ack (or nack) follows the flush.
    Queued,
    /// Not kept: answer `busy` and stop reading the stream.
    Busy,
}

/// The store could not be read where the next answer depends on it: the dispatcher cannot go
/// on, and its driver stops the gateway so that the supervisor restarts it.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct Fault {
    what: &'static str,
    #[source]
    source: StoreError,
}

impl Fault {
    fn reading(what: &'static str) -> impl FnOnce(StoreError) -> Fault {
        move |source| Fault { what, source }
    }
}

/// What the dispatcher reads of what is durable (the store; the simulator's disk), and where
/// it leaves the state writes of events submitted and not yet durable, which later events read.
pub trait Durable: StateSource {
    /// The durable high-water mark of `device` (0: none).
    fn hwm(&self, device: &str) -> Result<u64, StoreError>;
    /// The durable next due time of `handler`'s timer, and its epoch.
    fn timer_due(&self, handler: &str) -> Result<Option<Due>, StoreError>;
    /// `handler`'s stored quarantine ([`Quarantine::encode`]).
    fn quarantine(&self, handler: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The full keys of `handler`'s durable state (its removal deletes them).
    fn state_keys(&self, handler: &str) -> Result<Vec<Vec<u8>>, StoreError>;
    /// State writes submitted and not yet durable; [`StateSource::get`] reads them first.
    fn overlay(&self) -> &Overlay;
}

/// A handler as `tidepool status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerStatus {
    pub name: String,
    pub version: u64,
    pub timer_ms: Option<u64>,
    /// Quarantined for every device.
    pub quarantined: bool,
    /// The devices it is quarantined for (`""`: its timer).
    pub quarantined_for: Vec<String>,
    /// The most failures in a row of any device.
    pub errors_in_row: u32,
    /// Its fixed share (or cap) of the wall clock, in percent (0: none), how it is shared
    /// (`fair`, `fixed`, `off`), and invocations refused over it.
    pub cpu_percent: u32,
    pub cpu_share: &'static str,
    pub cpu_refused: u64,
    /// What its invocations cost since it was loaded.
    pub runs: crate::sandbox::RunStats,
    /// Its probation, while it is on one: runs seen, failures among them, time left.
    pub probation: Option<ProbationStatus>,
}

/// A running probation as `status` and `list` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProbationStatus {
    pub runs: u32,
    pub of_runs: u32,
    pub failures: u32,
    pub max_failures: u32,
    pub remaining_ms: u64,
}

pub struct Dispatcher {
    gateway: Arc<str>,
    tree: Tree,
    acl: Vec<String>,
    /// Devices whose `id`, `src` and `class` keys are kept (lower Tidepool tiers).
    tiers: Vec<String>,
    max_payload: usize,
    busy_retry_ms: u64,
    /// The box's `limits.cpu_percent` (for handlers installed later).
    cpu_percent: u32,
    /// Items waiting for the committer beyond which datagrams are shed.
    datagram_shed_backlog: usize,
    timers: Timers,
    recorder: Option<RecordTap>,
    disk: Option<Arc<DiskWatch>>,
    claimed: HashMap<Arc<str>, u64>,
    /// The empty device of a timer's tree, as stored formats name it.
    no_device: Arc<str>,
    /// Devices answered busy at a seq they have not resent yet (see [`Dispatcher::publish`]).
    busy_floor: HashMap<Arc<str>, u64>,
    store: Arc<dyn Durable>,
    outbox: Arc<Outbox>,
    tx: Option<SyncSender<Item>>,
    /// Items submitted and not yet committed.
    pub backlog: Arc<Backlog>,
    tag: u64,
    datagrams: u64,
    /// Random per start: datagram entry ids stay unique across restarts, even without a clock.
    boot_nonce: u64,
    /// This boot's id, for forwards stamped by an unset clock ([`Stamp`]).
    boot_id: Arc<str>,
    metrics: Arc<Metrics>,
    /// Where ended probations go (the admin, which rolls a failed one back).
    probations: Option<tokio::sync::mpsc::UnboundedSender<ProbationEnd>>,
}

impl Dispatcher {
    /// A dispatcher over `handlers` at wall time `now` (ms): it reads their stored
    /// quarantines and timers, and submits the due times it sets at once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &Config,
        handlers: Vec<Handler>,
        store: Arc<dyn Durable>,
        state: Arc<EventState>,
        outbox: Arc<Outbox>,
        tx: SyncSender<Item>,
        metrics: Arc<Metrics>,
        now: u64,
    ) -> Result<Self, Fault> {
        let mut timers = Timers::default();
        // New (or reset) due times are written at once, so that restarts shorter than a
        // period cannot keep a timer from ever firing.
        let mut schedule = WriteSet::default();
        let mut handlers = handlers;
        for h in &mut handlers {
            h.share = crate::sandbox::share::CpuShare::new(
                cfg.limits.cpu_percent,
                h.manifest.limits.cpu_percent,
            );
            // A quarantine outlives a restart (its trial still ends it).
            let stored = store
                .quarantine(h.name())
                .map_err(Fault::reading("reading a quarantine"))?;
            let Some(v) = stored else { continue };
            match Quarantine::decode(&v) {
                Some(q) if q.version != h.manifest.version => tracing::info!(
                    handler = h.name(),
                    held_for = q.version,
                    "a new version of the handler: its quarantine is lifted"
                ),
                Some(mut q) => {
                    q.clamp(now);
                    if q.all() || q.devices().next().is_some() {
                        tracing::warn!(handler = h.name(), "handler still quarantined from before the restart (it runs again after its trial)");
                    }
                    h.quarantine = q;
                }
                None => tracing::warn!(
                    handler = h.name(),
                    "its stored quarantine does not decode: starting without one"
                ),
            }
        }
        for (i, h) in handlers.iter().enumerate() {
            if let Some(period) = h.manifest.timer_ms {
                let stored = store
                    .timer_due(h.name())
                    .map_err(Fault::reading("reading a timer"))?;
                if let Some(due) = timers.add(i, period, stored, now) {
                    schedule
                        .state
                        .push(timer_write(h.name(), due.due_ms, due.epoch));
                }
            }
        }
        let mut d = Dispatcher {
            gateway: cfg.gateway.id.as_str().into(),
            tree: Tree::new(cfg, handlers, state, metrics.clone()),
            acl: cfg.acl.publish.clone(),
            tiers: cfg.acl.tiers.clone(),
            max_payload: cfg.ingress.max_payload_bytes,
            busy_retry_ms: cfg.ingress.busy_retry_after_ms,
            cpu_percent: cfg.limits.cpu_percent,
            datagram_shed_backlog: cfg.ingress.datagram_shed_backlog,
            timers,
            recorder: None,
            disk: None,
            claimed: HashMap::new(),
            no_device: "".into(),
            busy_floor: HashMap::new(),
            store,
            outbox,
            tx: Some(tx),
            backlog: Arc::new(Backlog::new(cfg.store.commit_queue_bytes)),
            tag: 0,
            datagrams: 0,
            boot_nonce: fastrand::u64(..),
            boot_id: crate::clock::boot_id(),
            metrics,
            probations: None,
        };
        if !schedule.state.is_empty() {
            d.submit(&"".into(), 0, ItemKind::Event(Box::new(schedule)), None);
        }
        Ok(d)
    }

    /// Installs `h` (loaded, its `tp_init` run) at wall time `now`: in place of the running
    /// handler of its name, or beside the others. Its CPU share is the box's; its timer, if
    /// any, keeps the stored due time of its name. Returns the version it replaced.
    pub fn install(&mut self, mut h: Handler, now: u64) -> Result<Option<u64>, Fault> {
        h.share =
            crate::sandbox::share::CpuShare::new(self.cpu_percent, h.manifest.limits.cpu_percent);
        let name = h.name().to_string();
        let (version, period) = (h.manifest.version, h.manifest.timer_ms);
        let (i, before) = self.tree.install(h);
        // The running timer's next due time (its firing may not be committed yet), else the
        // stored one of its name.
        let running = self.timers.remove(i);
        if let Some(period) = period {
            let stored = match running {
                Some(due) => Some(due),
                None => self
                    .store
                    .timer_due(&name)
                    .map_err(Fault::reading("reading a timer"))?,
            };
            if let Some(due) = self.timers.add(i, period, stored, now) {
                let mut schedule = WriteSet::default();
                schedule
                    .state
                    .push(timer_write(&name, due.due_ms, due.epoch));
                self.submit(&"".into(), 0, ItemKind::Event(Box::new(schedule)), None);
            }
        }
        tracing::info!(handler = name, version, replaced = ?before, "handler installed");
        Ok(before)
    }

    /// Takes the handler named `name` out at once (the next event no longer runs it) and
    /// deletes what its name holds: its state, its timer's due time and its quarantine, with
    /// the writes still pending for them (the deletes go after them to the committer). A
    /// name that runs nothing still has its leftovers deleted. Returns the version removed.
    pub fn remove(&mut self, name: &str) -> Result<Option<u64>, Fault> {
        let removed = self.take_out(name);
        // The overlay first: the committer writes a key to sled before it leaves the overlay,
        // so read in this order every key is in one list or the other.
        let mut keys = self
            .store
            .overlay()
            .keys_with_prefix(&keys::state_prefix(name));
        keys.extend(
            self.store
                .state_keys(name)
                .map_err(Fault::reading("listing a removed handler's state"))?,
        );
        keys.sort_unstable();
        keys.dedup();
        let deleted = keys.len();
        self.tag += 1;
        let mut ws = WriteSet {
            tag: self.tag,
            ..WriteSet::default()
        };
        // Read as deleted from now on, by a handler of the same name deployed next.
        for k in keys {
            self.store.overlay().put(k.clone(), None, ws.tag);
            ws.state.push((k, None));
        }
        ws.state.push((keys::timer(name), None));
        ws.state.push((keys::quarantine(name), None));
        self.submit(&"".into(), 0, ItemKind::Event(Box::new(ws)), None);
        tracing::info!(
            handler = name,
            version = ?removed,
            state_keys = deleted,
            "handler removed, with its state, timer and quarantine"
        );
        Ok(removed)
    }

    /// Takes the handler named `name` out at once (the next event no longer runs it), leaving
    /// what its name holds: its state, its timer's due time and its quarantine stay, for a
    /// handler of that name loaded later (a reload that no longer configures it, as a restart
    /// would). Returns the version unloaded.
    pub fn unload(&mut self, name: &str) -> Option<u64> {
        let version = self.take_out(name)?;
        tracing::info!(
            handler = name,
            version,
            "handler unloaded; its state, timer and quarantine stay"
        );
        Some(version)
    }

    /// Takes the handler named `name` and its timer out of the list: its version, if it ran.
    fn take_out(&mut self, name: &str) -> Option<u64> {
        let (i, h) = self.tree.remove(name)?;
        self.timers.forget(i);
        Some(h.manifest.version)
    }

    /// Checks publishes against `publish` (`acl.publish`) from now on.
    pub fn set_acl(&mut self, publish: Vec<String>) {
        self.acl = publish;
    }

    /// Sends the probations that end from now on to `to`.
    pub fn report_probations_to(&mut self, to: tokio::sync::mpsc::UnboundedSender<ProbationEnd>) {
        self.probations = Some(to);
    }

    /// The monotonic clock, as the dispatcher's thread reads it (probations are timed on it).
    pub fn set_mono(&mut self, mono_ms: u64) {
        self.tree.mono_ms = mono_ms;
    }

    /// Reports the probations ended since the last call (by their runs, a quarantine or their
    /// window's time).
    pub fn report_probations(&mut self) {
        for end in self.tree.probation_ends() {
            if let Some(tx) = &self.probations {
                let _ = tx.send(end);
            }
        }
    }

    /// Answers `busy` (and skips timers) while `disk` is below its reserve.
    pub fn watch_disk(&mut self, disk: Arc<DiskWatch>) {
        self.disk = Some(disk);
    }

    fn disk_low(&self) -> bool {
        self.disk.as_ref().is_some_and(|d| d.is_low())
    }

    /// Records matching events from now on (`[record]`).
    pub fn record_to(&mut self, recorder: RecordTap) {
        self.recorder = Some(recorder);
    }

    fn recorder_sees(&mut self, device: &str, p: &Publish, received_ms: u64) {
        let Some(r) = self.recorder.as_mut().filter(|r| r.wants(&p.topic)) else {
            return;
        };
        let line = Line {
            device: Some(device.to_string()),
            seq: (p.seq > 0).then_some(p.seq),
            ts: p.ts,
            received_ms: Some(received_ms),
            ..Line::event(&p.topic, &p.payload)
        };
        match r.offer(line) {
            Offer::Queued => Metrics::inc(&self.metrics.recorded),
            Offer::Full => Metrics::inc(&self.metrics.record_dropped),
            Offer::Closed => self.recorder = None,
        }
    }

    /// Each handler's name, version, timer and health.
    pub fn handler_status(&self) -> Vec<HandlerStatus> {
        let now = self.tree.mono_ms;
        self.tree
            .handlers
            .iter()
            .map(|h| HandlerStatus {
                name: h.name().to_string(),
                version: h.manifest.version,
                timer_ms: h.manifest.timer_ms,
                quarantined: h.quarantine.all(),
                quarantined_for: h.quarantine.devices().map(String::from).collect(),
                errors_in_row: h.quarantine.worst_in_row(),
                cpu_percent: h.share.percent(),
                cpu_share: h.share.kind(),
                cpu_refused: h.share_refused,
                runs: h.runs,
                probation: h.probation.as_ref().map(|p| ProbationStatus {
                    runs: p.runs,
                    of_runs: p.rules.events,
                    failures: p.failures,
                    max_failures: p.rules.max_failures,
                    remaining_ms: p.remaining_ms(now),
                }),
            })
            .collect()
    }

    /// Stops submitting (the committer finishes what it has and exits) and finishes the
    /// recording.
    pub fn close(&mut self) {
        self.tx = None;
        if let Some(r) = self.recorder.take() {
            r.finish();
        }
    }

    fn submit(&mut self, device: &Arc<str>, seq: u64, kind: ItemKind, reply: Option<&Reply>) {
        let bytes = kind.bytes();
        self.backlog.enter(bytes);
        let item = Item {
            device: device.clone(),
            seq,
            kind,
            reply: reply.cloned(),
        };
        if self.tx.as_ref().is_none_or(|tx| tx.send(item).is_err()) {
            // The committer stopped: we are shutting down, and nothing more will be acked.
            self.backlog.leave(1, bytes);
        }
    }

    /// The highest seq of `device` that is durable or on its way to the committer.
    fn claimed(&mut self, device: &Arc<str>) -> Result<&mut u64, Fault> {
        use std::collections::hash_map::Entry;
        match self.claimed.entry(device.clone()) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let hwm = self
                    .store
                    .hwm(device)
                    .map_err(Fault::reading("reading a high-water mark"))?;
                Ok(e.insert(hwm))
            }
        }
    }

    /// Answers a `hello` with the durable high-water mark, after what precedes it is durable.
    pub fn hello(&mut self, device: &Arc<str>, reply: &Reply) {
        self.submit(device, 0, ItemKind::Welcome, Some(reply));
    }

    /// Nacks a frame for good. A nacked publish (`acl`, `too_large`, `bad_topic`) advances the
    /// high-water mark; a `bad_frame` is not a valid publish and moves nothing.
    pub fn nack(
        &mut self,
        device: &Arc<str>,
        seq: u64,
        code: NackCode,
        reason: String,
        reply: &Reply,
    ) -> Result<(), Fault> {
        Metrics::inc(&self.metrics.nacks);
        if code.moves_mark() {
            let c = self.claimed(device)?;
            *c = (*c).max(seq);
        }
        self.submit(device, seq, ItemKind::Nack { code, reason }, Some(reply));
        Ok(())
    }

    /// Whether work is waiting behind what runs next (the dispatcher thread tells; see
    /// `sandbox/share.rs`).
    pub fn set_work_waiting(&mut self, waiting: bool) {
        self.tree.set_work_waiting(waiting);
    }

    /// A new session of `device`: its busy floor is forgotten (the device starts over from
    /// its last ack, and what the old session handed over is dropped unread).
    pub fn session_started(&mut self, device: &Arc<str>) {
        self.busy_floor.remove(device);
    }

    /// Answers `busy` for `seq` once everything before it is settled, with `retry_after_ms`
    /// (`None`: `ingress.busy_retry_after_ms`).
    /// A busy answer also sets the device's busy floor at `seq` (see [`Dispatcher::publish`]),
    /// whatever the cause: a full outbox, a low disk, another stream holding the publishing
    /// slot, or the device's rate.
    pub fn busy(
        &mut self,
        device: &Arc<str>,
        seq: u64,
        retry_after_ms: Option<u64>,
        reply: &Reply,
    ) -> Result<(), Fault> {
        Metrics::inc(&self.metrics.busy);
        if seq > *self.claimed(device)? {
            let floor = self.busy_floor.entry(device.clone()).or_insert(seq);
            *floor = (*floor).min(seq);
        }
        let retry_after_ms = retry_after_ms.unwrap_or(self.busy_retry_ms);
        self.submit(device, seq, ItemKind::Busy { retry_after_ms }, Some(reply));
        Ok(())
    }

    /// Checks topic rules and the ACL: `Err((code, reason))` to nack.
    fn check(&self, device: &str, p: &Publish) -> Result<(), (NackCode, String)> {
        topic::validate(&p.topic).map_err(|e| (NackCode::BadTopic, e.to_string()))?;
        if !self
            .acl
            .iter()
            .any(|pat| topic::matches(pat, &p.topic, Some(device)))
        {
            return Err((
                NackCode::Acl,
                format!("device `{device}` may not publish to `{}`", p.topic),
            ));
        }
        if self.is_tier(device) {
            let r = relayed(p).map_err(|why| (NackCode::BadFrame, why))?;
            // Ids this gateway makes are its own: a tier may not pass one off as relayed.
            if let Some(r) = r.filter(|r| {
                r.id.strip_prefix(&*self.gateway)
                    .is_some_and(|rest| rest.starts_with(':'))
            }) {
                return Err((
                    NackCode::BadFrame,
                    format!(
                        "a tier may not relay an id of this gateway's own (`{}`)",
                        r.id
                    ),
                ));
            }
        }
        if p.payload.len() > self.max_payload {
            return Err((
                NackCode::TooLarge,
                format!(
                    "payload of {} bytes exceeds {}",
                    p.payload.len(),
                    self.max_payload
                ),
            ));
        }
        Ok(())
    }

    /// Whether `device` is a lower tier whose `id`, `src` and `class` keys are kept.
    fn is_tier(&self, device: &str) -> bool {
        self.tiers.iter().any(|t| t == device)
    }

    /// One publish from a stream (seq already checked to rise on that stream).
    pub fn publish(
        &mut self,
        device: &Arc<str>,
        p: Publish,
        received: Stamp,
        reply: &Reply,
    ) -> Result<Submitted, Fault> {
        Metrics::inc(&self.metrics.events_in);
        if p.seq <= *self.claimed(device)? {
            Metrics::inc(&self.metrics.resends);
            self.submit(device, p.seq, ItemKind::Resend, Some(reply));
            return Ok(Submitted::Queued);
        }
        // After a busy answer at seq s, nothing above s is kept (nor nacked: a nack moves the
        // mark too) until the device resends s itself: a later seq from another stream would
        // otherwise be acked, and its ack would cover the seqs that were not kept. Seqs below
        // s go on as usual (they may still be on their way from the stream that held the slot).
        match self.busy_floor.get(device) {
            Some(&floor) if p.seq > floor => return Ok(Submitted::Busy),
            Some(&floor) if p.seq == floor => {
                self.busy_floor.remove(device);
            }
            _ => {}
        }
        if let Err((code, reason)) = self.check(device, &p) {
            self.nack(device, p.seq, code, reason, reply)?;
            return Ok(Submitted::Queued);
        }
        if self.disk_low() {
            return Ok(Submitted::Busy);
        }
        let seq_text = p.seq.to_string();
        let relay = match self.is_tier(device) {
            true => relayed(&p).ok().flatten(),
            false => None,
        };
        // Cloned only for an unset clock's stamp: not an atomic per event otherwise.
        let boot = received.boot_ms.map(|ms| (self.boot_id.clone(), ms));
        let ctx = Ctx {
            origin: Origin::Publish { device, seq: p.seq },
            ts: p.ts,
            received_ms: received.wall_ms,
            boot: boot.as_ref().map(|(id, ms)| (&**id, *ms)),
            seq_text: &seq_text,
            relay,
        };
        match self.process(&ctx, Root::Event(&p.topic, &p.payload)) {
            Some(ws) => {
                // Recorded once kept: an event answered busy is recorded when it is resent.
                self.recorder_sees(device, &p, received.wall_ms);
                *self.claimed(device)? = p.seq;
                self.submit(device, p.seq, ItemKind::Event(Box::new(ws)), Some(reply));
                Ok(Submitted::Queued)
            }
            None => Ok(Submitted::Busy),
        }
    }

    /// A best-effort telemetry datagram: no seq, no ack, shed first under load.
    pub fn datagram(&mut self, device: &Arc<str>, p: Publish, received: Stamp) {
        if self.backlog.items() > self.datagram_shed_backlog
            || self.backlog.is_nearly_full()
            || self.check(device, &p).is_err()
            || self.disk_low()
        {
            Metrics::inc(&self.metrics.datagrams_dropped);
            return;
        }
        self.datagrams += 1;
        let seq_text = format!("dg{:016x}.{}", self.boot_nonce, self.datagrams);
        // Cloned only for an unset clock's stamp: not an atomic per event otherwise.
        let boot = received.boot_ms.map(|ms| (self.boot_id.clone(), ms));
        let ctx = Ctx {
            origin: Origin::Datagram { device },
            ts: p.ts,
            received_ms: received.wall_ms,
            boot: boot.as_ref().map(|(id, ms)| (&**id, *ms)),
            seq_text: &seq_text,
            relay: None,
        };
        match self.process(&ctx, Root::Event(&p.topic, &p.payload)) {
            Some(ws) => {
                self.recorder_sees(device, &p, received.wall_ms);
                self.submit(device, 0, ItemKind::Event(Box::new(ws)), None)
            }
            None => Metrics::inc(&self.metrics.datagrams_dropped),
        }
    }

    /// Fires the timers due at `now` (each in its own write set, which also moves its
    /// durable next due time) and returns the next due time, if any timer exists. On an
    /// unset clock (`now.boot_ms`), a firing's forwards carry the time since boot at its due
    /// time, to be re-stamped as a device event's are; a due time from an unset clock fired
    /// on a set one takes the firing's time.
    pub fn fire_timers(&mut self, now: Stamp) -> Option<u64> {
        let now_ms = now.wall_ms;
        for Firing {
            handler: h,
            due: Due { due_ms, epoch },
            next_ms,
        } in self.timers.take_due(now_ms)
        {
            // A firing's name: its due time, and its epoch once the clock was set back (a
            // due time may then come again; see `timers.rs`).
            let seq_text = match epoch {
                0 => format!("timer.{due_ms}"),
                e => format!("timer.{e}.{due_ms}"),
            };
            let no_device = self.no_device.clone();
            let boot_id = self.boot_id.clone();
            // A timer's time is its due time (the ts of its forwards and dead letters); a due
            // time the unset clock gave, fired once the clock is set, is now's.
            let ts = match now.boot_ms {
                None if !crate::clock::looks_synced(due_ms) => now_ms,
                _ => due_ms,
            };
            let ctx = Ctx {
                origin: Origin::Timer {
                    no_device: &no_device,
                },
                ts: Some(ts),
                received_ms: now_ms,
                boot: now
                    .boot_ms
                    .map(|b| (&*boot_id, b.saturating_sub(now_ms.saturating_sub(due_ms)))),
                seq_text: &seq_text,
                relay: None,
            };
            let info = self.tree.timer_info(now_ms, due_ms);
            let name = self.tree.handlers[h].name().to_string();
            let next = timer_write(&name, next_ms, epoch);
            let run = if self.disk_low() {
                None
            } else {
                self.process(&ctx, Root::Timer(h, info))
            };
            let ws = match run {
                Some(mut ws) => {
                    ws.state.push(next);
                    ws
                }
                // The outbox is full (or the disk low): this firing is skipped, the schedule
                // moves on.
                None => {
                    Metrics::inc(&self.metrics.timers_skipped);
                    tracing::warn!(
                        handler = name,
                        "timer skipped: the outbox is full or the disk low"
                    );
                    WriteSet {
                        state: vec![next],
                        ..WriteSet::default()
                    }
                }
            };
            self.submit(&no_device, 0, ItemKind::Event(Box::new(ws)), None);
        }
        self.timers.next_due()
    }

    /// The next due time of any timer (`None`: no handler has a timer).
    pub fn next_timer(&self) -> Option<u64> {
        self.timers.next_due()
    }

    /// The shortest timer period: the longest a timer loop may sleep without a look at the
    /// clock (which may have been set back).
    pub fn shortest_timer_period(&self) -> Option<u64> {
        self.timers.shortest_period()
    }

    /// A datagram dropped before it reached [`Dispatcher::datagram`] (its session superseded,
    /// or the gateway stopping).
    pub fn datagram_dropped(&self) {
        Metrics::inc(&self.metrics.datagrams_dropped);
    }

    /// Grows the event's (or timer's) tree and applies outbox admission. `None` when the
    /// outbox cannot take its forwards: nothing of it is kept. A kept tree is counted toward
    /// quarantine, its state writes go into the overlay under a new tag, and its write set is
    /// returned for the committer.
    fn process(&mut self, ctx: &Ctx<'_>, root: Root<'_>) -> Option<WriteSet> {
        let Grown {
            mut ws,
            mut written,
            deltas,
            verdicts,
        } = self.tree.grow(ctx, root);
        match self.outbox.admit(&mut ws.outbox) {
            // Nothing of the event is kept (it is answered busy): nothing counts either.
            Admission::Full => {
                self.tree.undo(&deltas);
                return None;
            }
            Admission::TooLarge(need) => {
                // Busy would never clear. The event is kept as a dead letter alone: its forwards
                // and state writes go (state that says "sent" with nothing sent would be a lie).
                self.tree.undo(&deltas);
                written.clear();
                ws.outbox.clear();
                let reason = format!(
                    "{} ({need} bytes of forwards exceed outbox.max_bytes)",
                    Limit::Outbox
                );
                let (topic, payload) = match root {
                    Root::Event(t, p) => (t, p),
                    Root::Timer(..) => ("", &[][..]),
                };
                ws.dead.push(dead_letter(ctx, "", topic, payload, reason));
            }
            Admission::DroppedBulk(n) => Metrics::add(&self.metrics.bulk_dropped, n as u64),
            Admission::Admitted => {}
        }
        self.tree
            .count(ctx.who(), ctx.received_ms, verdicts, &mut ws);
        Metrics::add(&self.metrics.dead_letters, ws.dead.len() as u64);
        Metrics::add(&self.metrics.forwards, ws.outbox.len() as u64);
        self.tag += 1;
        ws.tag = self.tag;
        for (k, v) in written {
            self.store.overlay().put(k.clone(), v.clone(), ws.tag);
            ws.state.push((k, v));
        }
        Some(ws)
    }
}

/// A relayed event's origin: its id, device and class, as the lower tier sent them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Relayed<'a> {
    id: &'a str,
    src: &'a str,
    class: Class,
}

/// The longest origin id a tier may relay.
const MAX_RELAYED_ID: usize = 512;

/// A tier's publish's origin keys: `Ok(None)` when it has no `id` (an event of the tier's own),
/// an error (nacked `bad_frame`) when they are malformed.
fn relayed(p: &Publish) -> Result<Option<Relayed<'_>>, String> {
    let Some(id) = p.id.as_deref() else {
        return Ok(None);
    };
    if id.is_empty() || id.len() > MAX_RELAYED_ID || id.chars().any(char::is_control) {
        return Err(format!(
            "a tier's `id` must be 1 to {MAX_RELAYED_ID} bytes without control characters"
        ));
    }
    // Empty for a timer's forward (it has no device).
    let src = p.src.as_deref().unwrap_or_default();
    if !src.is_empty() && !topic::valid_device_id(src) {
        return Err(format!(
            "a tier's `src` must be the origin's device id ([A-Za-z0-9._-]{{1,64}}) or empty, not `{}`",
            src.escape_debug()
        ));
    }
    let class = match p.class.as_deref() {
        Some("urgent") => Class::Urgent,
        Some("normal") => Class::Normal,
        Some("bulk") => Class::Bulk,
        other => {
            return Err(format!(
                "a tier's `class` must be urgent, normal or bulk, not {other:?}"
            ))
        }
    };
    Ok(Some(Relayed { id, src, class }))
}

/// The write that stores `handler`'s next due time (and its schedule's epoch).
fn timer_write(handler: &str, due_ms: u64, epoch: u64) -> (Vec<u8>, Option<Vec<u8>>) {
    (keys::timer(handler), Some(keys::timer_value(due_ms, epoch)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{HostEnv, Manifest, Runtime};
    use crate::store::Store;
    use bytes::Bytes;
    use std::sync::atomic::Ordering;

    const COUNTER: &str = include_str!("../../../tests/handlers/counter.wat");

    /// A dispatcher with one handler over a real sled store in a temp dir; nothing commits.
    struct Setup {
        dispatcher: Dispatcher,
        rx: std::sync::mpsc::Receiver<Item>,
        metrics: Arc<Metrics>,
        store: Store,
        _dir: tempfile::TempDir,
    }

    impl Setup {
        fn new(wat: &str, manifest: &str) -> Setup {
            Setup::with(Config::defaults(), &[(wat, manifest)])
        }

        /// A dispatcher on `cfg` with these handlers (WAT, manifest TOML), in this order.
        fn with(cfg: Config, handlers: &[(&str, &str)]) -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
            let outbox = Arc::new(Outbox::load(&store, &cfg.outbox, 0).unwrap().0);
            let state = Arc::new(EventState::new(Arc::new(store.clone())));
            let env = HostEnv {
                max_payload_bytes: 1024,
                ..HostEnv::new(&cfg, state.clone())
            };
            let handlers = handlers
                .iter()
                .map(|(wat, manifest)| {
                    let manifest: Manifest = toml::from_str(manifest).unwrap();
                    let wasm = wat::parse_str(wat).unwrap();
                    let rt = Runtime::default();
                    Handler::load(&rt, &wasm, manifest, &Default::default(), env.clone(), 0)
                        .unwrap()
                })
                .collect();
            let (tx, rx) = std::sync::mpsc::sync_channel(64);
            let metrics = Arc::new(Metrics::default());
            let dispatcher = Dispatcher::new(
                &cfg,
                handlers,
                Arc::new(store.clone()),
                state,
                outbox,
                tx,
                metrics.clone(),
                0,
            )
            .unwrap();
            Setup {
                dispatcher,
                rx,
                metrics,
                store,
                _dir: dir,
            }
        }
    }

    /// A handler with a timer that does nothing.
    const TICKER: &str = r#"(module (memory (export "memory") 1)
      (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32) (i32.const 0))
      (func (export "tp_on_timer") (param i64) (result i32) (i32.const 0)))"#;

    fn handler(wat: &str, manifest: &str, store: &Store) -> Handler {
        let manifest: Manifest = toml::from_str(manifest).unwrap();
        let wasm = wat::parse_str(wat).unwrap();
        let state = Arc::new(EventState::new(Arc::new(store.clone())));
        let env = HostEnv::new(&Config::defaults(), state);
        Handler::load(
            &Runtime::default(),
            &wasm,
            manifest,
            &Default::default(),
            env,
            0,
        )
        .unwrap()
    }

    /// A new version takes the running one's place: the same index, its timer's next due time
    /// as it runs (the firing that set it may not be committed: the store may hold the one
    /// before, which would fire again at once, or none), its state count (pending writes
    /// included).
    #[test]
    fn an_installed_version_keeps_the_timer_phase_and_the_state_count_of_the_one_it_replaces() {
        let manifest = |v: u64| {
            format!(
                "name = \"tick\"\nversion = {v}\nsubscribe = [\"devices/#\"]\ntimer_ms = 1000\n"
            )
        };
        let t = Setup::with(Config::defaults(), &[(TICKER, &manifest(1))]);
        let mut d = t.dispatcher;
        let first = d.next_timer().unwrap();
        // It fires; nothing commits here, so the store holds neither due time (read from it,
        // the new version would start a period from its install instead).
        assert_eq!(d.fire_timers(Stamp::set(first)), Some(first + 1000));
        assert_eq!(t.store.timer_due("tick").unwrap(), None);
        d.tree.handlers[0].state_used = 4242;
        let h = handler(TICKER, &manifest(2), &t.store);
        assert_eq!(d.install(h, first + 10).unwrap(), Some(1));
        assert_eq!(d.tree.handlers.len(), 1);
        assert_eq!(d.tree.handlers[0].manifest.version, 2);
        assert_eq!(d.next_timer(), Some(first + 1000), "not the stale {first}");
        assert_eq!(d.tree.handlers[0].state_used, 4242);
        // Another name goes beside it, with its own timer.
        let other = handler(
            TICKER,
            "name = \"other\"\nversion = 1\nsubscribe = [\"x/#\"]\ntimer_ms = 500\n",
            &t.store,
        );
        assert_eq!(d.install(other, first + 10).unwrap(), None);
        assert_eq!(d.tree.handlers.len(), 2);
        assert_eq!(d.next_timer(), Some(first + 510));
    }

    /// A removal takes the handler out at once (the handlers after it keep their timers, one
    /// place down) and deletes its state after the writes still pending for it: a durable key,
    /// a pending one (read as deleted from then on), its timer and its quarantine.
    #[test]
    fn a_removed_handler_takes_its_durable_and_pending_state_and_the_rest_keep_their_timers() {
        let counter = "name = \"counter\"\nversion = 1\nsubscribe = [\"devices/#\"]\n";
        let tick = "name = \"tick\"\nversion = 1\nsubscribe = [\"x/#\"]\ntimer_ms = 1000\n";
        let t = Setup::with(Config::defaults(), &[(COUNTER, counter), (TICKER, tick)]);
        let (mut d, rx, store) = (t.dispatcher, t.rx, t.store);
        store
            .put_state("counter", &[(b"old".to_vec(), Some(b"durable".to_vec()))])
            .unwrap();
        let (reply, _answers) = tokio::sync::mpsc::unbounded_channel();
        d.publish(&"d".into(), publish(1), Stamp::set(0), &reply)
            .unwrap();
        let due = d.next_timer().unwrap();
        rx.try_iter().for_each(drop);

        assert_eq!(d.remove("counter").unwrap(), Some(1));
        assert_eq!(d.tree.handlers.len(), 1);
        assert_eq!(
            d.remove("counter").unwrap(),
            None,
            "nothing runs: leftovers only"
        );
        let deletes: Vec<Vec<u8>> = rx
            .try_iter()
            .take(1)
            .flat_map(|i| match i.kind {
                ItemKind::Event(ws) => ws.state.into_iter().map(|(k, v)| {
                    assert_eq!(v, None);
                    k
                }),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            deletes,
            vec![
                keys::state("counter", b"n"),
                keys::state("counter", b"old"),
                keys::timer("counter"),
                keys::quarantine("counter"),
            ]
        );
        assert_eq!(StateSource::get(&store, "counter", b"n"), None);
        // The ticker, now first, still fires on time.
        assert_eq!(d.fire_timers(Stamp::set(due)), Some(due + 1000));
        assert_eq!(d.metrics.timer_calls.load(Ordering::Relaxed), 1);
    }

    /// A handler whose timer forwards `t` on topic `tick` (class normal).
    const FORWARDING_TICKER: &str = r#"(module
      (import "tidepool" "forward" (func $fwd (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "tick")
      (data (i32.const 8) "t")
      (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32) (i32.const 0))
      (func (export "tp_on_timer") (param i64) (result i32)
        (call $fwd (i32.const 0) (i32.const 4) (i32.const 8) (i32.const 1) (i32.const 1))))"#;

    /// A timer firing on an unset clock: its forward carries this boot's id and the time
    /// since boot at its due time (a late firing counts back to it), to be re-stamped; on a
    /// set clock, none.
    #[test]
    fn a_timer_forward_on_an_unset_clock_carries_the_boot_time_of_its_due_time() {
        let tick = "name = \"tick\"\nversion = 1\nsubscribe = [\"x/#\"]\ntimer_ms = 1000\n";
        let t = Setup::with(Config::defaults(), &[(FORWARDING_TICKER, tick)]);
        let (mut d, rx) = (t.dispatcher, t.rx);
        rx.try_iter().for_each(drop);
        let due = d.next_timer().unwrap();
        let entries = |rx: &std::sync::mpsc::Receiver<Item>| -> Vec<crate::outbox::Entry> {
            rx.try_iter()
                .flat_map(|i| match i.kind {
                    ItemKind::Event(ws) => ws.outbox,
                    _ => Vec::new(),
                })
                .map(|w| crate::outbox::Entry::decode(&w.entry).unwrap())
                .collect()
        };
        // Fired 300 ms late, 50,000 ms after boot.
        let late = Stamp {
            wall_ms: due + 300,
            boot_ms: Some(50_000),
        };
        d.fire_timers(late);
        let e = entries(&rx);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].ts, due, "a timer's time is its due time");
        let boot = e[0].boot.as_ref().expect("marked");
        assert_eq!((boot.mono_ms, boot.restamped), (49_700, false));
        assert_eq!(&*boot.boot_id, &*crate::clock::boot_id());
        // The clock set (the due time came from the unset clock): no mark, and the firing's
        // time, not 1970's.
        let set = 1_800_000_000_000;
        d.fire_timers(Stamp::set(set));
        let e = entries(&rx);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].ts, &e[0].boot), (set, &None));
    }

    /// An unload takes the handler and its timer out and deletes nothing: no write goes to the
    /// committer, and its state reads as before.
    #[test]
    fn an_unloaded_handler_leaves_its_state_and_the_others_keep_their_timers() {
        let counter = "name = \"counter\"\nversion = 1\nsubscribe = [\"devices/#\"]\n";
        let tick = "name = \"tick\"\nversion = 1\nsubscribe = [\"x/#\"]\ntimer_ms = 1000\n";
        let t = Setup::with(Config::defaults(), &[(COUNTER, counter), (TICKER, tick)]);
        let (mut d, rx, store) = (t.dispatcher, t.rx, t.store);
        store
            .put_state("counter", &[(b"n".to_vec(), Some(b"kept".to_vec()))])
            .unwrap();
        let due = d.next_timer().unwrap();
        rx.try_iter().for_each(drop);
        assert_eq!(d.unload("counter"), Some(1));
        assert_eq!(d.unload("counter"), None, "nothing runs");
        assert_eq!(rx.try_iter().count(), 0, "nothing written");
        assert_eq!(
            StateSource::get(&store, "counter", b"n"),
            Some(b"kept".to_vec())
        );
        assert_eq!(d.tree.handlers.len(), 1);
        assert_eq!(d.fire_timers(Stamp::set(due)), Some(due + 1000));
    }

    fn publish(seq: u64) -> Publish {
        Publish {
            seq,
            topic: "devices/d/x".into(),
            payload: Bytes::from_static(b"1"),
            ts: None,
            id: None,
            src: None,
            class: None,
        }
    }

    #[test]
    fn a_resend_of_an_event_still_in_flight_is_not_run_again_and_reads_see_pending_writes() {
        let t = Setup::new(
            COUNTER,
            "name = \"counter\"\nversion = 1\nsubscribe = [\"devices/#\"]\n",
        );
        let (mut d, rx, metrics, store) = (t.dispatcher, t.rx, t.metrics, t.store);
        let (reply, _answers) = tokio::sync::mpsc::unbounded_channel();
        let dev: Arc<str> = "d".into();
        // Nothing is committed in this test: every item stays "in flight".
        assert_eq!(
            d.publish(&dev, publish(1), Stamp::set(0), &reply).unwrap(),
            Submitted::Queued
        );
        assert_eq!(
            d.publish(&dev, publish(2), Stamp::set(0), &reply).unwrap(),
            Submitted::Queued
        );
        // The same seqs again, as from a new connection, while the originals are in flight.
        assert_eq!(
            d.publish(&dev, publish(2), Stamp::set(0), &reply).unwrap(),
            Submitted::Queued
        );
        assert_eq!(
            d.publish(&dev, publish(1), Stamp::set(0), &reply).unwrap(),
            Submitted::Queued
        );
        assert_eq!(
            metrics.handler_calls.load(Ordering::Relaxed),
            2,
            "resends must not run the handler"
        );
        let kinds: Vec<(u64, &'static str)> = rx
            .try_iter()
            .map(|i| {
                let k = match &i.kind {
                    ItemKind::Event(ws) => {
                        // The second event read the first one's pending write: n = 2.
                        if i.seq == 2 {
                            assert_eq!(
                                ws.state,
                                vec![(
                                    keys::state("counter", b"n"),
                                    Some(2u64.to_le_bytes().to_vec())
                                )]
                            );
                        }
                        "event"
                    }
                    ItemKind::Resend => "resend",
                    _ => "other",
                };
                (i.seq, k)
            })
            .collect();
        assert_eq!(
            kinds,
            vec![(1, "event"), (2, "event"), (2, "resend"), (1, "resend")]
        );
        // Nothing reached sled.
        assert_eq!(store.hwm("d").unwrap(), 0);
        assert_eq!(store.state_durable("counter", b"n").unwrap(), None);
    }

    #[test]
    fn one_device_event_cannot_fan_out_past_the_emit_budget() {
        // Each invocation emits 4 events to a topic it subscribes to itself.
        let wat = r#"(module
          (import "tidepool" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "devices/d/x")
          (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
          (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
            (drop (call $emit (i32.const 0) (i32.const 11) (i32.const 0) (i32.const 0)))
            (drop (call $emit (i32.const 0) (i32.const 11) (i32.const 0) (i32.const 0)))
            (drop (call $emit (i32.const 0) (i32.const 11) (i32.const 0) (i32.const 0)))
            (drop (call $emit (i32.const 0) (i32.const 11) (i32.const 0) (i32.const 0)))
            (i32.const 0)))"#;
        let manifest = "name = \"fan\"\nversion = 1\nsubscribe = [\"devices/#\"]\n[limits]\nemits_per_event = 4\n";
        let t = Setup::new(wat, manifest);
        let (mut d, rx, metrics) = (t.dispatcher, t.rx, t.metrics);
        let cfg = Config::defaults();
        let (reply, _answers) = tokio::sync::mpsc::unbounded_channel();
        assert_eq!(
            d.publish(&"d".into(), publish(1), Stamp::set(0), &reply)
                .unwrap(),
            Submitted::Queued
        );
        // The box allows 16 emits per device event in all: the root and 16 emitted events run;
        // without the budget this tree would be 1 + 4 + 16 + 64 + 256 invocations.
        assert_eq!(cfg.limits.emits_per_event, 16);
        assert_eq!(metrics.handler_calls.load(Ordering::Relaxed), 17);
        let Ok(Item {
            kind: ItemKind::Event(ws),
            ..
        }) = rx.try_recv()
        else {
            panic!("one event item")
        };
        assert_eq!(
            ws.dead.len(),
            13,
            "the invocations that hit the budget are dead-lettered"
        );
    }

    #[test]
    fn the_log_cap_holds_for_a_device_event_and_everything_it_emits() {
        // Logs 3000 bytes, then emits to a topic it subscribes to itself: 4 invocations.
        let wat = r#"(module
          (import "tidepool" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
          (import "tidepool" "log" (func $log (param i32 i32 i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "devices/d/x")
          (func (export "tp_alloc") (param i32) (result i32) (i32.const 4096))
          (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
            (call $log (i32.const 4) (i32.const 100) (i32.const 3000))
            (drop (call $emit (i32.const 0) (i32.const 11) (i32.const 0) (i32.const 0)))
            (i32.const 0)))"#;
        let mut cfg = Config::defaults();
        cfg.limits.emits_per_event = 3;
        let manifest = "name = \"chatty\"\nversion = 1\nsubscribe = [\"devices/#\"]\n[limits]\nemits_per_event = 1\n";
        let t = Setup::with(cfg.clone(), &[(wat, manifest)]);
        let (mut d, metrics) = (t.dispatcher, t.metrics);
        let (reply, _answers) = tokio::sync::mpsc::unbounded_channel();
        d.publish(&"d".into(), publish(1), Stamp::set(0), &reply)
            .unwrap();
        let calls = metrics.handler_calls.load(Ordering::Relaxed);
        assert_eq!(calls, 4, "the root and 3 emitted events");
        // A cap per invocation would drop 4 x (3000 - 4096 clipped to 0) = nothing.
        assert_eq!(
            metrics.log_bytes_dropped.load(Ordering::Relaxed),
            calls * 3000 - cfg.limits.log_bytes_per_event as u64
        );
    }

    #[test]
    fn an_event_answered_busy_counts_nothing_toward_quarantine() {
        // One handler forwards 200 bytes; the other traps. The outbox holds two events' forwards.
        let forwarder = r#"(module
          (import "tidepool" "forward" (func $fwd (param i32 i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "up/x")
          (func (export "tp_alloc") (param i32) (result i32) (i32.const 4096))
          (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
            (call $fwd (i32.const 0) (i32.const 4) (i32.const 100) (i32.const 200) (i32.const 1))))"#;
        let trapper = r#"(module
          (memory (export "memory") 1)
          (func (export "tp_alloc") (param i32) (result i32) (i32.const 4096))
          (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32) unreachable))"#;
        let mut cfg = Config::defaults();
        cfg.outbox.max_bytes = 700;
        cfg.limits.quarantine_after_errors = 3;
        let m = |n: &str| format!("name = \"{n}\"\nversion = 1\nsubscribe = [\"devices/#\"]\n");
        let (mf, mt) = (m("fwd"), m("trap"));
        let t = Setup::with(cfg, &[(forwarder, &mf), (trapper, &mt)]);
        let (mut d, metrics) = (t.dispatcher, t.metrics);
        let (reply, _answers) = tokio::sync::mpsc::unbounded_channel();
        let dev: Arc<str> = "d".into();
        let kept: Vec<Submitted> = (1..=6)
            .map(|s| d.publish(&dev, publish(s), Stamp::set(0), &reply).unwrap())
            .collect();
        // Nothing commits here, so the outbox stays full after the first two events.
        assert_eq!(kept[..2], [Submitted::Queued, Submitted::Queued]);
        assert!(kept[2..].iter().all(|k| *k == Submitted::Busy), "{kept:?}");
        assert_eq!(metrics.handler_errors.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.dead_letters.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.handlers_quarantined.load(Ordering::Relaxed), 0);
        assert_eq!(
            d.handler_status()[1].errors_in_row,
            2,
            "busy events do not count"
        );
    }

    #[test]
    fn after_a_busy_answer_no_later_seq_is_kept_until_the_device_resends_from_it() {
        // Forwards each event's payload; the outbox holds one 900-byte forward and a few small ones.
        let echo = r#"(module
          (import "tidepool" "forward" (func $fwd (param i32 i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "up/x")
          (func (export "tp_alloc") (param i32) (result i32) (i32.const 4096))
          (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
            (call $fwd (i32.const 0) (i32.const 4) (local.get 2) (local.get 3) (i32.const 1))))"#;
        let mut cfg = Config::defaults();
        cfg.outbox.max_bytes = 1600;
        let manifest = "name = \"echo\"\nversion = 1\nsubscribe = [\"devices/#\"]\n";
        let t = Setup::with(cfg, &[(echo, manifest)]);
        let mut d = t.dispatcher;
        let (reply, _answers) = tokio::sync::mpsc::unbounded_channel();
        let dev: Arc<str> = "d".into();
        let sized = |seq, n| Publish {
            payload: Bytes::from(vec![b'x'; n]),
            ..publish(seq)
        };
        // As the dispatcher thread takes a step: a busy publish is answered busy.
        let step = |d: &mut Dispatcher, p: Publish| {
            let seq = p.seq;
            let r = d.publish(&dev, p, Stamp::set(0), &reply).unwrap();
            if r == Submitted::Busy {
                d.busy(&dev, seq, None, &reply).unwrap();
            }
            r
        };
        assert_eq!(step(&mut d, sized(1, 900)), Submitted::Queued);
        assert_eq!(step(&mut d, sized(2, 900)), Submitted::Busy);
        // Seq 3 would fit, and came on another stream before the device read the busy: kept,
        // its ack would cover seq 2, which never ran.
        assert_eq!(step(&mut d, sized(3, 1)), Submitted::Busy);
        // Nor nacked (a nack moves the mark as well).
        let refused = Publish {
            topic: "elsewhere/x".into(),
            ..publish(4)
        };
        assert_eq!(step(&mut d, refused), Submitted::Busy);
        // The device resends from 2: judged again (still no room), and a smaller 2 is kept.
        assert_eq!(step(&mut d, sized(2, 900)), Submitted::Busy);
        assert_eq!(step(&mut d, sized(2, 1)), Submitted::Queued);
        assert_eq!(step(&mut d, sized(3, 1)), Submitted::Queued);
        // A busy for a taken publishing slot sets the floor too, and a lower seq (from the
        // stream that held the slot) neither clears it nor is held back by it.
        d.busy(&dev, 6, None, &reply).unwrap();
        assert_eq!(step(&mut d, sized(4, 1)), Submitted::Queued);
        assert_eq!(step(&mut d, sized(9, 1)), Submitted::Busy);
        assert_eq!(step(&mut d, sized(6, 1)), Submitted::Queued);
        assert_eq!(step(&mut d, sized(7, 1)), Submitted::Queued);
    }

    #[test]
    fn a_tiers_origin_keys_are_checked_before_they_are_kept() {
        let with = |id: Option<&str>, src: Option<&str>, class: Option<&str>| Publish {
            id: id.map(Into::into),
            src: src.map(Into::into),
            class: class.map(Into::into),
            ..publish(1)
        };
        assert_eq!(
            relayed(&publish(1)),
            Ok(None),
            "no id: the tier's own event"
        );
        // A timer's forward has no device.
        for src in [None, Some("")] {
            let timer = with(Some("edge::timer.5:h:0"), src, Some("normal"));
            assert_eq!(relayed(&timer).map(|r| r.map(|r| r.src)), Ok(Some("")));
        }
        let p = with(Some("edge:d1:7:h:0"), Some("d1"), Some("urgent"));
        assert_eq!(
            relayed(&p),
            Ok(Some(Relayed {
                id: "edge:d1:7:h:0",
                src: "d1",
                class: Class::Urgent
            }))
        );
        for bad in [
            with(Some(""), Some("d1"), Some("normal")),
            with(Some("a\nb"), Some("d1"), Some("normal")),
            with(
                Some(&"i".repeat(MAX_RELAYED_ID + 1)),
                Some("d1"),
                Some("normal"),
            ),
            with(Some("x"), Some("a/b"), Some("normal")),
            with(Some("x"), Some("d1"), None),
            with(Some("x"), Some("d1"), Some("loud")),
        ] {
            assert!(relayed(&bad).is_err(), "{bad:?}");
        }
    }
}
