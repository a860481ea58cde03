//! Signed bundles from the command line, as an operator makes them: `keys generate`, `bundle
//! build`, `bundle inspect`; and what is refused, with a clear reason and nothing written.

mod support;

use std::path::{Path, PathBuf};

use support::*;

/// Makes a key pair in `dir/keys`; returns the key file and the public key line.
fn keys(dir: &Path) -> (PathBuf, String) {
    let out = dir.join("keys");
    let run = tidepool(&["keys", "generate", "--out", out.to_str().unwrap()]);
    assert!(run.ok, "{}", run.stderr);
    let public = std::fs::read_to_string(out.join("signing.pub")).unwrap();
    (out.join("signing.key"), public.trim().to_string())
}

fn build(manifest: &Path, wasm: &Path, key: &Path, out: &Path) -> Run {
    tidepool(&[
        "bundle",
        "build",
        "--manifest",
        manifest.to_str().unwrap(),
        "--wasm",
        wasm.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

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
