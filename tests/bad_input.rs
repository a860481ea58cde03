//! The bad-input suite: what a broken or hostile peer sends on purpose, each answered clearly
//! and changing nothing it should not, against the real binary. Beside it, where their features
//! are: malformed frames, zero and huge frame lengths, seq 0, repeated and lower seqs, unknown
//! types and the wrong role (`e2e.rs`); a bad frame moves no mark (`delivery.rs`); stalled and
//! slowloris handshakes (a client that keeps resending its Initial and never finishes), expired
//! and revoked certificates, a flooding device (`network.rs`); hostile handlers (`hostile.rs`);
//! and the fuzz targets (`scripts/fuzz.sh`). `docs/security.md` maps them to the threat model.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tidepool::proto::msg::{GatewayMsg, NackCode};

/// Seqs may jump, up to the very last one; once a device's mark is 2^64-1, everything it sends
/// is a resend, acked again and never run.
#[tokio::test]
async fn seqs_may_jump_to_the_last_one_and_past_it_everything_is_a_resend() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&wat_handler(
        dir.path(),
        "counter",
        COUNTER_WAT,
        "subscribe = [\"devices/#\"]\n",
    ));
    let dev = gw.connect("edge").await;
    let mut s = dev.open().await.unwrap();
    for seq in [1, 1_000_000, u64::MAX - 1, u64::MAX] {
        s.push(&publish(seq, "devices/edge/x", b"1"));
    }
    s.flush().await.unwrap();
    let seen = until_ack(&mut s, u64::MAX).await;
    assert!(
        !seen.iter().any(|m| matches!(m, GatewayMsg::Nack { .. })),
        "{seen:?}"
    );
    end_stream(s).await;
    // On new streams (on one, a seq must rise): the last seq again, and one far below; both
    // are resends.
    let mut answers = Vec::new();
    for seq in [u64::MAX, 5] {
        let mut s = dev.open().await.unwrap();
        s.send(&publish(seq, "devices/edge/x", b"1")).await.unwrap();
        answers.push(next_msg(&mut s).await.expect("an answer"));
        end_stream(s).await;
    }
    let mut s = dev.open().await.unwrap();
    s.send(&tidepool::proto::msg::DeviceMsg::Hello)
        .await
        .unwrap();
    answers.push(next_msg(&mut s).await.expect("an answer"));
    assert_eq!(
        answers,
        vec![
            GatewayMsg::Ack { seq: u64::MAX },
            GatewayMsg::Ack { seq: 5 },
            GatewayMsg::Welcome {
                hwm: u64::MAX,
                max_frame_bytes: 65536
            }
        ]
    );
    dev.close().await;
    let m = gw.stop();
    assert_eq!(m["resends"], 2, "{m}");
    let n = read_state(&gw.data(), "counter", b"n").expect("counted");
    assert_eq!(
        n,
        4u64.to_le_bytes(),
        "four events ran, the resends did not"
    );
}

/// CBOR built to cost the decoder: deep nesting (definite and indefinite), and byte strings,
/// text, arrays and maps declaring lengths up to 2^64-1 they do not have. Each is nacked
/// `bad_frame` with seq 0, takes no memory worth speaking of, and the stream goes on.
#[tokio::test]
async fn cbor_bombs_are_nacked_bad_frame_and_take_no_memory() {
    let mut gw = Gateway::start("[router]\nunrouted = \"drop\"\n");
    let dev = gw.connect("bomb").await;
    let before = gw.peak_rss();
    let mut s = dev.open().await.unwrap();
    let head = |n: u8| {
        // A map of 5 pairs: type, seq, topic, payload, and "x" whose value follows.
        let mut b = vec![0xa0 | n];
        for (k, v) in [("type", "publish"), ("topic", "devices/bomb/x")] {
            b.extend([0x60 | k.len() as u8]);
            b.extend(k.as_bytes());
            b.extend([0x60 | v.len() as u8]);
            b.extend(v.as_bytes());
        }
        b.extend([0x63, b's', b'e', b'q', 0x01, 0x67]);
        b.extend(b"payload");
        b.extend([0x41, b'1', 0x61, b'x']);
        b
    };
    let nested = |open: u8, close: &[u8]| {
        let mut b = head(5);
        b.extend(std::iter::repeat_n(open, 60_000));
        b.push(0x00);
        for _ in 0..60_000 {
            b.extend(close);
        }
        b.truncate(65_000);
        b
    };
    let bombs: Vec<(&str, Vec<u8>)> = vec![
        ("60k nested arrays", nested(0x81, &[])),
        ("nested indefinite arrays", nested(0x9f, &[0xff])),
        ("nested maps", nested(0xa1, &[0x00])),
        ("60k nested arrays, bare", {
            let mut b = vec![0x81; 60_000];
            b.push(0);
            b
        }),
        ("bytes of 2^63", {
            let mut b = head(5);
            b.extend([
                0x5b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3,
            ]);
            b
        }),
        ("text of 2^64-1", {
            let mut b = head(5);
            b.extend([0x7b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, b'a']);
            b
        }),
        ("array of 2^64-1", {
            let mut b = head(5);
            b.extend([0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
            b
        }),
        (
            "map of 2^32-1 pairs",
            vec![0xba, 0xff, 0xff, 0xff, 0xff, 0x61, b'a', 0],
        ),
        ("a map of 6 with 5", head(6)),
    ];
    let mut raw = Vec::new();
    for (_, b) in &bombs {
        tidepool::proto::frame::encode(b, &mut raw);
    }
    s.send_raw(&raw).await.unwrap();
    s.send(&publish(1, "devices/bomb/x", b"1")).await.unwrap();
    let seen = until_ack(&mut s, 1).await;
    let nacks: Vec<_> = seen
        .iter()
        .filter_map(|m| match m {
            GatewayMsg::Nack { seq, code, reason } => Some((*seq, *code, reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(nacks.len(), bombs.len(), "one nack per bomb: {seen:?}");
    for ((name, _), (seq, code, reason)) in bombs.iter().zip(&nacks) {
        assert_eq!((*seq, *code), (0, NackCode::BadFrame), "{name}: {reason}");
        let plain = reason.contains("nested more than 256 deep")
            || reason.contains("the body ends inside an item");
        assert!(plain, "{name}: a reason a person can read, not {reason:?}");
    }
    let grew = gw.peak_rss().saturating_sub(before);
    eprintln!(
        "peak RSS grew by {} KiB over {} bombs; nacks: {nacks:?}",
        grew / 1024,
        bombs.len()
    );
    assert!(grew < 32 << 20, "the bombs took {} MiB", grew >> 20);
    dev.close().await;
    let m = gw.stop();
    assert_eq!(m["nacks"], bombs.len() as u64, "{m}");
}

/// Device certificates from the box's own device CA whose CN is not a device id: topic
/// wildcards, a level separator, dot levels, 65 characters, a control character, no CN, two
/// CNs. Each is closed with `wrong_role` (4) right after the handshake, and nothing registers;
/// a well-named device from the same CA gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_whose_cn_is_not_a_device_id_are_closed_and_nothing_registers() {
    let mut gw = Gateway::start("");
    let dir = tempfile::tempdir().unwrap();
    let long = "a".repeat(65);
    let names: Vec<(&str, Vec<&str>)> = vec![
        ("plus", vec!["+"]),
        ("hash", vec!["#"]),
        ("slash", vec!["a/b"]),
        ("dot", vec!["."]),
        ("dotdot", vec![".."]),
        ("long", vec![&long]),
        ("control", vec!["a\u{1}b"]),
        ("space", vec!["a b"]),
        ("none", vec![]),
        ("two", vec!["a", "b"]),
    ];
    for (file, cns) in &names {
        let (crt, key, ca) = gw.odd_device_cert(dir.path(), file, |p| {
            for (i, cn) in cns.iter().enumerate() {
                // rcgen keeps one value per type: a second CN goes in under the CN's OID.
                let kind = match i {
                    0 => rcgen::DnType::CommonName,
                    _ => rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]),
                };
                p.distinguished_name.push(kind, *cn);
            }
        });
        let config = tidepool::ingress::tls::client_config(&ca, &crt, &key).unwrap();
        let closed = match tidepool::client::Device::connect_with(&gw.addr, config).await {
            Err(e) => format!("refused: {e}"),
            Ok(d) => {
                let end = tokio::time::timeout(Duration::from_secs(10), d.conn.closed())
                    .await
                    .unwrap_or_else(|_| panic!("{file}: the gateway closes the connection"));
                match end {
                    quinn::ConnectionError::ApplicationClosed(c) => {
                        assert_eq!(c.error_code, quinn::VarInt::from_u32(4), "{file}");
                        String::from_utf8_lossy(&c.reason).into_owned()
                    }
                    other => panic!("{file}: {other}"),
                }
            }
        };
        assert_eq!(closed, "bad device id", "{file} ({cns:?})");
    }
    // A 64-character id is the longest that gets in.
    let max = "b".repeat(64);
    let d = gw.connect(&max).await;
    let mut s = d.open().await.unwrap();
    s.send(&publish(1, &format!("devices/{max}/x"), b"1"))
        .await
        .unwrap();
    until_ack(&mut s, 1).await;
    d.close().await;
    let m = gw.stop();
    assert_eq!(
        m["connections"], 1,
        "only the well-named device registered: {m}"
    );
}

/// Ten thousand connection attempts with no client certificate, 500 at a time from one
/// address: each is answered (a refusal, a Retry then a refusal, or a failed handshake), none
/// registers, the gateway's memory stays bounded, and a device gets in afterwards at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connection_attempts_are_answered_and_a_device_still_gets_in() {
    const ATTEMPTS: usize = 10_000;
    let mut gw = Gateway::start("");
    let (_, _, ca) = gw.device_certs("probe");
    let before = gw.peak_rss();
    let mut anonymous = anonymous_client_config(&ca);
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into().unwrap()));
    anonymous.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(anonymous);
    let addr: std::net::SocketAddr = gw.addr.parse().unwrap();
    let start = Instant::now();
    let mut got_in = 0;
    for _ in 0..ATTEMPTS / 500 {
        let wave: Vec<_> = (0..500)
            .map(|_| {
                let connecting = endpoint.connect(addr, "localhost").unwrap();
                tokio::spawn(async move {
                    match connecting.await {
                        // TLS 1.3: the client may finish before the server has checked it;
                        // only a connection still open after that counts as in (a lost close
                        // ends in the client's idle timeout, 5 s).
                        Ok(c) => tokio::time::timeout(Duration::from_secs(10), c.closed())
                            .await
                            .is_err(),
                        Err(_) => false,
                    }
                })
            })
            .collect();
        for w in wave {
            got_in += usize::from(w.await.unwrap());
        }
    }
    let took = start.elapsed();
    assert_eq!(got_in, 0, "an attempt with no certificate stayed connected");
    let t = Instant::now();
    let d = gw.connect("after").await;
    let connect = t.elapsed();
    let mut s = d.open().await.unwrap();
    s.send(&publish(1, "devices/after/x", b"1")).await.unwrap();
    until_ack(&mut s, 1).await;
    let grew = gw.peak_rss().saturating_sub(before);
    d.close().await;
    let m = gw.stop();
    eprintln!(
        "{ATTEMPTS} attempts in {took:?}; then a device connected in {connect:?}; peak RSS grew {} KiB; refused {}, retries {}",
        grew / 1024,
        m["connections_refused"],
        m["handshake_retries"]
    );
    assert_eq!(m["connections"], 1, "only the device registered: {m}");
    assert!(grew < 64 << 20, "the attempts took {} MiB", grew >> 20);
}
