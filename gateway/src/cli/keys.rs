//! `tidepool keys generate`: an ed25519 key pair that signs bundles (kept by an operator, never
//! on a box; the box lists the public key in `deploy.trusted_keys`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine as _;
use tidepool::admin::bundle::SigningKey;

#[derive(clap::Subcommand)]
pub enum What {
    /// Make a key pair that signs bundles: NAME.key (private, PKCS#8 PEM, mode 0600) and
    /// NAME.pub (the public key as `ed25519:<base64>`).
    ///
    /// Keep NAME.key on the machine that builds bundles (`tidepool bundle build --key`); put
    /// the line in NAME.pub into each box's `deploy.trusted_keys`. Existing files are never
    /// overwritten.
    Generate {
        /// Where to write the two files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The files' name.
        #[arg(long, value_name = "NAME", default_value = "signing")]
        name: String,
    },
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    match what {
        What::Generate { out, name } => {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                anyhow::bail!("--name `{name}`: a file name, not a path");
            }
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let (key, der) = SigningKey::generate()?;
            let public = key.public();
            let (key_file, pub_file) = (
                out.join(format!("{name}.key")),
                out.join(format!("{name}.pub")),
            );
            write_new(&key_file, 0o600, pem(&der).as_bytes())?;
            write_new(&pub_file, 0o644, format!("{public}\n").as_bytes())?;
            println!("private key: {} (keep it secret)", key_file.display());
            println!("public key:  {} ({public})", pub_file.display());
            println!("fingerprint: {}", public.fingerprint());
            println!("on each box: [deploy] trusted_keys = [\"{public}\"]");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// PKCS#8 DER as a PEM `PRIVATE KEY`.
fn pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

/// Writes a new file with exactly `mode`; refuses an existing one (or a link in its place).
fn write_new(path: &Path, mode: u32, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "{}: not written (it exists, or cannot be created)",
                path.display()
            )
        })?;
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}
