//! Quarantine (pure: no I/O, no clock): which devices a handler no longer runs for. Failures
//! in a row are counted per device, so a device that keeps sending events that trap a handler
//! takes the handler away from itself only; when the failures come from several devices, the
//! handler is quarantined for all of them (it is broken, not its input). A timer's firings
//! count as the device `""`. Until the gateway restarts.

use std::collections::{BTreeSet, HashMap};

use super::FailureKind;

/// What one invocation's verdict changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Quarantined for this device (the `n`-th device so far).
    Device { device: String, n: usize },
    /// Quarantined for every device.
    All,
}

/// One handler's quarantine state.
#[derive(Debug, Default)]
pub struct Quarantine {
    /// Failures in a row, per device that failed it last (a success removes the device).
    in_row: HashMap<Box<str>, u32>,
    devices: BTreeSet<Box<str>>,
    all: bool,
}

impl Quarantine {
    /// Whether the handler must not run for `device`.
    pub fn blocks(&self, device: &str) -> bool {
        self.all || self.devices.contains(device)
    }

    /// Quarantined for every device.
    pub fn all(&self) -> bool {
        self.all
    }

    /// The devices it is quarantined for (when not for all).
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.devices.iter().map(|d| &**d)
    }

    /// The most failures in a row of any device.
    pub fn worst_in_row(&self) -> u32 {
        self.in_row.values().copied().max().unwrap_or(0)
    }

    /// Failures in a row of `device`.
    pub fn in_row(&self, device: &str) -> u32 {
        self.in_row.get(device).copied().unwrap_or(0)
    }

    /// Counts an invocation for `device`: a success clears its count, a trap or a limit hit
    /// adds one, a rejection (the handler returned non-zero: bad input) leaves it. After
    /// `after` failures in a row (0: never) the handler is quarantined for the device; once
    /// `devices_for_all` devices are (0: never), for all.
    pub fn record(
        &mut self,
        device: &str,
        failed: Option<FailureKind>,
        after: u32,
        devices_for_all: usize,
    ) -> Option<Change> {
        match failed {
            None => {
                self.in_row.remove(device);
                return None;
            }
            Some(FailureKind::Rejected) => return None,
            Some(FailureKind::Timeout | FailureKind::Broken) => {}
        }
        let n = self.in_row.entry(device.into()).or_insert(0);
        *n = n.saturating_add(1);
        if after == 0 || *n < after || self.blocks(device) {
            return None;
        }
        self.devices.insert(device.into());
        if devices_for_all > 0 && self.devices.len() >= devices_for_all {
            self.all = true;
            return Some(Change::All);
        }
        Some(Change::Device {
            device: device.into(),
            n: self.devices.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRAP: Option<FailureKind> = Some(FailureKind::Broken);

    #[test]
    fn one_device_that_keeps_failing_a_handler_loses_it_alone() {
        let mut q = Quarantine::default();
        assert_eq!(q.record("d1", TRAP, 3, 3), None);
        assert_eq!(q.record("d1", TRAP, 3, 3), None);
        assert_eq!(
            q.record("d1", TRAP, 3, 3),
            Some(Change::Device {
                device: "d1".into(),
                n: 1
            })
        );
        assert!(q.blocks("d1"));
        assert!(!q.blocks("d2"), "the other devices keep the handler");
        assert!(!q.all());
        assert_eq!(q.devices().collect::<Vec<_>>(), ["d1"]);
    }

    #[test]
    fn failures_from_several_devices_quarantine_it_for_all() {
        let mut q = Quarantine::default();
        for d in ["d1", "d2"] {
            q.record(d, TRAP, 2, 3);
            assert!(matches!(
                q.record(d, TRAP, 2, 3),
                Some(Change::Device { .. })
            ));
        }
        q.record("", TRAP, 2, 3);
        assert_eq!(q.record("", TRAP, 2, 3), Some(Change::All));
        assert!(q.blocks("d9"));
    }

    #[test]
    fn a_success_or_a_rejection_in_between_and_zero_settings() {
        let mut q = Quarantine::default();
        q.record("d1", TRAP, 2, 3);
        q.record("d1", None, 2, 3);
        assert_eq!(q.in_row("d1"), 0);
        q.record("d1", TRAP, 2, 3);
        q.record("d1", Some(FailureKind::Rejected), 2, 3);
        assert_eq!(q.in_row("d1"), 1, "a rejection leaves the count");
        // Another device's failures do not count for this one.
        q.record("d2", TRAP, 2, 3);
        assert!(!q.blocks("d1") && !q.blocks("d2"));
        assert_eq!(q.worst_in_row(), 1);
        // 0: never quarantined; 0 devices: never for all.
        let mut never = Quarantine::default();
        for _ in 0..10 {
            assert_eq!(never.record("d1", TRAP, 0, 3), None);
        }
        let mut per_device = Quarantine::default();
        for d in ["a", "b", "c", "d"] {
            per_device.record(d, TRAP, 1, 0);
        }
        assert!(!per_device.all() && per_device.blocks("c"));
    }
}
