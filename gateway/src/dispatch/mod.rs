//! The dispatcher: one event at a time, in the order the committer will see them. It checks a
//! publish against the high-water mark (resend), the topic rules and the ACL, runs the
//! subscribed handlers (and what they emit) outside any store transaction, applies outbox
//! admission, and submits the event's write set to the committer. Everything here is
//! synchronous and free of network I/O; it runs on its own thread (`thread.rs`), which owns it.

pub mod thread;

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::{Config, Unrouted};
use crate::jsonl::Line;
use crate::metrics::Metrics;
use crate::os::disk::DiskWatch;
use crate::outbox::{entry_id, Admission, Entry, Outbox};
use crate::pipeline::Class;
use crate::pipeline::{Item, ItemKind, OutboxWrite, Reply, WriteSet};
use crate::proto::msg::{NackCode, Publish};
use crate::proto::topic;
use crate::record::{Offer, RecordTap};
use crate::router::Router;
use crate::sandbox::quarantine::{self, Change, Quarantine};
use crate::sandbox::share::Policy;
use crate::sandbox::{EventInfo, FailureKind, Handler, Limit, Outcome, StateSource, TimerInfo};
use crate::store::commit::Backlog;
use crate::store::{fatal, keys, DeadLetter, Overlay, StoreError};
use crate::timers::{Due, Firing, Timers};

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Queued for the committer; its ack (or nack) follows the flush.
    Queued,
    /// Not kept: answer `busy` and stop reading the stream.
    Busy,
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
    /// State writes submitted and not yet durable; [`StateSource::get`] reads them first.
    fn overlay(&self) -> &Overlay;
}

/// State reads for handlers: this event's own writes, then the overlay of pending groups,
/// then what is durable.
pub struct EventState {
    store: Arc<dyn StateSource>,
    current: Mutex<HashMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl EventState {
    pub fn new(store: Arc<dyn StateSource>) -> Self {
        EventState {
            store,
            current: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Option<Vec<u8>>>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StateSource for EventState {
    fn get(&self, handler: &str, key: &[u8]) -> Option<Vec<u8>> {
        let full = keys::state(handler, key);
        if let Some(v) = self.lock().get(&full) {
            return v.clone();
        }
        self.store.get(handler, key)
    }
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
}

pub struct Dispatcher {
    gateway: Arc<str>,
    handlers: Vec<Handler>,
    router: Router,
    acl: Vec<String>,
    /// Devices whose `id`, `src` and `class` keys are kept (lower Tidepool tiers).
    tiers: Vec<String>,
    max_payload: usize,
    unrouted: Unrouted,
    unrouted_class: Class,
    busy_retry_ms: u64,
    /// Items waiting for the committer beyond which datagrams are shed.
    datagram_shed_backlog: usize,
    /// Emits allowed for one device event's whole tree (the box's `emits_per_event` cap).
    emit_budget: u32,
    /// Log bytes each handler may write per device event, and what each wrote so far.
    log_cap: usize,
    log_used: Vec<usize>,
    quarantine_after: u32,
    quarantine_devices: usize,
    quarantine_hold_ms: u64,
    timers: Timers,
    recorder: Option<RecordTap>,
    disk: Option<Arc<DiskWatch>>,
    claimed: HashMap<Arc<str>, u64>,
    /// The empty device of a timer's tree, as stored formats name it.
    no_device: Arc<str>,
    /// Whether other input is queued behind what runs now (the dispatcher thread tells): with
    /// two handlers or more active, it makes the fair CPU share hold.
    work_waiting: bool,
    /// Devices answered busy at a seq they have not resent yet (see [`Dispatcher::publish`]).
    busy_floor: HashMap<Arc<str>, u64>,
    store: Arc<dyn Durable>,
    state: Arc<EventState>,
    outbox: Arc<Outbox>,
    tx: Option<SyncSender<Item>>,
    /// Items submitted and not yet committed.
    pub backlog: Arc<Backlog>,
    tag: u64,
    datagrams: u64,
    /// Random per start: datagram entry ids stay unique across restarts, even without a clock.
    boot_nonce: u64,
    metrics: Arc<Metrics>,
    route_buf: Vec<usize>,
}

impl Dispatcher {
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
    ) -> Self {
        let router = Router::new(handlers.iter().map(|h| h.manifest.subscribe.as_slice()));
        let n_handlers = handlers.len();
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
            // A quarantine outlives a restart (its probation still ends it).
            match store.quarantine(h.name()) {
                Ok(None) => {}
                Ok(Some(v)) => match Quarantine::decode(&v) {
                    Some(q) if q.version != h.manifest.version => tracing::info!(
                        handler = h.name(),
                        held_for = q.version,
                        "a new version of the handler: its quarantine is lifted"
                    ),
                    Some(mut q) => {
                        q.clamp(now);
                        if q.all() || q.devices().next().is_some() {
                            tracing::warn!(handler = h.name(), "handler still quarantined from before the restart (it runs again after its probation)");
                        }
                        h.quarantine = q;
                    }
                    None => tracing::warn!(
                        handler = h.name(),
                        "its stored quarantine does not decode: starting without one"
                    ),
                },
                Err(e) => fatal("reading a quarantine", e),
            }
        }
        for (i, h) in handlers.iter().enumerate() {
            if let Some(period) = h.manifest.timer_ms {
                let stored = match store.timer_due(h.name()) {
                    Ok(d) => d,
                    Err(e) => fatal("reading a timer", e),
                };
                if let Some(due) = timers.add(i, period, stored, now) {
                    schedule
                        .state
                        .push(timer_write(h.name(), due.due_ms, due.epoch));
                }
            }
        }
        let mut d = Dispatcher {
            gateway: cfg.gateway.id.as_str().into(),
            handlers,
            router,
            acl: cfg.acl.publish.clone(),
            tiers: cfg.acl.tiers.clone(),
            max_payload: cfg.ingress.max_payload_bytes,
            unrouted: cfg.router.unrouted,
            unrouted_class: cfg.router.unrouted_class,
            busy_retry_ms: cfg.ingress.busy_retry_after_ms,
            datagram_shed_backlog: cfg.ingress.datagram_shed_backlog,
            emit_budget: cfg.limits.emits_per_event,
            log_cap: cfg.limits.log_bytes_per_event,
            log_used: vec![0; n_handlers],
            quarantine_after: cfg.limits.quarantine_after_errors,
            quarantine_devices: cfg.limits.quarantine_devices,
            quarantine_hold_ms: cfg.limits.quarantine_hold_ms,
            timers,
            recorder: None,
            disk: None,
            claimed: HashMap::new(),
            no_device: "".into(),
            busy_floor: HashMap::new(),
            work_waiting: false,
            store,
            state,
            outbox,
            tx: Some(tx),
            backlog: Arc::new(Backlog::new(cfg.store.commit_queue_bytes)),
            tag: 0,
            datagrams: 0,
            boot_nonce: fastrand::u64(..),
            metrics,
            route_buf: Vec::new(),
        };
        if !schedule.state.is_empty() {
            d.submit(&"".into(), 0, ItemKind::Event(Box::new(schedule)), None);
        }
        d
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
        self.handlers
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
    fn claimed(&mut self, device: &Arc<str>) -> &mut u64 {
        let store = &self.store;
        self.claimed
            .entry(device.clone())
            .or_insert_with(|| match store.hwm(device) {
                Ok(h) => h,
                Err(e) => fatal("reading a high-water mark", e),
            })
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
    ) {
        Metrics::inc(&self.metrics.nacks);
        if code.moves_mark() {
            let c = self.claimed(device);
            *c = (*c).max(seq);
        }
        self.submit(device, seq, ItemKind::Nack { code, reason }, Some(reply));
    }

    /// Whether work is waiting behind what runs next (the dispatcher thread tells; see
    /// `sandbox/share.rs`).
    pub fn set_work_waiting(&mut self, waiting: bool) {
        self.work_waiting = waiting;
    }

    /// A new session of `device`: its busy floor is forgotten (the device starts over from
    /// its last ack, and what the old session handed over is dropped unread).
    pub fn session_started(&mut self, device: &Arc<str>) {
        self.busy_floor.remove(device);
    }

    /// Answers `busy` for `seq` once everything before it is settled.
    /// A busy answer also sets the device's busy floor at `seq` (see [`Dispatcher::publish`]),
    /// whatever the cause: a full outbox, a low disk, or another stream holding the
    /// publishing slot.
    pub fn busy(&mut self, device: &Arc<str>, seq: u64, reply: &Reply) {
        Metrics::inc(&self.metrics.busy);
        if seq > *self.claimed(device) {
            let floor = self.busy_floor.entry(device.clone()).or_insert(seq);
            *floor = (*floor).min(seq);
        }
        let retry_after_ms = self.busy_retry_ms;
        self.submit(device, seq, ItemKind::Busy { retry_after_ms }, Some(reply));
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
        received_ms: u64,
        reply: &Reply,
    ) -> Submitted {
        Metrics::inc(&self.metrics.events_in);
        if p.seq <= *self.claimed(device) {
            Metrics::inc(&self.metrics.resends);
            self.submit(device, p.seq, ItemKind::Resend, Some(reply));
            return Submitted::Queued;
        }
        // After a busy answer at seq s, nothing above s is kept (nor nacked: a nack moves the
        // mark too) until the device resends s itself: a later seq from another stream would
        // otherwise be acked, and its ack would cover the seqs that were not kept. Seqs below
        // s go on as usual (they may still be on their way from the stream that held the slot).
        match self.busy_floor.get(device) {
            Some(&floor) if p.seq > floor => return Submitted::Busy,
            Some(&floor) if p.seq == floor => {
                self.busy_floor.remove(device);
            }
            _ => {}
        }
        if let Err((code, reason)) = self.check(device, &p) {
            self.nack(device, p.seq, code, reason, reply);
            return Submitted::Queued;
        }
        if self.disk_low() {
            return Submitted::Busy;
        }
        let seq_text = p.seq.to_string();
        let relay = match self.is_tier(device) {
            true => relayed(&p).ok().flatten(),
            false => None,
        };
        let ctx = Ctx {
            origin: Origin::Publish { device, seq: p.seq },
            ts: p.ts,
            received_ms,
            seq_text: &seq_text,
            relay,
        };
        match self.process(&ctx, Root::Event(&p.topic, &p.payload)) {
            Some(ws) => {
                // Recorded once kept: an event answered busy is recorded when it is resent.
                self.recorder_sees(device, &p, received_ms);
                *self.claimed(device) = p.seq;
                self.submit(device, p.seq, ItemKind::Event(Box::new(ws)), Some(reply));
                Submitted::Queued
            }
            None => Submitted::Busy,
        }
    }

    /// A best-effort telemetry datagram: no seq, no ack, shed first under load.
    pub fn datagram(&mut self, device: &Arc<str>, p: Publish, received_ms: u64) {
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
        let ctx = Ctx {
            origin: Origin::Datagram { device },
            ts: p.ts,
            received_ms,
            seq_text: &seq_text,
            relay: None,
        };
        match self.process(&ctx, Root::Event(&p.topic, &p.payload)) {
            Some(ws) => {
                self.recorder_sees(device, &p, received_ms);
                self.submit(device, 0, ItemKind::Event(Box::new(ws)), None)
            }
            None => Metrics::inc(&self.metrics.datagrams_dropped),
        }
    }

    /// Fires the timers due at `now_ms` (each in its own write set, which also moves its
    /// durable next due time) and returns the next due time, if any timer exists.
    pub fn fire_timers(&mut self, now_ms: u64) -> Option<u64> {
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
            // A timer's time is its due time (the ts of its forwards and dead letters).
            let ctx = Ctx {
                origin: Origin::Timer {
                    no_device: &no_device,
                },
                ts: Some(due_ms),
                received_ms: now_ms,
                seq_text: &seq_text,
                relay: None,
            };
            let info = TimerInfo {
                now_ms,
                due_ms,
                emit_budget: self.emit_budget,
                log_budget: self.log_cap,
            };
            let name = self.handlers[h].name().to_string();
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

    /// Runs the event (or timer) through the handlers and what they emit. `None` when the
    /// outbox cannot take its forwards: nothing of it is kept.
    fn process(&mut self, ctx: &Ctx<'_>, root: Root<'_>) -> Option<WriteSet> {
        let mut run = Run::default();
        self.log_used.iter_mut().for_each(|u| *u = 0);
        let mut route = std::mem::take(&mut self.route_buf);
        match root {
            Root::Event(topic, payload) => {
                self.router.route(topic, &mut route);
                if route.is_empty() {
                    Metrics::inc(&self.metrics.unrouted);
                    if self.unrouted == Unrouted::Forward {
                        let r = match ctx.relay {
                            // A lower tier's event goes on as the origin sent it: its id, its
                            // device and its class.
                            Some(o) => {
                                forward_entry(o.id.into(), o.src, ctx, topic, o.class, payload)
                            }
                            None => {
                                let id = entry_id(&self.gateway, ctx.device(), ctx.seq_text, "", 0);
                                forward_entry(
                                    id,
                                    ctx.device(),
                                    ctx,
                                    topic,
                                    self.unrouted_class,
                                    payload,
                                )
                            }
                        };
                        run.ws.outbox.push(r);
                    }
                }
                let at = At {
                    topic,
                    payload,
                    depth: 0,
                    origin: 0,
                };
                for &h in &route {
                    self.invoke(ctx, h, at, &mut run);
                }
            }
            Root::Timer(h, info) => {
                if !self.handlers[h]
                    .quarantine
                    .blocks(ctx.who(), ctx.received_ms)
                {
                    match self.share_start(h) {
                        // Over its CPU share: this firing is skipped (the schedule moves on).
                        Err(OverShare) => Metrics::inc(&self.metrics.timers_skipped),
                        Ok(started) => {
                            let outcome = self.handlers[h].timer(&info);
                            self.share_end(h, started);
                            Metrics::inc(&self.metrics.timer_calls);
                            self.apply_outcome(ctx, h, At::ROOT_TIMER, outcome, &mut run);
                        }
                    }
                }
            }
        }
        while let Some((t, payload, depth, origin)) = run.queue.pop_front() {
            self.router.route(&t, &mut route);
            let at = At {
                topic: &t,
                payload: &payload,
                depth,
                origin,
            };
            for &h in &route {
                self.invoke(ctx, h, at, &mut run);
            }
        }
        self.route_buf = route;
        let Run {
            mut ws,
            deltas,
            verdicts,
            ..
        } = run;
        let mut written: Vec<(Vec<u8>, Option<Vec<u8>>)> = self.state.lock().drain().collect();
        let undo = |handlers: &mut Vec<Handler>| {
            for (h, d) in &deltas {
                let used = &mut handlers[*h].state_used;
                *used = used.saturating_add_signed(-d);
            }
        };
        match self.outbox.admit(&mut ws.outbox) {
            // Nothing of the event is kept (it is answered busy): nothing counts either.
            Admission::Full => {
                undo(&mut self.handlers);
                return None;
            }
            Admission::TooLarge(need) => {
                // Busy would never clear. The event is kept as a dead letter alone: its forwards
                // and state writes go (state that says "sent" with nothing sent would be a lie).
                undo(&mut self.handlers);
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
                self.dead_letter(ctx, "", topic, payload, reason, &mut ws);
            }
            Admission::DroppedBulk(n) => Metrics::add(&self.metrics.bulk_dropped, n as u64),
            Admission::Admitted => {}
        }
        self.count(ctx.who(), ctx.received_ms, verdicts, &mut ws);
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

    /// Counts a kept tree's invocations (all for `device`'s event, or a timer's: `""`, at
    /// `now_ms`): failures, timeouts, and the quarantines they start, extend or end. Each
    /// handler whose quarantine changed gets its new held set written with the tree.
    fn count(
        &mut self,
        device: &str,
        now_ms: u64,
        verdicts: Vec<(usize, Option<FailureKind>)>,
        ws: &mut WriteSet,
    ) {
        let settings = (
            self.quarantine_after,
            self.quarantine_devices,
            self.quarantine_hold_ms,
        );
        for (_, v) in &verdicts {
            if v.is_some() {
                Metrics::inc(&self.metrics.handler_errors);
            }
            if *v == Some(FailureKind::Timeout) {
                Metrics::inc(&self.metrics.handler_timeouts);
            }
        }
        // One verdict per handler per tree (a probation is judged once, a tree of emits
        // counts as one failure in a row).
        let mut ran: Vec<usize> = verdicts.iter().map(|(h, _)| *h).collect();
        ran.sort_unstable();
        ran.dedup();
        for h in ran {
            let v = quarantine::fold(verdicts.iter().filter(|(i, _)| *i == h).map(|(_, v)| *v));
            let version = self.handlers[h].manifest.version;
            let handler = &mut self.handlers[h];
            handler.quarantine.version = version;
            let Some(change) = handler.quarantine.observe(device, v, now_ms, settings) else {
                continue;
            };
            let name = handler.name().to_string();
            let (after, spread) = (settings.0, settings.1);
            match change {
                Change::Device { device, n, .. } => {
                    Metrics::inc(&self.metrics.handler_device_quarantines);
                    tracing::error!(
                        handler = name,
                        device,
                        devices = n,
                        hold_ms = settings.2,
                        "handler quarantined for one device: its events trapped the handler or hit a limit {after} times in a row; that device's events go to the dead letters until a probation succeeds, the other devices keep the handler"
                    );
                }
                Change::All { .. } => {
                    Metrics::inc(&self.metrics.handlers_quarantined);
                    tracing::error!(
                        handler = name,
                        devices = spread,
                        hold_ms = settings.2,
                        "handler quarantined: {after} failures in a row from {spread} devices or more; its events go to the dead letters until a probation succeeds"
                    );
                }
                Change::Extended { device, until_ms } => tracing::warn!(
                    handler = name,
                    device,
                    until_ms,
                    "quarantined handler failed its probation: held again, twice as long"
                ),
                Change::Released { device } => tracing::info!(
                    handler = name,
                    device = device.as_deref().unwrap_or("every device"),
                    "quarantined handler passed its probation: it runs again"
                ),
            }
            let q = handler.quarantine.encode();
            ws.state.push((keys::quarantine(&name), Some(q)));
        }
    }

    /// One handler on one (device or emitted) event; a quarantined handler does not run.
    fn invoke(&mut self, ctx: &Ctx<'_>, h: usize, at: At<'_>, run: &mut Run) {
        let q = &self.handlers[h].quarantine;
        if q.blocks(ctx.who(), ctx.received_ms) {
            let name = self.handlers[h].name().to_string();
            let reason = if q.all() {
                format!(
                    "quarantined: {} failures in a row from {} devices or more",
                    self.quarantine_after, self.quarantine_devices
                )
            } else {
                match q.in_row(ctx.who()) {
                    // Held from before a restart: the count is not kept.
                    0 => format!("quarantined for device `{}`", ctx.who()),
                    n => format!(
                        "quarantined for device `{}`: {n} failures in a row",
                        ctx.who()
                    ),
                }
            };
            self.dead_letter(ctx, &name, at.topic, at.payload, reason, &mut run.ws);
            return;
        }
        let ev = EventInfo {
            device: ctx.origin.device_arc(),
            seq: ctx.origin.seq(),
            ts: ctx.ts,
            received_ms: ctx.received_ms,
            topic: at.topic,
            payload: at.payload,
            depth: at.depth,
            emit_budget: self.emit_budget.saturating_sub(run.emitted as u32),
            log_budget: self.log_cap.saturating_sub(self.log_used[h]),
        };
        let Ok(started) = self.share_start(h) else {
            // Over its share of the wall clock: not run, and not a failure of its own (no
            // quarantine); the clock refills it.
            let handler = &self.handlers[h];
            let name = handler.name().to_string();
            let reason = match (handler.share.kind(), handler.share.percent()) {
                ("fair", 0) => format!(
                    "{} (the handler ran more than its fair share of the time while input was waiting and other handlers ran)",
                    Limit::CpuShare
                ),
                ("fair", p) => format!(
                    "{} (the handler ran more than {p}% of the time, or its fair share)",
                    Limit::CpuShare
                ),
                (_, p) => format!(
                    "{} (the handler ran more than {p}% of the time)",
                    Limit::CpuShare
                ),
            };
            self.dead_letter(ctx, &name, at.topic, at.payload, reason, &mut run.ws);
            return;
        };
        let outcome = self.handlers[h].invoke(&ev);
        self.share_end(h, started);
        Metrics::inc(&self.metrics.handler_calls);
        self.apply_outcome(ctx, h, at, outcome, run);
    }

    /// Handler `h`'s CPU share as a run starts: over it (a refusal, counted), or the clock
    /// reading to charge the run from (`None` for a handler whose share is off: no clock read).
    fn share_start(&mut self, h: usize) -> Result<Option<Instant>, OverShare> {
        if self.handlers[h].share.policy() == Policy::Off {
            return Ok(None);
        }
        let now = Instant::now();
        // Handlers that ran within the last second, this one included: counted only when input
        // is queued, the one case where the fair share looks at them.
        let waiting = self.work_waiting;
        let active = match waiting {
            true => {
                1 + self
                    .handlers
                    .iter()
                    .enumerate()
                    .filter(|(i, o)| *i != h && o.share.is_active(now))
                    .count()
            }
            false => 1,
        };
        let handler = &mut self.handlers[h];
        if handler.share.admit(now, active, waiting) {
            return Ok(Some(now));
        }
        handler.share_refused += 1;
        Metrics::inc(&self.metrics.handler_cpu_refusals);
        Err(OverShare)
    }

    /// Charges handler `h`'s share for a run started at `started` ([`Self::share_start`]).
    fn share_end(&mut self, h: usize, started: Option<Instant>) {
        if let Some(t) = started {
            // (Charged only when a share was in effect at the start.)
            self.handlers[h].share.spend(t.elapsed());
        }
    }

    /// Takes one invocation's outcome into the write set: its effects, or a dead letter.
    fn apply_outcome(
        &mut self,
        ctx: &Ctx<'_>,
        h: usize,
        at: At<'_>,
        outcome: Outcome,
        run: &mut Run,
    ) {
        self.log_used[h] += outcome.log_bytes;
        Metrics::add(&self.metrics.log_bytes_dropped, outcome.log_dropped as u64);
        run.verdicts.push((h, outcome.failure_kind()));
        let handler = &mut self.handlers[h];
        let name = handler.name().to_string();
        let effects = match outcome.result {
            Ok(effects) => effects,
            Err(failure) => {
                tracing::warn!(
                    handler = name,
                    device = ctx.device(),
                    seq = ctx.origin.seq(),
                    "handler failed: {failure}"
                );
                self.dead_letter(
                    ctx,
                    &name,
                    at.topic,
                    at.payload,
                    failure.reason,
                    &mut run.ws,
                );
                return;
            }
        };
        let mut cur = self.state.lock();
        for (k, v) in effects.state {
            cur.insert(keys::state(&name, &k), v);
        }
        drop(cur);
        // Counted at once: a later invocation of this handler in the same event checks its
        // quota against it. Undone if the event is not kept.
        handler.state_used = handler
            .state_used
            .saturating_add_signed(effects.state_delta);
        run.deltas.push((h, effects.state_delta));
        let seq_part = if at.origin == 0 {
            ctx.seq_text.to_string()
        } else {
            format!("{}.e{}", ctx.seq_text, at.origin)
        };
        for (i, f) in effects.forwards.into_iter().enumerate() {
            let id = entry_id(&self.gateway, ctx.device(), &seq_part, &name, i);
            let r = forward_entry(id, ctx.device(), ctx, &f.topic, f.class, &f.payload);
            run.ws.outbox.push(r);
        }
        for (et, ep) in effects.emits {
            run.emitted += 1;
            run.queue.push_back((et, ep, at.depth + 1, run.emitted));
        }
    }

    /// Adds a dead letter to the tree's write set (counted once the tree is kept).
    fn dead_letter(
        &self,
        ctx: &Ctx<'_>,
        handler: &str,
        topic: &str,
        payload: &[u8],
        reason: String,
        ws: &mut WriteSet,
    ) {
        let d = DeadLetter {
            device: ctx.device().to_string(),
            seq: ctx.origin.seq(),
            topic: topic.to_string(),
            payload: payload.to_vec(),
            handler: handler.to_string(),
            reason,
            received_ms: ctx.received_ms,
            ts: ctx.ts,
        };
        ws.dead.push(d.encode());
    }
}

/// The device event (or timer firing) a tree of invocations belongs to.
struct Ctx<'a> {
    origin: Origin<'a>,
    ts: Option<u64>,
    received_ms: u64,
    /// The seq part of outbox entry ids: the seq, a datagram id or `timer.<due_ms>`.
    seq_text: &'a str,
    /// What a lower tier said about the event it relays (only from devices in `acl.tiers`).
    relay: Option<Relayed<'a>>,
}

impl<'a> Ctx<'a> {
    /// The device as entry ids, entries and dead letters name it (`""` for a timer).
    fn device(&self) -> &'a str {
        self.origin.device_arc()
    }

    /// Whom the event's failures count against for quarantine: its device, or for an event a
    /// lower tier relays, the origin device (one bad sensor behind an edge must not take a
    /// handler away from the whole edge); a timer's firings count as the device `""`.
    fn who(&self) -> &'a str {
        match self.relay {
            Some(r) if !r.src.is_empty() => r.src,
            _ => self.device(),
        }
    }
}

/// Where a tree of invocations starts.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// A device's publish, with its seq.
    Publish { device: &'a Arc<str>, seq: u64 },
    /// A device's datagram: no seq.
    Datagram { device: &'a Arc<str> },
    /// A handler's timer firing: no device (`no_device`, empty, stands in where the stored
    /// formats and the handler's event info need one).
    Timer { no_device: &'a Arc<str> },
}

impl<'a> Origin<'a> {
    fn device_arc(&self) -> &'a Arc<str> {
        match *self {
            Origin::Publish { device, .. } | Origin::Datagram { device } => device,
            Origin::Timer { no_device } => no_device,
        }
    }

    /// The seq as dead letters and handlers see it (0: none, a datagram's or a timer's).
    fn seq(&self) -> u64 {
        match *self {
            Origin::Publish { seq, .. } => seq,
            Origin::Datagram { .. } | Origin::Timer { .. } => 0,
        }
    }
}

/// A handler over its CPU share: the run does not start.
struct OverShare;

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

/// Where a tree starts: a device's event (topic, payload) or a handler's timer.
#[derive(Clone, Copy)]
enum Root<'a> {
    Event(&'a str, &'a [u8]),
    Timer(usize, TimerInfo),
}

/// One invocation's place in its tree: the (device or emitted) event and where it came from.
#[derive(Clone, Copy)]
struct At<'a> {
    topic: &'a str,
    payload: &'a [u8],
    depth: u32,
    /// 0 for the root, n for the tree's n-th emit.
    origin: usize,
}

impl At<'_> {
    const ROOT_TIMER: At<'static> = At {
        topic: "",
        payload: &[],
        depth: 0,
        origin: 0,
    };
}

/// One tree's progress: its write set, state deltas to undo, and emitted events to run.
#[derive(Default)]
struct Run {
    ws: WriteSet,
    deltas: Vec<(usize, i64)>,
    /// (topic, payload, depth, origin): origin n is the n-th emit of the tree.
    queue: VecDeque<(String, Vec<u8>, u32, usize)>,
    emitted: usize,
    /// Each invocation's failure (`None`: it succeeded), counted (and toward quarantine) only
    /// if the tree is kept.
    verdicts: Vec<(usize, Option<FailureKind>)>,
}

/// The write that stores `handler`'s next due time (and its schedule's epoch).
fn timer_write(handler: &str, due_ms: u64, epoch: u64) -> (Vec<u8>, Option<Vec<u8>>) {
    (keys::timer(handler), Some(keys::timer_value(due_ms, epoch)))
}

/// An outbox entry for a forward of the event (or timer firing) in `ctx`: its time is the
/// device's `ts`, else when it was received; it is queued at `received_ms`. `device` is the
/// event's device (the origin's, for an event a lower tier relays).
fn forward_entry(
    id: String,
    device: &str,
    ctx: &Ctx<'_>,
    topic: &str,
    class: Class,
    payload: &[u8],
) -> OutboxWrite {
    let e = Entry {
        id,
        device: device.to_string(),
        topic: topic.to_string(),
        class,
        ts: ctx.ts.unwrap_or(ctx.received_ms),
        queued_ms: ctx.received_ms,
        payload: payload.to_vec(),
        tier_seq: None,
        tier_nack: None,
    };
    OutboxWrite {
        class,
        entry: e.encode(),
    }
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
            );
            Setup {
                dispatcher,
                rx,
                metrics,
                store,
                _dir: dir,
            }
        }
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
        assert_eq!(d.publish(&dev, publish(1), 0, &reply), Submitted::Queued);
        assert_eq!(d.publish(&dev, publish(2), 0, &reply), Submitted::Queued);
        // The same seqs again, as from a new connection, while the originals are in flight.
        assert_eq!(d.publish(&dev, publish(2), 0, &reply), Submitted::Queued);
        assert_eq!(d.publish(&dev, publish(1), 0, &reply), Submitted::Queued);
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
            d.publish(&"d".into(), publish(1), 0, &reply),
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
        d.publish(&"d".into(), publish(1), 0, &reply);
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
            .map(|s| d.publish(&dev, publish(s), 0, &reply))
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
            let r = d.publish(&dev, p, 0, &reply);
            if r == Submitted::Busy {
                d.busy(&dev, seq, &reply);
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
        d.busy(&dev, 6, &reply);
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
