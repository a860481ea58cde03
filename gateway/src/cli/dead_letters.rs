//! `tidepool dead-letters export`: the dead letters as JSON lines that `tidepool invoke` replays.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Subcommand)]
pub enum What {
    /// Write every dead letter, oldest first, as JSON lines.
    ///
    /// Each line is an event in the format `tidepool invoke --events` reads (topic, payload or
    /// payload_b64, device, seq, ts), plus the handler and the reason it failed; a failed
    /// timer call is a timer tick (`{"timer": true, "now_ms": ...}`). Asks a running gateway
    /// through its control socket (or over the admin channel: --gateway … or --profile), or
    /// reads the store of a stopped one. Nothing is removed.
    ///
    /// Replay one on a laptop: `tidepool dead-letters export > dl.jsonl`, then
    /// `tidepool invoke --handler h.wasm --manifest h.toml --events dl.jsonl`.
    Export {
        #[command(flatten)]
        target: super::admin::Target,
        /// Write to this file instead of standard output.
        #[arg(long, short = 'o', value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

pub fn run(what: What) -> anyhow::Result<ExitCode> {
    let What::Export { target, out } = what;
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
    let exported = export(&target, &mut sink).and_then(|n| Ok(sink.flush().map(|_| n)?));
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

/// Through a running gateway's control socket or admin channel, or from a stopped one's store.
fn export(target: &super::admin::Target, sink: &mut dyn Write) -> anyhow::Result<usize> {
    let mut counted = Lines { inner: sink, n: 0 };
    if target.remote()?.is_some() {
        target.ask("dead-letters", &[], &mut counted)?;
        return Ok(counted.n);
    }
    let cfg = target.config.load()?;
    let data = &cfg.gateway.data_dir;
    match tidepool::control::ask(data, "dead-letters", &[], &mut counted)
        .with_context(|| format!("asking the gateway in {}", data.display()))?
    {
        Some(()) => Ok(counted.n),
        None => {
            let db = data.join("db");
            anyhow::ensure!(
                db.is_dir(),
                "no store in {} (is --data-dir or --config right?)",
                data.display()
            );
            let store = tidepool::store::Store::open(&db, cfg.store.cache_capacity_bytes)
                .with_context(|| format!("opening the store in {}", db.display()))?;
            Ok(tidepool::control::export_dead_letters(
                &store,
                counted.inner,
            )?)
        }
    }
}

/// A writer that counts the lines written through it.
struct Lines<'a> {
    inner: &'a mut dyn Write,
    n: usize,
}

impl Write for Lines<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += b[..n].iter().filter(|c| **c == b'\n').count();
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
