//! The event being handled ([`Event`]) and typed access to it: a numeric payload field, the
//! metadata, and (feature `serde`) the whole payload as JSON or CBOR.

use crate::{json, Meta};

/// One event delivered to the handler: its topic and raw payload bytes.
///
/// ```
/// let ev = tidepool_sdk::Event { topic: "devices/a/temp", payload: br#"{"v": 21.5}"# };
/// assert_eq!(ev.number("v"), Some(21.5));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// The topic the event was published on, e.g. `devices/a/temp`.
    pub topic: &'a str,
    /// The payload as sent by the device; often JSON, but any bytes.
    pub payload: &'a [u8],
}

impl<'a> Event<'a> {
    /// The number under `key` in a JSON object payload, without decoding the rest: the fast
    /// path for one reading. See [`json::number`] for what it accepts.
    ///
    /// ```
    /// let ev = tidepool_sdk::Event { topic: "t", payload: br#"{"id":"x","temp":-3.5}"# };
    /// assert_eq!(ev.number("temp"), Some(-3.5));
    /// assert_eq!(ev.number("id"), None);
    /// ```
    pub fn number(&self, key: &str) -> Option<f64> {
        json::number(self.payload, key)
    }

    /// The event's metadata (device, seq, timestamps), from the host's `event_meta`. `None`
    /// outside an event (in `tp_init` or a timer call) or if the host's map is malformed.
    /// Each call is a host call; keep the result if you need it twice.
    ///
    /// ```no_run
    /// # let ev = tidepool_sdk::Event { topic: "t", payload: b"" };
    /// let meta = ev.meta().ok_or(tidepool_sdk::Error::BadArgument)?;
    /// tidepool_sdk::debug!("from {} at {}", meta.device, meta.time_ms());
    /// # Ok::<(), tidepool_sdk::Error>(())
    /// ```
    pub fn meta(&self) -> Option<Meta> {
        crate::with_event_meta(|cbor| Meta::decode(cbor?))
    }

    /// The payload decoded from JSON into `T` (which may borrow from the payload); fails with
    /// [`Error::BadArgument`](crate::Error::BadArgument) if it is not JSON of that shape.
    ///
    /// ```
    /// #[derive(serde::Deserialize)]
    /// struct Reading<'a> { v: f64, unit: &'a str }
    ///
    /// let ev = tidepool_sdk::Event { topic: "t", payload: br#"{"v": 21.5, "unit": "C"}"# };
    /// let r: Reading = ev.json()?;
    /// assert_eq!((r.v, r.unit), (21.5, "C"));
    /// # Ok::<(), tidepool_sdk::Error>(())
    /// ```
    #[cfg(feature = "serde")]
    pub fn json<T: serde::Deserialize<'a>>(&self) -> Result<T, crate::Error> {
        json::decode(self.payload)
    }

    /// The payload decoded from CBOR into `T` (which may borrow from the payload); fails with
    /// [`Error::BadArgument`](crate::Error::BadArgument) if it is not CBOR of that shape.
    ///
    /// ```
    /// #[derive(serde::Deserialize)]
    /// struct Reading { v: f64 }
    ///
    /// // {"v": 1.5} as CBOR (a half-precision float).
    /// let ev = tidepool_sdk::Event { topic: "t", payload: &[0xa1, 0x61, b'v', 0xf9, 0x3e, 0x00] };
    /// assert_eq!(ev.cbor::<Reading>()?.v, 1.5);
    /// # Ok::<(), tidepool_sdk::Error>(())
    /// ```
    #[cfg(feature = "serde")]
    pub fn cbor<T: serde::Deserialize<'a>>(&self) -> Result<T, crate::Error> {
        crate::cbor::decode(self.payload)
    }
}
