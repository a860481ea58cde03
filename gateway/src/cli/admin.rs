//! The operator's commands: `deploy`, `list`, `rollback`, `remove`, and where every admin
//! command goes ([`Target`]): the local control socket, or a gateway's admin channel with an
//! operator certificate.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tidepool::admin::client::Remote;

use super::ConfigArgs;

/// Where an admin command goes.
#[derive(clap::Args, Clone)]
pub struct Target {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Ask the gateway at HOST:PORT over the admin channel (ALPN tidepool-admin/1) with an
    /// operator certificate, instead of the local control socket.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["ca", "cert", "key"])]
    pub gateway: Option<String>,
    /// With --gateway: the gateway's server CA (the ca.crt beside an operator certificate).
    #[arg(long, value_name = "FILE", requires = "gateway")]
    pub ca: Option<PathBuf>,
    /// With --gateway: the operator's certificate (`tidepool certs operator NAME`).
    #[arg(long, value_name = "FILE", requires = "gateway")]
    pub cert: Option<PathBuf>,
    /// With --gateway: the operator's key.
    #[arg(long, value_name = "FILE", requires = "gateway")]
    pub key: Option<PathBuf>,
    /// An operator profile (`tidepool certs operator` writes NAME.toml): the gateway, the CA,
    /// the certificate and the key in one file.
    #[arg(
        long,
        value_name = "FILE",
        env = "TIDEPOOL_PROFILE",
        conflicts_with = "gateway"
    )]
    pub profile: Option<PathBuf>,
}

/// Exit code: no gateway runs on the data dir (local socket).
pub const NO_GATEWAY: u8 = 3;

impl Target {
    /// The remote gateway, if one is named.
    pub fn remote(&self) -> anyhow::Result<Option<Remote>> {
        if let Some(p) = &self.profile {
            return Ok(Some(Remote::from_profile(p)?));
        }
        let (Some(gateway), Some(ca), Some(cert), Some(key)) =
            (&self.gateway, &self.ca, &self.cert, &self.key)
        else {
            return Ok(None);
        };
        Ok(Some(Remote {
            gateway: gateway.clone(),
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }))
    }

    /// Sends one request (and `body`) and streams the answer to `out`. `Ok(false)`: no
    /// gateway runs on the local data dir (a message is printed).
    pub fn ask(&self, line: &str, body: &[u8], out: &mut dyn Write) -> anyhow::Result<bool> {
        if let Some(remote) = self.remote()? {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(remote.ask(line, body, out))
                .with_context(|| format!("asking {}", remote.gateway))?;
            return Ok(true);
        }
        let cfg = self.config.load()?;
        let data = &cfg.gateway.data_dir;
        match tidepool::control::ask(data, line, body, out)
            .with_context(|| format!("asking the gateway in {}", data.display()))?
        {
            Some(()) => Ok(true),
            None => {
                eprintln!(
                    "tidepool: no control socket in {}: no gateway runs on this data dir (or it could not bind its socket; see its log). Give --config or --data-dir of a running gateway, or --gateway/--profile for a remote one.",
                    data.display()
                );
                Ok(false)
            }
        }
    }

    /// Asks, and parses a JSON answer; `None`: no gateway runs locally.
    pub fn ask_json(&self, line: &str, body: &[u8]) -> anyhow::Result<Option<serde_json::Value>> {
        let mut out = Vec::new();
        if !self.ask(line, body, &mut out)? {
            return Ok(None);
        }
        let v = serde_json::from_slice(&out).context("the gateway's answer is not JSON")?;
        Ok(Some(v))
    }
}

/// Deploy a signed handler bundle (.tpb) to a running gateway.
///
/// The gateway verifies everything before it changes anything: the signature (a key in its
/// deploy.trusted_keys), the version (above the highest installed under that name), the
/// module, its imports and its limits (within the box's caps); then it runs the handler's
/// tp_init and swaps it in between two events. The version before is kept for `rollback`.
/// A new version runs on probation (deploy.probation_*): too many failures roll it back.
/// Locally (the gateway's user, its --config) or remotely (--gateway … or --profile).
#[derive(clap::Args)]
pub struct DeployArgs {
    /// The bundle (`tidepool bundle build` makes one).
    bundle: PathBuf,
    #[command(flatten)]
    target: Target,
    /// Print the gateway's JSON answer.
    #[arg(long)]
    json: bool,
}

/// List the handlers a gateway knows: deployed ones (with the version a rollback goes back
/// to, the version floor, the signer, a probation under way, and what last happened to
/// them) and the ones its config pins.
#[derive(clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    target: Target,
    /// Print the gateway's JSON answer.
    #[arg(long)]
    json: bool,
}

/// Go back to the version a deployed handler ran before.
///
/// Its version floor stays: the version rolled back from cannot be deployed again, only a
/// higher one. The version rolled back to runs without probation, and no version is kept
/// before it (a second rollback is refused). State is not rolled back.
#[derive(clap::Args)]
pub struct RollbackArgs {
    /// The handler's name.
    name: String,
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    json: bool,
}

/// Remove a deployed handler, with its state, its timer and its quarantine.
///
/// Its version floor stays: an old bundle of it cannot come back, a higher version can.
/// Handlers configured in [[handler]] are pinned: remove them from the config instead.
#[derive(clap::Args)]
pub struct RemoveArgs {
    /// The handler's name.
    name: String,
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    json: bool,
}

fn done(
    target: &Target,
    line: &str,
    body: &[u8],
    json: bool,
    say: impl Fn(&serde_json::Value) -> String,
) -> anyhow::Result<ExitCode> {
    let Some(v) = target.ask_json(line, body)? else {
        return Ok(ExitCode::from(NO_GATEWAY));
    };
    match json {
        true => println!("{}", serde_json::to_string_pretty(&v)?),
        false => println!("{}", say(&v)),
    }
    Ok(ExitCode::SUCCESS)
}

fn version(v: &serde_json::Value) -> String {
    v.as_u64().map_or("-".into(), |v| format!("v{v}"))
}

pub fn deploy(a: DeployArgs) -> anyhow::Result<ExitCode> {
    let bytes =
        std::fs::read(&a.bundle).with_context(|| format!("reading {}", a.bundle.display()))?;
    done(
        &a.target,
        &format!("deploy {}", bytes.len()),
        &bytes,
        a.json,
        |v| {
            let replaced = match v["replaced"].as_u64() {
                Some(r) => format!("in place of v{r}"),
                None => "as a new handler".into(),
            };
            let probation = match v["probation"].as_bool() {
                Some(true) => "; on probation (`tidepool list` shows it)",
                _ => "",
            };
            format!(
                "deployed {} {} {replaced}, signed by {}{probation}",
                v["name"].as_str().unwrap_or("?"),
                version(&v["version"]),
                v["signer"].as_str().unwrap_or("?"),
            )
        },
    )
}

pub fn rollback(a: RollbackArgs) -> anyhow::Result<ExitCode> {
    done(
        &a.target,
        &format!("rollback {}", a.name),
        &[],
        a.json,
        |v| {
            format!(
                "rolled back {} from {} to {}",
                v["name"].as_str().unwrap_or("?"),
                version(&v["from"]),
                version(&v["to"])
            )
        },
    )
}

pub fn remove(a: RemoveArgs) -> anyhow::Result<ExitCode> {
    done(&a.target, &format!("remove {}", a.name), &[], a.json, |v| {
        format!(
            "removed {} ({}), with its state, timer and quarantine",
            v["name"].as_str().unwrap_or("?"),
            match v["from"].as_u64() {
                Some(f) => format!("v{f} ran"),
                None => "it was not running".into(),
            }
        )
    })
}

pub fn list(a: ListArgs) -> anyhow::Result<ExitCode> {
    done(&a.target, "list", &[], a.json, table)
}

/// The `list` answer as a table.
fn table(v: &serde_json::Value) -> String {
    let rows: Vec<[String; 7]> = v
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|h| {
            // (Indexed as a `Value`: a field missing from the answer reads as null.)
            let p = &h["probation"];
            let probation = match (p.is_object(), h["on_probation"].as_bool()) {
                (true, _) => format!(
                    "{}/{} runs, {} failed (>{} rolls back), {} s left",
                    p["runs"],
                    p["of_runs"],
                    p["failures"],
                    p["max_failures"],
                    p["remaining_ms"].as_u64().unwrap_or(0).div_ceil(1000)
                ),
                (false, Some(true)) => "ended, being recorded".into(),
                _ => "-".into(),
            };
            [
                h["name"].as_str().unwrap_or("?").to_string(),
                h["source"].as_str().unwrap_or("?").to_string(),
                version(&h["running"]),
                version(&h["previous"]),
                h["floor"].as_u64().unwrap_or(0).to_string(),
                probation,
                h["note"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no handlers".into();
    }
    let head = [
        "NAME",
        "SOURCE",
        "RUNNING",
        "PREVIOUS",
        "FLOOR",
        "PROBATION",
        "NOTE",
    ]
    .map(String::from);
    let mut width = [0; 7];
    for r in std::iter::once(&head).chain(&rows) {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    std::iter::once(&head)
        .chain(&rows)
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(width)
                .map(|(c, w)| format!("{c:w$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Say in one line whether a running gateway is healthy, for scripts and monitors.
///
/// Healthy: the dispatcher's thread answers, and the commit path moves or has nothing
/// waiting. Under systemd's watchdog, its last verdict; otherwise judged over a second. Exits 0 healthy, 1 unhealthy, 2 degraded (the
/// data dir's disk below store.min_free_bytes: publishes are answered busy), 3 when no
/// gateway runs on the local data dir. `status` is the full view.
#[derive(clap::Args)]
pub struct HealthArgs {
    #[command(flatten)]
    target: Target,
    /// Print the gateway's JSON answer.
    #[arg(long)]
    json: bool,
}

pub fn health(a: HealthArgs) -> anyhow::Result<ExitCode> {
    let Some(v) = a.target.ask_json("health", &[])? else {
        return Ok(ExitCode::from(NO_GATEWAY));
    };
    let state = v["state"].as_str().unwrap_or("unhealthy");
    match a.json {
        true => println!("{}", serde_json::to_string_pretty(&v)?),
        false => match v["why"].as_str().filter(|w| !w.is_empty()) {
            Some(why) => println!("{state}: {why}"),
            None => println!("{state}"),
        },
    }
    Ok(ExitCode::from(match state {
        "healthy" => 0,
        "degraded" => 2,
        _ => 1,
    }))
}
