//! The command line: one file per subcommand.

mod admin;
mod bundle;
mod certs;
mod config;
mod dead_letters;
mod fleet;
mod invoke;
mod keys;
mod new;
mod run;
mod send;
mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Tidepool: devices publish over QUIC, sandboxed WebAssembly handlers decide what matters,
/// and the cloud is woken only for that.
#[derive(Parser)]
#[command(name = "tidepool", version, about, long_about = None, propagate_version = true)]
#[command(
    after_help = "Start with `tidepool run` (embedded defaults, data in ./tidepool-data), then issue a\n\
device certificate with `tidepool certs device dev-1` and publish with `tidepool send`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(run::Args),
    /// Issue certificates from the gateway's CAs.
    Certs {
        #[command(subcommand)]
        what: certs::What,
    },
    /// Show the configuration's defaults, or check a configuration file.
    Config {
        #[command(subcommand)]
        what: config::What,
    },
    /// Make the key pair that signs bundles.
    Keys {
        #[command(subcommand)]
        what: keys::What,
    },
    /// Sign a handler into a bundle (.tpb), or inspect one.
    Bundle {
        #[command(subcommand)]
        what: bundle::What,
    },
    Send(send::Args),
    New(new::NewArgs),
    Build(new::BuildArgs),
    Invoke(invoke::Args),
    Status(status::Args),
    Health(admin::HealthArgs),
    Deploy(admin::DeployArgs),
    List(admin::ListArgs),
    Rollback(admin::RollbackArgs),
    Remove(admin::RemoveArgs),
    /// Deploy to many gateways in waves (an inventory of them).
    Fleet {
        #[command(subcommand)]
        what: fleet::What,
    },
    /// Export the dead letters (events that failed) for replay with `tidepool invoke`.
    DeadLetters {
        #[command(subcommand)]
        what: dead_letters::What,
    },
}

/// Options shared by commands that read the gateway's configuration.
#[derive(clap::Args, Clone)]
pub struct ConfigArgs {
    /// The configuration file (TOML). Without it, the embedded defaults apply
    /// (`tidepool config defaults` prints them).
    #[arg(long, short = 'c', value_name = "FILE", env = "TIDEPOOL_CONFIG")]
    pub config: Option<PathBuf>,
    /// The data dir (certificates, store, metrics); overrides `gateway.data_dir`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    pub fn load(&self) -> anyhow::Result<tidepool::config::Config> {
        let mut cfg = match &self.config {
            Some(p) => tidepool::config::Config::load(p)?,
            None => tidepool::config::Config::defaults(),
        };
        if let Some(d) = &self.data_dir {
            cfg.gateway.data_dir = d.clone();
        }
        Ok(cfg)
    }
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Whatever the shell's umask: the data dir, the store and exports are the owner's alone.
    // Not for a handler crate (`new`, `build`): its sources and module keep the shell's
    // umask, so a module copied to a box stays readable by the gateway's user.
    if !matches!(cli.command, Command::New(_) | Command::Build(_)) {
        tidepool::os::files::private_by_default();
    }
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Certs { what } => certs::run(what),
        Command::Config { what } => config::run(what),
        Command::Keys { what } => keys::run(what),
        Command::Bundle { what } => bundle::run(what),
        Command::Send(a) => send::run(a),
        Command::New(a) => new::new(a),
        Command::Build(a) => new::build(a),
        Command::Invoke(a) => invoke::run(a),
        Command::Status(a) => status::run(a),
        Command::Health(a) => admin::health(a),
        Command::Deploy(a) => admin::deploy(a),
        Command::List(a) => admin::list(a),
        Command::Rollback(a) => admin::rollback(a),
        Command::Remove(a) => admin::remove(a),
        Command::Fleet { what } => fleet::run(what),
        Command::DeadLetters { what } => dead_letters::run(what),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidepool: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
