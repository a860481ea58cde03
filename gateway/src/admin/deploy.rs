//! One deploy, whatever brought the bundle (the offline inbox today, the admin channel later):
//! everything is checked before anything changes (signature, pin, version floor, caps, module),
//! then the dispatcher's thread loads the handler (`tp_init`) and swaps it in between two turns,
//! and the registry records it (synced) before the deploy is reported done.

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::bundle::{self, PublicKey};
use crate::config::{BoxLimits, Config};
use crate::dispatch::thread::{Inbox, Install};
use crate::sandbox::{HostEnv, Runtime};
use crate::store::Store;

/// A deploy that took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    pub name: String,
    pub version: u64,
    /// The version it replaced (`None`: a new handler).
    pub replaced: Option<u64>,
    /// The signer's key fingerprint.
    pub signer: String,
}

impl std::fmt::Display for Deployed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` version {} ", self.name, self.version)?;
        match self.replaced {
            Some(v) => write!(f, "replaced version {v}")?,
            None => write!(f, "is a new handler")?,
        }
        write!(f, ", signed by {}", self.signer)
    }
}

/// Why a deploy did not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    /// The bundle is refused, for good: nothing changed.
    #[error("{0}")]
    Refused(String),
    /// The gateway is stopping: nothing changed, and the bundle may be deployed again later.
    #[error("the gateway is stopping")]
    Stopping,
}

/// A store read failed: the gateway stops (as on any store error).
fn store_failed(e: crate::store::StoreError) -> DeployError {
    crate::store::fatal("reading the registry", e)
}

/// The handler names the local config pins (`[[handler]]`): every configured manifest that
/// reads, loaded or not. While one does not read, which names it pins is unknown, and deploys
/// are refused.
#[derive(Debug, Clone, Default)]
pub struct Pinned {
    pub names: BTreeSet<String>,
    /// A configured manifest that does not read (its path), if any.
    pub unknown: Option<String>,
}

impl Pinned {
    pub fn of(cfg: &Config) -> Pinned {
        let mut p = Pinned::default();
        for entry in &cfg.handler {
            match crate::sandbox::Manifest::load(&entry.manifest) {
                Ok(m) => {
                    p.names.insert(m.name);
                }
                Err(_) => p.unknown = Some(entry.manifest.display().to_string()),
            }
        }
        p
    }
}

/// What a deploy checks against, and where it installs.
pub struct Deployer {
    trusted: Vec<PublicKey>,
    max_bytes: u64,
    caps: BoxLimits,
    /// Names of the handlers in the local config: trusted as the config is, never replaced.
    pinned: Pinned,
    store: Store,
    inbox: Inbox,
    env: HostEnv,
    runtime: tokio::runtime::Handle,
    /// One deploy at a time (the floor is read, then raised).
    one: Mutex<()>,
}

impl Deployer {
    pub fn new(
        cfg: &Config,
        pinned: Pinned,
        (store, inbox, env): (Store, Inbox, HostEnv),
        runtime: tokio::runtime::Handle,
    ) -> Result<Deployer, crate::config::ConfigError> {
        Ok(Deployer {
            trusted: cfg.deploy.keys()?,
            max_bytes: cfg.deploy.max_bundle_bytes,
            caps: cfg.limits.clone(),
            pinned,
            store,
            inbox,
            env,
            runtime,
            one: Mutex::new(()),
        })
    }

    /// The largest bundle read at all.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Verifies and deploys a bundle's bytes (from a blocking thread, not the runtime's):
    /// what was deployed, or why nothing changed.
    pub fn deploy(&self, bytes: &[u8]) -> Result<Deployed, DeployError> {
        let _one = self.one.lock().unwrap_or_else(|p| p.into_inner());
        let v = bundle::verify(bytes, self.max_bytes, &self.trusted)
            .map_err(|e| DeployError::Refused(e.to_string()))?;
        if let Some(unread) = &self.pinned.unknown {
            return Err(DeployError::Refused(format!(
                "the configured handler {unread} does not read, so which names it pins is not known: fix it (deploys are refused until then)"
            )));
        }
        let (name, version) = (v.manifest.name.clone(), v.manifest.version);
        if self.pinned.names.contains(&name) {
            return Err(DeployError::Refused(format!(
                "`{name}` is pinned: it is configured in [[handler]] on this box, and a deploy of it is refused"
            )));
        }
        let floor = self.store.version_floor(&name).map_err(store_failed)?;
        if version <= floor {
            return Err(DeployError::Refused(format!(
                "version {version} of `{name}` is not above {floor}, the highest installed here (going back is a rollback)"
            )));
        }
        v.manifest
            .check(&self.caps)
            .map_err(|e| DeployError::Refused(e.to_string()))?;
        // Compiled here, not on the dispatcher's thread (which runs only its `tp_init`).
        let runtime = Runtime::default();
        let module = crate::sandbox::compile(&runtime, &v.wasm, &v.manifest)
            .map_err(|e| DeployError::Refused(e.to_string()))?;
        // A new handler starts from what its name holds on disk; one replaced keeps its count
        // (`Tree::install`: its pending writes are not on disk yet).
        let state_used = self.store.state_bytes(&name).map_err(store_failed)?;
        let install = Install {
            manifest: v.manifest,
            runtime,
            module,
            env: self.env.clone(),
            state_used,
        };
        let replaced = self
            .runtime
            .block_on(self.inbox.install(install))
            .map_err(|_| DeployError::Stopping)?
            .map_err(DeployError::Refused)?;
        // Running now; recorded before the deploy is reported (a crash in between leaves the
        // bundle where it came from, and it is deployed again).
        if let Err(e) = self.store.record_deploy(&name, bytes, version) {
            crate::store::fatal("recording a deploy", e);
        }
        Ok(Deployed {
            name,
            version,
            replaced,
            signer: v.signer.fingerprint(),
        })
    }
}
