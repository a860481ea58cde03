//! `tidepool invoke`: runs one handler locally on a file of events (JSON lines) and prints,
//! per event, its forwards, emits, state changes, logs, fuel and errors. The same engine,
//! limits and fuel accounting as the gateway; state in memory or in a local store.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tidepool::jsonl::{Input, Line};
use tidepool::sandbox::{
    EventInfo, Handler, HostEnv, Manifest, Outcome, Runtime, StateSource, TimerInfo,
};
use tidepool::store::Store;

/// Run a handler locally on a file of events, the way the gateway would.
///
/// Each line of --events is an event,
///   {"topic": "devices/d1/temp", "payload": "{\"v\": 21.5}"}
/// ("payload_b64" for bytes), with optional "device", "seq" and "ts"; or a timer tick,
///   {"timer": true, "now_ms": 1700000000000}.
/// `[record]` recordings and `tidepool dead-letters export` write this format.
///
/// Prints, per event, the forwards, emits, state changes, logs, fuel used and any error (the
/// dead-letter reason the gateway would write). Emits are shown, not run.
///
/// The same engine, fuel and limits as the gateway: the box caps come from --config (or the
/// embedded defaults); [[handler]] overrides do not apply, use --set. State lives in memory
/// unless --state-dir keeps it in a local store between runs.
///
/// Exits 0 when every line ran (handler failures included), 2 on a bad events file (nothing
/// runs), 1 when the handler does not load.
#[derive(clap::Args)]
pub struct Args {
    /// The handler's module (.wasm).
    #[arg(long, value_name = "FILE")]
    handler: PathBuf,
    /// The handler's manifest (.toml).
    #[arg(long, value_name = "FILE")]
    manifest: PathBuf,
    /// Events as JSON lines; `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    events: PathBuf,
    /// Keep the handler's state in a store in this directory (created if missing), so a run
    /// starts from the state the last one left.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Override a key of the manifest's [config], e.g. --set threshold=40 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    set: Vec<(String, String)>,
    /// Print one JSON object per event instead of text.
    #[arg(long)]
    json: bool,
    /// The gateway configuration whose box caps ([limits]) and payload limit apply (TOML).
    /// Without it, the embedded defaults.
    #[arg(long, short = 'c', value_name = "FILE", env = "TIDEPOOL_CONFIG")]
    config: Option<PathBuf>,
}

fn parse_set(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// Handler state for a local run: in memory, or in a store.
enum LocalState {
    Memory(Mutex<HashMap<Vec<u8>, Vec<u8>>>),
    Store(Store),
}

impl StateSource for LocalState {
    fn get(&self, handler: &str, key: &[u8]) -> Option<Vec<u8>> {
        match self {
            LocalState::Memory(m) => m
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(key)
                .cloned(),
            LocalState::Store(s) => StateSource::get(s, handler, key),
        }
    }
}

impl LocalState {
    fn apply(&self, handler: &str, writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> anyhow::Result<()> {
        match self {
            LocalState::Memory(m) => {
                let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                for (k, v) in writes {
                    match v {
                        Some(v) => m.insert(k.clone(), v.clone()),
                        None => m.remove(k),
                    };
                }
            }
            LocalState::Store(s) => {
                s.put_state(handler, writes)?;
            }
        }
        Ok(())
    }
}

fn read_events(path: &PathBuf) -> anyhow::Result<Vec<Input>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ))
    };
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let input = Line::parse(&line).with_context(at)?;
        if let Input::Event { topic, .. } = &input {
            tidepool::proto::topic::validate(topic)
                .map_err(|e| anyhow::anyhow!("topic `{topic}`: {e}"))
                .with_context(at)?;
        }
        out.push(input);
    }
    Ok(out)
}

/// The bytes as text, if they are printable UTF-8.
fn printable(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes)
        .ok()
        .filter(|t| !t.chars().any(|c| c.is_control()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes as text when they are printable UTF-8, as `0x` hex otherwise (the JSON output).
fn plain(bytes: &[u8]) -> String {
    match printable(bytes) {
        Some(t) => t.to_string(),
        None => format!("0x{}", hex(bytes)),
    }
}

/// Like [`plain`], with the hex too for short printable values (the 8 bytes of an f64 are
/// often printable): the text output.
fn show(bytes: &[u8]) -> String {
    match printable(bytes) {
        Some(t) if !t.is_empty() && t.len() <= 16 => format!("{t} (0x{})", hex(bytes)),
        _ => plain(bytes),
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let cfg = match &a.config {
        Some(p) => tidepool::config::Config::load(p)?,
        None => tidepool::config::Config::defaults(),
    };
    let manifest = Manifest::load(&a.manifest)?;
    manifest.check(&cfg.limits)?;
    let wasm =
        std::fs::read(&a.handler).with_context(|| format!("reading {}", a.handler.display()))?;
    let inputs = match read_events(&a.events) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("tidepool: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let state = Arc::new(match &a.state_dir {
        Some(dir) => LocalState::Store(
            Store::open(dir, cfg.store.cache_capacity_bytes)
                .with_context(|| format!("opening the state store in {}", dir.display()))?,
        ),
        None => LocalState::Memory(Mutex::default()),
    });
    let used = match &*state {
        LocalState::Store(s) => s.state_bytes(&manifest.name)?,
        LocalState::Memory(_) => 0,
    };
    let env = HostEnv {
        capture_logs: true,
        ..HostEnv::new(&cfg, state.clone())
    };
    let overrides: BTreeMap<String, String> = a.set.into_iter().collect();
    let name = manifest.name.clone();
    let started = std::time::Instant::now();
    let mut h = Handler::load(&Runtime::default(), &wasm, manifest, &overrides, env, used)?;
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    if !a.json {
        println!(
            "loaded {name} v{} ({} bytes) in {load_ms:.1} ms",
            h.manifest.version,
            wasm.len()
        );
    }
    let mut out = std::io::stdout().lock();
    let (mut ok, mut failed) = (0usize, 0usize);
    for (i, input) in inputs.iter().enumerate() {
        let n = i + 1;
        let now = tidepool::clock::now_ms();
        let (label, outcome) = match input {
            Input::Event {
                topic,
                payload,
                device,
                seq,
                ts,
            } => {
                let device: Arc<str> = device.as_deref().unwrap_or("local").into();
                let ev = EventInfo {
                    device: &device,
                    seq: seq.unwrap_or(n as u64),
                    ts: *ts,
                    received_ms: now,
                    clock_set: tidepool::clock::is_set(now),
                    topic,
                    payload,
                    depth: 0,
                    emit_budget: cfg.limits.emits_per_event,
                    log_budget: cfg.limits.log_bytes_per_event,
                };
                (format!("{topic} {}", plain(payload)), h.invoke(&ev))
            }
            Input::Timer { now_ms, due_ms } => {
                let now_ms = now_ms.unwrap_or(now);
                let t = TimerInfo {
                    now_ms,
                    due_ms: due_ms.unwrap_or(now_ms).min(now_ms),
                    emit_budget: cfg.limits.emits_per_event,
                    log_budget: cfg.limits.log_bytes_per_event,
                };
                (format!("timer now_ms={}", t.now_ms), h.timer(&t))
            }
        };
        if let Ok(effects) = &outcome.result {
            state.apply(&name, &effects.state)?;
            h.state_used = h.state_used.saturating_add_signed(effects.state_delta);
            ok += 1;
        } else {
            failed += 1;
        }
        if a.json {
            writeln!(out, "{}", to_json(n, &outcome))?;
        } else {
            print_text(&mut out, n, &label, &outcome)?;
        }
    }
    if let LocalState::Store(s) = &*state {
        s.sync()?;
    }
    if !a.json {
        writeln!(out, "{} lines: {ok} ok, {failed} failed", ok + failed)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(out: &mut impl Write, n: usize, label: &str, o: &Outcome) -> std::io::Result<()> {
    writeln!(out, "#{n} {label}")?;
    for l in &o.logs {
        let level = ["error", "warn", "info", "debug", "trace"][usize::from(l.level.min(4))];
        writeln!(out, "  log {level}: {}", l.text)?;
    }
    if o.log_dropped > 0 {
        writeln!(out, "  log: {} bytes dropped over the cap", o.log_dropped)?;
    }
    match &o.result {
        Ok(e) => {
            for f in &e.forwards {
                writeln!(
                    out,
                    "  forward {} {} {}",
                    f.class.as_str(),
                    f.topic,
                    plain(&f.payload)
                )?;
            }
            for (t, p) in &e.emits {
                writeln!(out, "  emit {t} {}", plain(p))?;
            }
            for (k, v) in &e.state {
                match v {
                    Some(v) => writeln!(out, "  state put {} = {}", plain(k), show(v))?,
                    None => writeln!(out, "  state delete {}", plain(k))?,
                }
            }
            writeln!(out, "  ok, fuel {}", o.fuel_used)
        }
        Err(f) => writeln!(
            out,
            "  FAILED {f} (fuel {}); effects discarded",
            o.fuel_used
        ),
    }
}

fn to_json(n: usize, o: &Outcome) -> serde_json::Value {
    let text = plain;
    let (ok, error, forwards, emits, state) = match &o.result {
        Ok(e) => (
            true,
            None,
            e.forwards
                .iter()
                .map(|f| {
                    serde_json::json!({"topic": f.topic, "class": f.class.as_str(), "payload": text(&f.payload)})
                })
                .collect(),
            e.emits
                .iter()
                .map(|(t, p)| serde_json::json!({"topic": t, "payload": text(p)}))
                .collect(),
            e.state
                .iter()
                .map(|(k, v)| serde_json::json!({"key": text(k), "value": v.as_deref().map(text)}))
                .collect(),
        ),
        Err(f) => (false, Some(f.reason.clone()), vec![], vec![], vec![]),
    };
    serde_json::json!({
        "line": n,
        "ok": ok,
        "error": error,
        "fuel": o.fuel_used,
        "forwards": forwards,
        "emits": emits,
        "state": state,
        "logs": o.logs.iter().map(|l| serde_json::json!({"level": l.level, "text": l.text})).collect::<Vec<_>>(),
        "log_dropped": o.log_dropped,
    })
}
