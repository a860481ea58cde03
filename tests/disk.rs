//! A full disk. The data dir sits on a small tmpfs the test mounts, next to a ballast file:
//! the gateway answers `busy` while free space is under `store.min_free_bytes`, keeps every
//! acked event, and accepts again once the ballast is gone. With the reserve off, the disk
//! really fills: the store's error stops acking, the gateway exits 70 for its supervisor, and
//! after space returns it starts with every acked event. Needs root (mount).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;
use tidepool::proto::msg::GatewayMsg;

/// A tmpfs mounted for the test (unmounted on drop; the temp dir holding it goes after).
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("fs");
        std::fs::create_dir(&at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a tmpfs needs root (CI and scripts/test.sh run as root)"
        );
        Tmpfs(at, dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn ballast(path: &Path, mib: usize) {
    std::fs::write(path, vec![0xa5u8; mib << 20]).unwrap();
}

/// The mark and the forwarder's count, read from the stopped gateway's store.
fn durable(data: &Path, device: &str) -> (u64, u64) {
    let store = tidepool::store::Store::open(&data.join("db"), 1 << 20).expect("the store opens");
    let n = store
        .state_durable("fwd", b"n")
        .unwrap()
        .map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap()));
    (store.hwm(device).unwrap(), n)
}

/// Publishes 8 KiB events in bursts of 20 until the gateway answers something other than
/// acks; returns the highest acked seq and that answer (None when the stream ended, or no
/// answer came for 5 s: a gateway that exited does not close the connection).
async fn fill(gw: &Gateway, device: &str, from: u64) -> (u64, Option<GatewayMsg>) {
    let dev = gw.connect(device).await;
    let mut s = dev.open().await.unwrap();
    let mut seq = from;
    let mut acked = from;
    let payload = vec![b'x'; 8192];
    for _ in 0..1000 {
        for _ in 0..20 {
            seq += 1;
            s.push(&publish(seq, &format!("devices/{device}/t"), &payload));
        }
        if s.flush().await.is_err() {
            return (acked, None);
        }
        loop {
            let Ok(next) = tokio::time::timeout(Duration::from_secs(5), s.next()).await else {
                return (acked, None);
            };
            match next {
                Ok(Some(GatewayMsg::Ack { seq: a })) => {
                    acked = a;
                    if a >= seq {
                        break;
                    }
                }
                Ok(Some(other)) => return (acked, Some(other)),
                _ => return (acked, None),
            }
        }
    }
    panic!("the disk never filled");
}

fn config(dir: &Path, min_free: u64) -> String {
    format!(
        "{}[ingress]\ndevice_events_per_s = 0\n[store]\nmin_free_bytes = {min_free}\n[outbox]\nmax_bytes = 1073741824\n",
        wat_handler(dir, "fwd", include_str!("handlers/forwarder.wat"), "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_disk_gets_busy_before_it_is_full_and_recovers_when_space_returns() {
    let fs = Tmpfs::mount(64);
    ballast(&fs.0.join("ballast"), 32);
    let work = tempfile::tempdir().unwrap();
    let data = fs.0.join("data");
    let mut gw = Gateway::start_in(&data, &config(work.path(), 16 << 20));
    let (acked, answer) = fill(&gw, "dev-f", 0).await;
    let Some(GatewayMsg::Busy { seq, .. }) = answer else {
        panic!("expected busy, got {answer:?} after {acked} acks")
    };
    assert_eq!(seq, acked + 1, "busy names the first seq not kept");
    assert!(gw.is_running(), "busy, not a crash");
    let st = cli(&["status", "--json"], &gw.config);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(v["disk"]["low"], true, "{v}");

    // Space returns: the device's resend from the busy seq is kept again.
    std::fs::remove_file(fs.0.join("ballast")).unwrap();
    let dev = gw.connect("dev-f").await;
    let mut s = dev.open().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        s.send(&publish(seq, "devices/dev-f/t", b"back"))
            .await
            .unwrap();
        match next_msg(&mut s).await {
            Some(GatewayMsg::Ack { seq: a }) if a == seq => break,
            Some(GatewayMsg::Busy { .. }) if tokio::time::Instant::now() < deadline => {
                // Within the watch's recheck interval: resend on a new stream, as a device does.
                end_stream(s).await;
                tokio::time::sleep(tidepool::os::disk::RECHECK).await;
                s = dev.open().await.unwrap();
            }
            other => panic!("after space returned: {other:?}"),
        }
    }
    dev.conn.close(0u32.into(), b"");
    gw.stop();
    let (hwm, n) = durable(&data, "dev-f");
    assert_eq!(hwm, seq, "every acked event is kept, the resend too");
    assert_eq!(n, hwm, "each ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acking_and_exits_70_and_the_restart_keeps_every_ack() {
    let fs = Tmpfs::mount(48);
    ballast(&fs.0.join("ballast"), 24);
    let work = tempfile::tempdir().unwrap();
    let data = fs.0.join("data");
    // No reserve: the store meets the full disk.
    let mut gw = Gateway::start_in(&data, &config(work.path(), 0));
    let (acked, answer) = fill(&gw, "dev-x", 0).await;
    assert_eq!(
        answer, None,
        "no busy without a reserve: the gateway stops answering"
    );
    assert_eq!(gw.wait_exit(), Some(70), "a store error exits 70");
    std::fs::remove_file(fs.0.join("ballast")).unwrap();
    let (hwm, n) = durable(&data, "dev-x");
    assert!(hwm >= acked, "acked {acked}, the mark is {hwm}");
    assert_eq!(n, hwm, "nothing half-applied");
    // And it serves again.
    gw.restart();
    let (more, answer) = {
        let dev = gw.connect("dev-x").await;
        let mut s = dev.open().await.unwrap();
        s.send(&publish(hwm + 1, "devices/dev-x/t", b"again"))
            .await
            .unwrap();
        (hwm + 1, next_msg(&mut s).await)
    };
    assert_eq!(answer, Some(GatewayMsg::Ack { seq: more }));
    gw.stop();
}
