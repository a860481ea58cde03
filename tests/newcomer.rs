//! The newcomer's path, from a folder outside the repo, with the real binary and cargo:
//! `tidepool new`, `cargo test`, `tidepool build` (which runs `invoke`), a gateway with the
//! handler, `tidepool send`, `tidepool status`, and the forward at a local HTTP endpoint.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// Runs `cmd` in `dir`, offline (the checkout's lock file and what its build fetched are
/// enough): (ok, stdout, stderr).
fn run_in(dir: &std::path::Path, cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .current_dir(dir)
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .expect("runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_made_outside_the_repo_reaches_the_cloud() {
    let home = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (ok, out, err) = run_in(
        home.path(),
        Command::new(BIN).args(["new", "mine", "--template", "threshold"]),
    );
    assert!(ok, "{out}{err}");
    let krate = home.path().join("mine");

    // The tests run on this machine as written.
    let (ok, out, err) = run_in(&krate, Command::new("cargo").arg("test"));
    assert!(ok, "cargo test: {out}{err}");
    assert!(out.contains("test result: ok"), "{out}");

    // The module, its size and, through invoke, the sample events' fuel.
    let (ok, out, err) = run_in(&krate, Command::new(BIN).arg("build"));
    assert!(ok, "tidepool build: {out}{err}");
    assert!(out.contains("6 lines: 5 ok, 1 failed"), "{out}");
    // Its first line: where cargo put the module, its size and the toolchain.
    let (wasm, rest) = out.lines().next().unwrap().split_once(": ").unwrap();
    assert!(
        wasm.ends_with("/mine.wasm") && rest.contains(" bytes (rustc "),
        "{out}"
    );
    let wasm = std::path::PathBuf::from(wasm);
    let manifest = krate.join("mine.toml");

    // A gateway with it; a device sends a crossing with `tidepool send`.
    let cloud = Cloud::start(|_| 200).await;
    let gw = Gateway::start(&format!(
        "[uplink]\nurl = \"{}\"\n[outbox]\nlinger_ms = 50\n{}",
        cloud.url,
        handler_entry(&wasm, &manifest)
    ));
    let (crt, key, ca) = gw.device_certs("d1");
    let sent = send_cli(
        &gw.addr,
        (&crt, &key, &ca),
        "devices/d1/temp",
        "{\"v\": 31.2}",
    )
    .await;
    assert!(sent.ok, "{}{}", sent.stdout, sent.stderr);
    let got = cloud
        .wait_until(Duration::from_secs(20), |r| !r.is_empty())
        .await;
    let first = started.elapsed();
    assert_eq!(got.len(), 1, "the crossing reached the cloud");
    let ev = &got[0].json()["events"][0];
    assert_eq!(ev["class"], "urgent");
    assert_eq!(ev["device"], "d1");
    let status = cli(&["status"], &gw.config);
    assert!(status.ok, "{}", status.stderr);
    assert!(
        status.stdout.contains("handler mine v1"),
        "{}",
        status.stdout
    );
    eprintln!("from `tidepool new` to the first forward at the cloud: {first:?}");
}

/// The listings of a document marked `<!-- listing: FILE -->`, in order: (file, text).
fn listings(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(file) = line
            .strip_prefix("<!-- listing: ")
            .and_then(|l| l.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "{file}: no listing after its marker"
        );
        let text: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        out.push((file.to_string(), text.join("\n") + "\n"));
    }
    out
}

/// The tutorial (docs/handlers.md §2): each listing pasted in order over the crate
/// `tidepool new threshold` made builds without a warning, loads as a gateway loads it and
/// runs on the sample events; its tests pass at the end. Offline: the crate's lock file is the
/// one `new` wrote (the checkout's) whenever its Cargo.toml changes, so serde resolves from
/// what the checkout's build fetched.
#[test]
fn the_tutorial_listings_build_when_pasted_in_order() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/handlers.md")).unwrap();
    let listings = listings(&doc);
    assert!(listings.len() >= 7, "{} listings", listings.len());
    let sdk = std::fs::canonicalize(root.join("modules/sdk")).unwrap();
    let home = tempfile::tempdir().unwrap();
    let (ok, out, err) = run_in(home.path(), Command::new(BIN).args(["new", "threshold"]));
    assert!(ok, "{out}{err}");
    let krate = home.path().join("threshold");
    let lock = std::fs::read(krate.join("Cargo.lock")).unwrap();
    for (i, (file, text)) in listings.iter().enumerate() {
        let text = text.replace("path = \"SDK\"", &format!("path = \"{}\"", sdk.display()));
        std::fs::write(krate.join(file), text).unwrap();
        if file == "Cargo.toml" {
            std::fs::write(krate.join("Cargo.lock"), &lock).unwrap();
        }
        let (ok, out, err) = run_in(&krate, Command::new(BIN).arg("build"));
        assert!(ok, "listing {} ({file}): {out}{err}", i + 1);
        assert!(
            !err.contains("warning:"),
            "listing {} ({file}): {err}",
            i + 1
        );
    }
    let (ok, out, err) = run_in(&krate, Command::new("cargo").arg("test"));
    assert!(ok, "cargo test: {out}{err}");
}
