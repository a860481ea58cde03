//! Signed bundles from the command line, as an operator makes them: `keys generate`, `bundle
//! build`, `bundle inspect`; and what is refused, with a clear reason and nothing written.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

fn inspect(bundle: &Path, config: &Path) -> Run {
    cli(&["bundle", "inspect", bundle.to_str().unwrap()], config)
}

#[test]
fn a_bundle_is_trusted_only_by_a_box_that_lists_its_key_and_any_change_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is the owner's alone");
    }
    // A second `keys generate` into the same place overwrites nothing.
    let before = std::fs::read(&key).unwrap();
    let again = tidepool(&[
        "keys",
        "generate",
        "--out",
        dir.path().join("keys").to_str().unwrap(),
    ]);
    assert!(
        !again.ok && again.stderr.contains("not written"),
        "{}",
        again.stderr
    );
    assert_eq!(std::fs::read(&key).unwrap(), before);

    let tpb = dir.path().join("threshold.tpb");
    let made = build(&threshold_manifest(), &threshold_wasm(), &key, &tpb);
    assert!(made.ok, "{}", made.stderr);
    assert!(
        made.stdout.contains("handler `threshold` version"),
        "{}",
        made.stdout
    );
    assert!(!dir.path().join("threshold.tpb.partial").exists());

    let trusting = dir.path().join("trusting.toml");
    std::fs::write(
        &trusting,
        format!("[deploy]\ntrusted_keys = [\"{public}\"]\n"),
    )
    .unwrap();
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "[deploy]\ntrusted_keys = []\n").unwrap();

    let seen = inspect(&tpb, &trusting);
    assert!(seen.ok, "{}", seen.stderr);
    assert!(seen.stdout.contains("trusted: yes"), "{}", seen.stdout);
    let json = cli(
        &["bundle", "inspect", tpb.to_str().unwrap(), "--json"],
        &trusting,
    );
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["name"], "threshold");
    assert_eq!(v["trusted"], true);
    assert_eq!(v["signature_holds"], true);
    let fingerprint = v["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fingerprint.len(), 64);

    // Another box, which does not list the key: refused, naming the key.
    let refused = inspect(&tpb, &other);
    assert!(!refused.ok, "{}", refused.stdout);
    assert!(
        refused.stderr.contains(&fingerprint) && refused.stderr.contains("not in trusted_keys"),
        "{}",
        refused.stderr
    );

    let bytes = std::fs::read(&tpb).unwrap();
    let refusal = |name: &str, changed: &[u8], config: &Path| {
        let p = dir.path().join(name);
        std::fs::write(&p, changed).unwrap();
        let r = inspect(&p, config);
        assert!(!r.ok, "{name} was accepted: {}", r.stdout);
        r.stderr
    };
    // A changed module byte, a changed manifest byte: the signature does not hold.
    let mut module = bytes.clone();
    let at = module.len() - 96 - 10;
    module[at] ^= 1;
    assert!(refusal("module.tpb", &module, &trusting).contains("signature does not match"));
    let mut manifest = bytes.clone();
    manifest[19 + 4 + 2] ^= 1;
    assert!(refusal("manifest.tpb", &manifest, &trusting).contains("signature does not match"));
    // Truncated, or a bare module (unsigned).
    assert!(refusal("cut.tpb", &bytes[..bytes.len() / 2], &trusting).contains("cut short"));
    let bare = std::fs::read(threshold_wasm()).unwrap();
    assert!(refusal("bare.tpb", &bare, &trusting).contains("not a Tidepool bundle"));
    // Over the box's size cap, refused before it is read further.
    let small = dir.path().join("small.toml");
    std::fs::write(
        &small,
        format!("[deploy]\ntrusted_keys = [\"{public}\"]\nmax_bundle_bytes = 1024\n"),
    )
    .unwrap();
    assert!(refusal("big.tpb", &bytes, &small).contains("max_bundle_bytes"));
}

#[test]
fn bundle_build_refuses_what_a_box_would_refuse_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keys(dir.path());
    let manifest = threshold_manifest();
    let wasm = threshold_wasm();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let wasi = write(
        "wasi.wasm",
        &wat::parse_str(
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1))"#,
        )
        .unwrap(),
    );
    let text = std::fs::read_to_string(&manifest).unwrap();
    let unknown_key = write(
        "unknown.toml",
        format!("colour = \"red\"\n{text}").as_bytes(),
    );
    let other_kind = write("kind.toml", format!("kind = \"config\"\n{text}").as_bytes());
    let timer = write("timer.toml", format!("timer_ms = 60000\n{text}").as_bytes());
    let not_a_key = write(
        "not.key",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    for (case, m, w, k, says) in [
        (
            "a WASI import",
            &manifest,
            &wasi,
            &key,
            "wasi_snapshot_preview1",
        ),
        (
            "an unknown manifest key",
            &unknown_key,
            &wasm,
            &key,
            "colour",
        ),
        ("an unknown kind", &other_kind, &wasm, &key, "kind"),
        (
            "timer_ms with no tp_on_timer",
            &timer,
            &wasm,
            &key,
            "tp_on_timer",
        ),
        ("not a signing key", &manifest, &wasm, &not_a_key, "not.key"),
    ] {
        let out = dir.path().join("out.tpb");
        let r = build(m, w, k, &out);
        assert!(!r.ok, "{case}: built");
        assert!(r.stderr.contains(says), "{case}: {}", r.stderr);
        assert!(!out.exists(), "{case}: a bundle was written");
    }
}

/// The offline inbox: a signed bundle renamed into `<data-dir>/inbox/` is deployed (a new
/// handler, then a new version in its place: the next event runs on it), recorded so that a
/// restart runs it, and moved to `done/`. Each bad one is moved to `rejected/` with its reason,
/// and changes nothing: the same version again, unsigned, tampered, signed by another key,
/// over the box's caps, over a pinned handler, a symbolic link (not followed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_in_the_inbox_are_deployed_or_rejected_with_the_reason_and_deploys_survive_a_restart(
) {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (other_key, _) = keys(other.path());
    let pinned = wat_handler(
        dir.path(),
        "pinned",
        COUNTER_WAT,
        "subscribe = [\"pinned/#\"]\n",
    );
    // A configured handler that does not load (it imports WASI) pins its name all the same.
    let broken = wat_handler(
        dir.path(),
        "broken",
        r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32))))"#,
        "subscribe = [\"broken/#\"]\n",
    );
    let mut gw = Gateway::start(&format!(
        "[deploy]\ntrusted_keys = [\"{public}\"]\n{pinned}{broken}"
    ));

    // A new handler, version 1, counting in `n`.
    let v1 = signed(dir.path(), &counter("counter", 1, "n", ""), &key);
    through_inbox(&gw, "counter-1.tpb", &v1)
        .await
        .expect("v1 deployed");
    publish_one(&gw, 1).await;
    // Version 2 in its place, counting in `m`: the next event runs on it.
    let v2 = signed(dir.path(), &counter("counter", 2, "m", ""), &key);
    through_inbox(&gw, "counter-2.tpb", &v2)
        .await
        .expect("v2 deployed");
    publish_one(&gw, 2).await;

    // Refused, each with its reason.
    let mut tampered = signed(dir.path(), &counter("counter", 3, "m", ""), &key);
    let at = tampered.len() - 100;
    tampered[at] ^= 1;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("again.tpb", v2.clone(), "is not above 2"),
        (
            "older.tpb",
            signed(dir.path(), &counter("counter", 1, "x", ""), &key),
            "is not above 2",
        ),
        (
            "bare.tpb",
            counter("counter", 3, "x", "").1,
            "not a Tidepool bundle",
        ),
        ("tampered.tpb", tampered, "signature does not match"),
        (
            "foreign.tpb",
            signed(dir.path(), &counter("counter", 3, "x", ""), &other_key),
            "not in trusted_keys",
        ),
        (
            "greedy.tpb",
            signed(
                dir.path(),
                &counter(
                    "counter",
                    3,
                    "x",
                    "[limits]\nfuel_per_event = 999999999999\n",
                ),
                &key,
            ),
            "fuel_per_event",
        ),
        (
            "pinned.tpb",
            signed(dir.path(), &counter("pinned", 5, "x", ""), &key),
            "pinned",
        ),
        (
            "broken.tpb",
            signed(dir.path(), &counter("broken", 5, "x", ""), &key),
            "pinned",
        ),
    ];
    for (name, bytes, says) in cases {
        let why = through_inbox(&gw, name, &bytes).await.unwrap_err();
        assert!(why.contains(says), "{name}: {why}");
    }
    // A link to a good bundle is not followed: rejected as a link, the file it names untouched.
    let target = dir.path().join("v3.tpb");
    let v3 = signed(dir.path(), &counter("counter", 3, "x", ""), &key);
    std::fs::write(&target, &v3).unwrap();
    let inbox = gw.data().join("inbox");
    std::os::unix::fs::symlink(&target, inbox.join("link.tpb")).unwrap();
    // The reason is written before the link is moved beside it.
    appears(&inbox.join("rejected").join("link.tpb")).await;
    let why = std::fs::read_to_string(inbox.join("rejected").join("link.tpb.reason")).unwrap();
    assert!(why.contains("symbolic link"), "{why}");
    assert_eq!(std::fs::read(&target).unwrap(), v3);
    // A copy still under way (`.part`) is left alone.
    std::fs::write(inbox.join("slow.tpb.part"), &v3[..100]).unwrap();

    let st = cli(&["status", "--json"], &gw.config);
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    let counter_status = st["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "counter")
        .cloned()
        .unwrap();
    assert_eq!(counter_status["version"], 2, "{st}");

    // After a restart the deployed version runs, and its floor holds.
    gw.restart();
    publish_one(&gw, 3).await;
    let why = through_inbox(&gw, "replay.tpb", &v2).await.unwrap_err();
    assert!(why.contains("is not above 2"), "{why}");
    assert!(inbox.join("slow.tpb.part").exists());
    gw.stop();
    assert_eq!(
        read_state(&gw.data(), "counter", b"n"),
        Some(1u64.to_le_bytes().to_vec())
    );
    assert_eq!(
        read_state(&gw.data(), "counter", b"m"),
        Some(2u64.to_le_bytes().to_vec())
    );
    assert_eq!(
        read_state(&gw.data(), "counter", b"x"),
        None,
        "no refused version ran"
    );
}

/// `tidepool status --json` of a running gateway.
fn status(gw: &Gateway) -> serde_json::Value {
    let run = cli(&["status", "--json"], &gw.config);
    assert!(run.ok, "{}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

/// The handlers that run, by name: their versions.
fn versions(gw: &Gateway) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = status(gw)["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["version"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Replaces `from` (found once, lines and all) with `to` in the gateway's config file.
fn rewrite_config(gw: &Gateway, from: &str, to: &str) {
    let text = std::fs::read_to_string(&gw.config).unwrap();
    assert_eq!(text.matches(from).count(), 1, "{from} in {text}");
    std::fs::write(&gw.config, text.replace(from, to)).unwrap();
}

/// What `status` lists as not loaded: each one's source.
fn skipped(gw: &Gateway) -> Vec<String> {
    status(gw)["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source"].as_str().unwrap().to_string())
        .collect()
}

fn count(n: u64) -> Option<Vec<u8>> {
    Some(n.to_le_bytes().to_vec())
}

/// A reload (SIGHUP) puts the `[[handler]]` list in force as a restart would: a new handler
/// runs, a changed one takes the place of the running one, one taken out is unloaded with
/// its state kept, and a deployed bundle that an entry pinned runs again once the entry
/// goes (also when the entry never loaded). Unlike a restart, an entry that does not load
/// takes nothing away: a changed handler keeps its running version, a deployed version of
/// its name keeps running (and can be deployed over); a manifest that does not read leaves
/// the whole list as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_puts_the_handler_list_in_force_and_an_entry_that_does_not_load_takes_nothing_away(
) {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    // A configured counter, its files in `dir` under `file` (the same paths whatever its
    // version).
    let write = |file: &str, name: &str, version: u64, counts_in: &str| -> String {
        let (manifest, wasm) = counter(name, version, counts_in, "");
        let m = dir.path().join(format!("{file}.toml"));
        let w = dir.path().join(format!("{file}.wasm"));
        std::fs::write(&m, manifest).unwrap();
        std::fs::write(&w, wasm).unwrap();
        handler_entry(&w, &m)
    };
    let source = |file: &str| {
        dir.path()
            .join(format!("{file}.toml"))
            .display()
            .to_string()
    };
    let a = write("a", "a", 1, "n");
    let mut gw = Gateway::start(&format!("[deploy]\ntrusted_keys = [\"{public}\"]\n{a}"));
    let c5 = signed(dir.path(), &counter("c", 5, "n", ""), &key);
    through_inbox(&gw, "c-5.tpb", &c5).await.expect("deployed");
    publish_one(&gw, 1).await;
    let v = |list: &[(&str, u64)]| -> Vec<(String, u64)> {
        list.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    };
    assert_eq!(versions(&gw), v(&[("a", 1), ("c", 5)]));
    let in_force = "reload: the [[handler]] list is in force";

    // `a` version 2 (counting in `m`), `b` new, and `c` configured (counting in `k`): the
    // configured `c` takes the deployed one's place, and its name is pinned.
    write("a", "a", 2, "m");
    let (b, c) = (write("b", "b", 1, "n"), write("c", "c", 1, "k"));
    rewrite_config(&gw, &a, &format!("{a}{b}{c}"));
    gw.signal("-HUP");
    gw.wait_log(in_force, 1, Duration::from_secs(20)).await;
    assert_eq!(versions(&gw), v(&[("a", 2), ("b", 1), ("c", 1)]));
    assert_eq!(skipped(&gw), vec!["bundle c".to_string()], "the deployed c");
    let c6 = signed(dir.path(), &counter("c", 6, "n", ""), &key);
    let why = through_inbox(&gw, "c-6.tpb", &c6).await.unwrap_err();
    assert!(
        why.contains("pinned"),
        "a name configured by a reload is pinned: {why}"
    );
    publish_one(&gw, 2).await;

    // `a`'s module broken, `b` and `c` taken out: `a` version 2 goes on, `b` is unloaded,
    // the deployed `c` version 5 runs again.
    let good_a = std::fs::read(dir.path().join("a.wasm")).unwrap();
    std::fs::write(dir.path().join("a.wasm"), b"not wasm").unwrap();
    rewrite_config(&gw, &format!("{b}{c}"), "");
    gw.signal("-HUP");
    gw.wait_log(in_force, 2, Duration::from_secs(20)).await;
    assert_eq!(versions(&gw), v(&[("a", 2), ("c", 5)]));
    assert_eq!(skipped(&gw), vec![source("a")], "a's change did not load");
    {
        let log = gw.stderr.lock().unwrap();
        assert!(
            log.contains("the changed entry did not load, version 2 keeps running"),
            "{log}"
        );
        assert!(log.contains("its deployed version 5 runs"), "{log}");
    }
    publish_one(&gw, 3).await;

    // An entry for `c` whose module is broken: the deployed `c` keeps running, and its name
    // is not pinned (a new version deploys).
    std::fs::write(dir.path().join("a.wasm"), &good_a).unwrap();
    let cx = write("cx", "c", 1, "k");
    std::fs::write(dir.path().join("cx.wasm"), b"not wasm").unwrap();
    rewrite_config(&gw, &a, &format!("{a}{cx}"));
    gw.signal("-HUP");
    gw.wait_log(in_force, 3, Duration::from_secs(20)).await;
    assert_eq!(versions(&gw), v(&[("a", 2), ("c", 5)]));
    assert_eq!(skipped(&gw), vec![source("cx")]);
    through_inbox(&gw, "c-6-again.tpb", &c6)
        .await
        .expect("c is not pinned while its entry does not load");
    assert_eq!(versions(&gw), v(&[("a", 2), ("c", 6)]));
    publish_one(&gw, 4).await;

    // A restart, as a restart does: the broken entry pins `c`, so the deployed `c` does not
    // run. Then the entry is taken out: the deployed `c` runs again.
    gw.restart();
    assert_eq!(versions(&gw), v(&[("a", 2)]));
    assert_eq!(skipped(&gw), vec![source("cx"), "bundle c".to_string()]);
    rewrite_config(&gw, &cx, "");
    gw.signal("-HUP");
    // The log runs on across the restart: the fourth.
    gw.wait_log(in_force, 4, Duration::from_secs(20)).await;
    assert_eq!(versions(&gw), v(&[("a", 2), ("c", 6)]));
    assert!(skipped(&gw).is_empty(), "{:?}", skipped(&gw));
    publish_one(&gw, 5).await;

    // A manifest that does not read: nothing changes.
    std::fs::write(dir.path().join("a.toml"), "not [ toml").unwrap();
    gw.signal("-HUP");
    gw.wait_log(
        "a [[handler]] manifest does not read",
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(versions(&gw), v(&[("a", 2), ("c", 6)]));
    publish_one(&gw, 6).await;

    gw.stop();
    let data = gw.data();
    assert_eq!(read_state(&data, "a", b"n"), count(1), "version 1: event 1");
    assert_eq!(
        read_state(&data, "a", b"m"),
        count(5),
        "version 2: events 2 to 6"
    );
    assert_eq!(
        read_state(&data, "b", b"n"),
        count(1),
        "b ran for event 2; its state stays"
    );
    assert_eq!(
        read_state(&data, "c", b"k"),
        count(1),
        "the configured c: event 2"
    );
    assert_eq!(
        read_state(&data, "c", b"n"),
        count(5),
        "the deployed c: events 1, 3 (version 5), 4, 5, 6 (version 6)"
    );
}
