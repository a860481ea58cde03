//! The threshold handler's logic, free of host calls: its config, the hysteresis decision and
//! the alarm message.

use alloc::format;
use alloc::string::String;

use tidepool_sdk::json;

/// The handler's config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// A reading above this raises the alarm.
    pub threshold: f64,
    /// `threshold` as written in the config (a JSON number), for the messages.
    pub threshold_text: String,
    /// The alarm clears when a reading falls below `threshold - hysteresis` (at least 0).
    pub hysteresis: f64,
    /// The payload's JSON key holding the reading.
    pub field: String,
}

impl Config {
    /// Reads the config through `get` (the manifest's `[config]` with the box's overrides):
    /// `threshold` (required), `hysteresis` (default 0), `field` (default `v`). The error
    /// says what is wrong.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let number = |key: &str, default: &str| {
            let text = match get(key) {
                Some(text) => String::from(text.trim()),
                None if !default.is_empty() => String::from(default),
                None => return Err(format!("config `{key}` is required")),
            };
            match text.parse::<f64>() {
                Ok(n) if n.is_finite() && json::is_number(&text) => Ok((n, text)),
                _ => Err(format!(
                    "config `{key}` = `{text}` is not a finite JSON number"
                )),
            }
        };
        let (threshold, threshold_text) = number("threshold", "")?;
        let (hysteresis, text) = number("hysteresis", "0")?;
        if hysteresis < 0.0 {
            return Err(format!("config `hysteresis` = `{text}` is negative"));
        }
        let field = get("field").unwrap_or_else(|| String::from("v"));
        Ok(Config {
            threshold,
            threshold_text,
            hysteresis,
            field,
        })
    }
}

/// A change of a topic's alarm state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The reading rose above the threshold while not alarmed.
    Raise,
    /// The reading fell below `threshold - hysteresis` while alarmed.
    Clear,
}

/// What `reading` does to a topic that is `alarmed` or not; `None` leaves it as it is.
pub fn decide(cfg: &Config, alarmed: bool, reading: f64) -> Option<Change> {
    if !alarmed && reading > cfg.threshold {
        Some(Change::Raise)
    } else if alarmed && reading < cfg.threshold - cfg.hysteresis {
        Some(Change::Clear)
    } else {
        None
    }
}

/// The forwarded JSON, e.g. `{"alarm":true,"value":31.2,"threshold":30,"device":"d1"}`.
/// `value` is the reading's text from the payload and `threshold` the config's, both JSON
/// numbers copied as written (no float formatting, which would add 16 KB to the module);
/// `device` is a device id, `[A-Za-z0-9._-]`, so it needs no escaping.
pub fn message(change: Change, reading: &str, cfg: &Config, device: &str) -> String {
    let alarm = change == Change::Raise;
    let threshold = &cfg.threshold_text;
    format!(r#"{{"alarm":{alarm},"value":{reading},"threshold":{threshold},"device":"{device}"}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, String> {
        let map: BTreeMap<_, _> = pairs.iter().copied().collect();
        Config::parse(|k| map.get(k).map(|v| String::from(*v)))
    }

    fn cfg(threshold: f64, hysteresis: f64) -> Config {
        Config {
            threshold,
            threshold_text: alloc::format!("{threshold}"),
            hysteresis,
            field: "v".into(),
        }
    }

    #[test]
    fn config_defaults_and_errors() {
        assert_eq!(parse(&[("threshold", " 30 ")]), Ok(cfg(30.0, 0.0)));
        let c = parse(&[
            ("threshold", "-5.5"),
            ("hysteresis", "1"),
            ("field", "temp"),
        ])
        .unwrap();
        assert_eq!(
            (c.threshold, c.hysteresis, c.field.as_str()),
            (-5.5, 1.0, "temp")
        );
        assert_eq!(parse(&[]), Err("config `threshold` is required".into()));
        for bad in ["hot", "inf", "NaN", "1e999", "", "+30", ".5", "30."] {
            assert!(parse(&[("threshold", bad)]).is_err(), "{bad}");
        }
        assert!(parse(&[("threshold", "30"), ("hysteresis", "-1")]).is_err());
        assert!(parse(&[("threshold", "30"), ("hysteresis", "x")]).is_err());
    }

    /// Feeds `readings` through `decide` from "not alarmed", keeping the state as the handler
    /// does, and returns the changes.
    fn run(c: &Config, readings: &[f64]) -> alloc::vec::Vec<(f64, Change)> {
        let mut alarmed = false;
        let mut out = alloc::vec::Vec::new();
        for &r in readings {
            if let Some(change) = decide(c, alarmed, r) {
                alarmed = change == Change::Raise;
                out.push((r, change));
            }
        }
        out
    }

    #[test]
    fn raises_on_crossing_and_clears_below_the_band() {
        let c = cfg(30.0, 2.0);
        assert_eq!(
            run(
                &c,
                &[21.5, 30.0, 31.5, 32.0, 29.0, 28.0, 30.5, 27.9, 27.0, 31.0]
            ),
            [
                (31.5, Change::Raise),
                (27.9, Change::Clear),
                (31.0, Change::Raise)
            ]
        );
    }

    #[test]
    fn without_hysteresis_it_clears_below_the_threshold_and_not_at_it() {
        let c = cfg(30.0, 0.0);
        assert_eq!(
            run(&c, &[31.0, 30.0, 30.5, 29.99, 30.0, 30.01]),
            [
                (31.0, Change::Raise),
                (29.99, Change::Clear),
                (30.01, Change::Raise)
            ]
        );
        // The first reading counts as a crossing if it is already high.
        assert_eq!(decide(&c, false, 40.0), Some(Change::Raise));
        assert_eq!(decide(&c, true, 40.0), None);
    }

    #[test]
    fn messages_are_json() {
        let c = parse(&[("threshold", " 30 ")]).unwrap();
        assert_eq!(
            message(Change::Raise, "31.2", &c, "d1"),
            r#"{"alarm":true,"value":31.2,"threshold":30,"device":"d1"}"#
        );
        let c = parse(&[("threshold", "1e-7")]).unwrap();
        assert_eq!(
            message(Change::Clear, "-0.50", &c, "dev-1"),
            r#"{"alarm":false,"value":-0.50,"threshold":1e-7,"device":"dev-1"}"#
        );
    }
}
