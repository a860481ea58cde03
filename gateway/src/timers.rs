//! Handler timers as a pure schedule driven by explicit wall-clock time: each timer's next due
//! time (kept durable under `t/<handler>` by the dispatcher's write sets), which timers are due,
//! and when each fires next. A timer that fell due several periods ago (the box was off) fires
//! once and keeps its phase; it never fires once per missed period.

/// One handler's timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    handler: usize,
    period_ms: u64,
    due_ms: u64,
}

/// The timers of the loaded handlers.
#[derive(Debug, Default, Clone)]
pub struct Timers {
    slots: Vec<Slot>,
}

/// The first `due + k * period` (k ≥ 1) strictly after `now`.
pub fn next_after(due_ms: u64, period_ms: u64, now_ms: u64) -> u64 {
    let period = period_ms.max(1);
    let missed = now_ms.saturating_sub(due_ms) / period;
    due_ms.saturating_add(period.saturating_mul(missed.saturating_add(1)))
}

impl Timers {
    /// Adds `handler`'s timer. `stored` is the durable next due time, if any; a missing one,
    /// or one more than a period ahead (the clock went back), starts a full period from `now`.
    pub fn add(&mut self, handler: usize, period_ms: u64, stored: Option<u64>, now_ms: u64) {
        let fresh = now_ms.saturating_add(period_ms);
        let due_ms = match stored {
            Some(d) if d <= fresh => d,
            _ => fresh,
        };
        self.slots.push(Slot {
            handler,
            period_ms,
            due_ms,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The earliest due time, if there is any timer.
    pub fn next_due(&self) -> Option<u64> {
        self.slots.iter().map(|s| s.due_ms).min()
    }

    /// The timers due at `now`, as `(handler, due_ms, next_due_ms)`, each rescheduled to its
    /// next due time.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<(usize, u64, u64)> {
        let mut due = Vec::new();
        for s in &mut self.slots {
            if s.due_ms <= now_ms {
                let next = next_after(s.due_ms, s.period_ms, now_ms);
                due.push((s.handler, s.due_ms, next));
                s.due_ms = next;
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_that_fell_due_long_ago_fires_once_and_keeps_its_phase() {
        let mut t = Timers::default();
        assert_eq!(t.next_due(), None, "no timer, no wake-up");
        // Due at 1_000, period 100; the box comes back at 1_550.
        t.add(0, 100, Some(1_000), 1_550);
        assert_eq!(t.take_due(1_550), vec![(0, 1_000, 1_600)]);
        assert_eq!(t.take_due(1_599), vec![]);
        assert_eq!(t.next_due(), Some(1_600));
        assert_eq!(t.take_due(1_600), vec![(0, 1_600, 1_700)]);
    }

    #[test]
    fn a_missing_or_future_due_time_starts_a_full_period_from_now() {
        let mut t = Timers::default();
        t.add(0, 100, None, 5_000);
        t.add(1, 100, Some(9_999_999), 5_000);
        t.add(2, 100, Some(5_050), 5_000);
        assert_eq!(t.take_due(5_099), vec![(2, 5_050, 5_150)]);
        assert_eq!(
            t.take_due(5_100),
            vec![(0, 5_100, 5_200), (1, 5_100, 5_200)]
        );
    }
}
