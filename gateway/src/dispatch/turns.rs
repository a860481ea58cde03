//! Whose input the dispatcher thread takes next (pure: no I/O, no clock). Each device's input
//! waits in a queue of its own, in the order it was sent, and devices take turns: one item
//! each, and a batch of many frames is taken a turn at a time, at most [`TURN_STEPS`] steps
//! and about [`TURN_TIME`] (the thread reads the clock; its rest goes back to the front of its
//! device's queue). One device flooding the inbox then delays another by a turn, not by
//! everything it queued. Order within a device is kept: its events are taken, and committed,
//! in the order it sent them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// The most steps of one batch taken in one turn.
pub const TURN_STEPS: usize = 256;

/// How long a turn lasts at most (then the step under way ends it): a device waits about this
/// long per other device with input, whatever its handlers cost. Long enough that fast
/// handlers take whole reads in one turn (each turn costs a look at the clock per step).
pub const TURN_TIME: std::time::Duration = std::time::Duration::from_millis(1);

/// Items queued per device, and the devices with items in the order of their next turn.
#[derive(Debug)]
pub struct Turns<T> {
    queues: HashMap<Arc<str>, VecDeque<T>>,
    order: VecDeque<Arc<str>>,
}

impl<T> Default for Turns<T> {
    fn default() -> Self {
        Turns {
            queues: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<T> Turns<T> {
    /// Queues `item` behind `device`'s others.
    pub fn push(&mut self, device: &Arc<str>, item: T) {
        let q = self.queues.entry(device.clone()).or_default();
        if q.is_empty() {
            self.order.push_back(device.clone());
        }
        q.push_back(item);
    }

    /// The first item of the device whose turn it is; that device goes to the back of the
    /// line (if it has more).
    pub fn next(&mut self) -> Option<(Arc<str>, T)> {
        let device = self.order.pop_front()?;
        let q = self.queues.get_mut(&device)?;
        let item = q.pop_front()?;
        if q.is_empty() {
            self.queues.remove(&device);
        } else {
            self.order.push_back(device.clone());
        }
        Some((device, item))
    }

    /// Puts what is left of an item (taken by [`Turns::next`]) back at the front of its
    /// device's queue: it goes on at that device's next turn.
    pub fn put_back(&mut self, device: &Arc<str>, item: T) {
        let q = self.queues.entry(device.clone()).or_default();
        if q.is_empty() {
            self.order.push_back(device.clone());
        }
        q.push_front(item);
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> Arc<str> {
        s.into()
    }

    #[test]
    fn devices_take_turns_and_each_keeps_its_order() {
        let mut t = Turns::default();
        for i in 0..5 {
            t.push(&dev("flood"), format!("f{i}"));
        }
        t.push(&dev("a"), "a0".to_string());
        t.push(&dev("b"), "b0".to_string());
        t.push(&dev("a"), "a1".to_string());
        let mut taken = Vec::new();
        while let Some((_, item)) = t.next() {
            taken.push(item);
        }
        assert_eq!(taken, ["f0", "a0", "b0", "f1", "a1", "f2", "f3", "f4"]);
    }

    /// A long batch goes on at its device's next turn, ahead of that device's later input,
    /// and behind the other devices' turns.
    #[test]
    fn the_rest_of_an_item_waits_for_its_devices_next_turn() {
        let mut t = Turns::default();
        t.push(&dev("flood"), vec![1, 2, 3, 4, 5]);
        t.push(&dev("flood"), vec![6]);
        t.push(&dev("a"), vec![100]);
        let mut taken = Vec::new();
        while let Some((d, mut item)) = t.next() {
            let rest = item.split_off(item.len().min(2));
            taken.extend(item);
            if !rest.is_empty() {
                t.put_back(&d, rest);
            }
        }
        assert_eq!(taken, [1, 2, 100, 3, 4, 5, 6]);
        assert!(t.is_empty());
    }
}
