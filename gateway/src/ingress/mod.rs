//! The QUIC endpoint for devices: accepts connections (mutual TLS, role and device-id
//! checks), keeps one live session per device, and runs one task per connection and per
//! stream. It only moves bytes: decoding is in `proto`, decisions in the dispatcher, which it
//! reaches only through the dispatcher thread's [`Inbox`] (never a lock).

pub mod admit;
mod conn;
pub mod tls;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use admit::{Decision, Handshakes};

use tokio::sync::watch;

use crate::config::IngressConfig;
use crate::dispatch::thread::Inbox;
use crate::metrics::Metrics;
pub use tls::RoleCheck;

/// A live session: its id and the switch that tells it it was superseded.
struct Session {
    id: u64,
    superseded: watch::Sender<bool>,
}

/// What every connection task shares.
pub struct Shared {
    pub inbox: Inbox,
    pub roles: RoleCheck,
    pub ingress: IngressConfig,
    pub metrics: Arc<Metrics>,
    sessions: Mutex<HashMap<Arc<str>, Session>>,
    next_session: AtomicU64,
    /// Device connections past the role check and not superseded (`max_connections`).
    devices: AtomicUsize,
    /// Handshakes in flight (`max_handshakes`, per address).
    handshakes: Mutex<Handshakes>,
}

/// A handshake's slot, given back when dropped (the handshake ended, whichever way).
pub(crate) struct HandshakeSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.shared.handshakes().done(self.ip);
    }
}

/// A device connection counted against `max_connections` until dropped (when it ends, or
/// at once when it is superseded: it settles apart).
pub(crate) struct DeviceSlot(Arc<Shared>);

impl DeviceSlot {
    fn take(shared: &Arc<Shared>) -> DeviceSlot {
        shared.devices.fetch_add(1, Ordering::Relaxed);
        DeviceSlot(shared.clone())
    }
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        self.0.devices.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    pub fn new(
        inbox: Inbox,
        roles: RoleCheck,
        ingress: IngressConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Shared {
            inbox,
            roles,
            handshakes: Mutex::new(Handshakes::new(
                ingress.max_handshakes,
                ingress.max_handshakes_per_address,
            )),
            ingress,
            metrics,
            sessions: Mutex::default(),
            next_session: AtomicU64::new(1),
            devices: AtomicUsize::new(0),
        }
    }

    fn handshakes(&self) -> std::sync::MutexGuard<'_, Handshakes> {
        self.handshakes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides on a connection attempt (see `admit.rs`): a handshake slot, or the attempt
    /// answered (a Retry or a refusal) and gone.
    fn admit(
        self: &Arc<Self>,
        incoming: quinn::Incoming,
    ) -> Option<(quinn::Incoming, HandshakeSlot)> {
        let remote = incoming.remote_address();
        let decision = self.handshakes().decide(
            remote.ip(),
            incoming.remote_address_validated(),
            self.devices.load(Ordering::Relaxed),
            self.ingress.max_connections,
        );
        match decision {
            Decision::Accept => {
                tracing::debug!(%remote, "handshake started");
                let slot = HandshakeSlot {
                    shared: self.clone(),
                    ip: remote.ip(),
                };
                return Some((incoming, slot));
            }
            Decision::Retry => {
                Metrics::inc(&self.metrics.handshake_retries);
                tracing::debug!(%remote, "handshake retried: the address must prove itself");
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
            }
            Decision::Refuse(why) => {
                let n = Metrics::bump(&self.metrics.connections_refused);
                // Logged at 1, 2, 4, 8, … refusals: a flood of attempts cannot flood the log.
                if n.is_power_of_two() {
                    tracing::warn!(%remote, refused = n, "connection refused: {} reached", why.setting());
                } else {
                    tracing::debug!(%remote, "connection refused: {} reached", why.setting());
                }
                incoming.refuse();
            }
        }
        None
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session for `device`, superseding the previous one: the dispatcher takes
    /// nothing of the old session from here on (told under the sessions lock, so it learns
    /// concurrent sessions of one device in the order they registered).
    fn register(&self, device: &Arc<str>) -> (u64, watch::Receiver<bool>) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        let mut sessions = self.sessions();
        self.inbox.connected(device, id);
        if let Some(old) = sessions.insert(device.clone(), Session { id, superseded: tx }) {
            let _ = old.superseded.send(true);
        }
        (id, rx)
    }

    fn unregister(&self, device: &Arc<str>, id: u64) {
        let mut s = self.sessions();
        if s.get(device).is_some_and(|x| x.id == id) {
            s.remove(device);
        }
        self.inbox.disconnected(device, id);
    }
}

/// Accepts connections until `stop` turns true, then waits for the connections to settle.
pub async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stop.changed() => None,
        };
        let Some(incoming) = incoming else { break };
        let Some((incoming, slot)) = shared.admit(incoming) else {
            continue;
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        tasks.spawn(async move { conn::run(incoming, slot, &shared, stop).await });
        // Reap finished connection tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}
