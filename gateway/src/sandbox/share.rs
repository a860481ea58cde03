//! A handler's CPU share (pure: the time and the load are passed in): a token bucket of run
//! time, refilled at a share of the wall clock, holding at most one second's worth. Every
//! invocation spends the time it ran; while the bucket is empty the handler's invocations are
//! refused (`limit:cpu_share`) without running. So a handler that legitimately burns its whole
//! fuel on every event, and never fails, still leaves the dispatcher's time to the others.
//!
//! The box's `limits.cpu_percent` is one of:
//! - **fair** (0, the default): nothing is limited unless there is contention, that is, other
//!   input is queued for the dispatcher *and* at least two handlers ran (or asked to) in the
//!   last second; then each gets `100 / (n + 1)` percent, at least 1 (n handlers, one share
//!   kept for the gateway's own work: reading, committing, dead letters). A box's only
//!   handler, or a box that keeps up, is never held back;
//! - **fixed** (1 to 99 percent): always, contention or not;
//! - **off** (100 or more).
//!
//! A manifest's `cpu_percent` (1 to 99) only lowers its own share: a fixed cap that always
//! holds, and under a fair box the fair share holds on top of it. 100 asks for nothing.

use std::time::{Duration, Instant};

/// How recently a handler must have run to count as contending.
pub const ACTIVE: Duration = Duration::from_secs(1);

/// What limits a handler's run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The fair share under contention, and the handler's own fixed cap (if any) always.
    Fair(Option<u32>),
    Fixed(u32),
    Off,
}

/// One handler's bucket.
#[derive(Debug, Clone)]
pub struct CpuShare {
    policy: Policy,
    /// Run time still allowed, in ns (negative after an invocation that overdrew it).
    balance_ns: i128,
    /// When the balance was last refilled.
    at: Option<Instant>,
    /// The share in effect at the last admission (`None`: none, the run is not charged).
    charging: Option<u32>,
    /// When it last ran (or was refused): whether it contends.
    last: Option<Instant>,
}

impl CpuShare {
    /// From the box's `cpu_percent` (0 fair, 1 to 99 fixed, 100 and above off) and the
    /// manifest's (a cap of its own, 1 to 99; `None` or 100 and above: none).
    pub fn new(box_percent: u32, manifest: Option<u32>) -> CpuShare {
        let own = manifest.filter(|p| (1..100).contains(p));
        let policy = match (box_percent, own) {
            (0, own) => Policy::Fair(own),
            (b, Some(p)) => Policy::Fixed(if b < 100 { p.min(b) } else { p }),
            (b, None) if b < 100 => Policy::Fixed(b),
            _ => Policy::Off,
        };
        CpuShare {
            policy,
            balance_ns: 0,
            at: None,
            charging: None,
            last: None,
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Whether it ran within [`ACTIVE`] of `now`.
    pub fn is_active(&self, now: Instant) -> bool {
        self.last
            .is_some_and(|t| now.saturating_duration_since(t) < ACTIVE)
    }

    /// The share in effect (percent), given how many handlers are active (this one included)
    /// and whether work is waiting for the dispatcher.
    pub fn in_effect(&self, active: usize, waiting: bool) -> Option<u32> {
        match self.policy {
            Policy::Fixed(p) => Some(p),
            Policy::Fair(own) if waiting && active >= 2 => {
                let fair = (100 / (active.min(99) as u32 + 1)).max(1);
                Some(own.map_or(fair, |p| p.min(fair)))
            }
            Policy::Fair(own) => own,
            Policy::Off => None,
        }
    }

    /// One second's worth of `percent`.
    fn burst_ns(percent: u32) -> i128 {
        i128::from(percent) * 10_000_000
    }

    /// Whether the handler may run now. `active` counts the handlers that ran within
    /// [`ACTIVE`] (this one included); `waiting`, whether work is waiting for the dispatcher.
    pub fn admit(&mut self, now: Instant, active: usize, waiting: bool) -> bool {
        self.last = Some(now);
        let Some(percent) = self.in_effect(active, waiting) else {
            // Not limited now (and not charged); the bucket keeps refilling with the clock, so
            // a contention that comes and goes does not hand out a fresh burst each time.
            self.charging = None;
            return true;
        };
        match self.at {
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_nanos() as i128;
                self.balance_ns += elapsed * i128::from(percent) / 100;
            }
            None => self.balance_ns = Self::burst_ns(percent),
        }
        self.balance_ns = self.balance_ns.min(Self::burst_ns(percent));
        self.at = Some(now);
        self.charging = Some(percent);
        self.balance_ns > 0
    }

    /// Charges the time one admitted invocation ran (nothing when no share was in effect).
    pub fn spend(&mut self, ran: Duration) {
        if let Some(percent) = self.charging {
            let floor = -Self::burst_ns(percent);
            self.balance_ns = (self.balance_ns - ran.as_nanos() as i128).max(floor);
        }
    }

    /// The fixed share (or cap), in percent of the wall clock (0: none).
    pub fn percent(&self) -> u32 {
        match self.policy {
            Policy::Fixed(p) | Policy::Fair(Some(p)) => p,
            _ => 0,
        }
    }

    /// How it is shared, for `status`: `fair`, `fixed` or `off`.
    pub fn kind(&self) -> &'static str {
        match self.policy {
            Policy::Fair(_) => "fair",
            Policy::Fixed(_) => "fixed",
            Policy::Off => "off",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_handler_over_its_share_is_refused_until_the_clock_refills_it() {
        let t0 = Instant::now();
        let mut s = CpuShare::new(50, None);
        // A burst of one second's worth (500 ms of running), then refusals.
        assert!(s.admit(t0, 1, false));
        s.spend(400 * MS);
        assert!(s.admit(t0, 1, false));
        s.spend(200 * MS);
        assert!(!s.admit(t0, 1, false), "overdrawn by 100 ms");
        // 200 ms of wall time refill 100 ms: back to zero, still refused.
        assert!(!s.admit(t0 + 200 * MS, 1, false));
        assert!(s.admit(t0 + 202 * MS, 1, false));
        // A long quiet spell refills at most the burst.
        assert!(s.admit(t0 + 100_000 * MS, 1, false));
        s.spend(499 * MS);
        assert!(s.admit(t0 + 100_000 * MS, 1, false));
        s.spend(2 * MS);
        assert!(!s.admit(t0 + 100_000 * MS, 1, false));
    }

    #[test]
    fn a_long_run_costs_at_most_a_second_of_debt() {
        let t0 = Instant::now();
        let mut s = CpuShare::new(10, None);
        assert!(s.admit(t0, 1, false));
        s.spend(Duration::from_secs(60));
        // Debt floor: 100 ms; refilled at 10%: 1 s of wall time gives it back.
        assert!(!s.admit(t0 + 999 * MS, 1, false));
        assert!(s.admit(t0 + 1_001 * MS, 1, false));
    }

    #[test]
    fn off_means_no_limit() {
        let t0 = Instant::now();
        for p in [100, 250] {
            let mut s = CpuShare::new(p, Some(100));
            s.spend(Duration::from_secs(3600));
            assert!(s.admit(t0, 5, true));
            assert_eq!((s.percent(), s.policy()), (0, Policy::Off));
        }
    }

    #[test]
    fn a_fair_share_holds_only_under_contention() {
        let t0 = Instant::now();
        let mut s = CpuShare::new(0, None);
        // Alone, or with nothing waiting: never held back, never charged.
        for (active, waiting) in [(1, true), (3, false)] {
            assert!(s.admit(t0, active, waiting));
            s.spend(Duration::from_secs(60));
        }
        assert!(s.admit(t0, 1, true));
        // Two handlers and work waiting: a third of the clock each (one share for the
        // gateway), from a full bucket of 330 ms.
        assert_eq!(s.in_effect(2, true), Some(33));
        assert!(s.admit(t0, 2, true));
        s.spend(300 * MS);
        assert!(s.admit(t0, 2, true));
        s.spend(40 * MS);
        assert!(!s.admit(t0, 2, true), "over its third");
        // The contention ends: it runs again at once.
        assert!(s.admit(t0, 1, true));
        assert!(s.is_active(t0 + 999 * MS) && !s.is_active(t0 + ACTIVE));
    }

    #[test]
    fn a_manifest_only_lowers_its_own_share() {
        // Under a fair box: its cap always, and the fair share on top when it is lower.
        let s = CpuShare::new(0, Some(99));
        assert_eq!(s.in_effect(1, false), Some(99));
        assert_eq!(
            s.in_effect(2, true),
            Some(33),
            "99 does not opt out of fairness"
        );
        assert_eq!(CpuShare::new(0, Some(10)).in_effect(2, true), Some(10));
        // 100 asks for nothing; under a fixed box, the lower of the two.
        assert_eq!(CpuShare::new(0, Some(100)).policy(), Policy::Fair(None));
        assert_eq!(CpuShare::new(25, Some(40)).policy(), Policy::Fixed(25));
        assert_eq!(CpuShare::new(25, Some(10)).policy(), Policy::Fixed(10));
        assert_eq!(CpuShare::new(100, Some(10)).policy(), Policy::Fixed(10));
    }

    #[test]
    fn a_fair_share_never_rounds_down_to_nothing() {
        assert_eq!(CpuShare::new(0, None).in_effect(150, true), Some(1));
        assert_eq!(CpuShare::new(0, None).in_effect(99, true), Some(1));
    }
}
