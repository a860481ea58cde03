//! The watchdog's judgement (pure: samples in, a verdict out; no clock read): whether the
//! gateway is healthy enough to ping systemd's watchdog. A sample is taken every quarter of
//! the watchdog period. Healthy: the dispatcher's thread answered within that quarter (no
//! handler wedged, no turn stalled), and the commit path made progress since the last sample or
//! had nothing waiting (a disk that hangs, not one that fails: a failed write stops the
//! process, `store::fatal`, which systemd sees on its own). Unhealthy, the ping is withheld;
//! about three samples in a row withheld make a whole period without a ping, and systemd
//! restarts the gateway (one bad sample does not).

/// The watchdog's last verdict, shared with `tidepool health` (`None`: no watchdog).
pub type LastVerdict = std::sync::Arc<std::sync::Mutex<Option<Result<(), String>>>>;

/// What the gateway looked like at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// The dispatcher's thread answered a status request within a quarter of the watchdog period.
    pub dispatcher_answered: bool,
    /// Items submitted to the committer and not yet durable.
    pub backlog_items: usize,
    /// Group commits so far (`Metrics::groups`).
    pub groups: u64,
}

/// The judgement across samples.
#[derive(Debug, Default)]
pub struct Watchdog {
    last_groups: Option<u64>,
}

impl Watchdog {
    /// `Ok` to ping, or why not.
    pub fn judge(&mut self, s: Sample) -> Result<(), String> {
        let stalled = self.last_groups == Some(s.groups) && s.backlog_items > 0;
        self.last_groups = Some(s.groups);
        if !s.dispatcher_answered {
            return Err("the dispatcher's thread did not answer within a quarter of the watchdog period (a handler or a turn is stuck)".into());
        }
        if stalled {
            return Err(format!(
                "the commit path made no progress in a quarter of the watchdog period with {} items waiting (the disk hangs?)",
                s.backlog_items
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(answered: bool, backlog_items: usize, groups: u64) -> Sample {
        Sample {
            dispatcher_answered: answered,
            backlog_items,
            groups,
        }
    }

    #[test]
    fn idle_or_moving_is_healthy_stuck_is_not() {
        let mut w = Watchdog::default();
        assert!(w.judge(sample(true, 0, 0)).is_ok(), "idle");
        assert!(w.judge(sample(true, 0, 0)).is_ok(), "still idle");
        assert!(w.judge(sample(true, 50, 3)).is_ok(), "committing");
        let why = w.judge(sample(true, 50, 3)).unwrap_err();
        assert!(why.contains("no progress"), "{why}");
        assert!(w.judge(sample(true, 10, 4)).is_ok(), "moving again");
        let why = w.judge(sample(false, 0, 4)).unwrap_err();
        assert!(why.contains("did not answer"), "{why}");
        assert!(w.judge(sample(true, 0, 4)).is_ok());
    }

    #[test]
    fn the_first_sample_with_work_waiting_is_given_the_benefit_of_the_doubt() {
        let mut w = Watchdog::default();
        assert!(w.judge(sample(true, 100, 7)).is_ok());
    }
}
