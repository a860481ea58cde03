//! `tidepool dead-letters export`: the dead letters as JSON lines that `tidepool invoke` replays.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::ConfigArgs;

#[derive(clap::Subcommand)]
pub enum What {
    /// Write every dead letter, oldest first, as JSON lines.
    ///
    /// Each line is an event in the format `tidepool invoke --events` reads (topic, payload or
    /// payload_b64, device, seq, ts), plus the handler and the reason it failed; a failed
    /// timer call is a timer tick (`{"timer": true, "now_ms": ...}`). Asks a running gateway
    /// through its control socket, or reads the store of a stopped one. Nothing is removed.
    ///
    /// Replay one on a laptop: `tidepool dead-letters export > dl.jsonl`, then
    /// `tidepool invoke --handler h.wasm --manifest h.toml --events dl.jsonl`.
    Export {
        #[command(flatten)]
        config: ConfigArgs,
        /// Write to this file instead of standard output.
        #[arg(long, short = 'o', value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    let What::Export { config, out } = what;
    let cfg = config.load()?;
    let data = &cfg.gateway.data_dir;
    // To a file: written beside it and renamed at the end, so a failed export leaves the old file.
    let tmp = out.as_ref().map(|p| {
        let mut name = p.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        p.with_file_name(name)
    });
    let mut sink: Box<dyn Write> = match &tmp {
        Some(p) => Box::new(std::io::BufWriter::new(
            // Private (payloads may be), and never through a link planted at the temp name.
            tidepool::os::files::create_fresh(p, 0o600)
                .with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let exported = export(&cfg, data, &mut sink).and_then(|n| Ok(sink.flush().map(|_| n)?));
    drop(sink);
    let n = match (exported, &tmp, &out) {
        (Ok(n), Some(tmp), Some(out)) => {
            std::fs::rename(tmp, out).with_context(|| format!("writing {}", out.display()))?;
            n
        }
        (Ok(n), _, _) => n,
        (Err(e), tmp, _) => {
            if let Some(tmp) = tmp {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(e);
        }
    };
    eprintln!("{n} dead letters exported");
    Ok(ExitCode::SUCCESS)
}

/// Through a running gateway's control socket, or from a stopped one's store.
fn export(
    cfg: &tidepool::config::Config,
    data: &std::path::Path,
    sink: &mut dyn Write,
) -> anyhow::Result<usize> {
    match tidepool::control::request(data, "dead-letters")
        .with_context(|| format!("asking the gateway in {}", data.display()))?
    {
        Some(lines) => {
            sink.write_all(&lines)?;
            Ok(lines.iter().filter(|b| **b == b'\n').count())
        }
        None => {
            let db = data.join("db");
            anyhow::ensure!(
                db.is_dir(),
                "no store in {} (is --data-dir or --config right?)",
                data.display()
            );
            let store = tidepool::store::Store::open(&db, cfg.store.cache_capacity_bytes)
                .with_context(|| format!("opening the store in {}", db.display()))?;
            Ok(tidepool::control::export_dead_letters(&store, sink)?)
        }
    }
}
