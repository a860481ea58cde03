//! Per-handler key/value state kept by the gateway: survives restarts, upgrades and rollbacks,
//! is dropped when the handler is removed. Writes are part of the invocation and are discarded
//! if it fails. With feature `serde`, typed values as JSON (`get_json`, `put_json`) or CBOR
//! (`get_cbor`, `put_cbor`; smaller, and no float formatting or parsing, so the better default
//! for state). Every call is a host call that costs fuel per byte: keep keys and values short.
//!
//! ```no_run
//! use tidepool_sdk::state;
//!
//! let n = state::get(b"count").and_then(|v| v.try_into().ok()).map_or(0, u64::from_le_bytes);
//! state::put(b"count", &(n + 1).to_le_bytes())?;
//! # Ok::<(), tidepool_sdk::Error>(())
//! ```

use alloc::vec::Vec;

use crate::{sys, Error};

/// The value stored under `key`, or `None` if it is not set.
///
/// ```no_run
/// let last = tidepool_sdk::state::get(b"last/devices/a/temp")
///     .and_then(|v| v.try_into().ok())
///     .map(f64::from_le_bytes);
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

/// Stores `val` under `key`; fails with [`Error::OverQuota`] past the manifest's `state_bytes`
/// or past the distinct keys one invocation may write (`limits.state_writes_per_event`).
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

/// Removes `key`; removing a key that is not set is not an error. Past the distinct keys one
/// invocation may write (`limits.state_writes_per_event`) nothing is removed and the
/// invocation fails (`limit:state_writes_per_event`), whatever the handler returns.
///
/// ```no_run
/// tidepool_sdk::state::delete(b"count");
/// ```
pub fn delete(key: &[u8]) {
    let (key_ptr, key_len) = sys::raw(key);
    // SAFETY: `key` is a live borrowed slice; the host only reads it. Its -2 (past the write
    // cap) fails the invocation on the host's side: nothing to return here.
    unsafe { sys::state_delete(key_ptr, key_len) };
}

/// The JSON value under `key` decoded into `T`: `Ok(None)` if it is not set,
/// [`Error::BadArgument`] if it does not decode.
///
/// ```no_run
/// let seen: Vec<String> = tidepool_sdk::state::get_json(b"seen")?.unwrap_or_default();
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
#[cfg(feature = "serde")]
pub fn get_json<T: serde::de::DeserializeOwned>(key: &[u8]) -> Result<Option<T>, Error> {
    get(key).map(|v| crate::json::decode(&v)).transpose()
}

/// Stores `val` as JSON under `key`; see [`put`] for the quota.
///
/// ```no_run
/// tidepool_sdk::state::put_json(b"seen", &["d1", "d2"])?;
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
#[cfg(feature = "serde")]
pub fn put_json<T: serde::Serialize + ?Sized>(key: &[u8], val: &T) -> Result<(), Error> {
    put(key, &crate::json::encode(val)?)
}

/// The CBOR value under `key` decoded into `T`: `Ok(None)` if it is not set,
/// [`Error::BadArgument`] if it does not decode.
///
/// ```no_run
/// #[derive(serde::Deserialize)]
/// struct Stats { count: u64, sum: f64 }
///
/// let stats: Option<Stats> = tidepool_sdk::state::get_cbor(b"stats/d1")?;
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
#[cfg(feature = "serde")]
pub fn get_cbor<T: serde::de::DeserializeOwned>(key: &[u8]) -> Result<Option<T>, Error> {
    get(key).map(|v| crate::cbor::decode(&v)).transpose()
}

/// Stores `val` as CBOR under `key`; see [`put`] for the quota.
///
/// ```no_run
/// #[derive(serde::Serialize)]
/// struct Stats { count: u64, sum: f64 }
///
/// tidepool_sdk::state::put_cbor(b"stats/d1", &Stats { count: 2, sum: 43.0 })?;
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
#[cfg(feature = "serde")]
pub fn put_cbor<T: serde::Serialize + ?Sized>(key: &[u8], val: &T) -> Result<(), Error> {
    put(key, &crate::cbor::encode(val)?)
}
