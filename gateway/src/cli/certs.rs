//! `tidepool certs device ID`: issue a device certificate from the gateway's device CA.

use std::path::PathBuf;
use std::process::ExitCode;

use super::ConfigArgs;

#[derive(clap::Subcommand)]
pub enum What {
    /// Issue a device certificate (ID.crt, ID.key and the gateway's ca.crt).
    ///
    /// Keys are ECDSA P-256, in PEM. The device id is the certificate's common name and must
    /// match [A-Za-z0-9._-]{1,64}. Creates the gateway's CAs first if the data dir has none.
    Device {
        /// The device id.
        id: String,
        #[command(flatten)]
        config: ConfigArgs,
        /// Where to write the files.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
    },
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    match what {
        What::Device { id, config, out } => {
            let cfg = config.load()?;
            tidepool::pki::ensure(&cfg.gateway.data_dir, &cfg.gateway.server_names)?;
            let files = tidepool::pki::issue_device(&cfg.gateway.data_dir, &id, &out)?;
            for f in files {
                println!("{}", f.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
