//! The window handler's logic, free of host calls: its config, one series' per-minute window,
//! the summary it forwards, and the timer's sweep over the index of open windows.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

/// Length of a window.
pub const MINUTE_MS: u64 = 60_000;
/// How long after a window's end (mapped to the gateway's clock) the timer waits for late
/// events before it flushes the window.
pub const GRACE_MS: u64 = 5_000;

/// The handler's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The payload's JSON key holding the reading.
    pub field: String,
    /// The most series one timer call looks at, so the most windows it forwards: keep it at
    /// most the manifest's `forwards_per_event`.
    pub sweep_max: usize,
}

impl Config {
    /// Reads the config through `get`: `field` (default `v`) and `sweep_max` (an integer >= 1,
    /// default 16). The error says what is wrong.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let field = get("field").unwrap_or_else(|| String::from("v"));
        let sweep_max = match get("sweep_max") {
            None => 16,
            Some(text) => match text.trim().parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(format!(
                        "config `sweep_max` = `{text}` is not an integer >= 1"
                    ))
                }
            },
        };
        Ok(Config { field, sweep_max })
    }
}

/// One series' open window, kept in state as CBOR. `minute` is the event time in minutes since
/// the Unix epoch; `skew_ms` maps event time to the gateway's clock (`received_ms` minus the
/// event time, of the latest event), so the timer can tell when the window is over even if
/// the device's clock is off.
///
/// Stored as the CBOR array `[minute, count, min, max, sum, skew_ms]` rather than a map with
/// field names: the names would cost about 19k more fuel per event to write and read back.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "Packed", into = "Packed")]
pub struct Window {
    /// Event time in minutes since the Unix epoch.
    pub minute: u64,
    /// Readings so far (at least 1).
    pub count: u64,
    /// Smallest reading.
    pub min: f64,
    /// Largest reading.
    pub max: f64,
    /// Sum of the readings, for the mean.
    pub sum: f64,
    /// Gateway time minus event time of the latest event, in ms.
    pub skew_ms: i64,
}

/// [`Window`] as it is stored: a tuple struct, which serde writes as an array.
#[derive(Serialize, Deserialize)]
struct Packed(u64, u64, f64, f64, f64, i64);

impl From<Packed> for Window {
    fn from(Packed(minute, count, min, max, sum, skew_ms): Packed) -> Window {
        Window {
            minute,
            count,
            min,
            max,
            sum,
            skew_ms,
        }
    }
}

impl From<Window> for Packed {
    fn from(w: Window) -> Packed {
        Packed(w.minute, w.count, w.min, w.max, w.sum, w.skew_ms)
    }
}

impl Window {
    fn new(minute: u64, reading: f64, skew_ms: i64) -> Window {
        Window {
            minute,
            count: 1,
            min: reading,
            max: reading,
            sum: reading,
            skew_ms,
        }
    }

    fn add(&mut self, reading: f64, skew_ms: i64) {
        self.count += 1;
        self.min = self.min.min(reading);
        self.max = self.max.max(reading);
        self.sum += reading;
        self.skew_ms = skew_ms;
    }

    /// Whether the window is over at gateway time `now_ms`: its end, mapped to the gateway's
    /// clock, plus [`GRACE_MS`], has passed.
    pub fn is_over(&self, now_ms: u64) -> bool {
        let end = i128::from(self.minute + 1) * i128::from(MINUTE_MS);
        i128::from(now_ms) >= end + i128::from(self.skew_ms) + i128::from(GRACE_MS)
    }

    /// The forwarded summary of this window for `series` (`<device>/<metric>`).
    pub fn summary<'a>(&self, series: &'a str) -> Summary<'a> {
        let (device, metric) = series.split_once('/').unwrap_or((series, ""));
        let start_ms = self.minute * MINUTE_MS;
        Summary {
            device,
            metric,
            start_ms,
            end_ms: start_ms + MINUTE_MS,
            count: self.count,
            min: self.min,
            max: self.max,
            mean: self.sum / self.count as f64,
        }
    }
}

/// Adds a reading at event time `time_ms`, received at gateway time `received_ms`, to the open
/// window (if any). Returns the window to store and, when the reading starts a new minute, the
/// finished one to forward. A reading from any other minute than the open window's (a later
/// one, or an earlier one after a clock jump or a resend) closes it.
pub fn record(
    open: Option<Window>,
    time_ms: u64,
    received_ms: u64,
    reading: f64,
) -> (Window, Option<Window>) {
    let minute = time_ms / MINUTE_MS;
    let skew_ms = i64::try_from(i128::from(received_ms) - i128::from(time_ms)).unwrap_or(0);
    match open {
        Some(mut w) if w.minute == minute => {
            w.add(reading, skew_ms);
            (w, None)
        }
        other => (Window::new(minute, reading, skew_ms), other),
    }
}

/// The forwarded JSON, e.g. `{"device":"d1","metric":"temp","start_ms":1700000040000,
/// "end_ms":1700000100000,"count":3,"min":20.5,"max":22.0,"mean":21.25}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary<'a> {
    /// The device id (from the event metadata).
    pub device: &'a str,
    /// The last level of the topic the readings came on.
    pub metric: &'a str,
    /// The window's start, event time in ms since the Unix epoch (a whole minute).
    pub start_ms: u64,
    /// `start_ms` + 60000 (exclusive).
    pub end_ms: u64,
    /// How many readings.
    pub count: u64,
    /// Smallest reading.
    pub min: f64,
    /// Largest reading.
    pub max: f64,
    /// Mean of the readings (`sum / count`).
    pub mean: f64,
}

/// The series of an event: `<device>/<the topic's last level>`, e.g. `d1/temp` for `d1`
/// publishing on `devices/d1/temp`.
pub fn series(device: &str, topic: &str) -> String {
    let metric = topic.rsplit('/').next().unwrap_or(topic);
    format!("{device}/{metric}")
}

/// Looks at up to `max` series from the front of `index`: those for which `done` returns true
/// are dropped, the others move to the back, so successive sweeps go round the whole index.
/// Returns whether the index changed.
pub fn sweep<E>(
    index: &mut Vec<String>,
    max: usize,
    mut done: impl FnMut(&str) -> Result<bool, E>,
) -> Result<bool, E> {
    let n = max.min(index.len());
    let unseen = index.len() - n;
    let (mut dropped, mut kept) = (false, false);
    for s in index.drain(..n).collect::<Vec<_>>() {
        if done(&s)? {
            dropped = true;
        } else {
            kept = true;
            index.push(s);
        }
    }
    Ok(dropped || (kept && unseen > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec;

    const T0: u64 = 1_700_000_040_000; // a minute boundary

    #[test]
    fn config_defaults_and_errors() {
        let map: BTreeMap<&str, &str> = BTreeMap::new();
        let c = Config::parse(|k| map.get(k).map(|v| String::from(*v))).unwrap();
        assert_eq!((c.field.as_str(), c.sweep_max), ("v", 16));
        let c = Config::parse(|k| match k {
            "field" => Some("level".into()),
            _ => Some(" 4 ".into()),
        });
        assert_eq!(c.unwrap().sweep_max, 4);
        for bad in ["0", "-1", "x", "1.5"] {
            assert!(Config::parse(|k| (k == "sweep_max").then(|| bad.into())).is_err());
        }
    }

    #[test]
    fn aggregates_a_minute_and_rolls_over_on_the_next() {
        let (w, done) = record(None, T0 + 1_000, T0 + 1_000, 21.0);
        assert_eq!(done, None);
        let (w, done) = record(Some(w), T0 + 30_000, T0 + 30_000, 19.5);
        assert_eq!(done, None);
        let (w, done) = record(Some(w), T0 + 59_999, T0 + 59_999, 23.0);
        assert_eq!(done, None);
        assert_eq!((w.count, w.min, w.max, w.sum), (3, 19.5, 23.0, 63.5));

        let (next, done) = record(Some(w), T0 + 60_000, T0 + 60_000, 22.0);
        assert_eq!(done, Some(w));
        assert_eq!(
            (next.minute, next.count, next.sum),
            (T0 / MINUTE_MS + 1, 1, 22.0)
        );
        assert_eq!(
            w.summary("d1/temp"),
            Summary {
                device: "d1",
                metric: "temp",
                start_ms: T0,
                end_ms: T0 + 60_000,
                count: 3,
                min: 19.5,
                max: 23.0,
                mean: 63.5 / 3.0,
            }
        );
    }

    #[test]
    fn an_earlier_minute_closes_the_open_window_too() {
        let (w, _) = record(None, T0 + 61_000, T0 + 61_000, 1.0);
        let (old, done) = record(Some(w), T0 + 5_000, T0 + 62_000, 2.0);
        assert_eq!(done, Some(w));
        assert_eq!(old.minute, T0 / MINUTE_MS);
    }

    #[test]
    fn a_window_is_over_after_its_end_on_the_gateway_clock_plus_grace() {
        // Gateway time only (no device ts): skew 0.
        let (w, _) = record(None, T0 + 10_000, T0 + 10_000, 1.0);
        assert!(!w.is_over(T0 + MINUTE_MS + GRACE_MS - 1));
        assert!(w.is_over(T0 + MINUTE_MS + GRACE_MS));
        // The device's clock is 2 h behind the gateway's: its minute ends 2 h later for us.
        let behind = 2 * 3_600_000;
        let (w, _) = record(None, T0 + 10_000, T0 + 10_000 + behind, 1.0);
        assert!(!w.is_over(T0 + MINUTE_MS + GRACE_MS));
        assert!(w.is_over(T0 + behind + MINUTE_MS + GRACE_MS));
        // A device clock ahead of the gateway's (a device sending ts = 0-based uptime works too).
        let (w, _) = record(None, 5_000, T0, 1.0);
        assert!(!w.is_over(T0 + 55_000 + GRACE_MS - 1));
        assert!(w.is_over(T0 + 55_000 + GRACE_MS));
    }

    #[test]
    fn series_names_use_the_topics_last_level() {
        assert_eq!(series("d1", "devices/d1/temp"), "d1/temp");
        assert_eq!(series("d1", "temp"), "d1/temp");
        assert_eq!(Window::new(0, 1.0, 0).summary("d1/a.b").metric, "a.b");
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| String::from(*s)).collect()
    }

    #[test]
    fn sweeps_go_round_the_index_and_drop_what_is_done() {
        let mut index = names(&["a", "b", "c", "d", "e"]);
        let mut seen = Vec::new();
        let changed = sweep(&mut index, 2, |s| {
            seen.push(String::from(s));
            Ok::<_, ()>(s == "b")
        });
        assert_eq!(changed, Ok(true));
        assert_eq!(seen, ["a", "b"]);
        assert_eq!(index, names(&["c", "d", "e", "a"]));

        let changed = sweep(&mut index, 3, |_| Ok::<_, ()>(false));
        assert_eq!(changed, Ok(true)); // rotated
        assert_eq!(index, names(&["a", "c", "d", "e"]));

        // Looking at the whole index without dropping anything leaves it as it was.
        let changed = sweep(&mut index, 10, |_| Ok::<_, ()>(false));
        assert_eq!(changed, Ok(false));
        assert_eq!(index, names(&["a", "c", "d", "e"]));

        assert_eq!(sweep(&mut index, 10, |s| Ok::<_, ()>(s != "d")), Ok(true));
        assert_eq!(index, vec![String::from("d")]);
        assert_eq!(sweep(&mut index, 1, |_| Err("boom")), Err("boom"));
    }

    #[test]
    fn windows_and_summaries_encode() {
        let w = Window::new(T0 / MINUTE_MS, 20.5, -3);
        let cbor = tidepool_sdk::cbor::encode(&w).unwrap();
        assert_eq!(cbor[0], 0x86, "an array of 6");
        assert_eq!(tidepool_sdk::cbor::decode::<Window>(&cbor), Ok(w));
        let json = tidepool_sdk::json::encode(&w.summary("d1/temp")).unwrap();
        assert_eq!(
            core::str::from_utf8(&json).unwrap(),
            r#"{"device":"d1","metric":"temp","start_ms":1700000040000,"end_ms":1700000100000,"count":1,"min":20.5,"max":20.5,"mean":20.5}"#
        );
    }
}
