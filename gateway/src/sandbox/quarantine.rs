//! Quarantine (pure: no I/O, no clock read; wall time is passed in): which devices a handler
//! no longer runs for. Failures in a row are counted per device, so a device that keeps
//! sending events that trap a handler takes the handler away from itself only. Failures in a
//! row are also counted over all devices: when a run of them, with no success anywhere in
//! between, spans several devices, the handler is broken, not its input, and it is quarantined
//! for every device (as quickly as one device's run would take it away from that device). A
//! timer's firings count as the device `""`.
//!
//! A quarantine ends with a trial: once its time is up, the next event is let through; a
//! success releases the handler, a failure holds it again for twice as long (up to
//! [`MAX_HOLD_MS`]). The held set survives a restart ([`Quarantine::encode`], kept in the
//! store by the dispatcher); the counts of failures in a row do not.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::FailureKind;

/// The longest a quarantine holds before its next trial.
pub const MAX_HOLD_MS: u64 = 3_600_000;

/// What one invocation's verdict changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Quarantined for this device (the `n`-th device held so far), until `until_ms`.
    Device {
        device: String,
        n: usize,
        until_ms: u64,
    },
    /// Quarantined for every device, until `until_ms`.
    All { until_ms: u64 },
    /// The trial failed: held again, for longer.
    Extended { device: String, until_ms: u64 },
    /// The trial succeeded: it runs again (for `device`, or for all when `None`).
    Released { device: Option<String> },
}

/// One hold: until when, and how long the next one lasts if the trial fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub until_ms: u64,
    pub hold_ms: u64,
}

/// The most devices held one by one; past it the handler is held for every device (an input
/// that traps it on so many devices is the handler's problem), which also bounds what is
/// stored.
pub const MAX_HELD_DEVICES: usize = 256;

/// Devices whose failures in a row are counted at once; past it the counts start over
/// (bounded memory against many failing identities).
const MAX_COUNTED_DEVICES: usize = 4096;

/// One handler's quarantine state.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The handler's version the holds are for (a new version starts without them).
    #[serde(default)]
    pub version: u64,
    /// Failures in a row, per device that failed it last (a success removes the device).
    #[serde(skip)]
    in_row: HashMap<Box<str>, u32>,
    /// Failures in a row over the devices that are not held (any success ends the run), and
    /// each one's part of it.
    #[serde(skip)]
    run: Vec<(Box<str>, u32)>,
    devices: BTreeMap<String, Hold>,
    all: Option<Hold>,
}

/// What a tree's invocations of one handler come to: a failure if any failed (a trap or a
/// limit), else a rejection if any rejected, else a success.
pub fn fold(verdicts: impl IntoIterator<Item = Option<FailureKind>>) -> Option<FailureKind> {
    let mut worst = None;
    for v in verdicts {
        match v {
            Some(FailureKind::Timeout | FailureKind::Broken) => return v,
            Some(FailureKind::Rejected) => worst = v,
            None => {}
        }
    }
    worst
}

impl Quarantine {
    /// Whether the handler must not run for `device` at `now_ms`: its own hold or the hold for
    /// all, whichever is not up yet (a hold whose time is up lets the event through, and its
    /// verdict ends or extends that hold).
    pub fn blocks(&self, device: &str, now_ms: u64) -> bool {
        let up = |h: Option<&Hold>| h.is_some_and(|h| now_ms < h.until_ms);
        up(self.devices.get(device)) || up(self.all.as_ref())
    }

    /// Quarantined for every device.
    pub fn all(&self) -> bool {
        self.all.is_some()
    }

    /// The devices it is quarantined for one by one.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(String::as_str)
    }

    /// The most failures in a row of any device.
    pub fn worst_in_row(&self) -> u32 {
        self.in_row.values().copied().max().unwrap_or(0)
    }

    /// Failures in a row of `device`.
    pub fn in_row(&self, device: &str) -> u32 {
        self.in_row.get(device).copied().unwrap_or(0)
    }

    /// After a restart: no hold lasts longer from `now_ms` than it was set for (a clock that
    /// was wrong when it was set, or is now, cannot hold a handler for years).
    pub fn clamp(&mut self, now_ms: u64) {
        for h in self.devices.values_mut().chain(self.all.as_mut()) {
            h.until_ms = h.until_ms.min(now_ms.saturating_add(h.hold_ms));
        }
    }

    /// Counts one event tree's verdict ([`fold`]) for `device` at `now_ms`.
    ///
    /// A held device whose hold is up, or any device when the hold for all is up, is on
    /// trial: a success releases that hold, a failure holds it again for twice as long (up
    /// to [`MAX_HOLD_MS`]), a rejection decides nothing. Otherwise a success clears the
    /// device's count and the run, a trap or a limit hit adds one to both, a rejection leaves
    /// them. After `after` failures in a row (0: never) the handler is held for `hold_ms`: for
    /// every device when the run spans `devices_for_all` devices (0: never), else for this
    /// device once its own count is there (and its failures leave the run).
    pub fn observe(
        &mut self,
        device: &str,
        failed: Option<FailureKind>,
        now_ms: u64,
        (after, devices_for_all, hold_ms): (u32, usize, u64),
    ) -> Option<Change> {
        let own = self.devices.contains_key(device);
        if own || self.all.is_some() {
            // Only a trial runs a held handler: of the device's own hold first.
            return match failed {
                Some(FailureKind::Rejected) => None,
                None => {
                    self.in_row.remove(device);
                    self.run.clear();
                    Some(if own {
                        self.devices.remove(device);
                        Change::Released {
                            device: Some(device.into()),
                        }
                    } else {
                        self.all = None;
                        Change::Released { device: None }
                    })
                }
                Some(_) => {
                    let h = if own {
                        self.devices.get_mut(device)?
                    } else {
                        self.all.as_mut()?
                    };
                    h.hold_ms = h
                        .hold_ms
                        .saturating_mul(2)
                        .clamp(1, MAX_HOLD_MS.max(hold_ms));
                    h.until_ms = now_ms.saturating_add(h.hold_ms);
                    Some(Change::Extended {
                        device: if own {
                            device.into()
                        } else {
                            "(every device)".into()
                        },
                        until_ms: h.until_ms,
                    })
                }
            };
        }
        match failed {
            None => {
                self.in_row.remove(device);
                self.run.clear();
                return None;
            }
            Some(FailureKind::Rejected) => return None,
            Some(FailureKind::Timeout | FailureKind::Broken) => {}
        }
        if self.in_row.len() >= MAX_COUNTED_DEVICES && !self.in_row.contains_key(device) {
            self.in_row.clear();
        }
        let n = self.in_row.entry(device.into()).or_insert(0);
        *n = n.saturating_add(1);
        let n = *n;
        match self.run.iter_mut().find(|(d, _)| **d == *device) {
            Some((_, k)) => *k = k.saturating_add(1),
            None => self.run.push((device.into(), 1)),
        }
        if after == 0 {
            return None;
        }
        let hold = Hold {
            until_ms: now_ms.saturating_add(hold_ms),
            hold_ms,
        };
        let run: u32 = self.run.iter().map(|(_, k)| *k).sum();
        let for_all = devices_for_all > 0 && run >= after && self.run.len() >= devices_for_all;
        if for_all || (n >= after && self.devices.len() >= MAX_HELD_DEVICES) {
            self.all = Some(hold);
            self.run.clear();
            return Some(Change::All {
                until_ms: hold.until_ms,
            });
        }
        if n < after {
            return None;
        }
        self.devices.insert(device.into(), hold);
        // Held now: its failures do not also count toward holding it for the others.
        self.run.retain(|(d, _)| **d != *device);
        Some(Change::Device {
            device: device.into(),
            n: self.devices.len(),
            until_ms: hold.until_ms,
        })
    }

    /// The held set, for the store (CBOR).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("CBOR encoding into a Vec");
        out
    }

    /// The held set written by [`Quarantine::encode`]; `None` if it does not decode.
    pub fn decode(bytes: &[u8]) -> Option<Quarantine> {
        ciborium::from_reader(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRAP: Option<FailureKind> = Some(FailureKind::Broken);
    /// After 3 failures in a row, for all at 3 devices, held 60 s.
    const S: (u32, usize, u64) = (3, 3, 60_000);
    /// The defaults: 50 in a row, 3 devices, 60 s.
    const S50: (u32, usize, u64) = (50, 3, 60_000);

    #[test]
    fn one_device_that_keeps_failing_a_handler_loses_it_alone() {
        let mut q = Quarantine::default();
        assert_eq!(q.observe("d1", TRAP, 0, S), None);
        assert_eq!(q.observe("d1", TRAP, 0, S), None);
        assert_eq!(
            q.observe("d1", TRAP, 0, S),
            Some(Change::Device {
                device: "d1".into(),
                n: 1,
                until_ms: 60_000
            })
        );
        assert!(q.blocks("d1", 0));
        assert!(!q.blocks("d2", 0), "the other devices keep the handler");
        assert!(!q.all());
        assert_eq!(q.devices().collect::<Vec<_>>(), ["d1"]);
    }

    #[test]
    fn failures_from_several_devices_quarantine_it_for_all() {
        let mut q = Quarantine::default();
        let s = (2, 3, 60_000);
        for d in ["d1", "d2"] {
            q.observe(d, TRAP, 0, s);
            let c = q.observe(d, TRAP, 0, s);
            assert!(matches!(c, Some(Change::Device { .. })), "{c:?}");
        }
        // d1 and d2 are held: their failures left the run, so a third device alone is not
        // "several devices".
        assert_eq!(q.observe("", TRAP, 0, s), None);
        assert!(!q.blocks("d9", 0));
        // A run that spans three devices not held is (the timer's, d3's, d4's).
        assert_eq!(q.observe("d3", TRAP, 0, s), None);
        assert_eq!(
            q.observe("d4", TRAP, 0, s),
            Some(Change::All { until_ms: 60_000 })
        );
        assert!(q.blocks("d9", 0));
    }

    /// A broken handler fed by many devices in turn goes for all after `after` failures, not
    /// after `after` per device (1,000 devices would mean 50,000 failures).
    #[test]
    fn a_broken_handler_goes_as_quickly_with_many_devices() {
        let mut q = Quarantine::default();
        for i in 0..49 {
            assert_eq!(
                q.observe(&format!("d{i}"), TRAP, 0, S50),
                None,
                "failure {i}"
            );
        }
        let c = q.observe("d49", TRAP, 0, S50);
        assert!(matches!(c, Some(Change::All { .. })), "{c:?}");
    }

    /// Bad devices among good ones: a good device's success ends the run, so only the bad
    /// devices lose the handler.
    #[test]
    fn bad_devices_among_good_ones_lose_it_alone() {
        let mut q = Quarantine::default();
        let s = (2, 2, 60_000);
        for bad in ["b1", "b2", "b3"] {
            q.observe(bad, TRAP, 0, s);
            q.observe("good", None, 0, s);
            let c = q.observe(bad, TRAP, 0, s);
            assert!(matches!(c, Some(Change::Device { .. })), "{c:?}");
            q.observe("good", None, 0, s);
        }
        assert!(!q.all() && !q.blocks("good", 0) && q.blocks("b3", 0));
    }

    #[test]
    fn a_success_or_a_rejection_in_between_and_zero_settings() {
        let mut q = Quarantine::default();
        let s = (2, 3, 60_000);
        q.observe("d1", TRAP, 0, s);
        q.observe("d1", None, 0, s);
        assert_eq!(q.in_row("d1"), 0);
        q.observe("d1", TRAP, 0, s);
        q.observe("d1", Some(FailureKind::Rejected), 0, s);
        assert_eq!(q.in_row("d1"), 1, "a rejection leaves the count");
        // Another device's failures do not count for this one.
        q.observe("d2", TRAP, 0, s);
        assert!(!q.blocks("d1", 0) && !q.blocks("d2", 0));
        assert_eq!(q.worst_in_row(), 1);
        // 0: never quarantined; 0 devices: never for all.
        let mut never = Quarantine::default();
        for _ in 0..10 {
            assert_eq!(never.observe("d1", TRAP, 0, (0, 3, 1)), None);
        }
        let mut per_device = Quarantine::default();
        for d in ["a", "b", "c", "d"] {
            per_device.observe(d, TRAP, 0, (1, 0, 1));
        }
        assert!(!per_device.all() && per_device.blocks("c", 0));
    }

    /// Trial: once the hold is up one event goes through; a failure holds it twice as
    /// long (up to an hour), a success releases it.
    #[test]
    fn a_quarantine_ends_with_a_trial() {
        let mut q = Quarantine::default();
        let s = (1, 3, 60_000);
        q.observe("d1", TRAP, 0, s);
        assert!(q.blocks("d1", 59_999));
        assert!(!q.blocks("d1", 60_000), "the trial lets one through");
        assert_eq!(
            q.observe("d1", TRAP, 60_000, s),
            Some(Change::Extended {
                device: "d1".into(),
                until_ms: 180_000
            })
        );
        assert!(q.blocks("d1", 179_999));
        let mut t = 180_000;
        for _ in 0..10 {
            q.observe("d1", TRAP, t, s);
            t = q.devices.get("d1").unwrap().until_ms;
        }
        assert_eq!(q.devices.get("d1").unwrap().hold_ms, MAX_HOLD_MS);
        assert_eq!(
            q.observe("d1", None, t, s),
            Some(Change::Released {
                device: Some("d1".into())
            })
        );
        assert!(!q.blocks("d1", t) && q.devices().next().is_none());
    }

    /// The review's attack: one device traps it 50 times (held), then two stray failures from
    /// elsewhere must not take it from everyone; and a trial for all is judged by devices
    /// not held themselves, a rejection decides nothing, a release keeps the devices' holds.
    #[test]
    fn a_held_device_cannot_help_take_the_handler_from_everyone() {
        let mut q = Quarantine::default();
        for _ in 0..50 {
            q.observe("bad", TRAP, 0, S50);
        }
        assert!(q.blocks("bad", 0) && !q.all());
        assert_eq!(q.observe("x", TRAP, 0, S50), None);
        assert_eq!(q.observe("", TRAP, 0, S50), None);
        assert!(!q.all(), "two stray failures are not a broken handler");

        let mut q = Quarantine::default();
        let s = (2, 2, 1_000);
        q.observe("bad", TRAP, 0, (1, 2, 100_000));
        q.observe("a", TRAP, 0, s);
        assert!(matches!(
            q.observe("b", TRAP, 0, s),
            Some(Change::All { .. })
        ));
        // The hold for all is up at 1,000; `bad` is still held on its own.
        assert!(q.blocks("bad", 1_000) && !q.blocks("a", 1_000));
        assert_eq!(q.observe("a", Some(FailureKind::Rejected), 1_000, s), None);
        assert!(!q.blocks("a", 1_000), "a rejection leaves the trial open");
        assert_eq!(
            q.observe("a", None, 1_000, s),
            Some(Change::Released { device: None })
        );
        assert!(q.blocks("bad", 1_000), "its own hold stays");
    }

    #[test]
    fn the_held_set_is_bounded_and_a_wrong_clock_cannot_hold_for_years() {
        let mut q = Quarantine::default();
        for i in 0..MAX_HELD_DEVICES {
            let c = q.observe(&format!("d{i}"), TRAP, 0, (1, 0, 60_000));
            assert!(matches!(c, Some(Change::Device { .. })), "{c:?}");
        }
        let c = q.observe("one-more", TRAP, 0, (1, 0, 60_000));
        assert!(matches!(c, Some(Change::All { .. })), "{c:?}");
        // Set with a clock 50 years ahead, read back at the real time: an hour at most.
        let mut q = Quarantine::default();
        q.observe("d1", TRAP, 1_600_000_000_000_000, (1, 3, 60_000));
        let mut back = Quarantine::decode(&q.encode()).unwrap();
        back.clamp(1_000);
        assert!(back.blocks("d1", 1_000) && !back.blocks("d1", 61_000));
    }

    #[test]
    fn a_tree_comes_to_one_verdict() {
        let r = Some(FailureKind::Rejected);
        assert_eq!(fold([None, TRAP, None]), TRAP);
        assert_eq!(fold([None, r]), r);
        assert_eq!(fold([None, None]), None);
        assert_eq!(fold([]), None);
    }

    #[test]
    fn the_held_set_survives_encoding_and_the_counts_do_not() {
        let mut q = Quarantine::default();
        q.observe("d1", TRAP, 5, (1, 3, 60_000));
        q.observe("d2", TRAP, 5, (2, 3, 60_000));
        let back = Quarantine::decode(&q.encode()).unwrap();
        assert!(back.blocks("d1", 6) && !back.blocks("d2", 6));
        assert_eq!(back.in_row("d2"), 0);
        assert_eq!(Quarantine::decode(b"nonsense"), None);
    }
}
