//! A deployed version's probation (pure: no I/O, no clock read; wall time is passed in). For
//! its first `events` runs (one verdict per event tree, as the quarantine counts them) within
//! `window_ms` of the deploy, whichever ends first, it fails when more than `max_failures` of
//! them trap or hit a limit, or when it is quarantined for every device meanwhile; it passes
//! when the window ends otherwise. A rejection (the handler returned non-zero: bad input, as it
//! judged it) counts as a run, not as a failure, as in the quarantine. What a failure leads to
//! (a rollback) is the admin's, not this file's.

use super::FailureKind;

/// How a probation is judged (`[deploy] probation_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub events: u32,
    pub max_failures: u32,
    pub window_ms: u64,
}

/// How a probation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Passed,
    /// Why it failed.
    Failed(String),
}

/// One version's probation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probation {
    pub rules: Rules,
    /// The wall time it started (its deploy, or the start of the gateway that resumed it).
    pub started_ms: u64,
    /// Runs seen and failures among them.
    pub runs: u32,
    pub failures: u32,
}

impl Probation {
    pub fn new(rules: Rules, started_ms: u64) -> Probation {
        Probation {
            rules,
            started_ms,
            runs: 0,
            failures: 0,
        }
    }

    /// Whether its window is over at `now_ms` (by time).
    fn timed_out(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.started_ms) >= self.rules.window_ms
    }

    /// Counts one run's verdict at `now_ms`. `Some` once the probation has ended.
    pub fn observe(&mut self, verdict: Option<FailureKind>, now_ms: u64) -> Option<End> {
        if self.timed_out(now_ms) {
            return Some(End::Passed);
        }
        self.runs += 1;
        if matches!(verdict, Some(FailureKind::Timeout | FailureKind::Broken)) {
            self.failures += 1;
        }
        if self.failures > self.rules.max_failures {
            return Some(End::Failed(format!(
                "{} of its first {} runs failed (trapped or hit a limit), more than deploy.probation_max_failures = {}; each failure is in the dead letters",
                self.failures, self.runs, self.rules.max_failures
            )));
        }
        (self.runs >= self.rules.events).then_some(End::Passed)
    }

    /// The probation at `now_ms` with no run: `Some(Passed)` once its window's time is up.
    pub fn at(&self, now_ms: u64) -> Option<End> {
        self.timed_out(now_ms).then_some(End::Passed)
    }

    /// It was quarantined for every device during its probation: it fails.
    pub fn quarantined(&self) -> End {
        End::Failed(format!(
            "quarantined for every device during its probation (after {} runs, {} failed)",
            self.runs, self.failures
        ))
    }

    /// What is left of its window at `now_ms`.
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        (self.started_ms.saturating_add(self.rules.window_ms)).saturating_sub(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        events: 100,
        max_failures: 5,
        window_ms: 60_000,
    };

    #[test]
    fn more_failures_than_allowed_fail_it_at_the_one_that_crosses() {
        let mut p = Probation::new(RULES, 1_000);
        for i in 0..5 {
            assert_eq!(p.observe(Some(FailureKind::Broken), 1_000 + i), None);
        }
        assert_eq!(p.observe(None, 2_000), None);
        match p.observe(Some(FailureKind::Timeout), 2_001) {
            Some(End::Failed(why)) => {
                assert!(why.starts_with("6 of its first 7 runs failed"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejections_are_runs_not_failures_and_the_count_ends_it() {
        let mut p = Probation::new(RULES, 0);
        for _ in 0..99 {
            assert_eq!(p.observe(Some(FailureKind::Rejected), 10), None);
        }
        assert_eq!(p.observe(None, 10), Some(End::Passed));
        assert_eq!(p.failures, 0);
    }

    #[test]
    fn the_window_ends_it_by_time_with_or_without_a_run() {
        let p = Probation::new(RULES, 1_000);
        assert_eq!(p.at(60_999), None);
        assert_eq!(p.remaining_ms(60_999), 1);
        assert_eq!(p.at(61_000), Some(End::Passed));
        let mut p = Probation::new(RULES, 1_000);
        // A failure after the window is not counted: the window had passed.
        assert_eq!(
            p.observe(Some(FailureKind::Broken), 61_000),
            Some(End::Passed)
        );
        assert_eq!(p.failures, 0);
    }

    #[test]
    fn a_quarantine_fails_it() {
        let p = Probation::new(RULES, 0);
        assert!(matches!(p.quarantined(), End::Failed(w) if w.contains("quarantined")));
    }
}
