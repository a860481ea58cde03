//! Wiring: opens the store, loads the handlers, starts the committer and dispatcher threads,
//! the uplink and the QUIC endpoint, and on stop drains them in order (stop reading, settle,
//! answer, close, stop the dispatcher, commit what is left, write the metrics).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::admin::configured::{Configured, Skipped};
use crate::config::{Config, SinkKind};
use crate::control::{self, Control};
use crate::dispatch::{thread, Dispatcher, EventState};
use crate::ingress::{self, Shared};
use crate::metrics::Metrics;
use crate::os::disk::DiskWatch;
use crate::outbox::Outbox;
use crate::pki::{self, PkiPaths};
use crate::record::RecordTap;
use crate::sandbox::{Handler, HostEnv, Runtime};
use crate::store::commit::{self, AfterFlush, Backlog, Group};
use crate::store::Store;
use crate::uplink::{http::HttpSink, mqtt::MqttSink, Sink, Uplink};

/// Events that may wait for the committer before the dispatcher blocks (backpressure).
const COMMIT_BACKLOG: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Tls(#[from] ingress::tls::TlsError),
    #[error(transparent)]
    Mqtt(#[from] crate::uplink::mqtt::MqttSetupError),
    #[error(transparent)]
    Http(#[from] crate::uplink::http::HttpSetupError),
    #[error(transparent)]
    Tier(#[from] crate::uplink::tier::TierSetupError),
    #[cfg(feature = "nats")]
    #[error(transparent)]
    Nats(#[from] crate::uplink::nats::NatsSetupError),
    #[error("uplink.sink = \"nats\", but this build has no NATS sink: build with `cargo build --release --features nats`")]
    NoNats,
    #[error("{0}")]
    Revoked(String),
    #[error(transparent)]
    Process(#[from] crate::os::process::ProcessError),
    #[error("deploy: {0}")]
    Deploy(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Loads the configured handlers (`[[handler]]`). One that does not load (an unreadable or
/// invalid manifest, limits above the box's caps, a second handler of a name, a module that
/// breaks the ABI or fails its `tp_init`) is skipped and returned with the reason; only a
/// store error stops the start. Returns them with the list in force (what a reload changes).
pub fn load_handlers(
    cfg: &Config,
    store: &Store,
    env: &HostEnv,
) -> Result<(Vec<Handler>, Configured), StartError> {
    let runtime = Runtime::default();
    let mut handlers: Vec<Handler> = Vec::new();
    let mut list = Configured::default();
    for entry in &cfg.handler {
        // Every configured manifest that reads pins its name, loaded or not.
        let loaded = match crate::admin::configured::read(entry) {
            Ok(read) => {
                list.pinned.names.insert(read.manifest.name.clone());
                load_one(read, cfg, store, env, &runtime, &handlers)?
            }
            Err(e) => {
                list.pinned.unknown = Some(entry.manifest.display().to_string());
                Err(e.to_string())
            }
        };
        match loaded {
            Ok((h, digest)) => {
                list.running.push(crate::admin::configured::Running {
                    name: h.name().to_string(),
                    digest,
                });
                handlers.push(h);
            }
            Err(reason) => {
                tracing::error!(manifest = %entry.manifest.display(), "handler skipped, the others are served: {reason}");
                list.skipped.push(Skipped {
                    source: entry.manifest.display().to_string(),
                    reason,
                });
            }
        }
    }
    Ok((handlers, list))
}

/// Loads the handlers deployed from bundles (the registry's current versions), checked again
/// as at their deploy (a key since taken out of `deploy.trusted_keys` no longer runs). A name
/// in `pinned` (configured in `[[handler]]`) is not loaded: the configured one runs.
pub fn load_deployed(
    cfg: &Config,
    store: &Store,
    env: &HostEnv,
    pinned: &std::collections::BTreeSet<String>,
) -> Result<(Vec<Handler>, BTreeMap<String, String>), StartError> {
    let runtime = Runtime::default();
    let trusted = cfg
        .deploy
        .handler_keys()
        .map_err(|e| StartError::Deploy(e.to_string()))?;
    let (mut handlers, mut skipped) = (Vec::new(), BTreeMap::new());
    for (name, bytes) in store.deployed()? {
        if name == crate::admin::deploy::CONFIG {
            continue;
        }
        let loaded = (|| {
            if pinned.contains(&name) {
                return Ok(Err(format!(
                    "`{name}` is configured in [[handler]]: the configured one runs"
                )));
            }
            let v = match crate::admin::bundle::verify(&bytes, u64::MAX, &trusted) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e.to_string())),
            };
            if let Err(e) = v.manifest.check(&cfg.limits) {
                return Ok(Err(e.to_string()));
            }
            let used = store.state_bytes(&name)?;
            Ok::<_, StartError>(
                Handler::load(
                    &runtime,
                    &v.wasm,
                    v.manifest,
                    &Default::default(),
                    env.clone(),
                    used,
                )
                .map_err(|e| e.to_string()),
            )
        })()?;
        match loaded {
            Ok(mut h) => {
                use crate::admin::deploy::{resumed_probation, Resumed};
                let since = store.registered(&name)?.probation_since;
                match resumed_probation(since, cfg.deploy.probation(), crate::clock::now_ms()) {
                    Resumed::Again(rules) => {
                        let mono = crate::clock::mono_ms();
                        h.probation = Some(crate::sandbox::probation::Probation::new(rules, mono));
                    }
                    Resumed::Passed => store.record_passed(&name)?,
                    Resumed::None => {}
                }
                tracing::info!(
                    handler = h.name(),
                    version = h.manifest.version,
                    probation = h.probation.is_some(),
                    "deployed handler loaded"
                );
                handlers.push(h);
            }
            Err(reason) => {
                tracing::error!(handler = name, "deployed handler skipped: {reason}");
                skipped.insert(name, reason);
            }
        }
    }
    Ok((handlers, skipped))
}

/// Pings systemd's watchdog every `every` while the gateway is healthy
/// (`os/watchdog.rs`): the dispatcher's thread answers within `every`, the commit path moves
/// or has nothing to do. A change of verdict is logged.
async fn watch_over(
    every: Duration,
    inbox: thread::Inbox,
    (backlog, verdict): (
        Arc<crate::store::commit::Backlog>,
        crate::os::watchdog::LastVerdict,
    ),
    metrics: Arc<Metrics>,
) {
    let mut judge = crate::os::watchdog::Watchdog::default();
    let mut was_healthy = true;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let answered = matches!(tokio::time::timeout(every, inbox.status()).await, Ok(Ok(_)));
        let sample = crate::os::watchdog::Sample {
            dispatcher_answered: answered,
            backlog_items: backlog.items(),
            groups: metrics.groups.load(std::sync::atomic::Ordering::Relaxed),
        };
        let judged = judge.judge(sample);
        *verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(judged.clone());
        match judged {
            Ok(()) => {
                crate::os::notify::ping();
                if !was_healthy {
                    tracing::info!("healthy again: watchdog pings resume");
                    crate::os::notify::status("healthy");
                }
                was_healthy = true;
            }
            Err(why) => {
                if was_healthy {
                    tracing::error!("unhealthy, watchdog pings withheld (systemd restarts the gateway if this lasts): {why}");
                    crate::os::notify::status(&format!("unhealthy: {why}"));
                }
                was_healthy = false;
            }
        }
    }
}

/// Puts what can change live in force: the deny-lists (`acl.revoked`, closing the devices
/// newly on it; `admin.revoked`), `admin.allow_from`, `acl.publish` (on the dispatcher's
/// thread, from its next event), and the keys deploys are checked against. `file` is the
/// config file as (re)loaded, `cfg` it with the config bundle in force. Returns whether it
/// did (a deny-list or `[admin]` that does not read changes nothing).
fn apply_live(
    file: &Config,
    cfg: &Config,
    (shared, inbox, deployer, acl): &(
        Arc<Shared>,
        thread::Inbox,
        Arc<crate::admin::deploy::Deployer>,
        crate::sandbox::SharedAcl,
    ),
) -> bool {
    let revoked = match pki::Revoked::parse(&cfg.acl.revoked) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("reload refused, the settings in force stay: {e}");
            return false;
        }
    };
    let admin = match shared.admin.reload(&cfg.admin) {
        Ok(sizes) => sizes,
        Err(e) => {
            tracing::error!("reload refused, the settings in force stay: {e}");
            return false;
        }
    };
    if let Err(e) = deployer.configure(file, cfg) {
        tracing::error!("reload: the deploy keys in force stay: {e}");
    }
    inbox.set_acl(cfg.acl.publish.clone());
    acl.set(cfg.acl.publish.clone());
    let entries = revoked.len();
    let closed = shared.revoke(revoked);
    tracing::info!(
        entries,
        closed,
        admin_allow_from = admin.0,
        admin_revoked = admin.1,
        publish = ?cfg.acl.publish,
        "in force: acl.revoked, acl.publish, admin.allow_from, admin.revoked and the deploy keys (a reload also changes gateway.log and the [[handler]] list; the rest needs a restart)"
    );
    true
}

/// One `[[handler]]`, as read: the handler and the digest of what it was loaded from, or why
/// it was not loaded (`Err` outside: the store failed).
fn load_one(
    read: crate::admin::configured::Read,
    cfg: &Config,
    store: &Store,
    env: &HostEnv,
    runtime: &Runtime,
    loaded: &[Handler],
) -> Result<Result<(Handler, u64), String>, StartError> {
    let manifest = read.manifest;
    if let Err(e) = manifest.check(&cfg.limits) {
        return Ok(Err(e.to_string()));
    }
    if loaded.iter().any(|h| h.name() == manifest.name) {
        return Ok(Err(format!(
            "a handler named `{}` is already loaded",
            manifest.name
        )));
    }
    let wasm = match read.wasm {
        Ok(w) => w,
        Err(e) => return Ok(Err(e)),
    };
    let used = store.state_bytes(&manifest.name)?;
    let started = Instant::now();
    let h = match Handler::load(runtime, &wasm, manifest, &read.overrides, env.clone(), used) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e.to_string())),
    };
    tracing::info!(
        handler = h.name(),
        version = h.manifest.version,
        subscribe = ?h.manifest.subscribe,
        wasm_bytes = wasm.len(),
        load_ms = started.elapsed().as_secs_f64() * 1000.0,
        "handler loaded"
    );
    Ok(Ok((h, read.digest)))
}

struct Hooks {
    outbox: Arc<Outbox>,
    disk: Arc<DiskWatch>,
    metrics: Arc<Metrics>,
    backlog: Arc<Backlog>,
    /// The clock floor, and the value riding along with the group being written.
    floor: crate::clock::SharedFloor,
    floor_writing: Option<u64>,
}

impl AfterFlush for Hooks {
    fn ride_along(&mut self) -> Option<(&'static [u8], Vec<u8>)> {
        self.floor_writing = self.floor.due(false);
        self.floor_writing
            .map(|f| (crate::store::keys::CLOCK_FLOOR, f.to_be_bytes().to_vec()))
    }

    fn after_flush(&mut self, g: &Group) {
        if let Some(f) = self.floor_writing.take() {
            self.floor.persisted(f);
        }
        self.outbox.add(&g.entries, Instant::now());
        Metrics::inc(&self.metrics.groups);
        Metrics::inc(&self.metrics.store_syncs);
        Metrics::add(&self.metrics.dead_letters_dropped, g.dead_dropped);
        self.backlog.leave(g.items, g.bytes);
        self.disk.check();
    }
}

fn make_private_dir(path: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| StartError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(err)
}

/// What every uplink task shares, whatever its sink.
struct UplinkParts<'a> {
    cfg: &'a Config,
    store: &'a Store,
    outbox: &'a Arc<Outbox>,
    metrics: &'a Arc<Metrics>,
}

impl UplinkParts<'_> {
    /// Starts the uplink task with `sink`; a store error in it stops the process.
    fn spawn<S: Sink + 'static>(
        &self,
        sink: S,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let (store, outbox, metrics) = (
            self.store.clone(),
            self.outbox.clone(),
            self.metrics.clone(),
        );
        let up = Uplink::new(self.cfg, store, outbox, metrics, sink);
        tokio::spawn(async move {
            if let Err(e) = up.run(stop).await {
                crate::store::fatal("uplink store access", e);
            }
        })
    }
}

/// Runs the gateway until `stop` turns true; returns the final metrics.
pub async fn run(
    mut cfg: Config,
    mut stop: watch::Receiver<bool>,
    mut reloads: tokio::sync::mpsc::UnboundedReceiver<Config>,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<serde_json::Value, StartError> {
    let data = cfg.gateway.data_dir.clone();
    let listen = cfg.gateway.listen;
    // The port first: one below 1024 needs root, which is given up next.
    let socket = std::net::UdpSocket::bind(listen).map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })?;
    let open_files = crate::os::process::harden();
    make_private_dir(&data)?;
    if !cfg.gateway.user.is_empty() {
        crate::os::process::drop_to(&cfg.gateway.user, &data)?;
        tracing::info!(user = cfg.gateway.user, "running as gateway.user");
    }
    tracing::debug!(open_files, "core dumps off; open-file limit");
    let paths = PkiPaths::of(&cfg);
    if pki::ensure(&paths, &cfg.gateway.server_names)? {
        tracing::info!(dir = %paths.dir.display(), "generated the device CA, operator CA, server CA and server certificate; issue device certificates with `tidepool certs device ID`");
    } else {
        tracing::info!(dir = %paths.dir.display(), "using the certificates in the data dir");
    }
    if cfg.gateway.id.is_empty() {
        cfg.gateway.id = pki::box_id(&data)?;
    }
    let store = Store::open(&data.join("db"), cfg.store.cache_capacity_bytes)?;
    let floor = crate::clock::SharedFloor::new(crate::clock::Floor::new(
        store.clock_floor()?,
        crate::clock::BUILD_S,
        crate::clock::mono_ms(),
    ));
    crate::clock::install_floor(floor.clone());
    if !floor.wall_clock_plausible() {
        tracing::warn!(
            clock_s = crate::clock::now_ms() / 1000,
            floor_s = floor.floor_s(),
            "the wall clock is behind the last time this box knew (no real-time clock, NTP not synced yet?): certificates are checked at the floor, which advances with monotonic time, until the clock catches up"
        );
    }
    // The config in force: the file, and the signed config bundle deployed (if still good).
    let file_cfg = cfg.clone();
    let held = crate::admin::deploy::stored_config_bundle(&store)?;
    let cfg = crate::admin::deploy::in_force(&file_cfg, held.as_ref());
    if let Some(h) = &held {
        tracing::info!(
            version = h.manifest.version,
            "the config bundle's settings are in force"
        );
    }
    store.bound_dead_letters(cfg.store.dead_letter_max_bytes);
    let (outbox, loaded) = Outbox::load(&store, &cfg.outbox, crate::clock::now_ms())?;
    let outbox = Arc::new(outbox);
    let metrics = Arc::new(Metrics::default());
    Metrics::add(&metrics.outbox_corrupt, loaded.corrupt);
    Metrics::add(&metrics.dead_letters, loaded.corrupt);
    Metrics::add(&metrics.dead_letters_dropped, loaded.dead_dropped);
    let state = Arc::new(EventState::new(Arc::new(store.clone())));
    let env = HostEnv::new(&cfg, state.clone());
    let (mut handlers, configured) = load_handlers(&cfg, &store, &env)?;
    let (deployed, not_deployed) = load_deployed(&cfg, &store, &env, &configured.pinned.names)?;
    handlers.extend(deployed);
    if handlers.is_empty() && configured.skipped.is_empty() && not_deployed.is_empty() {
        tracing::warn!(
            "no handlers configured: events go nowhere unless router.unrouted = \"forward\""
        );
    }

    // Bounds the events waiting for the committer (each slot is a few dozen bytes: the channel
    // allocates all of them up front, so this is idle memory too).
    let (tx, rx) = mpsc::sync_channel(COMMIT_BACKLOG);
    let mut dispatcher = Dispatcher::new(
        &cfg,
        handlers,
        Arc::new(store.clone()),
        state,
        outbox.clone(),
        tx,
        metrics.clone(),
        crate::clock::now_ms(),
    )
    .unwrap_or_else(|f| crate::store::fatal("starting the dispatcher", f));
    let disk = Arc::new(DiskWatch::new(&data, cfg.store.min_free_bytes));
    dispatcher.watch_disk(disk.clone());
    let backlog = dispatcher.backlog.clone();
    let hooks = Hooks {
        outbox: outbox.clone(),
        disk: disk.clone(),
        metrics: metrics.clone(),
        backlog: dispatcher.backlog.clone(),
        floor: floor.clone(),
        floor_writing: None,
    };
    let committer = {
        let store = store.clone();
        let cfg_group_bytes = cfg.store.commit_queue_bytes / commit::GROUP_SHARE_OF_BACKLOG;
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                let max_group = cfg_group_bytes;
                if let Err(e) = commit::run(&store, rx, loaded.next_seq, max_group, hooks) {
                    crate::store::fatal("committing a group", e);
                }
            })
            .map_err(|source| StartError::DataDir {
                path: data.clone(),
                source,
            })?
    };
    if let Some(r) = RecordTap::start(&cfg.record, &data).map_err(|source| StartError::DataDir {
        path: data.join("record"),
        source,
    })? {
        tracing::info!(topics = ?cfg.record.topics, dir = %data.join("record").display(), "recording matching events");
        dispatcher.record_to(r);
    }
    // Ended probations go to the deployer (a failed one is rolled back).
    let (probation_tx, mut probations) = tokio::sync::mpsc::unbounded_channel();
    dispatcher.report_probations_to(probation_tx);
    // Timers fire on the dispatcher's thread: no handler with a timer, nothing wakes it.
    let (inbox, dispatcher) =
        thread::spawn(dispatcher, cfg.ingress.queue_bytes).map_err(|source| {
            StartError::DataDir {
                path: data.clone(),
                source,
            }
        })?;
    let (settings_tx, mut settings) = tokio::sync::mpsc::unbounded_channel();
    let deployer = Arc::new(
        crate::admin::deploy::Deployer::new(
            (&file_cfg, &cfg),
            (configured, not_deployed),
            (store.clone(), inbox.clone(), env.clone()),
            tokio::runtime::Handle::current(),
            settings_tx,
        )
        .map_err(|e| StartError::Deploy(e.to_string()))?,
    );
    {
        let deployer = deployer.clone();
        tokio::spawn(async move {
            while let Some(end) = probations.recv().await {
                let deployer = deployer.clone();
                let _ = tokio::task::spawn_blocking(move || deployer.probation_ended(end)).await;
            }
        });
    }
    let (side_stop_tx, side_stop) = watch::channel(false);
    let verdict = crate::os::watchdog::LastVerdict::default();
    let control = Arc::new(Control {
        gateway: cfg.gateway.id.clone(),
        started: Instant::now(),
        inbox: inbox.clone(),
        metrics: metrics.clone(),
        outbox: outbox.clone(),
        store: store.clone(),
        disk,
        deployer: deployer.clone(),
        uploads: tokio::sync::Semaphore::new(1),
        backlog: backlog.clone(),
        watchdog: verdict.clone(),
    });
    // Without the socket the gateway still serves devices; only `status` and the live export
    // are unavailable (e.g. a data dir path longer than a socket path may be).
    let control_task = match control::bind(&data) {
        Ok(listener) => Some(tokio::spawn(control::serve(
            listener,
            control.clone(),
            side_stop,
        ))),
        Err(e) => {
            tracing::error!(path = %control::socket_path(&data).display(), "no control socket ({e}): `tidepool status` and a live `dead-letters export` will not reach this gateway");
            None
        }
    };

    let (uplink_stop_tx, uplink_stop) = watch::channel(false);
    let timeout = Duration::from_millis(cfg.uplink.timeout_ms);
    let parts = UplinkParts {
        cfg: &cfg,
        store: &store,
        outbox: &outbox,
        metrics: &metrics,
    };
    let uplink = match (cfg.uplink.sink, cfg.uplink.url.as_str()) {
        (SinkKind::None, _) | (_, "") => {
            tracing::warn!(
                "no uplink configured (uplink.url is empty or sink = \"none\"): forwards stay in the outbox"
            );
            None
        }
        (SinkKind::Http, url) => {
            let sink = HttpSink::new(
                cfg.gateway.id.clone(),
                url.to_string(),
                timeout,
                &cfg.uplink.http.ca_file,
            )?;
            tracing::info!(%url, "uplink: HTTP");
            Some(parts.spawn(sink, uplink_stop))
        }
        (SinkKind::Mqtt, url) => {
            let sink = MqttSink::new(&cfg.gateway.id, url, &cfg.uplink.mqtt, timeout)?;
            tracing::info!(%url, topic = %cfg.uplink.mqtt.topic, "uplink: MQTT");
            Some(parts.spawn(sink, uplink_stop))
        }
        #[cfg(feature = "nats")]
        (SinkKind::Nats, url) => {
            let sink = crate::uplink::nats::NatsSink::new(
                &cfg.gateway.id,
                url,
                &cfg.uplink.nats,
                timeout,
            )?;
            tracing::info!(%url, subject = %cfg.uplink.nats.subject, "uplink: NATS JetStream");
            Some(parts.spawn(sink, uplink_stop))
        }
        #[cfg(not(feature = "nats"))]
        (SinkKind::Nats, _) => return Err(StartError::NoNats),
        (SinkKind::Tidepool, url) => {
            let sink = crate::uplink::tier::TierSink::new(
                &cfg.gateway.id,
                url,
                &cfg.uplink.tier,
                timeout,
                store.clone(),
                metrics.clone(),
                &loaded.tier_seqs,
            )?;
            tracing::info!(%url, topic = %cfg.uplink.tier.topic, carried = loaded.tier_seqs.len(), "uplink: Tidepool tier");
            Some(parts.spawn(sink, uplink_stop))
        }
    };

    let (server_cfg, roles) = ingress::tls::server_config(&paths, &cfg.ingress)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime"))
        .map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        socket,
        runtime,
    )
    .map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })?;
    let local = endpoint.local_addr().map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })?;
    // Validated with the config; were it not, the start fails rather than run with no list.
    let revoked = pki::Revoked::parse(&cfg.acl.revoked).map_err(StartError::Revoked)?;
    let access = crate::admin::channel::Access::new(&cfg.admin, control.clone())
        .map_err(|e| StartError::Deploy(e.to_string()))?;
    let shared = Arc::new(Shared::new(
        inbox.clone(),
        (roles, access),
        cfg.ingress.clone(),
        (revoked, &cfg.acl.tiers),
        metrics.clone(),
    ));
    if let Some(addr) = cfg.metrics.address() {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        let at = listener.local_addr().unwrap_or(addr);
        tracing::info!(%at, "Prometheus metrics at http://{at}/metrics");
        let (control, shared) = (control.clone(), shared.clone());
        let scrape = move || {
            let (control, shared) = (control.clone(), shared.clone());
            async move {
                let p = control.outbox.pending();
                let age = |at: Option<Instant>| at.map(|t| t.elapsed());
                crate::prometheus::Scrape {
                    status: control.status().await,
                    connected: shared.connected_devices(),
                    outbox: [
                        ("urgent", p.urgent as u64, None),
                        ("normal", p.normal as u64, age(p.oldest_normal)),
                        ("bulk", p.bulk as u64, age(p.oldest_bulk)),
                    ],
                    // File system calls: off the runtime's workers.
                    store_bytes: {
                        let store = control.store.clone();
                        tokio::task::spawn_blocking(move || store.size_on_disk())
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or(0)
                    },
                }
            }
        };
        tokio::spawn(crate::prometheus::serve(
            listener,
            scrape,
            side_stop_tx.subscribe(),
        ));
    }
    // A reload (SIGHUP: a new config file) or a config bundle deployed puts the settings that
    // can change live in force (see `apply_live`); a reload, the `[[handler]]` list too
    // (`Deployer::reload_handlers`); nothing else changes without a restart.
    {
        let live = (
            shared.clone(),
            inbox.clone(),
            deployer.clone(),
            env.acl.clone(),
        );
        let (mut file, mut held) = (file_cfg.clone(), held);
        tokio::spawn(async move {
            let mut reloading = true;
            loop {
                // A reload's `[[handler]]` list, to put in force after the settings.
                let entries = tokio::select! {
                    new = reloads.recv(), if reloading => match new {
                        Some(mut new) => {
                            // The id derived at start, when the file leaves it to the box.
                            if new.gateway.id.is_empty() {
                                new.gateway.id = file.gateway.id.clone();
                            }
                            let entries = new.handler.clone();
                            file = new;
                            Some(entries)
                        }
                        None => {
                            reloading = false;
                            continue;
                        }
                    },
                    bundle = settings.recv() => match bundle {
                        Some(bundle) => {
                            held = Some(bundle);
                            None
                        }
                        None => break,
                    },
                };
                let cfg = crate::admin::deploy::in_force(&file, held.as_ref());
                let applied = apply_live(&file, &cfg, &live);
                // The handlers after the settings (one loaded now sees the reloaded ACL), and
                // not when the settings were refused: the reload changes nothing then.
                if let (Some(entries), true) = (entries, applied) {
                    let deployer = live.2.clone();
                    let _ = tokio::task::spawn_blocking(move || deployer.reload_handlers(&entries))
                        .await;
                }
            }
        });
    }
    let (conn_stop_tx, conn_stop) = watch::channel(false);
    let server = tokio::spawn(ingress::serve(endpoint.clone(), shared, conn_stop));
    // The offline inbox (<data-dir>/inbox): bundles put there are deployed. Started last,
    // once nothing of the start can fail.
    let inbox_thread =
        crate::admin::inbox::spawn(&data, deployer).map_err(|source| StartError::DataDir {
            path: crate::admin::inbox::dir(&data),
            source,
        })?;
    tracing::info!(%local, gateway = %cfg.gateway.id, data_dir = %data.display(), "listening");
    ready(local);
    crate::os::notify::ready(&format!("listening on {local}"));
    let watchdog = crate::os::notify::watchdog_period().map(|period| {
        tracing::info!(
            ?period,
            "systemd's watchdog: pinged every quarter period while healthy (a ping withheld three times in a row: restarted)"
        );
        tokio::spawn(watch_over(
            period / 4,
            inbox.clone(),
            (backlog, verdict),
            metrics.clone(),
        ))
    });

    let _ = stop.wait_for(|s| *s).await;
    crate::os::notify::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("stopping: settling connections");
    let _ = conn_stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .is_err()
    {
        tracing::warn!("connections did not settle within 10 s");
    }
    endpoint.close(
        quinn::VarInt::from_u32(crate::proto::CloseCode::ShuttingDown as u32),
        b"shutting_down",
    );
    let _ = side_stop_tx.send(true);
    if let Some(t) = control_task {
        let _ = t.await;
        let _ = std::fs::remove_file(control::socket_path(&data));
    }
    // A deploy under way finishes (it needs the dispatcher), then the inbox stops looking.
    let _ = tokio::task::spawn_blocking(move || inbox_thread.stop()).await;
    // The dispatcher takes what is queued, then closes: the committer finishes and exits.
    inbox.stop();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = dispatcher.join();
        committer.join()
    })
    .await;
    let _ = uplink_stop_tx.send(true);
    if let Some(u) = uplink {
        if let Err(e) = u.await {
            tracing::error!("uplink task: {e}");
        }
    }
    if let Err(e) = store.sync() {
        tracing::error!("making the store durable at shutdown: {e}");
    }
    if let Some(f) = floor.due(true) {
        match store.put_clock_floor(f) {
            Ok(()) => floor.persisted(f),
            Err(e) => tracing::warn!("cannot write the clock floor: {e}"),
        }
    }
    endpoint.wait_idle().await;
    let snapshot = metrics.snapshot();
    let path = data.join("metrics.json");
    if let Err(e) = std::fs::write(
        &path,
        serde_json::to_vec_pretty(&snapshot).unwrap_or_default(),
    ) {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
    tracing::info!(metrics = %snapshot, "stopped");
    Ok(snapshot)
}
