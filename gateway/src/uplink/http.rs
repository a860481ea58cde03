//! The HTTP sink: the JSON body of the design's contract, the `Idempotency-Key`, and the
//! status-code map. The body and the map are pure; [`HttpSink`] moves the bytes.

use std::time::Duration;

use base64::Engine as _;
use serde::Serialize;

use super::{Batch, SendResult};
use crate::outbox::Entry;

#[derive(Serialize)]
struct Body<'a> {
    gateway: &'a str,
    batch: &'a str,
    events: Vec<Event<'a>>,
}

#[derive(Serialize)]
struct Event<'a> {
    id: &'a str,
    device: &'a str,
    topic: &'a str,
    class: &'a str,
    ts: u64,
    payload_b64: String,
}

/// The request body for a batch: `{"gateway","batch","events":[{id,device,topic,class,ts,payload_b64}]}`.
pub fn body(gateway: &str, batch: &str, entries: &[Entry]) -> Vec<u8> {
    let events = entries
        .iter()
        .map(|e| Event {
            id: &e.id,
            device: &e.device,
            topic: &e.topic,
            class: e.class.as_str(),
            ts: e.ts,
            payload_b64: base64::engine::general_purpose::STANDARD.encode(&e.payload),
        })
        .collect();
    serde_json::to_vec(&Body {
        gateway,
        batch,
        events,
    })
    .expect("JSON encoding into a Vec")
}

/// The design's status map.
pub fn classify(status: u16) -> SendResult {
    match status {
        200..=299 => SendResult::Delivered,
        401 | 403 | 404 => SendResult::Retry {
            alarm: true,
            why: format!("HTTP {status}: check the uplink URL and credentials"),
        },
        408 | 429 | 500..=599 => SendResult::Retry {
            alarm: false,
            why: format!("HTTP {status}"),
        },
        413 => SendResult::Split,
        400 | 422 => SendResult::Reject(format!("HTTP {status}")),
        other => SendResult::Retry {
            alarm: true,
            why: format!("unexpected HTTP {other}"),
        },
    }
}

/// Posts batches to one URL. The connection pool lives only while the uplink is awake.
pub struct HttpSink {
    url: String,
    timeout: Duration,
    client: Option<reqwest::Client>,
}

impl HttpSink {
    pub fn new(url: String, timeout: Duration) -> Self {
        HttpSink {
            url,
            timeout,
            client: None,
        }
    }
}

impl super::Sink for HttpSink {
    async fn send(&mut self, batch: &Batch) -> SendResult {
        if self.client.is_none() {
            // No redirects: a POST turned into a GET by a 30x must not count as delivered.
            let builder = reqwest::Client::builder()
                .timeout(self.timeout)
                .redirect(reqwest::redirect::Policy::none());
            match builder.build() {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    return SendResult::Retry {
                        alarm: true,
                        why: format!("HTTP client: {e}"),
                    }
                }
            }
        }
        let Some(client) = &self.client else {
            unreachable!("client set above")
        };
        let req = client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &batch.id)
            .body(batch.body.clone());
        match req.send().await {
            Ok(resp) => classify(resp.status().as_u16()),
            Err(e) => {
                // The connection may be broken: start a fresh one next time.
                self.client = None;
                SendResult::Retry {
                    alarm: false,
                    why: format!("{e}"),
                }
            }
        }
    }

    fn close(&mut self) {
        self.client = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Class;

    #[test]
    fn body_has_the_exact_contract_shape() {
        let e = Entry {
            id: "gw:d1:7:threshold:0".into(),
            device: "d1".into(),
            topic: "devices/d1/temp".into(),
            class: Class::Urgent,
            ts: 1700000000000,
            queued_ms: 0,
            payload: b"{\"v\":31}".to_vec(),
        };
        let b = body("gw", "gw-1-1", &[e]);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            r#"{"gateway":"gw","batch":"gw-1-1","events":[{"id":"gw:d1:7:threshold:0","device":"d1","topic":"devices/d1/temp","class":"urgent","ts":1700000000000,"payload_b64":"eyJ2IjozMX0="}]}"#
        );
    }

    #[test]
    fn status_map() {
        assert_eq!(classify(204), SendResult::Delivered);
        for s in [408, 429, 500, 503] {
            assert!(
                matches!(classify(s), SendResult::Retry { alarm: false, .. }),
                "{s}"
            );
        }
        for s in [401, 403, 404] {
            assert!(
                matches!(classify(s), SendResult::Retry { alarm: true, .. }),
                "{s}"
            );
        }
        assert_eq!(classify(413), SendResult::Split);
        assert!(matches!(classify(422), SendResult::Reject(_)));
        assert!(matches!(classify(400), SendResult::Reject(_)));
    }
}
