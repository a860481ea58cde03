//! The board binaries: `scripts/build.sh --board rpi-aarch64` builds the static aarch64 musl
//! gateway, and it runs, under `qemu-aarch64-static`, the same job as on the host: it starts,
//! a device on the host publishes over real QUIC and gets its acks, the threshold handler's
//! crossing reaches a real HTTP endpoint, and SIGTERM stops it cleanly with the call counted.
//! `scripts/test.sh` installs qemu-user-static and the cross toolchain (build.sh does too).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::*;
use tidepool::proto::msg::GatewayMsg;

/// Builds (or finds up to date: cargo decides) the board's binary; returns its path.
fn board_binary(board: &str) -> PathBuf {
    let out = script("build.sh")
        .args(["--board", board])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/build.sh");
    assert!(
        out.status.success(),
        "scripts/build.sh --board {board} failed"
    );
    let path = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        path.lines()
            .last()
            .expect("build.sh prints the path")
            .trim(),
    )
}

/// The ELF header's machine field (e_machine, little-endian, at offset 18).
fn elf_machine(path: &std::path::Path) -> u16 {
    let head = std::fs::read(path).unwrap();
    assert_eq!(&head[..4], b"\x7fELF", "{} is no ELF file", path.display());
    u16::from_le_bytes([head[18], head[19]])
}

#[tokio::test]
async fn the_static_aarch64_gateway_serves_a_device_and_forwards_under_qemu() {
    let bin = board_binary("rpi-aarch64");
    assert_eq!(
        elf_machine(&bin),
        183,
        "not an aarch64 binary (EM_AARCH64 = 183)"
    );
    let qemu = installed("qemu-aarch64-static", &["/usr/bin/qemu-aarch64-static"]);
    let cloud = Cloud::start(|_| 200).await;
    let mut gw = Gateway::start_program(
        &[qemu.as_os_str(), bin.as_os_str()],
        &threshold_config(&cloud),
    );
    let dev = gw.connect("dev-1").await;
    let mut s = dev.open().await.unwrap();
    s.send(&publish(1, "devices/dev-1/temp", br#"{"v": 21.5}"#))
        .await
        .unwrap();
    assert_eq!(until_ack(&mut s, 1).await, vec![GatewayMsg::Ack { seq: 1 }]);
    s.send(&publish(2, "devices/dev-1/temp", br#"{"v": 31.5}"#))
        .await
        .unwrap();
    assert_eq!(until_ack(&mut s, 2).await, vec![GatewayMsg::Ack { seq: 2 }]);
    let reqs = cloud
        .wait_until(Duration::from_secs(30), |r| !delivered_ids(r).is_empty())
        .await;
    assert_eq!(
        delivered_ids(&reqs),
        vec!["gw-test:dev-1:2:threshold:0"],
        "the crossing reaches the cloud from the aarch64 gateway\n{}",
        gw.stderr.lock().unwrap()
    );
    dev.close().await;
    let m = gw.stop();
    assert_eq!(m["handler_calls"], 2);
    assert_eq!(m["events_in"], 2, "{m}");
}
