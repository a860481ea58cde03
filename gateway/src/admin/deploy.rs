//! What changes the handlers a box runs from bundles, whatever asked (the offline inbox, the
//! admin channel, the local socket, a failed probation): `deploy`, `rollback`, `remove`, and
//! `list` to see the registry. Everything is checked before anything changes (signature, pin,
//! version floor, caps, module); then the dispatcher's thread loads the handler (`tp_init`)
//! and swaps it in between two turns, or takes it out; then the registry records it (synced)
//! before the change is reported. A reload's `[[handler]]` list goes through here too
//! (`reload_handlers`, the rule in `configured.rs`), one change at a time with the others.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use super::bundle::{self, PublicKey};
use super::configured::{self, Configured, Pinned, Running, Skipped};
use crate::config::{BoxLimits, Config, ConfigManifest, HandlerEntry};
use crate::dispatch::thread::{Inbox, Install};
use crate::dispatch::{HandlerStatus, ProbationEnd, ProbationStatus};
use crate::sandbox::probation::{End, Rules};
use crate::sandbox::{HostEnv, Runtime};
use crate::store::Store;

/// A deploy that took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deployed {
    pub name: String,
    pub version: u64,
    /// The version it replaced (`None`: a new handler).
    pub replaced: Option<u64>,
    /// The signer's key fingerprint.
    pub signer: String,
    /// Whether it runs on probation.
    pub probation: bool,
}

impl std::fmt::Display for Deployed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` version {} ", self.name, self.version)?;
        match self.replaced {
            Some(v) => write!(f, "replaced version {v}")?,
            None => write!(f, "is a new handler")?,
        }
        write!(f, ", signed by {}", self.signer)?;
        if self.probation {
            write!(f, "; on probation")?;
        }
        Ok(())
    }
}

/// A rollback or a removal that took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Changed {
    pub name: String,
    /// The version that ran before (`None`: none ran).
    pub from: Option<u64>,
    /// The version that runs now (`None`: removed).
    pub to: Option<u64>,
}

impl std::fmt::Display for Changed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = |v: Option<u64>| v.map_or("nothing".to_string(), |v| format!("version {v}"));
        match self.to {
            Some(_) => write!(
                f,
                "`{}` rolled back from {} to {}",
                self.name,
                v(self.from),
                v(self.to)
            ),
            None => write!(
                f,
                "`{}` removed ({}), with its state, timer and quarantine",
                self.name,
                v(self.from)
            ),
        }
    }
}

/// One handler name as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    pub name: String,
    /// `bundle` (deployed) or `config` (pinned by `[[handler]]`).
    pub source: &'static str,
    /// The version running now (`None`: none).
    pub running: Option<u64>,
    /// The version a rollback goes back to.
    pub previous: Option<u64>,
    /// The highest version ever installed from a bundle (a deploy must exceed it).
    pub floor: u64,
    /// The current bundle's signer (fingerprint).
    pub signer: Option<String>,
    pub probation: Option<ProbationStatus>,
    /// Whether its version has yet to pass its probation (recorded once it has: a probation
    /// judged and being rolled back, or its pass being recorded, shows here without the
    /// running count).
    pub on_probation: bool,
    /// What last happened to it when it was not a deploy (a rollback, a removal), and why.
    pub note: Option<String>,
}

/// Why a change did not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    /// Refused, for good: nothing changed.
    #[error("{0}")]
    Refused(String),
    /// The gateway is stopping: nothing changed, and it may be asked again later.
    #[error("the gateway is stopping")]
    Stopping,
}

/// A store read failed: the gateway stops (as on any store error).
fn store_failed(e: crate::store::StoreError) -> DeployError {
    crate::store::fatal("reading the registry", e)
}

/// A registry write failed: the gateway stops (what runs and what is recorded would differ).
fn record_failed(e: crate::store::StoreError) -> ! {
    crate::store::fatal("recording in the registry", e)
}

/// What becomes of a deployed version's probation as it is loaded again (at start, or
/// uncovered by a reload), by [`resumed_probation`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resumed {
    /// It was not on probation.
    None,
    /// Its probation was under way: its count and window start again.
    Again(Rules),
    /// Its window went by while it did not run (or probation is off): record it as passed,
    /// once it runs.
    Passed,
}

/// What becomes of a probation that began at `since` (the registry's, by the wall clock, the
/// only one that outlives a restart) at `now_ms`, under `rules` (`None`: probation off). Pure.
pub fn resumed_probation(since: Option<u64>, rules: Option<Rules>, now_ms: u64) -> Resumed {
    match (since, rules) {
        (None, _) => Resumed::None,
        (Some(since), Some(rules)) if now_ms.saturating_sub(since) < rules.window_ms => {
            Resumed::Again(rules)
        }
        (Some(_), _) => Resumed::Passed,
    }
}

/// The version and signer a registered bundle names (it was verified when it was installed).
fn describe(bytes: &[u8]) -> Option<(u64, String)> {
    let f = bundle::frame(bytes, u64::MAX).ok()?;
    let text = std::str::from_utf8(f.manifest).ok()?;
    let m = bundle::parse_manifest(text).ok()?;
    Some((m.version, f.signer.fingerprint()))
}

/// The registry name of the box's config bundle (not a handler name: `@` is not allowed in
/// one).
pub const CONFIG: &str = "@config";

/// The keys in force: the box's own (from its file: they sign config bundles too) and every
/// key a handler bundle may be signed by (those and the ones a config bundle added).
#[derive(Debug, Clone, Default)]
struct Keys {
    own: Vec<PublicKey>,
    handlers: Vec<PublicKey>,
}

/// A config bundle in force: its settings, and who signed them.
#[derive(Debug, Clone)]
pub struct ConfigInForce {
    pub manifest: ConfigManifest,
    pub signer: PublicKey,
}

/// The config bundle in the registry, if any (read at start: its bytes were verified when it
/// was deployed, and its signature is checked again here; whether its signer is still
/// trusted is [`in_force`]'s to say).
pub fn stored_config_bundle(
    store: &Store,
) -> Result<Option<ConfigInForce>, crate::store::StoreError> {
    let Some(bytes) = store.registered(CONFIG)?.current else {
        return Ok(None);
    };
    // The signature before the manifest is parsed, as everywhere.
    let read = bundle::frame(&bytes, u64::MAX)
        .ok()
        .filter(|f| f.signature_holds())
        .and_then(|f| {
            let manifest = bundle::parse_config(std::str::from_utf8(f.manifest).ok()?).ok()?;
            Some(ConfigInForce {
                manifest,
                signer: f.signer,
            })
        });
    if read.is_none() {
        tracing::error!("the config bundle in the registry does not read: it is not in force");
    }
    Ok(read)
}

/// `file` with `held` in force. When its signer is no longer one of the file's keys, or its
/// settings no longer check with this file, only its deny-lists stay in force (a bundle's
/// revocations are never undone by a change of keys), logged at ERROR.
pub fn in_force(file: &Config, held: Option<&ConfigInForce>) -> Config {
    let Some(held) = held else {
        return file.clone();
    };
    let own = file.deploy.keys().unwrap_or_default();
    let why = match own.contains(&held.signer) {
        false => format!(
            "it was signed by {}, no longer in deploy.trusted_keys",
            held.signer.fingerprint()
        ),
        true => match file.overlaid(&held.manifest) {
            Ok(c) => return c,
            Err(e) => format!("its settings do not fit this config: {e}"),
        },
    };
    tracing::error!(
        version = held.manifest.version,
        "the config bundle is not in force ({why}): only its deny-lists stay"
    );
    let deny = ConfigManifest {
        kind: held.manifest.kind,
        version: held.manifest.version,
        acl: crate::config::ConfigAcl {
            publish: None,
            revoked: held.manifest.acl.revoked.clone(),
        },
        admin: crate::config::ConfigAdmin {
            allow_from: None,
            revoked: held.manifest.admin.revoked.clone(),
        },
        ..ConfigManifest::default()
    };
    file.overlaid(&deny).unwrap_or_else(|e| {
        tracing::error!("the config bundle's deny-lists do not read either: {e}");
        file.clone()
    })
}

/// The version and signer a registered config bundle names.
fn describe_config(bytes: &[u8]) -> Option<(u64, String)> {
    let f = bundle::frame(bytes, u64::MAX).ok()?;
    let m = bundle::parse_config(std::str::from_utf8(f.manifest).ok()?).ok()?;
    Some((m.version, f.signer.fingerprint()))
}

/// What a change checks against, and where it installs.
pub struct Deployer {
    keys: std::sync::RwLock<Keys>,
    /// The box's config file as last (re)loaded: a config bundle is checked on top of it.
    file: Mutex<Config>,
    /// Where a deployed config bundle goes to be put in force (the gateway's reload task).
    settings: tokio::sync::mpsc::UnboundedSender<ConfigInForce>,
    max_bytes: u64,
    caps: BoxLimits,
    probation: Option<Rules>,
    /// The handlers of the local config: trusted as the config is, never replaced by a
    /// bundle; changed by a reload.
    configured: Mutex<Configured>,
    /// Deployed handlers that do not run, by name: why (`status` shows them).
    bundle_skips: Mutex<BTreeMap<String, String>>,
    store: Store,
    inbox: Inbox,
    env: HostEnv,
    runtime: tokio::runtime::Handle,
    /// One change at a time (the floor is read, then raised; the registry read, then moved).
    one: Mutex<()>,
}

impl Deployer {
    /// A deployer on the box's config `file`, with `cfg` in force (the file and its config
    /// bundle); a deployed config bundle is sent to `settings`.
    pub fn new(
        (file, cfg): (&Config, &Config),
        (configured, bundle_skips): (Configured, BTreeMap<String, String>),
        (store, inbox, env): (Store, Inbox, HostEnv),
        runtime: tokio::runtime::Handle,
        settings: tokio::sync::mpsc::UnboundedSender<ConfigInForce>,
    ) -> Result<Deployer, crate::config::ConfigError> {
        let d = Deployer {
            keys: Default::default(),
            file: Mutex::new(file.clone()),
            settings,
            max_bytes: cfg.deploy.max_bundle_bytes,
            caps: cfg.limits.clone(),
            probation: cfg.deploy.probation(),
            configured: Mutex::new(configured),
            bundle_skips: Mutex::new(bundle_skips),
            store,
            inbox,
            env,
            runtime,
            one: Mutex::new(()),
        };
        d.configure(file, cfg)?;
        Ok(d)
    }

    /// Puts a reloaded config `file`, and `cfg` (it with its config bundle), in force for the
    /// checks: the keys.
    pub fn configure(&self, file: &Config, cfg: &Config) -> Result<(), crate::config::ConfigError> {
        let keys = Keys {
            own: file.deploy.keys()?,
            handlers: cfg.deploy.handler_keys()?,
        };
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = file.clone();
        Ok(())
    }

    fn keys(&self) -> Keys {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The largest bundle read at all.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.one.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn configured(&self) -> std::sync::MutexGuard<'_, Configured> {
        self.configured.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bundle_skips(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.bundle_skips.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handlers that do not run: configured ones that did not load, deployed ones
    /// skipped (at start, or uncovered by a reload and not loaded).
    pub fn skipped(&self) -> Vec<Skipped> {
        let mut all = self.configured().skipped.clone();
        all.extend(self.bundle_skips().iter().map(|(name, reason)| Skipped {
            source: format!("bundle {name}"),
            reason: reason.clone(),
        }));
        all
    }

    fn refuse_pinned(&self, name: &str, what: &str) -> Result<(), DeployError> {
        let pinned = self.configured().pinned.clone();
        if let Some(unread) = &pinned.unknown {
            return Err(DeployError::Refused(format!(
                "the configured handler {unread} does not read, so which names it pins is not known: fix it (deploys, rollbacks and removals are refused until then)"
            )));
        }
        if pinned.names.contains(name) {
            return Err(DeployError::Refused(format!(
                "`{name}` is pinned: it is configured in [[handler]] on this box, and {what} of it is refused (edit the config instead)"
            )));
        }
        Ok(())
    }

    /// Checks a handler (a verified bundle's, or a configured one's with its `overrides`)
    /// against the caps and compiles it (off the dispatcher's thread), then has the
    /// dispatcher's thread run its `tp_init` and swap it in: the version it replaced.
    fn install(
        &self,
        (manifest, wasm): (crate::sandbox::Manifest, &[u8]),
        overrides: BTreeMap<String, String>,
        probation: Option<Rules>,
    ) -> Result<Option<u64>, DeployError> {
        manifest
            .check(&self.caps)
            .map_err(|e| DeployError::Refused(e.to_string()))?;
        let runtime = Runtime::default();
        let module = crate::sandbox::compile(&runtime, wasm, &manifest)
            .map_err(|e| DeployError::Refused(e.to_string()))?;
        // A new handler starts from what its name holds on disk; one replaced keeps its count
        // (`Tree::install`: its pending writes are not on disk yet).
        let state_used = self
            .store
            .state_bytes(&manifest.name)
            .map_err(store_failed)?;
        let install = Install {
            manifest,
            runtime,
            module,
            env: self.env.clone(),
            state_used,
            probation,
            overrides,
        };
        self.runtime
            .block_on(self.inbox.install(install))
            .map_err(|_| DeployError::Stopping)?
            .map_err(DeployError::Refused)
    }

    /// Verifies and deploys a bundle's bytes (from a blocking thread, not the runtime's):
    /// what was deployed, or why nothing changed. `by` names who asked, for the log.
    pub fn deploy(&self, bytes: &[u8], by: &str) -> Result<Deployed, DeployError> {
        let _one = self.lock();
        let keys = self.keys();
        let v = match bundle::verify_any(bytes, self.max_bytes, &keys.handlers)
            .map_err(|e| DeployError::Refused(e.to_string()))?
        {
            bundle::Signed::Handler(v) => v,
            bundle::Signed::Config(c) => return self.deploy_config(bytes, c, &keys, by),
        };
        let (name, version) = (v.manifest.name.clone(), v.manifest.version);
        self.refuse_pinned(&name, "a deploy")?;
        let floor = self.store.version_floor(&name).map_err(store_failed)?;
        if version <= floor {
            return Err(DeployError::Refused(format!(
                "version {version} of `{name}` is not above {floor}, the highest installed here (going back is a rollback)"
            )));
        }
        let signer = v.signer.fingerprint();
        let replaced = self.install((v.manifest, &v.wasm), BTreeMap::new(), self.probation)?;
        self.bundle_skips().remove(&name);
        // Running now; recorded before the deploy is reported (a crash in between leaves the
        // bundle where it came from, and it is deployed again).
        let since = self.probation.map(|_| crate::clock::now_ms());
        if let Err(e) = self.store.record_deploy(&name, bytes, version, since) {
            record_failed(e);
        }
        let d = Deployed {
            name,
            version,
            replaced,
            signer,
            probation: since.is_some(),
        };
        tracing::info!(by, "deployed: {d}");
        Ok(d)
    }

    /// A config bundle: signed by one of the box's own keys, above its floor, and the box's
    /// config with it still checks; recorded (synced), then put in force by the gateway.
    fn deploy_config(
        &self,
        bytes: &[u8],
        c: bundle::VerifiedConfig,
        keys: &Keys,
        by: &str,
    ) -> Result<Deployed, DeployError> {
        let signer = c.signer.fingerprint();
        if !keys.own.contains(&c.signer) {
            return Err(DeployError::Refused(format!(
                "a config bundle must be signed by one of the box's own deploy.trusted_keys (in its config file), not {signer}, which a config bundle added"
            )));
        }
        let version = c.manifest.version;
        let floor = self.store.version_floor(CONFIG).map_err(store_failed)?;
        if version <= floor {
            return Err(DeployError::Refused(format!(
                "config bundle version {version} is not above {floor}, the highest installed here"
            )));
        }
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner()).clone();
        file.overlaid(&c.manifest)
            .map_err(|e| DeployError::Refused(format!("the config bundle's settings: {e}")))?;
        let before = self
            .store
            .registered(CONFIG)
            .map_err(store_failed)?
            .current
            .as_deref()
            .and_then(describe_config)
            .map(|(v, _)| v);
        if let Err(e) = self.store.record_deploy(CONFIG, bytes, version, None) {
            record_failed(e);
        }
        let held = ConfigInForce {
            manifest: c.manifest,
            signer: c.signer,
        };
        // Its keys before it is reported (a handler signed by one may follow at once); the
        // ACLs and deny-lists through the gateway's reload task, as a reload's.
        let cfg = in_force(&file, Some(&held));
        if let Err(e) = self.configure(&file, &cfg) {
            tracing::error!("the config bundle's keys: {e}");
        }
        let _ = self.settings.send(held);
        let d = Deployed {
            name: CONFIG.to_string(),
            version,
            replaced: before,
            signer,
            probation: false,
        };
        tracing::info!(by, "config bundle deployed: {d}");
        Ok(d)
    }

    /// Goes back to the version `name` ran before (its floor stays: the newer version cannot
    /// be deployed again, only a higher one). `why` is kept in the registry.
    pub fn rollback(&self, name: &str, by: &str, why: &str) -> Result<Changed, DeployError> {
        let _one = self.lock();
        self.rollback_locked(name, by, why, None)
    }

    /// A rollback, when `expected` (if given) is still the current version.
    fn rollback_locked(
        &self,
        name: &str,
        by: &str,
        why: &str,
        expected: Option<u64>,
    ) -> Result<Changed, DeployError> {
        self.refuse_pinned(name, "a rollback")?;
        let r = self.store.registered(name).map_err(store_failed)?;
        let Some(current) = r.current.as_deref().and_then(describe) else {
            return Err(DeployError::Refused(format!(
                "no handler `{name}` was deployed here"
            )));
        };
        if expected.is_some_and(|v| v != current.0) {
            return Err(DeployError::Refused(format!(
                "`{name}` runs version {} now, not the one to roll back",
                current.0
            )));
        }
        let Some(previous) = r.previous else {
            return Err(DeployError::Refused(format!(
                "`{name}` version {} has no previous version kept here to go back to (remove it instead)",
                current.0
            )));
        };
        // Checked again: a key taken out of deploy.trusted_keys since no longer runs.
        let v = bundle::verify(&previous, u64::MAX, &self.keys().handlers).map_err(|e| {
            DeployError::Refused(format!("the previous version cannot run again: {e}"))
        })?;
        let to = v.manifest.version;
        self.install((v.manifest, &v.wasm), BTreeMap::new(), None)?;
        self.bundle_skips().remove(name);
        let note = format!(
            "rolled back from version {} to {to} by {by}: {why}",
            current.0
        );
        if let Err(e) = self.store.record_rollback(name, &note) {
            record_failed(e);
        }
        let c = Changed {
            name: name.to_string(),
            from: Some(current.0),
            to: Some(to),
        };
        tracing::warn!(by, why, "{c}");
        Ok(c)
    }

    /// Takes `name` out, with its state, timer and quarantine; its floor stays (an old bundle
    /// of it cannot come back, a higher version can). `why` is kept in the registry.
    pub fn remove(&self, name: &str, by: &str, why: &str) -> Result<Changed, DeployError> {
        let _one = self.lock();
        self.remove_locked(name, by, why)
    }

    fn remove_locked(&self, name: &str, by: &str, why: &str) -> Result<Changed, DeployError> {
        self.refuse_pinned(name, "a removal")?;
        let r = self.store.registered(name).map_err(store_failed)?;
        if r.current.is_none() && r.floor == 0 {
            return Err(DeployError::Refused(format!(
                "no handler `{name}` was deployed here"
            )));
        }
        let from = self
            .runtime
            .block_on(self.inbox.remove(name))
            .map_err(|_| DeployError::Stopping)?;
        let note = format!("removed by {by}: {why}");
        if let Err(e) = self.store.record_remove(name, &note) {
            record_failed(e);
        }
        self.bundle_skips().remove(name);
        let c = Changed {
            name: name.to_string(),
            from,
            to: None,
        };
        tracing::warn!(by, why, "{c}");
        Ok(c)
    }

    /// Puts a reloaded config file's `[[handler]]` list in force (the rule in
    /// `configured.rs`), from a blocking thread, one change at a time with the others. Each
    /// change is logged, and why one did not take; a manifest that does not read leaves the
    /// whole list in force.
    pub fn reload_handlers(&self, entries: &[HandlerEntry]) {
        let _one = self.lock();
        let mut reads = Vec::with_capacity(entries.len());
        for entry in entries {
            match configured::read(entry) {
                Ok(r) => reads.push(r),
                Err(e) => {
                    tracing::error!("reload: the handlers in force stay, a [[handler]] manifest does not read: {e}");
                    return;
                }
            }
        }
        let before = self.configured().clone();
        let named: Vec<(&str, u64)> = reads
            .iter()
            .map(|r| (r.manifest.name.as_str(), r.digest))
            .collect();
        let plan = configured::plan(&before.running, &named);
        let mut now = Configured {
            pinned: Pinned {
                names: named.iter().map(|(n, _)| n.to_string()).collect(),
                unknown: None,
            },
            running: before.running.clone(),
            skipped: Vec::new(),
        };
        let stopping = || tracing::warn!("reload cut short: the gateway is stopping");
        let mut changed = 0;
        // Names no entry pins any more: a deployed bundle of the name runs (in place of the
        // configured one, if it ran: its timer and state count go on), else the configured
        // one is unloaded; its state stays, as after a restart.
        let released: Vec<String> = before
            .pinned
            .names
            .difference(&now.pinned.names)
            .cloned()
            .collect();
        for name in &released {
            let ran = before.running.iter().any(|r| &r.name == name);
            now.running.retain(|r| &r.name != name);
            self.bundle_skips().remove(name);
            let uncovered = self.uncover(name);
            if ran
                && !matches!(uncovered, Ok(Some(_)))
                && self.runtime.block_on(self.inbox.unload(name)).is_err()
            {
                return stopping();
            }
            changed += 1;
            match uncovered {
                Ok(Some(v)) => tracing::warn!(
                    handler = name,
                    "reload: no longer in [[handler]]: its deployed version {v} runs"
                ),
                Ok(None) if ran => tracing::warn!(
                    handler = name,
                    "reload: no longer in [[handler]]: unloaded (its state stays on disk)"
                ),
                Ok(None) => tracing::info!(handler = name, "reload: no longer in [[handler]]"),
                Err(DeployError::Stopping) => return stopping(),
                Err(DeployError::Refused(why)) => {
                    tracing::error!(
                        handler = name,
                        "reload: no longer in [[handler]]; its deployed version does not run: {why}"
                    );
                    self.bundle_skips().insert(name.clone(), why);
                }
            }
        }
        let mut failed = 0;
        for &i in &plan.load {
            let r = &reads[i];
            let name = r.manifest.name.clone();
            let was = before.running.iter().any(|x| x.name == name);
            let installed = match &r.wasm {
                Ok(wasm) => self.install((r.manifest.clone(), wasm), r.overrides.clone(), None),
                Err(why) => Err(DeployError::Refused(why.clone())),
            };
            match installed {
                Ok(replaced) => {
                    changed += 1;
                    now.running.retain(|x| x.name != name);
                    now.running.push(Running {
                        name: name.clone(),
                        digest: r.digest,
                    });
                    if replaced.is_some() && !was {
                        // It took the place of a deployed version.
                        self.bundle_skips().insert(
                            name.clone(),
                            format!(
                                "`{name}` is configured in [[handler]]: the configured one runs"
                            ),
                        );
                    }
                    tracing::info!(
                        handler = name,
                        version = r.manifest.version,
                        replaced = ?replaced,
                        "reload: loaded from [[handler]]"
                    );
                }
                Err(DeployError::Stopping) => return stopping(),
                Err(DeployError::Refused(why)) => {
                    failed += 1;
                    let reason = match (self.running_version(&name), was) {
                        (Some(v), true) => format!(
                            "the changed entry did not load, version {v} keeps running: {why}"
                        ),
                        (Some(v), false) => {
                            // A deployed version runs: it goes on, and its name is not pinned
                            // until the entry loads (it can still be rolled back or removed).
                            now.pinned.names.remove(&name);
                            format!("did not load, the deployed version {v} keeps running: {why}")
                        }
                        (None, _) => why,
                    };
                    tracing::error!(handler = name, manifest = r.source, "reload: {reason}");
                    now.skipped.push(Skipped {
                        source: r.source.clone(),
                        reason,
                    });
                }
            }
        }
        for &i in &plan.duplicate {
            let r = &reads[i];
            let reason = format!("a handler named `{}` is already loaded", r.manifest.name);
            tracing::error!(manifest = r.source, "reload: not loaded: {reason}");
            now.skipped.push(Skipped {
                source: r.source.clone(),
                reason,
            });
        }
        let quiet = changed == 0 && failed == 0 && now.pinned == before.pinned;
        *self.configured() = now;
        match quiet {
            true => tracing::debug!("reload: [[handler]] unchanged"),
            false => tracing::info!(
                loaded = plan.load.len() - failed,
                not_loaded = failed + plan.duplicate.len(),
                released = released.len(),
                unchanged = plan.unchanged,
                "reload: the [[handler]] list is in force"
            ),
        }
    }

    /// The version of `name` that runs now, as the dispatcher reports it (`None`: none, or
    /// the gateway is stopping).
    fn running_version(&self, name: &str) -> Option<u64> {
        let status = self.runtime.block_on(self.inbox.status()).ok()?;
        status.iter().find(|h| h.name == name).map(|h| h.version)
    }

    /// Loads `name`'s deployed bundle again, once no `[[handler]]` entry pins it (checked
    /// again as at start; in place of a handler of that name that runs): the version that
    /// runs, `None` when none is deployed.
    fn uncover(&self, name: &str) -> Result<Option<u64>, DeployError> {
        let r = self.store.registered(name).map_err(store_failed)?;
        let Some(bytes) = r.current else {
            return Ok(None);
        };
        let v = bundle::verify(&bytes, u64::MAX, &self.keys().handlers)
            .map_err(|e| DeployError::Refused(e.to_string()))?;
        let resumed = resumed_probation(r.probation_since, self.probation, crate::clock::now_ms());
        let version = v.manifest.version;
        let rules = match resumed {
            Resumed::Again(rules) => Some(rules),
            _ => None,
        };
        self.install((v.manifest, &v.wasm), BTreeMap::new(), rules)?;
        if resumed == Resumed::Passed {
            if let Err(e) = self.store.record_passed(name) {
                record_failed(e);
            }
        }
        Ok(Some(version))
    }

    /// A probation ended: a pass is recorded, a failure rolled back (a new handler, with no
    /// version before it, removed).
    pub fn probation_ended(&self, end: ProbationEnd) {
        let _one = self.lock();
        let why = match end.end {
            End::Passed => {
                // Only if that version still runs (a later deploy has its own probation).
                let current = self.store.registered(&end.name).map_err(store_failed);
                let runs = current
                    .ok()
                    .and_then(|r| r.current)
                    .and_then(|b| describe(&b))
                    .is_some_and(|(v, _)| v == end.version);
                if runs {
                    if let Err(e) = self.store.record_passed(&end.name) {
                        record_failed(e);
                    }
                }
                return;
            }
            End::Failed(why) => format!("version {} failed its probation: {why}", end.version),
        };
        let by = "probation";
        let Ok(r) = self.store.registered(&end.name).map_err(store_failed) else {
            return;
        };
        // Only if the failed version is still the one recorded as running (an operator may
        // have rolled it back, or deployed another, since).
        if r.current.as_deref().and_then(describe).map(|(v, _)| v) != Some(end.version) {
            tracing::info!(
                handler = end.name,
                version = end.version,
                "a failed probation is moot: that version no longer runs"
            );
            return;
        }
        let result = match r.previous.is_some() {
            true => self.rollback_locked(&end.name, by, &why, Some(end.version)),
            false => self.remove_locked(&end.name, by, &why),
        };
        if let Err(e) = result {
            tracing::error!(handler = end.name, "could not undo the failed version: {e}");
        }
    }

    /// Every handler name: deployed ones (running or not, removed ones with their floor and
    /// why) and pinned ones, with what runs (`running`: the dispatcher's status).
    pub fn list(&self, running: &[HandlerStatus]) -> Result<Vec<Listed>, DeployError> {
        let mut out = Vec::new();
        let now_running = |name: &str| running.iter().find(|h| h.name == name);
        let pinned = self.configured().pinned.names.clone();
        for name in self.store.registry_names().map_err(store_failed)? {
            if name == CONFIG {
                let r = self.store.registered(CONFIG).map_err(store_failed)?;
                let current = r.current.as_deref().and_then(describe_config);
                out.push(Listed {
                    name,
                    source: "settings",
                    running: current.as_ref().map(|c| c.0),
                    previous: None,
                    floor: r.floor,
                    signer: current.map(|c| c.1),
                    probation: None,
                    on_probation: false,
                    note: r.note,
                });
                continue;
            }
            if pinned.contains(&name) {
                continue;
            }
            let r = self.store.registered(&name).map_err(store_failed)?;
            let h = now_running(&name);
            out.push(Listed {
                source: "bundle",
                running: h.map(|h| h.version),
                previous: r.previous.as_deref().and_then(describe).map(|(v, _)| v),
                floor: r.floor,
                signer: r.current.as_deref().and_then(describe).map(|(_, s)| s),
                probation: h.and_then(|h| h.probation.clone()),
                on_probation: r.probation_since.is_some(),
                note: r.note,
                name,
            });
        }
        for name in &pinned {
            let h = now_running(name);
            out.push(Listed {
                name: name.clone(),
                source: "config",
                running: h.map(|h| h.version),
                previous: None,
                floor: 0,
                signer: None,
                probation: None,
                on_probation: false,
                note: None,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
