//! `tidepool run`: the gateway in the foreground until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use tokio::sync::watch;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use super::ConfigArgs;

/// Run the gateway in the foreground.
///
/// Listens for devices (QUIC on UDP), runs the handlers on each event, commits to the store,
/// and wakes the uplink when handlers forward. The first start creates the CAs and the server
/// certificate in the data dir. Prints `tidepool listening on ADDR` on stdout when ready; logs
/// go to stderr. SIGINT or SIGTERM stops it gracefully: streams stop reading, everything
/// received is settled and answered, then it exits and writes `<data-dir>/metrics.json`.
/// SIGHUP re-reads the config file and puts in force what can change live: acl.publish,
/// acl.revoked, admin.allow_from, admin.revoked, deploy.trusted_keys, gateway.log and the
/// [[handler]] list (a new or changed handler is loaded, one taken out unloaded; one that
/// does not load leaves the running version). The rest needs a restart. Under systemd it speaks the notify protocol (READY, STOPPING, and
/// WATCHDOG while healthy).
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let cfg = a.config.load()?;
    // A relative data_dir meant the current directory before it meant the config file's
    // folder: a gateway whose data is still there is refused, not started afresh (a new
    // identity, new CAs, its outbox left behind).
    let (dir, written) = (&cfg.gateway.data_dir, &cfg.gateway.data_dir_as_written);
    if a.config.data_dir.is_none()
        && written.is_relative()
        && dir != written
        && !dir.join("pki").exists()
        && written.join("pki").exists()
    {
        anyhow::bail!(
            "data_dir `{}` is relative to the config file, so it is {}, which holds no gateway's data; {} in the current directory does (relative paths in a config file meant the current directory before). Set data_dir to its absolute path, or move it there",
            written.display(),
            dir.display(),
            std::path::absolute(written)?.display()
        );
    }
    // `target=level` directives, comma-separated (e.g. `info,tidepool=debug`); RUST_LOG wins.
    let (directives, origin) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => (v, "RUST_LOG"),
        _ => (cfg.gateway.log.clone(), "gateway.log"),
    };
    let filter: Targets = directives
        .parse()
        .with_context(|| format!("{origin} = `{directives}`"))?;
    // Reloadable: a SIGHUP puts a changed `gateway.log` in force (unless RUST_LOG rules).
    let (filter, log_levels) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
    let fixed_by_env = origin == "RUST_LOG";
    // Before any thread starts: each inherits it (sled's pool included).
    tidepool::os::process::timer_slack(cfg.gateway.timer_slack_ms);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // SIGHUP is watched from the start (its default action would end the process): a
        // reload right after a start must not stop the gateway.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(
                            "cannot watch SIGTERM ({e}); only SIGINT stops the gateway"
                        );
                        let _ = tokio::signal::ctrl_c().await;
                        let _ = stop_tx.send(true);
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = stop_tx.send(true);
        });
        // SIGHUP: read the config file again; a config that does not load is logged and the
        // one in force stays.
        let (reload_tx, reloads) = tokio::sync::mpsc::unbounded_channel();
        let source = a.config.clone();
        tokio::spawn(async move {
            let mut hup = match hup {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot watch SIGHUP ({e}): no reloads");
                    return;
                }
            };
            let mut levels = directives;
            while hup.recv().await.is_some() {
                match source.load() {
                    Ok(cfg) => {
                        if cfg.gateway.log != levels {
                            levels =
                                reload_levels(&log_levels, fixed_by_env, &levels, &cfg.gateway.log);
                        }
                        let _ = reload_tx.send(cfg);
                    }
                    Err(e) => tracing::error!("reload refused, the config in force stays: {e:#}"),
                }
            }
        });
        tidepool::gateway::run(cfg, stop, reloads, |addr| {
            // A machine-readable ready line on stdout (logs go to stderr).
            println!("tidepool listening on {addr}");
        })
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Puts `new` log levels (`gateway.log`) in force in place of `now`, unless RUST_LOG set them;
/// returns the levels in force, saying what changed or why not.
fn reload_levels<S>(
    handle: &tracing_subscriber::reload::Handle<Targets, S>,
    fixed_by_env: bool,
    now: &str,
    new: &str,
) -> String {
    if fixed_by_env {
        tracing::warn!(
            "gateway.log changed to `{new}`, but RUST_LOG sets the log levels: unchanged"
        );
        return now.to_string();
    }
    match new.parse::<Targets>() {
        Ok(filter) => match handle.reload(filter) {
            Ok(()) => {
                tracing::info!("reloaded gateway.log: `{now}` -> `{new}`");
                new.to_string()
            }
            Err(e) => {
                tracing::error!("gateway.log: cannot reload the log levels: {e}");
                now.to_string()
            }
        },
        Err(e) => {
            tracing::error!("gateway.log = `{new}`: {e}; the levels in force stay");
            now.to_string()
        }
    }
}
