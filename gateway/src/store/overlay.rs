//! Pending state writes that are submitted but not yet flushed, so `state_get` sees them
//! while their group is in flight. Each write carries the tag of the item that made it; the
//! committer removes a write after its flush unless a later item overwrote it.

use std::collections::HashMap;
use std::sync::Mutex;

/// Full store key -> (value, or None for a delete; the tag of the item that wrote it).
type Writes = HashMap<Vec<u8>, (Option<Vec<u8>>, u64)>;

#[derive(Default)]
pub struct Overlay {
    map: Mutex<Writes>,
}

impl Overlay {
    /// `Some(value-or-deleted)` when a pending write exists for the full store key.
    pub fn get(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.lock().get(key).map(|(v, _)| v.clone())
    }

    pub fn put(&self, key: Vec<u8>, value: Option<Vec<u8>>, tag: u64) {
        self.lock().insert(key, (value, tag));
    }

    /// Drops the writes of item `tag` that are now durable.
    pub fn forget_durable<'a>(&self, keys: impl Iterator<Item = &'a Vec<u8>>, tag: u64) {
        let mut m = self.lock();
        for k in keys {
            if m.get(k).is_some_and(|(_, t)| *t == tag) {
                m.remove(k);
            }
        }
    }

    /// The keys under `prefix` with a pending write (a value or a delete).
    pub fn keys_with_prefix(&self, prefix: &[u8]) -> Vec<Vec<u8>> {
        self.lock()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writes> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_write_survives_the_settling_of_an_earlier_one() {
        let o = Overlay::default();
        o.put(b"k".to_vec(), Some(b"1".to_vec()), 1);
        o.put(b"k".to_vec(), Some(b"2".to_vec()), 2);
        o.forget_durable([b"k".to_vec()].iter(), 1);
        assert_eq!(o.get(b"k"), Some(Some(b"2".to_vec())));
        o.forget_durable([b"k".to_vec()].iter(), 2);
        assert_eq!(o.get(b"k"), None);
        assert!(o.is_empty());
    }
}
