//! `tidepool certs device ID`: issue a device certificate from the gateway's device CA.

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
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    match what {
        What::Device {
            id,
            config,
            out,
            days,
        } => {
            let cfg = config.load()?;
            tidepool::pki::ensure(&cfg.gateway.data_dir, &cfg.gateway.server_names)?;
            let files = tidepool::pki::issue_device_for(&cfg.gateway.data_dir, &id, &out, days)?;
            for f in &files {
                println!("{}", f.display());
            }
            let cert = tidepool::pki::read_certs(&files[0])?;
            if let Some(s) = cert.first().and_then(|c| tidepool::pki::serial_hex(c)) {
                println!("serial:{s}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
