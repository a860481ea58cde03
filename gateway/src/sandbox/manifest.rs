//! A handler's manifest (TOML): name, version, subscriptions, limits and config, checked
//! against the box-wide caps.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::config::BoxLimits;
use crate::proto::topic;

/// The limits a manifest asks for. Missing keys take these defaults.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub fuel_per_event: u64,
    pub memory_pages: u32,
    pub state_bytes: u64,
    pub forwards_per_event: u32,
    pub emits_per_event: u32,
    /// Of the wall clock, in percent (`None`: the box's `limits.cpu_percent`).
    pub cpu_percent: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel_per_event: 1_000_000,
            memory_pages: 4,
            state_bytes: 65536,
            forwards_per_event: 4,
            emits_per_event: 4,
            cpu_percent: None,
        }
    }
}

/// What a bundle's manifest describes: a handler (the default), or a box's settings (a signed
/// config bundle, `config::ConfigManifest`). Any other value is refused.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Handler,
    Config,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `handler` (the default).
    #[serde(default)]
    pub kind: Kind,
    pub name: String,
    pub version: u64,
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub timer_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: {1}")]
    Parse(String, toml::de::Error),
    #[error("manifest `{name}`: {msg}")]
    Invalid { name: String, msg: String },
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        Manifest::load_with_text(path).map(|(m, _)| m)
    }

    /// [`Manifest::load`], and the text it was parsed from (a reload's digest hashes it).
    pub fn load_with_text(path: &Path) -> Result<(Manifest, String), ManifestError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| ManifestError::Read(shown.clone(), e))?;
        let m = toml::from_str(&text).map_err(|e| ManifestError::Parse(shown, e))?;
        Ok((m, text))
    }

    /// Checks names, patterns and that every limit is within the box's caps.
    pub fn check(&self, caps: &BoxLimits) -> Result<(), ManifestError> {
        let bad = |msg: String| {
            Err(ManifestError::Invalid {
                name: self.name.clone(),
                msg,
            })
        };
        if !topic::valid_device_id(&self.name) {
            return bad("name must match [A-Za-z0-9._-]{1,64}".into());
        }
        if self.subscribe.is_empty() {
            return bad("subscribe lists no topic pattern".into());
        }
        for p in &self.subscribe {
            if let Err(e) = topic::validate_pattern(p) {
                return bad(e);
            }
        }
        if let Some(t) = self.timer_ms {
            if t < caps.min_timer_ms {
                return bad(format!(
                    "timer_ms = {t} is below the box minimum {} (limits.min_timer_ms)",
                    caps.min_timer_ms
                ));
            }
        }
        let l = &self.limits;
        let over: [(&str, u64, u64); 5] = [
            ("fuel_per_event", l.fuel_per_event, caps.fuel_per_event),
            (
                "memory_pages",
                l.memory_pages.into(),
                caps.memory_pages.into(),
            ),
            ("state_bytes", l.state_bytes, caps.state_bytes),
            (
                "forwards_per_event",
                l.forwards_per_event.into(),
                caps.forwards_per_event.into(),
            ),
            (
                "emits_per_event",
                l.emits_per_event.into(),
                caps.emits_per_event.into(),
            ),
        ];
        for (name, want, cap) in over {
            if want > cap {
                return bad(format!("limits.{name} = {want} exceeds the box cap {cap}"));
            }
        }
        if let Some(p) = l.cpu_percent {
            // A manifest only lowers its own share: 1 to the box's fixed share, or to 100 (100:
            // nothing asked) when the box's is fair (0) or off (100).
            let cap = match caps.cpu_percent {
                c @ 1..=99 => c,
                _ => 100,
            };
            if p == 0 || p > cap {
                return bad(format!(
                    "limits.cpu_percent = {p}: must be 1 to {cap} (a share of its own, at most the box's limits.cpu_percent)"
                ));
            }
        }
        if l.fuel_per_event == 0 || l.memory_pages == 0 {
            return bad("limits.fuel_per_event and limits.memory_pages must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn limits_over_the_box_caps_are_refused() {
        let caps = Config::defaults().limits;
        let mut m: Manifest =
            toml::from_str("name = \"t\"\nversion = 1\nsubscribe = [\"a/#\"]\n").unwrap();
        m.check(&caps).unwrap();
        m.limits.memory_pages = caps.memory_pages + 1;
        let err = m.check(&caps).unwrap_err().to_string();
        assert!(err.contains("memory_pages"), "{err}");
    }

    #[test]
    fn a_cpu_share_is_at_most_the_boxs() {
        let mut caps = Config::defaults().limits;
        let mut m: Manifest = toml::from_str(
            "name = \"t\"\nversion = 1\nsubscribe = [\"a/#\"]\n[limits]\ncpu_percent = 30\n",
        )
        .unwrap();
        caps.cpu_percent = 0;
        m.check(&caps).unwrap();
        caps.cpu_percent = 25;
        let err = m.check(&caps).unwrap_err().to_string();
        assert!(err.contains("cpu_percent = 30"), "{err}");
        m.limits.cpu_percent = Some(0);
        assert!(m.check(&caps).is_err());
        m.limits.cpu_percent = Some(101);
        caps.cpu_percent = 0;
        assert!(m.check(&caps).is_err());
    }
}
