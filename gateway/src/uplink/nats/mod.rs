//! The NATS JetStream sink (cargo feature `nats`): each entry of a batch is published to a
//! subject made from a template, with `Nats-Msg-Id` = its id, and counts only on its PubAck from
//! the stream. JetStream drops a message whose id it has seen within the stream's duplicate
//! window, so the uplink's at-least-once retries become exactly once in the stream, provided
//! the window covers the longest time between the first attempt and the last retry of an entry
//! (the longest outage to ride out). A batch is delivered only when every PubAck arrived;
//! anything else drops the connection and answers `Retry`.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;

use crate::config::NatsConfig;
use crate::uplink::template::Template;
use crate::uplink::{Batch, SendResult, Sent, Sink};

/// What a NATS subject to publish to may not hold.
pub const FORBIDDEN: &[char] = &['*', '>', ' ', '\t', '\r', '\n'];

/// Errors in the NATS settings, found at start.
#[derive(Debug, thiserror::Error)]
pub enum NatsSetupError {
    #[error("uplink.url `{0}`: a NATS server is nats://HOST:PORT (or tls://HOST:PORT)")]
    Url(String),
    #[error("uplink.nats.subject: {0}")]
    Subject(String),
}

/// Publishes batches to one JetStream; connected only while the uplink is awake.
pub struct NatsSink {
    url: String,
    subject: Template,
    gateway: String,
    cfg: NatsConfig,
    timeout: Duration,
    js: Option<jetstream::Context>,
}

impl NatsSink {
    pub fn new(
        gateway: &str,
        url: &str,
        cfg: &NatsConfig,
        timeout: Duration,
    ) -> Result<NatsSink, NatsSetupError> {
        if !(url.starts_with("nats://") || url.starts_with("tls://")) {
            return Err(NatsSetupError::Url(url.into()));
        }
        Ok(NatsSink {
            url: url.into(),
            subject: Template::parse(&cfg.subject, FORBIDDEN).map_err(NatsSetupError::Subject)?,
            gateway: gateway.into(),
            cfg: cfg.clone(),
            timeout,
            js: None,
        })
    }

    async fn connect(&self) -> Result<jetstream::Context, String> {
        let opts = async_nats::ConnectOptions::new()
            .connection_timeout(self.timeout)
            .request_timeout(Some(self.timeout))
            .name(format!("tidepool-{}", self.gateway));
        let client = async_nats::connect_with_options(self.url.as_str(), opts)
            .await
            .map_err(|e| format!("NATS: {e}"))?;
        let js = jetstream::new(client);
        if !self.cfg.stream.is_empty() {
            // Made when missing, with the duplicate window the delivery promise needs.
            let config = stream::Config {
                name: self.cfg.stream.clone(),
                subjects: self.cfg.stream_subjects.clone(),
                duplicate_window: Duration::from_secs(self.cfg.duplicate_window_s),
                ..Default::default()
            };
            js.get_or_create_stream(config)
                .await
                .map_err(|e| format!("JetStream stream `{}`: {e}", self.cfg.stream))?;
        }
        Ok(js)
    }

    async fn publish_all(&mut self, batch: &Batch) -> (SendResult, u64) {
        let js = match &self.js {
            Some(js) => js.clone(),
            None => match tokio::time::timeout(self.timeout, self.connect()).await {
                Ok(Ok(js)) => {
                    self.js = Some(js.clone());
                    js
                }
                Ok(Err(why)) => return (SendResult::retry(why), 0),
                Err(_) => {
                    return (
                        SendResult::retry(format!("NATS: no connection within {:?}", self.timeout)),
                        0,
                    )
                }
            },
        };
        // A subject the server can never take (whitespace, an empty token) would fail the batch
        // for good: refuse it here, so the uplink bisects to the entry and dead-letters it.
        for e in &batch.entries {
            let subject = self.subject.render(&self.gateway, e);
            if subject.chars().any(char::is_whitespace) || subject.split('.').any(str::is_empty) {
                return (
                    SendResult::Reject(format!(
                        "NATS subject `{}` has whitespace or an empty token",
                        subject.escape_debug()
                    )),
                    0,
                );
            }
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut bytes = 0u64;
        let mut acks = Vec::with_capacity(batch.entries.len());
        for e in &batch.entries {
            let subject = self.subject.render(&self.gateway, e);
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", e.id.as_str());
            headers.insert("Tidepool-Class", e.class.as_str());
            headers.insert("Tidepool-Device", e.device.as_str());
            bytes += (subject.len() + e.payload.len()) as u64;
            let publish = js.publish_with_headers(subject, headers, e.payload.clone().into());
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(ack)) => acks.push(ack),
                Ok(Err(err)) => return (judge(&err), bytes),
                Err(_) => return (SendResult::retry("NATS publish timed out".into()), bytes),
            }
        }
        let mut duplicates = 0;
        for ack in acks {
            match tokio::time::timeout_at(deadline, ack.into_future()).await {
                // A duplicate is an entry the stream already holds: delivered too.
                Ok(Ok(ack)) => duplicates += usize::from(ack.duplicate),
                Ok(Err(err)) => return (judge(&err), bytes),
                Err(_) => {
                    return (
                        SendResult::retry(format!("no PubAck within {:?}", self.timeout)),
                        bytes,
                    )
                }
            }
        }
        if duplicates > 0 {
            tracing::debug!(batch = %batch.id, duplicates, "JetStream already held these ids (an earlier attempt's copies): dropped as duplicates");
        }
        (SendResult::Delivered, bytes)
    }
}

/// What a publish or PubAck error means for the batch.
fn judge(err: &jetstream::context::PublishError) -> SendResult {
    use jetstream::context::PublishErrorKind as K;
    match err.kind() {
        K::StreamNotFound => SendResult::Retry {
            alarm: true,
            why: format!("JetStream: {err}: no stream takes these subjects (create one, or set uplink.nats.stream)"),
        },
        // Too large for the server: split, down to the entry, which is dead-lettered.
        K::MaxPayloadExceeded => SendResult::Split,
        _ => SendResult::retry(format!("JetStream: {err}")),
    }
}

impl Sink for NatsSink {
    const RETRY_AS_IS: bool = false;

    async fn send(&mut self, batch: &Batch) -> Sent {
        let (result, bytes) = self.publish_all(batch).await;
        if result != SendResult::Delivered {
            self.js = None;
        }
        Sent { result, bytes }
    }

    fn close(&mut self) {
        // Dropping the last handle closes the connection.
        self.js = None;
    }
}
