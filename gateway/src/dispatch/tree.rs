//! The event tree: one device event (or timer firing) run through the handlers subscribed to
//! it and through what they emit, depth first in emit order, with the box's budgets for the
//! whole tree (emits, log bytes) and each handler's quarantine and CPU share. It returns the
//! tree's effects as data ([`Grown`]: forwards, dead letters, state writes, and each
//! invocation's verdict); it keeps nothing, admits nothing and submits nothing: the
//! sequencer (`mod.rs`) decides whether the tree is kept and then has it [`Tree::count`]ed.
//!
//! Its one clock read is the CPU share's (the time a handler runs is what the share
//! measures); wall time in milliseconds comes in with the event (`Ctx::received_ms`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::Relayed;
use crate::config::{Config, Unrouted};
use crate::metrics::Metrics;
use crate::outbox::{entry_id, BootTime, Entry};
use crate::pipeline::{Class, OutboxWrite, WriteSet};
use crate::router::Router;
use crate::sandbox::probation::End;
use crate::sandbox::quarantine::{self, Change};
use crate::sandbox::share::Policy;
use crate::sandbox::{EventInfo, FailureKind, Handler, Limit, Outcome, StateSource, TimerInfo};
use crate::store::{keys, DeadLetter};

/// State reads for handlers: this tree's own writes, then the overlay of pending groups,
/// then what is durable. The tree fills it as invocations succeed and drains it into
/// [`Grown::written`]; the handlers read it through their `HostEnv`.
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

/// The handlers and the budgets of one tree.
pub(super) struct Tree {
    gateway: Arc<str>,
    pub(super) handlers: Vec<Handler>,
    router: Router,
    unrouted: Unrouted,
    unrouted_class: Class,
    /// Emits allowed for one device event's whole tree (the box's `emits_per_event` cap).
    emit_budget: u32,
    /// Log bytes each handler may write per device event, and what each wrote so far.
    log_cap: usize,
    /// An invocation longer than this counts as over budget (`metrics.invoke_budget_ms`).
    invoke_budget: std::time::Duration,
    log_used: Vec<usize>,
    rules: QuarantineRules,
    /// Whether other input is queued behind what runs now (the dispatcher thread tells): with
    /// two handlers or more active, it makes the fair CPU share hold.
    work_waiting: bool,
    state: Arc<EventState>,
    metrics: Arc<Metrics>,
    route_buf: Vec<usize>,
    /// Probations ended and not handed over yet ([`Tree::probation_ends`]).
    ended: Vec<ProbationEnd>,
    /// Monotonic ms, as the dispatcher's thread last read them: probations are timed with
    /// them (an NTP step does not end one).
    pub(super) mono_ms: u64,
}

/// A deployed version's probation ended: the dispatcher reports it to the admin, which rolls
/// a failed one back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbationEnd {
    pub name: String,
    pub version: u64,
    pub end: End,
}

/// When a handler is quarantined and for how long (`limits.quarantine_*`).
#[derive(Debug, Clone, Copy)]
struct QuarantineRules {
    after: u32,
    devices: usize,
    hold_ms: u64,
}

/// A grown tree, not kept yet.
pub(super) struct Grown {
    /// Its forwards (not admitted yet) and dead letters.
    pub ws: WriteSet,
    /// The state its handlers wrote (`None`: deleted), full keys.
    pub written: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Each handler's change of state bytes, counted at once ([`Tree::undo`] if not kept).
    pub deltas: Vec<(usize, i64)>,
    /// Each invocation's failure (`None`: it succeeded), for [`Tree::count`] if kept.
    pub verdicts: Vec<(usize, Option<FailureKind>)>,
}

impl Tree {
    pub(super) fn new(
        cfg: &Config,
        handlers: Vec<Handler>,
        state: Arc<EventState>,
        metrics: Arc<Metrics>,
    ) -> Tree {
        Tree {
            gateway: cfg.gateway.id.as_str().into(),
            router: Router::new(handlers.iter().map(|h| h.manifest.subscribe.as_slice())),
            log_used: vec![0; handlers.len()],
            handlers,
            unrouted: cfg.router.unrouted,
            unrouted_class: cfg.router.unrouted_class,
            emit_budget: cfg.limits.emits_per_event,
            log_cap: cfg.limits.log_bytes_per_event,
            invoke_budget: std::time::Duration::from_millis(cfg.metrics.invoke_budget_ms),
            rules: QuarantineRules {
                after: cfg.limits.quarantine_after_errors,
                devices: cfg.limits.quarantine_devices,
                hold_ms: cfg.limits.quarantine_hold_ms,
            },
            work_waiting: false,
            state,
            metrics,
            route_buf: Vec::new(),
            ended: Vec::new(),
            mono_ms: 0,
        }
    }

    /// Puts `h` in place of the handler of its name (events in flight ran on the old one; the
    /// next runs on this), or after the others; the routes follow its subscriptions. Returns
    /// its index and the version it replaced.
    pub(super) fn install(&mut self, h: Handler) -> (usize, Option<u64>) {
        let mut h = h;
        // A probation ended for the version it replaces is moot now.
        self.ended.retain(|e| e.name != h.name());
        let (i, before) = match self.handlers.iter().position(|o| o.name() == h.name()) {
            Some(i) => {
                // Its state is the same namespace: the count goes on (writes still pending
                // are in it, not on disk).
                h.state_used = self.handlers[i].state_used;
                let old = std::mem::replace(&mut self.handlers[i], h);
                (i, Some(old.manifest.version))
            }
            None => {
                self.handlers.push(h);
                self.log_used.push(0);
                (self.handlers.len() - 1, None)
            }
        };
        self.router = Router::new(
            self.handlers
                .iter()
                .map(|h| h.manifest.subscribe.as_slice()),
        );
        (i, before)
    }

    /// Ends handler `h`'s probation with `end`, reported by [`Tree::probation_ends`].
    fn probation_ended(&mut self, h: usize, end: End) {
        let handler = &mut self.handlers[h];
        handler.probation = None;
        match &end {
            End::Passed => tracing::info!(
                handler = handler.name(),
                version = handler.manifest.version,
                "deployed version passed its probation"
            ),
            End::Failed(why) => tracing::error!(
                handler = handler.name(),
                version = handler.manifest.version,
                "deployed version failed its probation: {why}; it is rolled back"
            ),
        }
        self.ended.push(ProbationEnd {
            name: handler.name().to_string(),
            version: handler.manifest.version,
            end,
        });
    }

    /// Ends the probations whose window is over (at [`Tree::mono_ms`]), then hands over every
    /// probation ended since the last call.
    pub(super) fn probation_ends(&mut self) -> Vec<ProbationEnd> {
        let now = self.mono_ms;
        for h in 0..self.handlers.len() {
            let over = self.handlers[h].probation.as_ref().and_then(|p| p.at(now));
            if let Some(end) = over {
                self.probation_ended(h, end);
            }
        }
        std::mem::take(&mut self.ended)
    }

    /// Takes the handler named `name` out (events in flight ran on it; the next do not);
    /// the routes follow. Returns its index and the handler, if it ran.
    pub(super) fn remove(&mut self, name: &str) -> Option<(usize, Handler)> {
        let i = self.handlers.iter().position(|h| h.name() == name)?;
        let h = self.handlers.remove(i);
        self.log_used.remove(i);
        self.ended.retain(|e| e.name != name);
        self.router = Router::new(
            self.handlers
                .iter()
                .map(|h| h.manifest.subscribe.as_slice()),
        );
        Some((i, h))
    }

    /// Whether work is waiting behind what runs next (see `sandbox/share.rs`).
    pub(super) fn set_work_waiting(&mut self, waiting: bool) {
        self.work_waiting = waiting;
    }

    /// What a timer firing's handler is told.
    pub(super) fn timer_info(&self, now_ms: u64, due_ms: u64) -> TimerInfo {
        TimerInfo {
            now_ms,
            due_ms,
            emit_budget: self.emit_budget,
            log_budget: self.log_cap,
        }
    }

    /// Runs the event (or timer) through the handlers and what they emit.
    pub(super) fn grow(&mut self, ctx: &Ctx<'_>, root: Root<'_>) -> Grown {
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
                            let t0 = Instant::now();
                            let outcome = self.handlers[h].timer(&info);
                            let took = t0.elapsed();
                            self.share_end(h, started);
                            Metrics::inc(&self.metrics.timer_calls);
                            self.handlers[h].runs.record(
                                outcome.failure_kind(),
                                outcome.fuel_used,
                                took,
                                self.invoke_budget,
                            );
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
        Grown {
            ws: run.ws,
            written: self.state.lock().drain().collect(),
            deltas: run.deltas,
            verdicts: run.verdicts,
        }
    }

    /// Takes back a tree's state deltas: it was not kept.
    pub(super) fn undo(&mut self, deltas: &[(usize, i64)]) {
        for (h, d) in deltas {
            let used = &mut self.handlers[*h].state_used;
            *used = used.saturating_add_signed(-d);
        }
    }

    /// Counts a kept tree's invocations (all for `who`'s event, or a timer's: `""`, at
    /// `now_ms`): failures, timeouts, and the quarantines they start, extend or end. Each
    /// handler whose quarantine changed gets its new held set written with the tree.
    pub(super) fn count(
        &mut self,
        who: &str,
        now_ms: u64,
        verdicts: Vec<(usize, Option<FailureKind>)>,
        ws: &mut WriteSet,
    ) {
        let rules = self.rules;
        let settings = (rules.after, rules.devices, rules.hold_ms);
        for (_, v) in &verdicts {
            if v.is_some() {
                Metrics::inc(&self.metrics.handler_errors);
            }
            if *v == Some(FailureKind::Timeout) {
                Metrics::inc(&self.metrics.handler_timeouts);
            }
        }
        // One verdict per handler per tree (a trial is judged once, a tree of emits
        // counts as one failure in a row).
        let mut ran: Vec<usize> = verdicts.iter().map(|(h, _)| *h).collect();
        ran.sort_unstable();
        ran.dedup();
        for h in ran {
            let v = quarantine::fold(verdicts.iter().filter(|(i, _)| *i == h).map(|(_, v)| *v));
            let handler = &mut self.handlers[h];
            handler.quarantine.version = handler.manifest.version;
            let change = handler.quarantine.observe(who, v, now_ms, settings);
            if let Some(p) = &mut handler.probation {
                let end = match change {
                    Some(Change::All { .. }) => Some(p.quarantined()),
                    _ => p.observe(v, self.mono_ms),
                };
                if let Some(end) = end {
                    self.probation_ended(h, end);
                }
            }
            let Some(change) = change else {
                continue;
            };
            let handler = &mut self.handlers[h];
            let name = handler.name().to_string();
            match change {
                Change::Device { device, n, .. } => {
                    Metrics::inc(&self.metrics.handler_device_quarantines);
                    tracing::error!(
                        handler = name,
                        device,
                        devices = n,
                        hold_ms = rules.hold_ms,
                        "handler quarantined for one device: its events trapped the handler or hit a limit {} times in a row; that device's events go to the dead letters until a trial succeeds, the other devices keep the handler",
                        rules.after
                    );
                }
                Change::All { .. } => {
                    Metrics::inc(&self.metrics.handlers_quarantined);
                    tracing::error!(
                        handler = name,
                        devices = rules.devices,
                        hold_ms = rules.hold_ms,
                        "handler quarantined: {} failures in a row from {} devices or more; its events go to the dead letters until a trial succeeds",
                        rules.after,
                        rules.devices
                    );
                }
                Change::Extended { device, until_ms } => tracing::warn!(
                    handler = name,
                    device,
                    until_ms,
                    "quarantined handler failed its trial: held again, twice as long"
                ),
                Change::Released { device } => tracing::info!(
                    handler = name,
                    device = device.as_deref().unwrap_or("every device"),
                    "quarantined handler passed its trial: it runs again"
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
                    self.rules.after, self.rules.devices
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
            run.ws
                .dead
                .push(dead_letter(ctx, &name, at.topic, at.payload, reason));
            return;
        }
        let ev = EventInfo {
            device: ctx.origin.device_arc(),
            seq: ctx.origin.seq(),
            ts: ctx.ts,
            received_ms: ctx.received_ms,
            clock_set: ctx.boot.is_none(),
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
            run.ws
                .dead
                .push(dead_letter(ctx, &name, at.topic, at.payload, reason));
            return;
        };
        let t0 = Instant::now();
        let outcome = self.handlers[h].invoke(&ev);
        let took = t0.elapsed();
        self.share_end(h, started);
        Metrics::inc(&self.metrics.handler_calls);
        self.handlers[h].runs.record(
            outcome.failure_kind(),
            outcome.fuel_used,
            took,
            self.invoke_budget,
        );
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

    /// Takes one invocation's outcome into the tree: its effects, or a dead letter.
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
                run.ws.dead.push(dead_letter(
                    ctx,
                    &name,
                    at.topic,
                    at.payload,
                    failure.reason,
                ));
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
}

/// A dead letter of the event (or timer firing) in `ctx`, encoded for the store.
pub(super) fn dead_letter(
    ctx: &Ctx<'_>,
    handler: &str,
    topic: &str,
    payload: &[u8],
    reason: String,
) -> Vec<u8> {
    DeadLetter {
        device: ctx.device().to_string(),
        seq: ctx.origin.seq(),
        topic: topic.to_string(),
        payload: payload.to_vec(),
        handler: handler.to_string(),
        reason,
        received_ms: ctx.received_ms,
        ts: ctx.ts,
    }
    .encode()
}

/// The device event (or timer firing) a tree of invocations belongs to.
pub(super) struct Ctx<'a> {
    pub origin: Origin<'a>,
    pub ts: Option<u64>,
    pub received_ms: u64,
    /// This boot's id and the milliseconds since boot at receipt, when the wall clock was not
    /// set then: a forward stamped with `received_ms` carries them, to be re-stamped once the
    /// clock is set.
    pub boot: Option<(&'a str, u64)>,
    /// The seq part of outbox entry ids: the seq, a datagram id or `timer.<due_ms>`.
    pub seq_text: &'a str,
    /// What a lower tier said about the event it relays (only from devices in `acl.tiers`).
    pub relay: Option<Relayed<'a>>,
}

impl<'a> Ctx<'a> {
    /// The device as entry ids, entries and dead letters name it (`""` for a timer).
    pub fn device(&self) -> &'a str {
        self.origin.device_arc()
    }

    /// Whom the event's failures count against for quarantine: its device, or for an event a
    /// lower tier relays, the origin device (one bad sensor behind an edge must not take a
    /// handler away from the whole edge); a timer's firings count as the device `""`.
    pub fn who(&self) -> &'a str {
        match self.relay {
            Some(r) if !r.src.is_empty() => r.src,
            _ => self.device(),
        }
    }
}

/// Where a tree of invocations starts.
#[derive(Clone, Copy)]
pub(super) enum Origin<'a> {
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

/// Where a tree starts: a device's event (topic, payload) or a handler's timer.
#[derive(Clone, Copy)]
pub(super) enum Root<'a> {
    Event(&'a str, &'a [u8]),
    Timer(usize, TimerInfo),
}

/// A handler over its CPU share: the run does not start.
struct OverShare;

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
    verdicts: Vec<(usize, Option<FailureKind>)>,
}

/// An outbox entry for a forward of the event (or timer firing) in `ctx`: its time is the
/// device's `ts`, else when it was received, or the timer's due time (with this boot's id and
/// the time since boot then when the wall clock was not set: [`BootTime`]); it is queued at
/// `received_ms`. `device` is the
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
        // The time is the gateway's own (a receipt time, a timer's due time), taken on an
        // unset clock.
        boot: match ctx.boot {
            Some((boot_id, mono_ms))
                if ctx.ts.is_none() || matches!(ctx.origin, Origin::Timer { .. }) =>
            {
                Some(BootTime {
                    boot_id: boot_id.to_string(),
                    mono_ms,
                    restamped: false,
                })
            }
            _ => None,
        },
    };
    OutboxWrite {
        class,
        entry: e.encode(),
        unset_clock: e.boot.is_some(),
    }
}
