//! `tidepool certs …`: issue client certificates from the box's CAs or a fleet's (`device`,
//! `operator`, a device's own CSR with `device --csr`), and provision a fleet: its CAs
//! (`init`), a box's server key's CSR (`csr`, on the box), signing it (`sign`, where the
//! fleet's CAs are) and installing the result (`install`, on the box).

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
        /// Sign this CSR (PEM) that the device made with its own key, instead of making a
        /// key: writes ID.crt and ca.crt only. Its subject and names are replaced by ID.
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
        /// Issue from the fleet's CAs in DIR (`certs init`) instead of the box's.
        #[arg(long, value_name = "DIR")]
        ca: Option<PathBuf>,
        /// Create the box's CAs in its data dir if it has none yet (a gateway makes them at
        /// its first start). Without it, a data dir with no CAs is an error, not a second set
        /// of CAs no gateway uses.
        #[arg(long, conflicts_with = "ca")]
        init: bool,
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
        /// Issue from the fleet's CAs in DIR (`certs init`) instead of the box's.
        #[arg(long, value_name = "DIR")]
        ca: Option<PathBuf>,
        /// Create the box's CAs in its data dir if it has none yet (as `certs device --init`).
        #[arg(long, conflicts_with = "ca")]
        init: bool,
    },
    /// Make a fleet's CAs in DIR: device-ca, operator-ca and server-ca (.crt and .key).
    ///
    /// Keep DIR on the operator's machine, never on a box. Each box of the fleet trusts the
    /// device and operator CAs (`pki.device_ca`, `pki.operator_ca`: `scripts/flash.sh
    /// --device-ca DIR/device-ca.crt --operator-ca DIR/operator-ca.crt`), and serves a server
    /// certificate from the server CA (`certs csr`, `certs sign`, `certs install`), so any
    /// device with DIR/server-ca.crt as its ca.crt reaches any box, and a replaced box needs
    /// no device re-provisioned. Existing files are kept.
    Init {
        /// Where the fleet's CAs are kept.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// On the box: a certificate signing request for its server key (which never leaves it).
    ///
    /// Sign it where the fleet's CAs are (`tidepool certs sign --ca DIR FILE`), then install
    /// the certificate on the box (`tidepool certs install FILE`) and restart the gateway.
    Csr {
        #[command(flatten)]
        config: ConfigArgs,
        /// Where to write the request (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Sign a box's server CSR (`certs csr`) with the fleet's server CA in DIR.
    ///
    /// The certificate carries the names the box asked for (DNS names and IP addresses
    /// only), is valid from 1970 (a box with no clock) and, with --days, ends that many days
    /// from now.
    Sign {
        /// The box's request (PEM).
        csr: PathBuf,
        /// The fleet's CAs (`certs init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Where to write the certificate (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Days the certificate is valid from now (default: no set end, as the box's own).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: Option<u32>,
    },
    /// On the box: install a server certificate signed for its key (`certs sign`).
    ///
    /// Refused unless its public key is the box's own. The gateway serves it from its next
    /// start (`systemctl restart tidepool`).
    Install {
        /// The certificate (PEM).
        cert: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// The PKI a certificate is issued from: a fleet's (`--ca DIR`) or the box's (its config:
/// created there only with `init`; which one, and the config it came from, is the first line
/// printed).
fn issuer(
    config: &ConfigArgs,
    ca: Option<PathBuf>,
    init: bool,
) -> anyhow::Result<tidepool::pki::PkiPaths> {
    match ca {
        Some(dir) => {
            let paths = tidepool::pki::PkiPaths::at(&dir);
            if !paths.cert(tidepool::pki::SERVER_CA).exists() {
                anyhow::bail!(
                    "{}: no fleet CAs in it (make them with `tidepool certs init --out DIR`)",
                    dir.display()
                );
            }
            Ok(paths)
        }
        None => {
            let cfg = config.load()?;
            let paths = tidepool::pki::PkiPaths::of(&cfg);
            let from = match (&config.data_dir, &config.config) {
                (Some(_), _) => "the data dir given with --data-dir".to_string(),
                (None, Some(file)) => format!("the data dir of {}", file.display()),
                (None, None) => {
                    "the data dir of the embedded defaults (no --config given)".to_string()
                }
            };
            let data = cfg.gateway.data_dir.display();
            // A box's PKI is whole once its server certificate is there (its first start).
            if !init && !paths.cert(tidepool::pki::SERVER).exists() {
                anyhow::bail!(
                    "no CAs in {data} ({from}): start the gateway there once (`tidepool run`), name the config of the gateway you mean with --config, or pass --init to create the CAs in {data}"
                );
            }
            let made = tidepool::pki::ensure(&paths, &cfg.gateway.server_names)?;
            println!(
                "{} {data} ({from})",
                match made {
                    true => "created the CAs in",
                    false => "issued by the CAs in",
                }
            );
            Ok(paths)
        }
    }
}

/// Writes `text` to `out`, or standard output.
fn emit(out: Option<PathBuf>, text: &str) -> anyhow::Result<()> {
    match out {
        Some(p) => write_new(&p, text),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    match what {
        What::Operator {
            name,
            config,
            out,
            days,
            gateway,
            ca,
            init,
        } => {
            let paths = issuer(&config, ca, init)?;
            let files = tidepool::pki::issue_operator(&paths, &name, &out, days)?;
            let gateway = match gateway {
                Some(g) => g,
                None => format!("localhost:{}", config.load()?.gateway.listen.port()),
            };
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
            csr,
            ca,
            init,
        } => {
            let paths = issuer(&config, ca, init)?;
            let files = match csr {
                Some(csr) => {
                    tidepool::pki::sign_device_request(&paths, &id, &csr, &out, days)?.to_vec()
                }
                None => tidepool::pki::issue_device_for(&paths, &id, &out, days)?.to_vec(),
            };
            for f in &files {
                println!("{}", f.display());
            }
            print_serial(&files[0])?;
        }
        What::Init { out } => {
            let paths = tidepool::pki::PkiPaths::at(&out);
            let made = tidepool::pki::ensure_cas(&paths)?;
            for ca in [
                tidepool::pki::DEVICE_CA,
                tidepool::pki::OPERATOR_CA,
                tidepool::pki::SERVER_CA,
            ] {
                println!("{}", paths.cert(ca).display());
            }
            if !made {
                eprintln!("(the fleet's CAs were there already: kept)");
            }
        }
        What::Csr { config, out } => {
            let cfg = config.load()?;
            let paths = tidepool::pki::PkiPaths::of(&cfg);
            let csr = tidepool::pki::server_request(&paths, &cfg.gateway.server_names)?;
            emit(out, &csr)?;
        }
        What::Sign { csr, ca, out, days } => {
            let paths = tidepool::pki::PkiPaths::at(&ca);
            let crt = tidepool::pki::sign_server_request(&paths, &csr, days)?;
            emit(out, &crt)?;
        }
        What::Install { cert, config } => {
            let cfg = config.load()?;
            let paths = tidepool::pki::PkiPaths::of(&cfg);
            tidepool::pki::install_server_cert(&paths, &cert)?;
            println!(
                "installed {} as {}: restart the gateway to serve it",
                cert.display(),
                paths.cert(tidepool::pki::SERVER).display()
            );
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
