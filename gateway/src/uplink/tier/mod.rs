//! The Tidepool sink: forwards go to an upstream Tidepool over the device protocol, this
//! gateway being a device there (its certificate issued by the upstream, named as this
//! gateway's id). Each entry is one publish with the entry's `id`, `src` (its device) and
//! `class`, on a topic from a template; a batch is one stream: `hello` (for the first batch on
//! a connection and for a batch whose entries carry seqs), then the publishes the upstream
//! does not hold yet, in tier seq order, then the end of the stream, and the upstream's
//! answers until it ends its side.
//!
//! Tier seqs ([`exchange`]): given at an entry's first send, written into the entry and
//! synced before it goes, reused by every resend. The upstream's `welcome` says which seqs it
//! holds (its mark): those are not sent again, so a batch retried after a broken connection,
//! a `busy` or an upstream restart sends only what is missing. Entries that carry a seq go
//! before any new entry ([`Sink::must_go_first`] after a restart, the plan's as-is retry
//! while running), so the seqs reach the upstream rising.
//!
//! A nack is written into its entry as it arrives (`tier_nack`): the upstream's mark now
//! covers that seq, so a retry would otherwise count the entry as held. A nacked entry is
//! never sent again under its seq. When every entry of a batch is refused, nothing of it ran
//! upstream: the seqs are freed and the uplink's plan judges the entries as it judges a
//! cloud's refusals (split, dead-lettered only with proof, else an outage).

pub mod exchange;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::client::{ClientError, Device, FrameStream};
use crate::config::TierConfig;
use crate::metrics::Metrics;
use crate::outbox::Entry;
use crate::proto::msg::{DeviceMsg, GatewayMsg, Publish};
use crate::proto::CloseCode;
use crate::store::Store;
use crate::uplink::template::Template;
use crate::uplink::{Batch, SendResult, Sent, Sink};
use exchange::{assign, verdict, Exchange, Outcome, Verdict};

/// Errors in the Tidepool sink's settings, found at start.
#[derive(Debug, thiserror::Error)]
pub enum TierSetupError {
    #[error("uplink.url `{0}`: an upstream Tidepool is tidepool://HOST:PORT")]
    Url(String),
    #[error("uplink.tier.topic: {0}")]
    Topic(String),
    #[error("uplink.tier.cert_file {path}: {msg}")]
    Cert { path: String, msg: String },
    #[error("uplink.tier.cert_file is issued to `{cn}`, but this gateway's id is `{id}`: the upstream knows this gateway by its certificate, so issue it there with `tidepool certs device {id}` (or set gateway.id = \"{cn}\")")]
    Name { cn: String, id: String },
}

/// Why an attempt failed (every one is retried with the same seqs).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Protocol(#[from] exchange::Violation),
    #[error("the upstream did not answer hello with welcome")]
    NoWelcome,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the upstream's mark for this gateway ({0}) leaves no seqs above it")]
    SeqsUsedUp(u64),
}

/// Sends batches to one upstream Tidepool; connected only while the uplink is awake.
pub struct TierSink {
    gateway: String,
    upstream: String,
    config: TierConfig,
    topic: Template,
    timeout: Duration,
    store: Store,
    metrics: Arc<Metrics>,
    conn: Option<Device>,
    /// The upstream's `max_frame_bytes`, once a `welcome` came on this connection. From then
    /// on `highest` is at or above the upstream's mark (this gateway is its only publisher as
    /// this device), so a batch of new entries needs no `hello`.
    welcomed: Option<u64>,
    /// The highest tier seq given so far (in the outbox or sent).
    highest: u64,
    /// Outbox seqs of the entries that carried a tier seq at start, in tier seq order.
    resume: Vec<u64>,
}

impl TierSink {
    pub fn new(
        gateway: &str,
        url: &str,
        cfg: &TierConfig,
        timeout: Duration,
        store: Store,
        metrics: Arc<Metrics>,
        tier_seqs: &[(u64, u64)],
    ) -> Result<TierSink, TierSetupError> {
        let rest = url
            .strip_prefix("tidepool://")
            .ok_or_else(|| TierSetupError::Url(url.into()))?
            .trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return Err(TierSetupError::Url(url.into()));
        }
        let upstream = if rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            rest.to_string()
        } else {
            format!("{rest}:7700")
        };
        let cn = certificate_name(&cfg.cert_file)?;
        if cn != gateway {
            return Err(TierSetupError::Name {
                cn,
                id: gateway.into(),
            });
        }
        let topic = Template::parse(&cfg.topic, &['+', '#']).map_err(TierSetupError::Topic)?;
        Ok(TierSink {
            gateway: gateway.into(),
            upstream,
            config: cfg.clone(),
            topic,
            timeout,
            store,
            metrics,
            conn: None,
            welcomed: None,
            highest: tier_seqs.iter().map(|(t, _)| *t).max().unwrap_or(0),
            // Entries given a seq before the restart go first, in seq order.
            resume: tier_seqs.iter().map(|(_, s)| *s).collect(),
        })
    }

    /// Rewrites the batch's entries that `change` changes (given each one's index), and
    /// syncs. A store error stops the process, as everywhere.
    async fn rewrite(&self, batch: &Batch, change: impl Fn(usize, &mut Entry) -> bool) {
        let mut writes = Vec::new();
        for (i, (o, e)) in batch.seqs.iter().zip(&batch.entries).enumerate() {
            let mut e = e.clone();
            if change(i, &mut e) {
                writes.push((*o, e.encode()));
            }
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.rewrite_outbox(writes)).await {
            Ok(Ok(_)) => Metrics::inc(&self.metrics.store_syncs),
            Ok(Err(e)) => crate::store::fatal("writing tier seqs into the outbox", e),
            Err(e) => crate::store::fatal("writing tier seqs into the outbox", e),
        }
    }

    /// Connects if needed, opens the batch's stream and, when needed, asks for the upstream's
    /// mark: returns the stream, the mark (0 when not asked: every entry is new and `highest`
    /// is at or above it) and the upstream's `max_frame_bytes`.
    async fn open(&mut self, carried: bool) -> Result<(FrameStream, u64, u64), Failure> {
        // A connection the upstream closed while the uplink lingered (a restart, its idle
        // timeout): connect again now rather than fail this attempt and back off.
        if self
            .conn
            .as_ref()
            .is_some_and(|d| d.conn.close_reason().is_some())
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            self.welcomed = None;
            let c = &self.config;
            let d = Device::connect(&self.upstream, &c.ca_file, &c.cert_file, &c.key_file).await?;
            self.conn = Some(d);
        }
        let conn = self.conn.as_ref().ok_or(Failure::NoWelcome)?;
        let mut stream = conn.open().await?;
        // Entries that carry a seq may be held upstream already: ask for the mark. So does
        // the first batch on a connection (the mark may be above `highest` after a restart).
        if let Some(max_frame_bytes) = self.welcomed.filter(|_| !carried) {
            return Ok((stream, 0, max_frame_bytes));
        }
        stream.send(&DeviceMsg::Hello).await?;
        let Some(GatewayMsg::Welcome {
            hwm,
            max_frame_bytes,
        }) = stream.next().await?
        else {
            return Err(Failure::NoWelcome);
        };
        self.highest = self.highest.max(hwm);
        self.welcomed = Some(max_frame_bytes);
        Ok((stream, hwm, max_frame_bytes))
    }

    /// One attempt. The network steps have the timeout; the store writes do not (a write cut
    /// off by a timeout would finish unseen). Each nack is written into its entry as it comes.
    async fn attempt(&mut self, batch: &Batch, bytes: &mut u64) -> Result<Outcome, Failure> {
        let carried = batch.entries.iter().any(|e| e.tier_seq.is_some());
        let (mut stream, hwm, max_frame_bytes) = timed(self.timeout, self.open(carried)).await??;
        let current: Vec<Option<u64>> = batch.entries.iter().map(|e| e.tier_seq).collect();
        let floor = hwm.max(self.highest);
        let (seqs, new) = assign(&current, floor).ok_or(Failure::SeqsUsedUp(floor))?;
        // Taken before any await: a later batch never reuses them, whatever happens here.
        self.highest = self.highest.max(seqs.iter().copied().max().unwrap_or(0));
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i]);
        let mut frames = Vec::new();
        let mut refused = Vec::new();
        // Refused here (over the upstream's frame limit): written into the entry with its seq,
        // or a retry would find the seq below the mark and count the entry as held.
        let mut too_large = Vec::new();
        for i in order {
            let (seq, e) = (seqs[i], &batch.entries[i]);
            if let Some(why) = &e.tier_nack {
                // Nacked in an earlier attempt: never sent again.
                refused.push((i, why.clone()));
                continue;
            }
            if seq <= hwm {
                // The upstream holds it (a nack would have been written into the entry).
                continue;
            }
            let frame = crate::proto::msg::encode_device(&DeviceMsg::Publish(Publish {
                seq,
                topic: self.topic.render(&self.gateway, e),
                payload: e.payload.clone().into(),
                // A receipt time from an unset clock (not re-stamped yet) is not sent as if it
                // were the device's: the upstream stamps the event itself, and marks it when
                // its own clock is not set either.
                ts: match &e.boot {
                    Some(b) if !b.restamped => None,
                    _ => Some(e.ts),
                },
                id: Some(e.id.clone()),
                src: Some(e.device.clone()),
                class: Some(e.class.as_str().into()),
            }));
            if frame.len() as u64 > max_frame_bytes {
                let why = format!(
                    "a frame of {} bytes is more than the upstream takes ({max_frame_bytes})",
                    frame.len()
                );
                too_large.push((i, why.clone()));
                refused.push((i, why));
                continue;
            }
            frames.push((seq, i, frame));
        }
        if new > 0 || !too_large.is_empty() {
            // Durable before the first publish goes: a resend after any crash uses the same seq.
            self.rewrite(batch, |i, e| {
                let mut changed = e.tier_seq.is_none();
                e.tier_seq = Some(seqs[i]);
                if let Some((_, why)) = too_large.iter().find(|(j, _)| *j == i) {
                    e.tier_nack = Some(why.clone());
                    changed = true;
                }
                changed
            })
            .await;
        }
        let mut sent = Vec::with_capacity(frames.len());
        for (seq, i, frame) in frames {
            stream.push_body(&frame);
            *bytes += frame.len() as u64 + 4;
            sent.push((seq, i));
        }
        if let (Some(first), Some(last)) = (sent.first(), sent.last()) {
            tracing::debug!(
                publishes = sent.len(),
                first = first.0,
                last = last.0,
                upstream_mark = hwm,
                "tier: publishes sent to the upstream"
            );
        }
        // One deadline for the network; the store writes in between are not cut off by it.
        let deadline = tokio::time::Instant::now() + self.timeout;
        match by(deadline, self.timeout, stream.flush()).await? {
            // Fails only if the upstream stopped reading already; its answers still come.
            Ok(()) => drop(stream.finish()),
            // The upstream stopped reading (it answered busy, or refused the framing): it
            // still sends the answers it owes, and they must be read.
            Err(ClientError::Write(quinn::WriteError::Stopped(_))) => {}
            Err(e) => return Err(e.into()),
        }
        let mut x = Exchange::new(sent);
        while let Some(m) = by(deadline, self.timeout, stream.next()).await?? {
            if let Some((i, why)) = x.on(m)? {
                // Written as it comes, before anything else is read: the upstream's mark
                // covers this seq now, and a retry (after a broken connection, a timeout, a
                // stop or a crash) must still know the entry was refused.
                self.rewrite(batch, |j, e| {
                    e.tier_seq = Some(seqs[j]);
                    e.tier_nack = Some(why.clone());
                    j == i
                })
                .await;
            }
        }
        Ok(match x.finish() {
            Outcome::Settled { refused: nacked } => {
                refused.extend(nacked);
                refused.sort();
                refused.dedup_by_key(|(i, _)| *i);
                Outcome::Settled { refused }
            }
            o => o,
        })
    }
}

/// `fut` within `limit`.
async fn timed<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Failure> {
    by(tokio::time::Instant::now() + limit, limit, fut).await
}

/// `fut` by `deadline` (`limit` names it in the error).
async fn by<T>(
    deadline: tokio::time::Instant,
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Failure> {
    tokio::time::timeout_at(deadline, fut)
        .await
        .map_err(|_| Failure::Timeout(limit))
}

/// What an operator must fix, when a connection error says so: the TLS handshake failed on
/// either side (this gateway refused the upstream's certificate, or the upstream refused this
/// one: a QUIC CRYPTO_ERROR, which a client may see only at its first read or write), or the
/// upstream closed the connection as `wrong_role` or `revoked`.
fn needs_operator(e: &ClientError) -> Option<String> {
    let c = match e {
        ClientError::Tls(t) => return Some(format!("uplink.tier: {t}")),
        ClientError::Connection(c)
        | ClientError::Read(quinn::ReadError::ConnectionLost(c))
        | ClientError::Write(quinn::WriteError::ConnectionLost(c)) => c,
        _ => return None,
    };
    let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    let refused = match c {
        quinn::ConnectionError::TransportError(t) => crypto(t.code),
        quinn::ConnectionError::ConnectionClosed(close) => crypto(close.error_code),
        quinn::ConnectionError::ApplicationClosed(a) => [CloseCode::WrongRole, CloseCode::Revoked]
            .iter()
            .any(|code| u64::from(a.error_code) == *code as u64),
        _ => false,
    };
    refused.then(|| {
        format!(
            "the upstream refuses this gateway ({c}): check uplink.tier's certificate (issued by \
             the upstream for this gateway's id, not revoked) and ca_file (the upstream's ca.crt)"
        )
    })
}

/// The subject CN of the first certificate in `path`.
fn certificate_name(path: &Path) -> Result<String, TierSetupError> {
    let err = |msg: String| TierSetupError::Cert {
        path: path.display().to_string(),
        msg,
    };
    let certs = crate::pki::read_certs(path).map_err(|e| err(e.to_string()))?;
    let first = certs
        .first()
        .ok_or_else(|| err("no certificate in it".into()))?;
    crate::pki::common_name(first)
        .ok_or_else(|| err("the certificate has no CN, or more than one".into()))
}

impl Sink for TierSink {
    // The upstream dedupes by tier seq, and a seq is the entry's for good: the uplink retries
    // a failed batch as is, which also keeps entries that carry a seq ahead of new ones. Only
    // a batch refused whole (its seqs freed first) is split, as a refused one.
    const RETRY_AS_IS: bool = true;

    async fn send(&mut self, batch: &Batch) -> Sent {
        let mut bytes = 0;
        let result = self.attempt(batch, &mut bytes).await;
        let result = match result {
            Ok(Outcome::Settled { refused }) => match verdict(batch.entries.len(), refused) {
                Verdict::Delivered => SendResult::Delivered,
                Verdict::DeliveredExcept(refused) => SendResult::DeliveredExcept(refused),
                Verdict::AllRefused(why) => {
                    // Nothing of it ran upstream: new seqs when it goes again, in any order.
                    self.rewrite(batch, |_, e| {
                        e.tier_seq = None;
                        e.tier_nack = None;
                        true
                    })
                    .await;
                    SendResult::Reject(why)
                }
            },
            Ok(Outcome::Unsettled(why)) => SendResult::retry(why),
            Err(Failure::Client(e)) if needs_operator(&e).is_some() => {
                self.conn = None;
                SendResult::Retry {
                    alarm: true,
                    why: needs_operator(&e).unwrap_or_default(),
                }
            }
            Err(e @ (Failure::Protocol(_) | Failure::NoWelcome | Failure::SeqsUsedUp(_))) => {
                self.conn = None;
                SendResult::Retry {
                    alarm: true,
                    why: e.to_string(),
                }
            }
            Err(e) => {
                // The connection may be broken: make a new one for the retry.
                self.conn = None;
                SendResult::retry(e.to_string())
            }
        };
        Sent { result, bytes }
    }

    fn close(&mut self) {
        if let Some(d) = self.conn.take() {
            d.conn.close(0u32.into(), b"idle");
        }
    }

    fn must_go_first(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.resume)
    }
}
