//! The admin channel: operators on the gateway's own QUIC port, with ALPN `tidepool-admin/1`
//! and a certificate from the operator CA (`tidepool certs operator`). Who gets in: a source
//! address in `admin.allow_from` (checked during the handshake, before the certificate), a
//! certificate that chains to the operator CA (the handshake accepts the device CA too: the
//! role is checked after it, as for devices), and an operator not in `admin.revoked`. The
//! deny-list, the allow-list and the certificate's expiry are checked again at every request
//! and, for a deploy, once its bundle is in: a reload (or time) shuts out a connected
//! operator. Each bidirectional
//! stream carries one request of the control protocol (`control.rs`), answered as on the local
//! socket; what an operator changes is logged with their name, serial and address.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use crate::config::{AdminConfig, ConfigError};
use crate::control::Control;
use crate::ingress::Shared;
use crate::metrics::Metrics;
use crate::pki::Revoked;
use crate::proto::CloseCode;

/// Who may use the admin channel, and what answers it.
pub struct Access {
    allow: RwLock<Arc<Vec<ipnet::IpNet>>>,
    revoked: RwLock<Arc<Revoked>>,
    control: Arc<Control>,
    /// Operator connections open (at most [`MAX_CONNECTIONS`]).
    open: Arc<std::sync::atomic::AtomicUsize>,
}

/// The most operator connections at once: each may hold a request or two, and operators are
/// few (a fleet rollout opens one per request).
pub const MAX_CONNECTIONS: usize = 16;

/// `[admin]`'s lists, parsed.
fn lists(cfg: &AdminConfig) -> Result<(Vec<ipnet::IpNet>, Revoked), ConfigError> {
    let revoked = Revoked::parse(&cfg.revoked)
        .map_err(|e| ConfigError::Invalid(format!("admin.revoked: {e}")))?;
    Ok((cfg.networks()?, revoked))
}

impl Access {
    pub fn new(cfg: &AdminConfig, control: Arc<Control>) -> Result<Access, ConfigError> {
        let (allow, revoked) = lists(cfg)?;
        Ok(Access {
            allow: RwLock::new(Arc::new(allow)),
            revoked: RwLock::new(Arc::new(revoked)),
            control,
            open: Arc::default(),
        })
    }

    /// Puts a reloaded `[admin]` in force: later connections and requests are checked against
    /// it. Returns the sizes of the allow-list and the deny-list.
    pub fn reload(&self, cfg: &AdminConfig) -> Result<(usize, usize), ConfigError> {
        let (allow, revoked) = lists(cfg)?;
        let sizes = (allow.len(), revoked.len());
        *self.allow.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(allow);
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(revoked);
        Ok(sizes)
    }

    /// Whether an operator may connect from `ip` (an empty list: from anywhere).
    pub fn allows(&self, ip: IpAddr) -> bool {
        let allow = self.allow.read().unwrap_or_else(|p| p.into_inner()).clone();
        allow.is_empty() || listed(&allow, ip)
    }

    fn denies(&self, name: &str, serial: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .denies(name, serial)
    }

    /// Counts and logs a refusal (at 1, 2, 4, 8, … refusals at WARN: a flood of attempts
    /// cannot flood the log).
    pub fn refused(&self, remote: SocketAddr, why: &str) {
        let n = Metrics::bump(&self.control.metrics.admin_refused);
        if n.is_power_of_two() {
            tracing::warn!(%remote, refused = n, "admin channel: refused: {why}");
        } else {
            tracing::debug!(%remote, "admin channel: refused: {why}");
        }
    }
}

/// Whether `ip` is in one of `nets`.
fn listed(nets: &[ipnet::IpNet], ip: IpAddr) -> bool {
    // A dual-stack socket shows an IPv4 client as ::ffff:a.b.c.d.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    nets.iter().any(|n| n.contains(&ip))
}

/// How long a closing admin connection lets its requests finish.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

fn close(conn: &quinn::Connection, c: CloseCode) {
    conn.close(quinn::VarInt::from_u32(c as u32), c.reason());
}

/// One operator connection, its handshake done: role and deny-list checks, then one task per
/// request until the operator closes it or the gateway stops.
pub async fn run(
    conn: quinn::Connection,
    chain: Vec<CertificateDer<'static>>,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let access = &shared.admin;
    let remote = conn.remote_address();
    if !shared.roles.is_operator(&chain) {
        access.refused(remote, "its certificate is not from the operator CA");
        return close(&conn, CloseCode::WrongRole);
    }
    let leaf = chain.first();
    let Some(name) = leaf
        .and_then(|c| crate::pki::common_name(c))
        .filter(|cn| crate::proto::topic::valid_device_id(cn))
    else {
        access.refused(remote, "its certificate's CN is not an operator name");
        return close(&conn, CloseCode::WrongRole);
    };
    let serial = leaf
        .and_then(|c| crate::pki::serial_hex(c))
        .unwrap_or_default();
    // Checked again at every request: a connection does not outlive its certificate.
    let not_after = leaf.and_then(|c| crate::pki::not_after(c)).unwrap_or(0);
    if access.denies(&name, &serial) {
        access.refused(
            remote,
            &format!("operator `{name}` (serial {serial}) is in admin.revoked"),
        );
        return close(&conn, CloseCode::Revoked);
    }
    let open = access.open.clone();
    if open.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_CONNECTIONS {
        open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        access.refused(
            remote,
            &format!("{MAX_CONNECTIONS} operator connections are open"),
        );
        // Not a device close code: the admin channel's own reason.
        return conn.close(0u32.into(), b"too_many_operator_connections");
    }
    // Given back however this connection ends.
    struct Counted(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
    let _counted = Counted(open);
    Metrics::inc(&shared.metrics.admin_connections);
    tracing::info!(%remote, operator = name, serial, "operator connected");
    let by: Arc<str> = format!("operator {name} (serial {serial}) from {remote}").into();
    let who: Arc<Operator> = Arc::new(Operator {
        name,
        serial,
        not_after,
    });
    let mut requests = tokio::task::JoinSet::new();
    let stopping = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let (shared, by, who, conn) = (shared.clone(), by.clone(), who.clone(), conn.clone());
                    requests.spawn(async move { request(&shared, &conn, (send, recv), &who, &by).await });
                }
                Err(_) => break false,
            },
            _ = stop.changed() => break true,
        }
        while requests.try_join_next().is_some() {}
    };
    let settle = async { while requests.join_next().await.is_some() {} };
    if tokio::time::timeout(SETTLE, settle).await.is_err() {
        requests.abort_all();
    }
    if stopping {
        close(&conn, CloseCode::ShuttingDown);
    }
    tracing::debug!(%remote, "operator disconnected");
}

/// Who an admin connection belongs to.
struct Operator {
    name: String,
    serial: String,
    /// Its certificate's end, in Unix seconds.
    not_after: i64,
}

impl Operator {
    /// Why this operator, connected from `remote`, may no longer be answered: revoked, its
    /// address taken out of the allow-list, or its certificate expired since it connected.
    fn refused(&self, access: &Access, remote: SocketAddr) -> Option<String> {
        let now = crate::clock::trusted_now_s();
        if access.denies(&self.name, &self.serial) {
            Some("this operator is revoked (admin.revoked)".into())
        } else if !access.allows(remote.ip()) {
            Some("this address is no longer in admin.allow_from".into())
        } else if i64::try_from(now).unwrap_or(i64::MAX) > self.not_after {
            Some("this operator's certificate has expired".into())
        } else {
            None
        }
    }
}

/// One request on its stream: refused if the operator was revoked since they connected, else
/// answered as on the local socket.
async fn request(
    shared: &Shared,
    conn: &quinn::Connection,
    (mut send, recv): (quinn::SendStream, quinn::RecvStream),
    who: &Operator,
    by: &str,
) {
    let (access, remote) = (&shared.admin, conn.remote_address());
    let refused = || {
        let why = who.refused(access, remote);
        if let Some(why) = &why {
            access.refused(remote, &format!("operator `{}`: {why}", who.name));
        }
        why
    };
    let result = match refused() {
        Some(why) => {
            // Answered, then the connection is closed: it holds no slot once refused.
            let answer = format!("#error: {why}\n");
            let sent = tokio::io::AsyncWriteExt::write_all(&mut send, answer.as_bytes()).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), send.stopped()).await;
            close(conn, CloseCode::Revoked);
            sent
        }
        None => crate::control::serve_one(recv, &mut send, &access.control, by, &refused).await,
    };
    if let Err(e) = result {
        tracing::debug!(%remote, "admin request: {e}");
    }
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_takes_addresses_and_networks_and_mapped_v4() {
        let cfg = |allow: &[&str]| AdminConfig {
            allow_from: allow.iter().map(|s| s.to_string()).collect(),
            revoked: vec![],
        };
        let nets = cfg(&["10.0.0.0/8", "192.168.1.7", "fd00::/8"])
            .networks()
            .unwrap();
        let any = |ip: &str| listed(&nets, ip.parse().unwrap());
        assert!(any("10.1.2.3"));
        assert!(any("192.168.1.7"));
        assert!(!any("192.168.1.8"));
        assert!(any("fd12::1"));
        assert!(any("::ffff:10.9.9.9"));
        assert!(!any("127.0.0.1"));
        assert!(cfg(&["10.0.0.0/33"]).networks().is_err());
        assert!(cfg(&["example.com"]).networks().is_err());
    }
}
