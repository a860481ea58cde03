//! The uplink: asleep until the outbox asks for it. It follows the [`WakePolicy`], builds
//! batches from flushed outbox entries, hands them to a [`Sink`], retries the same bytes under
//! the same `Idempotency-Key`, splits on 413, bisects on 400/422 to dead-letter only the
//! offending event ([`plan::Plan`] tells a refused event from a cloud that refuses everything),
//! and removes what the cloud accepted, durably, before it sends anything else.

pub mod budget;
pub mod http;
pub mod mqtt;
#[cfg(feature = "nats")]
pub mod nats;
pub mod outage;
pub mod plan;
pub mod template;
pub mod tier;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::{Action, Entry, Outbox, WakePolicy};
use crate::store::{keys, DeadLetter, Store, StoreError};
use budget::{Budget, Turn};
use outage::{OutageLog, Say};
use plan::{Plan, Step};

/// A sink's TLS client config (HTTP, MQTT): the ring provider, TLS 1.2 and 1.3, `roots`, and
/// certificates checked at the clock floor's time ([`crate::clock::FloorTime`]), so a box
/// that boots at 1970 reaches its cloud before NTP answers.
pub fn tls_client(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(
        rustls::ClientConfig::builder_with_details(provider, Arc::new(crate::clock::FloorTime))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A batch: outbox entries and the id derived from them (the HTTP `Idempotency-Key`). The same
/// entries always make the same batch, so a retry sends the same bytes.
#[derive(Debug, Clone)]
pub struct Batch {
    pub id: String,
    pub seqs: Vec<u64>,
    pub entries: Vec<Entry>,
}

/// A batch's id (and `Idempotency-Key`), derived from the ids of its entries: the same entries
/// always give the same key, different entries a different one, across restarts and boxes. An
/// entry whose `ts` came from an unset clock adds whether it was re-stamped: the batch sent
/// before the clock was set and the one after carry different bytes, so they get different
/// keys (the cloud dedupes their events by `id`).
pub fn batch_id(gateway: &str, entries: &[Entry]) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for e in entries {
        h.update(e.id.as_bytes());
        match &e.boot {
            Some(b) if b.restamped => h.update(b"\x1fsynced"),
            Some(_) => h.update(b"\x1funsynced"),
            None => {}
        }
        h.update(b"\n");
    }
    let d = h.finish();
    let hex: String = d.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{gateway}-{hex}-{}", entries.len())
}

/// What a sink made of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendResult {
    Delivered,
    /// The far side settled every entry: it took all but these (index in the batch, why),
    /// which it refused for good (a sink with answers per entry: the Tidepool sink).
    DeliveredExcept(Vec<(usize, String)>),
    /// Try the same batch again later; `alarm` when an operator must look (401/403/404).
    Retry {
        alarm: bool,
        why: String,
    },
    /// Too large: send it in halves.
    Split,
    /// The cloud refuses the content: bisect to the offending event.
    Reject(String),
}

impl SendResult {
    /// A failure to retry later, with no alarm (no connection, a timeout, a broken link).
    pub fn retry(why: String) -> SendResult {
        SendResult::Retry { alarm: false, why }
    }
}

/// What a sink made of one attempt, and the bytes it put on the wire for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub result: SendResult,
    pub bytes: u64,
}

/// Where batches go: one implementation per folder (`http/`, `mqtt/`). A sink delivers a
/// batch whole or not at all (`Delivered` only when the far side took every entry); retry,
/// backoff, splitting and dead letters are the uplink's, the same for every sink.
pub trait Sink: Send {
    /// Whether a failed batch must be retried byte for byte (the HTTP contract's
    /// `Idempotency-Key`). Sinks that dedupe by entry id instead let the uplink split a batch
    /// that keeps failing, so one entry the far side never takes cannot hold the rest.
    const RETRY_AS_IS: bool;

    fn send(&mut self, batch: &Batch) -> impl Future<Output = Sent> + Send;
    /// Close the connection (the uplink goes back to sleep).
    fn close(&mut self);
    /// Outbox seqs that must be sent before anything else, in this order (asked once, at
    /// start): the Tidepool sink's entries that were given a tier seq before a restart.
    fn must_go_first(&mut self) -> Vec<u64> {
        Vec::new()
    }
}

/// Every entry of the batch, dead-lettered for `why`.
fn all(b: &Batch, why: &str) -> Vec<(usize, String)> {
    (0..b.entries.len()).map(|i| (i, why.to_string())).collect()
}

/// The uplink closed its connection: counts the time it was awake.
fn fell_asleep(metrics: &Metrics, awake_since: &mut Option<Instant>) {
    if let Some(t) = awake_since.take() {
        Metrics::add(&metrics.uplink_awake_ms, t.elapsed().as_millis() as u64);
    }
}

/// Runs until `stop` turns true.
pub struct Uplink<S: Sink> {
    pub store: Store,
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<Metrics>,
    pub gateway: String,
    pub policy: WakePolicy,
    pub max_batch_events: usize,
    pub max_batch_bytes: usize,
    pub budget: Budget,
    pub sink: S,
    /// What the log has said about the current outage ([`outage`]).
    outage: OutageLog,
    /// [`Outbox::unset_clock_entries`] when the last sweep of the outbox began
    /// ([`Uplink::restamp_outbox`]), or when the outbox was last seen empty.
    swept: u64,
}

/// Entries re-stamped by the sweep per durable write.
const SWEEP_CHUNK: usize = 1024;

/// How often the uplink looks at the clock while entries wait for it to be set.
const CLOCK_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

impl<S: Sink> Uplink<S> {
    pub fn new(
        cfg: &Config,
        store: Store,
        outbox: Arc<Outbox>,
        metrics: Arc<Metrics>,
        sink: S,
    ) -> Self {
        Uplink {
            store,
            outbox,
            metrics,
            gateway: cfg.gateway.id.clone(),
            policy: WakePolicy::new(&cfg.outbox),
            max_batch_events: cfg.outbox.max_batch_events,
            max_batch_bytes: cfg.outbox.max_batch_bytes,
            budget: Budget::new(cfg.uplink.budget_bytes_per_day),
            sink,
            outage: OutageLog::default(),
            swept: 0,
        }
    }

    /// Whether outbox entries stamped on an unset clock may wait for a re-stamp: such entries
    /// were indexed (found at start, or flushed) since the last sweep, and the outbox is not
    /// empty (an entry counted and no longer indexed was sent: once the outbox is seen empty,
    /// nothing counted so far waits).
    fn restamp_due(&mut self) -> bool {
        let counted = self.outbox.unset_clock_entries();
        if counted != self.swept && self.outbox.is_empty() {
            self.swept = counted;
        }
        counted != self.swept
    }

    /// Re-stamps every outbox entry received in this boot before the clock was set, as soon as
    /// it is ([`Entry::restamp`]), not only at the entry's next send: a reboot before that send
    /// would take the time since receipt with it. Written durably, [`SWEEP_CHUNK`] entries a
    /// write; a stop ends it within [`SWEEP_CHUNK`] entries read (what it re-stamped is
    /// written; the rest is swept at the next start). An
    /// entry indexed after the sweep began is counted after it, so another sweep follows.
    async fn restamp_outbox(&mut self, stop: &watch::Receiver<bool>) -> Result<(), StoreError> {
        let mark = self.outbox.unset_clock_entries();
        let store = self.store.clone();
        let stop = stop.clone();
        let (entries, writes, whole) = tokio::task::spawn_blocking(move || {
            let boot_id = crate::clock::boot_id();
            let (wall_ms, boot_ms) = (crate::clock::now_ms(), crate::clock::boot_ms());
            let (mut chunk, mut entries, mut writes) = (Vec::new(), 0, 0);
            let mut flush = |chunk: &mut Vec<(u64, Vec<u8>)>| {
                entries += chunk.len();
                writes += 1;
                store.rewrite_outbox(std::mem::take(chunk))
            };
            for (n, kv) in store.outbox_scan().enumerate() {
                let (k, v) = kv?;
                if let (Some(seq), Some(mut e)) = (keys::seq_of(&k), Entry::decode(&v)) {
                    if e.restamp(&boot_id, wall_ms, boot_ms) {
                        chunk.push((seq, e.encode()));
                    }
                }
                if chunk.len() == SWEEP_CHUNK {
                    flush(&mut chunk)?;
                }
                // Looked at every SWEEP_CHUNK entries read, re-stamped or not.
                if n % SWEEP_CHUNK == SWEEP_CHUNK - 1 && *stop.borrow() {
                    if !chunk.is_empty() {
                        flush(&mut chunk)?;
                    }
                    return Ok((entries, writes, false));
                }
            }
            if !chunk.is_empty() {
                flush(&mut chunk)?;
            }
            Ok::<_, StoreError>((entries, writes, true))
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Metrics::add(&self.metrics.store_syncs, writes);
        if whole {
            self.swept = mark;
        }
        if entries > 0 {
            tracing::info!(
                entries,
                "outbox: the clock is set; forwards received before it was, re-stamped"
            );
        }
        Ok(())
    }

    /// The batch of these outbox entries (the same entries always make the same bytes).
    fn batch(&self, seqs: Vec<u64>) -> Result<Batch, StoreError> {
        let mut entries = Vec::with_capacity(seqs.len());
        for s in &seqs {
            let v = self
                .store
                .outbox_entry(*s)?
                .ok_or_else(|| StoreError::Corrupt("o/ (missing)".into()))?;
            entries.push(Entry::decode(&v).ok_or_else(|| StoreError::Corrupt("o/".into()))?);
        }
        let id = batch_id(&self.gateway, &entries);
        Ok(Batch { id, seqs, entries })
    }

    /// The cloud answered (a delivery, a refusal of an event): an outage that was said ends,
    /// and says so.
    fn outage_over(&mut self) {
        if let Some((failures, lasted)) = self.outage.delivered(Instant::now()) {
            tracing::info!(
                failures,
                "uplink reaches the cloud again, after {} s and {failures} failed attempts",
                lasted.as_secs()
            );
        }
    }

    /// Re-stamps the batch's entries received in this boot before the clock was set, now that
    /// it is ([`Entry::restamp`]), and writes them durably before the batch is sent: every
    /// later attempt, after a restart too, sends the same bytes. Before the clock is set, or
    /// with nothing to re-stamp, the batch is as it was.
    async fn restamp(&mut self, b: Batch) -> Result<Batch, StoreError> {
        let (wall_ms, boot_ms) = (crate::clock::now_ms(), crate::clock::boot_ms());
        if !b
            .entries
            .iter()
            .any(|e| e.boot.as_ref().is_some_and(|t| !t.restamped))
            || !crate::clock::is_set(wall_ms)
        {
            return Ok(b);
        }
        let boot_id = crate::clock::boot_id();
        let Batch {
            id,
            seqs,
            mut entries,
        } = b;
        let writes: Vec<(u64, Vec<u8>)> = seqs
            .iter()
            .zip(entries.iter_mut())
            .filter_map(|(s, e)| {
                e.restamp(&boot_id, wall_ms, boot_ms)
                    .then(|| (*s, e.encode()))
            })
            .collect();
        if writes.is_empty() {
            // Only other boots' entries: nothing changed, the id stands.
            return Ok(Batch { id, seqs, entries });
        }
        tracing::info!(
            entries = writes.len(),
            "outbox: forwards received before the clock was set, re-stamped"
        );
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.rewrite_outbox(writes))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Metrics::inc(&self.metrics.store_syncs);
        let id = batch_id(&self.gateway, &entries);
        Ok(Batch { id, seqs, entries })
    }

    /// Removes the batch's entries (delivered, or dead-lettered: `dead` holds (index in the
    /// batch, why) of each refused one) in one batch and makes it durable before anything
    /// else is sent: on an idle box no group commit follows to carry it, and a kill would post
    /// the same batch again at restart.
    async fn clear_sent(&mut self, b: &Batch, dead: &[(usize, String)]) -> Result<(), StoreError> {
        let keys: Vec<Vec<u8>> = b.seqs.iter().map(|s| keys::outbox(*s)).collect();
        let letters: Vec<Vec<u8>> = dead
            .iter()
            .filter_map(|(i, why)| Some((b.entries.get(*i)?, why)))
            .map(|(e, why)| {
                DeadLetter {
                    device: e.device.clone(),
                    seq: 0,
                    topic: e.topic.clone(),
                    payload: e.payload.clone(),
                    handler: "uplink".into(),
                    reason: format!("uplink:{why} (entry {})", e.id),
                    received_ms: if e.queued_ms > 0 { e.queued_ms } else { e.ts },
                    ts: Some(e.ts),
                }
                .encode()
            })
            .collect();
        Metrics::add(&self.metrics.dead_letters, letters.len() as u64);
        let store = self.store.clone();
        let dropped = tokio::task::spawn_blocking(move || store.clear_outbox(keys, letters))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Metrics::add(&self.metrics.dead_letters_dropped, dropped);
        Metrics::inc(&self.metrics.store_syncs);
        self.outbox.remove(&b.seqs);
        Ok(())
    }

    /// The uplink loop. Returns on `stop` or on a store error.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), StoreError> {
        let mut plan = Plan::default();
        let first = self.sink.must_go_first();
        plan.resume(first.chunks(self.max_batch_events).map(<[u64]>::to_vec));
        // When the uplink woke up (its first send after sleeping), for `uplink_awake_ms`.
        let mut awake_since: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                self.sink.close();
                fell_asleep(&self.metrics, &mut awake_since);
                return Ok(());
            }
            let now = Instant::now();
            let now_ms = crate::clock::now_ms();
            let clock_set = crate::clock::is_set(now_ms);
            if clock_set && self.restamp_due() {
                self.restamp_outbox(&stop).await?;
                continue;
            }
            let (held, turn) = self.budget.check(now_ms);
            match turn {
                Some(Turn::Held) => {
                    let (spent, limit) = self.budget.today();
                    tracing::warn!(spent, limit, "uplink budget for today spent: holding normal and bulk forwards until 00:00 UTC; urgent ones still go (counted as over budget)");
                }
                Some(Turn::Resumed) => tracing::info!(
                    "a new UTC day: the uplink budget is reset, held forwards go again"
                ),
                None => {}
            }
            let mut pending = self.outbox.pending();
            if held {
                pending.hold_all_but_urgent();
            }
            match self.policy.next(now, &pending) {
                Action::Send => {
                    let (max_events, max_bytes) = (self.max_batch_events, self.max_batch_bytes);
                    let step = plan.next(|exclude| {
                        self.outbox.next_batch(max_events, max_bytes, exclude, held)
                    });
                    let seqs = match step {
                        Step::Send(seqs) => seqs,
                        Step::Idle => {
                            // The policy saw entries the index no longer has: look again.
                            tokio::task::yield_now().await;
                            continue;
                        }
                        Step::Outage => {
                            Metrics::inc(&self.metrics.uplink_outages);
                            Metrics::inc(&self.metrics.send_failures);
                            let wait = self.policy.on_failed(Instant::now(), fastrand::f64());
                            let why = "the cloud refuses every event it is sent and accepted none since: an outage (a proxy or firewall?), not bad events; nothing dead-lettered";
                            match self.outage.failed(Instant::now(), true) {
                                Say::Quiet => tracing::debug!("{why}, retrying in {wait:?}"),
                                _ => tracing::error!("{why}, retrying in {wait:?}"),
                            }
                            continue;
                        }
                    };
                    let batch = self.batch(seqs)?;
                    let batch = self.restamp(batch).await?;
                    if awake_since.is_none() {
                        awake_since = Some(Instant::now());
                        Metrics::inc(&self.metrics.uplink_wakeups);
                    }
                    let sent = tokio::select! {
                        r = self.sink.send(&batch) => r,
                        _ = stop.changed() => { plan.put_back(batch.seqs); continue; }
                    };
                    Metrics::add(&self.metrics.bytes_up, sent.bytes);
                    let over = self.budget.spend(crate::clock::now_ms(), sent.bytes);
                    Metrics::add(&self.metrics.uplink_over_budget_bytes, over);
                    let result = sent.result;
                    match result {
                        SendResult::DeliveredExcept(refused) => {
                            for (i, why) in &refused {
                                let id = batch.entries.get(*i).map_or("?", |e| e.id.as_str());
                                tracing::error!(batch = %batch.id, entry = id, "the far side refused an event for good ({why}); dead-lettered");
                            }
                            self.clear_sent(&batch, &refused).await?;
                            plan.delivered(&batch.seqs);
                            Metrics::inc(&self.metrics.batches_sent);
                            Metrics::add(
                                &self.metrics.events_sent,
                                (batch.seqs.len() - refused.len()) as u64,
                            );
                            self.policy.on_delivered(Instant::now());
                            self.outage_over();
                        }
                        SendResult::Delivered => {
                            self.clear_sent(&batch, &[]).await?;
                            plan.delivered(&batch.seqs);
                            Metrics::inc(&self.metrics.batches_sent);
                            Metrics::add(&self.metrics.events_sent, batch.seqs.len() as u64);
                            self.policy.on_delivered(Instant::now());
                            self.outage_over();
                            tracing::debug!(batch = %batch.id, events = batch.seqs.len(), "delivered");
                        }
                        SendResult::Retry { alarm, why } => {
                            Metrics::inc(&self.metrics.send_failures);
                            let wait = self.policy.on_failed(Instant::now(), fastrand::f64());
                            match (self.outage.failed(Instant::now(), alarm), alarm) {
                                (Say::First, true) => {
                                    tracing::error!(batch = %batch.id, "uplink refused: {why}; retrying in {wait:?} (while this lasts, said again every {} min)", OutageLog::EVERY.as_secs() / 60)
                                }
                                (Say::First, false) => {
                                    tracing::warn!(batch = %batch.id, "uplink failed: {why}; retrying in {wait:?} (while this lasts, said again every {} min)", OutageLog::EVERY.as_secs() / 60)
                                }
                                (Say::Still { failures, for_ }, true) => {
                                    tracing::error!(batch = %batch.id, failures, "uplink still refused after {} s: {why}; retrying in {wait:?}", for_.as_secs())
                                }
                                (Say::Still { failures, for_ }, false) => {
                                    tracing::warn!(batch = %batch.id, failures, "uplink still failing after {} s: {why}; retrying in {wait:?}", for_.as_secs())
                                }
                                (Say::Quiet, _) => {
                                    tracing::debug!(batch = %batch.id, "uplink failed: {why}; retrying in {wait:?}")
                                }
                            }
                            if plan.failed(batch.seqs.clone(), !S::RETRY_AS_IS).is_some() {
                                tracing::error!(batch = %batch.id, "an event keeps failing while the cloud accepts others ({why}); dead-lettered");
                                self.clear_sent(&batch, &all(&batch, &why)).await?;
                            }
                        }
                        SendResult::Split => {
                            self.outage_over();
                            if plan.too_large(batch.seqs.clone()).is_some() {
                                tracing::error!(batch = %batch.id, "an event is too large for the cloud (HTTP 413, also after other events were accepted); dead-lettered");
                                self.clear_sent(&batch, &all(&batch, "HTTP 413")).await?;
                                self.policy.on_delivered(Instant::now());
                            }
                        }
                        SendResult::Reject(why) => {
                            self.outage_over();
                            if plan.refused(batch.seqs.clone()).is_some() {
                                tracing::error!(batch = %batch.id, "the cloud rejected an event ({why}), also after accepting others; dead-lettered");
                                self.clear_sent(&batch, &all(&batch, &why)).await?;
                                self.policy.on_delivered(Instant::now());
                            }
                        }
                    }
                }
                Action::Close => {
                    self.sink.close();
                    fell_asleep(&self.metrics, &mut awake_since);
                    tracing::debug!("uplink idle: connection closed");
                }
                Action::Wait(deadline) => {
                    // Held by the budget: wake at the next UTC day at the latest.
                    let deadline = if held {
                        let next_day =
                            now + std::time::Duration::from_millis(Budget::until_next_day(now_ms));
                        Some(deadline.map_or(next_day, |d| d.min(next_day)))
                    } else {
                        deadline
                    };
                    // Entries wait for the clock to be set: look at it again soon.
                    let deadline = match !clock_set && self.restamp_due() {
                        true => Some(
                            deadline.map_or(now + CLOCK_RECHECK, |d| d.min(now + CLOCK_RECHECK)),
                        ),
                        false => deadline,
                    };
                    let sleep = async {
                        match deadline {
                            Some(t) => tokio::time::sleep_until(t.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = self.outbox.wake.notified() => {}
                        _ = sleep => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
