//! Guest SDK for Tidepool handlers: the crate root owns the error and class types, the
//! uplink/bus calls (`forward`, `emit`), the clock and the raw event metadata, and re-exports
//! the rest.
//!
//! A handler is a `cdylib` built for `wasm32-unknown-unknown` that names its functions with
//! [`handler!`]:
//!
//! ```no_run
//! use tidepool_sdk::{forward, Class, Error, Event};
//!
//! tidepool_sdk::handler!(on_event);
//!
//! fn on_event(ev: &Event) -> Result<(), Error> {
//!     let v = ev.number("v").ok_or(Error::NotFound)?;
//!     if v > 30.0 {
//!         forward(ev.topic, ev.payload, Class::Urgent)?;
//!     }
//!     Ok(())
//! }
//! ```
//!
//! Feature `serde` (off by default) adds typed JSON and CBOR: [`Event`]'s `json`/`cbor`, the
//! `state::{get,put}_{json,cbor}` helpers, `forward_json` and `emit_json`, and the `json::encode`,
//! `json::decode` and `cbor` functions. A handler that does not use them pays nothing in size.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

use alloc::vec::Vec;

mod cached;
#[cfg(feature = "serde")]
pub mod cbor;
pub mod config;
mod event;
pub mod json;
mod log;
mod meta;
#[doc(hidden)]
pub mod rt;
pub mod state;
pub mod sys;

pub use crate::cached::Cached;
pub use crate::event::Event;
pub use crate::log::{log, Level};
pub use crate::meta::{Meta, Timer};
/// The `serde` crate the SDK's typed helpers use (feature `serde`), for handlers that do not
/// depend on it themselves: `#[serde(crate = "tidepool_sdk::serde")]` on a derive.
///
/// ```
/// #[derive(tidepool_sdk::serde::Serialize)]
/// #[serde(crate = "tidepool_sdk::serde")]
/// struct Alarm { on: bool }
/// ```
#[cfg(feature = "serde")]
pub use serde;

/// A failure reported by a host call (by its code), or chosen by a handler.
///
/// Returning `Err` from a handler makes the event fail (it is dead-lettered). A limit hit
/// fails the invocation whatever the handler returns.
///
/// ```
/// use tidepool_sdk::Error;
/// assert_eq!(Error::from_code(-3), Error::TooManyForwards);
/// assert_eq!(Error::OverQuota.code(), -2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// -1: the key or value does not exist (also fits a missing config key or payload field).
    NotFound,
    /// -2: the write would exceed the handler's `state_bytes`.
    OverQuota,
    /// -3: more than `forwards_per_event` forwards.
    TooManyForwards,
    /// -4: more than `emits_per_event` emits, or the emit depth is exceeded.
    TooManyEmits,
    /// -5: a bad argument, such as an empty or wildcard topic or an oversized payload.
    BadArgument,
    /// Any other negative code.
    Other(i32),
}

impl Error {
    /// The error for a negative host return code.
    ///
    /// ```
    /// assert_eq!(tidepool_sdk::Error::from_code(-7), tidepool_sdk::Error::Other(-7));
    /// ```
    pub fn from_code(code: i32) -> Self {
        use tidepool_abi::code::*;
        match code {
            NOT_FOUND => Self::NotFound,
            OVER_STATE_QUOTA => Self::OverQuota,
            OVER_FORWARDS => Self::TooManyForwards,
            OVER_EMITS => Self::TooManyEmits,
            BAD_ARGUMENT => Self::BadArgument,
            other => Self::Other(other),
        }
    }

    /// The host return code for this error.
    ///
    /// ```
    /// assert_eq!(tidepool_sdk::Error::NotFound.code(), -1);
    /// ```
    pub fn code(self) -> i32 {
        use tidepool_abi::code::*;
        match self {
            Self::NotFound => NOT_FOUND,
            Self::OverQuota => OVER_STATE_QUOTA,
            Self::TooManyForwards => OVER_FORWARDS,
            Self::TooManyEmits => OVER_EMITS,
            Self::BadArgument => BAD_ARGUMENT,
            Self::Other(code) => code,
        }
    }

    /// `Ok` for a non-negative host return code, the matching error otherwise.
    pub(crate) fn check(code: i32) -> Result<(), Self> {
        if code >= 0 {
            Ok(())
        } else {
            Err(Self::from_code(code))
        }
    }
}

/// Uplink priority of a forwarded message.
///
/// ```
/// assert_eq!(tidepool_sdk::Class::Bulk as i32, 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Class {
    /// Sent as soon as possible; may wake the uplink.
    Urgent = tidepool_abi::class::URGENT,
    /// Sent with the next regular batch.
    Normal = tidepool_abi::class::NORMAL,
    /// Sent when the link is idle and cheap.
    Bulk = tidepool_abi::class::BULK,
}

/// Queues `payload` on `topic` for the uplink.
///
/// Fails with [`Error::TooManyForwards`] past the manifest's `forwards_per_event` (which also
/// fails the invocation), and with [`Error::BadArgument`] when `topic` is not a valid concrete
/// topic (empty, a wildcard `+`/`#`, an empty level, over 256 bytes) or `payload` is larger than
/// the gateway's `ingress.max_payload_bytes`; a bad argument alone does not fail the invocation.
///
/// ```no_run
/// use tidepool_sdk::{forward, Class};
/// forward("alerts/a", b"hot", Class::Urgent)?;
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
pub fn forward(topic: &str, payload: &[u8], class: Class) -> Result<(), Error> {
    let (topic_ptr, topic_len) = sys::raw(topic.as_bytes());
    let (payload_ptr, payload_len) = sys::raw(payload);
    // SAFETY: both ranges are live borrowed slices; the host only reads them.
    Error::check(unsafe {
        sys::forward(topic_ptr, topic_len, payload_ptr, payload_len, class as i32)
    })
}

/// Publishes `payload` on `topic` on the local bus, for other handlers.
///
/// Fails with [`Error::TooManyEmits`] past the manifest's `emits_per_event`, the box's emit
/// budget for one device event, or the emit depth (each also fails the invocation), and with
/// [`Error::BadArgument`] for a topic or payload [`forward`] would refuse.
///
/// ```no_run
/// tidepool_sdk::emit("derived/a/avg", br#"{"v": 20.1}"#)?;
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
pub fn emit(topic: &str, payload: &[u8]) -> Result<(), Error> {
    let (topic_ptr, topic_len) = sys::raw(topic.as_bytes());
    let (payload_ptr, payload_len) = sys::raw(payload);
    // SAFETY: both ranges are live borrowed slices; the host only reads them.
    Error::check(unsafe { sys::emit(topic_ptr, topic_len, payload_ptr, payload_len) })
}

/// Encodes `value` as JSON and [`forward`]s it; [`Error::BadArgument`] if it does not encode.
///
/// ```no_run
/// use tidepool_sdk::{forward_json, Class};
///
/// #[derive(serde::Serialize)]
/// struct Alarm<'a> { alarm: bool, device: &'a str }
///
/// forward_json("alarms/d1", &Alarm { alarm: true, device: "d1" }, Class::Urgent)?;
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
#[cfg(feature = "serde")]
pub fn forward_json<T: serde::Serialize + ?Sized>(
    topic: &str,
    value: &T,
    class: Class,
) -> Result<(), Error> {
    forward(topic, &json::encode(value)?, class)
}

/// Encodes `value` as JSON and [`emit`]s it; [`Error::BadArgument`] if it does not encode.
///
/// ```no_run
/// #[derive(serde::Serialize)]
/// struct Avg { v: f64 }
///
/// tidepool_sdk::emit_json("derived/d1/avg", &Avg { v: 20.1 })?;
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
#[cfg(feature = "serde")]
pub fn emit_json<T: serde::Serialize + ?Sized>(topic: &str, value: &T) -> Result<(), Error> {
    emit(topic, &json::encode(value)?)
}

/// Milliseconds since the Unix epoch, by the gateway's clock.
///
/// ```no_run
/// let t = tidepool_sdk::now_ms();
/// ```
pub fn now_ms() -> i64 {
    // SAFETY: no arguments, no memory access.
    unsafe { sys::now_ms() }
}

/// The current call's metadata as raw CBOR bytes: for an event a map with `device`, `seq`,
/// `ts`, `received_ms` and `clock_synced`, for a timer call `{timer: true, due_ms, now_ms,
/// late_ms}`, in `tp_init` an empty map. [`Event::meta`] and [`Timer`] decode it for you.
///
/// ```no_run
/// let cbor = tidepool_sdk::event_meta();
/// ```
pub fn event_meta() -> Vec<u8> {
    with_event_meta(|bytes| bytes.map(<[u8]>::to_vec).unwrap_or_default())
}

/// Runs `f` on the current call's metadata, without copying it to the heap when it is short.
pub(crate) fn with_event_meta<R>(f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    let call = |out: &mut [u8]| {
        let (out_ptr, out_cap) = sys::raw(out);
        // SAFETY: `out` is a live mutable buffer; the host writes at most `out_cap` bytes to it.
        unsafe { sys::event_meta(out_ptr, out_cap) }
    };
    sys::with_buffer(call, f)
}
