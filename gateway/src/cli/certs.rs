//! `tidepool certs device ID` and `tidepool certs operator NAME`: issue a client certificate
//! from the gateway's device CA or operator CA.

use std::path::PathBuf;
use std::process::ExitCode;

use super::ConfigArgs;

#[derive(clap::Subcommand)]
pub enum What {
    /// Issue a device certificate (ID.crt, ID.key and the gateway's ca.crt).
    ///
    /// Keys are ECDSA P-256, in PEM. The device id is the certificate's common name and must
    /// match [A-Za-z0-9._-]{1,64} (not `.`, `..` or `ca`). Creates the gateway's CAs first if
    /// the data dir has none. The certificate is valid from 1970-01-01 (a device or a box whose
    /// clock was never set still accepts it) for --days; its serial is printed last, as
    /// `serial:<hex>`, the form `acl.revoked` takes to deny this certificate alone.
    Device {
        /// The device id.
        id: String,
        #[command(flatten)]
        config: ConfigArgs,
        /// Where to write the files.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// Days the certificate is valid from now.
        #[arg(long, value_name = "N", default_value_t = tidepool::pki::DEVICE_DAYS,
              value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
    },
    /// Issue an operator certificate for the admin channel (NAME.crt, NAME.key, ca.crt and an
    /// operator profile, NAME.toml).
    ///
    /// The operator reaches the gateway with `tidepool deploy --profile NAME.toml …` (also
    /// `list`, `rollback`, `remove`, `status`, `dead-letters export`). The name is the
    /// certificate's CN ([A-Za-z0-9._-]{1,64}), logged with everything the operator changes.
    /// Valid for --days, 90 at most: issue a new one when it expires. Deny one before that
    /// with `admin.revoked = ["NAME"]` or the serial printed last (`serial:<hex>`), then
    /// `systemctl reload tidepool`.
    Operator {
        /// The operator's name.
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
        /// Where to write the files.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// Days the certificate is valid from now (1 to 90).
        #[arg(long, value_name = "N", default_value_t = 30,
              value_parser = clap::value_parser!(u32).range(1..=tidepool::pki::OPERATOR_MAX_DAYS as i64))]
        days: u32,
        /// The gateway's address as operators reach it, written into the profile
        /// (default: localhost and the port of gateway.listen).
        #[arg(long, value_name = "HOST:PORT")]
        gateway: Option<String>,
    },
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    match what {
        What::Operator {
            name,
            config,
            out,
            days,
            gateway,
        } => {
            let cfg = config.load()?;
            let paths = tidepool::pki::PkiPaths::of(&cfg);
            tidepool::pki::ensure(&paths, &cfg.gateway.server_names)?;
            let files = tidepool::pki::issue_operator(&paths, &name, &out, days)?;
            let gateway =
                gateway.unwrap_or_else(|| format!("localhost:{}", cfg.gateway.listen.port()));
            let profile = out.join(format!("{name}.toml"));
            let file = |p: &std::path::Path| {
                p.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            let text = format!(
                "# Operator profile for the admin channel: tidepool deploy --profile {} …\n\
                 # (paths are relative to this file's folder)\n\
                 gateway = {:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                profile.display(),
                gateway,
                file(&files[2]),
                file(&files[0]),
                file(&files[1]),
            );
            write_new(&profile, &text)?;
            for f in files.iter().chain([&profile]) {
                println!("{}", f.display());
            }
            print_serial(&files[0])?;
        }
        What::Device {
            id,
            config,
            out,
            days,
        } => {
            let cfg = config.load()?;
            let paths = tidepool::pki::PkiPaths::of(&cfg);
            tidepool::pki::ensure(&paths, &cfg.gateway.server_names)?;
            let files = tidepool::pki::issue_device_for(&paths, &id, &out, days)?;
            for f in &files {
                println!("{}", f.display());
            }
            print_serial(&files[0])?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a certificate's serial as `serial:<hex>`, the form the deny-lists take.
fn print_serial(cert: &std::path::Path) -> anyhow::Result<()> {
    let cert = tidepool::pki::read_certs(cert)?;
    if let Some(s) = cert.first().and_then(|c| tidepool::pki::serial_hex(c)) {
        println!("serial:{s}");
    }
    Ok(())
}

/// Writes a small file (replacing one of that name).
fn write_new(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
