//! The Tidepool tier sink against real gateways: an edge gateway forwards to a site gateway
//! over the device protocol (holding a device certificate the site issued), the site forwards
//! to a real HTTP cloud. Checked: a site killed and restarted while the edge is sending loses
//! nothing and runs nothing twice (the edge resends under the same tier seqs, the site's
//! high-water mark drops what it already holds); urgent entries sent first do not turn the
//! normal ones queued before them into "resends"; a site that lists the edge in `acl.tiers`
//! keeps the origin's `id`, `src` and `class`, and ignores them from any other device.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use support::*;
use tidepool::proto::msg::{DeviceMsg, GatewayMsg, NackCode, Publish};

/// Forwards every event as is, its class from the payload's first byte (`0` urgent, `1`
/// normal, `2` bulk).
const BY_CLASS_WAT: &str = include_str!("handlers/classer.wat");

/// A site that forwards what the edge relays and refuses payloads over 64 bytes.
const SMALL_PAYLOADS: &str =
    "[ingress]\nmax_payload_bytes = 64\n[router]\nunrouted = \"forward\"\n[acl]\ntiers = [\"edge\"]\n";

const FAST: &str = "max_delay_ms = 20\nlinger_ms = 50\nretry_base_ms = 50\nretry_max_ms = 400\n";

/// A site gateway named `site` that posts to `cloud`; `extra` is more TOML. Its port is
/// written into its config, so a restart listens where the edge sends.
fn site(cloud: &Cloud, extra: &str) -> Gateway {
    site_with(cloud, extra, "")
}

/// Like [`site`], with more `[outbox]` settings.
fn site_with(cloud: &Cloud, extra: &str, outbox: &str) -> Gateway {
    let site = Gateway::start_named(
        "site",
        &format!(
            "{extra}[outbox]\n{FAST}{outbox}[uplink]\nurl = \"{}\"\n",
            cloud.url
        ),
    );
    site.edit_config("listen = ", &format!("listen = \"{}\"", site.addr));
    site
}

/// A site that counts what it runs: `forwarder.wat` (state `n`, one per kept event) on the
/// edge's events, slowed by `spin` turns of a loop (slow on purpose: not held to a CPU share).
/// The dir holds the handler's files.
fn counting_site(cloud: &Cloud, spin: u32) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let counter = wat_handler(
        dir.path(),
        "fwd",
        &slowed(include_str!("handlers/forwarder.wat"), spin),
        "subscribe = [\"devices/edge/#\"]\n[limits]\nfuel_per_event = 10000000",
    );
    let site = site(cloud, &format!("[limits]\ncpu_percent = 0\n{counter}"));
    (site, dir)
}

/// An edge gateway named `edge` whose uplink is `site`, with the class-by-payload handler.
fn edge(site: &Gateway, batch: usize) -> Gateway {
    let (cert, key, ca) = site.device_certs("edge");
    edge_with(site, [&cert, &key, &ca], batch)
}

/// Like [`edge`], with these certificate, key and CA files.
fn edge_with(site: &Gateway, [cert, key, ca]: [&std::path::Path; 3], batch: usize) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let handler = wat_handler(dir.path(), "cls", BY_CLASS_WAT, "");
    let g = Gateway::start_named(
        "edge",
        &format!(
            "{handler}[outbox]\n{FAST}max_batch_events = {batch}\n[uplink]\nsink = \"tidepool\"\nurl = \"tidepool://{}\"\ntimeout_ms = 2000\n[uplink.tier]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            site.addr,
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    std::mem::forget(dir);
    g
}

/// Publishes `payloads` from device `d1` to `gw` as seqs 1.., and waits for every ack.
async fn publish_all(gw: &Gateway, payloads: &[String]) {
    let dev = gw.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    for (i, p) in payloads.iter().enumerate() {
        s.push(&publish(i as u64 + 1, "devices/d1/t", p.as_bytes()));
    }
    s.flush().await.unwrap();
    until_ack(&mut s, payloads.len() as u64).await;
    end_stream(s).await;
    dev.close().await;
}

/// The events the cloud took (status 200), by id: (device, class, payload).
fn events(r: &[Request]) -> BTreeMap<String, (String, String, String)> {
    use base64::Engine;
    let mut out = BTreeMap::new();
    for r in r.iter().filter(|r| r.status == 200) {
        for e in r.json()["events"].as_array().unwrap() {
            let payload = base64::engine::general_purpose::STANDARD
                .decode(e["payload_b64"].as_str().unwrap())
                .unwrap();
            out.insert(
                e["id"].as_str().unwrap().to_string(),
                (
                    e["device"].as_str().unwrap().to_string(),
                    e["class"].as_str().unwrap().to_string(),
                    String::from_utf8(payload).unwrap(),
                ),
            );
        }
    }
    out
}

/// The site counts what it runs (`forwarder.wat`, slowed so that a batch takes a while: state
/// `n`, one per kept event). It is killed twice while the edge is sending and started again:
/// every event reaches the cloud, and the site ran each exactly once (a resend under a new seq
/// would run twice, a seq skipped or taken for a resend would not run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_killed_mid_stream_loses_nothing_and_runs_nothing_twice() {
    const N: usize = 400;
    let cloud = Cloud::start(|_| 200).await;
    let (mut site, _dir) = counting_site(&cloud, 20_000);
    let edge = edge(&site, 16);
    let payloads: Vec<String> = (0..N).map(|i| format!("1:{i}")).collect();
    publish_all(&edge, &payloads).await;

    // Some batches through, then a kill -9 in the middle of the stream; twice.
    for at in [40, 200] {
        cloud
            .wait_until(Duration::from_secs(30), |r| delivered_ids(r).len() >= at)
            .await;
        site.kill();
        site.restart();
    }
    edge.wait_outbox_empty(Duration::from_secs(60)).await;
    site.wait_outbox_empty(Duration::from_secs(60)).await;
    site.stop();

    let ran = read_state(&site.data(), "fwd", b"n").expect("the site ran the handler");
    let ran = u64::from_le_bytes(ran.try_into().unwrap());
    assert_eq!(ran, N as u64, "the site ran {ran} events for {N} sent");
    let got = events(&cloud.requests());
    let payloads_seen: BTreeSet<&str> = got.values().map(|(_, _, p)| p.as_str()).collect();
    assert_eq!(payloads_seen.len(), N, "every event reached the cloud");
    assert!(got.values().all(|(d, _, _)| d == "edge"));
    assert_eq!(got.len(), N, "one site entry per event: {} ids", got.len());
}

/// The edge and the site are killed while a batch is in flight (its entries carry tier seqs,
/// synced before the send; the site holds part of it at most), then the edge takes 4 urgent
/// events with its uplink off. When it sends again, the entries that carry seqs go first, under
/// the same seqs (a new seq would run them twice); then the urgent ones get new seqs (had they
/// gone first, the carried seqs would be below the site's mark, taken as held, and lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_mid_batch_resends_under_the_same_seqs_first() {
    const N: usize = 120;
    let cloud = Cloud::start(|_| 200).await;
    let (mut site, _dir) = counting_site(&cloud, 300_000);
    let mut edge = edge(&site, 16);
    let payloads: Vec<String> = (0..N).map(|i| format!("1:{i}")).collect();
    publish_all(&edge, &payloads).await;
    // The second batch is on its way; the slowed site takes a while over it. Both die: what
    // the site had not made durable of it is gone, so the site's mark is below its seqs.
    edge.wait_log("tier: publishes sent", 2, Duration::from_secs(30))
        .await;
    edge.kill();
    site.kill();
    let mark = open_stopped(&site.data()).hwm("edge").unwrap();
    assert!(
        mark < 32,
        "the site holds part of the second batch at most (seqs 17..=32): mark {mark}"
    );
    site.restart();
    // The urgent events go in while the edge has no uplink, so they wait in the outbox with
    // the carried entries when it starts sending again.
    let url_line = format!("url = \"tidepool://{}\"", site.addr);
    edge.edit_config("url = ", "url = \"\"");
    edge.restart();
    let urgent: Vec<String> = (0..4).map(|i| format!("0:{i}")).collect();
    // The device goes on above the seqs it used.
    let dev = edge.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    for (i, p) in urgent.iter().enumerate() {
        s.push(&publish((N + 1 + i) as u64, "devices/d1/t", p.as_bytes()));
    }
    s.flush().await.unwrap();
    until_ack(&mut s, (N + urgent.len()) as u64).await;
    end_stream(s).await;
    dev.close().await;
    edge.stop();
    edge.edit_config("url = ", &url_line);
    edge.restart();
    edge.wait_log("uplink: Tidepool tier", 2, Duration::from_secs(10))
        .await;
    let log = edge.stderr.lock().unwrap().clone();
    let start = log.lines().rfind(|l| l.contains("uplink: Tidepool tier"));
    assert!(
        start.is_some_and(|l| l.contains("carried=16")),
        "the killed batch's 16 entries carry their seqs: {start:?}"
    );

    edge.wait_outbox_empty(Duration::from_secs(60)).await;
    site.wait_outbox_empty(Duration::from_secs(60)).await;
    site.stop();
    let ran = read_state(&site.data(), "fwd", b"n").expect("the site ran the handler");
    let ran = u64::from_le_bytes(ran.try_into().unwrap());
    let total = (N + urgent.len()) as u64;
    assert_eq!(ran, total, "the site ran {ran} events for {total} sent");
    let got = events(&cloud.requests());
    let seen: BTreeSet<&str> = got.values().map(|(_, _, p)| p.as_str()).collect();
    assert_eq!(seen.len() as u64, total, "every event reached the cloud");
}

/// The site is down while the edge queues normal events and then urgent ones. When it comes
/// back the edge sends the urgent ones first (in batches of 4); the normal ones queued
/// before them get their seqs when they are sent, after, so the site runs them (with seqs
/// in outbox order it would take them for resends and drop them). The site relays each with
/// the origin's id, device and class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_first_loses_no_normal_event_and_the_site_keeps_the_origin() {
    let cloud = Cloud::start(|_| 200).await;
    let mut site = site(
        &cloud,
        "[router]\nunrouted = \"forward\"\n[acl]\ntiers = [\"edge\"]\n",
    );
    let edge = edge(&site, 4);
    site.stop();
    let normal: Vec<String> = (0..12).map(|i| format!("1:{i}")).collect();
    let urgent: Vec<String> = (0..12).map(|i| format!("0:{i}")).collect();
    let all: Vec<String> = normal.iter().chain(&urgent).cloned().collect();
    publish_all(&edge, &all).await;
    edge.wait_outbox_entries(all.len() as u64, Duration::from_secs(10))
        .await;

    site.restart();
    edge.wait_outbox_empty(Duration::from_secs(60)).await;
    let r = cloud
        .wait_until(Duration::from_secs(30), |r| events(r).len() >= all.len())
        .await;
    let got = events(&r);
    let want: BTreeMap<String, (String, String, String)> = all
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let class = if p.starts_with('0') {
                "urgent"
            } else {
                "normal"
            };
            (
                format!("edge:d1:{}:cls:0", i + 1),
                ("d1".to_string(), class.to_string(), p.clone()),
            )
        })
        .collect();
    assert_eq!(
        got, want,
        "the cloud has every event, as the origin sent it"
    );

    // A device that is not a tier cannot pass for another one: its keys are ignored.
    let dev = site.connect("d9").await;
    let mut s = dev.open().await.unwrap();
    s.send(&DeviceMsg::Publish(Publish {
        seq: 1,
        topic: "devices/d9/t".into(),
        payload: b"x".to_vec().into(),
        ts: None,
        id: Some("edge:d1:1:cls:0".into()),
        src: Some("d1".into()),
        class: Some("urgent".into()),
    }))
    .await
    .unwrap();
    until_ack(&mut s, 1).await;
    end_stream(s).await;
    let r = cloud
        .wait_until(Duration::from_secs(30), |r| {
            events(r).contains_key("site:d9:1::0")
        })
        .await;
    assert_eq!(
        events(&r)["site:d9:1::0"],
        ("d9".into(), "normal".into(), "x".into())
    );

    // A tier cannot pass off one of the site's own ids as relayed.
    let dev = site.connect("edge").await;
    let mut s = dev.open().await.unwrap();
    s.send(&DeviceMsg::Hello).await.unwrap();
    let Some(GatewayMsg::Welcome { hwm, .. }) = next_msg(&mut s).await else {
        panic!("no welcome");
    };
    s.send(&DeviceMsg::Publish(Publish {
        seq: hwm + 1,
        topic: "devices/edge/t".into(),
        payload: b"y".to_vec().into(),
        ts: None,
        id: Some("site:d9:2::0".into()),
        src: Some("d9".into()),
        class: Some("urgent".into()),
    }))
    .await
    .unwrap();
    let answers = end_stream(s).await;
    assert!(
        matches!(&answers[..], [GatewayMsg::Nack { code: NackCode::BadFrame, reason, .. }] if reason.contains("own")),
        "{answers:?}"
    );
}

/// A certificate the site does not trust (issued by another gateway's CA) fails the
/// handshake: the edge raises the alarm, names what to check, and keeps the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_refuses_the_certificate_raises_the_alarm() {
    let cloud = Cloud::start(|_| 200).await;
    let site = site(&cloud, "");
    let stranger = Gateway::start("");
    let (cert, key, _) = stranger.device_certs("edge");
    let (_, _, ca) = site.device_certs("someone");
    let edge = edge_with(&site, [&cert, &key, &ca], 16);
    publish_all(&edge, &["1:a".to_string()]).await;
    edge.wait_log(
        "the upstream refuses this gateway",
        1,
        Duration::from_secs(30),
    )
    .await;
    let log = edge.stderr.lock().unwrap().clone();
    let line = log
        .lines()
        .find(|l| l.contains("the upstream refuses this gateway"))
        .unwrap();
    assert!(line.contains("ERROR"), "{line}");
    edge.wait_outbox_entries(1, Duration::from_secs(5)).await;
}

/// The certificate must name this gateway: the upstream knows it by that name.
#[test]
fn a_certificate_for_another_name_is_refused_at_start() {
    let up = Gateway::start("");
    let (cert, key, ca) = up.device_certs("someone-else");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tidepool.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"edge\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[uplink]\nsink = \"tidepool\"\nurl = \"tidepool://{}\"\n[uplink.tier]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            dir.path().join("data").display(),
            up.addr,
            ca.display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let run = cli(&["run"], &config);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("issued to `someone-else`")
            && run.stderr.contains("tidepool certs device edge"),
        "{}",
        run.stderr
    );
}

/// The site refuses one event for good (its payload is over the site's limit: `nack
/// too_large`), the last of its batch, so no ack covers it: the batch is settled all the same,
/// the edge dead-letters that one with the site's reason and delivers the rest, and what comes
/// after goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_site_refuses_is_dead_lettered_at_the_edge_and_the_rest_goes_on() {
    let cloud = Cloud::start(|_| 200).await;
    let site = site(&cloud, SMALL_PAYLOADS);
    let mut edge = edge(&site, 16);
    let big = format!("1:{}", "x".repeat(100));
    let payloads = vec!["1:a".to_string(), "1:b".to_string(), big.clone()];
    publish_all(&edge, &payloads).await;
    edge.wait_outbox_empty(Duration::from_secs(30)).await;
    let r = cloud
        .wait_until(Duration::from_secs(30), |r| events(r).len() >= 2)
        .await;
    let got: BTreeSet<String> = events(&r).into_values().map(|(_, _, p)| p).collect();
    assert_eq!(got, BTreeSet::from(["1:a".to_string(), "1:b".to_string()]));
    let m = edge.stop();
    assert_eq!(m["dead_letters"], 1, "{m}");
    assert_eq!(m["events_sent"], 2, "{m}");
    assert_eq!(m["send_failures"], 0, "settled at the first attempt: {m}");
    let store = open_stopped(&edge.data());
    let letters = store.dead_letters().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].payload, big.as_bytes());
    assert!(
        letters[0].reason.contains("upstream nack too_large"),
        "{letters:?}"
    );
}

/// A site limit that refuses everything sent (here, the one event there is) is not proof
/// against the event: it stays in the outbox, the edge reports an outage and retries; once the
/// site takes another event, the refused one is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_refusing_everything_is_an_outage_until_it_takes_something() {
    let cloud = Cloud::start(|_| 200).await;
    let site = site(&cloud, SMALL_PAYLOADS);
    let mut edge = edge(&site, 16);
    let big = format!("1:{}", "x".repeat(100));
    publish_all(&edge, std::slice::from_ref(&big)).await;
    edge.wait_log("refuses every event", 2, Duration::from_secs(30))
        .await;
    edge.wait_outbox_entries(1, Duration::from_secs(5)).await;

    let dev = edge.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    s.push(&publish(2, "devices/d1/t", b"1:small"));
    s.flush().await.unwrap();
    until_ack(&mut s, 2).await;
    end_stream(s).await;
    dev.close().await;
    edge.wait_outbox_empty(Duration::from_secs(30)).await;
    let m = edge.stop();
    assert_eq!(m["dead_letters"], 1, "{m}");
    let store = open_stopped(&edge.data());
    let letters = store.dead_letters().unwrap();
    assert_eq!(letters[0].payload, big.as_bytes(), "{letters:?}");
    let r = cloud
        .wait_until(Duration::from_secs(30), |r| !events(r).is_empty())
        .await;
    let got: Vec<String> = events(&r).into_values().map(|(_, _, p)| p).collect();
    assert_eq!(got, vec!["1:small".to_string()]);
}

/// The site nacks an event and then answers `busy` further on in the same batch (its outbox
/// is tiny): the batch goes again, and the nacked event, now below the site's mark, is still
/// known as refused (written into the entry when the nack came) and dead-lettered, not
/// counted as held by the site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_before_a_busy_is_kept_for_the_retry() {
    refused_then_busy(SMALL_PAYLOADS, 100).await;
}

/// The same with an event the edge refuses itself (its frame is over the site's
/// `max_frame_bytes`): it carries a seq the site never saw, below the site's mark on the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_too_large_for_the_site_before_a_busy_is_kept_for_the_retry() {
    let site = "[ingress]\nmax_frame_bytes = 200\n[router]\nunrouted = \"forward\"\n[acl]\ntiers = [\"edge\"]\n";
    refused_then_busy(site, 300).await;
}

/// A small event, one of `big_len` bytes the site's settings refuse, six small ones, to a site
/// whose outbox takes about two: the refused one ends in the edge's dead letters, the small
/// ones reach the cloud.
async fn refused_then_busy(site_extra: &str, big_len: usize) {
    let cloud = Cloud::start(|_| 200).await;
    let site = site_with(&cloud, site_extra, "max_bytes = 300\n");
    let mut edge = edge(&site, 16);
    let big = format!("1:{}", "x".repeat(big_len));
    let mut payloads = vec!["1:a".to_string(), big.clone()];
    payloads.extend((0..6).map(|i| format!("1:{i}")));
    publish_all(&edge, &payloads).await;
    edge.wait_outbox_empty(Duration::from_secs(30)).await;
    let m = edge.stop();
    assert!(
        m["send_failures"].as_u64().unwrap() >= 1,
        "the site answered busy: {m}"
    );
    assert_eq!(m["dead_letters"], 1, "{m}");
    let store = open_stopped(&edge.data());
    let letters = store.dead_letters().unwrap();
    assert_eq!(letters[0].payload, big.as_bytes(), "{letters:?}");
    let r = cloud
        .wait_until(Duration::from_secs(30), |r| events(r).len() >= 7)
        .await;
    assert_eq!(events(&r).len(), 7);
}

/// The site refuses the only event there is, then its limit is raised: the event was not
/// proven bad, its seq was freed, and it reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_refused_by_a_site_that_changes_its_mind_is_delivered() {
    let cloud = Cloud::start(|_| 200).await;
    let mut site = site(&cloud, SMALL_PAYLOADS);
    let mut edge = edge(&site, 16);
    let big = format!("1:{}", "x".repeat(100));
    publish_all(&edge, std::slice::from_ref(&big)).await;
    edge.wait_log("refuses every event", 1, Duration::from_secs(30))
        .await;
    site.stop();
    site.edit_config("max_payload_bytes", "max_payload_bytes = 32768");
    site.restart();
    edge.wait_outbox_empty(Duration::from_secs(30)).await;
    let r = cloud
        .wait_until(Duration::from_secs(30), |r| !events(r).is_empty())
        .await;
    let got: Vec<String> = events(&r).into_values().map(|(_, _, p)| p).collect();
    assert_eq!(got, vec![big]);
    assert_eq!(edge.stop()["dead_letters"], 0);
}

/// A restarted edge with nothing in flight asks the site for its mark before its first batch:
/// its own seqs start over at 0 in memory, and new entries numbered from there would be below
/// the site's mark, acked as resends and never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_edge_asks_the_site_for_its_mark_first() {
    let cloud = Cloud::start(|_| 200).await;
    let site = site(
        &cloud,
        "[router]\nunrouted = \"forward\"\n[acl]\ntiers = [\"edge\"]\n",
    );
    let mut edge = edge(&site, 16);
    publish_all(&edge, &["1:a".into(), "1:b".into(), "1:c".into()]).await;
    edge.wait_outbox_empty(Duration::from_secs(30)).await;
    edge.restart();
    let dev = edge.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    s.push(&publish(4, "devices/d1/t", b"1:d"));
    s.flush().await.unwrap();
    until_ack(&mut s, 4).await;
    end_stream(s).await;
    dev.close().await;
    let r = cloud
        .wait_until(Duration::from_secs(30), |r| events(r).len() >= 4)
        .await;
    let got: BTreeSet<String> = events(&r).into_values().map(|(_, _, p)| p).collect();
    assert_eq!(got.len(), 4, "{got:?}");
}
