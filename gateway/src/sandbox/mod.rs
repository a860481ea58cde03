//! The sandbox: wasmi instances of handlers, the ABI's host functions, limits, and the
//! registry that routes topics to handlers. Handlers run outside any store transaction and
//! return their effects as data ([`Effects`]); the dispatcher turns them into a write set.

mod abi;
mod instance;
pub mod manifest;
pub mod probation;
pub mod quarantine;
pub mod share;

use std::sync::Arc;

pub use instance::{compile, AbiMismatch, Handler, LoadError, Runtime};
pub use manifest::Limits;
pub use manifest::{Manifest, ManifestError};

use crate::pipeline::Class;

/// Reads committed-or-pending state for host calls (`state_get`).
pub trait StateSource: Send + Sync {
    /// The current value of `key` in `handler`'s namespace.
    fn get(&self, handler: &str, key: &[u8]) -> Option<Vec<u8>>;
}

/// One forward a handler asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub topic: String,
    pub payload: Vec<u8>,
    pub class: Class,
}

/// What one successful invocation wants to change. Discarded as a whole on failure.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// State writes in call order: `None` deletes.
    pub state: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub forwards: Vec<Forward>,
    /// Events to re-publish to other subscriptions: (topic, payload).
    pub emits: Vec<(String, Vec<u8>)>,
    /// Net change of the handler's state bytes (keys + values).
    pub state_delta: i64,
}

/// The event as a handler sees it.
#[derive(Debug, Clone)]
pub struct EventInfo<'a> {
    pub device: &'a Arc<str>,
    /// 0 for datagrams.
    pub seq: u64,
    pub ts: Option<u64>,
    pub received_ms: u64,
    /// Whether the gateway's clock was set when it received the event (`clock::is_set`):
    /// `event_meta`'s `clock_synced`.
    pub clock_set: bool,
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// 0 for a device's event, n for an event emitted n hops away.
    pub depth: u32,
    /// Emits left for the whole tree of this device event (all handlers, all depths).
    pub emit_budget: u32,
    /// Log bytes this handler may still write for this device event.
    pub log_budget: usize,
}

/// A timer call: `tp_on_timer(now_ms)`.
#[derive(Debug, Clone, Copy)]
pub struct TimerInfo {
    pub now_ms: u64,
    /// When the timer fell due (a timer that fell due while the box was off fires once, late).
    pub due_ms: u64,
    pub emit_budget: u32,
    pub log_budget: usize,
}

/// What `event_meta` describes, encoded as CBOR only when a handler asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meta {
    None,
    /// `{device, seq, ts, received_ms, clock_synced}`.
    Event {
        device: Arc<str>,
        seq: u64,
        ts: Option<u64>,
        received_ms: u64,
        clock_set: bool,
    },
    /// `{timer: true, due_ms, now_ms, late_ms}`.
    Timer {
        due_ms: u64,
        now_ms: u64,
    },
}

impl Meta {
    /// The CBOR map the ABI's `event_meta` returns.
    pub fn encode(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct EventMeta<'a> {
            device: &'a str,
            seq: u64,
            ts: Option<u64>,
            received_ms: u64,
            clock_synced: bool,
        }
        #[derive(serde::Serialize)]
        struct TimerMeta {
            timer: bool,
            due_ms: u64,
            now_ms: u64,
            late_ms: u64,
        }
        let mut out = Vec::with_capacity(96);
        let r = match self {
            Meta::None => ciborium::into_writer(&serde_json::Map::new(), &mut out),
            Meta::Event {
                device,
                seq,
                ts,
                received_ms,
                clock_set,
            } => ciborium::into_writer(
                &EventMeta {
                    device,
                    seq: *seq,
                    ts: *ts,
                    received_ms: *received_ms,
                    clock_synced: *clock_set,
                },
                &mut out,
            ),
            Meta::Timer { due_ms, now_ms } => ciborium::into_writer(
                &TimerMeta {
                    timer: true,
                    due_ms: *due_ms,
                    now_ms: *now_ms,
                    late_ms: now_ms.saturating_sub(*due_ms),
                },
                &mut out,
            ),
        };
        r.expect("CBOR encoding into a Vec");
        out
    }
}

/// One line a handler logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// 0 error, 1 warn, 2 info, 3 debug, 4 trace.
    pub level: u8,
    pub text: String,
}

/// A limit an invocation (or the dispatcher on its behalf) can hit. Printed `limit:<name>`:
/// the start of a dead letter's reason, which operators and scripts match on, so the names are
/// the config keys they come from and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Fuel,
    Stack,
    MemoryPages,
    TableElements,
    StateBytes,
    ForwardsPerEvent,
    EmitsPerEvent,
    EmitDepth,
    /// More distinct state keys written in one invocation than `limits.state_writes_per_event`.
    StateWrites,
    /// Over the handler's share of the wall clock: refused without running.
    CpuShare,
    /// Forwards larger than the whole outbox.
    Outbox,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Fuel => "fuel",
            Limit::Stack => "stack",
            Limit::MemoryPages => "memory_pages",
            Limit::TableElements => "table_elements",
            Limit::StateBytes => "state_bytes",
            Limit::ForwardsPerEvent => "forwards_per_event",
            Limit::EmitsPerEvent => "emits_per_event",
            Limit::EmitDepth => "emit_depth",
            Limit::StateWrites => "state_writes_per_event",
            Limit::CpuShare => "cpu_share",
            Limit::Outbox => "outbox",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "limit:{}", self.name())
    }
}

/// A failed invocation: the event goes to the dead letters with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Failure {
    pub kind: FailureKind,
    pub reason: String,
}

/// What kind of failure, for counting and quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The handler returned non-zero: it rejected the event (bad input, as it judged it).
    Rejected,
    /// It ran out of fuel: it ran too long.
    Timeout,
    /// Any other trap or limit hit, or an instance that could not be made.
    Broken,
}

impl Failure {
    /// A limit hit (`limit:<name>`, then `detail` in parentheses when there is one).
    pub fn limit(limit: Limit, detail: Option<String>) -> Failure {
        let kind = match limit {
            Limit::Fuel => FailureKind::Timeout,
            _ => FailureKind::Broken,
        };
        let reason = match detail {
            Some(d) => format!("{limit} ({d})"),
            None => limit.to_string(),
        };
        Failure { kind, reason }
    }

    pub fn broken(reason: impl Into<String>) -> Failure {
        Failure {
            kind: FailureKind::Broken,
            reason: reason.into(),
        }
    }
}

/// What a handler's invocations cost since it was loaded (`status`, the Prometheus metrics):
/// its events' and its timer's, counted as they run (a tree undone by a full outbox and run
/// again when the device resends counts twice). `errors` are traps and limits, not
/// rejections (a handler returning non-zero judged its input; the gateway-wide
/// `handler_errors` counts both). An invocation past the budget (`metrics.invoke_budget_ms`)
/// is "negative uptime": it is not stopped (fuel stops it), it is counted, with the time it
/// ran past.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RunStats {
    pub calls: u64,
    pub errors: u64,
    /// Failures for running out of fuel (among `errors`).
    pub timeouts: u64,
    pub fuel: u64,
    pub busy_us: u64,
    pub over_budget: u64,
    pub over_budget_us: u64,
}

impl RunStats {
    /// Counts one invocation that took `took` against `budget`.
    pub fn record(
        &mut self,
        failure: Option<FailureKind>,
        fuel: u64,
        took: std::time::Duration,
        budget: std::time::Duration,
    ) {
        self.calls += 1;
        match failure {
            Some(FailureKind::Timeout) => {
                self.errors += 1;
                self.timeouts += 1;
            }
            Some(FailureKind::Broken) => self.errors += 1,
            Some(FailureKind::Rejected) | None => {}
        }
        self.fuel += fuel;
        let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.busy_us += us(took);
        if took > budget {
            self.over_budget += 1;
            self.over_budget_us += us(took - budget);
        }
    }
}

/// The result of one invocation.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Effects, Failure>,
    pub fuel_used: u64,
    /// Log bytes written (already sent to tracing), and bytes dropped over the cap.
    pub log_bytes: usize,
    pub log_dropped: usize,
    /// The lines themselves, when [`HostEnv::capture_logs`] is set.
    pub logs: Vec<LogLine>,
}

impl Outcome {
    /// `None` when the invocation succeeded.
    pub fn failure_kind(&self) -> Option<FailureKind> {
        self.result.as_ref().err().map(|f| f.kind)
    }

    fn failed(f: Failure) -> Outcome {
        Outcome {
            result: Err(f),
            fuel_used: 0,
            log_bytes: 0,
            log_dropped: 0,
            logs: Vec::new(),
        }
    }
}

/// Everything the host needs while a handler runs.
#[derive(Clone)]
pub struct HostEnv {
    pub state: Arc<dyn StateSource>,
    /// Log bytes a handler may write per device event (and in `tp_init`).
    pub log_bytes_per_event: usize,
    pub emit_depth: u32,
    /// The publish ACL (`acl.publish`): an emit may not land in another device's part of it.
    pub acl: SharedAcl,
    /// Distinct state keys one invocation may write (`limits.state_writes_per_event`).
    pub state_writes: u32,
    /// Largest payload a handler may forward or emit (`ingress.max_payload_bytes`).
    pub max_payload_bytes: usize,
    /// Keep log lines in [`Outcome::logs`] (for `tidepool invoke`), besides tracing them.
    pub capture_logs: bool,
}

/// The publish ACL as every handler's host sees it: one for all, replaced whole when it
/// changes live (a reload, a config bundle).
#[derive(Clone, Debug)]
pub struct SharedAcl(Arc<std::sync::RwLock<Arc<[String]>>>);

impl SharedAcl {
    pub fn new(patterns: Vec<String>) -> SharedAcl {
        SharedAcl(Arc::new(std::sync::RwLock::new(patterns.into())))
    }

    /// The patterns in force.
    pub fn get(&self) -> Arc<[String]> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, patterns: Vec<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = patterns.into();
    }
}

impl HostEnv {
    /// The environment the box's config gives every handler, reading state from `state`.
    pub fn new(cfg: &crate::config::Config, state: Arc<dyn StateSource>) -> HostEnv {
        HostEnv {
            state,
            log_bytes_per_event: cfg.limits.log_bytes_per_event,
            emit_depth: cfg.limits.emit_depth,
            acl: SharedAcl::new(cfg.acl.publish.clone()),
            state_writes: cfg.limits.state_writes_per_event,
            max_payload_bytes: cfg.ingress.max_payload_bytes,
            capture_logs: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FailureKind, RunStats};
    use std::time::Duration;

    #[test]
    fn run_stats_count_failures_fuel_and_time_past_the_budget() {
        let mut r = RunStats::default();
        let budget = Duration::from_millis(10);
        r.record(None, 100, Duration::from_millis(2), budget);
        r.record(
            Some(FailureKind::Timeout),
            1000,
            Duration::from_millis(25),
            budget,
        );
        r.record(
            Some(FailureKind::Rejected),
            5,
            Duration::from_millis(1),
            budget,
        );
        r.record(
            Some(FailureKind::Broken),
            5,
            Duration::from_millis(10),
            budget,
        );
        assert_eq!(
            r,
            RunStats {
                calls: 4,
                errors: 2,
                timeouts: 1,
                fuel: 1110,
                busy_us: 38_000,
                over_budget: 1,
                over_budget_us: 15_000,
            }
        );
    }
}
