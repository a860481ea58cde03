//! The clock floor (`clock::Floor`), with the real binary under libfaketime: a board that
//! boots at 1970 (no RTC, NTP not answered) still takes a device whose certificate starts
//! after 1970, and says its clock is unsynced; a forged step to 2099 refuses certificates
//! only while it lasts, because the floor written down advances by monotonic time only.
//! A forward received before the clock was set goes up marked `unsynced` with its boot id and
//! time since boot, and once the clock is set, re-stamped from them.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use support::*;
use tidepool::proto::msg::GatewayMsg;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const LIBFAKETIME_MT: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// The environment that makes the gateway's wall clock start at `at` (monotonic time stays
/// real).
fn faked(at: &str) -> Vec<(&'static str, String)> {
    installed("libfaketime", &[LIBFAKETIME]);
    vec![
        ("LD_PRELOAD", LIBFAKETIME.to_string()),
        ("FAKETIME", format!("@{at}")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
}

fn start_faked(data: &Path, at: &str) -> Gateway {
    let env = faked(at);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Gateway::start_in_env(data, "", &env)
}

/// Publishes one event with this certificate: acked, or the connection's error.
async fn publish_with(
    gw: &Gateway,
    (crt, key, ca): &(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
) -> Result<(), String> {
    let dev = tidepool::client::Device::connect(&gw.addr, ca, crt, key)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = dev.open().await.map_err(|e| e.to_string())?;
    s.send(&publish(1, "devices/d1/temp", b"{}"))
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
        Ok(Ok(Some(GatewayMsg::Ack { .. }))) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test]
async fn a_box_booting_at_1970_takes_its_devices_and_a_jump_to_2099_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A device certificate as other tools issue it: valid from a month ago, for two months.
    let now = SystemTime::now();
    let mut gw = Gateway::start_in(&data, "");
    let cert = gw.odd_device_cert(dir.path(), "d1", |p| {
        p.distinguished_name.push(rcgen::DnType::CommonName, "d1");
        p.not_before = (now - Duration::from_secs(30 * 86_400)).into();
        p.not_after = (now + Duration::from_secs(30 * 86_400)).into();
    });
    publish_with(&gw, &cert).await.expect("real time: in");
    gw.stop();

    // Booted with no RTC: the clock reads 1970.
    let mut gw = start_faked(&data, "1970-01-02 00:00:00");
    publish_with(&gw, &cert)
        .await
        .expect("at 1970 the certificate is checked at the floor, not refused as not yet valid");
    let status = cli(&["status", "--json"], &gw.config);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["clock"]["synced"], false, "{v}");
    assert!(
        v["clock"]["checked_at_s"].as_u64().unwrap() > 1_700_000_000,
        "{v}"
    );
    let human = cli(&["status"], &gw.config);
    assert!(human.stdout.contains("clock: UNSYNCED"), "{}", human.stdout);
    gw.stop();

    // A forged NTP step to 2099: the certificate has expired by that clock, and is refused
    // while it lasts…
    let mut gw = start_faked(&data, "2099-01-01 00:00:00");
    assert!(publish_with(&gw, &cert).await.is_err(), "expired at 2099");
    gw.stop();
    let floor = open_stopped(&data)
        .clock_floor()
        .unwrap()
        .expect("written at stop");
    let real = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        floor <= real + 3600,
        "the floor written is {floor}, past the real time {real}"
    );
    // …and once the clock is right again the device gets in: nothing of 2099 was kept.
    let gw = Gateway::start_in(&data, "");
    publish_with(&gw, &cert)
        .await
        .expect("the clock is right again: in");
}

/// The real time now, in ms since the epoch.
fn real_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn a_forward_received_before_the_clock_is_set_is_restamped_once_it_is() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    // The cloud is unreachable (503) until the clock is set, so the forward waits in the outbox;
    // then it takes only the re-stamped copy (an attempt the uplink began before the clock was
    // set may still arrive after; it is answered 503 too).
    let accept = std::sync::Arc::new(AtomicBool::new(false));
    let open = accept.clone();
    let cloud = Cloud::start_with(move |r| {
        let synced = r.json()["events"][0]["clock"] == "synced";
        match open.load(Ordering::SeqCst) && synced {
            true => 200,
            false => 503,
        }
    })
    .await;
    let (clock, env) = settable_clock(dir.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = Gateway::start_in_env(
        &dir.path().join("data"),
        &format!(
            "[router]\nunrouted = \"forward\"\nunrouted_class = \"urgent\"\n[uplink]\nurl = \"{}\"\n[outbox]\nlinger_ms = 50\nretry_base_ms = 50\nretry_max_ms = 200\n",
            cloud.url
        ),
        &env,
    );
    let dev = gw.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    let (before, boot_before) = (real_ms(), uptime_ms());
    s.send(&publish(1, "devices/d1/temp", b"{\"v\":31}"))
        .await
        .unwrap();
    until_ack(&mut s, 1).await;
    let (after, boot_after) = (real_ms(), uptime_ms());

    // Sent while the clock is unset: the receipt time by that clock, marked unsynced, with
    // this boot's id and the time since boot.
    let first = cloud
        .wait_until(Duration::from_secs(20), |r| !r.is_empty())
        .await;
    let ev = &first[0].json()["events"][0];
    assert_eq!(ev["clock"], "unsynced", "{ev}");
    assert!(ev["ts"].as_u64().unwrap() < 2 * 86_400_000, "{ev}");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(ev["boot_id"], boot_id.trim(), "{ev}");
    let mono = ev["mono_ms"].as_u64().unwrap();
    assert!(
        (boot_before.saturating_sub(1000)..=boot_after + 1000).contains(&mono),
        "{mono} not within {boot_before}..{boot_after} ms since boot"
    );

    // NTP answers: the clock reads the real time; then the cloud is back.
    std::fs::write(&clock, "+0\n").unwrap();
    accept.store(true, Ordering::SeqCst);
    let all = cloud
        .wait_until(Duration::from_secs(20), |r| {
            r.iter().any(|r| r.status == 200)
        })
        .await;
    let ok = all.iter().find(|r| r.status == 200).expect("delivered");
    let ev2 = &ok.json()["events"][0];
    assert_eq!(ev2["id"], ev["id"], "the same event");
    assert_eq!(ev2["clock"], "synced", "{ev2}");
    let ts = ev2["ts"].as_u64().unwrap();
    assert!(
        (before.saturating_sub(1000)..=after + 1000).contains(&ts),
        "re-stamped to {ts}, received between {before} and {after} (real time)"
    );
    assert_eq!(
        (&ev2["boot_id"], ev2["mono_ms"].as_u64()),
        (&ev["boot_id"], Some(mono))
    );
    assert_ne!(
        ok.header("idempotency-key"),
        first[0].header("idempotency-key"),
        "other bytes, another key"
    );
    dev.close().await;
}

/// A box that boots at 1970 reaches an https:// cloud (a private CA, `uplink.http.ca_file`)
/// whose certificate was issued long after 1970 but before the clock floor: rustls checks it
/// at the floor's time (at a first start, the build time), not at the bare wall clock, which
/// calls it not valid yet until NTP answers.
#[tokio::test]
async fn a_box_at_1970_reaches_an_https_cloud_through_the_clock_floor() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("cloud-ca.crt");
    let cloud = Cloud::start_tls(&ca, tidepool::clock::BUILD_S - 86_400, |_| 200).await;
    let env = faked("1970-01-02 00:00:00");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = Gateway::start_in_env(
        &dir.path().join("data"),
        &format!(
            "[router]\nunrouted = \"forward\"\nunrouted_class = \"urgent\"\n[uplink]\nurl = \"{}\"\n[uplink.http]\nca_file = \"{}\"\n[outbox]\nlinger_ms = 50\nretry_base_ms = 50\nretry_max_ms = 200\n",
            cloud.url,
            ca.display()
        ),
        &env,
    );
    let dev = gw.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    s.send(&publish(1, "devices/d1/temp", b"{\"v\":31}"))
        .await
        .unwrap();
    until_ack(&mut s, 1).await;
    let got = cloud
        .wait_until(Duration::from_secs(20), |r| !r.is_empty())
        .await;
    let log = gw.stderr.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "delivered over TLS at 1970: {log}");
    assert_eq!(got[0].json()["events"][0]["clock"], "unsynced");
    dev.close().await;
}

/// A clock that reads 1970 (a board without an RTC, NTP not answered yet) until the test
/// writes `+0` into the file returned (the real time): the environment for the gateway.
/// libfaketime's thread-safe build re-reads the file at every clock read, from every thread.
fn settable_clock(dir: &Path) -> (std::path::PathBuf, Vec<(&'static str, String)>) {
    let clock = dir.join("faketime");
    std::fs::write(&clock, "@1970-01-02 00:00:00\n").unwrap();
    let mut env = faked("1970-01-02 00:00:00");
    env.retain(|(k, _)| *k != "FAKETIME" && *k != "LD_PRELOAD");
    let mt = installed("libfaketime (MT)", &[LIBFAKETIME_MT]);
    env.push(("LD_PRELOAD", mt.display().to_string()));
    env.push(("FAKETIME_TIMESTAMP_FILE", clock.display().to_string()));
    env.push(("FAKETIME_NO_CACHE", "1".to_string()));
    (clock, env)
}

/// A forward that waits in the outbox (bulk, its window an hour) is re-stamped on disk as
/// soon as the clock is set, not at its send: a reboot before the send (a new boot id, the
/// time since receipt gone) would leave it at 1970.
#[tokio::test]
async fn a_waiting_forward_is_restamped_on_disk_as_soon_as_the_clock_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(|_| 200).await;
    let (clock, env) = settable_clock(dir.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut gw = Gateway::start_in_env(
        &dir.path().join("data"),
        &format!(
            "[router]\nunrouted = \"forward\"\nunrouted_class = \"bulk\"\n[uplink]\nurl = \"{}\"\n[outbox]\nbulk_window_ms = 3600000\n",
            cloud.url
        ),
        &env,
    );
    let dev = gw.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    let before = real_ms();
    s.send(&publish(1, "devices/d1/temp", b"{\"v\":31}"))
        .await
        .unwrap();
    until_ack(&mut s, 1).await;
    let after = real_ms();
    dev.close().await;

    // NTP answers.
    std::fs::write(&clock, "+0\n").unwrap();
    gw.wait_log(
        "the clock is set; forwards received before it was, re-stamped",
        1,
        Duration::from_secs(20),
    )
    .await;
    // Power cut: only what is on disk counts.
    gw.kill();
    assert!(
        cloud.requests().is_empty(),
        "nothing was sent: the sweep did it"
    );
    let store = open_stopped(&gw.data());
    let entries: Vec<tidepool::outbox::Entry> = store
        .outbox_scan()
        .map(|kv| tidepool::outbox::Entry::decode(&kv.unwrap().1).unwrap())
        .collect();
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    let boot = e
        .boot
        .as_ref()
        .expect("marked as stamped on an unset clock");
    assert!(boot.restamped, "{e:?}");
    assert!(
        (before.saturating_sub(1000)..=after + 1000).contains(&e.ts),
        "re-stamped to {}, received between {before} and {after} (real time)",
        e.ts
    );
}

/// Milliseconds since boot (`/proc/uptime`, the boot clock less suspend: the same on a test box).
fn uptime_ms() -> u64 {
    let up = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs: f64 = up.split_whitespace().next().unwrap().parse().unwrap();
    (secs * 1000.0) as u64
}
