//! The uplink's sending plan (pure: no I/O, no clock): which outbox entries go next, and what
//! a refusal means. A part is a list of outbox seqs.
//!
//! - A part answered 5xx, 408, 429, 401/403/404 or not answered goes again, the same part
//!   (the same bytes), after the backoff. For a sink that does not promise byte-identical
//!   retries (MQTT, NATS: HTTP does), after [`FAILURES_BEFORE_SPLIT`] such failures in a
//!   row it is judged like a refused part (split, singles set aside), so one entry the far side
//!   can never take (a broker that drops the connection on its topic, a message over its size
//!   limit) cannot hold every entry behind it for good. During a real outage that only moves
//!   entries to the suspects: nothing is dead-lettered without proof.
//! - A part answered 413 is split at once (halves to the front).
//! - A part answered 400/422 is split, halves to the back, so both halves of a level are
//!   tried before either is split again.
//! - A single refused entry (400/422, or 413 alone) is dead-lettered only when the cloud
//!   accepted something between its previous refusal and this one: proof that the cloud takes
//!   events and refuses this one. Until then it is set aside (a suspect) while other entries
//!   are tried. When nothing else is left to try and nothing was accepted since, the cloud is
//!   refusing everything (a proxy, a firewall, a broken deploy): an outage. The uplink backs
//!   off and alarms, then tries the suspects again; nothing is dead-lettered.

use std::collections::{HashMap, VecDeque};

/// Outbox seqs sent as one batch.
pub type Part = Vec<u64>;

/// Failures of the same part in a row before it is split like a refused one.
pub const FAILURES_BEFORE_SPLIT: u32 = 3;

/// What the uplink does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Send(Part),
    /// Only refused entries are left and nothing was accepted since they were refused: back
    /// off, alarm, then try them again.
    Outage,
    /// Nothing to send.
    Idle,
}

#[derive(Debug, Default)]
pub struct Plan {
    queue: VecDeque<Part>,
    /// Single entries refused without proof, in the order they were refused.
    suspects: Vec<Part>,
    /// An outage was declared: the suspects go again at the next send.
    retry_suspects: bool,
    /// Parts the cloud accepted so far.
    accepts: u64,
    /// For each suspect: `accepts` when it was last refused.
    strikes: HashMap<u64, u64>,
    /// Failures in a row of the part at the front (reset by any delivery).
    failures: u32,
}

impl Plan {
    /// The next step. `compose(exclude)` makes a fresh part from the outbox, leaving out
    /// `exclude` (empty when nothing else is pending).
    pub fn next(&mut self, compose: impl FnOnce(&[u64]) -> Part) -> Step {
        if let Some(p) = self.queue.pop_front() {
            return Step::Send(p);
        }
        if let Some(i) = self.suspects.iter().position(|p| self.proven(p)) {
            return Step::Send(self.suspects.remove(i));
        }
        if std::mem::take(&mut self.retry_suspects) && !self.suspects.is_empty() {
            self.queue.extend(self.suspects.drain(..));
            return self.next(compose);
        }
        let exclude: Vec<u64> = self.suspects.iter().flatten().copied().collect();
        let fresh = compose(&exclude);
        if !fresh.is_empty() {
            return Step::Send(fresh);
        }
        if self.suspects.is_empty() {
            return Step::Idle;
        }
        self.retry_suspects = true;
        Step::Outage
    }

    /// Whether the cloud accepted something since this single part was last refused.
    fn proven(&self, part: &Part) -> bool {
        part.len() == 1
            && self
                .strikes
                .get(&part[0])
                .is_some_and(|at| self.accepts > *at)
    }

    /// The cloud accepted `part`.
    pub fn delivered(&mut self, part: &[u64]) {
        self.accepts += 1;
        self.failures = 0;
        for s in part {
            self.strikes.remove(s);
        }
    }

    /// The part failed in a way worth retrying (after the backoff). With `may_split` (a sink
    /// that does not promise byte-identical retries), after [`FAILURES_BEFORE_SPLIT`] in a row
    /// it is judged like a refused part; else it goes again as is. Returns a part to
    /// dead-letter, if any (only with proof, as for a refusal).
    pub fn failed(&mut self, part: Part, may_split: bool) -> Option<Part> {
        self.failures += 1;
        if may_split && self.failures >= FAILURES_BEFORE_SPLIT {
            self.failures = 0;
            return self.refused(part);
        }
        self.queue.push_front(part);
        None
    }

    /// Parts to send before anything else, in this order (at start).
    pub fn resume(&mut self, parts: impl IntoIterator<Item = Part>) {
        self.queue.extend(parts);
    }

    /// Puts a part back untried (the uplink is stopping).
    pub fn put_back(&mut self, part: Part) {
        self.queue.push_front(part);
    }

    /// 413: halves at once; a single entry is judged as refused. Returns a part to
    /// dead-letter, if any.
    pub fn too_large(&mut self, mut part: Part) -> Option<Part> {
        if part.len() > 1 {
            let b = part.split_off(part.len() / 2);
            self.queue.push_front(b);
            self.queue.push_front(part);
            return None;
        }
        self.refused_one(part)
    }

    /// 400/422: halves to the back; a single entry is dead-lettered (returned) when proven,
    /// else set aside.
    pub fn refused(&mut self, mut part: Part) -> Option<Part> {
        if part.len() > 1 {
            let b = part.split_off(part.len() / 2);
            self.queue.push_back(part);
            self.queue.push_back(b);
            return None;
        }
        self.refused_one(part)
    }

    fn refused_one(&mut self, part: Part) -> Option<Part> {
        if self.proven(&part) {
            self.strikes.remove(&part[0]);
            return Some(part);
        }
        self.strikes.insert(part[0], self.accepts);
        self.suspects.push(part);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Answer {
        Ok,
        Refused,
        TooLarge,
        Failed,
    }

    /// Runs the plan against a cloud (`answer(part, step)`) over an outbox holding `pending`,
    /// in batches of up to 4, for at most `steps` steps; with `trickle`, a new event (seq 1000,
    /// 1001, ...) arrives every 10 steps. Returns what was delivered, what was dead-lettered,
    /// and how many outages were declared.
    fn run(
        pending: &[u64],
        steps: usize,
        trickle: bool,
        answer: impl Fn(&Part, usize) -> Answer,
    ) -> (BTreeSet<u64>, BTreeSet<u64>, usize) {
        let mut outbox: BTreeSet<u64> = pending.iter().copied().collect();
        let mut plan = Plan::default();
        let (mut delivered, mut dead, mut outages) = (BTreeSet::new(), BTreeSet::new(), 0);
        for n in 0..steps {
            if trickle && n % 10 == 9 {
                outbox.insert(1000 + n as u64 / 10);
            }
            let ob = outbox.clone();
            let step = plan.next(|ex| {
                ob.iter()
                    .filter(|s| !ex.contains(s))
                    .take(4)
                    .copied()
                    .collect()
            });
            let part = match step {
                Step::Idle => break,
                Step::Outage => {
                    outages += 1;
                    continue;
                }
                Step::Send(p) => p,
            };
            let gone = match answer(&part, n) {
                Answer::Ok => {
                    plan.delivered(&part);
                    delivered.extend(part.iter().copied());
                    Some(part)
                }
                Answer::Refused => plan
                    .refused(part)
                    .inspect(|p| dead.extend(p.iter().copied())),
                Answer::TooLarge => plan
                    .too_large(part)
                    .inspect(|p| dead.extend(p.iter().copied())),
                Answer::Failed => plan
                    .failed(part, true)
                    .inspect(|p| dead.extend(p.iter().copied())),
            };
            if let Some(p) = gone {
                for s in p {
                    outbox.remove(&s);
                }
            }
        }
        (delivered, dead, outages)
    }

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_cloud_refusing_everything_dead_letters_nothing_and_is_an_outage() {
        for n in 1..=9u64 {
            let events: Vec<u64> = (1..=n).collect();
            for answer in [Answer::Refused, Answer::TooLarge] {
                let (delivered, dead, outages) = run(&events, 200, true, |_, _| answer);
                assert!(delivered.is_empty() && dead.is_empty(), "{n} {answer:?}");
                assert!(outages >= 2, "{n} {answer:?}: outages {outages}");
            }
        }
    }

    #[test]
    fn offending_events_are_dead_lettered_once_the_cloud_accepts_another_in_between() {
        let bad = |b: &'static [u64]| {
            move |p: &Part, _| {
                if p.iter().any(|s| b.contains(s)) {
                    Answer::Refused
                } else {
                    Answer::Ok
                }
            }
        };
        for (events, bads) in [
            (&[1, 2, 3, 4][..], &[4][..]),
            (&[1, 2, 3, 4], &[1]),
            (&[1, 2], &[1]),
            // One offender in each half: both are found (no outage, no stall).
            (&[1, 2, 3, 4], &[1, 4]),
            (&[1, 2, 3, 4], &[1, 3]),
            (&[1, 2, 3, 4, 5, 6, 7, 8, 9], &[2, 5, 9]),
        ] {
            let (delivered, dead, _) = run(events, 500, true, bad(bads));
            assert_eq!(dead, set(bads), "{events:?} with {bads:?}");
            let good: Vec<u64> = events
                .iter()
                .filter(|e| !bads.contains(e))
                .copied()
                .collect();
            assert!(
                delivered.is_superset(&set(&good)),
                "{events:?} with {bads:?}"
            );
        }
    }

    #[test]
    fn an_entry_that_always_breaks_the_connection_does_not_hold_the_others_for_good() {
        // The far side drops the connection whenever entry 3 is in a part: without the split
        // after repeated failures, 1..=8 and everything after them would wait forever.
        let answer = |p: &Part, _| {
            if p.contains(&3) {
                Answer::Failed
            } else {
                Answer::Ok
            }
        };
        let events: Vec<u64> = (1..=8).collect();
        let (delivered, dead, _) = run(&events, 500, true, answer);
        assert_eq!(dead, set(&[3]));
        assert!(
            delivered.is_superset(&set(&[1, 2, 4, 5, 6, 7, 8])),
            "{delivered:?}"
        );
        // An outage (everything fails) dead-letters nothing.
        let (delivered, dead, _) = run(&events, 500, true, |_, _| Answer::Failed);
        assert!(delivered.is_empty() && dead.is_empty());
    }

    #[test]
    fn a_bad_event_with_no_other_traffic_waits_for_proof_instead_of_being_dead_lettered() {
        // The cloud accepted 1 and 2 before refusing 3, but nothing after: 3 could be a bad
        // event or the start of an outage. It is kept and retried with backoff.
        let answer = |p: &Part, _| {
            if p.contains(&3) {
                Answer::Refused
            } else {
                Answer::Ok
            }
        };
        let (delivered, dead, outages) = run(&[1, 2, 3], 100, false, answer);
        assert_eq!((delivered, dead.len()), (set(&[1, 2]), 0));
        assert!(outages > 0);
        // One more event accepted in between is the proof.
        let (_, dead, _) = run(&[1, 2, 3], 100, true, answer);
        assert_eq!(dead, set(&[3]));
    }

    #[test]
    fn a_cloud_that_starts_refusing_mid_bisection_dead_letters_no_good_event() {
        // Requests 0..: the first batch is refused (one bad event, 8), its first half accepted,
        // then a proxy refuses everything for 40 requests, then the cloud is back.
        let answer = |p: &Part, n: usize| match n {
            0 => Answer::Refused,
            1 => Answer::Ok,
            2..=41 => Answer::Refused,
            _ if p.contains(&8) => Answer::Refused,
            _ => Answer::Ok,
        };
        let events: Vec<u64> = (1..=8).collect();
        let (delivered, dead, outages) = run(&events, 500, true, answer);
        assert_eq!(dead, set(&[8]));
        assert!(delivered.is_superset(&set(&[1, 2, 3, 4, 5, 6, 7])));
        assert!(outages > 0);
    }
}
