//! The hostile suite: handlers that attack the sandbox, run inside the real gateway next to a
//! well-behaved one. For each: the gateway stays up and acks, the event is dead-lettered with a
//! reason that names the limit, nothing of its effects is stored or forwarded, the counters
//! show it, and the well-behaved handler on the same events is unaffected. Modules that break
//! the ABI are refused at load with a reason that names the problem.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::*;
use tidepool::proto::msg::GatewayMsg;

/// A module with every ABI import, one page of memory, `tp_alloc` at 1024, a `k = v` state
/// write at the start of every event (so a discarded effect would show), then `body`.
fn hostile(body: &str, extra: &str) -> String {
    format!(
        r#"(module
  (import "tidepool" "state_get" (func $state_get (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "state_put" (func $state_put (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "state_delete" (func $state_delete (param i32 i32) (result i32)))
  (import "tidepool" "forward" (func $forward (param i32 i32 i32 i32 i32) (result i32)))
  (import "tidepool" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "log" (func $log (param i32 i32 i32)))
  (import "tidepool" "config_get" (func $config_get (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "event_meta" (func $event_meta (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "kvlocal/x")
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
  {extra}
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
    (local $i i32) (local $p i32) (local $l i32)
    (drop (call $state_put (i32.const 0) (i32.const 1) (i32.const 1) (i32.const 1)))
    {body}
    (i32.const 0)))"#
    )
}

/// Each hostile handler, the reason its events must be dead-lettered with, and how many
/// events it gets.
fn hostile_handlers() -> Vec<(&'static str, String, &'static str)> {
    let forever = |call: &str| format!("(loop $l {call} (br $l))");
    // Payload byte b: import b / 2; even b = a range past the end of memory, odd b = a range
    // whose end overflows u32.
    let badptr = r#"
    (local.set $i (i32.shr_u (i32.load8_u (local.get 2)) (i32.const 1)))
    (if (i32.and (i32.load8_u (local.get 2)) (i32.const 1))
      (then (local.set $p (i32.const -1)) (local.set $l (i32.const 2)))
      (else (local.set $p (i32.const 65530)) (local.set $l (i32.const 100))))
    (if (i32.eq (local.get $i) (i32.const 0)) (then (drop (call $state_get (local.get $p) (local.get $l) (i32.const 0) (i32.const 0)))))
    (if (i32.eq (local.get $i) (i32.const 1)) (then (drop (call $state_put (i32.const 0) (i32.const 1) (local.get $p) (local.get $l)))))
    (if (i32.eq (local.get $i) (i32.const 2)) (then (drop (call $state_delete (local.get $p) (local.get $l)))))
    (if (i32.eq (local.get $i) (i32.const 3)) (then (drop (call $forward (i32.const 2) (i32.const 7) (local.get $p) (local.get $l) (i32.const 0)))))
    (if (i32.eq (local.get $i) (i32.const 4)) (then (drop (call $emit (local.get $p) (local.get $l) (i32.const 0) (i32.const 0)))))
    (if (i32.eq (local.get $i) (i32.const 5)) (then (call $log (i32.const 2) (local.get $p) (local.get $l))))
    (if (i32.eq (local.get $i) (i32.const 6)) (then (drop (call $config_get (i32.const 0) (i32.const 1) (local.get $p) (local.get $l)))))
    (if (i32.eq (local.get $i) (i32.const 7)) (then (drop (call $event_meta (local.get $p) (local.get $l)))))
    "#;
    vec![
        ("spin", forever(""), "limit:fuel"),
        (
            "grow",
            r#"(block $refused (loop $l
                 (br_if $refused (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
                 (br $l)))"#
                .into(),
            "limit:memory_pages",
        ),
        ("recurse", "(drop (call $deep))".into(), "limit:stack"),
        ("badptr", badptr.into(), "trap:bad pointer or length in "),
        (
            "forwards",
            r#"(local.set $i (i32.const 1000000))
               (block $done (loop $l
                 (br_if $done (i32.eqz (local.get $i)))
                 (drop (call $forward (i32.const 2) (i32.const 7) (i32.const 0) (i32.const 1) (i32.const 0)))
                 (local.set $i (i32.sub (local.get $i) (i32.const 1)))
                 (br $l)))"#
                .into(),
            "limit:forwards_per_event",
        ),
        (
            "quota",
            r#"(block $full (loop $l
                 (i32.store (i32.const 64) (local.get $i))
                 (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br_if $full (i32.eq (call $state_put (i32.const 64) (i32.const 4) (i32.const 128) (i32.const 1024)) (i32.const -2)))
                 (br $l)))"#
                .into(),
            "limit:state_bytes",
        ),
        (
            "emitter",
            forever("(drop (call $emit (i32.const 2) (i32.const 7) (i32.const 0) (i32.const 1)))"),
            "limit:emits_per_event",
        ),
        (
            "logger",
            forever("(call $log (i32.const 0) (i32.const 0) (i32.const 65536))"),
            "limit:fuel",
        ),
        (
            "copier",
            forever("(drop (call $state_put (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 32768)))"),
            "limit:fuel",
        ),
    ]
}

/// Runs `tidepool dead-letters export` against the running gateway: handler -> reasons.
fn dead_letters(gw: &Gateway) -> BTreeMap<String, Vec<String>> {
    let run = cli(&["dead-letters", "export"], &gw.config);
    assert!(run.ok, "{}", run.stderr);
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for v in run.json_lines() {
        by.entry(v["handler"].as_str().unwrap_or("").to_string())
            .or_default()
            .push(v["reason"].as_str().unwrap().to_string());
    }
    by
}

fn status(gw: &Gateway) -> serde_json::Value {
    let run = cli(&["status", "--json"], &gw.config);
    assert!(run.ok, "{}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

#[tokio::test]
async fn hostile_handlers_are_contained_and_dead_lettered_with_the_limit_they_hit() {
    let dir = tempfile::tempdir().unwrap();
    let handlers = hostile_handlers();
    let mut config = wat_handler(
        dir.path(),
        "counter",
        COUNTER_WAT,
        "subscribe = [\"devices/#\"]",
    );
    for (name, body, _) in &handlers {
        let extra = if *name == "recurse" {
            "(func $deep (result i32) (i32.add (call $deep) (i32.const 1)))"
        } else {
            ""
        };
        // Each hostile handler only sees its own topic.
        config += &wat_handler(
            dir.path(),
            name,
            &hostile(body, extra),
            &format!(
                "subscribe = [\"devices/+/h/{name}\"]\n[limits]\nmemory_pages = 2\n\
                 fuel_per_event = 1000000\nforwards_per_event = 2\nemits_per_event = 2"
            ),
        );
    }
    let mut gw = Gateway::start(&config);
    let dev = gw.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    let mut seq = 0;
    let mut expected: BTreeMap<String, (usize, &str)> = BTreeMap::new();
    for (name, _, reason) in &handlers {
        let payloads: Vec<Vec<u8>> = if *name == "badptr" {
            (0u8..16).map(|b| vec![b]).collect()
        } else {
            vec![b"x".to_vec()]
        };
        for p in &payloads {
            seq += 1;
            s.send(&publish(seq, &format!("devices/d1/h/{name}"), p))
                .await
                .unwrap();
            assert_eq!(
                until_ack(&mut s, seq).await,
                vec![GatewayMsg::Ack { seq }],
                "{name}: the event is acked"
            );
        }
        expected.insert(name.to_string(), (payloads.len(), reason));
    }
    assert!(gw.is_running(), "the gateway stays up");

    let letters = dead_letters(&gw);
    assert!(!letters.contains_key("counter"), "{letters:?}");
    for (name, (n, reason)) in &expected {
        let got = letters.get(name).cloned().unwrap_or_default();
        assert_eq!(got.len(), *n, "{name}: {got:?}");
        assert!(
            got.iter().all(|r| r.starts_with(reason)),
            "{name}: expected `{reason}`, got {got:?}"
        );
    }
    // Every import was named by one bad-pointer event each way.
    let named: std::collections::BTreeSet<&str> = letters["badptr"]
        .iter()
        .map(|r| r.trim_start_matches("trap:bad pointer or length in "))
        .collect();
    assert_eq!(
        named.into_iter().collect::<Vec<_>>(),
        [
            "config_get",
            "emit",
            "event_meta",
            "forward",
            "log",
            "state_delete",
            "state_get",
            "state_put"
        ]
    );

    let st = status(&gw);
    let m = &st["metrics"];
    let events = seq;
    let hostile_calls = expected.values().map(|(n, _)| *n as u64).sum::<u64>();
    assert_eq!(m["handler_errors"], hostile_calls, "{m}");
    let timeouts = expected
        .values()
        .filter(|(_, r)| *r == "limit:fuel")
        .count();
    assert_eq!(m["handler_timeouts"], timeouts as u64, "{m}");
    let burned: u64 = letters["spin"][0]
        .trim_start_matches("limit:fuel (")
        .trim_end_matches(" fuel burned)")
        .parse()
        .unwrap_or(0);
    assert!(
        burned > 990_000,
        "a timeout says what it burned (of 1,000,000): {:?}",
        letters["spin"]
    );
    assert_eq!(m["dead_letters"], hostile_calls, "{m}");
    assert_eq!(m["handler_calls"], events + hostile_calls, "{m}");
    assert!(m["log_bytes_dropped"].as_u64().unwrap() > 1 << 20, "{m}");
    assert_eq!(
        st["outbox"]["entries"], 0,
        "no forward of a failed invocation is kept"
    );
    assert!(st["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["quarantined"] == false));

    // The logger's text went to the gateway's log once: its first 4096 bytes, then the cap.
    let log = gw.stderr.lock().unwrap().clone();
    assert_eq!(
        log.matches("kvlocal/x").count(),
        1,
        "the log cap did not hold"
    );

    gw.stop();
    // The well-behaved handler saw every event; no hostile effect reached the store.
    assert_eq!(
        read_state(&gw.data(), "counter", b"n"),
        Some(events.to_le_bytes().to_vec())
    );
    for (name, _, _) in &handlers {
        assert_eq!(
            read_state(&gw.data(), name, b"k"),
            None,
            "{name} kept state"
        );
    }
}

/// Runs `tidepool invoke` on one event with `wasm`; returns (success, stderr).
fn invoke_module(dir: &std::path::Path, name: &str, wasm: &[u8]) -> (bool, String) {
    let wp = dir.join(format!("{name}.wasm"));
    let mp = dir.join(format!("{name}.toml"));
    let ev = dir.join("events.jsonl");
    std::fs::write(&wp, wasm).unwrap();
    std::fs::write(
        &mp,
        format!("name = \"{name}\"\nversion = 1\nsubscribe = [\"#\"]\n"),
    )
    .unwrap();
    std::fs::write(&ev, "{\"topic\":\"a/b\",\"payload\":\"x\"}\n").unwrap();
    let run = invoke(&wp, &mp, &ev, &[]);
    (run.ok, run.stderr)
}

#[test]
fn modules_that_break_the_abi_are_refused_at_load_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ok_exports = r#"(memory (export "memory") 1)
        (func (export "tp_alloc") (param i32) (result i32) (i32.const 0))
        (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32) (i32.const 0))"#;
    let cases = [
        (
            "wasi",
            format!(
                r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))) {ok_exports})"#
            ),
            "wasi_snapshot_preview1",
        ),
        (
            "start",
            format!(r#"(module (func $s) (start $s) {ok_exports})"#),
            "start",
        ),
        ("nothing", "(module)".to_string(), "missing export"),
        (
            "badsig",
            format!(
                r#"(module (import "tidepool" "forward" (func (param i32 i32 i32 i32) (result i32))) {ok_exports})"#
            ),
            "`tidepool`.`forward` has the wrong type",
        ),
        (
            "unknown",
            format!(r#"(module (import "tidepool" "exec" (func)) {ok_exports})"#),
            "`tidepool`.`exec` does not exist",
        ),
    ];
    for (name, wat, needle) in cases {
        let (ok, err) = invoke_module(dir.path(), name, &wat::parse_str(&wat).unwrap());
        assert!(!ok, "{name} was accepted");
        assert!(err.contains(needle), "{name}: `{needle}` not in: {err}");
    }
    let (ok, err) = invoke_module(dir.path(), "notwasm", b"\0asm garbage");
    assert!(!ok && err.contains("not a valid module"), "{err}");

    // The gateway skips such a handler at start, says which and why (log and status), and
    // serves the others.
    let gw_dir = tempfile::tempdir().unwrap();
    let entry = wat_handler(
        gw_dir.path(),
        "wasi",
        &format!(
            r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32))) {ok_exports})"#
        ),
        "",
    );
    let counter = wat_handler(
        gw_dir.path(),
        "counter",
        COUNTER_WAT,
        "subscribe = [\"devices/#\"]\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut gw = Gateway::start(&format!("{entry}{counter}"));
    let st = status(&gw);
    let skipped = st["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{st}");
    let why = skipped[0]["reason"].as_str().unwrap();
    assert!(why.contains("proc_exit"), "{why}");
    assert!(
        skipped[0]["source"]
            .as_str()
            .unwrap()
            .ends_with("wasi.toml"),
        "{st}"
    );
    let text = cli(&["status"], &gw.config);
    assert!(
        text.stdout.contains("NOT LOADED") && text.stdout.contains("wasi.toml"),
        "{}",
        text.stdout
    );
    rt.block_on(async {
        let d = gw.connect("d1").await;
        let mut s = d.open().await.unwrap();
        s.send(&publish(1, "devices/d1/x", b"1")).await.unwrap();
        until_ack(&mut s, 1).await;
        d.close().await;
    });
    gw.stop();
    assert_eq!(
        read_state(&gw.data(), "counter", b"n"),
        Some(1u64.to_le_bytes().to_vec()),
        "the other handler ran"
    );
}

/// A handler that burns most of its fuel on every event and succeeds (legal, never failing,
/// never quarantined), next to a counter on the same events. With its share of the wall clock
/// at 10%, its invocations past the share are refused (`limit:cpu_share`), the counter runs on
/// every event, and nothing is quarantined. Before the share, every one of them ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_over_its_cpu_share_is_refused_and_its_neighbour_runs() {
    hog_next_to_a_neighbour("cpu_percent = 10", 10, "ran more than 10% of the time").await;
}

/// The same with no share asked for: the box's default, the fair share, holds while the
/// device's events wait behind the hog and both handlers run (a third of the clock each).
/// Before it (share off by default) every one of the hog's calls ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_hog_gets_a_fair_share_once_handlers_contend() {
    hog_next_to_a_neighbour("", 0, "its fair share").await;
}

/// A hog (legal and slow) and a counter on the same 200 events, the hog's manifest limits plus
/// `hog_limits`: the hog is refused part of the time, its refusals are dead letters that name
/// the share, it is not quarantined for them, and the counter runs on every event.
async fn hog_next_to_a_neighbour(hog_limits: &str, percent: u64, reason: &str) {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let hog = slowed(
        r#"(module
  (memory (export "memory") 1)
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
    (i64.store (i32.const 16) (i64.const 0))
    (i32.const 0)))"#,
        400_000,
    );
    let config = format!(
        "{}{}",
        wat_handler(
            dir.path(),
            "hog",
            &hog,
            &format!("[limits]\nfuel_per_event = 10000000\n{hog_limits}")
        ),
        wat_handler(dir.path(), "counter", COUNTER_WAT, "")
    );
    let mut gw = Gateway::start(&config);
    let dev = gw.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    for seq in 1..=N {
        s.push(&publish(seq, "devices/d1/t", b"1"));
    }
    s.flush().await.unwrap();
    until_ack(&mut s, N).await;
    end_stream(s).await;
    let (hog, _) = handler_status(&gw, "hog");
    let refused = hog["cpu_refused"].as_u64().unwrap();
    assert!(refused > 0, "the hog was held to its share: {hog}");
    assert_eq!(hog["cpu_percent"], percent);
    assert_eq!(hog["quarantined"], false);
    assert_eq!(hog["quarantined_for"], serde_json::json!([]));
    let letters = dead_letters(&gw);
    assert_eq!(letters["hog"].len() as u64, refused);
    assert!(
        letters["hog"]
            .iter()
            .all(|r| r.starts_with("limit:cpu_share") && r.contains(reason)),
        "{:?}",
        &letters["hog"][..1]
    );
    assert!(!letters.contains_key("counter"));
    let m = gw.stop();
    assert_eq!(m["handler_cpu_refusals"].as_u64(), Some(refused), "{m}");
    assert_eq!(
        read_state(&gw.data(), "counter", b"n"),
        Some(N.to_le_bytes().to_vec()),
        "the neighbour ran on every event"
    );
}

/// A client config for `id` that pings every 200 ms and gives up on a gateway silent for 2 s
/// (QUIC stretches that to three probe timeouts, about 3 s on loopback).
fn impatient(gw: &Gateway, id: &str) -> quinn::ClientConfig {
    let (cert, key, ca) = gw.device_certs(id);
    let mut config = tidepool::ingress::tls::client_config(&ca, &cert, &key).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(200)));
    transport.max_idle_timeout(Some(Duration::from_secs(2).try_into().unwrap()));
    config.transport_config(std::sync::Arc::new(transport));
    config
}

#[tokio::test]
async fn a_handler_running_long_does_not_stop_the_network() {
    const CALLS: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let long = long_handler_for_d1(dir.path());
    // One tokio worker, as on a one-core box: a handler run on a runtime thread would leave
    // QUIC unanswered for as long as it runs.
    let gw = Gateway::start_with_env(&long, &[("TOKIO_WORKER_THREADS", "1")]);
    // d1 queues several long calls back to back.
    let (_d1, mut s1) = queue_long_calls(&gw, CALLS).await;
    let started = std::time::Instant::now();
    // While they run, d2 connects and publishes (to no handler): its handshake and its
    // keep-alives are answered, and its ack comes once the calls before it are done.
    let d2 = tidepool::client::Device::connect_with(&gw.addr, impatient(&gw, "d2"))
        .await
        .expect("the handshake completes while the handler runs");
    let mut s2 = d2.open().await.unwrap();
    s2.send(&publish(1, "devices/d2/x", b"1")).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(120), s2.next())
        .await
        .expect("an answer")
        .expect("the connection stays up while the handler runs");
    assert_eq!(answer, Some(GatewayMsg::Ack { seq: 1 }));
    let ticks = gw.stderr.lock().unwrap().matches("tick").count();
    eprintln!("d2 acked after {:?}, {ticks} calls done", started.elapsed());
    assert!(ticks >= 3, "the long calls ran meanwhile ({ticks})");
    until_ack(&mut s1, CALLS).await;
}
