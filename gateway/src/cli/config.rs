//! `tidepool config defaults` (print the full default configuration, commented) and
//! `tidepool config check` (load a configuration as `run` and a reload would, and say why not).

use std::process::ExitCode;

use super::ConfigArgs;

#[derive(clap::Subcommand)]
pub enum What {
    /// Print the full default configuration as commented TOML (every key, every default).
    ///
    /// Save it as a starting point: `tidepool config defaults > tidepool.toml`.
    Defaults,
    /// Check a configuration file: parse it and validate every value, as `run` and a reload
    /// (SIGHUP) do, without touching the data dir.
    ///
    /// Exits 0 when it loads, 1 with the reason when it does not. The units run it before a
    /// reload (`systemctl reload tidepool`), so a broken file fails the reload instead of
    /// being only logged by the running gateway.
    Check(ConfigArgs),
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    match what {
        What::Defaults => print!("{}", tidepool::config::DEFAULTS_TOML),
        What::Check(a) => {
            let cfg = a.load()?;
            let file = a
                .config
                .as_ref()
                .map_or("the embedded defaults".to_string(), |p| {
                    p.display().to_string()
                });
            println!(
                "{file}: OK ({} handler(s), {} revoked; a reload applies acl.publish, acl.revoked, admin, deploy.trusted_keys, gateway.log and [[handler]]; anything else needs a restart)",
                cfg.handler.len(),
                cfg.acl.revoked.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
