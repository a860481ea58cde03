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
    /// The design's optional fields, for a `ts` the gateway took from its own clock before
    /// that clock was set: `"unsynced"` (the receipt time by an unset clock; `boot_id` and
    /// `mono_ms` say when in which boot), or `"synced"` once it was computed again from them.
    #[serde(skip_serializing_if = "Option::is_none")]
    clock: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mono_ms: Option<u64>,
}

/// The request body for a batch: `{"gateway","batch","events":[{id,device,topic,class,ts,payload_b64}]}`,
/// each event with `clock`, `boot_id` and `mono_ms` when its `ts` came from an unset clock.
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
            clock: e
                .boot
                .as_ref()
                .map(|b| if b.restamped { "synced" } else { "unsynced" }),
            // An unreadable boot id (empty) places nothing: left out.
            boot_id: e
                .boot
                .as_ref()
                .map(|b| b.boot_id.as_str())
                .filter(|id| !id.is_empty()),
            mono_ms: e.boot.as_ref().map(|b| b.mono_ms),
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
            boot: None,
        };
        let b = body("gw", "gw-1-1", &[e]);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            r#"{"gateway":"gw","batch":"gw-1-1","events":[{"id":"gw:d1:7:threshold:0","device":"d1","topic":"devices/d1/temp","class":"urgent","ts":1700000000000,"payload_b64":"eyJ2IjozMX0="}]}"#
        );
    }

    #[test]
    fn a_ts_from_an_unset_clock_carries_the_optional_clock_fields() {
        let mut e = Entry {
            id: "gw:d1:7:threshold:0".into(),
            device: "d1".into(),
            topic: "t".into(),
            class: Class::Normal,
            ts: 100_000,
            queued_ms: 100_000,
            payload: b"{}".to_vec(),
            tier_seq: None,
            tier_nack: None,
            boot: Some(crate::outbox::BootTime {
                boot_id: "b1".into(),
                mono_ms: 5_000,
                restamped: false,
            }),
        };
        let text = |e: &Entry| String::from_utf8(body("gw", "b", std::slice::from_ref(e))).unwrap();
        assert!(
            text(&e).ends_with(r#""ts":100000,"payload_b64":"e30=","clock":"unsynced","boot_id":"b1","mono_ms":5000}]}"#),
            "{}",
            text(&e)
        );
        assert!(e.restamp("b1", 1_800_000_000_000, 65_000));
        assert!(
            text(&e).ends_with(r#""ts":1799999940000,"payload_b64":"e30=","clock":"synced","boot_id":"b1","mono_ms":5000}]}"#),
            "{}",
            text(&e)
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
