//! `tidepool config defaults`: print the full default configuration, commented.

use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum What {
    /// Print the full default configuration as commented TOML (every key, every default).
    ///
    /// Save it as a starting point: `tidepool config defaults > tidepool.toml`.
    Defaults,
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    match what {
        What::Defaults => print!("{}", tidepool::config::DEFAULTS_TOML),
    }
    Ok(ExitCode::SUCCESS)
}
