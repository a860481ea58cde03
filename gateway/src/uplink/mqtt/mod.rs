//! The MQTT sink: each entry of a batch is one QoS 1 PUBLISH (MQTT 5, rumqttc) on a topic made
//! from a template ([`Template`]), with the entry's payload as is and its `id`, `class` and
//! `device` in user properties; a batch is delivered only when every PUBACK arrived with a
//! success code. Anything else (no connection, a timeout, a broken connection, a failure code)
//! drops the connection and answers `Retry` (or `Reject` for codes that name the content), so
//! the uplink retries the whole batch: at least once, deduped by `id` downstream.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use crate::config::MqttConfig;
use crate::uplink::template::Template;
use crate::uplink::{Batch, SendResult, Sent, Sink};

/// What an MQTT topic to publish to may not hold.
pub const FORBIDDEN: &[char] = &['+', '#'];

/// Errors in the MQTT settings, found at start.
#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("uplink.url `{0}`: an MQTT broker is mqtt://HOST:PORT or mqtts://HOST:PORT")]
    Url(String),
    #[error("uplink.mqtt.topic: {0}")]
    Topic(String),
    #[error("uplink.mqtt.ca_file {path}: {msg}")]
    Ca { path: String, msg: String },
}

/// Publishes batches to one broker; connected only while the uplink is awake.
pub struct MqttSink {
    options: MqttOptions,
    topic: Template,
    gateway: String,
    timeout: Duration,
    conn: Option<(AsyncClient, EventLoop)>,
}

impl MqttSink {
    pub fn new(
        gateway: &str,
        url: &str,
        cfg: &MqttConfig,
        timeout: Duration,
    ) -> Result<MqttSink, MqttSetupError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(MqttSetupError::Url(url.into()));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| MqttSetupError::Url(url.into()))?,
            ),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(MqttSetupError::Url(url.into()));
        }
        let client_id = if cfg.client_id.is_empty() {
            format!("tidepool-{gateway}")
        } else {
            cfg.client_id.clone()
        };
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(cfg.keep_alive_s.max(5)));
        // Without a cap rumqttc sizes its in-flight table for 65,535 publishes (~14 MB made on
        // every connect); the broker's own receive maximum still applies below this.
        options.set_outgoing_inflight_upper_limit(100);
        options.set_clean_start(true);
        if !cfg.username.is_empty() {
            options.set_credentials(cfg.username.clone(), cfg.password.clone());
        }
        if tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls_config(&cfg.ca_file)?),
            )));
        }
        Ok(MqttSink {
            options,
            topic: Template::parse(&cfg.topic, FORBIDDEN).map_err(MqttSetupError::Topic)?,
            gateway: gateway.into(),
            timeout,
            conn: None,
        })
    }

    async fn publish_all(&mut self, batch: &Batch) -> (SendResult, u64) {
        // A topic a broker refuses (by dropping the connection, as Mosquitto does for control
        // characters) would fail the batch for good: refuse it here, so the uplink bisects to
        // the entry and dead-letters it.
        for e in &batch.entries {
            let topic = self.topic.render(&self.gateway, e);
            if topic.len() > 65_535 || topic.chars().any(|c| c.is_control()) {
                return (
                    SendResult::Reject(format!(
                        "MQTT topic `{}` has control characters or is too long",
                        topic.escape_debug()
                    )),
                    0,
                );
            }
        }
        let capacity = batch.entries.len().max(1);
        let (client, eventloop) = self
            .conn
            .get_or_insert_with(|| AsyncClient::new(self.options.clone(), capacity + 16));
        // Bytes count once a publish is written (`Outgoing::Publish`), in queue order.
        let mut bytes = 0u64;
        let mut sizes: Vec<u64> = Vec::with_capacity(batch.entries.len());
        let mut written = 0;
        let mut queued = 0;
        let mut unacked: HashSet<u16> = HashSet::new();
        let mut acked = 0;
        let mut refused: Option<SendResult> = None;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            // Hand rumqttc what its queue takes; the rest after it drained some.
            while queued < batch.entries.len() {
                let e = &batch.entries[queued];
                let topic = self.topic.render(&self.gateway, e);
                let props = PublishProperties {
                    user_properties: vec![
                        ("id".into(), e.id.clone()),
                        ("class".into(), e.class.as_str().into()),
                        ("device".into(), e.device.clone()),
                    ],
                    ..PublishProperties::default()
                };
                let len = (topic.len() + e.payload.len()) as u64;
                match client.try_publish_with_properties(
                    topic,
                    QoS::AtLeastOnce,
                    false,
                    e.payload.clone(),
                    props,
                ) {
                    Ok(()) => {
                        sizes.push(len);
                        queued += 1;
                    }
                    Err(rumqttc::v5::ClientError::TryRequest(_)) => break,
                    Err(e) => return (SendResult::retry(format!("MQTT client: {e}")), bytes),
                }
            }
            if acked == batch.entries.len() {
                return (refused.unwrap_or(SendResult::Delivered), bytes);
            }
            let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Err(_) => {
                    let why = format!(
                        "no PUBACK for {} of {} events within {:?}",
                        batch.entries.len() - acked,
                        batch.entries.len(),
                        self.timeout
                    );
                    return (SendResult::retry(why), bytes);
                }
                Ok(Err(e)) => return (SendResult::retry(format!("MQTT: {e}")), bytes),
                Ok(Ok(ev)) => ev,
            };
            match event {
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    unacked.insert(pkid);
                    bytes += sizes.get(written).copied().unwrap_or(0);
                    written += 1;
                }
                Event::Incoming(Packet::PubAck(ack)) if unacked.remove(&ack.pkid) => {
                    acked += 1;
                    if let Some(r) = judge(ack.reason) {
                        // The worst answer of the batch wins: a content refusal over a retry.
                        if !matches!(refused, Some(SendResult::Reject(_))) {
                            refused = Some(r);
                        }
                    }
                }
                // We subscribe to nothing: a PUBLISH to us is a hostile or broken broker, and
                // rumqttc would keep every topic alias it names (up to 65,535 topics of up to
                // 10 KiB) for the connection's life. The connection is dropped with the batch.
                Event::Incoming(Packet::Publish(_)) => {
                    return (
                        SendResult::Retry {
                            alarm: true,
                            why: "the broker sent a PUBLISH, though the gateway subscribes to nothing (an auto-subscribe on the broker?); the connection is dropped each time".into(),
                        },
                        bytes,
                    )
                }
                Event::Incoming(Packet::Disconnect(d)) => {
                    return (
                        SendResult::retry(format!("the broker disconnected: {:?}", d.reason_code)),
                        bytes,
                    )
                }
                _ => {}
            }
        }
    }
}

/// What a PUBACK's reason code means for the batch (None: accepted).
fn judge(reason: PubAckReason) -> Option<SendResult> {
    match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
        PubAckReason::TopicNameInvalid | PubAckReason::PayloadFormatInvalid => {
            Some(SendResult::Reject(format!("MQTT PUBACK {reason:?}")))
        }
        PubAckReason::NotAuthorized => Some(SendResult::Retry {
            alarm: true,
            why: "MQTT PUBACK NotAuthorized: check the broker's ACL for the topic and the credentials".into(),
        }),
        other => Some(SendResult::Retry {
            alarm: false,
            why: format!("MQTT PUBACK {other:?}"),
        }),
    }
}

fn tls_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, MqttSetupError> {
    let err = |msg: String| MqttSetupError::Ca {
        path: ca_file.display().to_string(),
        msg,
    };
    if ca_file.as_os_str().is_empty() {
        return Err(err(
            "mqtts:// needs a CA file (the broker's CA, or the system bundle, e.g. /etc/ssl/certs/ca-certificates.crt)".into(),
        ));
    }
    let roots = crate::pki::root_store(ca_file).map_err(|e| err(e.to_string()))?;
    crate::uplink::tls_client(roots).map_err(|e| err(e.to_string()))
}

impl Sink for MqttSink {
    const RETRY_AS_IS: bool = false;

    async fn send(&mut self, batch: &Batch) -> Sent {
        let (result, bytes) = self.publish_all(batch).await;
        if result != SendResult::Delivered {
            // Unacked publishes die with the connection; the uplink sends the batch again.
            self.conn = None;
        }
        Sent { result, bytes }
    }

    fn close(&mut self) {
        if let Some((client, _)) = self.conn.take() {
            let _ = client.try_disconnect();
        }
    }
}
