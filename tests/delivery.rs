//! Delivery promises (docs/delivery.md), end to end against the real binary: what moves a
//! device's high-water mark, one publishing stream per device, delivered entries that stay
//! delivered across a kill -9, the gateway id, and a cloud that refuses everything.

mod support;

use std::time::Duration;

use support::*;
use tidepool::proto::msg::{GatewayMsg, NackCode};

fn counter(gw_dir: &std::path::Path) -> String {
    wat_handler(gw_dir, "counter", COUNTER_WAT, "")
}

/// The counter handler's count, read from the stopped gateway's store.
fn count(gw: &Gateway) -> u64 {
    read_state(&gw.data(), "counter", b"n")
        .map(|v| u64::from_le_bytes(v.try_into().unwrap()))
        .unwrap_or(0)
}

fn raw_frame(kv: &[(&str, ciborium::Value)]) -> Vec<u8> {
    let m = kv
        .iter()
        .map(|(k, v)| (ciborium::Value::Text(k.to_string()), v.clone()))
        .collect();
    let mut body = Vec::new();
    ciborium::into_writer(&ciborium::Value::Map(m), &mut body).unwrap();
    let mut raw = Vec::new();
    tidepool::proto::frame::encode(&body, &mut raw);
    raw
}

fn nacks(seen: &[GatewayMsg]) -> Vec<(u64, NackCode)> {
    seen.iter()
        .filter_map(|m| match m {
            GatewayMsg::Nack { seq, code, .. } => Some((*seq, *code)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_bad_frame_moves_no_mark_and_later_publishes_below_its_seq_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&counter(dir.path()));
    let dev = gw.connect("dev-b").await;
    let mut s = dev.open().await.unwrap();
    use ciborium::Value as V;
    // Not a publish (an unknown type), with a seq far ahead.
    s.send_raw(&raw_frame(&[
        ("type", V::Text("ping".into())),
        ("seq", V::Integer(1000.into())),
    ]))
    .await
    .unwrap();
    // A publish of the wrong shape (no payload) with the largest seq there is.
    s.send_raw(&raw_frame(&[
        ("type", V::Text("publish".into())),
        ("seq", V::Integer(u64::MAX.into())),
        ("topic", V::Text("devices/dev-b/t".into())),
    ]))
    .await
    .unwrap();
    s.send(&publish(1, "devices/dev-b/t", b"x")).await.unwrap();
    let seen = until_ack(&mut s, 1).await;
    assert_eq!(
        nacks(&seen),
        vec![(1000, NackCode::BadFrame), (u64::MAX, NackCode::BadFrame)],
        "both bad frames are nacked with the seq they carried, and seq 1 is not: {seen:?}"
    );
    // On a new stream (after this one ended): the mark is 1, and seq 2 runs.
    end_stream(s).await;
    let mut s = dev.open().await.unwrap();
    s.send(&tidepool::proto::msg::DeviceMsg::Hello)
        .await
        .unwrap();
    assert!(matches!(
        next_msg(&mut s).await,
        Some(GatewayMsg::Welcome { hwm: 1, .. })
    ));
    s.send(&publish(2, "devices/dev-b/t", b"x")).await.unwrap();
    let seen = until_ack(&mut s, 2).await;
    assert!(nacks(&seen).is_empty(), "{seen:?}");
    drop(s);
    dev.conn.close(0u32.into(), b"");
    gw.stop();
    assert_eq!(count(&gw), 2, "both publishes ran once");
    assert_eq!(
        open_stopped(&gw.data()).hwm("dev-b").unwrap(),
        2,
        "the durable mark is the last publish, not a bad frame's seq"
    );
}

#[tokio::test]
async fn a_second_stream_may_not_publish_while_another_stream_of_the_device_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&counter(dir.path()));
    let dev = gw.connect("dev-2s").await;
    let mut a = dev.open().await.unwrap();
    a.send(&publish(1, "devices/dev-2s/t", b"x")).await.unwrap();
    until_ack(&mut a, 1).await;
    // Stream b runs ahead of stream a (a device sending on both at once). Were it to run,
    // seq 2 on stream a would look like a resend and never run.
    let mut b = dev.open().await.unwrap();
    b.send(&publish(3, "devices/dev-2s/t", b"x")).await.unwrap();
    assert_eq!(
        next_msg(&mut b).await,
        Some(GatewayMsg::Busy {
            seq: 3,
            retry_after_ms: 1000
        }),
        "a second publishing stream is told to come back later"
    );
    a.send(&publish(2, "devices/dev-2s/t", b"x")).await.unwrap();
    let seen = until_ack(&mut a, 2).await;
    assert!(nacks(&seen).is_empty(), "{seen:?}");
    // Stream a ends; the device resends from seq 3 on a new stream.
    end_stream(a).await;
    let mut c = dev.open().await.unwrap();
    c.send(&publish(3, "devices/dev-2s/t", b"x")).await.unwrap();
    let seen = until_ack(&mut c, 3).await;
    assert!(
        !seen.iter().any(|m| matches!(m, GatewayMsg::Busy { .. })),
        "{seen:?}"
    );
    dev.conn.close(0u32.into(), b"");
    gw.stop();
    assert_eq!(count(&gw), 3, "seqs 1, 2 and 3 each ran once");
}

#[tokio::test]
async fn delivered_entries_are_not_posted_again_after_a_kill_on_an_idle_box() {
    let cloud = Cloud::start(|_| 200).await;
    let mut gw = Gateway::start(&format!(
        "[uplink]\nurl = \"{}\"\n[outbox]\nlinger_ms = 50\n[router]\nunrouted = \"forward\"\nunrouted_class = \"urgent\"\n",
        cloud.url
    ));
    let dev = gw.connect("dev-i").await;
    let mut s = dev.open().await.unwrap();
    s.send(&publish(1, "devices/dev-i/t", b"alarm"))
        .await
        .unwrap();
    until_ack(&mut s, 1).await;
    let posted = cloud
        .wait_until(Duration::from_secs(10), |r| {
            r.iter().any(|r| r.status == 200)
        })
        .await;
    assert_eq!(posted.len(), 1);
    // Delivered, and nothing else happens on the box. The removal must be durable without a
    // later group to carry it: wait until the gateway says it settled, then kill -9.
    gw.wait_log("delivered", 1, Duration::from_secs(10)).await;
    gw.kill();
    // Restarted without an uplink, the outbox shows what survived: nothing.
    gw.edit_config("url =", "url = \"\"");
    gw.restart();
    let st = cli(&["status", "--json"], &gw.config);
    assert!(st.ok, "{}", st.stderr);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(v["outbox"]["entries"], 0, "{v}");
    assert_eq!(v["outbox"]["bytes"], 0, "{v}");
}

#[tokio::test]
async fn a_cloud_that_refuses_everything_is_an_outage_and_nothing_is_dead_lettered() {
    // A proxy answering 400 to everything for a while (it does not look at the events): the
    // batch of four, its halves and each event alone are refused.
    let cloud = Cloud::start(|n| if n < 7 { 400 } else { 200 }).await;
    let m = four_forwards_in_one_batch(&cloud, ["a", "b", "c", "d"], |r| {
        delivered_ids(r).len() >= 4
    })
    .await;
    let reqs = cloud.requests();
    let mut ids = delivered_ids(&reqs);
    ids.sort();
    assert_eq!(
        ids,
        (1..=4)
            .map(|i| format!("gw-test:dev-p:{i}::0"))
            .collect::<Vec<_>>(),
        "every event delivered once: {:?}",
        reqs.iter()
            .map(|r| (r.status, events_in(r)))
            .collect::<Vec<_>>()
    );
    assert_eq!(m["dead_letters"], 0, "{m}");
    assert!(m["uplink_outages"].as_u64().unwrap() >= 1, "{m}");
}

#[tokio::test]
async fn the_default_gateway_id_is_unique_per_box_and_stable_across_restarts() {
    let id = |g: &Gateway| {
        let st = cli(&["status", "--json"], &g.config);
        assert!(st.ok, "{}", st.stderr);
        let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
        v["gateway"].as_str().unwrap().to_string()
    };
    // Two boxes with the same host name (this machine's) and no configured id.
    let mut a = Gateway::start_without_id("");
    let b = Gateway::start_without_id("");
    let (ida, idb) = (id(&a), id(&b));
    assert_ne!(ida, idb, "cloned boxes must not share an id");
    for i in [&ida, &idb] {
        assert!(tidepool::proto::topic::valid_device_id(i), "{i}");
    }
    a.restart();
    assert_eq!(id(&a), ida, "the id is stable");
}

#[tokio::test]
async fn an_undecodable_outbox_entry_is_moved_to_the_dead_letters_and_the_gateway_starts() {
    let mut gw = Gateway::start("");
    gw.stop();
    {
        let store = open_stopped(&gw.data());
        store
            .raw_tree()
            .insert(tidepool::store::keys::outbox(7), &b"not an entry"[..])
            .unwrap();
        store.raw_db().flush().unwrap();
    }
    gw.restart();
    let m = gw.stop();
    assert_eq!(m["outbox_corrupt"], 1, "{m}");
    let store = open_stopped(&gw.data());
    assert!(store
        .raw_tree()
        .get(tidepool::store::keys::outbox(7))
        .unwrap()
        .is_none());
    let letters = store.dead_letters().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].payload, b"not an entry");
    assert!(letters[0].reason.contains("outbox entry"), "{letters:?}");
}

/// Phases of the outage test's cloud (before them, nothing listens: connection refused).
const UNAVAILABLE: u8 = 1;
const UNAUTHORIZED: u8 = 2;
const SLOW: u8 = 3;
const UP: u8 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uplink_outage_backs_off_and_every_event_arrives_once_after_dedupe() {
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
    use std::sync::Arc;
    // Connection refused: a port with nothing listening (bound later on the same port).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&format!(
        "{}[uplink]\nurl = \"http://127.0.0.1:{port}/ingest\"\ntimeout_ms = 300\n[outbox]\nmax_delay_ms = 20\nlinger_ms = 50\nretry_base_ms = 50\nretry_max_ms = 400\n",
        wat_handler(dir.path(), "fwd", include_str!("handlers/forwarder.wat"), "")
    ));
    // Events keep arriving through every phase.
    let dev = gw.connect("dev-o").await;
    let acked = Arc::new(AtomicU64::new(0));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let publisher = {
        let (acked, running) = (acked.clone(), running.clone());
        let mut s = dev.open().await.unwrap();
        tokio::spawn(async move {
            let mut seq = 0;
            while running.load(Ordering::SeqCst) {
                for _ in 0..5 {
                    seq += 1;
                    s.push(&publish(seq, "devices/dev-o/t", b"x"));
                }
                s.flush().await.unwrap();
                until_ack(&mut s, seq).await;
                acked.store(seq, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            end_stream(s).await;
        })
    };
    let phase_for = Duration::from_millis(1500);

    // Refused: the gateway backs off and stays near idle.
    let cpu0 = gw.cpu_time();
    tokio::time::sleep(phase_for).await;
    let cpu_refused = gw.cpu_time() - cpu0;

    let phase = Arc::new(AtomicU8::new(UNAVAILABLE));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let p = phase.clone();
    let cloud = Cloud::serve(listener, move |_| match p.load(Ordering::SeqCst) {
        UNAVAILABLE => (503, Duration::ZERO),
        UNAUTHORIZED => (401, Duration::ZERO),
        SLOW => (200, Duration::from_millis(1000)),
        _ => (200, Duration::ZERO),
    });
    let count = |from: usize| cloud.requests().len() - from;
    tokio::time::sleep(phase_for).await;
    let tries_503 = count(0);
    phase.store(UNAUTHORIZED, Ordering::SeqCst);
    let n = count(0);
    tokio::time::sleep(phase_for).await;
    let tries_401 = count(n);
    phase.store(SLOW, Ordering::SeqCst);
    let n = count(0);
    tokio::time::sleep(phase_for).await;
    let tries_slow = count(n);
    phase.store(UP, Ordering::SeqCst);
    running.store(false, Ordering::SeqCst);
    publisher.await.unwrap();
    let last = acked.load(Ordering::SeqCst);
    let expected: std::collections::BTreeSet<String> = (1..=last)
        .map(|s| format!("gw-test:dev-o:{s}:fwd:0"))
        .collect();
    let reqs = cloud
        .wait_until(Duration::from_secs(30), |r| {
            delivered_ids(r)
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                == expected
        })
        .await;
    let all = delivered_ids(&reqs);
    let distinct: std::collections::BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(
        distinct, expected,
        "every acked event arrives; after dedupe exactly once"
    );
    dev.conn.close(0u32.into(), b"");
    let m = gw.stop();
    eprintln!(
        "outage: {last} events, cpu while refused {cpu_refused:?} of {phase_for:?}; tries: 503 {tries_503}, 401 {tries_401}, slow {tries_slow}; {} posted, {} distinct; metrics {m}",
        all.len(),
        distinct.len()
    );
    // Backoff from 50 ms doubling to 400 ms: a few tries a second at most, not a busy loop.
    for (what, tries) in [("503", tries_503), ("401", tries_401), ("slow", tries_slow)] {
        assert!(
            (1..=12).contains(&tries),
            "{what}: {tries} tries in {phase_for:?}"
        );
    }
    assert!(
        cpu_refused < phase_for / 5,
        "the gateway used {cpu_refused:?} of CPU in {phase_for:?} of refused connections"
    );
    assert_eq!(m["dead_letters"], 0, "{m}");
    assert!(
        gw.stderr
            .lock()
            .unwrap()
            .contains("uplink refused: HTTP 401"),
        "401 raises an alarm"
    );
    // One outage, said once as it began and once as it turned into an alarm, not once per
    // attempt (the log is what wears an SD card during an outage).
    let log = gw.stderr.lock().unwrap().clone();
    let said = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| l.contains("uplink failed") || l.contains("uplink refused"))
        .count();
    let tries = m["send_failures"].as_u64().unwrap();
    assert!(
        tries > 4 && said <= 3,
        "{said} warnings for {tries} failed attempts: {log}"
    );
}

/// Forwards each event as is, with the class its payload's first byte names (`0` urgent,
/// `1` normal, `2` bulk).
const CLASSER_WAT: &str = include_str!("handlers/classer.wat");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_100k_is_delivered_after_a_restart_urgent_first_oldest_first() {
    const EVENTS: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    // No uplink while the backlog builds up; one device sends it as fast as it can.
    let mut gw = Gateway::start(&format!(
        "{}[ingress]\ndevice_events_per_s = 0\n[outbox]\nmax_bytes = 67108864\nmax_delay_ms = 50\nbulk_window_ms = 3600000\n[uplink]\nurl = \"\"\n",
        wat_handler(dir.path(), "cls", CLASSER_WAT, "")
    ));
    let dev = gw.connect("dev-k").await;
    let mut s = dev.open().await.unwrap();
    let mut seq = 0;
    let t0 = std::time::Instant::now();
    while seq < EVENTS {
        for _ in 0..2000 {
            seq += 1;
            let class = [b"0", b"1", b"2"][(seq % 3) as usize];
            s.push(&publish(seq, "devices/dev-k/t", class));
        }
        s.flush().await.unwrap();
        until_ack(&mut s, seq).await;
    }
    end_stream(s).await;
    dev.conn.close(0u32.into(), b"");
    gw.stop();
    let cloud = Cloud::start(|_| 200).await;
    gw.edit_config("url =", &format!("url = \"{}\"", cloud.url));
    eprintln!("backlog built in {:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    gw.restart();
    let reqs = cloud
        .wait_until(Duration::from_secs(120), |r| {
            r.iter().map(events_in).sum::<usize>() >= EVENTS as usize
        })
        .await;
    eprintln!("backlog delivered in {:?}", t0.elapsed());
    gw.stop();
    // The delivery order: class rank never goes back, and within a class seqs rise.
    let mut order = Vec::new();
    for r in &reqs {
        for e in r.json()["events"].as_array().unwrap() {
            let id = e["id"].as_str().unwrap();
            let seq: u64 = id.split(':').nth(2).unwrap().parse().unwrap();
            let rank = match e["class"].as_str().unwrap() {
                "urgent" => 0,
                "normal" => 1,
                _ => 2,
            };
            order.push((rank, seq));
        }
    }
    assert_eq!(order.len() as u64, EVENTS, "each event once, none lost");
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "urgent first, then normal, then bulk, each oldest first"
    );
    assert_eq!(order[0], (0, 3), "the oldest urgent event first");
}

#[tokio::test]
async fn a_spent_daily_budget_holds_normal_forwards_and_lets_urgent_ones_through() {
    let cloud = Cloud::start(|_| 200).await;
    let dir = tempfile::tempdir().unwrap();
    // One event's batch is about 200 bytes: two normal ones spend a 300-byte budget.
    let mut gw = Gateway::start(&format!(
        "{}[outbox]\nmax_delay_ms = 20\nlinger_ms = 50\n[uplink]\nurl = \"{}\"\nbudget_bytes_per_day = 300\n",
        wat_handler(dir.path(), "cls", CLASSER_WAT, ""),
        cloud.url
    ));
    let dev = gw.connect("dev-u").await;
    let mut s = dev.open().await.unwrap();
    let id = |seq: u64| format!("gw-test:dev-u:{seq}:cls:0");
    for (seq, class) in [(1, b"1"), (2, b"1")] {
        s.send(&publish(seq, "devices/dev-u/t", class))
            .await
            .unwrap();
        until_ack(&mut s, seq).await;
        cloud
            .wait_until(Duration::from_secs(10), |r| {
                delivered_ids(r).contains(&id(seq))
            })
            .await;
    }
    // Spent: a normal event waits, an urgent one after it goes.
    s.send(&publish(3, "devices/dev-u/t", b"1")).await.unwrap();
    s.send(&publish(4, "devices/dev-u/t", b"0")).await.unwrap();
    until_ack(&mut s, 4).await;
    let reqs = cloud
        .wait_until(Duration::from_secs(10), |r| {
            delivered_ids(r).contains(&id(4))
        })
        .await;
    let ids = delivered_ids(&reqs);
    assert!(ids.contains(&id(4)), "urgent goes: {ids:?}");
    assert!(!ids.contains(&id(3)), "normal is held: {ids:?}");
    gw.wait_log("uplink budget for today spent", 1, Duration::from_secs(5))
        .await;
    // The urgent one settles; the held one waits (and stays, for the rest of the day).
    gw.wait_outbox_entries(1, Duration::from_secs(5)).await;
    dev.close().await;
    let m = gw.stop();
    assert!(m["uplink_over_budget_bytes"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["events_sent"], 3, "{m}");
}
