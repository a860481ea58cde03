//! Handler lifecycle against the real binary: quarantine after repeated failures, durable
//! timers across a restart, the `[record]` recording, and the developer loop around them
//! (`tidepool status`, `dead-letters export`, `invoke` replaying what the field wrote).

mod support;

use std::time::Duration;

use base64::Engine as _;
use support::*;
use tidepool::proto::msg::GatewayMsg;

/// Traps on every event whose payload starts with `x` and rejects (returns 1) the others, after
/// a state write that must never be stored.
const FAILING_WAT: &str = r#"(module
  (import "tidepool" "state_put" (func $put (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
    (drop (call $put (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1)))
    (if (i32.eq (i32.load8_u (local.get 2)) (i32.const 120)) (then unreachable))
    (i32.const 1)))"#;

/// Traps on payloads starting with `x`; succeeds on any other.
const TRAPPER_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
    (if (i32.eq (i32.load8_u (local.get 2)) (i32.const 120)) (then unreachable))
    (i32.const 0)))"#;

/// Forwards its `event_meta` map (CBOR) on `ticks` at every timer call.
const TICKER_WAT: &str = r#"(module
  (import "tidepool" "forward" (func $forward (param i32 i32 i32 i32 i32) (result i32)))
  (import "tidepool" "event_meta" (func $meta (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "ticks")
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32) (i32.const 0))
  (func (export "tp_on_timer") (param i64) (result i32)
    (local $n i32)
    (local.set $n (call $meta (i32.const 256) (i32.const 512)))
    (call $forward (i32.const 0) (i32.const 5) (i32.const 256) (local.get $n) (i32.const 0))))"#;

/// `tidepool invoke --json`, which must succeed: one JSON object per event.
fn invoke_json(
    wasm: &std::path::Path,
    manifest: &std::path::Path,
    events: &std::path::Path,
    extra: &[&str],
) -> Vec<serde_json::Value> {
    let run = invoke(wasm, manifest, events, &[&["--json"], extra].concat());
    assert!(run.ok, "{}", run.stderr);
    run.json_lines()
}

/// Publishes `payloads` from device `id` (above its mark) and waits for each ack.
async fn publish_from(gw: &Gateway, id: &str, payloads: &[&str]) {
    let dev = gw.connect(id).await;
    let mut s = dev.open().await.unwrap();
    s.send(&tidepool::proto::msg::DeviceMsg::Hello)
        .await
        .unwrap();
    let Some(GatewayMsg::Welcome { hwm, .. }) = next_msg(&mut s).await else {
        panic!("no welcome");
    };
    for (i, p) in payloads.iter().enumerate() {
        let seq = hwm + i as u64 + 1;
        s.send(&publish(seq, &format!("devices/{id}/t"), p.as_bytes()))
            .await
            .unwrap();
        until_ack(&mut s, seq).await;
    }
    end_stream(s).await;
    dev.close().await;
}

/// A device whose events keep trapping a handler takes the handler away from itself only:
/// another device's events still run it. When a run of failures with no success in between
/// spans three devices that are not held themselves, it is broken: quarantined for every
/// device.
#[tokio::test]
async fn one_device_that_traps_a_handler_loses_it_alone_and_three_lose_it_for_all() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[limits]\nquarantine_after_errors = 2\nquarantine_devices = 3\n{}{}",
        wat_handler(dir.path(), "failing", FAILING_WAT, ""),
        wat_handler(dir.path(), "counter", COUNTER_WAT, "")
    );
    let gw = Gateway::start(&config);
    // d1 traps it twice: quarantined for d1; d1's next event does not run it, d2's does.
    publish_from(&gw, "d1", &["x", "x", "r"]).await;
    publish_from(&gw, "d2", &["r"]).await;
    let (failing, m) = handler_status(&gw, "failing");
    assert_eq!(failing["quarantined_for"], serde_json::json!(["d1"]));
    assert_eq!(failing["quarantined"], false);
    assert_eq!(
        m["handler_calls"],
        2 + 2 + 1 + 2,
        "d2's event ran the handler, d1's third did not: {m}"
    );
    // One failure each from d2, d3 and d4, no success between: a run of failures spanning
    // three devices that are not held: quarantined for all (d5 included).
    publish_from(&gw, "d2", &["x"]).await;
    publish_from(&gw, "d3", &["x"]).await;
    publish_from(&gw, "d4", &["x"]).await;
    publish_from(&gw, "d5", &["r"]).await;
    let (failing, m) = handler_status(&gw, "failing");
    assert_eq!(failing["quarantined"], true, "{failing}");
    assert_eq!(m["handler_device_quarantines"], 1, "{m}");
    assert_eq!(m["handlers_quarantined"], 1, "{m}");
    assert_eq!(
        m["handler_calls"],
        7 + 2 + 2 + 2 + 1,
        "d5's event did not run it: {m}"
    );
    let text = cli(&["status"], &gw.config).stdout;
    assert!(
        text.contains("handler failing v1: QUARANTINED for every device"),
        "{text}"
    );
}

/// The devices the `trapper` handler is quarantined for.
fn trapper_held(gw: &Gateway) -> serde_json::Value {
    handler_status(gw, "trapper").0["quarantined_for"].clone()
}

/// A quarantine survives a restart (before: a restart ran the handler again at once), and
/// ends with a trial: with a short hold, the next event runs it, and a success releases it.
#[tokio::test]
async fn a_quarantine_survives_a_restart_and_ends_with_a_trial() {
    let dir = tempfile::tempdir().unwrap();
    let trapper = wat_handler(dir.path(), "trapper", TRAPPER_WAT, "");
    let mut gw = Gateway::start(&format!(
        "[limits]\nquarantine_after_errors = 2\nquarantine_hold_ms = 3600000\n{trapper}"
    ));
    publish_from(&gw, "d1", &["x", "x"]).await;
    assert_eq!(trapper_held(&gw), serde_json::json!(["d1"]));
    gw.restart();
    assert_eq!(
        trapper_held(&gw),
        serde_json::json!(["d1"]),
        "held after the restart"
    );
    publish_from(&gw, "d1", &["ok"]).await;
    let m = gw.stop();
    assert_eq!(m["handler_calls"], 0, "d1's event did not run it: {m}");
    assert_eq!(m["dead_letters"], 1, "{m}");

    // Holds of 1 ms from now on (d1's stays as it was set): d2's next event after its
    // quarantine is its trial, and it passes.
    gw.edit_config("quarantine_hold_ms", "quarantine_hold_ms = 1");
    gw.restart();
    publish_from(&gw, "d2", &["x", "x"]).await;
    assert_eq!(trapper_held(&gw), serde_json::json!(["d1", "d2"]));
    publish_from(&gw, "d2", &["ok"]).await;
    assert_eq!(trapper_held(&gw), serde_json::json!(["d1"]), "d2 released");
    publish_from(&gw, "d2", &["ok"]).await;
    let m = gw.stop();
    assert_eq!(m["handler_calls"], 4, "{m}");
    assert_eq!(m["dead_letters"], 2, "the two traps: {m}");
}

#[tokio::test]
async fn a_handler_failing_again_and_again_is_quarantined_and_its_dead_letters_replay_locally() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[limits]\nquarantine_after_errors = 3\n{}{}",
        wat_handler(dir.path(), "failing", FAILING_WAT, ""),
        wat_handler(dir.path(), "counter", COUNTER_WAT, "")
    );
    let mut gw = Gateway::start(&config);
    let dev = gw.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    // Rejections (bad input) never quarantine; traps do, three in a row.
    let payloads = ["r", "r", "r", "r", "x1", "x2", "x3", "x4", "x5"];
    for (i, p) in payloads.iter().enumerate() {
        let seq = i as u64 + 1;
        s.send(&publish(seq, "devices/d1/t", p.as_bytes()))
            .await
            .unwrap();
        assert_eq!(until_ack(&mut s, seq).await, vec![GatewayMsg::Ack { seq }]);
    }
    let (failing, m) = handler_status(&gw, "failing");
    // One device failed it: quarantined for that device (the only one here).
    assert_eq!(failing["quarantined"], false, "{failing}");
    assert_eq!(
        failing["quarantined_for"],
        serde_json::json!(["d1"]),
        "{failing}"
    );
    assert_eq!(m["handler_device_quarantines"], 1, "{m}");
    assert_eq!(m["handlers_quarantined"], 0, "{m}");
    assert_eq!(
        m["handler_calls"],
        9 + 7,
        "the quarantined handler stopped running: {m}"
    );
    assert_eq!(
        m["dead_letters"], 9,
        "its events still go to the dead letters: {m}"
    );
    let text = cli(&["status"], &gw.config).stdout;
    assert!(text.contains("handler failing v1: QUARANTINED"), "{text}");

    let export = dir.path().join("dl.jsonl");
    let run = cli(
        &["dead-letters", "export", "--out", export.to_str().unwrap()],
        &gw.config,
    );
    assert!(
        run.ok && run.stderr.contains("9 dead letters exported"),
        "{}",
        run.stderr
    );

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let reasons: Vec<&str> = lines
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    let trap = "trap:wasm `unreachable` instruction executed";
    let q = "quarantined for device `d1`: 3 failures in a row";
    assert_eq!(
        reasons,
        [&["handler returned 1"; 4][..], &[trap; 3], &[q; 2]].concat()
    );
    assert_eq!(lines[8]["device"], "d1");
    assert_eq!(lines[8]["seq"], 9);
    assert_eq!(lines[8]["payload"], "x5");

    let log = gw.stderr.lock().unwrap().clone();
    assert_eq!(log.matches("handler quarantined").count(), 1, "logged once");
    gw.stop();
    assert_eq!(read_state(&gw.data(), "failing", b"\0"), None);
    assert_eq!(
        read_state(&gw.data(), "counter", b"n"),
        Some(9u64.to_le_bytes().to_vec())
    );

    // The exported letters replay on a laptop and fail the same way.
    let out = invoke_json(
        &dir.path().join("failing.wasm"),
        &dir.path().join("failing.toml"),
        &export,
        &[],
    );
    let errors: Vec<&str> = out.iter().map(|o| o["error"].as_str().unwrap()).collect();
    assert_eq!(
        errors,
        [&["handler returned 1"; 4][..], &[trap; 5]].concat()
    );
}

/// The `event_meta` maps the ticker forwarded, in delivery order.
fn ticks(reqs: &[Request]) -> Vec<(String, serde_json::Map<String, serde_json::Value>)> {
    let mut out = Vec::new();
    for r in reqs {
        for e in r.json()["events"].as_array().unwrap() {
            let cbor = base64::engine::general_purpose::STANDARD
                .decode(e["payload_b64"].as_str().unwrap())
                .unwrap();
            let v: serde_json::Value = ciborium::from_reader(&cbor[..]).unwrap();
            let id = e["id"].as_str().unwrap().to_string();
            if !out.iter().any(|(i, _)| *i == id) {
                out.push((id, v.as_object().unwrap().clone()));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_timer_that_fell_due_while_the_gateway_was_down_fires_once_late_and_keeps_its_phase() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(|_| 200).await;
    let config = format!(
        "[limits]\nmin_timer_ms = 100\n[uplink]\nurl = \"{}\"\n[outbox]\nlinger_ms = 50\n{}",
        cloud.url,
        wat_handler(dir.path(), "ticker", TICKER_WAT, "timer_ms = 300")
    );
    let mut gw = Gateway::start(&config);
    let n = |r: &[Request]| ticks(r).len();
    let before = cloud
        .wait_until(Duration::from_secs(5), |r| n(r) >= 2)
        .await;
    let t = ticks(&before);
    assert!(t.len() >= 2, "two ticks within 5 s: {t:?}");
    let due = |m: &serde_json::Map<String, serde_json::Value>| m["due_ms"].as_u64().unwrap();
    assert_eq!(t[0].1["timer"], true);
    assert_eq!(due(&t[1].1) - due(&t[0].1), 300, "{t:?}");
    assert!(
        t[0].0.contains(":timer."),
        "timer entry ids name the due time: {}",
        t[0].0
    );

    gw.stop();
    // The box is off for four periods or more.
    std::thread::sleep(Duration::from_millis(1300));
    let restarted_ms = tidepool::clock::now_ms();
    gw.restart();
    // The ticks that fired after the restart (a tick that fired while the gateway was
    // stopping may reach the cloud after it, from the outbox).
    let fired_after = |r: &[Request]| {
        ticks(r)
            .into_iter()
            .filter(|(_, m)| m["now_ms"].as_u64().unwrap() >= restarted_ms)
            .collect::<Vec<_>>()
    };
    let after = cloud
        .wait_until(Duration::from_secs(5), |r| fired_after(r).len() >= 2)
        .await;
    let t = fired_after(&after);
    let (first, second) = (&t[0].1, &t[1].1);
    assert!(
        first["late_ms"].as_u64().unwrap() >= 1000,
        "the missed tick fires late, and says so: {first:?}"
    );
    assert!(due(first) < restarted_ms);
    assert!(
        due(second) + 50 >= restarted_ms,
        "missed periods are not fired one by one: {second:?} (restart at {restarted_ms})"
    );
    assert_eq!((due(second) - due(first)) % 300, 0, "the phase is kept");
    gw.stop();
}

#[tokio::test]
async fn recorded_events_replay_with_invoke_and_state_dir_keeps_state_between_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[record]\ntopics = [\"devices/+/temp\"]\n{}",
        wat_handler(dir.path(), "counter", COUNTER_WAT, "")
    );
    let mut gw = Gateway::start(&config);
    let dev = gw.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    let sent: [(&str, &[u8]); 3] = [
        ("devices/d1/temp", br#"{"v": 21.5}"#),
        ("devices/d1/hum", b"55"),
        ("devices/d1/temp", &[0xff, 0x00]),
    ];
    for (i, (t, p)) in sent.iter().enumerate() {
        let seq = i as u64 + 1;
        s.send(&publish(seq, t, p)).await.unwrap();
        until_ack(&mut s, seq).await;
    }
    let m = gw.stop();
    assert_eq!(m["recorded"], 2, "{m}");
    let rec = gw.data().join("record/events.jsonl");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&rec)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["payload"], r#"{"v": 21.5}"#);
    assert_eq!(lines[0]["device"], "d1");
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[1]["payload_b64"], "/wA=");

    // Replay the recording twice into one state dir: the count goes on from the last run.
    let state = dir.path().join("state");
    let (wasm, manifest) = (
        dir.path().join("counter.wasm"),
        dir.path().join("counter.toml"),
    );
    let run1 = invoke_json(
        &wasm,
        &manifest,
        &rec,
        &["--state-dir", state.to_str().unwrap()],
    );
    assert_eq!(run1.len(), 2);
    let run2 = invoke_json(
        &wasm,
        &manifest,
        &rec,
        &["--state-dir", state.to_str().unwrap()],
    );
    assert_eq!(run2[1]["state"][0]["key"], "n");
    assert_eq!(
        run2[1]["state"][0]["value"],
        format!("0x{}", "04".to_string() + &"00".repeat(7))
    );
    assert!(run2[1]["fuel"].as_u64().unwrap() > 0);
    // Without a state dir every run starts empty.
    let fresh = invoke_json(&wasm, &manifest, &rec, &[]);
    assert_eq!(
        fresh[0]["state"][0]["value"],
        format!("0x01{}", "00".repeat(7))
    );
}

#[test]
fn invoke_refuses_a_bad_events_file_with_the_line_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    wat_handler(dir.path(), "counter", COUNTER_WAT, "");
    let ev = dir.path().join("bad.jsonl");
    std::fs::write(
        &ev,
        "{\"topic\":\"a/b\",\"payload\":\"1\"}\n{\"payload\":\"no topic\"}\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let run = invoke(
        &dir.path().join("counter.wasm"),
        &dir.path().join("counter.toml"),
        &ev,
        &["--state-dir", state.to_str().unwrap()],
    );
    let err = &run.stderr;
    assert_eq!(run.code, Some(2), "{err}");
    assert!(
        err.contains("bad.jsonl line 2") && err.contains("topic"),
        "{err}"
    );
    assert!(run.stdout.is_empty());
    assert!(!state.exists(), "nothing ran, nothing was created");

    // A topic the gateway would nack is bad input too, found before anything runs.
    std::fs::write(
        &ev,
        "{\"topic\":\"a/b\",\"payload\":\"1\"}\n{\"topic\":\"a/#\",\"payload\":\"1\"}\n",
    )
    .unwrap();
    let run = invoke(
        &dir.path().join("counter.wasm"),
        &dir.path().join("counter.toml"),
        &ev,
        &["--state-dir", state.to_str().unwrap()],
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("line 2: topic `a/#`"), "{}", run.stderr);
    assert!(!state.exists());
}

#[test]
fn invoke_runs_timer_ticks_and_tells_the_handler_how_late_they_are() {
    let dir = tempfile::tempdir().unwrap();
    wat_handler(dir.path(), "ticker", TICKER_WAT, "timer_ms = 60000");
    let ev = dir.path().join("ticks.jsonl");
    // As `dead-letters export` writes a failed timer call: when it ran, and when it was due.
    std::fs::write(
        &ev,
        "{\"timer\":true,\"now_ms\":1700000005000,\"due_ms\":1700000004000}\n{\"timer\":true,\"now_ms\":1700000009000}\n",
    )
    .unwrap();
    let out = invoke_json(
        &dir.path().join("ticker.wasm"),
        &dir.path().join("ticker.toml"),
        &ev,
        &[],
    );
    let meta: Vec<serde_json::Value> = out
        .iter()
        .map(|o| {
            let hex = o["forwards"][0]["payload"].as_str().unwrap();
            let bytes: Vec<u8> = (2..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            ciborium::from_reader(&bytes[..]).unwrap()
        })
        .collect();
    assert_eq!(meta[0]["late_ms"], 1000);
    assert_eq!(meta[0]["due_ms"], 1_700_000_004_000u64);
    assert_eq!(meta[1]["late_ms"], 0, "no due_ms: due now");
}

#[tokio::test]
async fn a_new_timer_keeps_its_first_due_time_across_a_quick_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(|_| 200).await;
    let config = format!(
        "[limits]\nmin_timer_ms = 100\n[uplink]\nurl = \"{}\"\n[outbox]\nlinger_ms = 50\n{}",
        cloud.url,
        wat_handler(dir.path(), "ticker", TICKER_WAT, "timer_ms = 2000")
    );
    let first_start = tidepool::clock::now_ms();
    let mut gw = Gateway::start(&config);
    gw.stop();
    // Down for a moment, well within the period: a schedule set only at the first firing
    // would restart from here, and a box rebooting more often than the period never fires.
    std::thread::sleep(Duration::from_millis(500));
    let restart = tidepool::clock::now_ms();
    gw.restart();
    let reqs = cloud
        .wait_until(Duration::from_secs(5), |r| !ticks(r).is_empty())
        .await;
    let t = ticks(&reqs);
    let due = t[0].1["due_ms"].as_u64().unwrap();
    assert!(
        due < restart + 2000 - 300,
        "due {due}: set at the first start ({first_start}), not at the restart ({restart})"
    );
    assert!(due >= first_start + 2000);
    gw.stop();
}

#[tokio::test]
async fn the_dead_letter_store_keeps_the_newest_letters_within_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[store]\ndead_letter_max_bytes = 1000\n{}",
        wat_handler(dir.path(), "failing", FAILING_WAT, "")
    );
    let gw = Gateway::start(&config);
    let dev = gw.connect("d1").await;
    let mut s = dev.open().await.unwrap();
    for seq in 1..=20u64 {
        s.send(&publish(seq, "devices/d1/t", format!("r{seq}").as_bytes()))
            .await
            .unwrap();
        until_ack(&mut s, seq).await;
    }
    let run = cli(&["dead-letters", "export"], &gw.config);
    assert!(run.ok, "{}", run.stderr);
    let letters = run.json_lines();
    // Each letter is over 100 bytes of CBOR: 1000 bytes hold a few, never all 20.
    assert!(
        (2..20).contains(&letters.len()),
        "{} letters kept",
        letters.len()
    );
    assert_eq!(letters.last().unwrap()["seq"], 20, "the newest is kept");
    let seqs: Vec<u64> = letters.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "the oldest went: {seqs:?}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&cli(&["status", "--json"], &gw.config).stdout).unwrap();
    assert_eq!(
        st["metrics"]["dead_letters_dropped"],
        20 - letters.len() as u64,
        "{st}"
    );
}
