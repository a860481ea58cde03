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

impl Slot {
    /// A due time more than a period ahead of `now` comes back to a period from now.
    fn clamp(&mut self, now_ms: u64) -> bool {
        let limit = now_ms.saturating_add(self.period_ms);
        let changed = self.due_ms > limit;
        self.due_ms = self.due_ms.min(limit);
        changed
    }
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
    /// Returns the due time to store when it is not the stored one.
    pub fn add(
        &mut self,
        handler: usize,
        period_ms: u64,
        stored: Option<u64>,
        now_ms: u64,
    ) -> Option<u64> {
        let mut slot = Slot {
            handler,
            period_ms,
            due_ms: stored.unwrap_or(u64::MAX),
        };
        let changed = slot.clamp(now_ms);
        let due = slot.due_ms;
        self.slots.push(slot);
        (changed || stored.is_none()).then_some(due)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The earliest due time, if there is any timer.
    pub fn next_due(&self) -> Option<u64> {
        self.slots.iter().map(|s| s.due_ms).min()
    }

    /// The shortest period of any timer.
    pub fn shortest_period(&self) -> Option<u64> {
        self.slots.iter().map(|s| s.period_ms).min()
    }

    /// The timers due at `now`, as `(handler, due_ms, next_due_ms)`, each rescheduled to its
    /// next due time.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<(usize, u64, u64)> {
        let mut due = Vec::new();
        for s in &mut self.slots {
            // The clock went back while running: at most a period from now, not the jump.
            s.clamp(now_ms);
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
        assert_eq!(t.add(0, 100, Some(1_000), 1_550), None);
        assert_eq!(t.take_due(1_550), vec![(0, 1_000, 1_600)]);
        assert_eq!(t.take_due(1_599), vec![]);
        assert_eq!(t.next_due(), Some(1_600));
        assert_eq!(t.take_due(1_600), vec![(0, 1_600, 1_700)]);
    }

    #[test]
    fn a_missing_or_future_due_time_starts_a_full_period_from_now() {
        let mut t = Timers::default();
        assert_eq!(
            t.add(0, 100, None, 5_000),
            Some(5_100),
            "a new timer's due time is stored"
        );
        assert_eq!(t.add(1, 100, Some(9_999_999), 5_000), Some(5_100));
        assert_eq!(t.add(2, 100, Some(5_050), 5_000), None, "already stored");
        assert_eq!(t.take_due(5_099), vec![(2, 5_050, 5_150)]);
        assert_eq!(
            t.take_due(5_100),
            vec![(0, 5_100, 5_200), (1, 5_100, 5_200)]
        );
    }

    #[test]
    fn a_clock_set_back_while_running_delays_a_timer_by_at_most_a_period() {
        let mut t = Timers::default();
        t.add(0, 100, None, 1_000_000);
        // The clock jumps back by 900 s: the timer is due a period from the new now.
        assert_eq!(t.take_due(100_000), vec![]);
        assert_eq!(t.next_due(), Some(100_100));
        assert_eq!(t.take_due(100_100), vec![(0, 100_100, 100_200)]);
    }
}
