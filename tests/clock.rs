//! The clock floor (`clock::Floor`), with the real binary under libfaketime: a board that
//! boots at 1970 (no RTC, NTP not answered) still takes a device whose certificate starts
//! after 1970, and says its clock is unsynced; a forged step to 2099 refuses certificates
//! only while it lasts, because the floor written down advances by monotonic time only.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use support::*;
use tidepool::proto::msg::GatewayMsg;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

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
