//! The wake policy: when the uplink wakes, sends, lingers and closes, and how it backs off.
//! A pure state machine over explicit time; the uplink task only follows its answers.

use std::time::{Duration, Instant};

use crate::config::OutboxConfig;

/// What is waiting in the outbox (flushed entries only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    pub urgent: usize,
    pub normal: usize,
    pub normal_bytes: usize,
    pub bulk: usize,
    pub oldest_normal: Option<Instant>,
    pub oldest_bulk: Option<Instant>,
}

impl Pending {
    /// Only urgent entries count (the uplink's budget holds the rest).
    pub fn hold_all_but_urgent(&mut self) {
        *self = Pending {
            urgent: self.urgent,
            ..Pending::default()
        };
    }

    pub fn total(&self) -> usize {
        self.urgent + self.normal + self.bulk
    }
}

/// The uplink's next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send a batch now.
    Send,
    /// Close the idle connection (the linger ran out).
    Close,
    /// Sleep until the deadline, or until new entries arrive; `None`: no timer at all.
    Wait(Option<Instant>),
}

#[derive(Debug, Clone)]
pub struct WakePolicy {
    max_batch_events: usize,
    max_batch_bytes: usize,
    max_delay: Duration,
    bulk_window: Duration,
    linger: Duration,
    retry_base: Duration,
    retry_max: Duration,
    /// Connected and lingering until then.
    awake_until: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
}

impl WakePolicy {
    pub fn new(c: &OutboxConfig) -> Self {
        WakePolicy {
            max_batch_events: c.max_batch_events,
            max_batch_bytes: c.max_batch_bytes,
            max_delay: Duration::from_millis(c.max_delay_ms),
            bulk_window: Duration::from_millis(c.bulk_window_ms),
            linger: Duration::from_millis(c.linger_ms),
            retry_base: Duration::from_millis(c.retry_base_ms),
            retry_max: Duration::from_millis(c.retry_max_ms),
            awake_until: None,
            retry_at: None,
            failures: 0,
        }
    }

    pub fn is_awake(&self) -> bool {
        self.awake_until.is_some()
    }

    /// Failed attempts in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Decides the next step at `now`.
    pub fn next(&mut self, now: Instant, p: &Pending) -> Action {
        if let Some(t) = self.retry_at {
            if now < t {
                return Action::Wait(Some(t));
            }
        }
        let awake = self.awake_until.is_some_and(|t| now < t);
        let normal_due = p.oldest_normal.map(|t| t + self.max_delay);
        let bulk_due = p.oldest_bulk.map(|t| t + self.bulk_window);
        let due = p.urgent > 0
            || p.normal >= self.max_batch_events
            || p.normal_bytes >= self.max_batch_bytes
            || normal_due.is_some_and(|t| t <= now)
            || bulk_due.is_some_and(|t| t <= now)
            || (awake && p.total() > 0)
            || self.retry_at.is_some() && p.total() > 0;
        if due {
            return Action::Send;
        }
        if self.awake_until.is_some() && !awake {
            self.awake_until = None;
            return Action::Close;
        }
        let deadline = [normal_due, bulk_due, self.awake_until]
            .into_iter()
            .flatten()
            .min();
        Action::Wait(deadline)
    }

    /// A batch was delivered: stay connected for `linger`.
    pub fn on_delivered(&mut self, now: Instant) {
        self.failures = 0;
        self.retry_at = None;
        self.awake_until = Some(now + self.linger);
    }

    /// A send failed and will be retried: back off exponentially, with jitter in
    /// `[delay/2, delay]` drawn from `jitter` (0.0..=1.0). Returns the wait.
    pub fn on_failed(&mut self, now: Instant, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = self
            .retry_base
            .saturating_mul(1u32 << (self.failures - 1).min(20));
        let full = exp.min(self.retry_max);
        let wait = full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        self.retry_at = Some(now + wait);
        self.awake_until = None;
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policy() -> WakePolicy {
        let mut c = Config::defaults().outbox;
        c.max_batch_events = 3;
        c.max_delay_ms = 1000;
        c.bulk_window_ms = 60_000;
        c.linger_ms = 2000;
        c.retry_base_ms = 100;
        c.retry_max_ms = 1000;
        WakePolicy::new(&c)
    }

    #[test]
    fn empty_outbox_means_no_timer() {
        let mut p = policy();
        assert_eq!(
            p.next(Instant::now(), &Pending::default()),
            Action::Wait(None)
        );
    }

    #[test]
    fn urgent_wakes_now_normal_waits_for_size_or_age_bulk_for_its_window() {
        let t0 = Instant::now();
        let mut p = policy();
        assert_eq!(
            p.next(
                t0,
                &Pending {
                    urgent: 1,
                    ..Default::default()
                }
            ),
            Action::Send
        );
        let normal = Pending {
            normal: 1,
            normal_bytes: 10,
            oldest_normal: Some(t0),
            ..Default::default()
        };
        assert_eq!(
            p.next(t0, &normal),
            Action::Wait(Some(t0 + Duration::from_millis(1000)))
        );
        assert_eq!(
            p.next(t0 + Duration::from_millis(1000), &normal),
            Action::Send
        );
        assert_eq!(
            p.next(
                t0,
                &Pending {
                    normal: 3,
                    ..normal
                }
            ),
            Action::Send
        );
        let bulk = Pending {
            bulk: 5,
            oldest_bulk: Some(t0),
            ..Default::default()
        };
        assert_eq!(
            p.next(t0, &bulk),
            Action::Wait(Some(t0 + Duration::from_secs(60)))
        );
    }

    #[test]
    fn bulk_rides_along_while_awake_then_the_connection_closes_after_linger() {
        let t0 = Instant::now();
        let mut p = policy();
        p.on_delivered(t0);
        let bulk = Pending {
            bulk: 1,
            oldest_bulk: Some(t0),
            ..Default::default()
        };
        assert_eq!(p.next(t0 + Duration::from_millis(10), &bulk), Action::Send);
        p.on_delivered(t0);
        let idle = Pending::default();
        assert_eq!(
            p.next(t0 + Duration::from_millis(10), &idle),
            Action::Wait(Some(t0 + Duration::from_millis(2000)))
        );
        assert_eq!(
            p.next(t0 + Duration::from_millis(2000), &idle),
            Action::Close
        );
        assert_eq!(
            p.next(t0 + Duration::from_millis(2001), &idle),
            Action::Wait(None)
        );
    }

    #[test]
    fn failures_back_off_exponentially_with_jitter_up_to_the_max() {
        let t0 = Instant::now();
        let mut p = policy();
        let waits: Vec<u128> = (0..6).map(|_| p.on_failed(t0, 1.0).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.on_failed(t0, 0.0).as_millis(), 500);
        let urgent = Pending {
            urgent: 1,
            ..Default::default()
        };
        assert_eq!(
            p.next(t0, &urgent),
            Action::Wait(Some(t0 + Duration::from_millis(500)))
        );
        assert_eq!(
            p.next(t0 + Duration::from_millis(500), &urgent),
            Action::Send
        );
        p.on_delivered(t0);
        assert_eq!(p.failures(), 0);
    }
}
