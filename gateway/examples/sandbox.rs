//! The sandbox benchmark: the per-event cost of the handler path alone (copy topic and payload
//! in, run, collect the effects, apply the state writes to an in-memory map; no disk, no
//! network) on one thread, for a trivial WAT handler, a hand-written WAT threshold handler,
//! the SDK's threshold example, and the same threshold logic as a native Rust function, all
//! measured in the same run on the same events (`{"v": 21.5}` from 8 devices). Then the
//! dispatcher (routing, handlers, dead letters, admission; the commit's channel drained, no disk)
//! with the SDK threshold handler alone and next to a hostile handler that burns its whole fuel
//! on every event, quarantined after 50 failures or never. Then the load time and size of each
//! example handler. `scripts/bench.sh` runs it; see docs/performance.md.
//!
//!   sandbox [--events N] [--modules DIR]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tidepool::config::Config;
use tidepool::dispatch::{Dispatcher, EventState};
use tidepool::metrics::Metrics;
use tidepool::outbox::Outbox;
use tidepool::proto::msg::Publish;
use tidepool::sandbox::{EventInfo, Handler, HostEnv, Manifest, Runtime, StateSource};
use tidepool::store::Store;

/// Burns all of its fuel on every event (a hostile neighbour).
const SPIN_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 2048))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32) (loop $l (br $l)) (i32.const 0)))"#;

/// Burns most of its fuel on every event (100,000 turns of a loop, under the 1,000,000 fuel of
/// its manifest), then succeeds: a legal hog, never failing, never quarantined.
const HOG_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 2048))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
    (local $i i32)
    (local.set $i (i32.const 100000))
    (block $done (loop $l
      (br_if $done (i32.eqz (local.get $i)))
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (br $l)))
    (i32.const 0)))"#;

/// Returns 0 at once: what the host side costs by itself.
const TRIVIAL_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 2048))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32) (i32.const 0)))"#;

/// The threshold logic by hand: the number after the first ':' of the payload, the last
/// reading under `last/<topic>` (f64 LE), an urgent forward on crossing 30 upwards, one write.
const THRESHOLD_WAT: &str = r#"(module
  (import "tidepool" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "state_put" (func $put (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "forward" (func $fwd (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 512) "last/")
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 2048))
  (func (export "tp_on_event") (param $tp i32) (param $tl i32) (param $pp i32) (param $pl i32) (result i32)
    (local $i i32) (local $end i32) (local $c i32) (local $v f64) (local $scale f64)
    (local $neg i32) (local $frac i32) (local $has i32)
    (if (i32.gt_u (local.get $tl) (i32.const 1024)) (then (return (i32.const -5))))
    (local.set $i (local.get $pp))
    (local.set $end (i32.add (local.get $pp) (local.get $pl)))
    (block $found (loop $scan
      (if (i32.ge_u (local.get $i) (local.get $end)) (then (return (i32.const -1))))
      (br_if $found (i32.eq (i32.load8_u (local.get $i)) (i32.const 58)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $scan)))
    (local.set $i (i32.add (local.get $i) (i32.const 1)))
    (block $s (loop $sp
      (br_if $s (i32.ge_u (local.get $i) (local.get $end)))
      (br_if $s (i32.ne (i32.load8_u (local.get $i)) (i32.const 32)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $sp)))
    (if (i32.lt_u (local.get $i) (local.get $end)) (then
      (if (i32.eq (i32.load8_u (local.get $i)) (i32.const 45)) (then
        (local.set $neg (i32.const 1))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))))))
    (local.set $scale (f64.const 1))
    (block $d (loop $dig
      (br_if $d (i32.ge_u (local.get $i) (local.get $end)))
      (local.set $c (i32.load8_u (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (if (i32.eq (local.get $c) (i32.const 46)) (then (local.set $frac (i32.const 1)) (br $dig)))
      (br_if $d (i32.gt_u (i32.sub (local.get $c) (i32.const 48)) (i32.const 9)))
      (local.set $v (f64.add (f64.mul (local.get $v) (f64.const 10))
                             (f64.convert_i32_u (i32.sub (local.get $c) (i32.const 48)))))
      (if (local.get $frac) (then (local.set $scale (f64.mul (local.get $scale) (f64.const 10)))))
      (br $dig)))
    (local.set $v (f64.div (local.get $v) (local.get $scale)))
    (if (local.get $neg) (then (local.set $v (f64.neg (local.get $v)))))
    (memory.copy (i32.const 517) (local.get $tp) (local.get $tl))
    (local.set $has (i32.eq (call $get (i32.const 512) (i32.add (local.get $tl) (i32.const 5))
                                       (i32.const 16) (i32.const 8)) (i32.const 8)))
    (if (i32.and (f64.gt (local.get $v) (f64.const 30))
                 (i32.or (i32.eqz (local.get $has)) (f64.le (f64.load (i32.const 16)) (f64.const 30))))
      (then (drop (call $fwd (local.get $tp) (local.get $tl) (local.get $pp) (local.get $pl) (i32.const 0)))))
    (f64.store (i32.const 16) (local.get $v))
    (call $put (i32.const 512) (i32.add (local.get $tl) (i32.const 5)) (i32.const 16) (i32.const 8))))"#;

/// (handler, key) -> value, like the store's state namespace.
type StateMap = HashMap<(String, Vec<u8>), Vec<u8>>;

/// Handler state in memory.
#[derive(Default)]
struct MemState(Mutex<StateMap>);

impl StateSource for MemState {
    fn get(&self, handler: &str, key: &[u8]) -> Option<Vec<u8>> {
        let m = self.0.lock().unwrap();
        m.get(&(handler.to_string(), key.to_vec())).cloned()
    }
}

/// The same threshold logic, native.
fn native_threshold(
    state: &mut HashMap<Vec<u8>, Vec<u8>>,
    topic: &str,
    payload: &[u8],
    forwards: &mut Vec<(String, Vec<u8>)>,
) -> Result<(), ()> {
    let text = std::str::from_utf8(payload).map_err(|_| ())?;
    let colon = text.find(':').ok_or(())?;
    let num = text[colon + 1..].trim_start();
    let end = num
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .unwrap_or(num.len());
    let v: f64 = num[..end].parse().map_err(|_| ())?;
    let key = [b"last/", topic.as_bytes()].concat();
    let prev = state
        .get(&key)
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(f64::from_le_bytes);
    if v > 30.0 && prev.is_none_or(|p| p <= 30.0) {
        forwards.push((topic.to_string(), payload.to_vec()));
    }
    state.insert(key, v.to_le_bytes().to_vec());
    Ok(())
}

fn topics() -> Vec<String> {
    (1..=8).map(|i| format!("devices/dev-{i}/temp")).collect()
}

const PAYLOAD: &[u8] = br#"{"v": 21.5}"#;

/// The gateway's defaults.
fn env(state: Arc<MemState>) -> HostEnv {
    HostEnv::new(&Config::defaults(), state)
}

fn load(wasm: &[u8], manifest: Manifest, state: Arc<MemState>) -> Handler {
    Handler::load(
        &Runtime::default(),
        wasm,
        manifest,
        &BTreeMap::new(),
        env(state),
        0,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn manifest(name: &str) -> Manifest {
    toml::from_str(&format!(
        "name = \"{name}\"\nversion = 1\nsubscribe = [\"#\"]\n[config]\nthreshold = \"30\"\n"
    ))
    .unwrap()
}

/// Events per second through `h`, with the state writes applied after each event.
fn run_handler(h: &mut Handler, state: &MemState, n: usize) -> (f64, u64) {
    let topics = topics();
    let name = h.name().to_string();
    let mut fuel = 0;
    let device: Arc<str> = "dev".into();
    let start = Instant::now();
    for i in 0..n {
        let ev = EventInfo {
            device: &device,
            seq: i as u64 + 1,
            ts: None,
            received_ms: 0,
            clock_set: true,
            topic: &topics[i % topics.len()],
            payload: PAYLOAD,
            depth: 0,
            emit_budget: 16,
            log_budget: 4096,
        };
        let out = h.invoke(&ev);
        fuel += out.fuel_used;
        match out.result {
            Ok(effects) => {
                let mut m = state.0.lock().unwrap();
                for (k, v) in effects.state {
                    match v {
                        Some(v) => m.insert((name.clone(), k), v),
                        None => m.remove(&(name.clone(), k)),
                    };
                }
            }
            Err(f) => panic!("{name}: {f}"),
        }
    }
    (n as f64 / start.elapsed().as_secs_f64(), fuel / n as u64)
}

fn run_native(n: usize) -> f64 {
    let topics = topics();
    let mut state = HashMap::new();
    let mut forwards = Vec::new();
    let start = Instant::now();
    for i in 0..n {
        // The host's copy of the event into the guest has a native twin: the owned event.
        let topic = std::hint::black_box(&topics[i % topics.len()]);
        native_threshold(
            &mut state,
            topic,
            std::hint::black_box(PAYLOAD),
            &mut forwards,
        )
        .unwrap();
    }
    std::hint::black_box(&forwards);
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mut events = 400_000usize;
    let mut modules = PathBuf::from("modules");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--events" => {
                events = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--events N")
            }
            "--modules" => modules = args.next().map(PathBuf::from).expect("--modules DIR"),
            _ => {
                eprintln!("usage: sandbox [--events N] [--modules DIR]");
                std::process::exit(2);
            }
        }
    }
    let sdk_wasm = modules.join("target/wasm32-unknown-unknown/release/threshold.wasm");
    let sdk_manifest = modules.join("examples/threshold/threshold.toml");
    let wasm = |wat: &str| wat::parse_str(wat).unwrap();

    let mut results: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut fuel: BTreeMap<&str, u64> = BTreeMap::new();
    // Three rounds, interleaved, so drift on a shared machine hits every variant alike.
    for _ in 0..3 {
        results
            .entry("native")
            .or_default()
            .push(run_native(events));
        for (label, module, m) in [
            ("wat-trivial", wasm(TRIVIAL_WAT), manifest("trivial")),
            (
                "wat-threshold",
                wasm(THRESHOLD_WAT),
                manifest("wat-threshold"),
            ),
            (
                "sdk-threshold",
                std::fs::read(&sdk_wasm)
                    .expect("build the handlers first (scripts/build-handlers.sh)"),
                Manifest::load(&sdk_manifest).unwrap(),
            ),
        ] {
            let state = Arc::new(MemState::default());
            let mut h = load(&module, m, state.clone());
            run_handler(&mut h, &state, events / 10); // warm-up
            let (rate, f) = run_handler(&mut h, &state, events);
            results.entry(label).or_default().push(rate);
            fuel.insert(label, f);
        }
    }
    let best = |k: &str| results[k].iter().cloned().fold(0.0, f64::max);
    let native = best("native");
    let shown = String::from_utf8_lossy(PAYLOAD);
    println!("sandbox path, one thread, {events} events of {shown} per run, best of 3:");
    for k in ["native", "wat-trivial", "wat-threshold", "sdk-threshold"] {
        let r = best(k);
        println!(
            "  {k:<14} {:>12.0} events/s  {:>8.0} ns/event  {:>8.1}x native time  fuel/event {}",
            r,
            1e9 / r,
            native / r,
            fuel.get(k).map_or("-".to_string(), |f| f.to_string())
        );
    }

    let sdk = std::fs::read(&sdk_wasm).expect("the SDK threshold handler");
    let threshold = || (sdk.clone(), Manifest::load(&sdk_manifest).unwrap());
    let spinner = || {
        let m: Manifest = toml::from_str(
            "name = \"spin\"\nversion = 1\nsubscribe = [\"devices/+/temp\"]\n[limits]\nfuel_per_event = 1000000\n",
        )
        .unwrap();
        (wasm(SPIN_WAT), m)
    };
    println!(
        "dispatcher, one thread, no disk: the threshold handler's events/s next to a hostile one:"
    );
    let hog = |share: &str| {
        let m: Manifest = toml::from_str(&format!(
            "name = \"hog\"\nversion = 1\nsubscribe = [\"devices/+/temp\"]\n[limits]\nfuel_per_event = 1000000\n{share}"
        ))
        .unwrap();
        (wasm(HOG_WAT), m)
    };
    let alone = dispatch_rate(vec![threshold()], 50, 0, events / 2);
    let quarantined = dispatch_rate(vec![threshold(), spinner()], 50, 100, events / 2);
    let never = dispatch_rate(vec![threshold(), spinner()], 0, 100, 2_000);
    // The box's default is the fair share (0): it holds while work waits and two handlers or
    // more are active, as here (the dispatcher is driven flat out). 100 turns it off; the hog
    // may also ask for a fixed 25% in its manifest.
    let hog_off = dispatch_rate(vec![threshold(), hog("")], 50, 100, 2_000);
    let hog_fair = dispatch_rate(vec![threshold(), hog("")], 50, 0, 4 * events);
    let hog_held = dispatch_rate(
        vec![threshold(), hog("cpu_percent = 25")],
        50,
        100,
        4 * events,
    );
    for (label, (rate, errors)) in [
        ("threshold alone", alone),
        ("+ spinner, quarantined after 50", quarantined),
        ("+ spinner, never quarantined", never),
        ("+ hog (succeeds), share off", hog_off),
        ("+ hog, fair share (the default)", hog_fair),
        ("+ hog, cpu_percent 25", hog_held),
    ] {
        println!(
            "  {label:<32} {rate:>10.0} events/s  {:>6.3}x alone  (its failures or refusals: {errors})",
            rate / alone.0
        );
    }

    println!(
        "example handlers: load time (validate, compile eagerly, instantiate, tp_init) and size:"
    );
    let examples = modules.join("examples");
    let mut names: Vec<String> = std::fs::read_dir(&examples)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        let wasm_path = modules.join(format!("target/wasm32-unknown-unknown/release/{name}.wasm"));
        let manifest_path = examples.join(&name).join(format!("{name}.toml"));
        let (Ok(bytes), Ok(m)) = (std::fs::read(&wasm_path), Manifest::load(&manifest_path)) else {
            println!("  {name}: not built");
            continue;
        };
        println!(
            "  {name:<10} {:>7} bytes  load {:>6.2} ms",
            bytes.len(),
            load_ms(&bytes, &m)
        );
    }
}

/// Events per second through a real dispatcher over a real (idle) store, with `handlers` in
/// this order; the commit channel is drained and dropped, so nothing reaches the disk. Returns
/// the rate and the handler failures.
fn dispatch_rate(
    handlers: Vec<(Vec<u8>, Manifest)>,
    quarantine_after: u32,
    cpu_percent: u32,
    n: usize,
) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::defaults();
    cfg.limits.quarantine_after_errors = quarantine_after;
    cfg.limits.cpu_percent = cpu_percent;
    let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
    let outbox = Arc::new(Outbox::load(&store, &cfg.outbox, 0).unwrap().0);
    let state = Arc::new(EventState::new(Arc::new(store.clone())));
    let env = HostEnv::new(&cfg, state.clone());
    let rt = Runtime::default();
    let handlers = handlers
        .into_iter()
        .map(|(w, m)| Handler::load(&rt, &w, m, &BTreeMap::new(), env.clone(), 0).unwrap())
        .collect();
    let (tx, rx) = std::sync::mpsc::sync_channel::<tidepool::pipeline::Item>(4096);
    let metrics = Arc::new(Metrics::default());
    let mut d = Dispatcher::new(
        &cfg,
        handlers,
        Arc::new(store),
        state,
        outbox,
        tx,
        metrics.clone(),
        tidepool::clock::now_ms(),
    )
    .expect("the store is readable");
    // The committer's part without the disk: take each item and free its bytes.
    let backlog = d.backlog.clone();
    let drain = std::thread::spawn(move || {
        for item in rx {
            backlog.leave(1, item.kind.bytes());
        }
    });
    // Driven flat out: work is always waiting.
    d.set_work_waiting(true);
    let (reply, _answers) = tokio::sync::mpsc::unbounded_channel();
    let devices: Vec<Arc<str>> = (1..=8).map(|i| format!("dev-{i}").into()).collect();
    let topics = topics();
    let start = Instant::now();
    for i in 0..n {
        let p = Publish {
            seq: (i / devices.len()) as u64 + 1,
            topic: topics[i % devices.len()].clone(),
            payload: bytes::Bytes::from_static(PAYLOAD),
            ts: None,
            id: None,
            src: None,
            class: None,
        };
        d.publish(
            &devices[i % devices.len()],
            p,
            tidepool::clock::Stamp::set(0),
            &reply,
        )
        .expect("the store is readable");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    d.close();
    drop(d);
    drain.join().unwrap();
    let errors = metrics
        .handler_errors
        .load(std::sync::atomic::Ordering::Relaxed)
        + metrics
            .handler_cpu_refusals
            .load(std::sync::atomic::Ordering::Relaxed);
    (rate, errors)
}

/// The median of 21 loads.
fn load_ms(wasm: &[u8], m: &Manifest) -> f64 {
    let mut t: Vec<f64> = (0..21)
        .map(|_| {
            let start = Instant::now();
            let h = load(wasm, m.clone(), Arc::new(MemState::default()));
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            drop(h);
            ms
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}
