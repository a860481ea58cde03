//! Quarantine (pure: no I/O, no clock read; wall time is passed in): which devices a handler
//! no longer runs for. Failures in a row are counted per device, so a device that keeps
//! sending events that trap a handler takes the handler away from itself only. Failures in a
//! row are also counted over all devices: when a run of them, with no success anywhere in
//! between, spans several devices, the handler is broken, not its input, and it is quarantined
//! for every device (as quickly as one device's run would take it away from that device). A
//! timer's firings count as the device `""`.
//!
//! A quarantine ends on probation: once its time is up, the next event is let through; a
//! success releases the handler, a failure holds it again for twice as long (up to
//! [`MAX_HOLD_MS`]). The held set survives a restart ([`Quarantine::encode`], kept in the
//! store by the dispatcher); the counts of failures in a row do not.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::FailureKind;

/// The longest a quarantine holds before its next probation.
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
    /// The probation failed: held again, for longer.
    Extended { device: String, until_ms: u64 },
    /// The probation succeeded: it runs again (for `device`, or for all when `None`).
    Released { device: Option<String> },
}

/// One hold: until when, and how long the next one lasts if the probation fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub until_ms: u64,
    pub hold_ms: u64,
}

/// One handler's quarantine state.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// Failures in a row, per device that failed it last (a success removes the device).
    #[serde(skip)]
    in_row: HashMap<Box<str>, u32>,
    /// Failures in a row over all devices (any success ends the run), and the devices in the
    /// run (as many as it takes to quarantine for all).
    #[serde(skip)]
    run: u32,
    #[serde(skip)]
    run_devices: Vec<Box<str>>,
    devices: BTreeMap<String, Hold>,
    all: Option<Hold>,
}

impl Quarantine {
    /// The hold that applies to `device`, if any (for all first).
    fn hold(&self, device: &str) -> Option<&Hold> {
        self.all.as_ref().or_else(|| self.devices.get(device))
    }

    /// Whether the handler must not run for `device` at `now_ms` (a hold whose time is up
    /// lets the event through: its verdict ends or extends the hold).
    pub fn blocks(&self, device: &str, now_ms: u64) -> bool {
        self.hold(device).is_some_and(|h| now_ms < h.until_ms)
    }

    /// Quarantined for every device.
    pub fn all(&self) -> bool {
        self.all.is_some()
    }

    /// The devices it is quarantined for (when not for all).
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

    /// Counts an invocation for `device` at `now_ms`. Held and on probation: a success
    /// releases, a failure (a rejection too) holds it again for twice as long. Otherwise a
    /// success clears the device's count and the run over all devices, a trap or a limit hit
    /// adds one to both, a rejection (the handler returned non-zero: bad input) leaves them.
    /// After `after` failures in a row (0: never) the handler is held for `hold_ms`: for every
    /// device when the run spans `devices_for_all` devices (0: never), else for this device
    /// once its own count is there.
    pub fn record(
        &mut self,
        device: &str,
        failed: Option<FailureKind>,
        now_ms: u64,
        (after, devices_for_all, hold_ms): (u32, usize, u64),
    ) -> Option<Change> {
        if self.hold(device).is_some() {
            // Only a probation runs a held handler.
            let for_all = self.all.is_some();
            if failed.is_none() {
                self.in_row.remove(device);
                self.end_run();
                return Some(if for_all {
                    self.all = None;
                    self.devices.clear();
                    Change::Released { device: None }
                } else {
                    self.devices.remove(device);
                    Change::Released {
                        device: Some(device.into()),
                    }
                });
            }
            let h = match (for_all, self.all.as_mut()) {
                (true, Some(h)) => h,
                _ => self.devices.get_mut(device)?,
            };
            if now_ms < h.until_ms {
                // Another invocation of the same probation's tree: judged already.
                return None;
            }
            h.hold_ms = h
                .hold_ms
                .saturating_mul(2)
                .clamp(1, MAX_HOLD_MS.max(hold_ms));
            h.until_ms = now_ms.saturating_add(h.hold_ms);
            return Some(Change::Extended {
                device: if for_all {
                    String::new()
                } else {
                    device.into()
                },
                until_ms: h.until_ms,
            });
        }
        match failed {
            None => {
                self.in_row.remove(device);
                self.end_run();
                return None;
            }
            Some(FailureKind::Rejected) => return None,
            Some(FailureKind::Timeout | FailureKind::Broken) => {}
        }
        let n = self.in_row.entry(device.into()).or_insert(0);
        *n = n.saturating_add(1);
        let n = *n;
        self.run = self.run.saturating_add(1);
        if self.run_devices.len() < devices_for_all
            && !self.run_devices.iter().any(|d| **d == *device)
        {
            self.run_devices.push(device.into());
        }
        if after == 0 {
            return None;
        }
        let hold = Hold {
            until_ms: now_ms.saturating_add(hold_ms),
            hold_ms,
        };
        if devices_for_all > 0 && self.run >= after && self.run_devices.len() >= devices_for_all {
            self.all = Some(hold);
            self.end_run();
            return Some(Change::All {
                until_ms: hold.until_ms,
            });
        }
        if n < after {
            return None;
        }
        self.devices.insert(device.into(), hold);
        Some(Change::Device {
            device: device.into(),
            n: self.devices.len(),
            until_ms: hold.until_ms,
        })
    }

    fn end_run(&mut self) {
        self.run = 0;
        self.run_devices.clear();
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
        assert_eq!(q.record("d1", TRAP, 0, S), None);
        assert_eq!(q.record("d1", TRAP, 0, S), None);
        assert_eq!(
            q.record("d1", TRAP, 0, S),
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
            q.record(d, TRAP, 0, s);
            let c = q.record(d, TRAP, 0, s);
            assert!(matches!(c, Some(Change::Device { .. })), "{c:?}");
        }
        // The run of 5 failures now spans a third device.
        assert_eq!(
            q.record("", TRAP, 0, s),
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
                q.record(&format!("d{i}"), TRAP, 0, S50),
                None,
                "failure {i}"
            );
        }
        let c = q.record("d49", TRAP, 0, S50);
        assert!(matches!(c, Some(Change::All { .. })), "{c:?}");
    }

    /// Bad devices among good ones: a good device's success ends the run, so only the bad
    /// devices lose the handler.
    #[test]
    fn bad_devices_among_good_ones_lose_it_alone() {
        let mut q = Quarantine::default();
        let s = (2, 2, 60_000);
        for bad in ["b1", "b2", "b3"] {
            q.record(bad, TRAP, 0, s);
            q.record("good", None, 0, s);
            let c = q.record(bad, TRAP, 0, s);
            assert!(matches!(c, Some(Change::Device { .. })), "{c:?}");
            q.record("good", None, 0, s);
        }
        assert!(!q.all() && !q.blocks("good", 0) && q.blocks("b3", 0));
    }

    #[test]
    fn a_success_or_a_rejection_in_between_and_zero_settings() {
        let mut q = Quarantine::default();
        let s = (2, 3, 60_000);
        q.record("d1", TRAP, 0, s);
        q.record("d1", None, 0, s);
        assert_eq!(q.in_row("d1"), 0);
        q.record("d1", TRAP, 0, s);
        q.record("d1", Some(FailureKind::Rejected), 0, s);
        assert_eq!(q.in_row("d1"), 1, "a rejection leaves the count");
        // Another device's failures do not count for this one.
        q.record("d2", TRAP, 0, s);
        assert!(!q.blocks("d1", 0) && !q.blocks("d2", 0));
        assert_eq!(q.worst_in_row(), 1);
        // 0: never quarantined; 0 devices: never for all.
        let mut never = Quarantine::default();
        for _ in 0..10 {
            assert_eq!(never.record("d1", TRAP, 0, (0, 3, 1)), None);
        }
        let mut per_device = Quarantine::default();
        for d in ["a", "b", "c", "d"] {
            per_device.record(d, TRAP, 0, (1, 0, 1));
        }
        assert!(!per_device.all() && per_device.blocks("c", 0));
    }

    /// Probation: once the hold is up one event goes through; a failure holds it twice as
    /// long (up to an hour), a success releases it.
    #[test]
    fn a_quarantine_ends_on_probation() {
        let mut q = Quarantine::default();
        let s = (1, 3, 60_000);
        q.record("d1", TRAP, 0, s);
        assert!(q.blocks("d1", 59_999));
        assert!(!q.blocks("d1", 60_000), "the probation lets one through");
        assert_eq!(
            q.record("d1", TRAP, 60_000, s),
            Some(Change::Extended {
                device: "d1".into(),
                until_ms: 180_000
            })
        );
        assert!(q.blocks("d1", 179_999));
        let mut t = 180_000;
        for _ in 0..10 {
            q.record("d1", TRAP, t, s);
            t = q.devices.get("d1").unwrap().until_ms;
        }
        assert_eq!(q.devices.get("d1").unwrap().hold_ms, MAX_HOLD_MS);
        assert_eq!(
            q.record("d1", None, t, s),
            Some(Change::Released {
                device: Some("d1".into())
            })
        );
        assert!(!q.blocks("d1", t) && q.devices().next().is_none());
    }

    #[test]
    fn the_held_set_survives_encoding_and_the_counts_do_not() {
        let mut q = Quarantine::default();
        q.record("d1", TRAP, 5, (1, 3, 60_000));
        q.record("d2", TRAP, 5, (2, 3, 60_000));
        let back = Quarantine::decode(&q.encode()).unwrap();
        assert!(back.blocks("d1", 6) && !back.blocks("d2", 6));
        assert_eq!(back.in_row("d2"), 0);
        assert_eq!(Quarantine::decode(b"nonsense"), None);
    }
}
