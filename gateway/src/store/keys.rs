//! The store's key layout: one sled tree, keys prefixed by kind, so a group of events is one
//! atomic `apply_batch` and one flush. Pure functions; `docs/architecture.md` documents it.
//!
//! | key                                   | value                                   |
//! |---------------------------------------|-----------------------------------------|
//! | `m/schema`                            | u32 BE schema version                   |
//! | `m/clock_floor`                       | u64 BE the clock floor, Unix s ([`crate::clock::Floor`]) |
//! | `h/<device>`                          | u64 BE durable high-water mark          |
//! | `s/<handler>\0<key>`                  | state value (raw bytes)                 |
//! | `o/<u64 BE outbox seq>`               | outbox entry (CBOR [`crate::outbox::Entry`]) |
//! | `d/<u64 BE id>`                       | dead letter (CBOR [`crate::store::DeadLetter`]) |
//! | `t/<handler>`                         | u64 BE next due time of its timer (wall-clock ms) |
//! | `q/<handler>`                         | its quarantine                          |
//! | `r/<handler>\0current`                | the deployed bundle it runs (as signed) |
//! | `r/<handler>\0previous`               | the bundle it ran before (for rollback) |
//! | `r/<handler>\0floor`                  | u64 BE the highest version ever installed |
//! | `r/<handler>\0probation`              | u64 BE wall ms its current version's probation started |
//! | `r/<handler>\0note`                   | what last happened to it and why (a rollback, a removal) |

/// The layout version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

pub const SCHEMA: &[u8] = b"m/schema";
/// Written along with a group commit, never alone (`AfterFlush::ride_along`).
pub const CLOCK_FLOOR: &[u8] = b"m/clock_floor";
pub const HWM: &[u8] = b"h/";
pub const STATE: &[u8] = b"s/";
pub const OUTBOX: &[u8] = b"o/";
pub const DEAD: &[u8] = b"d/";
pub const TIMER: &[u8] = b"t/";
pub const QUARANTINE: &[u8] = b"q/";
pub const REGISTRY: &[u8] = b"r/";

/// A slot of a deployed handler's registry record (`current`, `previous`, `floor`,
/// `probation`, `note`).
pub fn registry(handler: &str, slot: &str) -> Vec<u8> {
    join(REGISTRY, &[handler.as_bytes(), b"\0", slot.as_bytes()])
}

fn join(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    k.extend_from_slice(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub fn hwm(device: &str) -> Vec<u8> {
    join(HWM, &[device.as_bytes()])
}

/// The prefix of one handler's state namespace (handler names never contain NUL).
pub fn state_prefix(handler: &str) -> Vec<u8> {
    join(STATE, &[handler.as_bytes(), b"\0"])
}

pub fn state(handler: &str, key: &[u8]) -> Vec<u8> {
    join(STATE, &[handler.as_bytes(), b"\0", key])
}

pub fn timer(handler: &str) -> Vec<u8> {
    join(TIMER, &[handler.as_bytes()])
}

pub fn quarantine(handler: &str) -> Vec<u8> {
    join(QUARANTINE, &[handler.as_bytes()])
}

pub fn outbox(seq: u64) -> Vec<u8> {
    join(OUTBOX, &[&seq.to_be_bytes()])
}

pub fn dead(id: u64) -> Vec<u8> {
    join(DEAD, &[&id.to_be_bytes()])
}

/// The sequence number in an `o/` or `d/` key.
pub fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(2..10)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

pub fn u64_value(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// A timer's stored next due time: u64 BE, then its epoch (u64 BE) when not 0.
pub fn timer_value(due_ms: u64, epoch: u64) -> Vec<u8> {
    let mut v = due_ms.to_be_bytes().to_vec();
    if epoch > 0 {
        v.extend_from_slice(&epoch.to_be_bytes());
    }
    v
}

/// A [`timer_value`] read back: (due, epoch).
pub fn read_timer_value(v: &[u8]) -> Option<(u64, u64)> {
    match v.len() {
        8 => Some((u64_value(v)?, 0)),
        16 => Some((u64_value(&v[..8])?, u64_value(&v[8..])?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_do_not_collide_and_seqs_sort() {
        assert!(state("a", b"b").starts_with(&state_prefix("a")));
        assert!(!state("ab", b"").starts_with(&state_prefix("a")));
        assert!(outbox(1) < outbox(256));
        assert_eq!(seq_of(&outbox(77)), Some(77));
        assert_eq!(seq_of(b"o/"), None);
    }
}
