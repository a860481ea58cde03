//! A handler's CPU share (pure: the time is passed in): a token bucket of run time, refilled
//! at `percent` of the wall clock, holding at most one second's worth. Every invocation spends
//! the time it ran; while the bucket is empty the handler's invocations are refused
//! (`limit:cpu_share`) without running. So a handler that legitimately burns its whole fuel on
//! every event, and never fails, still leaves the rest of the dispatcher's time to the others.

use std::time::{Duration, Instant};

/// One handler's bucket.
#[derive(Debug, Clone)]
pub struct CpuShare {
    /// Of the wall clock, in percent (0 or 100 and above: no limit).
    percent: u32,
    /// Run time still allowed, in ns (negative after an invocation that overdrew it).
    balance_ns: i128,
    /// When the balance was last refilled.
    at: Option<Instant>,
}

impl CpuShare {
    pub fn new(percent: u32) -> CpuShare {
        CpuShare {
            percent,
            balance_ns: Self::burst_ns(percent),
            at: None,
        }
    }

    /// Whether it limits anything (1 to 99 percent).
    pub fn is_on(&self) -> bool {
        (1..100).contains(&self.percent)
    }

    /// One second's worth of the share.
    fn burst_ns(percent: u32) -> i128 {
        i128::from(percent) * 10_000_000
    }

    /// Whether the handler may run now (its bucket, refilled for the time since, holds some).
    pub fn admit(&mut self, now: Instant) -> bool {
        if !self.is_on() {
            return true;
        }
        if let Some(at) = self.at {
            let elapsed = now.saturating_duration_since(at).as_nanos() as i128;
            self.balance_ns = (self.balance_ns + elapsed * i128::from(self.percent) / 100)
                .min(Self::burst_ns(self.percent));
        }
        self.at = Some(now);
        self.balance_ns > 0
    }

    /// Charges the time one invocation ran.
    pub fn spend(&mut self, ran: Duration) {
        if self.is_on() {
            let floor = -Self::burst_ns(self.percent);
            self.balance_ns = (self.balance_ns - ran.as_nanos() as i128).max(floor);
        }
    }

    /// The share, in percent of the wall clock (0: none).
    pub fn percent(&self) -> u32 {
        if self.is_on() {
            self.percent
        } else {
            0
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
        let mut s = CpuShare::new(50);
        // A burst of one second's worth (500 ms of running), then refusals.
        assert!(s.admit(t0));
        s.spend(400 * MS);
        assert!(s.admit(t0));
        s.spend(200 * MS);
        assert!(!s.admit(t0), "overdrawn by 100 ms");
        // 200 ms of wall time refill 100 ms: back to zero, still refused.
        assert!(!s.admit(t0 + 200 * MS));
        assert!(s.admit(t0 + 202 * MS));
        // A long quiet spell refills at most the burst.
        assert!(s.admit(t0 + 100_000 * MS));
        s.spend(499 * MS);
        assert!(s.admit(t0 + 100_000 * MS));
        s.spend(2 * MS);
        assert!(!s.admit(t0 + 100_000 * MS));
    }

    #[test]
    fn a_long_run_costs_at_most_a_second_of_debt() {
        let t0 = Instant::now();
        let mut s = CpuShare::new(10);
        assert!(s.admit(t0));
        s.spend(Duration::from_secs(60));
        // Debt floor: 100 ms; refilled at 10%: 1 s of wall time gives it back.
        assert!(!s.admit(t0 + 999 * MS));
        assert!(s.admit(t0 + 1_001 * MS));
    }

    #[test]
    fn no_share_means_no_limit() {
        let t0 = Instant::now();
        for p in [0, 100, 250] {
            let mut s = CpuShare::new(p);
            s.spend(Duration::from_secs(3600));
            assert!(s.admit(t0));
            assert_eq!(s.percent(), 0);
        }
    }
}
