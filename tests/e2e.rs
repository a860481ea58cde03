//! End-to-end tests: the real `tidepool` binary, real QUIC with real certificates, a real sled
//! store on disk, a real HTTP server standing in for the cloud.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::Engine as _;
use support::*;
use tidepool::proto::msg::{DeviceMsg, GatewayMsg, NackCode};

#[tokio::test]
async fn urgent_forward_reaches_the_cloud_with_the_contract_body_and_state_survives_restart() {
    let cloud = Cloud::start(|_| 200).await;
    let mut gw = Gateway::start(&threshold_config(&cloud));
    let dev = gw.connect("dev-1").await;
    let mut s = dev.open().await.unwrap();
    // Below the threshold (30): acked, stored, never forwarded.
    s.send(&publish(1, "devices/dev-1/temp", br#"{"v": 21.5}"#))
        .await
        .unwrap();
    assert_eq!(until_ack(&mut s, 1).await, vec![GatewayMsg::Ack { seq: 1 }]);
    // Crossing: forwarded urgent, and it must reach the cloud within a second.
    let sent_at = Instant::now();
    s.send(&publish(2, "devices/dev-1/temp", br#"{"v": 31.5}"#))
        .await
        .unwrap();
    until_ack(&mut s, 2).await;
    let reqs = cloud
        .wait_until(Duration::from_secs(1), |r| !r.is_empty())
        .await;
    assert!(
        !reqs.is_empty(),
        "no urgent delivery within 1 s of the publish ({:?})",
        sent_at.elapsed()
    );
    let r = &reqs[0];
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(r.header("idempotency-key"), body["batch"].as_str());
    let obj = body.as_object().unwrap();
    assert_eq!(
        obj.keys().collect::<HashSet<_>>(),
        ["gateway", "batch", "events"]
            .iter()
            .map(|s| s.to_string())
            .collect::<HashSet<_>>()
            .iter()
            .collect()
    );
    assert_eq!(body["gateway"], "gw-test");
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    let e = events[0].as_object().unwrap();
    for k in ["id", "device", "topic", "class", "ts", "payload_b64"] {
        assert!(e.contains_key(k), "event lacks {k}: {e:?}");
    }
    assert_eq!(e["id"], "gw-test:dev-1:2:threshold:0");
    assert_eq!(e["device"], "dev-1");
    assert_eq!(e["topic"], "devices/dev-1/temp");
    assert_eq!(e["class"], "urgent");
    assert!(e["ts"].as_u64().unwrap() > 1_600_000_000_000);
    let alarm: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(e["payload_b64"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        alarm,
        serde_json::json!({"alarm": true, "value": 31.5, "threshold": 30, "device": "dev-1"})
    );
    // Still above: no new crossing, nothing forwarded.
    s.send(&publish(3, "devices/dev-1/temp", br#"{"v": 32}"#))
        .await
        .unwrap();
    until_ack(&mut s, 3).await;
    dev.close().await;

    // The alarm state survives a restart: another high reading is no crossing.
    gw.restart();
    let dev = gw.connect("dev-1").await;
    let mut s = dev.open().await.unwrap();
    s.send(&publish(4, "devices/dev-1/temp", br#"{"v": 33}"#))
        .await
        .unwrap();
    until_ack(&mut s, 4).await;
    // Below threshold - hysteresis (29) clears the alarm (normal); a crossing after it alarms again.
    s.send(&publish(5, "devices/dev-1/temp", br#"{"v": 10}"#))
        .await
        .unwrap();
    s.send(&publish(6, "devices/dev-1/temp", br#"{"v": 40}"#))
        .await
        .unwrap();
    until_ack(&mut s, 6).await;
    let reqs = cloud
        .wait_until(Duration::from_secs(5), |r| delivered_ids(r).len() >= 3)
        .await;
    dev.close().await;
    let m = gw.stop();
    let mut ids = delivered_ids(&reqs);
    ids.sort();
    assert_eq!(
        ids,
        vec![
            "gw-test:dev-1:2:threshold:0",
            "gw-test:dev-1:5:threshold:0",
            "gw-test:dev-1:6:threshold:0"
        ],
        "only the crossings reach the cloud"
    );
    let stored = read_state(&gw.data(), "threshold", b"alarm/devices/dev-1/temp").unwrap();
    assert_eq!(f64::from_le_bytes(stored.try_into().unwrap()), 40.0);
    assert_eq!(m["handler_calls"], 3);
}

#[tokio::test]
async fn a_resent_event_is_acked_and_not_run_twice_even_while_the_original_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    // A slow handler keeps the dispatcher busy with the first connection's burst, so the second
    // connection's resends queue up behind it and meet the burst's last group in flight.
    let slow = slow_counter_wat(50_000);
    // Slow on purpose, and not to be held to a CPU share.
    let handler = wat_handler(
        dir.path(),
        "counter",
        &slow,
        "[limits]\nfuel_per_event = 5000000",
    );
    let mut gw = Gateway::start(&format!("[limits]\ncpu_percent = 0\n{handler}"));
    // Same connection, later: seq ≤ hwm is acked and not run.
    let dev = gw.connect("dev-r").await;
    let mut s = dev.open().await.unwrap();
    s.send(&publish(1, "devices/dev-r/x", b"1")).await.unwrap();
    until_ack(&mut s, 1).await;
    end_stream(s).await;
    let mut s2 = dev.open().await.unwrap();
    s2.send(&publish(1, "devices/dev-r/x", b"1")).await.unwrap();
    assert_eq!(
        until_ack(&mut s2, 1).await,
        vec![GatewayMsg::Ack { seq: 1 }]
    );
    end_stream(s2).await;
    // A burst on one connection; as soon as its first ack is back (the rest still being read and
    // committed), a second connection of the same device (which supersedes the first) resends
    // every seq of the burst.
    const BURST: u64 = 200;
    let mut a = dev.open().await.unwrap();
    for seq in 2..=BURST {
        a.push(&publish(seq, "devices/dev-r/x", b"1"));
    }
    a.flush().await.unwrap();
    assert!(matches!(
        next_msg(&mut a).await,
        Some(GatewayMsg::Ack { .. })
    ));
    let other = gw.connect("dev-r").await;
    let mut b = other.open().await.unwrap();
    for seq in 2..=BURST {
        b.push(&publish(seq, "devices/dev-r/x", b"1"));
    }
    b.flush().await.unwrap();
    until_ack(&mut b, BURST).await;
    other.close().await;
    let m = gw.stop();
    let n = read_state(&gw.data(), "counter", b"n").unwrap();
    assert_eq!(
        u64::from_le_bytes(n.try_into().unwrap()),
        BURST,
        "every seq ran exactly once"
    );
    assert_eq!(m["handler_calls"], BURST);
    assert!(
        m["resends"].as_u64().unwrap() > 1,
        "the second connection's resends were recognised: {m}"
    );
}

#[tokio::test]
async fn bad_seqs_and_unknown_types_are_nacked_and_a_second_connection_supersedes_the_first() {
    let gw = Gateway::start("[router]\nunrouted = \"drop\"\n");
    let dev = gw.connect("dev-s").await;
    let mut s = dev.open().await.unwrap();
    s.send(&publish(0, "devices/dev-s/x", b"a"))
        .await
        .unwrap_or(());
    // publish() with seq 0 omits the key; send an explicit seq 0 instead.
    let mut raw = Vec::new();
    let body = cbor_map(&[
        ("type", V::T("publish")),
        ("seq", V::U(0)),
        ("topic", V::T("devices/dev-s/x")),
        ("payload", V::B(b"a")),
    ]);
    tidepool::proto::frame::encode(&body, &mut raw);
    s.send_raw(&raw).await.unwrap();
    s.send(&publish(5, "devices/dev-s/x", b"a")).await.unwrap();
    s.send(&publish(5, "devices/dev-s/x", b"a")).await.unwrap();
    s.send(&publish(4, "devices/dev-s/x", b"a")).await.unwrap();
    let mut raw = Vec::new();
    tidepool::proto::frame::encode(
        &cbor_map(&[("type", V::T("subscribe")), ("seq", V::U(6))]),
        &mut raw,
    );
    s.send_raw(&raw).await.unwrap();
    s.send(&publish(7, "devices/dev-s/x", b"a")).await.unwrap();
    let seen = until_ack(&mut s, 7).await;
    let nacks: Vec<(u64, NackCode)> = seen
        .iter()
        .filter_map(|m| match m {
            GatewayMsg::Nack { seq, code, .. } => Some((*seq, *code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        nacks,
        vec![
            (0, NackCode::BadFrame),
            (0, NackCode::BadFrame),
            (5, NackCode::BadFrame),
            (4, NackCode::BadFrame),
            (6, NackCode::BadFrame)
        ],
        "missing seq, seq 0, repeated seq, lower seq, unknown type: {seen:?}"
    );
    // A nack for a seq always comes before any ack at or above it.
    let pos = |p: &dyn Fn(&GatewayMsg) -> bool| seen.iter().position(p).unwrap();
    assert!(
        pos(&|m| matches!(m, GatewayMsg::Nack { seq: 6, .. }))
            < pos(&|m| matches!(m, GatewayMsg::Ack { seq } if *seq >= 6))
    );

    // A second connection of the same device closes the first with `superseded` (3).
    let second = gw.connect("dev-s").await;
    let reason = tokio::time::timeout(Duration::from_secs(5), dev.conn.closed())
        .await
        .expect("first connection closed");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(3));
            assert_eq!(&c.reason[..], b"superseded");
        }
        other => panic!("expected superseded, got {other}"),
    }
    let mut s = second.open().await.unwrap();
    s.send(&DeviceMsg::Hello).await.unwrap();
    assert_eq!(
        next_msg(&mut s).await,
        Some(GatewayMsg::Welcome {
            hwm: 7,
            max_frame_bytes: 65536
        })
    );
}

#[tokio::test]
async fn only_device_certificates_get_in_and_topics_outside_the_acl_are_nacked() {
    let gw = Gateway::start("");
    // Another gateway's device CA.
    let stranger = tempfile::tempdir().unwrap();
    tidepool::pki::ensure(&tidepool::pki::PkiPaths::new(stranger.path()), &[]).unwrap();
    let [c, k, _] =
        tidepool::pki::issue_device(stranger.path(), "dev-x", &stranger.path().join("out"))
            .unwrap();
    let (_, _, ca) = gw.device_certs("dev-ok");
    let refused = async |dev: Result<tidepool::client::Device, tidepool::client::ClientError>| {
        // TLS 1.3: the client may finish its handshake before the server refuses it.
        let Ok(dev) = dev else { return true };
        let Ok(mut s) = dev.open().await else {
            return true;
        };
        if s.send(&DeviceMsg::Hello).await.is_err() {
            return true;
        }
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.next()).await,
            Ok(Err(_)) | Ok(Ok(None))
        )
    };
    let foreign = tidepool::client::Device::connect(&gw.addr, &ca, &c, &k).await;
    assert!(
        refused(foreign).await,
        "a certificate from another CA must be refused"
    );
    // And said at WARN, with the certificate's issuer (the stranger's device CA) and subject.
    gw.wait_log("client certificate refused", 1, Duration::from_secs(10))
        .await;
    {
        let log = gw.stderr.lock().unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("client certificate refused"))
            .unwrap();
        assert!(line.contains("WARN"), "{line}");
        let name = |data: &std::path::Path| {
            let ca = tidepool::pki::read_certs(&data.join("pki/device-ca.crt")).unwrap();
            tidepool::pki::issuer_and_subject(&ca[0]).unwrap().1
        };
        let (stranger_name, own_name) = (name(stranger.path()), name(&gw.data()));
        assert_ne!(stranger_name, own_name);
        assert!(
            line.contains(&format!("issued by `{stranger_name}`")),
            "{line}"
        );
        assert!(line.contains(&own_name) && line.contains("dev-x"), "{line}");
    }
    let anon = connect_without_client_cert(&gw.addr, &ca).await;
    assert!(
        refused(anon).await,
        "a client without a certificate must be refused"
    );

    let dev = gw.connect("dev-a").await;
    let mut s = dev.open().await.unwrap();
    s.send(&publish(1, "devices/dev-b/temp", b"x"))
        .await
        .unwrap();
    s.send(&publish(2, "devices/dev-a/temp", b"x"))
        .await
        .unwrap();
    s.send(&publish(3, "devices/dev-a+/temp", b"x"))
        .await
        .unwrap();
    s.send(&publish(4, "devices/dev-a/t", &vec![b'x'; 40_000]))
        .await
        .unwrap();
    s.send(&publish(5, "devices/dev-a/temp", b"x"))
        .await
        .unwrap();
    let seen = until_ack(&mut s, 5).await;
    let codes: Vec<_> = seen
        .iter()
        .filter_map(|m| {
            if let GatewayMsg::Nack { seq, code, .. } = m {
                Some((*seq, *code))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            (1, NackCode::Acl),
            (3, NackCode::BadTopic),
            (4, NackCode::TooLarge)
        ]
    );
}

#[tokio::test]
async fn malformed_frames_get_a_nack_or_a_closed_stream_and_the_gateway_serves_the_next_client() {
    let gw = Gateway::start("");
    let dev = gw.connect("dev-m").await;
    // Not CBOR, CBOR that is not a map, a map with a wrong-typed seq.
    let mut s = dev.open().await.unwrap();
    let mut raw = Vec::new();
    tidepool::proto::frame::encode(&[0xff, 0xfe, 0x00], &mut raw);
    tidepool::proto::frame::encode(&[0x83, 0x01, 0x02, 0x03], &mut raw);
    tidepool::proto::frame::encode(
        &cbor_map(&[("type", V::T("publish")), ("seq", V::T("one"))]),
        &mut raw,
    );
    s.send_raw(&raw).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            next_msg(&mut s).await,
            Some(GatewayMsg::Nack {
                seq: 0,
                code: NackCode::BadFrame,
                ..
            })
        ));
    }
    // Length 0: the stream is closed with bad_framing (1).
    let mut s = dev.open().await.unwrap();
    s.send_raw(&[0, 0, 0, 0]).await.unwrap();
    assert_eq!(reset_code(&mut s).await, 1);
    // Length above max_frame_bytes: too_large (2), before the body is even sent.
    let mut s = dev.open().await.unwrap();
    s.send_raw(&(65537u32).to_be_bytes()).await.unwrap();
    assert_eq!(reset_code(&mut s).await, 2);
    // The same connection and a new client are still served.
    let mut s = dev.open().await.unwrap();
    s.send(&publish(1, "devices/dev-m/x", b"ok")).await.unwrap();
    until_ack(&mut s, 1).await;
    let other = gw.connect("dev-n").await;
    let mut s = other.open().await.unwrap();
    s.send(&publish(1, "devices/dev-n/x", b"ok")).await.unwrap();
    until_ack(&mut s, 1).await;
}

#[tokio::test]
async fn a_cloud_answering_503_for_a_while_gets_every_event_once_after_it_recovers() {
    // The first 3 attempts fail with 503, then the cloud recovers.
    let cloud = Cloud::start(|n| if n < 3 { 503 } else { 200 }).await;
    let mut gw = Gateway::start(&threshold_config(&cloud));
    let dev = gw.connect("dev-c").await;
    let mut s = dev.open().await.unwrap();
    let mut seq = 0;
    for v in [40, 10, 41, 10, 42] {
        seq += 1;
        s.push(&publish(
            seq,
            "devices/dev-c/temp",
            format!("{{\"v\":{v}}}").as_bytes(),
        ));
    }
    s.flush().await.unwrap();
    until_ack(&mut s, seq).await;
    // Three alarms (urgent) and two clears (normal).
    let reqs = cloud
        .wait_until(Duration::from_secs(10), |r| delivered_ids(r).len() >= 5)
        .await;
    dev.close().await;
    let m = gw.stop();
    let ids = delivered_ids(&reqs);
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 5, "{ids:?}");
    assert_eq!(ids.len(), 5, "each event id delivered once: {ids:?}");
    // Retries resend the same bytes under the same Idempotency-Key.
    let failed: Vec<_> = reqs.iter().filter(|r| r.status == 503).collect();
    assert_eq!(failed.len(), 3);
    let first_ok = reqs.iter().find(|r| r.status == 200).unwrap();
    assert_eq!(failed[0].body, first_ok.body);
    assert_eq!(
        failed[0].header("idempotency-key"),
        first_ok.header("idempotency-key")
    );
    assert!(m["send_failures"].as_u64().unwrap() >= 3);
}

#[tokio::test]
async fn a_full_outbox_answers_busy_with_the_first_seq_not_kept_after_settling_the_rest() {
    // No uplink: forwards stay in a 250-byte outbox (about two entries).
    let gw = Gateway::start("[router]\nunrouted = \"forward\"\n[outbox]\nmax_bytes = 250\nfull_policy = \"backpressure\"\n");
    let dev = gw.connect("dev-b").await;
    let mut s = dev.open().await.unwrap();
    for seq in 1..=5 {
        s.push(&publish(seq, "devices/dev-b/x", b"0123456789"));
    }
    s.flush().await.unwrap();
    let mut seen = Vec::new();
    while let Some(m) = next_msg(&mut s).await {
        seen.push(m);
    }
    // Every publish before the busy one is settled first; then busy; then the stream ends.
    let busy_at = seen
        .iter()
        .position(|m| matches!(m, GatewayMsg::Busy { .. }))
        .expect("a busy answer");
    let GatewayMsg::Busy {
        seq: first_not_kept,
        retry_after_ms,
    } = seen[busy_at]
    else {
        unreachable!()
    };
    assert!((2..=5).contains(&first_not_kept), "{seen:?}");
    assert_eq!(retry_after_ms, 1000);
    assert_eq!(busy_at, seen.len() - 1, "nothing after busy: {seen:?}");
    assert!(
        seen[..busy_at].contains(&GatewayMsg::Ack {
            seq: first_not_kept - 1
        }),
        "{seen:?}"
    );
    // The device learns where to continue on a new stream: nothing from the busy seq on was kept.
    let mut s = dev.open().await.unwrap();
    s.send(&DeviceMsg::Hello).await.unwrap();
    assert_eq!(
        next_msg(&mut s).await,
        Some(GatewayMsg::Welcome {
            hwm: first_not_kept - 1,
            max_frame_bytes: 65536
        })
    );
}

/// Four unrouted events forwarded as one `normal` batch of four (no handler needed).
#[tokio::test]
async fn a_rejected_batch_is_bisected_and_only_the_offending_event_is_dead_lettered() {
    // Answer 422 to any batch holding the poisoned topic, 200 otherwise.
    let cloud = Cloud::start_with(|req: &Request| {
        if String::from_utf8_lossy(&req.body).contains("poison") {
            422
        } else {
            200
        }
    })
    .await;
    // A refused event is dead-lettered only once the cloud accepted another event between two
    // of its refusals (else it could be the start of an outage): a fifth event gives the proof.
    let single_refusals = |r: &[Request]| {
        r.iter()
            .filter(|r| r.status == 422 && events_in(r) == 1)
            .count()
    };
    let m = four_forwards_then_one(
        &cloud,
        ["a", "b", "c", "poison"],
        Some("e"),
        |r| single_refusals(r) >= 1,
        |r| delivered_ids(r).len() >= 4 && single_refusals(r) >= 2,
    )
    .await;
    let reqs = cloud.requests();
    assert_eq!(events_in(&reqs[0]), 4, "one batch of four first");
    let mut ids = delivered_ids(&reqs);
    ids.sort();
    assert_eq!(
        ids,
        [
            "gw-test:dev-p:1::0",
            "gw-test:dev-p:2::0",
            "gw-test:dev-p:3::0",
            "gw-test:dev-p:5::0"
        ],
        "each good event once"
    );
    assert_eq!(m["dead_letters"], 1, "{m}");
    // 4 → 2 + 2 → the bad half splits → 1 + 1, then the poison alone until the proof.
    assert_eq!(
        &reqs
            .iter()
            .map(|r| (r.status, events_in(r)))
            .collect::<Vec<_>>()[..5],
        [(422, 4), (200, 2), (422, 2), (200, 1), (422, 1)]
    );
}

#[tokio::test]
async fn a_batch_too_large_for_the_cloud_is_split() {
    let cloud = Cloud::start_with(|req: &Request| {
        if req.json()["events"].as_array().unwrap().len() > 2 {
            413
        } else {
            200
        }
    })
    .await;
    let m = four_forwards_in_one_batch(&cloud, ["a", "b", "c", "d"], |r| {
        delivered_ids(r).len() >= 4
    })
    .await;
    let reqs = cloud.requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [413, 200, 200]
    );
    assert_eq!(delivered_ids(&reqs).len(), 4);
    assert_eq!(m["dead_letters"], 0);
}

#[tokio::test]
async fn a_certificate_from_the_operator_ca_is_closed_with_wrong_role_on_the_device_alpn() {
    let gw = Gateway::start("");
    let (cert, key) = operator_cert(&gw, "op-1");
    let (_, _, ca) = gw.device_certs("unused");
    let dev = tidepool::client::Device::connect(&gw.addr, &ca, &cert, &key)
        .await
        .expect("the handshake itself succeeds");
    let reason = tokio::time::timeout(Duration::from_secs(5), dev.conn.closed())
        .await
        .expect("closed");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(4));
            assert_eq!(&c.reason[..], b"wrong_role");
        }
        other => panic!("expected wrong_role, got {other}"),
    }
}

#[tokio::test]
async fn a_telemetry_datagram_runs_without_an_ack_and_never_moves_the_high_water_mark() {
    let cloud = Cloud::start(|_| 200).await;
    let gw = Gateway::start(&format!(
        "[router]\nunrouted = \"forward\"\nunrouted_class = \"urgent\"\n[uplink]\nurl = \"{}\"\n",
        cloud.url
    ));
    let dev = gw.connect("dev-g").await;
    let body = cbor_map(&[
        ("type", V::T("publish")),
        ("topic", V::T("devices/dev-g/t")),
        ("payload", V::B(b"21")),
    ]);
    dev.conn.send_datagram(body.into()).unwrap();
    // The forward of the datagram's event reaches the cloud: it was processed and committed.
    let reqs = cloud
        .wait_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    let e = &reqs
        .first()
        .expect("the datagram's forward reached the cloud")
        .json()["events"][0];
    assert_eq!(e["topic"], "devices/dev-g/t");
    assert!(
        e["id"].as_str().unwrap().starts_with("gw-test:dev-g:dg"),
        "{e}"
    );
    let mut s = dev.open().await.unwrap();
    s.send(&DeviceMsg::Hello).await.unwrap();
    assert_eq!(
        next_msg(&mut s).await,
        Some(GatewayMsg::Welcome {
            hwm: 0,
            max_frame_bytes: 65536
        })
    );
}

// --- helpers -----------------------------------------------------------------------------

enum V<'a> {
    T(&'a str),
    U(u64),
    B(&'a [u8]),
}

fn cbor_map(kv: &[(&str, V)]) -> Vec<u8> {
    use ciborium::Value;
    let m = kv
        .iter()
        .map(|(k, v)| {
            let v = match v {
                V::T(t) => Value::Text(t.to_string()),
                V::U(u) => Value::Integer((*u).into()),
                V::B(b) => Value::Bytes(b.to_vec()),
            };
            (Value::Text(k.to_string()), v)
        })
        .collect();
    let mut out = Vec::new();
    ciborium::into_writer(&Value::Map(m), &mut out).unwrap();
    out
}

/// Waits for the gateway to stop the device's sending side of the stream; returns the code.
async fn reset_code(s: &mut tidepool::client::FrameStream) -> u64 {
    let r = tokio::time::timeout(Duration::from_secs(5), s.send.stopped())
        .await
        .expect("stream stopped within 5 s");
    match r {
        Ok(Some(code)) => code.into_inner(),
        other => panic!("expected STOP_SENDING with a code, got {other:?}"),
    }
}

/// A client certificate signed by the gateway's operator CA (not the device CA).
fn operator_cert(gw: &Gateway, cn: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let pki = gw.data().join("pki");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("operator-ca.key")).unwrap())
            .unwrap();
    let ca = rcgen::CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(pki.join("operator-ca.crt")).unwrap(),
    )
    .unwrap()
    .self_signed(&ca_key)
    .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    let (cp, kp) = (
        gw.dir.path().join(format!("{cn}.crt")),
        gw.dir.path().join(format!("{cn}.key")),
    );
    std::fs::write(&cp, cert.pem()).unwrap();
    std::fs::write(&kp, key.serialize_pem()).unwrap();
    (cp, kp)
}

async fn connect_without_client_cert(
    addr: &str,
    ca: &std::path::Path,
) -> Result<tidepool::client::Device, tidepool::client::ClientError> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(anonymous_client_config(ca));
    let conn = endpoint
        .connect(addr.parse().unwrap(), "localhost")?
        .await?;
    Ok(tidepool::client::Device { endpoint, conn })
}

/// Every file under `dir` with a group or other permission bit, but certificates (public).
fn not_private(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let p = e.path();
        let mode = std::fs::symlink_metadata(&p).unwrap().permissions().mode();
        let public = p.extension().is_some_and(|x| x == "crt");
        if mode & 0o077 != 0 && !public {
            out.push(format!("{} {:o}", p.display(), mode & 0o777));
        }
        if p.is_dir() {
            out.extend(not_private(&p));
        }
    }
    out
}

/// The finding: `certs device` run before `run` made the data dir with the shell's umask
/// (0755), and sled's files were 0644: the store was world-readable. Whatever the umask, the
/// data dir and everything in it but the certificates are the owner's alone.
#[tokio::test]
async fn the_data_dir_is_private_when_certs_device_runs_first() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("tidepool.toml");
    std::fs::write(
        &cfg,
        format!("[gateway]\ndata_dir = \"{}\"\n", data.display()),
    )
    .unwrap();
    let out = dir.path().join("certs");
    let r = Run::of_with_umask(
        std::process::Command::new(BIN)
            .args(["certs", "device", "d1", "--init", "--out"])
            .arg(&out)
            .arg("--config")
            .arg(&cfg),
        0o022,
    );
    assert!(r.ok, "{}", r.stderr);
    let mut gw = Gateway::start_in(&data, "");
    let d = gw.connect("d2").await;
    let mut s = d.open().await.unwrap();
    s.send(&publish(1, "devices/d2/x", b"1")).await.unwrap();
    until_ack(&mut s, 1).await;
    gw.stop();
    let mode = std::fs::metadata(&data).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the data dir is {:o}", mode & 0o777);
    let open = not_private(&data);
    assert!(open.is_empty(), "readable by others: {open:?}");
    let key = std::fs::metadata(out.join("d1.key")).unwrap().permissions();
    assert_eq!(key.mode() & 0o777, 0o600);
}

/// The finding: the control socket had no read timeout: a local client that connects and says
/// nothing held its task for good. It is closed after 5 s now.
#[tokio::test]
async fn a_silent_control_client_is_closed() {
    use std::io::Read;
    let gw = Gateway::start("");
    let mut s = std::os::unix::net::UnixStream::connect(gw.data().join("control.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).expect("closed, not timed out on our side");
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// One rule for paths: a relative `data_dir` in a config file is relative to the file, not to
/// the directory the command runs in, so `status -c /abs/my.toml` from anywhere finds the
/// gateway `run -c my.toml` started from the file's own folder.
#[test]
fn a_relative_data_dir_is_relative_to_the_config_file_not_the_current_directory() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("my.toml");
    std::fs::write(
        &cfg,
        "[gateway]\nid = \"paths\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n",
    )
    .unwrap();
    // Started from its own folder, by a relative name, as a newcomer does.
    let mut child = std::process::Command::new(BIN)
        .args(["run", "-c", "my.toml"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("tidepool listening on "), "{line:?}");
    let status = std::process::Command::new(BIN)
        .args(["status", "-c"])
        .arg(&cfg)
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(out.contains("gateway paths"), "{out}");
    assert!(
        dir.path().join("data").is_dir(),
        "the data dir beside the file"
    );
    assert!(
        !elsewhere.path().join("data").exists(),
        "nothing made where `status` ran"
    );
}

/// `certs device` makes no CAs of its own accord (a second set, which no gateway uses, was
/// what a forgotten `-c` gave): on a data dir with none it refuses, names the data dir and
/// where it came from, and writes nothing; `--init` creates them; each run says which CAs
/// issued the certificate.
#[test]
fn certs_device_makes_no_cas_unless_asked_and_says_which_it_used() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(&cfg, "[gateway]\ndata_dir = \"data\"\n").unwrap();
    // (ok, stdout, stderr)
    let certs = |extra: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["certs", "device", "d1", "--out", "certs"])
            .args(extra)
            .current_dir(elsewhere.path())
            .env_remove("TIDEPOOL_CONFIG")
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    // No config: the defaults' data dir, here, holds no CAs.
    let (ok, _, err) = certs(&[]);
    assert!(!ok);
    assert!(err.contains("no CAs in ./tidepool-data"), "{err}");
    assert!(
        err.contains("embedded defaults") && err.contains("--init"),
        "{err}"
    );
    // The gateway's config, before its first start: refused too, naming the file.
    let c = cfg.to_str().unwrap();
    let (ok, _, err) = certs(&["-c", c]);
    assert!(!ok);
    assert!(err.contains(c) && err.contains("--init"), "{err}");
    for nothing in [
        elsewhere.path().join("tidepool-data"),
        elsewhere.path().join("certs"),
        dir.path().join("data"),
    ] {
        assert!(!nothing.exists(), "{} was made", nothing.display());
    }
    // Asked: made in the config's data dir, and said.
    let (ok, out, err) = certs(&["-c", c, "--init"]);
    assert!(ok, "{err}");
    let data = dir.path().join("data");
    assert!(
        out.contains(&format!("created the CAs in {}", data.display())),
        "{out}"
    );
    assert!(data.join("pki/device-ca.crt").exists());
    assert!(elsewhere.path().join("certs/d1.crt").exists());
    let (ok, out, err) = certs(&["-c", c]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("issued by the CAs in {}", data.display())),
        "{out}"
    );
}

/// `tidepool send` with a ca.crt from another data dir says so once, and what to check,
/// instead of `invalid peer certificate: BadSignature` twice.
#[tokio::test]
async fn send_with_the_wrong_ca_says_which_file_and_what_to_check() {
    let gw = Gateway::start("");
    let (crt, key, _) = gw.device_certs("d1");
    let stranger = tempfile::tempdir().unwrap();
    tidepool::pki::ensure(&tidepool::pki::PkiPaths::new(stranger.path()), &[]).unwrap();
    let wrong_ca = stranger.path().join("pki/server-ca.crt");
    let run = send_cli(&gw.addr, (&crt, &key, &wrong_ca), "devices/d1/t", "{}").await;
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains(&format!("does not check against {}", wrong_ca.display())),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.stderr.matches("invalid peer certificate").count(),
        1,
        "{}",
        run.stderr
    );
}

/// A gateway whose data sits where a relative `data_dir` meant before the one rule (the
/// current directory) is refused, saying where, not started afresh beside the config file.
#[test]
fn a_data_dir_left_in_the_current_directory_is_not_silently_replaced() {
    let cwd = tempfile::tempdir().unwrap();
    let etc = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cwd.path().join("data/pki")).unwrap();
    let cfg = etc.path().join("my.toml");
    std::fs::write(
        &cfg,
        "[gateway]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "-c"])
        .arg(&cfg)
        .current_dir(cwd.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("relative to the config file"), "{err}");
    assert!(
        !etc.path().join("data").exists(),
        "nothing made beside the file"
    );
}
