//! The example handlers in `modules/examples/`, built for wasm32 by `scripts/build-handlers.sh`,
//! run through `tidepool invoke`: the real sandbox with the real limits and fuel, on events
//! in the JSON lines format.

mod support;

use std::path::{Path, PathBuf};
use support::invoke as run_invoke;

fn example(name: &str) -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules");
    let wasm = root.join(format!("target/wasm32-unknown-unknown/release/{name}.wasm"));
    assert!(
        wasm.exists(),
        "{} is missing: run scripts/build-handlers.sh (scripts/test.sh does)",
        wasm.display()
    );
    (wasm, root.join(format!("examples/{name}/{name}.toml")))
}

/// Runs `name` on `events` (JSON lines); returns (exit ok, one JSON object per line, stderr).
fn invoke(name: &str, events: &str, extra: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    let ev = dir.path().join("events.jsonl");
    std::fs::write(&ev, events).unwrap();
    let (wasm, manifest) = example(name);
    let run = run_invoke(&wasm, &manifest, &ev, &[&["--json"], extra].concat());
    (run.ok, run.json_lines(), run.stderr)
}

fn readings(topic: &str, device: &str, values: &[&str]) -> String {
    values
        .iter()
        .map(|v| {
            format!(
                "{{\"topic\":\"{topic}\",\"device\":\"{device}\",\"payload\":\"{{\\\"v\\\": {v}}}\"}}\n"
            )
        })
        .collect()
}

/// (class, topic, payload as JSON) of each line's forwards.
fn forwards(out: &[serde_json::Value]) -> Vec<Vec<(String, String, serde_json::Value)>> {
    out.iter()
        .map(|o| {
            assert_eq!(o["ok"], true, "{o}");
            o["forwards"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    (
                        f["class"].as_str().unwrap().to_string(),
                        f["topic"].as_str().unwrap().to_string(),
                        serde_json::from_str(f["payload"].as_str().unwrap()).unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

#[test]
fn threshold_alarms_on_crossing_and_clears_below_the_hysteresis_band() {
    let t = "devices/d1/temp";
    let (ok, out, err) = invoke(
        "threshold",
        &readings(t, "d1", &["21.5", "31.2", "32", "29.5", "28.9", "30.5"]),
        &[],
    );
    assert!(ok, "{err}");
    let f = forwards(&out);
    let alarm = |on: bool, v: f64| serde_json::json!({"alarm": on, "value": v, "threshold": 30, "device": "d1"});
    assert_eq!(f[0], vec![]);
    assert_eq!(f[1], vec![("urgent".into(), t.into(), alarm(true, 31.2))]);
    assert_eq!(f[2], vec![], "still above: no second alarm");
    assert_eq!(
        f[3],
        vec![],
        "29.5 is inside the band (threshold 30, hysteresis 1)"
    );
    assert_eq!(f[4], vec![("normal".into(), t.into(), alarm(false, 28.9))]);
    assert_eq!(f[5], vec![("urgent".into(), t.into(), alarm(true, 30.5))]);
    // One state read per event; a write only when the alarm state changes.
    let writes: Vec<usize> = out
        .iter()
        .map(|o| o["state"].as_array().unwrap().len())
        .collect();
    assert_eq!(writes, [0, 1, 0, 0, 1, 1]);
    let fuel = out[0]["fuel"].as_u64().unwrap();
    assert!(fuel < 20_000, "a quiet reading costs {fuel} fuel");

    // A bad payload fails its event (dead letter), and a bad config fails the load, saying why.
    let (ok, out, _) = invoke("threshold", &readings(t, "d1", &["\\\"hot\\\""]), &[]);
    assert!(ok);
    assert_eq!(out[0]["ok"], false);
    let (ok, _, err) = invoke(
        "threshold",
        &readings(t, "d1", &["1"]),
        &["--set", "threshold=warm"],
    );
    assert!(!ok);
    assert!(
        err.contains("tp_init") && err.contains("threshold"),
        "{err}"
    );
}

#[test]
fn deadband_forwards_only_moves_larger_than_delta_from_the_last_forwarded_value() {
    let t = "devices/d1/temp";
    let (ok, out, err) = invoke(
        "deadband",
        &readings(
            t,
            "d1",
            &["20.0", "20.3", "20.49", "20.6", "20.2", "19.9", "19.0"],
        ),
        &[],
    );
    assert!(ok, "{err}");
    let sent: Vec<bool> = forwards(&out).iter().map(|f| !f.is_empty()).collect();
    // 20.0 first; 20.6 moved 0.6 from 20.0; 20.2 and 19.9 are within 0.5 of 20.6... 19.9 is 0.7.
    assert_eq!(sent, [true, false, false, true, false, true, true]);
    let f = &forwards(&out)[3][0];
    assert_eq!((f.0.as_str(), f.1.as_str()), ("normal", t));
    assert_eq!(f.2, serde_json::json!({"v": 20.6}), "the original payload");
}

#[test]
fn window_forwards_each_finished_minute_per_device_as_bulk_and_the_timer_flushes_quiet_ones() {
    // Two devices; d1 sends in minute m and m+1, d2 only in minute m. Times from `ts`.
    let m = 1_700_000_040_000u64; // a minute boundary
    let ev = |dev: &str, ts: u64, v: &str| {
        format!(
            "{{\"topic\":\"devices/{dev}/temp\",\"device\":\"{dev}\",\"ts\":{ts},\"payload\":\"{{\\\"v\\\": {v}}}\"}}\n"
        )
    };
    let events = [
        ev("d1", m + 1_000, "20.5"),
        ev("d2", m + 2_000, "10"),
        ev("d1", m + 30_000, "22.0"),
        ev("d1", m + 61_000, "21.0"),
        // Far past both minutes on the gateway's clock: d2's quiet window and d1's second one.
        "{\"timer\": true, \"now_ms\": 4102444800000}\n".to_string(),
    ]
    .concat();
    let (ok, out, err) = invoke("window", &events, &[]);
    assert!(ok, "{err}");
    let f = forwards(&out);
    assert!(f[0].is_empty() && f[1].is_empty() && f[2].is_empty());
    assert_eq!(
        f[3],
        vec![(
            "bulk".to_string(),
            "windows/d1/temp".to_string(),
            serde_json::json!({"device": "d1", "metric": "temp", "start_ms": m, "end_ms": m + 60_000,
                "count": 2, "min": 20.5, "max": 22.0, "mean": 21.25})
        )]
    );
    let mut flushed: Vec<(String, u64)> = f[4]
        .iter()
        .map(|(class, topic, w)| {
            assert_eq!(class, "bulk");
            (topic.clone(), w["count"].as_u64().unwrap())
        })
        .collect();
    flushed.sort();
    assert_eq!(
        flushed,
        [
            ("windows/d1/temp".to_string(), 1),
            ("windows/d2/temp".to_string(), 1)
        ]
    );
}
