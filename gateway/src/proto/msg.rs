//! The CBOR messages of wire protocol v1: decoding what devices send, encoding what the
//! gateway answers. Unknown keys are ignored. No I/O.

use bytes::Bytes;
use ciborium::Value;
use serde::Serialize;

/// A publish as the device sent it (shape checked, not yet policy-checked).
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub seq: u64,
    pub topic: String,
    pub payload: Bytes,
    /// Device timestamp, ms since the Unix epoch.
    pub ts: Option<u64>,
    /// Tiers: the origin's event id, the origin device and the class.
    pub id: Option<String>,
    pub src: Option<String>,
    pub class: Option<String>,
}

/// A message from a device.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceMsg {
    Publish(Publish),
    Hello,
}

/// A frame that is not a valid device message: answered with `nack bad_frame`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct BadFrame {
    /// The frame's `seq` when it had a readable one, else 0.
    pub seq: u64,
    pub reason: String,
}

fn bad(seq: u64, reason: impl Into<String>) -> BadFrame {
    BadFrame {
        seq,
        reason: reason.into(),
    }
}

/// A body that is not CBOR, said plainly (the nack's reason).
///
/// What ciborium 0.2 promises here, read in its source (`de/mod.rs`): `from_reader` nests at
/// most 256 deep (`recurse: 256`, then `RecursionLimitExceeded`), and a byte or text string
/// longer than its 4 KiB scratch is read chunk by chunk into a `Vec` that grows with the bytes
/// actually there, never reserved at the declared length; arrays and maps go through serde,
/// whose `size_hint::cautious` caps what is reserved. So a frame (at most `max_frame_bytes`)
/// cannot make the decoder reserve more than about its own size
/// (`tests/bad_input.rs::cbor_bombs_are_nacked_bad_frame_and_take_no_memory`).
fn not_cbor(e: ciborium::de::Error<std::io::Error>) -> BadFrame {
    use ciborium::de::Error;
    bad(
        0,
        match e {
            Error::Io(_) => {
                "not CBOR: the body ends inside an item (a length or a count larger than the frame)"
                    .to_string()
            }
            Error::Syntax(at) => format!("not CBOR: invalid at byte {at}"),
            Error::Semantic(Some(at), why) => format!("not CBOR: {why} at byte {at}"),
            Error::Semantic(None, why) => format!("not CBOR: {why}"),
            // ciborium's default limit, 256: deeper nesting is a stack-eating bomb, not a message.
            Error::RecursionLimitExceeded => "not CBOR: nested more than 256 deep".to_string(),
        },
    )
}

fn field<'a>(map: &'a [(Value, Value)], name: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.as_text() == Some(name))
        .map(|(_, v)| v)
}

fn as_u64(v: &Value) -> Option<u64> {
    v.as_integer().and_then(|i| u64::try_from(i).ok())
}

fn opt_text(map: &[(Value, Value)], name: &str, seq: u64) -> Result<Option<String>, BadFrame> {
    match field(map, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Text(t)) => Ok(Some(t.clone())),
        Some(_) => Err(bad(seq, format!("`{name}` must be text"))),
    }
}

/// Decodes one frame body. Datagrams use the same decoder with `require_seq = false`.
pub fn decode(body: &[u8], require_seq: bool) -> Result<DeviceMsg, BadFrame> {
    let value: Value = ciborium::from_reader(body).map_err(not_cbor)?;
    let Value::Map(map) = value else {
        return Err(bad(0, "frame is not a CBOR map"));
    };
    let seq = match field(&map, "seq") {
        None => None,
        Some(v) => Some(as_u64(v).ok_or_else(|| bad(0, "`seq` must be an unsigned integer"))?),
    };
    let nack_seq = seq.unwrap_or(0);
    let kind = match field(&map, "type") {
        Some(Value::Text(t)) => t.as_str(),
        Some(_) => return Err(bad(nack_seq, "`type` must be text")),
        None => return Err(bad(nack_seq, "missing `type`")),
    };
    match kind {
        "hello" => Ok(DeviceMsg::Hello),
        "publish" => {
            let seq = match (seq, require_seq) {
                (Some(0), _) => return Err(bad(0, "seq must be at least 1")),
                (Some(s), _) => s,
                (None, true) => return Err(bad(0, "missing `seq`")),
                (None, false) => 0,
            };
            let topic = match field(&map, "topic") {
                Some(Value::Text(t)) => t.clone(),
                Some(_) => return Err(bad(seq, "`topic` must be text")),
                None => return Err(bad(seq, "missing `topic`")),
            };
            let payload = match field(&map, "payload") {
                Some(Value::Bytes(b)) => Bytes::copy_from_slice(b),
                Some(_) => return Err(bad(seq, "`payload` must be a byte string")),
                None => return Err(bad(seq, "missing `payload`")),
            };
            let ts = match field(&map, "ts") {
                None | Some(Value::Null) => None,
                Some(v) => {
                    Some(as_u64(v).ok_or_else(|| bad(seq, "`ts` must be an unsigned integer"))?)
                }
            };
            Ok(DeviceMsg::Publish(Publish {
                seq,
                topic,
                payload,
                ts,
                id: opt_text(&map, "id", seq)?,
                src: opt_text(&map, "src", seq)?,
                class: opt_text(&map, "class", seq)?,
            }))
        }
        other => {
            let shown: String = other.chars().take(32).collect();
            Err(bad(nack_seq, format!("unknown type `{shown}`")))
        }
    }
}

/// Nack codes of wire protocol v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NackCode {
    Acl,
    TooLarge,
    BadTopic,
    BadFrame,
}

impl NackCode {
    pub const ALL: [NackCode; 4] = [
        NackCode::Acl,
        NackCode::TooLarge,
        NackCode::BadTopic,
        NackCode::BadFrame,
    ];

    /// Whether a nack with this code settles a publish and so moves the device's high-water
    /// mark. A `bad_frame` is not a valid publish: its seq (if it had one) moves nothing.
    pub fn moves_mark(self) -> bool {
        self != NackCode::BadFrame
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NackCode::Acl => "acl",
            NackCode::TooLarge => "too_large",
            NackCode::BadTopic => "bad_topic",
            NackCode::BadFrame => "bad_frame",
        }
    }
}

/// A message from the gateway to a device. Serializes as the wire's CBOR map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum GatewayMsg {
    Welcome {
        hwm: u64,
        max_frame_bytes: u64,
    },
    Ack {
        seq: u64,
    },
    Nack {
        seq: u64,
        code: NackCode,
        reason: String,
    },
    Busy {
        seq: u64,
        retry_after_ms: u64,
    },
}

impl GatewayMsg {
    /// Appends this message as one length-prefixed frame.
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        // Writing into a Vec cannot fail, and these types always serialize.
        ciborium::into_writer(self, &mut *out).expect("CBOR encoding into a Vec");
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

/// Decodes a gateway message (the device side: `tidepool send` and tests).
/// Returns `Ok(None)` for a message type this version does not know (devices ignore those).
pub fn decode_gateway(body: &[u8]) -> Result<Option<GatewayMsg>, BadFrame> {
    let value: Value = ciborium::from_reader(body).map_err(not_cbor)?;
    let Value::Map(map) = value else {
        return Err(bad(0, "frame is not a CBOR map"));
    };
    let num = |name: &str| {
        field(&map, name)
            .and_then(as_u64)
            .ok_or_else(|| bad(0, format!("missing `{name}`")))
    };
    let text = |name: &str| match field(&map, name) {
        Some(Value::Text(t)) => Ok(t.clone()),
        _ => Err(bad(0, format!("missing `{name}`"))),
    };
    Ok(Some(match text("type")?.as_str() {
        "welcome" => GatewayMsg::Welcome {
            hwm: num("hwm")?,
            max_frame_bytes: num("max_frame_bytes")?,
        },
        "ack" => GatewayMsg::Ack { seq: num("seq")? },
        "busy" => GatewayMsg::Busy {
            seq: num("seq")?,
            retry_after_ms: num("retry_after_ms")?,
        },
        "nack" => {
            let code = text("code")?;
            let code = NackCode::ALL
                .into_iter()
                .find(|c| c.as_str() == code)
                .ok_or_else(|| bad(0, format!("unknown nack code `{code}`")))?;
            GatewayMsg::Nack {
                seq: num("seq")?,
                code,
                reason: text("reason").unwrap_or_default(),
            }
        }
        _ => return Ok(None),
    }))
}

/// Encodes a device message body (no length prefix): the device side.
pub fn encode_device(msg: &DeviceMsg) -> Vec<u8> {
    let mut map = vec![];
    let t = |s: &str| Value::Text(s.to_string());
    match msg {
        DeviceMsg::Hello => map.push((t("type"), t("hello"))),
        DeviceMsg::Publish(p) => {
            map.push((t("type"), t("publish")));
            if p.seq > 0 {
                map.push((t("seq"), Value::Integer(p.seq.into())));
            }
            map.push((t("topic"), t(&p.topic)));
            map.push((t("payload"), Value::Bytes(p.payload.to_vec())));
            if let Some(ts) = p.ts {
                map.push((t("ts"), Value::Integer(ts.into())));
            }
            for (k, v) in [("id", &p.id), ("src", &p.src), ("class", &p.class)] {
                if let Some(v) = v {
                    map.push((t(k), t(v)));
                }
            }
        }
    }
    let mut out = Vec::new();
    ciborium::into_writer(&Value::Map(map), &mut out).expect("CBOR encoding into a Vec");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(v: Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(&v, &mut out).unwrap();
        out
    }

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn publish_round_trips_and_ignores_unknown_keys() {
        let p = Publish {
            seq: 42,
            topic: "devices/d1/temp".into(),
            payload: Bytes::from_static(b"{\"v\":1}"),
            ts: Some(7),
            id: None,
            src: None,
            class: None,
        };
        let mut body = encode_device(&DeviceMsg::Publish(p.clone()));
        // Append an unknown key by re-encoding with an extra entry.
        let Value::Map(mut m) = ciborium::from_reader::<Value, _>(&body[..]).unwrap() else {
            panic!()
        };
        m.push((t("future"), Value::Bool(true)));
        body = cbor(Value::Map(m));
        assert_eq!(decode(&body, true), Ok(DeviceMsg::Publish(p)));
    }

    #[test]
    fn wrong_shapes_are_bad_frames_with_the_seq_when_known() {
        let cases: Vec<(Vec<u8>, u64)> = vec![
            (vec![0xff, 0x00], 0),
            (cbor(Value::Array(vec![])), 0),
            (
                cbor(Value::Map(vec![
                    (t("type"), t("publish")),
                    (t("seq"), Value::Integer(0.into())),
                ])),
                0,
            ),
            (
                cbor(Value::Map(vec![
                    (t("type"), t("nope")),
                    (t("seq"), Value::Integer(5.into())),
                ])),
                5,
            ),
            (
                cbor(Value::Map(vec![(t("seq"), Value::Integer(5.into()))])),
                5,
            ),
            (
                cbor(Value::Map(vec![
                    (t("type"), t("publish")),
                    (t("seq"), Value::Integer(3.into())),
                    (t("topic"), t("a")),
                    (t("payload"), t("text, not bytes")),
                ])),
                3,
            ),
            (
                cbor(Value::Map(vec![
                    (t("type"), t("publish")),
                    (t("seq"), Value::Integer((-1).into())),
                ])),
                0,
            ),
        ];
        for (body, seq) in cases {
            let err = decode(&body, true).unwrap_err();
            assert_eq!(err.seq, seq, "{err}");
        }
    }

    #[test]
    fn gateway_messages_round_trip() {
        let msgs = [
            GatewayMsg::Welcome {
                hwm: 41,
                max_frame_bytes: 65536,
            },
            GatewayMsg::Ack { seq: 42 },
            GatewayMsg::Nack {
                seq: 43,
                code: NackCode::Acl,
                reason: "topic not allowed".into(),
            },
            GatewayMsg::Busy {
                seq: 44,
                retry_after_ms: 500,
            },
        ];
        let nacks = NackCode::ALL.map(|code| GatewayMsg::Nack {
            seq: 1,
            code,
            reason: String::new(),
        });
        for m in msgs.into_iter().chain(nacks) {
            let mut out = Vec::new();
            m.encode_frame(&mut out);
            let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
            assert_eq!(len, out.len() - 4);
            assert_eq!(decode_gateway(&out[4..]).unwrap(), Some(m));
        }
    }

    #[test]
    fn ack_encoding_is_the_documented_bytes() {
        let mut out = Vec::new();
        GatewayMsg::Ack { seq: 42 }.encode_frame(&mut out);
        // {"type":"ack","seq":42}
        let body = [
            0xa2, 0x64, b't', b'y', b'p', b'e', 0x63, b'a', b'c', b'k', 0x63, b's', b'e', b'q',
            0x18, 42,
        ];
        assert_eq!(&out[4..], &body);
    }
}
