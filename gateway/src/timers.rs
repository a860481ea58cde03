//! Handler timers as a pure schedule driven by explicit wall-clock time: each timer's next due
//! time (kept durable under `t/<handler>` by the dispatcher's write sets), which timers are due,
//! and when each fires next. A timer that fell due several periods ago (the box was off) fires
//! once and keeps its phase; it never fires once per missed period.
//!
//! A firing is named by its due time, and within one schedule due times only rise. A clock set
//! back brings the due time back within a period of the new clock, where it may meet a due
//! time that already fired: each such step starts a new **epoch** of the schedule (kept with
//! the due time), so a firing is named by (epoch, due time), never twice.

/// One handler's timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    handler: usize,
    period_ms: u64,
    due_ms: u64,
    epoch: u64,
}

impl Slot {
    /// A due time more than a period ahead of `now` comes back to a period from now, in a new
    /// epoch (it may now meet due times that already fired).
    fn clamp(&mut self, now_ms: u64) -> bool {
        let limit = now_ms.saturating_add(self.period_ms);
        let changed = self.due_ms > limit;
        if changed {
            self.due_ms = limit;
            self.epoch += 1;
        }
        changed
    }
}

/// A due time and the epoch of the schedule it belongs to (0 until the clock is set back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub due_ms: u64,
    pub epoch: u64,
}

/// One timer firing: the handler, its due time (and epoch), and the next due time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firing {
    pub handler: usize,
    pub due: Due,
    pub next_ms: u64,
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
    /// Adds `handler`'s timer. `stored` is the durable next due time, if any; a missing one
    /// starts a full period from `now`, and one more than a period ahead (the clock went back)
    /// a period from `now` in a new epoch. Returns the due time to store when it is not the
    /// stored one.
    pub fn add(
        &mut self,
        handler: usize,
        period_ms: u64,
        stored: Option<Due>,
        now_ms: u64,
    ) -> Option<Due> {
        let mut slot = Slot {
            handler,
            period_ms,
            due_ms: stored.map_or(u64::MAX, |d| d.due_ms),
            epoch: stored.map_or(0, |d| d.epoch),
        };
        let changed = slot.clamp(now_ms);
        if stored.is_none() {
            slot.epoch = 0;
        }
        let due = Due {
            due_ms: slot.due_ms,
            epoch: slot.epoch,
        };
        self.slots.push(slot);
        (changed || stored.is_none()).then_some(due)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Drops `handler`'s timer, if it has one (its handler is replaced); returns its next due
    /// time (which the store may not hold yet: the firing that set it may be in flight).
    pub fn remove(&mut self, handler: usize) -> Option<Due> {
        let i = self.slots.iter().position(|s| s.handler == handler)?;
        let s = self.slots.remove(i);
        Some(Due {
            due_ms: s.due_ms,
            epoch: s.epoch,
        })
    }

    /// Drops `handler`'s timer, if it has one, as its handler leaves the list: the timers of
    /// the handlers after it move down one place, as their handlers do.
    pub fn forget(&mut self, handler: usize) {
        self.slots.retain(|s| s.handler != handler);
        for s in &mut self.slots {
            if s.handler > handler {
                s.handler -= 1;
            }
        }
    }

    /// The earliest due time, if there is any timer.
    pub fn next_due(&self) -> Option<u64> {
        self.slots.iter().map(|s| s.due_ms).min()
    }

    /// The shortest period of any timer.
    pub fn shortest_period(&self) -> Option<u64> {
        self.slots.iter().map(|s| s.period_ms).min()
    }

    /// The timers due at `now`, each rescheduled to its next due time (in the same epoch).
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Firing> {
        let mut due = Vec::new();
        for s in &mut self.slots {
            // The clock went back while running: at most a period from now, not the jump.
            s.clamp(now_ms);
            if s.due_ms <= now_ms {
                let next = next_after(s.due_ms, s.period_ms, now_ms);
                due.push(Firing {
                    handler: s.handler,
                    due: Due {
                        due_ms: s.due_ms,
                        epoch: s.epoch,
                    },
                    next_ms: next,
                });
                s.due_ms = next;
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(due_ms: u64) -> Due {
        Due { due_ms, epoch: 0 }
    }

    /// The firings at `now` as (handler, due, epoch, next).
    fn take(t: &mut Timers, now: u64) -> Vec<(usize, u64, u64, u64)> {
        t.take_due(now)
            .into_iter()
            .map(|f| (f.handler, f.due.due_ms, f.due.epoch, f.next_ms))
            .collect()
    }

    #[test]
    fn a_timer_that_fell_due_long_ago_fires_once_and_keeps_its_phase() {
        let mut t = Timers::default();
        assert_eq!(t.next_due(), None, "no timer, no wake-up");
        // Due at 1_000, period 100; the box comes back at 1_550.
        assert_eq!(t.add(0, 100, Some(due(1_000)), 1_550), None);
        assert_eq!(take(&mut t, 1_550), vec![(0, 1_000, 0, 1_600)]);
        assert_eq!(take(&mut t, 1_599), vec![]);
        assert_eq!(t.next_due(), Some(1_600));
        assert_eq!(take(&mut t, 1_600), vec![(0, 1_600, 0, 1_700)]);
    }

    #[test]
    fn a_forgotten_handler_takes_its_timer_and_the_later_ones_move_down() {
        let mut t = Timers::default();
        t.add(0, 100, Some(due(1_000)), 950);
        t.add(1, 100, Some(due(1_010)), 950);
        t.add(2, 100, Some(due(1_020)), 950);
        t.forget(1);
        assert_eq!(
            take(&mut t, 1_050),
            vec![(0, 1_000, 0, 1_100), (1, 1_020, 0, 1_120)]
        );
    }

    #[test]
    fn a_missing_or_future_due_time_starts_a_full_period_from_now() {
        let mut t = Timers::default();
        assert_eq!(
            t.add(0, 100, None, 5_000),
            Some(due(5_100)),
            "a new timer's due time is stored"
        );
        // Stored far ahead: the clock went back while the box was off; a new epoch.
        assert_eq!(
            t.add(1, 100, Some(due(9_999_999)), 5_000),
            Some(Due {
                due_ms: 5_100,
                epoch: 1
            })
        );
        assert_eq!(
            t.add(2, 100, Some(due(5_050)), 5_000),
            None,
            "already stored"
        );
        assert_eq!(take(&mut t, 5_099), vec![(2, 5_050, 0, 5_150)]);
        assert_eq!(
            take(&mut t, 5_100),
            vec![(0, 5_100, 0, 5_200), (1, 5_100, 1, 5_200)]
        );
    }

    #[test]
    fn a_clock_set_back_while_running_delays_a_timer_by_at_most_a_period() {
        let mut t = Timers::default();
        t.add(0, 100, None, 1_000_000);
        // The clock jumps back by 900 s: the timer is due a period from the new now.
        assert_eq!(take(&mut t, 100_000), vec![]);
        assert_eq!(t.next_due(), Some(100_100));
        assert_eq!(take(&mut t, 100_100), vec![(0, 100_100, 1, 100_200)]);
    }

    #[test]
    fn a_due_time_met_again_after_the_clock_went_back_is_another_firing() {
        let mut t = Timers::default();
        t.add(0, 100, None, 1_000);
        assert_eq!(take(&mut t, 1_100), vec![(0, 1_100, 0, 1_200)]);
        // Back by 150 ms: due at 1_050, then 1_100 again, which already fired in epoch 0.
        assert_eq!(take(&mut t, 950), vec![]);
        assert_eq!(take(&mut t, 1_050), vec![(0, 1_050, 1, 1_150)]);
        assert_eq!(t.add(1, 100, Some(due(1_100)), 1_000), None);
        let again = take(&mut t, 1_150);
        assert_eq!(again[0], (0, 1_150, 1, 1_250));
    }
}
