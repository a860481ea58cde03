//! The JSON lines format of local test events, shared by `tidepool invoke` (which reads it),
//! the `[record]` recording and `tidepool dead-letters export` (which write it). One line is
//! an event, `{"topic": text, "payload": text}` or `"payload_b64"` for bytes that are not
//! UTF-8, with optional `device`, `seq` and `ts`; or a timer tick, `{"timer": true, "now_ms": N}`
//! with an optional `due_ms` (how late it is: `now_ms - due_ms`).
//! Writers may add fields (`received_ms`, `handler`, `reason`); readers ignore them. Pure.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// One line as written or read. Unknown fields are ignored on read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timer: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a line asks `invoke` to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Event {
        topic: String,
        payload: Vec<u8>,
        device: Option<String>,
        seq: Option<u64>,
        ts: Option<u64>,
    },
    Timer {
        now_ms: Option<u64>,
        /// When it fell due (default: `now_ms`, not late).
        due_ms: Option<u64>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("not a JSON object of the event format: {0}")]
    Json(String),
    #[error("an event needs a `topic` (or `\"timer\": true` for a timer tick)")]
    NoTopic,
    #[error("give `payload` or `payload_b64`, not both")]
    TwoPayloads,
    #[error("`payload_b64` is not valid base64: {0}")]
    Base64(String),
}

impl Line {
    /// An event line: the payload as text when it is UTF-8, as base64 otherwise.
    pub fn event(topic: &str, payload: &[u8]) -> Line {
        let (text, b64) = match std::str::from_utf8(payload) {
            Ok(t) => (Some(t.to_string()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(payload)),
            ),
        };
        Line {
            topic: Some(topic.to_string()),
            payload: text,
            payload_b64: b64,
            ..Line::default()
        }
    }

    /// The line as one line of JSON (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Line always serialises")
    }

    /// Parses and checks one line.
    pub fn parse(text: &str) -> Result<Input, LineError> {
        let l: Line = serde_json::from_str(text).map_err(|e| LineError::Json(e.to_string()))?;
        if l.timer {
            return Ok(Input::Timer {
                now_ms: l.now_ms,
                due_ms: l.due_ms,
            });
        }
        let topic = l.topic.ok_or(LineError::NoTopic)?;
        let payload = match (l.payload, l.payload_b64) {
            (Some(_), Some(_)) => return Err(LineError::TwoPayloads),
            (Some(t), None) => t.into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| LineError::Base64(e.to_string()))?,
            (None, None) => Vec::new(),
        };
        Ok(Input::Event {
            topic,
            payload,
            device: l.device,
            seq: l.seq,
            ts: l.ts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_as_base64_and_text_as_text() {
        let l = Line::event("devices/a/t", &[0xff, 0]);
        assert!(l.to_json().contains("payload_b64"));
        let Input::Event { payload, .. } = Line::parse(&l.to_json()).unwrap() else {
            panic!()
        };
        assert_eq!(payload, [0xff, 0]);
        let l = Line {
            device: Some("d1".into()),
            seq: Some(4),
            reason: Some("limit:fuel".into()),
            ..Line::event("devices/a/t", br#"{"v":1}"#)
        };
        assert_eq!(
            l.to_json(),
            r#"{"topic":"devices/a/t","payload":"{\"v\":1}","device":"d1","seq":4,"reason":"limit:fuel"}"#
        );
        assert_eq!(
            Line::parse(&l.to_json()).unwrap(),
            Input::Event {
                topic: "devices/a/t".into(),
                payload: br#"{"v":1}"#.to_vec(),
                device: Some("d1".into()),
                seq: Some(4),
                ts: None
            }
        );
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert_eq!(Line::parse(r#"{"payload":"x"}"#), Err(LineError::NoTopic));
        assert_eq!(
            Line::parse(r#"{"topic":"a","payload":"x","payload_b64":"eA=="}"#),
            Err(LineError::TwoPayloads)
        );
        assert!(matches!(Line::parse("[1]"), Err(LineError::Json(_))));
        assert!(matches!(
            Line::parse(r#"{"topic":"a","payload_b64":"%%"}"#),
            Err(LineError::Base64(_))
        ));
        assert_eq!(
            Line::parse(r#"{"timer":true,"now_ms":5}"#),
            Ok(Input::Timer {
                now_ms: Some(5),
                due_ms: None
            })
        );
    }
}
