//! `tidepool fleet deploy`: one bundle to every gateway of an inventory, in waves.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tidepool::admin::fleet::{self, Inventory, WaveSize};

#[derive(clap::Subcommand)]
pub enum What {
    /// Deploy a bundle to a fleet in waves, each wave's probation passed before the next.
    ///
    /// The inventory (TOML) lists the gateways and the operator's files:
    ///
    ///   ca = "ca.crt"        # the fleet's server CA
    ///   cert = "alice.crt"   # an operator certificate (`tidepool certs operator`)
    ///   key = "alice.key"
    ///   [[gateway]]
    ///   name = "box-1"
    ///   address = "10.0.0.1:7700"
    ///
    /// (a [[gateway]] may name its own ca, cert and key; paths are relative to the
    /// inventory). Each wave is deployed at once; then its gateways are asked until the new
    /// version has passed its probation on each (deploy.probation_*, judged on the box, no
    /// cloud needed), been rolled back, or --wait is over. A wave that fails anywhere stops
    /// the rollout: later gateways are not touched (roll the failed wave back with
    /// `tidepool rollback`). Prints a table per gateway; exits 1 when any failed.
    Deploy {
        /// The bundle (.tpb).
        bundle: PathBuf,
        /// The fleet's inventory.
        #[arg(long, value_name = "FILE")]
        inventory: PathBuf,
        /// The size of a wave: a share of the fleet (25%) or a number of gateways (5).
        #[arg(long, value_name = "SIZE", default_value = "10%")]
        wave: WaveSize,
        /// The longest a wave waits for its probation, in seconds.
        #[arg(long, value_name = "S", default_value_t = 900)]
        wait: u64,
        /// Print the outcomes as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    let What::Deploy {
        bundle,
        inventory,
        wave,
        wait,
        json,
    } = what;
    let (inv, remotes) = Inventory::load(&inventory).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
    let (name, version) =
        fleet::bundle_names(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    let plan = fleet::waves(remotes.len(), wave);
    eprintln!(
        "deploying {name} v{version} to {} gateways in {} waves",
        remotes.len(),
        plan.len()
    );
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcomes = rt
        .block_on(fleet::rollout(
            &inv,
            &remotes,
            &bytes,
            wave,
            std::time::Duration::from_secs(wait),
            |o| {
                eprintln!(
                    "wave {}: {} {}: {}",
                    o.wave.unwrap_or(0),
                    o.name,
                    o.result,
                    o.detail
                )
            },
        ))
        .map_err(anyhow::Error::msg)?;
    let failed = outcomes.iter().any(|o| o.result != "passed");
    if json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    } else {
        let w = |f: &dyn Fn(&fleet::Outcome) -> usize, min| {
            outcomes.iter().map(f).max().unwrap_or(0).max(min)
        };
        let (wn, wa) = (w(&|o| o.name.len(), 7), w(&|o| o.address.len(), 7));
        println!(
            "{:wn$}  {:wa$}  WAVE  RESULT   DETAIL",
            "GATEWAY", "ADDRESS"
        );
        for o in &outcomes {
            let wave = o.wave.map_or("-".into(), |w| w.to_string());
            println!(
                "{:wn$}  {:wa$}  {wave:4}  {:7}  {}",
                o.name, o.address, o.result, o.detail
            );
        }
    }
    eprintln!(
        "{} of {} gateways run {name} v{version}; {:.1} s",
        outcomes.iter().filter(|o| o.result == "passed").count(),
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(match failed {
        true => ExitCode::FAILURE,
        false => ExitCode::SUCCESS,
    })
}
