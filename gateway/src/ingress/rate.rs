//! Each device's event rate (pure: the time is passed in): a token bucket per device id,
//! refilled at `ingress.device_events_per_s` and holding at most `ingress.device_burst`. Every
//! frame a device sends on a stream takes a token ([`Rates::take`]: a resend, a hello or a bad
//! frame costs the box a decode and an answer as a publish does). With none left, a publish is
//! answered `busy` with the wait until the bucket holds a tenth of a second's worth again, and
//! the stream is held open that long (so at most `max_streams_per_connection` busy answers per
//! wait); any other frame is taken, and the stream reads nothing more for the wait (QUIC flow
//! control then holds the device back). A datagram takes a token only while the bucket is more
//! than half full ([`Rates::take_spare`]): best-effort telemetry never uses up what the
//! device's publishes need, and is dropped first.
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

/// How often a device past its rate is logged.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

/// One device's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When the device was last logged as past its rate.
    warned: Option<Instant>,
}

/// A token refused: the wait until the device may go on (at least 1 ms), and whether to log it
/// (the device's first refusal in [`WARN_EVERY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub wait: Duration,
    pub warn: bool,
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

    /// Takes one token of `device` at `now`, or says how long until it may go on.
    pub fn take(&mut self, device: &Arc<str>, now: Instant) -> Result<(), Limited> {
        self.take_above(device, now, 0.0)
    }

    /// Takes one token of `device` at `now` only while its bucket is more than half full (for
    /// datagrams: the lower half is kept for its publishes).
    pub fn take_spare(&mut self, device: &Arc<str>, now: Instant) -> Result<(), Limited> {
        // Half the bucket, but never all of it (a burst of 1 would keep every datagram out).
        let keep = (self.burst / 2.0).min(self.burst - 1.0);
        self.take_above(device, now, keep)
    }

    fn take_above(&mut self, device: &Arc<str>, now: Instant, keep: f64) -> Result<(), Limited> {
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
            warned: None,
        });
        // An instant before the last one (callers racing to the lock) refills nothing, and
        // does not move the bucket's time back (which would count a refill twice).
        let since = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + since * per_s).min(burst);
        b.at = b.at.max(now);
        if b.tokens >= keep + 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        // Back when a tenth of a second's worth is there (at least one token, at most the
        // burst): a device told to wait for a single token would come back for one event.
        let want = (per_s / 10.0)
            .clamp(1.0, burst)
            .max((keep + 1.0).min(burst));
        let wait = ((want - b.tokens) / per_s).clamp(0.001, 3600.0);
        let warn = b
            .warned
            .is_none_or(|w| now.saturating_duration_since(w) >= WARN_EVERY);
        if warn {
            b.warned = Some(now);
        }
        Err(Limited {
            wait: Duration::from_secs_f64(wait),
            warn,
        })
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
        let refused = r.take(&d, t0).unwrap_err();
        // A tenth of a second's worth (10 tokens) takes 100 ms at 100/s; the first refusal is
        // logged, the next ones within a minute are not.
        assert_eq!(
            refused,
            Limited {
                wait: Duration::from_millis(100),
                warn: true
            }
        );
        assert!(!r.take(&d, t0).unwrap_err().warn);
        // 50 ms later, 5 tokens: 5 events, then busy again (a refused take costs nothing).
        let t1 = t0 + Duration::from_millis(50);
        for _ in 0..5 {
            assert!(r.take(&d, t1).is_ok());
        }
        assert!(r.take(&d, t1).is_err());
        // Over a long time, no more than the rate: 10 s of refill, capped at the burst.
        let t2 = t1 + WARN_EVERY + Duration::from_secs(10);
        let (mut kept, mut logged) = (0, 0);
        for _ in 0..1000 {
            match r.take(&d, t2) {
                Ok(()) => kept += 1,
                Err(l) => logged += usize::from(l.warn),
            }
        }
        assert_eq!(kept, 10);
        // A minute after the last log line, the first refusal is logged again, and only it.
        assert_eq!(logged, 1);
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
        assert_eq!(
            r.take(&dev("a"), t).unwrap_err().wait,
            Duration::from_millis(1)
        );
        // An earlier instant (threads racing to the lock) counts as no time, and the refill
        // since the later one is not counted twice.
        let mut r = Rates::new(10, 1, &[]);
        let later = t + Duration::from_secs(1);
        assert!(r.take(&dev("a"), later).is_ok());
        assert!(r.take(&dev("a"), t).is_err());
        assert!(r
            .take(&dev("a"), later + Duration::from_millis(50))
            .is_err());
        assert!(r
            .take(&dev("a"), later + Duration::from_millis(100))
            .is_ok());
    }

    #[test]
    fn with_a_burst_of_one_datagrams_still_pass_at_the_rate() {
        let mut r = Rates::new(10, 1, &[]);
        let (d, t) = (dev("d"), Instant::now());
        assert!(r.take_spare(&d, t).is_ok());
        let refused = r.take_spare(&d, t).unwrap_err();
        assert_eq!(refused.wait, Duration::from_millis(100));
        assert!(r.take_spare(&d, t + refused.wait).is_ok());
    }

    #[test]
    fn datagrams_take_only_the_upper_half_of_the_bucket() {
        let mut r = Rates::new(10, 10, &[]);
        let (d, t) = (dev("d"), Instant::now());
        // 10 tokens: datagrams take 5 (never the lower half), publishes the rest.
        let spare = (0..10).filter(|_| r.take_spare(&d, t).is_ok()).count();
        assert_eq!(spare, 5);
        let refused = r.take_spare(&d, t).unwrap_err();
        // Back once the bucket holds 6 again: one token at 10/s.
        assert_eq!(refused.wait, Duration::from_millis(100));
        let kept = (0..10).filter(|_| r.take(&d, t).is_ok()).count();
        assert_eq!(kept, 5, "the publishes still have their half");
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
