//! `scripts/flash.sh`: into a root file system tree and into a partitioned disk image with an
//! ext4 root (both made here), checked file by file; flashed twice, the second time an
//! upgrade that keeps the state dir and the config's local edits; `systemd-analyze verify`
//! on the installed unit. And a box provisioned with a fleet's device CA (`[pki]`) takes the
//! fleet's devices and issues none itself. Needs root (mount, loop devices), as flashing does.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;
use tidepool::proto::msg::GatewayMsg;

/// A root file system as a board's image carries it: the account files, and systemd's own
/// units (copied from this host) so that `systemd-analyze verify --root` can resolve the
/// targets the unit is ordered against.
fn bare_rootfs(root: &Path) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    let units = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    let ok = Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system/.")
        .arg(&units)
        .status()
        .unwrap()
        .success();
    assert!(ok, "copying systemd's units");
}

fn flash(args: &[&str]) -> std::process::Output {
    let out = script("flash.sh")
        .args(["--board", "rpi-aarch64"])
        .args(args)
        .output()
        .expect("run scripts/flash.sh");
    assert!(
        out.status.success(),
        "flash.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn verify(root: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("/usr/lib/systemd/system/tidepool.service")
        .output()
        .expect("systemd-analyze");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_of(root: &Path) -> toml::Value {
    let text = std::fs::read_to_string(root.join("etc/tidepool/tidepool.toml")).unwrap();
    toml::from_str(&text).unwrap()
}

/// What every flash leaves: the static aarch64 binary, the unit enabled, the user and state
/// dir snippets, and a config the gateway itself accepts.
fn check_tree(root: &Path) {
    let bin = std::fs::read(root.join("usr/bin/tidepool")).unwrap();
    assert_eq!(&bin[..4], b"\x7fELF");
    assert_eq!(
        u16::from_le_bytes([bin[18], bin[19]]),
        183,
        "an aarch64 binary"
    );
    let wants = root.join("etc/systemd/system/multi-user.target.wants/tidepool.service");
    assert_eq!(
        std::fs::read_link(&wants).unwrap(),
        PathBuf::from("/usr/lib/systemd/system/tidepool.service"),
        "the unit is enabled"
    );
    for f in [
        "usr/lib/systemd/system/tidepool.service",
        "usr/lib/sysusers.d/tidepool.conf",
        "usr/lib/tmpfiles.d/tidepool.conf",
        "etc/tidepool/tidepool.toml.dist",
    ] {
        assert!(root.join(f).is_file(), "{f} is installed");
    }
    let check = tidepool(&[
        "config",
        "check",
        "--config",
        root.join("etc/tidepool/tidepool.toml").to_str().unwrap(),
    ]);
    assert!(check.ok, "the installed config: {}", check.stderr);
}

#[test]
fn a_rootfs_is_flashed_then_upgraded_keeping_its_data_and_local_edits() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    bare_rootfs(&root);
    let (_, public) = keys(dir.path());
    // A fleet's device CA: the public certificate only.
    let fleet = dir.path().join("fleet");
    tidepool::pki::ensure(&tidepool::pki::PkiPaths::new(&fleet), &[]).unwrap();
    let fleet_ca = fleet.join("pki/device-ca.crt");
    flash(&[
        "--rootfs",
        root.to_str().unwrap(),
        "--uplink",
        "https://cloud.example/ingest",
        "--trusted-key",
        dir.path().join("keys/signing.pub").to_str().unwrap(),
        "--device-ca",
        fleet_ca.to_str().unwrap(),
    ]);
    check_tree(&root);
    let cfg = config_of(&root);
    assert_eq!(
        cfg["uplink"]["url"].as_str(),
        Some("https://cloud.example/ingest")
    );
    assert_eq!(cfg["pki"]["device_ca"].as_str(), Some("pki/device-ca.crt"));
    assert_eq!(
        cfg["deploy"]["trusted_keys"].as_array().unwrap()[0].as_str(),
        Some(public.as_str())
    );
    assert_eq!(
        std::fs::read(root.join("etc/tidepool/pki/device-ca.crt")).unwrap(),
        std::fs::read(&fleet_ca).unwrap()
    );
    // The board's sizing, and the user and state dir made offline.
    assert_eq!(
        cfg["store"]["cache_capacity_bytes"].as_integer(),
        Some(2 << 20)
    );
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.contains("\ntidepool:"), "{passwd}");
    assert!(root.join("var/lib/tidepool").is_dir());
    let (ok, why) = verify(&root);
    assert!(ok, "systemd-analyze verify: {why}");

    // The box runs: its store, and an edit made on it.
    let state = root.join("var/lib/tidepool/db");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("conf"), b"the box's data").unwrap();
    let cfg_path = root.join("etc/tidepool/tidepool.toml");
    let edited = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("max_connections = 256", "max_connections = 64");
    std::fs::write(&cfg_path, edited).unwrap();
    // A stale binary, so the upgrade must replace it.
    std::fs::write(root.join("usr/bin/tidepool"), b"old").unwrap();
    // The key list edited by hand into a multi-line array; a second key is added to it.
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let one_line = format!("trusted_keys = [\"{public}\"]");
    assert!(text.contains(&one_line), "{text}");
    std::fs::write(
        &cfg_path,
        text.replace(
            &one_line,
            &format!("trusted_keys = [\n    \"{public}\",\n]"),
        ),
    )
    .unwrap();
    let (_, second) = keys(&dir.path().join("second"));

    flash(&[
        "--rootfs",
        root.to_str().unwrap(),
        "--uplink",
        "https://cloud.example/v2",
        "--trusted-key",
        dir.path().join("second/keys/signing.pub").to_str().unwrap(),
    ]);
    check_tree(&root);
    assert_eq!(
        std::fs::read(state.join("conf")).unwrap(),
        b"the box's data",
        "the state dir is kept"
    );
    let cfg = config_of(&root);
    assert_eq!(
        cfg["ingress"]["max_connections"].as_integer(),
        Some(64),
        "the local edit is kept"
    );
    assert_eq!(
        cfg["uplink"]["url"].as_str(),
        Some("https://cloud.example/v2")
    );
    assert_eq!(cfg["pki"]["device_ca"].as_str(), Some("pki/device-ca.crt"));
    let keys_now: Vec<&str> = cfg["deploy"]["trusted_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        keys_now,
        [public.as_str(), second.as_str()],
        "added to the list"
    );
    // Flashed again with a key it has: not added twice.
    flash(&[
        "--rootfs",
        root.to_str().unwrap(),
        "--trusted-key",
        dir.path().join("second/keys/signing.pub").to_str().unwrap(),
    ]);
    assert_eq!(
        config_of(&root)["deploy"]["trusted_keys"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "the same key is not added twice"
    );

    // verify catches a unit whose binary is missing (the check can fail).
    std::fs::remove_file(root.join("usr/bin/tidepool")).unwrap();
    let (ok, why) = verify(&root);
    assert!(!ok && why.contains("/usr/bin/tidepool"), "{why}");
}

/// A loop device over `len` bytes at `offset` of `file`.
struct Loop(String);

impl Loop {
    fn new(file: &Path, offset: u64, len: u64) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--offset"])
            .arg(offset.to_string())
            .arg("--sizelimit")
            .arg(len.to_string())
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts the image's root partition, runs `f` on it, unmounts.
fn with_root<T>(image: &Path, f: impl FnOnce(&Path) -> T) -> T {
    let (offset, len) = (ROOT_START * 512, ROOT_SECTORS * 512);
    let dev = Loop::new(image, offset, len);
    let mnt = tempfile::tempdir().unwrap();
    run(Command::new("mount").arg(&dev.0).arg(mnt.path()));
    let r = f(mnt.path());
    run(Command::new("umount").arg(mnt.path()));
    r
}

const BOOT_START: u64 = 2048;
const BOOT_SECTORS: u64 = 16384;
const ROOT_START: u64 = BOOT_START + BOOT_SECTORS;
const ROOT_SECTORS: u64 = 98304;

#[test]
fn a_disk_image_is_found_mounted_flashed_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("card.img");
    // An SD card's layout: a FAT boot partition, then the ext4 root.
    let f = std::fs::File::create(&image).unwrap();
    f.set_len((ROOT_START + ROOT_SECTORS) * 512).unwrap();
    drop(f);
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&image)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (scripts/test.sh installs fdisk)");
    use std::io::Write as _;
    write!(
        sfdisk.stdin.take().unwrap(),
        "label: dos\nstart={BOOT_START}, size={BOOT_SECTORS}, type=c\nstart={ROOT_START}, size={ROOT_SECTORS}, type=83\n"
    )
    .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    {
        let dev = Loop::new(&image, ROOT_START * 512, ROOT_SECTORS * 512);
        run(Command::new("mkfs.ext4").args(["-q", "-L", "rootfs", &dev.0]));
    }
    with_root(&image, bare_rootfs);

    // An image in use (attached, as a mounted card is) is refused, untouched.
    {
        let _busy = Loop::new(&image, ROOT_START * 512, ROOT_SECTORS * 512);
        let out = script("flash.sh")
            .args(["--board", "rpi-aarch64", "--image", image.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("attached to a loop device"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    with_root(&image, |root| {
        assert!(
            !root.join("usr/bin/tidepool").exists(),
            "nothing was installed"
        );
    });
    flash(&[
        "--image",
        image.to_str().unwrap(),
        "--uplink",
        "http://10.0.0.1/ingest",
    ]);
    with_root(&image, |root| {
        check_tree(root);
        assert_eq!(
            config_of(root)["uplink"]["url"].as_str(),
            Some("http://10.0.0.1/ingest")
        );
        std::fs::write(root.join("var/lib/tidepool/marker"), b"kept").unwrap();
        let (ok, why) = verify(root);
        assert!(ok, "systemd-analyze verify: {why}");
    });
    flash(&["--image", image.to_str().unwrap()]);
    with_root(&image, |root| {
        check_tree(root);
        assert_eq!(
            std::fs::read(root.join("var/lib/tidepool/marker")).unwrap(),
            b"kept"
        );
        assert_eq!(
            config_of(root)["uplink"]["url"].as_str(),
            Some("http://10.0.0.1/ingest")
        );
    });
    // Nothing is left mounted or attached.
    let loops = Command::new("losetup")
        .arg("-j")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        loops.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&loops.stdout)
    );
}

#[tokio::test]
async fn a_box_with_a_fleet_device_ca_takes_the_fleets_devices_and_issues_none_itself() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    tidepool::pki::ensure(&tidepool::pki::PkiPaths::new(&fleet), &[]).unwrap();
    let issued = tidepool::pki::issue_device(&fleet, "dev-9", &dir.path().join("dev")).unwrap();
    let gw = Gateway::start(&format!(
        "[pki]\ndevice_ca = \"{}\"\n",
        fleet.join("pki/device-ca.crt").display()
    ));
    let box_ca = gw.data().join("pki/server-ca.crt");
    let dev = tidepool::client::Device::connect(&gw.addr, &box_ca, &issued[0], &issued[1])
        .await
        .expect("a fleet device gets in");
    let mut s = dev.open().await.unwrap();
    s.send(&publish(1, "devices/dev-9/temp", b"{}"))
        .await
        .unwrap();
    assert_eq!(until_ack(&mut s, 1).await, vec![GatewayMsg::Ack { seq: 1 }]);
    dev.close().await;
    // No device CA of its own: none generated, and `certs device` refuses, saying why.
    assert!(!gw.data().join("pki/device-ca.key").exists());
    let run = cli(
        &[
            "certs",
            "device",
            "dev-10",
            "--out",
            dir.path().join("x").to_str().unwrap(),
        ],
        &gw.config,
    );
    assert!(!run.ok);
    assert!(run.stderr.contains("pki.device_ca"), "{}", run.stderr);
}

#[tokio::test]
async fn a_fleet_provisions_a_box_by_csr_and_its_devices_reach_it_with_the_fleets_ca() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let run = tidepool(&["certs", "init", "--out", &p(&fleet)]);
    assert!(run.ok, "{}", run.stderr);
    let mut gw = Gateway::start(&format!(
        "[pki]\ndevice_ca = \"{}\"\n",
        fleet.join("device-ca.crt").display()
    ));
    // On the box: a request for its own key, which stays where it is.
    let key_before = std::fs::read(gw.data().join("pki/server.key")).unwrap();
    let csr = dir.path().join("box.csr");
    let run = cli(&["certs", "csr", "--out", &p(&csr)], &gw.config);
    assert!(run.ok, "{}", run.stderr);
    let csr_text = std::fs::read_to_string(&csr).unwrap();
    assert!(csr_text.contains("BEGIN CERTIFICATE REQUEST") && !csr_text.contains("PRIVATE"));
    // Where the fleet's CAs are: signed.
    let crt = dir.path().join("box.crt");
    let run = tidepool(&[
        "certs",
        "sign",
        "--ca",
        &p(&fleet),
        &p(&csr),
        "--out",
        &p(&crt),
    ]);
    assert!(run.ok, "{}", run.stderr);
    // A device makes its own key and request; the fleet signs it (the device keeps its key).
    let dev_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dev_csr = rcgen::CertificateParams::new(vec!["ignored.example".to_string()])
        .unwrap()
        .serialize_request(&dev_key)
        .unwrap();
    let dev_dir = dir.path().join("dev");
    std::fs::create_dir_all(&dev_dir).unwrap();
    std::fs::write(dev_dir.join("d7.csr"), dev_csr.pem().unwrap()).unwrap();
    std::fs::write(dev_dir.join("d7.key"), dev_key.serialize_pem()).unwrap();
    let run = tidepool(&[
        "certs",
        "device",
        "d7",
        "--csr",
        &p(&dev_dir.join("d7.csr")),
        "--ca",
        &p(&fleet),
        "--out",
        &p(&dev_dir),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let (dev_crt, dev_key_file, fleet_ca) = (
        dev_dir.join("d7.crt"),
        dev_dir.join("d7.key"),
        dev_dir.join("ca.crt"),
    );
    assert_eq!(
        std::fs::read(&fleet_ca).unwrap(),
        std::fs::read(fleet.join("server-ca.crt")).unwrap()
    );
    // Before the box serves the fleet's certificate, the device does not trust it.
    let before =
        tidepool::client::Device::connect(&gw.addr, &fleet_ca, &dev_crt, &dev_key_file).await;
    assert!(
        before.is_err(),
        "the box's own server CA is not the fleet's"
    );
    // A certificate for another key is refused; the box's own is installed.
    let other = dir.path().join("other.crt");
    std::fs::copy(&dev_crt, &other).unwrap();
    let run = cli(&["certs", "install", &p(&other)], &gw.config);
    assert!(
        !run.ok && run.stderr.contains("not this box's"),
        "{}",
        run.stderr
    );
    let run = cli(&["certs", "install", &p(&crt)], &gw.config);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        std::fs::read(gw.data().join("pki/server.key")).unwrap(),
        key_before
    );
    // The box's own server CA is no longer what its clients must trust: issuing on the box
    // without the fleet's CAs is refused.
    // (The operator CA is still the box's own here: only the server side changed.)
    let run = cli(
        &[
            "certs",
            "operator",
            "ann",
            "--out",
            &p(&dir.path().join("ann")),
        ],
        &gw.config,
    );
    assert!(
        !run.ok
            && run
                .stderr
                .contains("serves a server certificate from another CA"),
        "{}",
        run.stderr
    );
    gw.restart();
    let dev = tidepool::client::Device::connect(&gw.addr, &fleet_ca, &dev_crt, &dev_key_file)
        .await
        .expect("a fleet device reaches a fleet box");
    let mut s = dev.open().await.unwrap();
    s.send(&publish(1, "devices/d7/temp", b"{}")).await.unwrap();
    assert_eq!(until_ack(&mut s, 1).await, vec![GatewayMsg::Ack { seq: 1 }]);
    dev.close().await;
}
