//! The one configuration file: the embedded defaults (`defaults.toml`, printed by
//! `tidepool config defaults`) merged with the user's TOML, checked, as typed structs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pipeline::Class;

use crate::proto::topic;

/// The commented default configuration, the single source of every default.
pub const DEFAULTS_TOML: &str = include_str!("defaults.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub ingress: IngressConfig,
    pub acl: AclConfig,
    pub router: RouterConfig,
    pub limits: BoxLimits,
    pub store: StoreConfig,
    pub outbox: OutboxConfig,
    pub uplink: UplinkConfig,
    pub record: RecordConfig,
    pub deploy: DeployConfig,
    pub admin: AdminConfig,
    pub pki: PkiConfig,
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub handler: Vec<HandlerEntry>,
}

/// `[metrics]`: the Prometheus endpoint, and what counts as a handler running too long.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A local address to serve Prometheus text metrics on (`GET /metrics`); empty: off.
    pub listen: String,
    /// An invocation longer than this is counted as over budget ("negative uptime").
    pub invoke_budget_ms: u64,
}

impl MetricsConfig {
    /// The endpoint's address (`None`: off); validated with the config.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

/// `[pki]`: a fleet's CA certificates this box trusts instead of generating its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiConfig {
    /// The fleet's device CA (PEM); empty: the box's own, in `<data_dir>/pki/`.
    pub device_ca: PathBuf,
    /// The fleet's operator CA (PEM); empty: the box's own.
    pub operator_ca: PathBuf,
}

/// `[admin]`: who may reach the admin channel (ALPN `tidepool-admin/1`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Source addresses or networks (`10.0.0.0/8`, `192.168.1.7`, `fd00::/8`) an operator may
    /// connect from; empty: any.
    pub allow_from: Vec<String>,
    /// Denied operators: names, and certificate serials as `serial:<hex>` (reloaded on
    /// SIGHUP).
    pub revoked: Vec<String>,
}

impl AdminConfig {
    /// The allow-list, parsed (validated with the config).
    pub fn networks(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.allow_from
            .iter()
            .map(|a| {
                a.parse::<ipnet::IpNet>()
                    .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::Invalid(format!(
                            "admin.allow_from: `{a}` is not an address or a network (192.168.1.7, 10.0.0.0/8, fd00::/8)"
                        ))
                    })
            })
            .collect()
    }
}

/// `[deploy]`: who may sign what this box runs from a bundle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// Public keys (`ed25519:<base64>`, as `tidepool keys generate` writes them) whose bundles
    /// this box runs.
    pub trusted_keys: Vec<String>,
    /// The largest bundle read at all.
    pub max_bundle_bytes: u64,
    /// A deployed version's probation: its first `probation_events` handler runs, within
    /// `probation_s` of the deploy; more than `probation_max_failures` failures among them
    /// roll it back (0 events or 0 s: no probation).
    pub probation_events: u32,
    pub probation_max_failures: u32,
    pub probation_s: u64,
    /// Keys a config bundle added (they sign handler bundles only); never in the file.
    #[serde(skip)]
    pub added_keys: Vec<String>,
}

impl DeployConfig {
    /// The probation rules (`None`: none).
    pub fn probation(&self) -> Option<crate::sandbox::probation::Rules> {
        (self.probation_events > 0 && self.probation_s > 0).then_some(
            crate::sandbox::probation::Rules {
                events: self.probation_events,
                max_failures: self.probation_max_failures,
                window_ms: self.probation_s.saturating_mul(1000),
            },
        )
    }
}

impl DeployConfig {
    /// The box's own trusted keys (the file's), parsed (validated with the config, so this
    /// does not fail after a successful load): they sign handlers and config bundles.
    pub fn keys(&self) -> Result<Vec<crate::admin::bundle::PublicKey>, ConfigError> {
        parse_keys(&self.trusted_keys)
    }

    /// Every key a handler bundle may be signed by: the box's own and those a config bundle
    /// added.
    pub fn handler_keys(&self) -> Result<Vec<crate::admin::bundle::PublicKey>, ConfigError> {
        let mut keys = self.keys()?;
        keys.extend(parse_keys(&self.added_keys)?);
        keys.dedup();
        Ok(keys)
    }
}

fn parse_keys(keys: &[String]) -> Result<Vec<crate::admin::bundle::PublicKey>, ConfigError> {
    keys.iter()
        .map(|k| {
            crate::admin::bundle::PublicKey::parse(k)
                .map_err(|e| ConfigError::Invalid(format!("deploy.trusted_keys: {e}")))
        })
        .collect()
}

/// A signed config bundle's manifest (`kind = "config"`, `docs/bundles.md`): settings pushed
/// to a box instead of edited on it. What it gives replaces the file's (`acl.publish`), narrows
/// it (`admin.allow_from`) or adds to it (the deny-lists `acl.revoked` and `admin.revoked`,
/// and `deploy.trusted_keys`, which then sign handler bundles only: config bundles are signed
/// by the file's own keys). It may name the gateways it is for. A later config bundle replaces
/// the one before whole.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigManifest {
    pub kind: crate::sandbox::manifest::Kind,
    pub version: u64,
    /// The gateway ids it is for (empty: any box that trusts its signer).
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub acl: ConfigAcl,
    #[serde(default)]
    pub admin: ConfigAdmin,
    #[serde(default)]
    pub deploy: ConfigDeploy,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigAcl {
    pub publish: Option<Vec<String>>,
    #[serde(default)]
    pub revoked: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigAdmin {
    pub allow_from: Option<Vec<String>>,
    #[serde(default)]
    pub revoked: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigDeploy {
    #[serde(default)]
    pub trusted_keys: Vec<String>,
}

impl Config {
    /// This (file) config with a config bundle's settings in force, checked as a whole.
    pub fn overlaid(&self, m: &ConfigManifest) -> Result<Config, ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if !m.gateways.is_empty() && !m.gateways.contains(&self.gateway.id) {
            return bad(format!(
                "the config bundle is for the gateways {:?}, not this one (`{}`)",
                m.gateways, self.gateway.id
            ));
        }
        let mut c = self.clone();
        if let Some(p) = &m.acl.publish {
            c.acl.publish = p.clone();
        }
        c.acl.revoked.extend(m.acl.revoked.iter().cloned());
        if let Some(a) = &m.admin.allow_from {
            // It may narrow the file's allow-list, never widen it (an empty list is any
            // address).
            let file = self.admin.networks()?;
            c.admin.allow_from = a.clone();
            let bundle = c.admin.networks()?;
            let within = |n: &ipnet::IpNet| file.iter().any(|f| f.contains(n));
            if !file.is_empty() && (bundle.is_empty() || !bundle.iter().all(within)) {
                return bad(format!(
                    "admin.allow_from {a:?} would widen the box's own {:?}: a config bundle may only narrow it",
                    self.admin.allow_from
                ));
            }
        }
        c.admin.revoked.extend(m.admin.revoked.iter().cloned());
        c.deploy.added_keys = m.deploy.trusted_keys.clone();
        c.validate()?;
        Ok(c)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordConfig {
    pub topics: Vec<String>,
    pub max_file_bytes: u64,
    pub files: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub id: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub server_names: Vec<String>,
    pub log: String,
    /// Started as root: the user to switch to once the port is bound ("": stay).
    pub user: String,
    /// The timer slack of every thread (`PR_SET_TIMERSLACK`), in ms; 0: the kernel's.
    pub timer_slack_ms: u64,
    /// `data_dir` as the file wrote it, before it was made relative to the file (the start
    /// warns of a data dir that meant the current directory before that rule).
    #[serde(skip)]
    pub data_dir_as_written: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    pub max_frame_bytes: u32,
    pub max_payload_bytes: usize,
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_address: u32,
    pub handshake_timeout_ms: u64,
    pub max_streams_per_connection: u32,
    pub busy_retry_after_ms: u64,
    /// Frames (publishes, resends, hellos, bad frames) and datagrams one device may send per
    /// second on average; 0: no limit.
    pub device_events_per_s: u32,
    /// Events one device may send at once above that rate (its bucket's size).
    pub device_burst: u32,
    pub idle_timeout_ms: u64,
    pub datagram_shed_backlog: usize,
    pub queue_bytes: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    pub publish: Vec<String>,
    /// Denied devices: ids, and certificate serials as `serial:<hex>` (reloaded on SIGHUP).
    pub revoked: Vec<String>,
    /// Device ids that are lower Tidepool tiers: their `id`, `src` and `class` keys are kept.
    pub tiers: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unrouted {
    Drop,
    Forward,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub unrouted: Unrouted,
    pub unrouted_class: Class,
}

/// Handler limits: the box-wide caps in the config, and each manifest's own.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BoxLimits {
    pub fuel_per_event: u64,
    pub memory_pages: u32,
    pub state_bytes: u64,
    pub forwards_per_event: u32,
    pub emits_per_event: u32,
    pub emit_depth: u32,
    pub state_writes_per_event: u32,
    pub log_bytes_per_event: usize,
    pub min_timer_ms: u64,
    pub quarantine_after_errors: u32,
    pub quarantine_devices: usize,
    pub quarantine_hold_ms: u64,
    pub cpu_percent: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub cache_capacity_bytes: u64,
    pub dead_letter_max_bytes: u64,
    pub commit_queue_bytes: u64,
    pub min_free_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    DropBulkFirst,
    Backpressure,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    pub max_bytes: u64,
    pub full_policy: FullPolicy,
    pub max_batch_events: usize,
    pub max_batch_bytes: usize,
    pub max_delay_ms: u64,
    pub bulk_window_ms: u64,
    pub linger_ms: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Http,
    Mqtt,
    Nats,
    Tidepool,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    pub sink: SinkKind,
    pub url: String,
    pub timeout_ms: u64,
    pub budget_bytes_per_day: u64,
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub nats: NatsConfig,
    pub tier: TierConfig,
}

/// `[uplink.tier]`: the Tidepool sink's settings (an upstream Tidepool, this gateway being a
/// device there). Relative paths resolve against the config file's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub topic: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[uplink.nats]`: the NATS JetStream sink's settings (cargo feature `nats`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub subject: String,
    pub stream: String,
    pub stream_subjects: Vec<String>,
    pub duplicate_window_s: u64,
}

/// `[uplink.http]`: the HTTP sink's settings. A relative path resolves against the config
/// file's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// For https://: the CA file the cloud's certificate chains to (empty: the public CAs
    /// built in, Mozilla's list).
    pub ca_file: PathBuf,
}

/// `[uplink.mqtt]`: the MQTT sink's settings. A relative path resolves against the config
/// file's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub topic: String,
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub ca_file: PathBuf,
    pub keep_alive_s: u64,
}

/// A `[[handler]]` entry: a module, its manifest and per-box config overrides.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerEntry {
    pub wasm: PathBuf,
    pub manifest: PathBuf,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

impl Config {
    /// The embedded defaults.
    pub fn defaults() -> Config {
        Config::from_toml_str(DEFAULTS_TOML, Path::new("<defaults>"))
            .expect("embedded defaults are valid")
    }

    /// Defaults overridden by `text` (read from `origin`). Every relative path of the result,
    /// the defaults' `./tidepool-data` included, resolves against `origin`'s folder: the one
    /// rule for paths in a config file.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let parse = |s: &str| {
            toml::from_str::<toml::Value>(s).map_err(|e| ConfigError::Parse {
                path: origin.to_path_buf(),
                source: Box::new(e),
            })
        };
        let mut value: toml::Value =
            toml::from_str(DEFAULTS_TOML).expect("embedded defaults parse");
        merge(&mut value, parse(text)?);
        let mut cfg: Config = value.try_into().map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            source: Box::new(e),
        })?;
        cfg.gateway.data_dir_as_written = cfg.gateway.data_dir.clone();
        // A file named without a folder is in the current one: its paths stay as written.
        if let Some(dir) = origin.parent().filter(|d| !d.as_os_str().is_empty()) {
            for h in &mut cfg.handler {
                h.wasm = dir.join(&h.wasm);
                h.manifest = dir.join(&h.manifest);
            }
            let t = &mut cfg.uplink.tier;
            let k = &mut cfg.pki;
            for p in [
                &mut cfg.gateway.data_dir,
                &mut cfg.uplink.http.ca_file,
                &mut cfg.uplink.mqtt.ca_file,
                &mut t.ca_file,
                &mut t.cert_file,
                &mut t.key_file,
                &mut k.device_ca,
                &mut k.operator_ca,
            ] {
                if !p.as_os_str().is_empty() {
                    // `./x` is written as `dir/x`, not `dir/./x`.
                    *p = dir.join(p.strip_prefix(".").unwrap_or(p));
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text, path)
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !self.metrics.listen.is_empty() && self.metrics.address().is_none() {
            return bad(format!(
                "metrics.listen `{}` must be an IP address and port, e.g. 127.0.0.1:9464 (empty: off)",
                self.metrics.listen
            ));
        }
        // Empty: derived from the box's own key at start (`pki::box_id`).
        if !self.gateway.id.is_empty() && !topic::valid_device_id(&self.gateway.id) {
            return bad(format!(
                "gateway.id `{}` must match [A-Za-z0-9._-]{{1,64}}",
                self.gateway.id
            ));
        }
        let i = &self.ingress;
        for (name, v, lo, hi) in [
            ("max_frame_bytes", u64::from(i.max_frame_bytes), 1, 16 << 20),
            ("max_payload_bytes", i.max_payload_bytes as u64, 1, 16 << 20),
            ("max_connections", i.max_connections as u64, 1, 1_000_000),
            ("max_handshakes", i.max_handshakes as u64, 1, 100_000),
            (
                "max_handshakes_per_address",
                u64::from(i.max_handshakes_per_address),
                1,
                100_000,
            ),
            ("handshake_timeout_ms", i.handshake_timeout_ms, 100, 120_000),
            (
                "max_streams_per_connection",
                u64::from(i.max_streams_per_connection),
                1,
                1024,
            ),
            ("busy_retry_after_ms", i.busy_retry_after_ms, 0, 3_600_000),
            (
                "device_events_per_s",
                u64::from(i.device_events_per_s),
                0,
                1_000_000,
            ),
            ("device_burst", u64::from(i.device_burst), 1, 1_000_000),
            // 0 would disable the idle timeout: a silent peer would hold its connection
            // for good.
            ("idle_timeout_ms", i.idle_timeout_ms, 1_000, 3_600_000),
        ] {
            if !(lo..=hi).contains(&v) {
                return bad(format!(
                    "ingress.{name} = {v} is out of range: it must be {lo} to {hi}"
                ));
            }
        }
        if self.ingress.queue_bytes < 64 * 1024 {
            return bad(format!(
                "ingress.queue_bytes must be at least 65536 (one read of a stream), not {}",
                self.ingress.queue_bytes
            ));
        }
        for p in &self.acl.publish {
            topic::validate_pattern(p)
                .map_err(|e| ConfigError::Invalid(format!("acl.publish: {e}")))?;
        }
        for p in &self.record.topics {
            topic::validate_pattern(p)
                .map_err(|e| ConfigError::Invalid(format!("record.topics: {e}")))?;
        }
        if !(1..=100).contains(&self.record.files) || self.record.max_file_bytes == 0 {
            return bad("record: need 1 <= files <= 100 and max_file_bytes >= 1".into());
        }
        if let Some(p) = self.record.topics.iter().find(|p| p.contains("{id}")) {
            return bad(format!(
                "record.topics: `{p}`: {{id}} means the publishing device only in acl.publish; use + here"
            ));
        }
        if self.outbox.max_batch_events == 0 || self.outbox.max_batch_bytes == 0 {
            return bad("outbox.max_batch_events and max_batch_bytes must be at least 1".into());
        }
        const MAX_MS: u64 = 30 * 24 * 3600 * 1000;
        let o = &self.outbox;
        for (name, v) in [
            ("max_delay_ms", o.max_delay_ms),
            ("bulk_window_ms", o.bulk_window_ms),
            ("linger_ms", o.linger_ms),
            ("retry_base_ms", o.retry_base_ms),
            ("retry_max_ms", o.retry_max_ms),
        ] {
            if v > MAX_MS {
                return bad(format!("outbox.{name} = {v} is more than 30 days"));
            }
        }
        // Durations added to an `Instant` must not overflow it (a panic, and in release an
        // abort): each is bounded here, with the unit it is given in.
        for (name, v, lo, hi) in [
            ("uplink.timeout_ms", self.uplink.timeout_ms, 1, MAX_MS),
            (
                "limits.quarantine_hold_ms",
                self.limits.quarantine_hold_ms,
                0,
                MAX_MS,
            ),
            ("limits.min_timer_ms", self.limits.min_timer_ms, 1, MAX_MS),
            // MQTT's keep-alive is 16 bits; below 5 s the sink uses 5 (rumqttc's least).
            (
                "uplink.mqtt.keep_alive_s",
                self.uplink.mqtt.keep_alive_s,
                0,
                65_535,
            ),
            (
                "uplink.nats.duplicate_window_s",
                self.uplink.nats.duplicate_window_s,
                0,
                MAX_MS / 1000,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return bad(format!(
                    "{name} = {v} is out of range: it must be {lo} to {hi}"
                ));
            }
        }
        self.deploy.handler_keys()?;
        if self.deploy.probation_s > MAX_MS / 1000 {
            return bad(format!(
                "deploy.probation_s = {} is out of range: it must be 0 to {}",
                self.deploy.probation_s,
                MAX_MS / 1000
            ));
        }
        self.admin.networks()?;
        crate::pki::Revoked::parse(&self.admin.revoked)
            .map_err(|e| ConfigError::Invalid(format!("admin.revoked: {e}")))?;
        if !(1024..=(256 << 20)).contains(&self.deploy.max_bundle_bytes) {
            return bad(format!(
                "deploy.max_bundle_bytes = {} is out of range: it must be 1024 to {}",
                self.deploy.max_bundle_bytes,
                256 << 20
            ));
        }
        if self.outbox.retry_base_ms == 0 || self.outbox.retry_max_ms < self.outbox.retry_base_ms {
            return bad("outbox: need 0 < retry_base_ms <= retry_max_ms".into());
        }
        let u = &self.uplink.url;
        if !u.is_empty() {
            let schemes: &[&str] = match self.uplink.sink {
                SinkKind::Http => &["http://", "https://"],
                SinkKind::Mqtt => &["mqtt://", "mqtts://"],
                SinkKind::Nats => &["nats://", "tls://"],
                SinkKind::Tidepool => &["tidepool://"],
                SinkKind::None => &[],
            };
            if !schemes.is_empty() && !schemes.iter().any(|p| u.starts_with(p)) {
                return bad(format!(
                    "uplink.url `{u}` must start with {} for sink = \"{}\"",
                    schemes.join(" or "),
                    format!("{:?}", self.uplink.sink).to_lowercase()
                ));
            }
        }
        crate::pki::Revoked::parse(&self.acl.revoked).map_err(ConfigError::Invalid)?;
        for d in &self.acl.tiers {
            if !topic::valid_device_id(d) {
                return bad(format!(
                    "acl.tiers: `{d}` is not a device id ([A-Za-z0-9._-]{{1,64}})"
                ));
            }
        }
        if self.uplink.sink == SinkKind::Tidepool {
            crate::uplink::template::Template::parse(&self.uplink.tier.topic, &['+', '#'])
                .map_err(|e| ConfigError::Invalid(format!("uplink.tier.topic: {e}")))?;
            let t = &self.uplink.tier;
            if !u.is_empty()
                && [&t.ca_file, &t.cert_file, &t.key_file]
                    .iter()
                    .any(|p| p.as_os_str().is_empty())
            {
                return bad("sink = \"tidepool\" needs uplink.tier.ca_file, cert_file and key_file: on the upstream, `tidepool certs device <this gateway's id>` writes all three".into());
            }
        }
        if self.uplink.sink == SinkKind::Mqtt {
            crate::uplink::template::Template::parse(
                &self.uplink.mqtt.topic,
                crate::uplink::mqtt::FORBIDDEN,
            )
            .map_err(|e| ConfigError::Invalid(format!("uplink.mqtt.topic: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    fn config_bundle(text: &str) -> ConfigManifest {
        toml::from_str(text).unwrap()
    }

    /// A config bundle may narrow the file's admin allow-list, never widen it; it applies only
    /// to the gateways it names; its deny-lists add to the file's.
    #[test]
    fn a_config_bundle_narrows_allow_from_names_its_gateways_and_adds_to_deny_lists() {
        let mut file = Config::defaults();
        file.gateway.id = "gw-1".into();
        file.admin.allow_from = vec!["10.0.0.0/8".into()];
        file.acl.revoked = vec!["d1".into()];
        let ok = file
            .overlaid(&config_bundle(
                "kind = \"config\"\nversion = 1\ngateways = [\"gw-1\"]\n[admin]\nallow_from = [\"10.1.0.0/16\", \"10.2.3.4\"]\n[acl]\nrevoked = [\"d2\"]\n",
            ))
            .unwrap();
        assert_eq!(ok.admin.allow_from, vec!["10.1.0.0/16", "10.2.3.4"]);
        assert_eq!(ok.acl.revoked, vec!["d1", "d2"]);
        for (bad, says) in [
            ("[admin]\nallow_from = [\"0.0.0.0/0\"]\n", "widen"),
            ("[admin]\nallow_from = [\"192.168.1.1\"]\n", "widen"),
            ("[admin]\nallow_from = []\n", "widen"),
            ("gateways = [\"gw-2\"]\n", "not this one"),
        ] {
            let text = format!("kind = \"config\"\nversion = 1\n{bad}");
            let err = file.overlaid(&config_bundle(&text)).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
        // A file that allows any address may be narrowed to anything.
        file.admin.allow_from.clear();
        let any = config_bundle(
            "kind = \"config\"\nversion = 1\n[admin]\nallow_from = [\"192.168.1.1\"]\n",
        );
        assert!(file.overlaid(&any).is_ok());
    }
    use super::*;

    #[test]
    fn defaults_parse_and_match_the_documented_values() {
        let c = Config::defaults();
        assert_eq!(c.gateway.listen.port(), 7700);
        assert_eq!(c.gateway.data_dir, PathBuf::from("./tidepool-data"));
        assert_eq!(c.acl.publish, vec!["devices/{id}/#".to_string()]);
        assert_eq!(c.ingress.max_frame_bytes, 65536);
        assert!(c.handler.is_empty());
    }

    #[test]
    fn user_keys_override_table_by_table() {
        let c = Config::from_toml_str(
            "[outbox]\nmax_delay_ms = 10\n[[handler]]\nwasm = \"a.wasm\"\nmanifest = \"a.toml\"\n[handler.config]\nthreshold = \"40\"\n",
            Path::new("/etc/tidepool/tidepool.toml"),
        )
        .unwrap();
        assert_eq!(c.outbox.max_delay_ms, 10);
        assert_eq!(c.outbox.max_batch_events, 100);
        assert_eq!(c.handler[0].wasm, PathBuf::from("/etc/tidepool/a.wasm"));
        assert_eq!(c.handler[0].config["threshold"], "40");
    }

    /// One rule: a relative path in a config file is relative to the file's folder, whatever
    /// the working directory (the data dir included, also when it is the default's).
    #[test]
    fn relative_paths_in_a_file_resolve_against_its_folder() {
        let file = Path::new("/etc/tidepool/tidepool.toml");
        let c = Config::from_toml_str("[gateway]\ndata_dir = \"data\"\n", file).unwrap();
        assert_eq!(c.gateway.data_dir, PathBuf::from("/etc/tidepool/data"));
        let c = Config::from_toml_str("", file).unwrap();
        assert_eq!(c.gateway.data_dir, Path::new("/etc/tidepool/tidepool-data"));
        let c = Config::from_toml_str("[gateway]\ndata_dir = \"/var/lib/tp\"\n", file).unwrap();
        assert_eq!(c.gateway.data_dir, PathBuf::from("/var/lib/tp"));
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(Config::from_toml_str("[outbox]\nmax_dealy_ms = 1\n", Path::new("x")).is_err());
        assert!(Config::from_toml_str("[gateway]\nid = \"a b\"\n", Path::new("x")).is_err());
        assert!(Config::from_toml_str("[acl]\npublish = [\"a/#/b\"]\n", Path::new("x")).is_err());
        let err = Config::from_toml_str(
            "[outbox]\nbulk_window_ms = 18446744073709551615\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bulk_window_ms"), "{err}");
    }

    /// A duration added to an `Instant` past its range panics (an abort in release): the
    /// finding was `uplink.timeout_ms = 18446744073709551615`. Each such value is bounded.
    #[test]
    fn durations_that_would_overflow_a_deadline_are_refused() {
        for (section, key, v) in [
            ("uplink", "timeout_ms", "18446744073709551615"),
            ("uplink", "timeout_ms", "0"),
            ("limits", "quarantine_hold_ms", "18446744073709551615"),
            ("limits", "min_timer_ms", "18446744073709551615"),
            ("uplink.mqtt", "keep_alive_s", "65536"),
            ("uplink.nats", "duplicate_window_s", "18446744073709551615"),
        ] {
            let err = Config::from_toml_str(&format!("[{section}]\n{key} = {v}\n"), Path::new("x"))
                .unwrap_err();
            assert!(err.to_string().contains(key), "{key} = {v}: {err}");
        }
    }

    /// 0 would have disabled the idle timeout (a silent peer holding its connection for good);
    /// each ingress value has bounds, and the error says which key and what range.
    #[test]
    fn ingress_values_out_of_their_range_are_refused_with_the_range() {
        for (key, v) in [
            ("idle_timeout_ms", "0"),
            ("handshake_timeout_ms", "0"),
            ("max_connections", "0"),
            ("max_handshakes", "0"),
            ("max_handshakes_per_address", "0"),
            ("max_frame_bytes", "4294967295"),
            ("max_streams_per_connection", "0"),
        ] {
            let err = Config::from_toml_str(&format!("[ingress]\n{key} = {v}\n"), Path::new("x"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("ingress.{key} = {v} is out of range")),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn the_tidepool_sink_needs_its_certificate_files_and_tiers_are_device_ids() {
        let x = Path::new("/etc/tidepool/tidepool.toml");
        let e = Config::from_toml_str(
            "[uplink]\nsink = \"tidepool\"\nurl = \"tidepool://site:7700\"\n",
            x,
        )
        .unwrap_err();
        assert!(e.to_string().contains("certs device"), "{e}");
        let c = Config::from_toml_str(
            "[uplink]\nsink = \"tidepool\"\nurl = \"tidepool://site:7700\"\n[uplink.tier]\nca_file = \"ca.crt\"\ncert_file = \"/k/edge.crt\"\nkey_file = \"edge.key\"\n",
            x,
        )
        .unwrap();
        assert_eq!(c.uplink.tier.ca_file, Path::new("/etc/tidepool/ca.crt"));
        assert_eq!(c.uplink.tier.cert_file, Path::new("/k/edge.crt"));
        assert!(Config::from_toml_str(
            "[uplink]\nsink = \"tidepool\"\nurl = \"https://site\"\n",
            x
        )
        .is_err());
        assert!(Config::from_toml_str("[acl]\ntiers = [\"a b\"]\n", x).is_err());
    }
}
