//! `tidepool bundle build` (sign a handler into a `.tpb`) and `tidepool bundle inspect` (what is
//! in one, who signed it, and whether a box would trust it). Format: `docs/bundles.md`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tidepool::admin::bundle::{self, BundleError, SigningKey};
use tidepool::sandbox::manifest::Kind;

use super::ConfigArgs;

#[derive(clap::Subcommand)]
pub enum What {
    /// Sign a handler (its manifest and module), or a box's settings, into one bundle file.
    ///
    /// The manifest is checked (shape, `kind`) and the module compiled against the handler ABI
    /// before anything is signed: a bundle that a box would refuse for its contents is not
    /// made. Whether its limits fit a box's caps is the box's to decide at deploy. A config
    /// bundle (`kind = "config"`: acl.publish, acl.revoked, admin.allow_from, admin.revoked,
    /// deploy.trusted_keys; docs/bundles.md) has no module.
    Build {
        /// The manifest (TOML): a handler's, or a config bundle's.
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        /// The handler's module (a core Wasm module, built for wasm32-unknown-unknown); none
        /// for a config bundle.
        #[arg(long, value_name = "FILE")]
        wasm: Option<PathBuf>,
        /// The signing key (`tidepool keys generate` wrote it as NAME.key).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The bundle to write (by convention NAME-VERSION.tpb).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Show what a bundle holds and who signed it; with a config, whether that box trusts it.
    ///
    /// Exits 0 when the bundle is whole and its signature holds (and, with --config, its key is
    /// in `deploy.trusted_keys`), 1 otherwise, saying why.
    Inspect {
        /// The bundle file.
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    match what {
        What::Build {
            manifest,
            wasm,
            key,
            out,
        } => build(&manifest, &wasm, &key, &out),
        What::Inspect { file, config, json } => inspect(&file, &config, json),
    }
}

fn build(
    manifest: &Path,
    wasm: &Option<PathBuf>,
    key: &Path,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read the manifest {}", manifest.display()))?;
    let kind = bundle::kind_of(&text).with_context(|| format!("{}", manifest.display()))?;
    let (module, what) = match (kind, wasm) {
        (Kind::Config, None) => {
            let m =
                bundle::parse_config(&text).with_context(|| format!("{}", manifest.display()))?;
            tidepool::config::Config::defaults()
                .overlaid(&m)
                .with_context(|| format!("{}", manifest.display()))?;
            (Vec::new(), format!("config bundle version {}", m.version))
        }
        (Kind::Config, Some(_)) => {
            anyhow::bail!(
                "{}: a config bundle has no module: leave out --wasm",
                manifest.display()
            )
        }
        (Kind::Handler, None) => anyhow::bail!("a handler bundle needs its module: --wasm FILE"),
        (Kind::Handler, Some(wasm)) => {
            let parsed =
                bundle::parse_manifest(&text).with_context(|| format!("{}", manifest.display()))?;
            let module = std::fs::read(wasm)
                .with_context(|| format!("cannot read the module {}", wasm.display()))?;
            tidepool::sandbox::compile(&tidepool::sandbox::Runtime::default(), &module, &parsed)
                .with_context(|| format!("{}: not signed", wasm.display()))?;
            let what = format!("handler `{}` version {}", parsed.name, parsed.version);
            (module, what)
        }
    };
    let der = tidepool::pki::read_key(key)
        .with_context(|| format!("cannot read the signing key {}", key.display()))?;
    let signing =
        SigningKey::from_pkcs8(der.secret_der()).with_context(|| format!("{}", key.display()))?;
    let bytes = bundle::build(&text, &module, &signing)?;
    // Written beside, then renamed: a reader (an inbox) never sees half a bundle.
    let partial = out.with_extension("tpb.partial");
    let mut f = tidepool::os::files::create_fresh(&partial, 0o644)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    std::io::Write::write_all(&mut f, &bytes)?;
    f.sync_all()?;
    std::fs::rename(&partial, out)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
    println!(
        "{}: {what}, {} bytes, signed by {}",
        out.display(),
        bytes.len(),
        signing.public().fingerprint()
    );
    Ok(ExitCode::SUCCESS)
}

fn inspect(file: &Path, config: &ConfigArgs, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let f = bundle::frame(&bytes, cfg.deploy.max_bundle_bytes)
        .with_context(|| format!("{}", file.display()))?;
    let holds = f.signature_holds();
    let trusted = config
        .config
        .as_ref()
        .map(|_| cfg.deploy.keys().map(|k| k.contains(&f.signer)))
        .transpose()?;
    // The manifest is shown only once the signature holds: what an unsigned author wrote is
    // not parsed.
    let text = std::str::from_utf8(f.manifest).map_err(|_| BundleError::ManifestNotText);
    let config = match (holds, &text) {
        (true, Ok(t)) if bundle::kind_of(t) == Ok(Kind::Config) => Some(bundle::parse_config(t)),
        _ => None,
    };
    if let Some(config) = config {
        return inspect_config(file, &f, config, trusted, json);
    }
    let manifest = match holds {
        true => text
            .and_then(bundle::parse_manifest)
            .map_err(|e| e.to_string()),
        false => Err(BundleError::BadSignature.to_string()),
    };
    let verdict = match (&manifest, trusted) {
        (Err(why), _) => Err(why.clone()),
        (Ok(_), Some(false)) => Err(BundleError::UntrustedKey(f.signer.fingerprint()).to_string()),
        (Ok(_), _) => Ok(()),
    };
    if json {
        let m = manifest.as_ref().ok();
        let v = serde_json::json!({
            "file": file.display().to_string(),
            "bytes": bytes.len(),
            "kind": m.map(|_| "handler"),
            "name": m.map(|m| m.name.clone()),
            "version": m.map(|m| m.version),
            "subscribe": m.map(|m| m.subscribe.clone()),
            "timer_ms": m.and_then(|m| m.timer_ms),
            "manifest_bytes": f.manifest.len(),
            "module_bytes": f.wasm.len(),
            "signer": f.signer.to_string(),
            "fingerprint": f.signer.fingerprint(),
            "signature_holds": holds,
            "trusted": trusted,
            "error": verdict.as_ref().err(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}: {} bytes", file.display(), bytes.len());
        match &manifest {
            Ok(m) => {
                println!("  handler `{}` version {}", m.name, m.version);
                println!("  subscribe: {}", m.subscribe.join(", "));
                if let Some(t) = m.timer_ms {
                    println!("  timer: every {t} ms");
                }
            }
            Err(_) => println!("  manifest: not shown (the signature does not hold)"),
        }
        println!(
            "  manifest {} bytes, module {} bytes",
            f.manifest.len(),
            f.wasm.len()
        );
        println!("  signed by {} ({})", f.signer.fingerprint(), f.signer);
        println!(
            "  signature: {}",
            if holds { "holds" } else { "DOES NOT HOLD" }
        );
        match trusted {
            Some(true) => println!("  trusted: yes (in deploy.trusted_keys)"),
            Some(false) => println!("  trusted: NO (not in deploy.trusted_keys)"),
            None => println!("  trusted: (give --config to check against a box's trusted_keys)"),
        }
    }
    match verdict {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(why) => {
            eprintln!("tidepool: {}: {why}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `inspect` of a config bundle whose signature holds.
fn inspect_config(
    file: &Path,
    f: &bundle::Framed<'_>,
    config: Result<tidepool::config::ConfigManifest, BundleError>,
    trusted: Option<bool>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let verdict = match (&config, trusted) {
        (Err(e), _) => Err(e.to_string()),
        (Ok(_), Some(false)) => Err(BundleError::UntrustedKey(f.signer.fingerprint()).to_string()),
        (Ok(_), _) => Ok(()),
    };
    let m = config.as_ref().ok();
    let v = serde_json::json!({
        "file": file.display().to_string(),
        "kind": "config",
        "version": m.map(|m| m.version),
        "acl_publish": m.and_then(|m| m.acl.publish.clone()),
        "acl_revoked": m.map(|m| m.acl.revoked.clone()),
        "admin_allow_from": m.and_then(|m| m.admin.allow_from.clone()),
        "admin_revoked": m.map(|m| m.admin.revoked.clone()),
        "trusted_keys": m.map(|m| m.deploy.trusted_keys.clone()),
        "signer": f.signer.to_string(),
        "fingerprint": f.signer.fingerprint(),
        "signature_holds": true,
        "trusted": trusted,
        "error": verdict.as_ref().err(),
    });
    match json {
        true => println!("{}", serde_json::to_string_pretty(&v)?),
        false => {
            println!("{}: config bundle", file.display());
            for (k, val) in v.as_object().into_iter().flatten() {
                if !val.is_null() && k != "file" && k != "kind" {
                    println!("  {k}: {val}");
                }
            }
        }
    }
    match verdict {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(why) => {
            eprintln!("tidepool: {}: {why}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}
