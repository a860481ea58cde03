//! How often the uplink says it is failing (pure; time comes in as arguments). An unreachable
//! cloud makes the uplink retry for as long as the outage lasts (backing off from
//! `outbox.retry_base_ms` to `retry_max_ms`, jittered; a refused event set aside retries
//! sooner); a log line per attempt (about 200 bytes) went to the journal and the log file
//! (`scripts/footprint.sh` measured 491,520 bytes an hour of dirtied pages after a load whose
//! forwards could not go), and on an SD card that wear is the outage's only lasting harm. So the first failure of
//! an outage is said at once (and a failure that turns into an alarm, or back: 503 becoming
//! 401, unless that kind was said within [`OutageLog::EVERY`]: a flapping failure is not said
//! at every retry either), then one summary per [`OutageLog::EVERY`] while it lasts, and its
//! end once the cloud answers again. The counters (`send_failures`) still count every attempt.

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
    /// When a failure without an alarm, and one with (401/403/404: the uplink's settings), was
    /// last said.
    said: [Option<Instant>; 2],
    /// Whether the last failure raised an alarm.
    alarm: bool,
}

/// What to log about a failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Say {
    /// The first failure of an outage, or one whose alarm differs from the last said: say it.
    First,
    /// The outage goes on: say it, with its failures so far and how long it has lasted.
    Still { failures: u64, for_: Duration },
    /// Said recently: log it at debug only.
    Quiet,
}

impl OutageLog {
    /// At most one line per this while an outage lasts.
    pub const EVERY: Duration = Duration::from_secs(600);

    /// A failed attempt at `now`; `alarm`: it raises one.
    pub fn failed(&mut self, now: Instant, alarm: bool) -> Say {
        let kind = usize::from(alarm);
        let Some(o) = &mut self.open else {
            let mut said = [None; 2];
            said[kind] = Some(now);
            self.open = Some(Open {
                since: now,
                failures: 1,
                said,
                alarm,
            });
            return Say::First;
        };
        o.failures += 1;
        let recent =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < Self::EVERY);
        let changed = o.alarm != alarm;
        o.alarm = alarm;
        if changed && !recent(o.said[kind]) {
            o.said[kind] = Some(now);
            return Say::First;
        }
        if recent(o.said[0]) || recent(o.said[1]) {
            return Say::Quiet;
        }
        o.said[kind] = Some(now);
        Say::Still {
            failures: o.failures,
            for_: now.saturating_duration_since(o.since),
        }
    }

    /// The cloud answered at `now` (a delivery, or a refusal of an event: it is reachable and
    /// reading): the outage, if there was one, is over; returns its failures and length.
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
        // Flapping between the two kinds at every retry: both were said within 10 min, so
        // nothing is said again; each kind at most once per 10 min after that.
        let flaps: Vec<Say> = (0..100u64)
            .map(|i| log.failed(at(3608 + i * 2), i % 2 == 0))
            .filter(|s| *s != Say::Quiet)
            .collect();
        assert_eq!(flaps, [], "{flaps:?}");
        assert_eq!(
            log.delivered(at(3808)),
            Some((103, Duration::from_secs(206)))
        );
    }
}
