//! The uplink: asleep until the outbox asks for it. It follows the [`WakePolicy`], builds
//! batches from flushed outbox entries, hands them to a [`Sink`], retries the same bytes under
//! the same `Idempotency-Key`, splits on 413, bisects on 400/422 to dead-letter only the
//! offending event, and removes what the cloud accepted.

pub mod http;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::{Action, Entry, Outbox, WakePolicy};
use crate::store::{keys, DeadLetter, Store, StoreError};

/// A batch as it goes on the wire. Retries resend exactly these bytes.
#[derive(Debug, Clone)]
pub struct Batch {
    pub id: String,
    pub seqs: Vec<u64>,
    pub entries: Vec<Entry>,
    pub body: Vec<u8>,
}

/// A batch's id (and `Idempotency-Key`), derived from the ids of its entries: the same entries
/// always give the same key, different entries a different one, across restarts and boxes.
pub fn batch_id(gateway: &str, entries: &[Entry]) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for e in entries {
        h.update(e.id.as_bytes());
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

/// Where batches go.
pub trait Sink: Send {
    fn send(&mut self, batch: &Batch) -> impl Future<Output = SendResult> + Send;
    /// Close the connection (the uplink goes back to sleep).
    fn close(&mut self);
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
    pub sink: S,
}

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
            sink,
        }
    }

    fn make_batch(&self, seqs: Vec<u64>, entries: Vec<Entry>) -> Batch {
        let id = batch_id(&self.gateway, &entries);
        let body = http::body(&self.gateway, &id, &entries);
        Batch {
            id,
            seqs,
            entries,
            body,
        }
    }

    fn compose(&self) -> Result<Option<Batch>, StoreError> {
        let seqs = self
            .outbox
            .next_batch(self.max_batch_events, self.max_batch_bytes);
        if seqs.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(seqs.len());
        for s in &seqs {
            let v = self
                .store
                .tree
                .get(keys::outbox(*s))?
                .ok_or_else(|| StoreError::Corrupt("o/ (missing)".into()))?;
            entries.push(Entry::decode(&v).ok_or_else(|| StoreError::Corrupt("o/".into()))?);
        }
        Ok(Some(self.make_batch(seqs, entries)))
    }

    fn halves(&self, b: Batch) -> [Batch; 2] {
        let mid = b.seqs.len() / 2;
        let (mut s1, mut e1) = (b.seqs, b.entries);
        let (s2, e2) = (s1.split_off(mid), e1.split_off(mid));
        [self.make_batch(s1, e1), self.make_batch(s2, e2)]
    }

    /// Removes delivered entries (and writes dead letters for rejected ones) in one batch.
    /// No flush here: a crash before the next group commit only resends, and the cloud
    /// dedupes by event id.
    fn settle(&self, b: &Batch, dead_reason: Option<&str>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for s in &b.seqs {
            batch.remove(keys::outbox(*s));
        }
        if let Some(reason) = dead_reason {
            let mut added = 0;
            for e in &b.entries {
                let d = DeadLetter {
                    device: e.device.clone(),
                    seq: 0,
                    topic: e.topic.clone(),
                    payload: e.payload.clone(),
                    handler: "uplink".into(),
                    reason: format!("uplink:{reason} (entry {})", e.id),
                    received_ms: e.ts,
                    ts: Some(e.ts),
                };
                let bytes = d.encode();
                added += bytes.len() as u64;
                batch.insert(keys::dead(self.store.next_dead_id()), bytes);
                Metrics::inc(&self.metrics.dead_letters);
            }
            for k in self.store.trim_dead_letters(added)? {
                batch.remove(k);
                Metrics::inc(&self.metrics.dead_letters_dropped);
            }
        }
        self.store.tree.apply_batch(batch)?;
        self.outbox.remove(&b.seqs);
        Ok(())
    }

    /// The uplink loop. Returns on `stop` or on a store error.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), StoreError> {
        let mut queue: VecDeque<Batch> = VecDeque::new();
        loop {
            if *stop.borrow() {
                self.sink.close();
                return Ok(());
            }
            let now = Instant::now();
            match self.policy.next(now, &self.outbox.pending()) {
                Action::Send => {
                    if queue.is_empty() {
                        match self.compose()? {
                            Some(b) => queue.push_back(b),
                            None => continue,
                        }
                    }
                    let Some(batch) = queue.pop_front() else {
                        continue;
                    };
                    if !self.policy.is_awake() && self.policy.failures() == 0 {
                        Metrics::inc(&self.metrics.uplink_wakeups);
                    }
                    Metrics::add(&self.metrics.bytes_up, batch.body.len() as u64);
                    let result = tokio::select! {
                        r = self.sink.send(&batch) => r,
                        _ = stop.changed() => { queue.push_front(batch); continue; }
                    };
                    match result {
                        SendResult::Delivered => {
                            self.settle(&batch, None)?;
                            Metrics::inc(&self.metrics.batches_sent);
                            Metrics::add(&self.metrics.events_sent, batch.seqs.len() as u64);
                            self.policy.on_delivered(Instant::now());
                            tracing::debug!(batch = %batch.id, events = batch.seqs.len(), "delivered");
                        }
                        SendResult::Retry { alarm, why } => {
                            Metrics::inc(&self.metrics.send_failures);
                            let wait = self.policy.on_failed(Instant::now(), fastrand::f64());
                            if alarm {
                                tracing::error!(batch = %batch.id, "uplink refused: {why}; retrying in {wait:?}");
                            } else {
                                tracing::warn!(batch = %batch.id, "uplink failed: {why}; retrying in {wait:?}");
                            }
                            queue.push_front(batch);
                        }
                        SendResult::Split | SendResult::Reject(_) if batch.seqs.len() > 1 => {
                            let [a, b] = self.halves(batch);
                            queue.push_front(b);
                            queue.push_front(a);
                        }
                        SendResult::Split => {
                            tracing::error!(batch = %batch.id, "a single event is too large for the cloud; dead-lettered");
                            self.settle(&batch, Some("HTTP 413"))?;
                            self.policy.on_delivered(Instant::now());
                        }
                        SendResult::Reject(why) => {
                            tracing::error!(batch = %batch.id, "the cloud rejected an event ({why}); dead-lettered");
                            self.settle(&batch, Some(&why))?;
                            self.policy.on_delivered(Instant::now());
                        }
                    }
                }
                Action::Close => {
                    self.sink.close();
                    tracing::debug!("uplink idle: connection closed");
                }
                Action::Wait(deadline) => {
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
