//! The Tidepool sink: forwards go to an upstream Tidepool over the device protocol, this
//! gateway being a device there (its certificate issued by the upstream, named as this
//! gateway's id). Each entry is one publish with the entry's `id`, `src` (its device) and
//! `class`, on a topic from a template; a batch is one stream: `hello`, then the publishes
//! the upstream does not hold yet, in tier seq order, then the end of the stream, and the
//! upstream's answers until it ends its side.
//!
//! Tier seqs ([`exchange`]): given at an entry's first send, written into the entry and
//! synced before it goes, reused by every resend. The upstream's `welcome` says which seqs it
//! holds (its mark): those are not sent again, so a batch retried after a broken connection,
//! a `busy` or an upstream restart sends only what is missing. Entries that carry a seq go
//! before any new entry ([`Sink::must_go_first`] after a restart, the plan's as-is retry
//! while running), so the seqs reach the upstream rising.

pub mod exchange;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::client::{ClientError, Device};
use crate::config::TierConfig;
use crate::proto::msg::{DeviceMsg, GatewayMsg, Publish};
use crate::store::{keys, Store, StoreError};
use crate::uplink::template::Template;
use crate::uplink::{Batch, SendResult, Sent, Sink};
use exchange::{assign, Exchange, Outcome};

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
    #[error("writing the tier seqs: {0}")]
    Store(#[from] StoreError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Sends batches to one upstream Tidepool; connected only while the uplink is awake.
pub struct TierSink {
    gateway: String,
    upstream: String,
    config: TierConfig,
    topic: Template,
    timeout: Duration,
    store: Store,
    conn: Option<Device>,
    /// The highest tier seq given so far (in the outbox or sent).
    highest: u64,
    /// Outbox seqs of the entries that carried a tier seq at start, in tier seq order.
    resume: Vec<u64>,
    /// Nacks of entries not yet settled, by tier seq: a batch retried after a nack (the
    /// stream broke later) reports them again though the upstream's mark now covers them.
    nacked: BTreeMap<u64, String>,
}

impl TierSink {
    pub fn new(
        gateway: &str,
        url: &str,
        cfg: &TierConfig,
        timeout: Duration,
        store: Store,
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
            conn: None,
            highest: tier_seqs.iter().map(|(t, _)| *t).max().unwrap_or(0),
            // Entries given a seq before the restart go first, in seq order.
            resume: tier_seqs.iter().map(|(_, s)| *s).collect(),
            nacked: BTreeMap::new(),
        })
    }

    /// Writes the new tier seqs into their entries and syncs, before any of them is sent.
    async fn persist(&self, batch: &Batch, seqs: &[u64]) -> Result<(), StoreError> {
        let mut writes = sled::Batch::default();
        for ((o, e), t) in batch.seqs.iter().zip(&batch.entries).zip(seqs) {
            if e.tier_seq.is_none() {
                let mut e = e.clone();
                e.tier_seq = Some(*t);
                writes.insert(keys::outbox(*o), e.encode());
            }
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.commit(writes, Vec::new()))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    /// One attempt: connect if needed, `hello`, the publishes the upstream lacks, its answers.
    async fn attempt(&mut self, batch: &Batch, bytes: &mut u64) -> Result<Outcome, Failure> {
        if self.conn.is_none() {
            let c = &self.config;
            let d = Device::connect(&self.upstream, &c.ca_file, &c.cert_file, &c.key_file).await?;
            self.conn = Some(d);
        }
        let conn = self.conn.as_ref().ok_or(Failure::NoWelcome)?;
        let mut stream = conn.open().await?;
        stream.send(&DeviceMsg::Hello).await?;
        let Some(GatewayMsg::Welcome {
            hwm,
            max_frame_bytes,
        }) = stream.next().await?
        else {
            return Err(Failure::NoWelcome);
        };
        let current: Vec<Option<u64>> = batch.entries.iter().map(|e| e.tier_seq).collect();
        let (seqs, new) = assign(&current, hwm.max(self.highest));
        if new > 0 {
            self.persist(batch, &seqs).await?;
            self.highest = self.highest.max(seqs.iter().copied().max().unwrap_or(0));
        }
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i]);
        let mut sent = Vec::new();
        let mut refused = Vec::new();
        for i in order {
            let (seq, e) = (seqs[i], &batch.entries[i]);
            if seq <= hwm {
                // The upstream holds it (or nacked it, if this gateway saw the nack).
                if let Some(why) = self.nacked.get(&seq) {
                    refused.push((i, why.clone()));
                }
                continue;
            }
            let frame = crate::proto::msg::encode_device(&DeviceMsg::Publish(Publish {
                seq,
                topic: self.topic.render(&self.gateway, e),
                payload: e.payload.clone().into(),
                ts: Some(e.ts),
                id: Some(e.id.clone()),
                src: Some(e.device.clone()),
                class: Some(e.class.as_str().into()),
            }));
            if frame.len() as u64 > max_frame_bytes {
                refused.push((
                    i,
                    format!(
                        "a frame of {} bytes is more than the upstream takes ({max_frame_bytes})",
                        frame.len()
                    ),
                ));
                continue;
            }
            stream.push_body(&frame);
            *bytes += frame.len() as u64 + 4;
            sent.push((seq, i));
        }
        stream.flush().await?;
        stream.finish()?;
        if let (Some(first), Some(last)) = (sent.first(), sent.last()) {
            tracing::debug!(
                publishes = sent.len(),
                first = first.0,
                last = last.0,
                upstream_mark = hwm,
                "tier: publishes sent to the upstream"
            );
        }
        let mut x = Exchange::new(sent);
        while let Some(m) = stream.next().await? {
            if let GatewayMsg::Nack { seq, reason, code } = &m {
                self.nacked
                    .insert(*seq, format!("upstream nack {}: {reason}", code.as_str()));
            }
            x.on(m)?;
        }
        Ok(match x.finish() {
            Outcome::Settled { refused: more } => {
                for s in &seqs {
                    self.nacked.remove(s);
                }
                refused.extend(more);
                refused.sort();
                refused.dedup_by_key(|(i, _)| *i);
                Outcome::Settled { refused }
            }
            o => o,
        })
    }
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
    crate::pki::common_name(first).ok_or_else(|| err("the certificate has no CN".into()))
}

impl Sink for TierSink {
    // The upstream dedupes by tier seq, and a seq is the entry's for good: the uplink retries
    // a batch as is (never splits it), which also keeps entries that carry a seq ahead of new
    // ones.
    const RETRY_AS_IS: bool = true;

    async fn send(&mut self, batch: &Batch) -> Sent {
        let mut bytes = 0;
        let r = tokio::time::timeout(self.timeout, self.attempt(batch, &mut bytes)).await;
        let result = match r {
            Err(_) => Err(Failure::Timeout(self.timeout)),
            Ok(r) => r,
        };
        let result = match result {
            Ok(Outcome::Settled { refused }) => {
                if refused.is_empty() {
                    SendResult::Delivered
                } else {
                    SendResult::DeliveredExcept(refused)
                }
            }
            Ok(Outcome::Unsettled(why)) => SendResult::retry(why),
            Err(Failure::Client(ClientError::Tls(e))) => SendResult::Retry {
                alarm: true,
                why: format!("uplink.tier: {e}"),
            },
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
