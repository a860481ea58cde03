//! The admin channel, as operators use it: `deploy`, `list`, `rollback`, `remove`, `status`
//! and `dead-letters export` over QUIC with an operator certificate (and the same through the
//! local socket); a version that fails its probation rolled back on its own, with no cloud;
//! and every refusal (a device certificate on the admin ALPN, an operator certificate on the
//! device ALPN, an expired or revoked operator, an address outside the allow-list, an
//! oversized or unsigned bundle, a pinned handler, a replay after a rollback) answered with a
//! clear reason and nothing changed.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;
use tidepool::admin::client::Remote;

/// `tidepool certs operator NAME` for `gw` into `dir`: the profile it wrote.
fn operator(gw: &Gateway, dir: &Path, name: &str) -> PathBuf {
    let r = cli(
        &[
            "certs",
            "operator",
            name,
            "--out",
            dir.to_str().unwrap(),
            "--gateway",
            &gw.addr,
        ],
        &gw.config,
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("serial:"), "{}", r.stdout);
    dir.join(format!("{name}.toml"))
}

/// The serial `certs operator` printed for a certificate, as `serial:<hex>`.
fn serial_of(cert: &Path) -> String {
    let der = tidepool::pki::read_certs(cert).unwrap();
    format!("serial:{}", tidepool::pki::serial_hex(&der[0]).unwrap())
}

/// `tidepool ARGS --profile PROFILE`.
fn admin(profile: &Path, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend(["--profile", profile.to_str().unwrap()]);
    tidepool(&all)
}

/// `list --json` through `profile`, by name.
fn list(profile: &Path) -> serde_json::Value {
    let r = admin(profile, &["list", "--json"]);
    assert!(r.ok, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

fn listed(profile: &Path, name: &str) -> serde_json::Value {
    let all = list(profile);
    all.as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not listed: {all}"))
}

/// Writes a signed counter bundle to `dir/FILE`.
fn bundle_file(dir: &Path, file: &str, handler: &(String, Vec<u8>), key: &Path) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, signed(dir, handler, key)).unwrap();
    p
}

/// A handler that traps on every event.
fn trapping(name: &str, version: u64) -> (String, Vec<u8>) {
    let wat = r#"(module
      (memory (export "memory") 1)
      (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32) unreachable))"#;
    (
        format!("name = \"{name}\"\nversion = {version}\nsubscribe = [\"devices/#\"]\n"),
        wat::parse_str(wat).unwrap(),
    )
}

/// An admin connection held open, asked on a new stream each time.
struct AdminConn {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl AdminConn {
    async fn open(r: &Remote) -> AdminConn {
        let config = tidepool::ingress::tls::admin_client_config(&r.ca, &r.cert, &r.key).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let addr = r.gateway.parse().unwrap();
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        AdminConn {
            conn,
            _endpoint: endpoint,
        }
    }

    async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self._endpoint.wait_idle().await;
    }

    /// The raw answer to one request line, trailer included.
    async fn ask(&self, line: &str) -> String {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        send.finish().unwrap();
        String::from_utf8(recv.read_to_end(1 << 20).await.unwrap()).unwrap()
    }
}

/// An operator deploys, lists, rolls back and removes over the admin channel: each change
/// takes at once (the next event runs on it), the registry shows what runs and why, the
/// floor holds after a rollback (the version rolled back from cannot be replayed), a pinned
/// handler cannot be touched, and a removal takes the handler's state with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_deploys_lists_rolls_back_and_removes_over_the_admin_channel() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let pinned = wat_handler(
        dir.path(),
        "pinned",
        COUNTER_WAT,
        "subscribe = [\"pinned/#\"]\n",
    );
    let mut gw = Gateway::start(&format!(
        "[deploy]\ntrusted_keys = [\"{public}\"]\nprobation_events = 0\n{pinned}"
    ));
    let ops = tempfile::tempdir().unwrap();
    let alice = operator(&gw, ops.path(), "alice");

    let v1 = bundle_file(dir.path(), "v1.tpb", &counter("counter", 1, "n", ""), &key);
    let v2 = bundle_file(dir.path(), "v2.tpb", &counter("counter", 2, "m", ""), &key);
    let r = admin(&alice, &["deploy", v1.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("deployed counter v1 as a new handler"),
        "{}",
        r.stdout
    );
    publish_one(&gw, 1).await;
    let r = admin(&alice, &["deploy", v2.to_str().unwrap()]);
    assert!(
        r.ok && r.stdout.contains("in place of v1"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    publish_one(&gw, 2).await;

    let c = listed(&alice, "counter");
    assert_eq!(
        (&c["source"], &c["running"], &c["previous"], &c["floor"]),
        (&"bundle".into(), &2.into(), &1.into(), &2.into()),
        "{c}"
    );
    assert_eq!(c["signer"].as_str().unwrap().len(), 64);
    let p = listed(&alice, "pinned");
    assert_eq!((&p["source"], &p["running"]), (&"config".into(), &1.into()));
    // The same through the local socket, and as a table.
    let local = cli(&["list"], &gw.config);
    assert!(local.ok, "{}", local.stderr);
    assert!(
        local.stdout.starts_with("NAME") && local.stdout.contains("counter  bundle  v2"),
        "{}",
        local.stdout
    );

    // Back to v1: the next event runs on it; v2 cannot come back, nor can a second rollback.
    let r = admin(&alice, &["rollback", "counter"]);
    assert!(
        r.ok && r.stdout.contains("rolled back counter from v2 to v1"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    publish_one(&gw, 3).await;
    let c = listed(&alice, "counter");
    assert_eq!(
        (&c["running"], &c["previous"], &c["floor"]),
        (&1.into(), &serde_json::Value::Null, &2.into())
    );
    let note = c["note"].as_str().unwrap();
    assert!(
        note.contains("rolled back from version 2 to 1 by operator alice (serial "),
        "{note}"
    );
    let replay = admin(&alice, &["deploy", v2.to_str().unwrap()]);
    assert!(
        !replay.ok && replay.stderr.contains("is not above 2"),
        "{}",
        replay.stderr
    );
    let again = admin(&alice, &["rollback", "counter"]);
    assert!(
        !again.ok && again.stderr.contains("no previous version"),
        "{}",
        again.stderr
    );
    for verb in ["rollback", "remove"] {
        let r = admin(&alice, &[verb, "pinned"]);
        assert!(
            !r.ok && r.stderr.contains("is pinned"),
            "{verb}: {}",
            r.stderr
        );
    }
    let unknown = admin(&alice, &["remove", "nobody"]);
    assert!(
        !unknown.ok
            && unknown
                .stderr
                .contains("no handler `nobody` was deployed here"),
        "{}",
        unknown.stderr
    );

    // Removed: no longer runs, its state goes; its floor stays, and a higher version can come.
    let r = admin(&alice, &["remove", "counter", "--json"]);
    assert!(r.ok, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (&v["from"], &v["to"]),
        (&1.into(), &serde_json::Value::Null)
    );
    let st = admin(&alice, &["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert!(
        !st["handlers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "counter"),
        "{st}"
    );
    assert!(
        st["metrics"]["admin_requests"].as_u64().unwrap() >= 10,
        "{st}"
    );
    publish_one(&gw, 4).await;
    let c = listed(&alice, "counter");
    assert_eq!(
        (&c["running"], &c["floor"]),
        (&serde_json::Value::Null, &2.into())
    );
    assert!(c["note"]
        .as_str()
        .unwrap()
        .starts_with("removed by operator alice"));
    let v3 = bundle_file(dir.path(), "v3.tpb", &counter("counter", 3, "n", ""), &key);
    let r = admin(&alice, &["deploy", v3.to_str().unwrap()]);
    assert!(
        r.ok && r.stdout.contains("as a new handler"),
        "{}",
        r.stderr
    );
    publish_one(&gw, 5).await;
    let export = admin(&alice, &["dead-letters", "export"]);
    assert!(export.ok && export.stdout.is_empty(), "{}", export.stderr);
    gw.stop();
    // v1 had counted 2 in `n` and v2 1 in `m`: the removal took both; v3 counted 1 afresh.
    assert_eq!(
        read_state(&gw.data(), "counter", b"n"),
        Some(1u64.to_le_bytes().to_vec())
    );
    assert_eq!(read_state(&gw.data(), "counter", b"m"), None);
}

/// Who may not use the admin channel, each refused with a reason and nothing changed: a
/// device certificate on the admin ALPN, an operator certificate on the device ALPN, an
/// expired operator certificate, operators revoked by name and (after a reload) by serial,
/// an address outside admin.allow_from; and what may not be deployed through it: an
/// oversized bundle (refused before it is read), an unsigned one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_channel_refuses_the_wrong_role_expired_revoked_and_outside_operators() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let mut gw = Gateway::start(&format!(
        "[deploy]\ntrusted_keys = [\"{public}\"]\nmax_bundle_bytes = 4096\n[admin]\nrevoked = [\"mallory\"]\n"
    ));
    let ops = tempfile::tempdir().unwrap();
    let alice = operator(&gw, ops.path(), "alice");
    let mallory = operator(&gw, ops.path(), "mallory");
    let bob = operator(&gw, ops.path(), "bob");
    let v1 = bundle_file(dir.path(), "v1.tpb", &counter("counter", 1, "n", ""), &key);
    let nothing_deployed = |gw: &Gateway| {
        let r = cli(&["list", "--json"], &gw.config);
        assert_eq!(r.stdout.trim(), "[]", "{}", r.stderr);
    };

    // An operator revoked by name.
    let r = admin(&mallory, &["deploy", v1.to_str().unwrap()]);
    assert!(!r.ok && r.stderr.contains("revoked"), "{}", r.stderr);
    // A device certificate on the admin ALPN: the role is checked after the handshake.
    let (dc, dk, ca) = gw.device_certs("dev-1");
    let device = Remote {
        gateway: gw.addr.clone(),
        ca: ca.clone(),
        cert: dc.clone(),
        key: dk.clone(),
    };
    let err = device.ask("list", &[], &mut Vec::new()).await.unwrap_err();
    assert!(err.to_string().contains("wrong_role"), "{err}");
    // An operator certificate on the device ALPN.
    let op_cert = ops.path().join("alice.crt");
    let op_key = ops.path().join("alice.key");
    let d = tidepool::client::Device::connect(&gw.addr, &ca, &op_cert, &op_key)
        .await
        .unwrap();
    let published = async {
        let mut s = d.open().await?;
        s.send(&publish(1, "devices/alice/x", b"1")).await?;
        s.next().await
    };
    assert!(
        published.await.is_err(),
        "an operator published as a device"
    );
    match d.conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(4), "{c:?}")
        }
        other => panic!("{other:?}"),
    }
    // An expired operator certificate, from the operator CA: refused in the handshake.
    let (old_crt, old_key, _) = gw.odd_cert("operator-ca", ops.path(), "old", |p| {
        p.distinguished_name.push(rcgen::DnType::CommonName, "old");
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let expired = Remote {
        gateway: gw.addr.clone(),
        ca: ca.clone(),
        cert: old_crt,
        key: old_key,
    };
    let err = expired.ask("list", &[], &mut Vec::new()).await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
    // A certificate that expires while its connection is open: refused from then on.
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let (short_crt, short_key, _) = gw.odd_cert("operator-ca", ops.path(), "brief", |p| {
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "brief");
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = soon;
    });
    let brief = AdminConn::open(&Remote {
        gateway: gw.addr.clone(),
        ca: ca.clone(),
        cert: short_crt,
        key: short_key,
    })
    .await;
    assert_eq!(brief.ask("list").await, "[]\n#ok\n");
    // (Time is the event awaited here: the certificate's end.)
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        brief.ask("list").await,
        "#error: this operator's certificate has expired\n"
    );
    brief.close().await;
    // Too large: refused from its announced length, before it is read, and the refusal
    // reaches the client although it was still sending (5 MB: past QUIC's stream window and
    // the socket's buffer); through the channel and the local socket. Unsigned: refused.
    let big = dir.path().join("big.tpb");
    std::fs::write(&big, vec![7u8; 5 << 20]).unwrap();
    for r in [
        admin(&alice, &["deploy", big.to_str().unwrap()]),
        cli(&["deploy", big.to_str().unwrap()], &gw.config),
    ] {
        assert!(
            !r.ok
                && r.stderr
                    .contains("over deploy.max_bundle_bytes (4096); nothing was read"),
            "{}",
            r.stderr
        );
    }
    // Signed by a trusted key but built by hand (`bundle build` refuses them): a WASI import,
    // a start function. Refused at the deploy, before anything runs.
    let signing = {
        let der = tidepool::pki::read_key(&key).unwrap();
        tidepool::admin::bundle::SigningKey::from_pkcs8(der.secret_der()).unwrap()
    };
    for (wat, says) in [
        (
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))))"#,
            "wasi_snapshot_preview1",
        ),
        (
            r#"(module (memory (export "memory") 1) (func $s) (start $s)
               (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
               (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32) (i32.const 0)))"#,
            "start",
        ),
    ] {
        let manifest = "name = \"sly\"\nversion = 1\nsubscribe = [\"devices/#\"]\n";
        let module = wat::parse_str(wat).unwrap();
        let file = dir.path().join("sly.tpb");
        std::fs::write(
            &file,
            tidepool::admin::bundle::build(manifest, &module, &signing).unwrap(),
        )
        .unwrap();
        let r = admin(&alice, &["deploy", file.to_str().unwrap()]);
        assert!(!r.ok && r.stderr.contains(says), "{says}: {}", r.stderr);
    }
    let bare = dir.path().join("bare.tpb");
    std::fs::write(&bare, counter("counter", 1, "n", "").1).unwrap();
    let r = admin(&alice, &["deploy", bare.to_str().unwrap()]);
    assert!(
        !r.ok && r.stderr.contains("not a Tidepool bundle"),
        "{}",
        r.stderr
    );
    nothing_deployed(&gw);

    // Bob works, then is revoked by serial: a reload shuts him out, on the connection he
    // holds open as on a new one.
    assert!(admin(&bob, &["list"]).ok);
    let bobs = AdminConn::open(&Remote::from_profile(&bob).unwrap()).await;
    assert_eq!(bobs.ask("list").await, "[]\n#ok\n");
    let serial = serial_of(&ops.path().join("bob.crt"));
    gw.edit_config(
        "revoked = [\"mallory\"]",
        &format!("revoked = [\"mallory\", \"{serial}\"]"),
    );
    gw.signal("-HUP");
    gw.wait_log("admin_revoked=2", 1, Duration::from_secs(10))
        .await;
    let r = admin(&bob, &["deploy", v1.to_str().unwrap()]);
    assert!(!r.ok && r.stderr.contains("revoked"), "{}", r.stderr);
    assert_eq!(
        bobs.ask("list").await,
        "#error: this operator is revoked (admin.revoked)\n"
    );
    bobs.close().await;
    nothing_deployed(&gw);
    let st = cli(&["status", "--json"], &gw.config);
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    // Mallory, the device, Brief once expired, Bob twice (the expired certificate failed in
    // the TLS handshake itself).
    assert_eq!(st["metrics"]["admin_refused"], 5, "{st}");
    // Alice still can.
    let r = admin(&alice, &["deploy", v1.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    gw.stop();

    // At most 16 operator connections at once: the 17th is closed (a gateway of its own: a
    // connection whose close was lost, as the 5 MB upload's may be on UDP, counts until its
    // idle timeout).
    let mut crowded = Gateway::start("");
    let dave = operator(&crowded, ops.path(), "dave");
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(AdminConn::open(&Remote::from_profile(&dave).unwrap()).await);
    }
    assert_eq!(held[15].ask("list").await, "[]\n#ok\n");
    let err = Remote::from_profile(&dave)
        .unwrap()
        .ask("list", &[], &mut Vec::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("too_many_operator_connections"),
        "{err}"
    );
    drop(held);
    crowded.stop();

    // A gateway that takes operators from 10.0.0.0/8 only: loopback is dropped in the
    // handshake, before its certificate is looked at.
    let mut far = Gateway::start("[admin]\nallow_from = [\"10.0.0.0/8\"]\n");
    let carol = operator(&far, ops.path(), "carol");
    let r = admin(&carol, &["list"]);
    assert!(!r.ok, "{}", r.stdout);
    let st = cli(&["status", "--json"], &far.config);
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(st["metrics"]["admin_refused"], 1, "{st}");
    assert_eq!(st["metrics"]["admin_connections"], 0, "{st}");
    far.stop();
}

/// Probation, with no cloud configured: a version deployed over a good one that fails more
/// than allowed among its first runs is rolled back on its own (the next event runs the good
/// one, and `list` says why); a new handler that fails is removed; one that passes leaves
/// probation; a restart during probation starts its count again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_fails_its_probation_is_rolled_back_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let mut gw = Gateway::start(&format!(
        "[deploy]\ntrusted_keys = [\"{public}\"]\nprobation_events = 5\nprobation_max_failures = 2\n"
    ));
    let ops = tempfile::tempdir().unwrap();
    let alice = operator(&gw, ops.path(), "alice");
    let deploy = |file: &str, h: &(String, Vec<u8>)| {
        let p = bundle_file(dir.path(), file, h, &key);
        let r = admin(&alice, &["deploy", p.to_str().unwrap()]);
        assert!(
            r.ok && r.stdout.contains("on probation"),
            "{}{}",
            r.stdout,
            r.stderr
        );
    };

    // v1 passes: five runs without failure.
    deploy("v1.tpb", &counter("counter", 1, "n", ""));
    let p = &listed(&alice, "counter")["probation"];
    assert_eq!((&p["runs"], &p["of_runs"]), (&0.into(), &5.into()), "{p}");
    for seq in 1..=5 {
        publish_one(&gw, seq).await;
    }
    gw.wait_log(
        "deployed version passed its probation",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert!(listed(&alice, "counter")["probation"].is_null());

    // v2 traps: the third failure (more than 2) rolls it back to v1.
    deploy("v2.tpb", &trapping("counter", 2));
    for seq in 6..=8 {
        publish_one(&gw, seq).await;
    }
    gw.wait_log(
        "rolled back from version 2 to version 1",
        1,
        Duration::from_secs(10),
    )
    .await;
    let c = listed(&alice, "counter");
    assert_eq!((&c["running"], &c["floor"]), (&1.into(), &2.into()), "{c}");
    let note = c["note"].as_str().unwrap();
    assert!(
        note.contains("by probation: version 2 failed its probation: 3 of its first 3 runs failed"),
        "{note}"
    );
    // `status` says why too.
    let st = admin(&alice, &["status"]);
    assert!(
        st.stdout
            .contains("handler counter: rolled back from version 2 to 1 by probation"),
        "{}",
        st.stdout
    );
    publish_one(&gw, 9).await;

    // A new handler that fails is removed.
    deploy("fresh.tpb", &trapping("fresh", 1));
    for seq in 10..=12 {
        publish_one(&gw, seq).await;
    }
    gw.wait_log("`fresh` removed", 1, Duration::from_secs(10))
        .await;
    let f = listed(&alice, "fresh");
    assert!(f["running"].is_null(), "{f}");
    assert!(
        f["note"]
            .as_str()
            .unwrap()
            .starts_with("removed by probation"),
        "{f}"
    );

    // v3 on probation across a restart: its count starts again.
    deploy("v3.tpb", &counter("counter", 3, "n", ""));
    publish_one(&gw, 13).await;
    publish_one(&gw, 14).await;
    assert_eq!(listed(&alice, "counter")["probation"]["runs"], 2);
    gw.restart();
    // (A new port: asked through the local socket.)
    let all = cli(&["list", "--json"], &gw.config);
    let all: serde_json::Value = serde_json::from_str(&all.stdout).unwrap();
    let p = &all[0]["probation"];
    assert_eq!(
        (&all[0]["name"], &p["runs"], &p["of_runs"]),
        (&"counter".into(), &0.into(), &5.into()),
        "{all}"
    );
    gw.stop();
    // v1 ran for 1..=5 and 9..=12; v2's runs trapped; v3 ran for 13 and 14.
    assert_eq!(
        read_state(&gw.data(), "counter", b"n"),
        Some(11u64.to_le_bytes().to_vec())
    );
}

/// `fleet deploy` goes wave by wave, each wave's probation passed (here by its time, with no
/// events) before the next; a wave that fails anywhere (a gateway that does not trust the
/// key) stops the rollout, and the gateways after it are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_deploy_goes_in_waves_and_stops_at_a_failed_wave() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    // Six gateways; the fourth does not trust the key.
    let gws: Vec<Gateway> = (0..6)
        .map(|i| {
            let trusted = match i {
                3 => String::new(),
                _ => format!("\"{public}\""),
            };
            Gateway::start(&format!(
                "[deploy]\ntrusted_keys = [{trusted}]\nprobation_s = 1\n"
            ))
        })
        .collect();
    let mut inventory = String::new();
    for (i, gw) in gws.iter().enumerate() {
        let files = dir.path().join(format!("gw-{i}"));
        operator(gw, &files, "alice");
        inventory += &format!(
            "[[gateway]]\nname = \"gw-{i}\"\naddress = \"{}\"\nca = \"gw-{i}/ca.crt\"\ncert = \"gw-{i}/alice.crt\"\nkey = \"gw-{i}/alice.key\"\n",
            gw.addr
        );
    }
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(&fleet, &inventory).unwrap();
    let v1 = bundle_file(dir.path(), "v1.tpb", &counter("counter", 1, "n", ""), &key);
    let r = tidepool(&[
        "fleet",
        "deploy",
        v1.to_str().unwrap(),
        "--inventory",
        fleet.to_str().unwrap(),
        "--wave",
        "2",
        "--json",
    ]);
    assert!(!r.ok, "a failed wave fails the command: {}", r.stderr);
    let out: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let row = |i: usize| {
        let o = &out[i];
        (
            o["wave"].as_u64(),
            o["result"].as_str().unwrap().to_string(),
            o["detail"].as_str().unwrap().to_string(),
        )
    };
    for i in 0..3 {
        let (wave, result, detail) = row(i);
        assert_eq!(
            (wave, result.as_str()),
            (Some(i as u64 / 2 + 1), "passed"),
            "{detail}"
        );
        assert!(detail.contains("probation passed"), "{detail}");
    }
    let (wave, result, detail) = row(3);
    assert_eq!((wave, result.as_str()), (Some(2), "failed"));
    assert!(detail.contains("not in trusted_keys"), "{detail}");
    for (i, gw) in gws.iter().enumerate().skip(4) {
        let (wave, result, _) = row(i);
        assert_eq!((wave, result.as_str()), (None, "skipped"));
        let listed = cli(&["list", "--json"], &gw.config);
        assert_eq!(listed.stdout.trim(), "[]", "gw-{i} was touched");
    }
    assert!(
        r.stderr.contains("3 of 6 gateways run counter v1"),
        "{}",
        r.stderr
    );

    // Without the gateway that refuses: v2 everywhere else, in two waves of 50%.
    let rest: String = inventory
        .split("[[gateway]]")
        .filter(|g| !g.contains("gw-3"))
        .filter(|g| !g.is_empty())
        .map(|g| format!("[[gateway]]{g}"))
        .collect();
    std::fs::write(&fleet, rest).unwrap();
    let v2 = bundle_file(dir.path(), "v2.tpb", &counter("counter", 2, "n", ""), &key);
    let r = tidepool(&[
        "fleet",
        "deploy",
        v2.to_str().unwrap(),
        "--inventory",
        fleet.to_str().unwrap(),
        "--wave",
        "50%",
    ]);
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("GATEWAY"), "{}", r.stdout);
    assert_eq!(r.stdout.matches("  passed  ").count(), 5, "{}", r.stdout);
    assert!(r.stderr.contains("in 2 waves"), "{}", r.stderr);
}

/// What a publish of `topic` (seq `seq`) from `device` is answered: `Ok(())` acked, `Err(code)`
/// nacked.
async fn answered(gw: &Gateway, device: &str, seq: u64, topic: &str) -> Result<(), String> {
    use tidepool::proto::msg::GatewayMsg;
    let d = gw.connect(device).await;
    let mut s = d.open().await.unwrap();
    s.send(&publish(seq, topic, b"1")).await.unwrap();
    let answer = match s.next().await.unwrap() {
        Some(GatewayMsg::Ack { .. }) => Ok(()),
        Some(GatewayMsg::Nack { code, .. }) => Err(format!("{code:?}")),
        other => panic!("{other:?}"),
    };
    d.close().await;
    answer
}

/// A config bundle (`kind = "config"`, signed by one of the box's own keys) puts its settings
/// in force at once, with nothing edited on the box: a publish ACL (a topic nacked before is
/// acked), a device deny-list (a connected device is closed with `revoked`), a key that then
/// signs handler bundles. They hold across a SIGHUP reload of the file and a restart. Refused,
/// changing nothing: the same version again, one signed by a key a config bundle added, one
/// whose settings do not check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_config_bundle_puts_acls_deny_lists_and_keys_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (key_b, public_b) = keys(other.path());
    let mut gw = Gateway::start(&format!("[deploy]\ntrusted_keys = [\"{public}\"]\n"));
    let ops = tempfile::tempdir().unwrap();
    let alice = operator(&gw, ops.path(), "alice");
    let config_bundle = |file: &str, text: &str, key: &Path| {
        let (m, out) = (
            dir.path().join(format!("{file}.toml")),
            dir.path().join(file),
        );
        std::fs::write(&m, text).unwrap();
        let r = build_with(&m, None, key, &out);
        assert!(
            r.ok && r.stdout.contains("config bundle version"),
            "{}",
            r.stderr
        );
        out
    };
    let by_b = bundle_file(dir.path(), "b.tpb", &counter("bee", 1, "n", ""), &key_b);

    // Before: plant/x is not d1's to publish, key B signs nothing here, d2 connects.
    assert_eq!(answered(&gw, "d1", 1, "plant/x").await, Err("Acl".into()));
    let r = admin(&alice, &["deploy", by_b.to_str().unwrap()]);
    assert!(
        !r.ok && r.stderr.contains("not in trusted_keys"),
        "{}",
        r.stderr
    );
    let d2 = gw.connect("d2").await;

    let c1 = config_bundle(
        "c1.tpb",
        &format!(
            "kind = \"config\"\nversion = 1\n[acl]\npublish = [\"devices/{{id}}/#\", \"plant/#\"]\nrevoked = [\"d2\"]\n[deploy]\ntrusted_keys = [\"{public_b}\"]\n"
        ),
        &key,
    );
    let r = admin(&alice, &["deploy", c1.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("deployed @config v1"), "{}", r.stdout);
    // d2 is closed with `revoked` (6); plant/x is acked; key B's handler deploys.
    let closed = tokio::time::timeout(Duration::from_secs(10), d2.conn.closed());
    match closed.await.expect("d2 is closed at once") {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(6), "{c:?}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(answered(&gw, "d1", 2, "plant/x").await, Ok(()));
    let r = admin(&alice, &["deploy", by_b.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    let c = listed(&alice, "@config");
    assert_eq!(
        (&c["source"], &c["running"]),
        (&"settings".into(), &1.into())
    );

    // Refused, nothing changed.
    let r = admin(&alice, &["deploy", c1.to_str().unwrap()]);
    assert!(!r.ok && r.stderr.contains("is not above 1"), "{}", r.stderr);
    let signed_by_b = config_bundle(
        "c2b.tpb",
        "kind = \"config\"\nversion = 2\n[acl]\npublish = []\n",
        &key_b,
    );
    let r = admin(&alice, &["deploy", signed_by_b.to_str().unwrap()]);
    assert!(
        !r.ok && r.stderr.contains("must be signed by one of the box's own"),
        "{}",
        r.stderr
    );
    let bad = dir.path().join("bad.tpb");
    let bad_text = "kind = \"config\"\nversion = 2\n[admin]\nallow_from = [\"nowhere\"]\n";
    std::fs::write(dir.path().join("bad.toml"), bad_text).unwrap();
    // (`bundle build` refuses it too; signed here by hand, as a hostile signer could.)
    let signing = {
        let der = tidepool::pki::read_key(&key).unwrap();
        tidepool::admin::bundle::SigningKey::from_pkcs8(der.secret_der()).unwrap()
    };
    std::fs::write(
        &bad,
        tidepool::admin::bundle::build(bad_text, b"", &signing).unwrap(),
    )
    .unwrap();
    let r = admin(&alice, &["deploy", bad.to_str().unwrap()]);
    assert!(
        !r.ok && r.stderr.contains("admin.allow_from"),
        "{}",
        r.stderr
    );
    assert_eq!(listed(&alice, "@config")["running"], 1);
    assert_eq!(answered(&gw, "d1", 3, "plant/x").await, Ok(()));

    // A reload of the file keeps the bundle's settings, and so does a restart.
    gw.signal("-HUP");
    gw.wait_log("in force: acl.revoked", 2, Duration::from_secs(10))
        .await;
    let refused = gw.connect("d2").await;
    let closed = tokio::time::timeout(Duration::from_secs(10), refused.conn.closed());
    assert!(matches!(
        closed.await.expect("d2 is refused"),
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(6)
    ));
    gw.restart();
    assert_eq!(answered(&gw, "d1", 4, "plant/x").await, Ok(()));
    let st = cli(&["status", "--json"], &gw.config);
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert!(
        st["handlers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "bee"),
        "key B's handler runs after the restart: {st}"
    );

    // Its signer taken out of the file's keys: the bundle is no longer in force (plant/x is
    // nacked again) except its deny-lists (d2 stays out).
    gw.edit_config(
        &format!("trusted_keys = [\"{public}\"]"),
        "trusted_keys = []",
    );
    gw.signal("-HUP");
    gw.wait_log("only its deny-lists stay", 1, Duration::from_secs(10))
        .await;
    // (The log spans the restart: the deploy's, the first reload's, this one's.)
    gw.wait_log("in force: acl.revoked", 3, Duration::from_secs(10))
        .await;
    assert_eq!(answered(&gw, "d1", 5, "plant/x").await, Err("Acl".into()));
    let refused = gw.connect("d2").await;
    let closed = tokio::time::timeout(Duration::from_secs(10), refused.conn.closed());
    assert!(matches!(
        closed.await.expect("d2 is still refused"),
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(6)
    ));
    gw.stop();
}
