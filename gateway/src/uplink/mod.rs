//! The uplink: asleep until the outbox asks for it. It follows the [`WakePolicy`], builds
//! batches from flushed outbox entries, hands them to a [`Sink`], retries the same bytes under
//! the same `Idempotency-Key`, splits on 413, bisects on 400/422 to dead-letter only the
//! offending event ([`Bisect`] tells a refused event from a cloud that refuses everything), and
//! removes what the cloud accepted, durably, before it sends anything else.

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
    /// 0 for a batch composed from the outbox; halves of a refused batch are one deeper.
    pub depth: u8,
}

/// What to do with a batch the cloud refused (400/422).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send its halves (or, for one event, the event itself) again after the rest of this
    /// level of the bisection.
    Again,
    /// The cloud takes other events and refuses this one: dead-letter it.
    DeadLetter,
    /// The cloud refuses everything (a proxy, a WAF, a broken deploy): retry the whole batch
    /// later, back off, alarm; dead-letter nothing.
    Outage,
}

/// Tells a refused event from a refusing cloud, for one bisection (pure). An event is
/// dead-lettered for a 400/422 only once the cloud accepted another entry of the same
/// bisection. Halves are sent breadth first, so both halves of the first split are answered
/// before any is split again: both refused with nothing accepted, or a lone event refused, is
/// an outage.
#[derive(Debug, Default)]
pub struct Bisect {
    accepted: bool,
    refused_halves: u8,
}

impl Bisect {
    /// A part of the bisection was delivered.
    pub fn delivered(&mut self) {
        self.accepted = true;
    }

    pub fn refused(&mut self, events: usize, depth: u8) -> Verdict {
        if !self.accepted {
            if depth == 0 && events == 1 {
                return Verdict::Outage;
            }
            if depth == 1 {
                self.refused_halves += 1;
                if self.refused_halves >= 2 {
                    return Verdict::Outage;
                }
            }
        }
        if events == 1 && self.accepted {
            Verdict::DeadLetter
        } else {
            Verdict::Again
        }
    }
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

    fn make_batch(&self, seqs: Vec<u64>, entries: Vec<Entry>, depth: u8) -> Batch {
        let id = batch_id(&self.gateway, &entries);
        let body = http::body(&self.gateway, &id, &entries);
        Batch {
            id,
            seqs,
            entries,
            body,
            depth,
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
        Ok(Some(self.make_batch(seqs, entries, 0)))
    }

    /// The two halves of a batch, `depth` deep.
    fn halves(&self, b: Batch, depth: u8) -> [Batch; 2] {
        let mid = b.seqs.len() / 2;
        let (mut s1, mut e1) = (b.seqs, b.entries);
        let (s2, e2) = (s1.split_off(mid), e1.split_off(mid));
        [
            self.make_batch(s1, e1, depth),
            self.make_batch(s2, e2, depth),
        ]
    }

    /// Removes delivered entries (and writes dead letters for rejected ones) in one batch and
    /// makes it durable before anything else is sent: on an idle box no group commit follows
    /// to carry it, and a kill would post the same batch again at restart.
    async fn settle(&self, b: &Batch, dead_reason: Option<&str>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for s in &b.seqs {
            batch.remove(keys::outbox(*s));
        }
        if let Some(reason) = dead_reason {
            let letters: Vec<Vec<u8>> = b
                .entries
                .iter()
                .map(|e| {
                    DeadLetter {
                        device: e.device.clone(),
                        seq: 0,
                        topic: e.topic.clone(),
                        payload: e.payload.clone(),
                        handler: "uplink".into(),
                        reason: format!("uplink:{reason} (entry {})", e.id),
                        received_ms: e.ts,
                        ts: Some(e.ts),
                    }
                    .encode()
                })
                .collect();
            Metrics::add(&self.metrics.dead_letters, letters.len() as u64);
            let dropped = self.store.dead_letter_into(&mut batch, letters)?;
            Metrics::add(&self.metrics.dead_letters_dropped, dropped);
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            store.tree.apply_batch(batch)?;
            store.sync()
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Metrics::inc(&self.metrics.store_syncs);
        self.outbox.remove(&b.seqs);
        Ok(())
    }

    /// The uplink loop. Returns on `stop` or on a store error.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), StoreError> {
        let mut queue: VecDeque<Batch> = VecDeque::new();
        let mut bisect = Bisect::default();
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
                        bisect = Bisect::default();
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
                            self.settle(&batch, None).await?;
                            bisect.delivered();
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
                        SendResult::Split if batch.seqs.len() > 1 => {
                            let depth = batch.depth;
                            let [a, b] = self.halves(batch, depth);
                            queue.push_front(b);
                            queue.push_front(a);
                        }
                        SendResult::Split => {
                            tracing::error!(batch = %batch.id, "a single event is too large for the cloud; dead-lettered");
                            self.settle(&batch, Some("HTTP 413")).await?;
                            self.policy.on_delivered(Instant::now());
                        }
                        SendResult::Reject(why) => {
                            match bisect.refused(batch.seqs.len(), batch.depth) {
                                Verdict::Again if batch.seqs.len() > 1 => {
                                    let depth = batch.depth.saturating_add(1);
                                    queue.extend(self.halves(batch, depth));
                                }
                                Verdict::Again => queue.push_back(batch),
                                Verdict::DeadLetter => {
                                    tracing::error!(batch = %batch.id, "the cloud rejected an event ({why}); dead-lettered");
                                    self.settle(&batch, Some(&why)).await?;
                                    self.policy.on_delivered(Instant::now());
                                }
                                Verdict::Outage => {
                                    Metrics::inc(&self.metrics.uplink_outages);
                                    Metrics::inc(&self.metrics.send_failures);
                                    queue.clear();
                                    let wait =
                                        self.policy.on_failed(Instant::now(), fastrand::f64());
                                    tracing::error!(batch = %batch.id, "the cloud refused every event it was sent ({why}) and accepted none: an outage (a proxy or firewall?), not bad events; nothing dead-lettered, retrying in {wait:?}");
                                }
                            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays a bisection breadth first against a cloud that refuses the events in `bad` (all
    /// of them when `bad` is None); returns the dead-lettered events, or None for an outage.
    fn play(events: &[u32], bad: Option<&[u32]>) -> Option<Vec<u32>> {
        let refuses = |part: &[u32]| bad.is_none_or(|b| part.iter().any(|e| b.contains(e)));
        let mut bisect = Bisect::default();
        let mut queue = VecDeque::from([(events.to_vec(), 0u8)]);
        let mut dead = Vec::new();
        while let Some((part, depth)) = queue.pop_front() {
            if !refuses(&part) {
                bisect.delivered();
                continue;
            }
            match bisect.refused(part.len(), depth) {
                Verdict::Outage => return None,
                Verdict::DeadLetter => dead.extend(part),
                Verdict::Again if part.len() == 1 => queue.push_back((part, depth)),
                Verdict::Again => {
                    let (a, b) = part.split_at(part.len() / 2);
                    queue.push_back((a.to_vec(), depth + 1));
                    queue.push_back((b.to_vec(), depth + 1));
                }
            }
        }
        Some(dead)
    }

    #[test]
    fn a_cloud_refusing_everything_is_an_outage_at_any_batch_size() {
        for n in 1..=9 {
            let events: Vec<u32> = (0..n).collect();
            assert_eq!(play(&events, None), None, "{n} events");
        }
    }

    #[test]
    fn offending_events_are_dead_lettered_once_the_cloud_accepted_another() {
        assert_eq!(play(&[1, 2, 3, 4], Some(&[4])), Some(vec![4]));
        assert_eq!(play(&[1, 2, 3, 4], Some(&[1])), Some(vec![1]));
        assert_eq!(play(&[1, 2], Some(&[1])), Some(vec![1]));
        assert_eq!(play(&[1, 2, 3, 4, 5], Some(&[4, 5])), Some(vec![4, 5]));
        assert_eq!(play(&[1, 2, 3], Some(&[])), Some(vec![]));
        // Both halves hold an offender and nothing was accepted: indistinguishable from an
        // outage, so nothing is dead-lettered (the batch is retried with backoff).
        assert_eq!(play(&[1, 2, 3, 4], Some(&[1, 4])), None);
    }
}
