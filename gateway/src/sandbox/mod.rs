//! The sandbox: wasmi instances of handlers, the ABI's host functions, limits, and the
//! registry that routes topics to handlers. Handlers run outside any store transaction and
//! return their effects as data ([`Effects`]); the dispatcher turns them into a write set.

mod abi;
mod instance;
pub mod manifest;

use std::sync::Arc;

pub use instance::{Handler, LoadError, Runtime};
pub use manifest::Manifest;

use crate::config::Class;

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
    pub device: &'a str,
    /// 0 for datagrams.
    pub seq: u64,
    pub ts: Option<u64>,
    pub received_ms: u64,
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// 0 for a device's event, n for an event emitted n hops away.
    pub depth: u32,
    /// Emits left for the whole tree of this device event (all handlers, all depths).
    pub emit_budget: u32,
}

/// A failed invocation: the event goes to the dead letters with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Failure(pub String);

/// The result of one invocation.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Effects, Failure>,
    pub fuel_used: u64,
    /// Log lines the handler wrote (already sent to tracing), and bytes dropped over the cap.
    pub log_dropped: usize,
}

/// Everything the host needs while a handler runs.
#[derive(Clone)]
pub struct HostEnv {
    pub state: Arc<dyn StateSource>,
    pub log_bytes_per_event: usize,
    pub emit_depth: u32,
    /// Largest payload a handler may forward or emit (`ingress.max_payload_bytes`).
    pub max_payload_bytes: usize,
}
