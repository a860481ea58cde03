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
    fn state_get(key_ptr, key_len, out_ptr, out_cap) -> i32;
    /// Sets a state key; returns 0, or -2 when the handler's state quota would be exceeded.
    fn state_put(key_ptr, key_len, val_ptr, val_len) -> i32;
    /// Removes a state key (a missing key is fine); returns 0.
    fn state_delete(key_ptr, key_len) -> i32;
    /// Queues a message for the uplink with class 0 urgent, 1 normal, 2 bulk; returns 0, -3 over
    /// `forwards_per_event`, or -5 for a bad argument.
    fn forward(topic_ptr, topic_len, payload_ptr, payload_len, class) -> i32;
    /// Publishes an event back onto the local bus; returns 0, or -4 over `emits_per_event`.
    fn emit(topic_ptr, topic_len, payload_ptr, payload_len) -> i32;
    /// Writes a log line at `level` (0 error, 1 warn, 2 info, 3 debug, 4 trace).
    fn log(level, ptr, len);
    /// Milliseconds since the Unix epoch, by the gateway's clock.
    fn now_ms() -> i64;
    /// Like `state_get`, for the handler's config (manifest plus box overrides).
    fn config_get(key_ptr, key_len, out_ptr, out_cap) -> i32;
    /// Copies the current event's metadata (a CBOR map) into `out` if it fits in `out_cap`;
    /// returns its full length.
    fn event_meta(out_ptr, out_cap) -> i32;
}

/// Calls a host function that fills `out` and returns the full length (or a negative code),
/// starting with a 64-byte buffer and retrying once with the exact size when it is too small.
pub(crate) fn read_buffer(mut call: impl FnMut(&mut [u8]) -> i32) -> Option<alloc::vec::Vec<u8>> {
    let mut buf = alloc::vec![0; 64];
    loop {
        let len = usize::try_from(call(&mut buf)).ok()?;
        if len <= buf.len() {
            buf.truncate(len);
            return Some(buf);
        }
        buf.resize(len, 0);
    }
}

/// A slice as the `(ptr, len)` pair of `i32`s the imports take.
pub(crate) fn raw(bytes: &[u8]) -> (i32, i32) {
    (bytes.as_ptr() as i32, bytes.len() as i32)
}
