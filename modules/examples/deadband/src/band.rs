//! The dead-band handler's logic, free of host calls: its config and the forward decision.

use alloc::format;
use alloc::string::String;

use tidepool_sdk::json;

/// The handler's config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// A reading is forwarded when it differs from the last forwarded one by more than this.
    pub delta: f64,
    /// The payload's JSON key holding the reading.
    pub field: String,
}

impl Config {
    /// Reads the config through `get` (the manifest's `[config]` with the box's overrides):
    /// `delta` (a finite JSON number >= 0, required) and `field` (default `v`). The error says
    /// what is wrong.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let Some(text) = get("delta") else {
            return Err(String::from("config `delta` is required"));
        };
        let text = text.trim();
        let delta = match text.parse::<f64>() {
            Ok(d) if d.is_finite() && d >= 0.0 && json::is_number(text) => d,
            _ => {
                return Err(format!(
                    "config `delta` = `{text}` is not a JSON number >= 0"
                ))
            }
        };
        let field = get("field").unwrap_or_else(|| String::from("v"));
        Ok(Config { delta, field })
    }
}

/// Whether `reading` is forwarded, given the last forwarded reading (`None`: nothing yet, so
/// it is). Moving by exactly `delta` is not enough. Comparing with the last *forwarded* value,
/// not the last seen, means a slow drift is still reported once it adds up to more than
/// `delta`.
pub fn should_forward(delta: f64, last_forwarded: Option<f64>, reading: f64) -> bool {
    last_forwarded.is_none_or(|last| (reading - last).abs() > delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, String> {
        let map: BTreeMap<_, _> = pairs.iter().copied().collect();
        Config::parse(|k| map.get(k).map(|v| String::from(*v)))
    }

    #[test]
    fn config_defaults_and_errors() {
        assert_eq!(
            parse(&[("delta", " 0.5 ")]),
            Ok(Config {
                delta: 0.5,
                field: "v".into()
            })
        );
        assert_eq!(
            parse(&[("delta", "0"), ("field", "level")]).unwrap().field,
            "level"
        );
        assert_eq!(parse(&[]), Err("config `delta` is required".into()));
        for bad in ["-1", "inf", "NaN", "1e999", "", "x", ".5"] {
            assert!(parse(&[("delta", bad)]).is_err(), "{bad}");
        }
    }

    /// The readings forwarded from `readings`, keeping the state as the handler does.
    fn run(delta: f64, readings: &[f64]) -> Vec<f64> {
        let mut last = None;
        let mut out = Vec::new();
        for &r in readings {
            if should_forward(delta, last, r) {
                last = Some(r);
                out.push(r);
            }
        }
        out
    }

    #[test]
    fn forwards_the_first_reading_and_moves_beyond_delta() {
        assert_eq!(
            run(0.5, &[20.0, 20.3, 20.5, 19.5, 20.6, 20.6, 19.9, 21.2]),
            [20.0, 20.6, 19.9, 21.2]
        );
    }

    #[test]
    fn a_slow_drift_is_reported_once_it_adds_up() {
        // Each step is below delta, but the distance from the last forwarded value grows.
        assert_eq!(
            run(1.0, &[10.0, 10.4, 10.8, 11.2, 11.6, 12.0, 12.4]),
            [10.0, 11.2, 12.4]
        );
    }

    #[test]
    fn delta_zero_forwards_every_change_and_no_repeat() {
        assert_eq!(run(0.0, &[1.0, 1.0, 2.0, 2.0, 1.0]), [1.0, 2.0, 1.0]);
    }
}
