//! The raw host imports from module `tidepool`, exactly as the gateway links them.
//!
//! Every pointer and length is an `i32` offset/size in this module's linear memory. Prefer the
//! safe wrappers ([`crate::state`], [`crate::forward`], ...); these exist for callers that need
//! to manage buffers themselves. Off `wasm32` (host-side `cargo test`, doc tests) each function is
//! a stub that panics, so the crate still compiles and links there.
//!
//! ```no_run
//! let key = b"count";
//! let mut out = [0u8; 16];
//! // SAFETY: both ranges are live local buffers; the host writes at most `out.len()` bytes.
//! let len = unsafe {
//!     tidepool_sdk::sys::state_get(key.as_ptr() as i32, key.len() as i32, out.as_mut_ptr() as i32, out.len() as i32)
//! };
//! ```

macro_rules! imports {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident),*) $(-> $ret:ty)?;)*) => {
        #[cfg(target_arch = "wasm32")]
        #[link(wasm_import_module = "tidepool")]
        extern "C" {
            $($(#[$doc])* pub fn $name($($arg: i32),*) $(-> $ret)?;)*
        }

        /// What this module declares, as (name, parameter count, result): checked against
        /// [`tidepool_abi::IMPORTS`] by a test.
        #[cfg(test)]
        pub(crate) const DECLARED: &[(&str, usize, &str)] = &[
            $((stringify!($name), <[&str]>::len(&[$(stringify!($arg)),*]), stringify!($($ret)?)),)*
        ];

        $(
            $(#[$doc])*
            ///
            /// # Safety
            /// Every `(ptr, len)` pair must be a range of this module's memory that the host may
            /// read, or write where the function fills an output buffer.
            #[cfg(not(target_arch = "wasm32"))]
            pub unsafe fn $name($($arg: i32),*) $(-> $ret)? {
                $(let _ = $arg;)*
                unimplemented!(concat!("tidepool::", stringify!($name), " exists only inside the gateway"))
            }
        )*
    };
}

imports! {
    /// Copies the value of a state key into `out` if it fits in `out_cap`; returns its full
    /// length, or -1 when the key is not set.
    ///
    /// ```no_run
    /// let (key, mut out) = (b"count", [0u8; 8]);
    /// // SAFETY: both ranges are live local buffers; the host writes at most 8 bytes to `out`.
    /// let len = unsafe {
    ///     tidepool_sdk::sys::state_get(key.as_ptr() as i32, 5, out.as_mut_ptr() as i32, 8)
    /// };
    /// ```
    fn state_get(key_ptr, key_len, out_ptr, out_cap) -> i32;
    /// Sets a state key; returns 0, or -2 when the handler's state quota would be exceeded or
    /// the invocation wrote `limits.state_writes_per_event` distinct keys already.
    ///
    /// ```no_run
    /// let (key, val) = (b"count", 7u64.to_le_bytes());
    /// // SAFETY: both ranges are live local buffers that the host only reads.
    /// let rc = unsafe {
    ///     tidepool_sdk::sys::state_put(key.as_ptr() as i32, 5, val.as_ptr() as i32, 8)
    /// };
    /// ```
    fn state_put(key_ptr, key_len, val_ptr, val_len) -> i32;
    /// Removes a state key (a missing key is fine); returns 0, or -2 past the distinct keys one
    /// invocation may write (the invocation then fails: `limit:state_writes_per_event`).
    ///
    /// ```no_run
    /// let key = b"count";
    /// // SAFETY: `key` is a live local buffer that the host only reads.
    /// unsafe { tidepool_sdk::sys::state_delete(key.as_ptr() as i32, 5) };
    /// ```
    fn state_delete(key_ptr, key_len) -> i32;
    /// Queues a message for the uplink with class 0 urgent, 1 normal, 2 bulk; returns 0, -3 over
    /// `forwards_per_event`, or -5 for a bad argument (class, topic, or a payload over the max).
    ///
    /// ```no_run
    /// let (topic, payload) = (b"alerts/a", b"hot");
    /// // SAFETY: both ranges are live local buffers that the host only reads.
    /// let rc = unsafe {
    ///     tidepool_sdk::sys::forward(topic.as_ptr() as i32, 8, payload.as_ptr() as i32, 3, 0)
    /// };
    /// ```
    fn forward(topic_ptr, topic_len, payload_ptr, payload_len, class) -> i32;
    /// Publishes an event back onto the local bus; returns 0, -4 over `emits_per_event` (or the
    /// emit depth, or the box budget per device event), or -5 for a bad topic or payload.
    ///
    /// ```no_run
    /// let (topic, payload) = (b"derived/a", b"1");
    /// // SAFETY: both ranges are live local buffers that the host only reads.
    /// let rc = unsafe {
    ///     tidepool_sdk::sys::emit(topic.as_ptr() as i32, 9, payload.as_ptr() as i32, 1)
    /// };
    /// ```
    fn emit(topic_ptr, topic_len, payload_ptr, payload_len) -> i32;
    /// Writes a log line at `level` (0 error, 1 warn, 2 info, 3 debug, 4 trace).
    ///
    /// ```no_run
    /// let msg = b"started";
    /// // SAFETY: `msg` is a live local buffer that the host only reads.
    /// unsafe { tidepool_sdk::sys::log(2, msg.as_ptr() as i32, 7) };
    /// ```
    fn log(level, ptr, len);
    /// Milliseconds since the Unix epoch, by the gateway's clock.
    ///
    /// ```no_run
    /// // SAFETY: no memory is passed.
    /// let now = unsafe { tidepool_sdk::sys::now_ms() };
    /// ```
    fn now_ms() -> i64;
    /// Like `state_get`, for the handler's config (manifest plus box overrides).
    ///
    /// ```no_run
    /// let (key, mut out) = (b"field", [0u8; 32]);
    /// // SAFETY: both ranges are live local buffers; the host writes at most 32 bytes to `out`.
    /// let len = unsafe {
    ///     tidepool_sdk::sys::config_get(key.as_ptr() as i32, 5, out.as_mut_ptr() as i32, 32)
    /// };
    /// ```
    fn config_get(key_ptr, key_len, out_ptr, out_cap) -> i32;
    /// Copies the current call's metadata (a CBOR map, see [`crate::Meta`] and
    /// [`crate::Timer`]) into `out` if it fits in `out_cap`; returns its full length.
    ///
    /// ```no_run
    /// let mut out = [0u8; 128];
    /// // SAFETY: `out` is a live local buffer; the host writes at most 128 bytes to it.
    /// let len = unsafe { tidepool_sdk::sys::event_meta(out.as_mut_ptr() as i32, 128) };
    /// ```
    fn event_meta(out_ptr, out_cap) -> i32;
}

/// The longest value a call returned so far, up to [`HINT_MAX`]: later calls read into a
/// buffer that large at once. The host charges fuel for a value's full length on every call
/// (written or not), so a handler that keeps a large value pays for one read, not two.
static HINT: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// The largest first buffer [`with_buffer`] allocates from the hint.
const HINT_MAX: usize = 64 * 1024;

fn remember(hint: &core::sync::atomic::AtomicUsize, len: usize) {
    use core::sync::atomic::Ordering::Relaxed;
    let len = len.min(HINT_MAX);
    if len > hint.load(Relaxed) {
        hint.store(len, Relaxed);
    }
}

/// Calls a host function that fills `out` and returns the full length (or a negative code),
/// and passes the bytes (`None` for a negative code) to `f`: first into a 128-byte stack
/// buffer, so a missing key or a short value allocates nothing (or, once a longer value was
/// seen, into a heap buffer that long), then, when the value is longer, once more into a heap
/// buffer of the exact size.
pub(crate) fn with_buffer<R>(
    call: impl FnMut(&mut [u8]) -> i32,
    f: impl FnOnce(Option<&[u8]>) -> R,
) -> R {
    with_buffer_hinted(&HINT, call, f)
}

/// [`with_buffer`] with the longest-value hint in `hints`.
fn with_buffer_hinted<R>(
    hints: &core::sync::atomic::AtomicUsize,
    mut call: impl FnMut(&mut [u8]) -> i32,
    f: impl FnOnce(Option<&[u8]>) -> R,
) -> R {
    let hint = hints.load(core::sync::atomic::Ordering::Relaxed);
    let mut buf = alloc::vec::Vec::new();
    let mut len;
    if hint > 128 {
        buf.resize(hint, 0);
        let Ok(n) = usize::try_from(call(&mut buf)) else {
            return f(None);
        };
        len = n;
    } else {
        let mut first = [0u8; 128];
        let Ok(n) = usize::try_from(call(&mut first)) else {
            return f(None);
        };
        if n <= first.len() {
            return f(Some(&first[..n]));
        }
        len = n;
    }
    remember(hints, len);
    while len > buf.len() {
        buf.resize(len, 0);
        let Ok(n) = usize::try_from(call(&mut buf)) else {
            return f(None);
        };
        len = n;
    }
    f(Some(&buf[..len]))
}

/// [`with_buffer`] into an owned `Vec`.
pub(crate) fn read_buffer(call: impl FnMut(&mut [u8]) -> i32) -> Option<alloc::vec::Vec<u8>> {
    with_buffer(call, |bytes| bytes.map(<[u8]>::to_vec))
}

#[cfg(test)]
fn read_hinted(
    hints: &core::sync::atomic::AtomicUsize,
    call: impl FnMut(&mut [u8]) -> i32,
) -> Option<alloc::vec::Vec<u8>> {
    with_buffer_hinted(hints, call, |bytes| bytes.map(<[u8]>::to_vec))
}

/// `bytes` as `str` if they are UTF-8. Checks for ASCII first: in the interpreter that costs
/// about a third of `core::str::from_utf8`, and topics, keys and ids are nearly always ASCII.
pub(crate) fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        Some(unsafe { core::str::from_utf8_unchecked(bytes) })
    } else {
        core::str::from_utf8(bytes).ok()
    }
}

/// A slice as the `(ptr, len)` pair of `i32`s the imports take.
pub(crate) fn raw(bytes: &[u8]) -> (i32, i32) {
    (bytes.as_ptr() as i32, bytes.len() as i32)
}

#[cfg(test)]
mod tests {
    use super::{read_hinted, utf8, with_buffer_hinted};
    use alloc::vec::Vec;
    use core::sync::atomic::AtomicUsize;

    /// Each test its own hint (the process-wide one is shared by tests running at once).
    fn read_buffer(call: impl FnMut(&mut [u8]) -> i32) -> Option<Vec<u8>> {
        read_hinted(&AtomicUsize::new(0), call)
    }

    fn with_buffer<R>(call: impl FnMut(&mut [u8]) -> i32, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        with_buffer_hinted(&AtomicUsize::new(0), call, f)
    }

    /// Once a long value was read, the next read of it is one call (the host charges fuel
    /// for the full length on every call).
    #[test]
    fn a_long_value_seen_once_is_read_in_one_call_after() {
        let hint = AtomicUsize::new(0);
        let long: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let mut calls = 0;
        let mut inner = host(&long);
        let mut counted = |out: &mut [u8]| {
            calls += 1;
            inner(out)
        };
        assert_eq!(read_hinted(&hint, &mut counted).as_deref(), Some(&long[..]));
        assert_eq!(read_hinted(&hint, &mut counted).as_deref(), Some(&long[..]));
        assert_eq!(calls, 3);
    }

    /// A host call that holds `value` and, like the host, writes it only if it fits.
    fn host(value: &[u8]) -> impl FnMut(&mut [u8]) -> i32 + '_ {
        |out| {
            if value.len() <= out.len() {
                out[..value.len()].copy_from_slice(value);
            }
            value.len() as i32
        }
    }

    #[test]
    fn reads_short_and_long_values_and_missing_keys() {
        assert_eq!(read_buffer(|_| -1), None);
        assert_eq!(read_buffer(host(b"")), Some(Vec::new()));
        assert_eq!(read_buffer(host(b"abc")), Some(b"abc".to_vec()));
        let long: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let mut calls = 0;
        let mut inner = host(&long);
        let got = read_buffer(|out| {
            calls += 1;
            inner(out)
        });
        assert_eq!((got.as_deref(), calls), (Some(&long[..]), 2));
        assert_eq!(
            with_buffer(host(&[7; 128]), |b| b.map(<[u8]>::len)),
            Some(128)
        );
    }

    #[test]
    fn retries_while_the_value_grows_and_stops_on_an_error() {
        let mut sizes = [200usize, 300, 300].into_iter();
        let got = read_buffer(|out| {
            let n = sizes.next().unwrap();
            if n <= out.len() {
                out[..n].fill(1);
            }
            n as i32
        });
        assert_eq!(got.map(|v| v.len()), Some(300));
        let mut codes = [200, -1].into_iter();
        assert_eq!(read_buffer(|_| codes.next().unwrap()), None);
    }

    #[test]
    fn the_declared_imports_are_the_abis() {
        use tidepool_abi::Ty;
        let abi: Vec<(&str, usize, &str)> = tidepool_abi::IMPORTS
            .iter()
            .map(|f| {
                // Every parameter is an i32 (offsets, lengths, codes).
                assert!(f.params.iter().all(|t| *t == Ty::I32), "{}", f.name);
                let ret = match f.results {
                    [] => "",
                    [Ty::I32] => "i32",
                    [Ty::I64] => "i64",
                    _ => panic!("{}: one result at most", f.name),
                };
                (f.name, f.params.len(), ret)
            })
            .collect();
        assert_eq!(super::DECLARED, &abi[..]);
    }

    #[test]
    fn utf8_takes_ascii_and_checks_the_rest() {
        assert_eq!(utf8(b"devices/a/temp"), Some("devices/a/temp"));
        assert_eq!(utf8("café".as_bytes()), Some("café"));
        assert_eq!(utf8(&[b'a', 0xff]), None);
    }
}
