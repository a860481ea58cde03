//! Each device's event rate (pure: the time is passed in): a token bucket per device id,
//! refilled at `ingress.device_events_per_s` and holding at most `ingress.device_burst`. Every
//! publish a device sends (a resend too: it costs the box a decode and an answer) and every
//! datagram takes a token; with none left, a publish is answered `busy` with the wait until the
//! bucket holds a tenth of a second's worth again, and a datagram is dropped. So one device
//! flooding is held to its rate before its frames reach the dispatcher, whatever it does with
//! the answers.
//!
//! A bucket belongs to the device id, not to a connection: reconnecting does not refill it.
//! Buckets that have refilled are forgotten once there are [`KEEP`] or more (a full bucket
//! and no bucket are the same thing), so the map holds only devices that sent lately.
//! Lower tiers (`acl.tiers`) carry many devices and are not limited.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Buckets kept before the full ones are swept.
pub const KEEP: usize = 4096;

/// One device's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Every device's bucket.
#[derive(Debug)]
pub struct Rates {
    /// Tokens per second; 0: no limit.
    per_s: f64,
    burst: f64,
    exempt: Vec<Arc<str>>,
    buckets: HashMap<Arc<str>, Bucket>,
    /// The number of buckets at which the next sweep runs (doubles when a sweep frees little,
    /// so that sweeping stays amortised O(1) per take).
    sweep_at: usize,
}

impl Rates {
    pub fn new(per_s: u32, burst: u32, exempt: &[String]) -> Rates {
        Rates {
            per_s: f64::from(per_s),
            burst: f64::from(burst.max(1)),
            exempt: exempt.iter().map(|e| e.as_str().into()).collect(),
            buckets: HashMap::new(),
            sweep_at: KEEP,
        }
    }

    /// Takes one token of `device` at `now`: `Ok`, or `Err(wait)`, the time until it may go
    /// on (at least 1 ms).
    pub fn take(&mut self, device: &Arc<str>, now: Instant) -> Result<(), Duration> {
        if self.per_s <= 0.0 || self.exempt.iter().any(|e| e == device) {
            return Ok(());
        }
        if self.buckets.len() >= self.sweep_at && !self.buckets.contains_key(device) {
            self.sweep(now);
            self.sweep_at = (2 * self.buckets.len()).max(KEEP);
        }
        let (per_s, burst) = (self.per_s, self.burst);
        let b = self.buckets.entry(device.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let since = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + since * per_s).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        // Back when a tenth of a second's worth is there (at least one token, at most the
        // burst): a device told to wait for a single token would come back for one event.
        let want = (per_s / 10.0).clamp(1.0, burst);
        let wait = ((want - b.tokens) / per_s).max(0.001);
        Err(Duration::from_secs_f64(wait.min(3600.0)))
    }

    /// Forgets the buckets that have refilled by `now`.
    fn sweep(&mut self, now: Instant) {
        let (per_s, burst) = (self.per_s, self.burst);
        self.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_s < burst
        });
    }

    /// Devices with a bucket (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str) -> Arc<str> {
        id.into()
    }

    #[test]
    fn a_device_gets_its_burst_at_once_then_its_rate() {
        let mut r = Rates::new(100, 10, &[]);
        let (d, t0) = (dev("d"), Instant::now());
        for _ in 0..10 {
            assert!(r.take(&d, t0).is_ok());
        }
        let wait = r.take(&d, t0).unwrap_err();
        // A tenth of a second's worth (10 tokens) takes 100 ms at 100/s.
        assert_eq!(wait, Duration::from_millis(100));
        // 50 ms later, 5 tokens: 5 events, then busy again (a refused take costs nothing).
        let t1 = t0 + Duration::from_millis(50);
        for _ in 0..5 {
            assert!(r.take(&d, t1).is_ok());
        }
        assert!(r.take(&d, t1).is_err());
        // Over a long time, no more than the rate: 10 s of refill, capped at the burst.
        let t2 = t1 + Duration::from_secs(10);
        let kept = (0..1000).filter(|_| r.take(&d, t2).is_ok()).count();
        assert_eq!(kept, 10);
    }

    #[test]
    fn devices_have_their_own_buckets_and_tiers_and_no_limit_are_free() {
        let mut r = Rates::new(1, 1, &["tier".to_string()]);
        let t = Instant::now();
        assert!(r.take(&dev("a"), t).is_ok());
        assert!(r.take(&dev("a"), t).is_err());
        assert!(
            r.take(&dev("b"), t).is_ok(),
            "another device's bucket is its own"
        );
        assert!((0..100).all(|_| r.take(&dev("tier"), t).is_ok()));
        let mut off = Rates::new(0, 1, &[]);
        assert!((0..100).all(|_| off.take(&dev("a"), t).is_ok()));
        assert_eq!(off.tracked(), 0);
    }

    #[test]
    fn a_wait_is_never_zero_and_the_clock_going_nowhere_refills_nothing() {
        let mut r = Rates::new(1_000_000, 1, &[]);
        let t = Instant::now();
        assert!(r.take(&dev("a"), t).is_ok());
        assert_eq!(r.take(&dev("a"), t).unwrap_err(), Duration::from_millis(1));
        // An earlier instant (threads racing to the lock) counts as no time.
        let mut r = Rates::new(10, 1, &[]);
        let later = t + Duration::from_secs(1);
        assert!(r.take(&dev("a"), later).is_ok());
        assert!(r.take(&dev("a"), t).is_err());
    }

    #[test]
    fn refilled_buckets_are_swept_so_the_map_stays_bounded() {
        let mut r = Rates::new(1000, 1, &[]);
        let t = Instant::now();
        for i in 0..KEEP {
            let _ = r.take(&dev(&i.to_string()), t);
        }
        assert_eq!(r.tracked(), KEEP);
        // A second later every one of them has refilled: a newcomer sweeps them.
        let _ = r.take(&dev("new"), t + Duration::from_secs(1));
        assert_eq!(r.tracked(), 1);
        // Buckets still short are kept (and so the device's debt is not forgiven).
        let mut r = Rates::new(1, 1, &[]);
        for i in 0..KEEP {
            let _ = r.take(&dev(&i.to_string()), t);
        }
        let _ = r.take(&dev("new"), t);
        assert_eq!(r.tracked(), KEEP + 1);
    }
}
