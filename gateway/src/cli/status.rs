//! `tidepool status`: what a running gateway is doing, asked through its control socket.

use std::process::ExitCode;

use anyhow::Context;

/// Show a running gateway's handlers (quarantine and probation included), outbox and counters.
///
/// Asks the gateway through `<data-dir>/control.sock`, so run it as the gateway's user with
/// the same `--config`/`--data-dir`; or a remote one over the admin channel (--gateway … or
/// --profile). Exits 3 when no gateway runs on that data dir.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: super::admin::Target,
    /// Print the raw JSON answer instead of a summary.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut answer = Vec::new();
    if !a.target.ask("status", &[], &mut answer)? {
        eprintln!("(a stopped gateway's last counters are in metrics.json in its data dir)");
        return Ok(ExitCode::from(super::admin::NO_GATEWAY));
    }
    if a.json {
        print!("{}", String::from_utf8_lossy(&answer));
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&answer).context("the gateway's status answer is not JSON")?;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    println!(
        "gateway {} (tidepool {}), up {} s",
        v["gateway"].as_str().unwrap_or("?"),
        v["version"].as_str().unwrap_or("?"),
        n(&v["uptime_s"])
    );
    if v["clock"]["synced"].as_bool() == Some(false) {
        println!(
            "clock: UNSYNCED, the wall clock reads {} s, behind the last known time {} s (no RTC, NTP not answered yet?); certificates are checked at {} s",
            n(&v["clock"]["wall_s"]),
            n(&v["clock"]["floor_s"]),
            n(&v["clock"]["checked_at_s"])
        );
    }
    let handlers = match v["handlers"].as_array() {
        None => {
            println!("handlers: unknown (the dispatcher did not answer within a second)");
            &[][..]
        }
        Some(h) if h.is_empty() => {
            println!("handlers: none");
            &[][..]
        }
        Some(h) => h.as_slice(),
    };
    for s in v["skipped"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        println!(
            "handler in {}: NOT LOADED: {}",
            s["source"].as_str().unwrap_or("?"),
            s["reason"].as_str().unwrap_or("?")
        );
    }
    for (name, note) in v["notes"].as_object().into_iter().flatten() {
        println!("handler {name}: {}", note.as_str().unwrap_or("?"));
    }
    for h in handlers {
        let only: Vec<&str> = h["quarantined_for"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_str()).collect())
            .unwrap_or_default();
        let health = if h["quarantined"].as_bool() == Some(true) {
            "QUARANTINED for every device (failures in a row from several devices)".to_string()
        } else if !only.is_empty() {
            let names: Vec<String> = only
                .iter()
                .map(|d| {
                    if d.is_empty() {
                        "its timer".into()
                    } else {
                        format!("`{d}`")
                    }
                })
                .collect();
            format!(
                "QUARANTINED for {} only; ok for the others ({} failures in a row at most)",
                names.join(", "),
                n(&h["errors_in_row"])
            )
        } else {
            format!("ok ({} failures in a row at most)", n(&h["errors_in_row"]))
        };
        let health = match h["cpu_refused"].as_u64() {
            Some(r) if r > 0 => {
                let share = match (h["cpu_share"].as_str(), n(&h["cpu_percent"])) {
                    (Some("fair"), 0) => "fair".to_string(),
                    (Some("fair"), p) => format!("{p}% or fair"),
                    (_, p) => format!("{p}%"),
                };
                format!("{health}; {r} invocations refused over its {share} CPU share")
            }
            _ => health,
        };
        let p = &h["probation"];
        let health = match p.is_object() {
            true => format!(
                "{health}; on probation: {}/{} runs, {} failed",
                p["runs"], p["of_runs"], p["failures"]
            ),
            false => health,
        };
        let timer = h["timer_ms"]
            .as_u64()
            .map(|t| format!(", timer every {t} ms"))
            .unwrap_or_default();
        println!(
            "handler {} v{}{timer}: {health}",
            h["name"].as_str().unwrap_or("?"),
            n(&h["version"])
        );
    }
    println!(
        "outbox: {} entries, {} bytes",
        n(&v["outbox"]["entries"]),
        n(&v["outbox"]["bytes"])
    );
    if let Some(m) = v["metrics"].as_object() {
        let line: Vec<String> = m
            .iter()
            .filter(|(_, c)| n(c) > 0)
            .map(|(k, c)| format!("{k} {}", n(c)))
            .collect();
        println!("counters: {}", line.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
