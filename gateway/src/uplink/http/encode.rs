//! The HTTP sink's encoder (pure): the JSON body of the design's contract and the status-code
//! map.

use base64::Engine as _;
use serde::Serialize;

use crate::outbox::Entry;
use crate::uplink::SendResult;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Class;

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
            tier_seq: None,
            tier_nack: None,
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
