//! Per-handler key/value state kept by the gateway: survives restarts, upgrades and rollbacks,
//! is dropped when the handler is removed. Writes are part of the invocation and are discarded
//! if it fails.

use alloc::vec::Vec;

use crate::{sys, Error};

/// The value stored under `key`, or `None` if it is not set.
///
/// ```no_run
/// let last = tidepool_sdk::state::get(b"last/devices/a/temp");
/// ```
pub fn get(key: &[u8]) -> Option<Vec<u8>> {
    let (key_ptr, key_len) = sys::raw(key);
    sys::read_buffer(|out| {
        let (out_ptr, out_cap) = sys::raw(out);
        // SAFETY: `key` and `out` are live buffers; the host reads `key` and writes at most
        // `out_cap` bytes to `out`.
        unsafe { sys::state_get(key_ptr, key_len, out_ptr, out_cap) }
    })
}

/// Stores `val` under `key`; fails with [`Error::OverQuota`] past the manifest's `state_bytes`.
///
/// ```no_run
/// tidepool_sdk::state::put(b"count", &7u32.to_le_bytes())?;
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
pub fn put(key: &[u8], val: &[u8]) -> Result<(), Error> {
    let (key_ptr, key_len) = sys::raw(key);
    let (val_ptr, val_len) = sys::raw(val);
    // SAFETY: both ranges are live borrowed slices; the host only reads them.
    Error::check(unsafe { sys::state_put(key_ptr, key_len, val_ptr, val_len) })
}

/// Removes `key`; removing a key that is not set is not an error.
///
/// ```no_run
/// tidepool_sdk::state::delete(b"count");
/// ```
pub fn delete(key: &[u8]) {
    let (key_ptr, key_len) = sys::raw(key);
    // SAFETY: `key` is a live borrowed slice; the host only reads it. It always returns 0.
    unsafe { sys::state_delete(key_ptr, key_len) };
}
