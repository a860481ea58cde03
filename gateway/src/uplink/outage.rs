//! How often the uplink says it is failing (pure; time comes in as arguments). An unreachable
//! cloud makes the uplink retry every few seconds for as long as the outage lasts; a log line
//! per attempt (about 200 bytes) went to the journal and the log file, about half a megabyte an
//! hour, and on an SD card that wear is the outage's only lasting harm. So the first failure of
//! an outage is said at once (and a failure that turns into an alarm, or back: 503 becoming
//! 401), then one summary per [`OutageLog::EVERY`] while it lasts, and its end once a batch is
//! delivered again. The counters (`send_failures`) still count every
//! attempt.

use std::time::{Duration, Instant};

/// The uplink's outage, as far as the log is concerned.
#[derive(Debug, Default)]
pub struct OutageLog {
    /// When the outage began (its first failure), failures since, and when it was last said.
    open: Option<Open>,
}

#[derive(Debug)]
struct Open {
    since: Instant,
    failures: u64,
    said: Instant,
    /// Whether the failure last said raised an alarm (401/403/404: the uplink's settings).
    alarm: bool,
}

/// What to log about a failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Say {
    /// The first failure of an outage, or one whose alarm differs from the last said: say it.
    First,
    /// The outage goes on: say it, with the failures since the last time it was said.
    Still { failures: u64, for_: Duration },
    /// Said recently: log it at debug only.
    Quiet,
}

impl OutageLog {
    /// At most one line per this while an outage lasts.
    pub const EVERY: Duration = Duration::from_secs(600);

    /// A failed attempt at `now`; `alarm`: it raises one.
    pub fn failed(&mut self, now: Instant, alarm: bool) -> Say {
        match &mut self.open {
            None => {
                self.open = Some(Open {
                    since: now,
                    failures: 1,
                    said: now,
                    alarm,
                });
                Say::First
            }
            Some(o) => {
                o.failures += 1;
                if o.alarm != alarm {
                    (o.said, o.alarm) = (now, alarm);
                    return Say::First;
                }
                if now.saturating_duration_since(o.said) < Self::EVERY {
                    return Say::Quiet;
                }
                o.said = now;
                Say::Still {
                    failures: o.failures,
                    for_: now.saturating_duration_since(o.since),
                }
            }
        }
    }

    /// A batch was delivered at `now`: the outage, if there was one, is over; returns its
    /// failures and length.
    pub fn delivered(&mut self, now: Instant) -> Option<(u64, Duration)> {
        self.open
            .take()
            .map(|o| (o.failures, now.saturating_duration_since(o.since)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_said_once_then_every_ten_minutes_and_its_end_once() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut log = OutageLog::default();
        assert_eq!(log.failed(at(0), false), Say::First);
        // Retries every 2 s for an hour: 1,800 failures, 5 lines besides the first.
        let said: Vec<Say> = (1..1800)
            .map(|i| log.failed(at(i * 2), false))
            .filter(|s| *s != Say::Quiet)
            .collect();
        assert_eq!(said.len(), 5, "{said:?}");
        assert_eq!(
            said[0],
            Say::Still {
                failures: 301,
                for_: Duration::from_secs(600)
            }
        );
        assert_eq!(
            log.delivered(at(3600)),
            Some((1800, Duration::from_secs(3600)))
        );
        // Over: the next failure opens a new outage and is said at once.
        assert_eq!(log.delivered(at(3601)), None);
        assert_eq!(log.failed(at(3602), false), Say::First);
        // The cloud answers 401 now (an alarm: the uplink's settings): said at once, and once.
        assert_eq!(log.failed(at(3604), true), Say::First);
        assert_eq!(log.failed(at(3606), true), Say::Quiet);
        assert_eq!(log.delivered(at(3608)), Some((3, Duration::from_secs(6))));
    }
}
