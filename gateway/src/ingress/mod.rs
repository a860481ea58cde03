//! The QUIC endpoint for devices: accepts connections (mutual TLS, role and device-id
//! checks), keeps one live session per device, and runs one task per connection and per
//! stream. It only moves bytes: decoding is in `proto`, decisions in the dispatcher, which it
//! reaches only through the dispatcher thread's [`Inbox`] (never a lock).

pub mod admit;
mod conn;
pub mod rate;
pub mod tls;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use admit::{Decision, Handshakes};
use rate::Rates;

use tokio::sync::watch;

use crate::config::IngressConfig;
use crate::dispatch::thread::Inbox;
use crate::metrics::Metrics;
use crate::pki::Revoked;
use crate::proto::CloseCode;
pub use tls::RoleCheck;

/// A live session: its id, its certificate's serial, and the switch that ends it from outside
/// (superseded, or revoked), with the close code.
struct Session {
    id: u64,
    serial: String,
    ended: watch::Sender<Option<CloseCode>>,
    /// Its place in `max_connections`: given back the moment the session leaves the map
    /// (superseded, revoked or ended), not when its connection has settled.
    _counted: DeviceSlot,
}

/// What every connection task shares.
pub struct Shared {
    pub inbox: Inbox,
    pub roles: RoleCheck,
    /// The admin channel's access rules and what it answers.
    pub admin: crate::admin::channel::Access,
    pub ingress: IngressConfig,
    pub metrics: Arc<Metrics>,
    sessions: Mutex<HashMap<Arc<str>, Session>>,
    next_session: AtomicU64,
    /// Device connections past the role check and not superseded (`max_connections`).
    devices: Arc<AtomicUsize>,
    /// Handshakes in flight (`max_handshakes`, per address).
    handshakes: Mutex<Handshakes>,
    /// The deny-list (`acl.revoked`), replaced whole on a reload.
    revoked: RwLock<Arc<Revoked>>,
    /// Each device's rate (`device_events_per_s`), by device id.
    rates: Mutex<Rates>,
}

impl Shared {
    /// Devices connected now (past the role check, not superseded).
    pub fn connected_devices(&self) -> u64 {
        self.devices.load(std::sync::atomic::Ordering::Relaxed) as u64
    }
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

/// A device session counted against `max_connections` until dropped.
struct DeviceSlot(Arc<AtomicUsize>);

impl DeviceSlot {
    fn take(devices: &Arc<AtomicUsize>) -> DeviceSlot {
        devices.fetch_add(1, Ordering::Relaxed);
        DeviceSlot(devices.clone())
    }
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    pub fn new(
        inbox: Inbox,
        (roles, admin): (RoleCheck, crate::admin::channel::Access),
        ingress: IngressConfig,
        (revoked, tiers): (Revoked, &[String]),
        metrics: Arc<Metrics>,
    ) -> Self {
        Shared {
            admin,
            rates: Mutex::new(Rates::new(
                ingress.device_events_per_s,
                ingress.device_burst,
                tiers,
            )),
            inbox,
            roles,
            revoked: RwLock::new(Arc::new(revoked)),
            handshakes: Mutex::new(Handshakes::new(
                ingress.max_handshakes,
                ingress.max_handshakes_per_address,
            )),
            ingress,
            metrics,
            sessions: Mutex::default(),
            next_session: AtomicU64::new(1),
            devices: Arc::default(),
        }
    }

    /// Puts `revoked` in force: later connections are checked against it, and the live
    /// sessions it denies are ended with `revoked` (code 6) at once. Returns how many.
    pub fn revoke(&self, revoked: Revoked) -> usize {
        let mut sessions = self.sessions();
        let before = sessions.len();
        // A revoked session leaves the map (and `max_connections`) at once; its connection
        // settles and closes with `revoked`.
        // The dispatcher drops what it has not taken of theirs yet.
        sessions.retain(|device, s| {
            let denied = revoked.denies(device, &s.serial);
            if denied {
                let _ = s.ended.send(Some(CloseCode::Revoked));
                self.inbox.disconnected(device, s.id);
            }
            !denied
        });
        let closed = before - sessions.len();
        // Swapped under the sessions lock, which `register` checks the list under: no session
        // registers between the sweep above and the new list.
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(revoked);
        Metrics::add(&self.metrics.connections_revoked, closed as u64);
        closed
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

    /// Takes one frame of `device`'s rate (see `rate.rs`; a datagram only from the upper half
    /// of its bucket): `Err` holds the wait in ms until it may go on, counted
    /// (`rate_limited`) and logged once a minute per device.
    fn rate(&self, device: &Arc<str>, datagram: bool) -> Result<(), u64> {
        if self.ingress.device_events_per_s == 0 {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let taken = {
            let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
            match datagram {
                false => rates.take(device, now),
                true => rates.take_spare(device, now),
            }
        };
        taken.map_err(|limited| {
            Metrics::inc(&self.metrics.rate_limited);
            let ms = u64::try_from(limited.wait.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            if limited.warn {
                let what = match datagram {
                    true => "a datagram is dropped",
                    false => "a publish is answered busy, or the stream paused",
                };
                tracing::warn!(
                    device = &**device,
                    wait_ms = ms,
                    "a device is past its rate (ingress.device_events_per_s): {what}"
                );
            }
            ms
        })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session for `device` with the certificate serial `serial`, superseding the
    /// previous one: the dispatcher takes nothing of the old session from here on (told under
    /// the sessions lock, so it learns concurrent sessions of one device in the order they
    /// registered). `None` when the deny-list in force denies it (checked under the sessions
    /// lock, which a reload holds while it swaps the list).
    fn register(
        &self,
        device: &Arc<str>,
        serial: String,
    ) -> Option<(u64, watch::Receiver<Option<CloseCode>>)> {
        let mut sessions = self.sessions();
        let denied = self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .denies(device, &serial);
        if denied {
            return None;
        }
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        self.inbox.connected(device, id);
        let new = Session {
            id,
            serial,
            ended: tx,
            _counted: DeviceSlot::take(&self.devices),
        };
        if let Some(old) = sessions.insert(device.clone(), new) {
            let _ = old.ended.send(Some(CloseCode::Superseded));
        }
        Some((id, rx))
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
