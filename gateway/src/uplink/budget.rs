//! The uplink's daily byte budget (pure: the wall clock comes in as `now_ms`). With
//! `uplink.budget_bytes_per_day` set, once a UTC day's bytes on the wire (retries included)
//! reach it, normal and bulk forwards are held until the next UTC day; urgent ones still go,
//! and what they send past the budget is counted. 0 = no budget.

const DAY_MS: u64 = 86_400_000;

/// What changed when the budget was asked, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Spent: normal and bulk are held from now on.
    Held,
    /// A new day: held forwards go again.
    Resumed,
}

#[derive(Debug, Default)]
pub struct Budget {
    limit: u64,
    day: u64,
    spent: u64,
    held: bool,
}

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget {
            limit,
            ..Budget::default()
        }
    }

    fn roll(&mut self, now_ms: u64) {
        let day = now_ms / DAY_MS;
        if day != self.day {
            self.day = day;
            self.spent = 0;
        }
    }

    /// Whether normal and bulk are held at `now_ms`, and whether that just changed.
    pub fn check(&mut self, now_ms: u64) -> (bool, Option<Turn>) {
        self.roll(now_ms);
        let held = self.limit > 0 && self.spent >= self.limit;
        let turn = match (self.held, held) {
            (false, true) => Some(Turn::Held),
            (true, false) => Some(Turn::Resumed),
            _ => None,
        };
        self.held = held;
        (held, turn)
    }

    /// Counts `bytes` put on the wire at `now_ms`; returns how many of them were over budget.
    pub fn spend(&mut self, now_ms: u64, bytes: u64) -> u64 {
        self.roll(now_ms);
        if self.limit == 0 {
            return 0;
        }
        let room = self.limit.saturating_sub(self.spent);
        self.spent = self.spent.saturating_add(bytes);
        bytes.saturating_sub(room)
    }

    /// Bytes spent today and the limit (0: none).
    pub fn today(&self) -> (u64, u64) {
        (self.spent, self.limit)
    }

    /// Milliseconds from `now_ms` to the next UTC day.
    pub fn until_next_day(now_ms: u64) -> u64 {
        DAY_MS - now_ms % DAY_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spent_holds_until_the_next_utc_day_and_urgent_overruns_are_counted() {
        let day0 = 20_000 * DAY_MS;
        let mut b = Budget::new(1000);
        assert_eq!(b.check(day0 + 5), (false, None));
        assert_eq!(b.spend(day0 + 10, 600), 0);
        assert_eq!(
            b.spend(day0 + 20, 600),
            200,
            "the send that crosses it is 200 over"
        );
        assert_eq!(b.check(day0 + 30), (true, Some(Turn::Held)));
        assert_eq!(b.check(day0 + 40), (true, None));
        assert_eq!(
            b.spend(day0 + 50, 100),
            100,
            "urgent past the budget: all over"
        );
        assert_eq!(Budget::until_next_day(day0 + 50), DAY_MS - 50);
        assert_eq!(b.check(day0 + DAY_MS), (false, Some(Turn::Resumed)));
        assert_eq!(b.today(), (0, 1000));
        let mut none = Budget::new(0);
        assert_eq!(none.spend(day0, 1 << 40), 0);
        assert_eq!(none.check(day0), (false, None));
    }
}
