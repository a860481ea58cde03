//! `tidepool fleet deploy`: one bundle to many gateways in waves, over the admin channel. A
//! wave is deployed at once; then each of its gateways is asked (`list`) until the version has
//! passed its probation there, been rolled back, or the wait is over. A wave that fails
//! anywhere stops the rollout: the gateways after it are not touched. The inventory (TOML)
//! names the gateways and the operator's files ([`Inventory`]); the waves are planned by
//! [`waves`] (pure).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::client::{AdminError, Remote};

/// The fleet: every gateway, and the files an operator reaches them with (each gateway may
/// name its own). Relative paths are relative to the inventory's folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(rename = "gateway")]
    pub gateways: Vec<Member>,
}

/// One gateway of the fleet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    /// `host:port` of its admin channel (the gateway's port).
    pub address: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Inventory {
    /// Reads an inventory; every gateway must have a CA, a certificate and a key (its own or
    /// the inventory's).
    pub fn load(path: &Path) -> Result<(Inventory, Vec<Remote>), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let inv: Inventory =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if inv.gateways.is_empty() {
            return Err(format!("{}: no [[gateway]]", path.display()));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut remotes = Vec::new();
        for g in &inv.gateways {
            let pick = |own: &Option<PathBuf>, all: &Option<PathBuf>, what: &str| {
                own.as_ref()
                    .or(all.as_ref())
                    .map(|p| dir.join(p))
                    .ok_or_else(|| {
                        format!(
                            "{}: gateway `{}` has no {what} (set it, or one at the top)",
                            path.display(),
                            g.name
                        )
                    })
            };
            remotes.push(Remote {
                gateway: g.address.clone(),
                ca: pick(&g.ca, &inv.ca, "ca")?,
                cert: pick(&g.cert, &inv.cert, "cert")?,
                key: pick(&g.key, &inv.key, "key")?,
            });
        }
        Ok((inv, remotes))
    }
}

/// How big a wave is: a share of the fleet, or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveSize {
    Percent(u32),
    Count(usize),
}

impl std::str::FromStr for WaveSize {
    type Err = String;
    fn from_str(s: &str) -> Result<WaveSize, String> {
        let bad = || format!("`{s}`: a percentage of the fleet (10%) or a number of gateways (5)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(WaveSize::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.parse::<usize>() {
                Ok(n) if n > 0 => Ok(WaveSize::Count(n)),
                _ => Err(bad()),
            },
        }
    }
}

/// The waves of a fleet of `n` gateways, in inventory order: each `size` (a percentage rounds
/// up, so no wave is empty), the last one what is left.
pub fn waves(n: usize, size: WaveSize) -> Vec<std::ops::Range<usize>> {
    let per = match size {
        WaveSize::Count(c) => c,
        WaveSize::Percent(p) => (n * p as usize).div_ceil(100),
    }
    .max(1);
    (0..n).step_by(per).map(|s| s..(s + per).min(n)).collect()
}

/// What happened on one gateway.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Outcome {
    pub name: String,
    pub address: String,
    /// Its wave (1 first); `None`: not reached (an earlier wave failed).
    pub wave: Option<usize>,
    /// `passed`, `failed`, or `skipped`.
    pub result: &'static str,
    pub detail: String,
}

/// A bundle's name as `list` shows it (a handler's, or `@config`) and its version, as its
/// manifest says (the gateways verify the rest).
pub fn bundle_names(bytes: &[u8]) -> Result<(String, u64), String> {
    use super::bundle;
    let f = bundle::frame(bytes, u64::MAX).map_err(|e| e.to_string())?;
    let text = std::str::from_utf8(f.manifest).map_err(|e| e.to_string())?;
    match bundle::kind_of(text).map_err(|e| e.to_string())? {
        crate::sandbox::manifest::Kind::Config => {
            let m = bundle::parse_config(text).map_err(|e| e.to_string())?;
            Ok((super::deploy::CONFIG.to_string(), m.version))
        }
        crate::sandbox::manifest::Kind::Handler => {
            let m = bundle::parse_manifest(text).map_err(|e| e.to_string())?;
            Ok((m.name, m.version))
        }
    }
}

/// How often a wave's gateways are asked about the probation.
const POLL: Duration = Duration::from_millis(500);

/// Deploys `bundle` to each wave in turn; stops after a wave that fails anywhere. `wait`
/// bounds each wave's probation.
pub async fn rollout(
    inv: &Inventory,
    remotes: &[Remote],
    bundle: &[u8],
    size: WaveSize,
    wait: Duration,
    mut progress: impl FnMut(&Outcome),
) -> Result<Vec<Outcome>, String> {
    let (name, version) = bundle_names(bundle)?;
    let mut out: Vec<Outcome> = inv
        .gateways
        .iter()
        .map(|g| Outcome {
            name: g.name.clone(),
            address: g.address.clone(),
            wave: None,
            result: "skipped",
            detail: "not reached: an earlier wave failed".into(),
        })
        .collect();
    for (w, range) in waves(remotes.len(), size).into_iter().enumerate() {
        let deploys = range.clone().map(|i| {
            let r = remotes[i].clone();
            let (name, bundle) = (name.clone(), bundle.to_vec());
            tokio::spawn(async move { one(&r, &name, version, &bundle, wait).await })
        });
        let results = join_in_order(deploys.collect()).await;
        let mut failed = false;
        for (i, r) in range.zip(results) {
            let o = &mut out[i];
            o.wave = Some(w + 1);
            match r.and_then(|r| r) {
                Ok(detail) => (o.result, o.detail) = ("passed", detail),
                Err(detail) => {
                    failed = true;
                    (o.result, o.detail) = ("failed", detail);
                }
            }
            progress(o);
        }
        if failed {
            break;
        }
    }
    Ok(out)
}

async fn join_in_order<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<Result<T, String>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.map_err(|e| e.to_string()));
    }
    out
}

/// One gateway: deploy, then wait for the version's probation to end. A gateway that already
/// runs this version (a rollout run again) is watched as if it had just been deployed.
async fn one(
    r: &Remote,
    name: &str,
    version: u64,
    bundle: &[u8],
    wait: Duration,
) -> Result<String, String> {
    let started = Instant::now();
    let mut answer = Vec::new();
    if let Err(e) = r
        .ask(&format!("deploy {}", bundle.len()), bundle, &mut answer)
        .await
    {
        let runs = listed(r, name)
            .await
            .ok()
            .and_then(|h| h["running"].as_u64());
        if runs != Some(version) {
            return Err(format!("deploy refused: {}", short(&e)));
        }
    }
    loop {
        let h = listed(r, name).await?;
        let took = format!("{:.1} s", started.elapsed().as_secs_f64());
        if h["running"].as_u64() != Some(version) {
            let why = h["note"].as_str().unwrap_or("it no longer runs");
            return Err(format!("v{version} rolled back or removed: {why}"));
        }
        // Passed once recorded so (a probation judged a failure is not running either, until
        // its rollback is done).
        let p = &h["probation"];
        if p.is_null() && h["on_probation"] == false {
            return Ok(format!("v{version} runs, probation passed ({took})"));
        }
        if started.elapsed() >= wait {
            let state = match p.is_null() {
                true => "its probation ended and is being recorded or rolled back".to_string(),
                false => format!(
                    "{}/{} runs, {} failed",
                    p["runs"], p["of_runs"], p["failures"]
                ),
            };
            return Err(format!(
                "still on probation after {took} ({state}): give it events, or a longer --wait"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What `list` says of `name` on one gateway (`null` fields when it does not know it).
async fn listed(r: &Remote, name: &str) -> Result<serde_json::Value, String> {
    let mut out = Vec::new();
    r.ask("list", &[], &mut out)
        .await
        .map_err(|e| format!("list failed: {}", short(&e)))?;
    let all: serde_json::Value = serde_json::from_slice(&out).map_err(|e| format!("list: {e}"))?;
    Ok(all
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == name))
        .cloned()
        .unwrap_or_default())
}

fn short(e: &AdminError) -> String {
    e.to_string()
        .trim_start_matches("the gateway answered: ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_cover_the_fleet_in_order_and_none_is_empty() {
        assert_eq!(
            waves(20, WaveSize::Percent(25)),
            vec![0..5, 5..10, 10..15, 15..20]
        );
        assert_eq!(
            waves(7, WaveSize::Percent(10)),
            (0..7).map(|i| i..i + 1).collect::<Vec<_>>()
        );
        assert_eq!(waves(7, WaveSize::Count(3)), vec![0..3, 3..6, 6..7]);
        assert_eq!(waves(3, WaveSize::Percent(100)), vec![0..3]);
        assert_eq!(
            waves(0, WaveSize::Count(3)),
            Vec::<std::ops::Range<usize>>::new()
        );
        assert_eq!("10%".parse(), Ok(WaveSize::Percent(10)));
        assert_eq!("4".parse(), Ok(WaveSize::Count(4)));
        for bad in ["0", "0%", "101%", "-1", "x", "%"] {
            assert!(bad.parse::<WaveSize>().is_err(), "{bad}");
        }
    }
}
