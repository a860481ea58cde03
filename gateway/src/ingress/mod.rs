//! The QUIC endpoint for devices: accepts connections (mutual TLS, role and device-id
//! checks), keeps one live session per device, and runs one task per connection and per
//! stream. It only moves bytes: decoding is in `proto`, decisions in the dispatcher, which it
//! reaches only through the dispatcher thread's [`Inbox`] (never a lock).

mod conn;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
    live: AtomicUsize,
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
            ingress,
            metrics,
            sessions: Mutex::default(),
            next_session: AtomicU64::new(1),
            live: AtomicUsize::new(0),
        }
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
        if shared.live.load(Ordering::Relaxed) >= shared.ingress.max_connections {
            tracing::warn!(remote = %incoming.remote_address(), "connection refused: max_connections reached");
            incoming.refuse();
            continue;
        }
        shared.live.fetch_add(1, Ordering::Relaxed);
        let (shared, stop) = (shared.clone(), stop.clone());
        tasks.spawn(async move {
            conn::run(incoming, &shared, stop).await;
            shared.live.fetch_sub(1, Ordering::Relaxed);
        });
        // Reap finished connection tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}
