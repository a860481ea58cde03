//! The uplink loop against a fake sink, on a real store: retries, 413 splits, 400 bisection
//! and the dead letters they end in, between the pure `Plan` and the end-to-end runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::{Batch, SendResult, Sent, Sink, Uplink};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::{Entry, Outbox};
use crate::pipeline::Class;
use crate::store::Store;

/// What the fake cloud took, and what it answered.
#[derive(Default)]
struct Cloud {
    /// Each id it took, with how often.
    took: HashMap<String, u32>,
    /// The size of every batch it took.
    batches: Vec<usize>,
    answers: Vec<&'static str>,
}

/// A cloud that answers 413 above `max_events`, 400 to a batch holding a `bad` payload, and
/// fails every `flaky`-th attempt (a timeout).
struct FakeSink {
    cloud: Arc<Mutex<Cloud>>,
    max_events: usize,
    flaky: usize,
    attempts: usize,
}

impl Sink for FakeSink {
    const RETRY_AS_IS: bool = true;

    async fn send(&mut self, batch: &Batch) -> Sent {
        self.attempts += 1;
        let mut c = self.cloud.lock().unwrap();
        let (answer, result) = if self.attempts % self.flaky == 0 {
            ("timeout", SendResult::retry("timed out".into()))
        } else if batch.entries.len() > self.max_events {
            ("413", SendResult::Split)
        } else if batch.entries.iter().any(|e| e.payload == b"bad") {
            ("400", SendResult::Reject("HTTP 400".into()))
        } else {
            for e in &batch.entries {
                *c.took.entry(e.id.clone()).or_default() += 1;
            }
            c.batches.push(batch.entries.len());
            ("200", SendResult::Delivered)
        };
        c.answers.push(answer);
        Sent { result, bytes: 0 }
    }

    fn close(&mut self) {}
}

fn entry(i: u64, bad: bool) -> Entry {
    Entry {
        id: format!("gw:d:{i}:h:0"),
        device: "d".into(),
        topic: "t".into(),
        class: Class::Normal,
        ts: 1,
        queued_ms: 1,
        payload: if bad { b"bad".to_vec() } else { b"ok".to_vec() },
        tier_seq: None,
        tier_nack: None,
        boot: None,
    }
}

#[tokio::test]
async fn retries_splits_and_bisection_deliver_every_good_entry_and_dead_letter_only_the_bad() {
    const N: u64 = 120;
    let bad = |i: u64| i % 37 == 5;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
    store
        .rewrite_outbox((1..=N).map(|i| (i, entry(i, bad(i)).encode())).collect())
        .unwrap();
    let mut cfg = Config::defaults();
    cfg.gateway.id = "gw".into();
    cfg.outbox.max_batch_events = 50;
    cfg.outbox.max_delay_ms = 0;
    cfg.outbox.linger_ms = 0;
    cfg.outbox.retry_base_ms = 1;
    cfg.outbox.retry_max_ms = 5;
    let (outbox, loaded) = Outbox::load(&store, &cfg.outbox, 1).unwrap();
    assert_eq!(loaded.next_seq, N + 1);
    let outbox = Arc::new(outbox);
    let cloud = Arc::new(Mutex::new(Cloud::default()));
    let sink = FakeSink {
        cloud: cloud.clone(),
        max_events: 16,
        flaky: 7,
        attempts: 0,
    };
    let metrics = Arc::new(Metrics::default());
    let up = Uplink::new(&cfg, store.clone(), outbox.clone(), metrics, sink);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(up.run(stop));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox.used_bytes() > 0 {
        if tokio::time::Instant::now() > deadline {
            let c = cloud.lock().unwrap();
            let last = &c.answers[c.answers.len().saturating_sub(12)..];
            panic!(
                "the outbox did not drain: {} left after {} answers, the last {last:?}",
                outbox.used_bytes(),
                c.answers.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();

    let c = cloud.lock().unwrap();
    for i in (1..=N).filter(|i| !bad(*i)) {
        assert_eq!(c.took.get(&entry(i, false).id), Some(&1), "entry {i}");
    }
    // Split down from 50 until the cloud took them.
    assert!(c.batches.iter().any(|n| *n > 1), "{:?}", c.batches);
    for answer in ["timeout", "413", "400"] {
        assert!(
            c.answers.contains(&answer),
            "the cloud never answered {answer}"
        );
    }
    let mut letters = store.dead_letters().unwrap();
    letters.sort_by(|a, b| a.reason.cmp(&b.reason));
    let mut bad_ids: Vec<String> = (1..=N)
        .filter(|i| bad(*i))
        .map(|i| entry(i, true).id)
        .collect();
    bad_ids.sort();
    assert_eq!(
        letters.len(),
        bad_ids.len(),
        "only the bad entries are dead letters"
    );
    for (l, id) in letters.iter().zip(&bad_ids) {
        assert!(l.reason.contains(id.as_str()), "{} for {id}", l.reason);
        assert!(l.reason.starts_with("uplink:"), "{}", l.reason);
    }
    assert_eq!(
        store.outbox_scan().count(),
        0,
        "every entry left the outbox durably"
    );
}
