//! Typed event and timer metadata ([`Meta`], [`Timer`]), decoded from the CBOR map that the
//! host's `event_meta` returns by a small fixed-shape reader (no serde, no CBOR crate).
//!
//! For an event the map is `{device: text, seq: uint, ts: uint | null, received_ms: uint,
//! clock_synced: bool}`; for a timer call `{timer: true, due_ms: uint, now_ms: uint, late_ms:
//! uint}`; in `tp_init` it is empty. Keys may come in any order and unknown keys are skipped.

use alloc::string::String;

/// The metadata of the event being handled, from [`Event::meta`](crate::Event::meta).
///
/// ```
/// let meta = tidepool_sdk::Meta {
///     device: "d1".into(),
///     seq: 7,
///     ts: None,
///     received_ms: 1_700_000_000_000,
///     clock_synced: true,
/// };
/// assert_eq!(meta.time_ms(), 1_700_000_000_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The publishing device's id (its certificate's common name), e.g. `d1`.
    pub device: String,
    /// The event's sequence number on its device (0 for datagrams).
    pub seq: u64,
    /// The device's own timestamp in ms since the Unix epoch, if it sent one.
    pub ts: Option<u64>,
    /// When the gateway received the event, in ms since the Unix epoch by its clock.
    pub received_ms: u64,
    /// Whether the gateway's clock looked synchronized when the event arrived.
    pub clock_synced: bool,
}

impl Meta {
    /// The event's time: the device's `ts` if it sent one, else `received_ms`.
    ///
    /// ```
    /// let mut meta = tidepool_sdk::Meta::decode(&[
    ///     0xa3, 0x66, b'd', b'e', b'v', b'i', b'c', b'e', 0x62, b'd', b'1',
    ///     0x63, b's', b'e', b'q', 0x01,
    ///     0x6b, b'r', b'e', b'c', b'e', b'i', b'v', b'e', b'd', b'_', b'm', b's', 0x18, 200,
    /// ]).unwrap();
    /// assert_eq!(meta.time_ms(), 200);
    /// meta.ts = Some(150);
    /// assert_eq!(meta.time_ms(), 150);
    /// ```
    pub fn time_ms(&self) -> u64 {
        self.ts.unwrap_or(self.received_ms)
    }

    /// Decodes an event's `event_meta` map; `None` if it is not one (a timer's or `tp_init`'s
    /// map, or malformed). `device`, `seq` and `received_ms` are required; a missing `ts` is
    /// `None` and a missing `clock_synced` is `false`.
    ///
    /// ```
    /// use tidepool_sdk::Meta;
    /// // {"device": "d1", "seq": 1, "received_ms": 200}
    /// let cbor = [
    ///     0xa3, 0x66, b'd', b'e', b'v', b'i', b'c', b'e', 0x62, b'd', b'1',
    ///     0x63, b's', b'e', b'q', 0x01,
    ///     0x6b, b'r', b'e', b'c', b'e', b'i', b'v', b'e', b'd', b'_', b'm', b's', 0x18, 200,
    /// ];
    /// let meta = Meta::decode(&cbor).unwrap();
    /// assert_eq!((meta.device.as_str(), meta.seq, meta.ts), ("d1", 1, None));
    /// assert_eq!(Meta::decode(&[0xa0]), None); // {} (in tp_init)
    /// ```
    pub fn decode(cbor: &[u8]) -> Option<Meta> {
        let f = Fields::read(cbor)?;
        if f.timer {
            return None;
        }
        Some(Meta {
            device: String::from(f.device?),
            seq: f.seq?,
            ts: f.ts,
            received_ms: f.received_ms?,
            clock_synced: f.clock_synced,
        })
    }
}

/// A timer call, passed to the `timer` function of [`handler!`](crate::handler).
///
/// ```
/// let t = tidepool_sdk::Timer { now_ms: 60_500, due_ms: 60_000, late_ms: 500 };
/// assert!(t.late_ms < 1_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    /// The gateway's clock now, in ms since the Unix epoch (`tp_on_timer`'s argument).
    pub now_ms: u64,
    /// When this call fell due. A timer that fell due while the box was off fires once, late.
    pub due_ms: u64,
    /// `now_ms - due_ms`: how late this call is.
    pub late_ms: u64,
}

impl Timer {
    /// Decodes a timer call's `event_meta` map (`{timer: true, due_ms, now_ms, late_ms}`);
    /// `None` if it is not one.
    ///
    /// ```
    /// use tidepool_sdk::Timer;
    /// // {"timer": true, "due_ms": 10, "now_ms": 12, "late_ms": 2}
    /// let cbor = [
    ///     0xa4, 0x65, b't', b'i', b'm', b'e', b'r', 0xf5,
    ///     0x66, b'd', b'u', b'e', b'_', b'm', b's', 0x0a,
    ///     0x66, b'n', b'o', b'w', b'_', b'm', b's', 0x0c,
    ///     0x67, b'l', b'a', b't', b'e', b'_', b'm', b's', 0x02,
    /// ];
    /// assert_eq!(Timer::decode(&cbor), Some(Timer { now_ms: 12, due_ms: 10, late_ms: 2 }));
    /// ```
    pub fn decode(cbor: &[u8]) -> Option<Timer> {
        let f = Fields::read(cbor)?;
        if !f.timer {
            return None;
        }
        Some(Timer {
            now_ms: f.now_ms?,
            due_ms: f.due_ms?,
            late_ms: f.late_ms?,
        })
    }
}

/// Every field either map may hold.
#[derive(Default)]
struct Fields<'a> {
    device: Option<&'a str>,
    seq: Option<u64>,
    ts: Option<u64>,
    received_ms: Option<u64>,
    clock_synced: bool,
    timer: bool,
    due_ms: Option<u64>,
    now_ms: Option<u64>,
    late_ms: Option<u64>,
}

impl<'a> Fields<'a> {
    /// Reads one CBOR map with text keys; a known key with a value of the wrong type fails.
    /// Keys are compared as bytes (no UTF-8 check: an invalid one matches nothing anyway).
    fn read(cbor: &'a [u8]) -> Option<Self> {
        let mut r = Reader(cbor);
        let mut f = Fields::default();
        let len = match r.head()? {
            (MAP, Some(n)) => Some(n),
            (MAP, None) => None,
            _ => return None,
        };
        let mut i = 0;
        while len.map_or(!r.at_break(), |n| i < n) {
            i += 1;
            let key = match r.head()? {
                (TEXT, Some(n)) => r.take(usize::try_from(n).ok()?)?,
                (major, arg) => {
                    r.skip_body(major, arg, 0)?;
                    r.skip(0)?;
                    continue;
                }
            };
            match key {
                b"device" => f.device = Some(r.text_item()?),
                b"seq" => f.seq = Some(r.uint()?),
                b"ts" => f.ts = r.uint_or_null()?,
                b"received_ms" => f.received_ms = Some(r.uint()?),
                b"clock_synced" => f.clock_synced = r.bool()?,
                b"timer" => f.timer = r.bool()?,
                b"due_ms" => f.due_ms = Some(r.uint()?),
                b"now_ms" => f.now_ms = Some(r.uint()?),
                b"late_ms" => f.late_ms = Some(r.uint()?),
                _ => r.skip(0)?,
            }
        }
        if len.is_none() {
            r.take(1)?; // the break byte
        }
        Some(f)
    }
}

const UINT: u8 = 0;
const NINT: u8 = 1;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const MAP: u8 = 5;
const TAG: u8 = 6;
const SIMPLE: u8 = 7;
const FALSE: u64 = 20;
const TRUE: u64 = 21;
const NULL: u64 = 22;
/// Deepest nesting [`Reader::skip`] follows (an unknown key's value); keeps the stack small.
const MAX_DEPTH: u32 = 16;

/// A cursor over CBOR bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    /// An item's major type and argument; the argument is `None` for an indefinite length
    /// (and for the break byte, major type 7). For major type 7 it is the simple value, or the
    /// float's bits.
    fn head(&mut self) -> Option<(u8, Option<u64>)> {
        let b = self.take(1)?[0];
        let (major, info) = (b >> 5, b & 0x1f);
        let arg = match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.take(1)?[0]),
            25 => u64::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)),
            26 => u64::from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)),
            27 => u64::from_be_bytes(self.take(8)?.try_into().ok()?),
            31 if matches!(major, BYTES | TEXT | ARRAY | MAP | SIMPLE) => {
                return Some((major, None))
            }
            _ => return None,
        };
        Some((major, Some(arg)))
    }

    fn at_break(&self) -> bool {
        self.0.first() == Some(&0xff)
    }

    fn text(&mut self, len: u64) -> Option<&'a str> {
        crate::sys::utf8(self.take(usize::try_from(len).ok()?)?)
    }

    /// A definite-length text string.
    fn text_item(&mut self) -> Option<&'a str> {
        match self.head()? {
            (TEXT, Some(n)) => self.text(n),
            _ => None,
        }
    }

    fn uint(&mut self) -> Option<u64> {
        match self.head()? {
            (UINT, n) => n,
            _ => None,
        }
    }

    fn uint_or_null(&mut self) -> Option<Option<u64>> {
        match self.head()? {
            (UINT, Some(n)) => Some(Some(n)),
            (SIMPLE, Some(NULL)) => Some(None),
            _ => None,
        }
    }

    fn bool(&mut self) -> Option<bool> {
        match self.head()? {
            (SIMPLE, Some(FALSE)) => Some(false),
            (SIMPLE, Some(TRUE)) => Some(true),
            _ => None,
        }
    }

    /// Skips one whole item (a break byte is not one).
    fn skip(&mut self, depth: u32) -> Option<()> {
        let (major, arg) = self.head()?;
        self.skip_body(major, arg, depth)
    }

    /// Skips what follows the head `(major, arg)` of an item `depth` levels deep.
    fn skip_body(&mut self, major: u8, arg: Option<u64>, depth: u32) -> Option<()> {
        let depth = depth + 1;
        if depth > MAX_DEPTH {
            return None;
        }
        match (major, arg) {
            (UINT | NINT | SIMPLE, Some(_)) => {}
            (BYTES | TEXT, Some(n)) => {
                self.take(usize::try_from(n).ok()?)?;
            }
            (ARRAY, Some(n)) => {
                for _ in 0..n {
                    self.skip(depth)?;
                }
            }
            (MAP, Some(n)) => {
                for _ in 0..n.checked_mul(2)? {
                    self.skip(depth)?;
                }
            }
            (TAG, Some(_)) => self.skip(depth)?,
            (BYTES | TEXT | ARRAY | MAP, None) => {
                while !self.at_break() {
                    self.skip(depth)?;
                }
                self.take(1)?;
            }
            _ => return None,
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Meta, Timer};

    /// `{"device": "dev-1", "seq": 70000, "ts": null, "received_ms": 1700000000123,
    /// "clock_synced": true}` as ciborium encodes it (struct fields in order, shortest ints).
    const EVENT: &[u8] = &[
        0xa5, 0x66, b'd', b'e', b'v', b'i', b'c', b'e', 0x65, b'd', b'e', b'v', b'-', b'1', 0x63,
        b's', b'e', b'q', 0x1a, 0x00, 0x01, 0x11, 0x70, 0x62, b't', b's', 0xf6, 0x6b, b'r', b'e',
        b'c', b'e', b'i', b'v', b'e', b'd', b'_', b'm', b's', 0x1b, 0x00, 0x00, 0x01, 0x8b, 0xcf,
        0xe5, 0x68, 0x7b, 0x6c, b'c', b'l', b'o', b'c', b'k', b'_', b's', b'y', b'n', b'c', b'e',
        b'd', 0xf5,
    ];

    #[test]
    fn decodes_the_event_map() {
        let meta = Meta::decode(EVENT).unwrap();
        assert_eq!(
            meta,
            Meta {
                device: "dev-1".into(),
                seq: 70000,
                ts: None,
                received_ms: 1_700_000_000_123,
                clock_synced: true,
            }
        );
        assert_eq!(Timer::decode(EVENT), None);
    }

    #[test]
    fn reads_ts_and_skips_unknown_keys_of_any_shape() {
        // {"x": [1, {"y": h'00'}, -2, 1.5], "ts": 5, "device": "d", "z": tag(1, 7),
        //  "seq": 0, "received_ms": 9, "w": "indefinite"_ } with an indefinite outer map.
        let mut cbor = alloc::vec![0xbf, 0x61, b'x', 0x84, 0x01, 0xa1, 0x61, b'y', 0x41, 0x00];
        cbor.extend([0x21, 0xf9, 0x3e, 0x00, 0x62, b't', b's', 0x05]);
        cbor.extend([0x66, b'd', b'e', b'v', b'i', b'c', b'e', 0x61, b'd']);
        cbor.extend([0x61, b'z', 0xc1, 0x07, 0x63, b's', b'e', b'q', 0x00]);
        cbor.extend([
            0x6b, b'r', b'e', b'c', b'e', b'i', b'v', b'e', b'd', b'_', b'm', b's', 0x09,
        ]);
        cbor.extend([0x61, b'w', 0x7f, 0x61, b'a', 0x61, b'b', 0xff, 0xff]);
        let meta = Meta::decode(&cbor).unwrap();
        assert_eq!((meta.ts, meta.seq, meta.received_ms), (Some(5), 0, 9));
        assert_eq!(meta.device, "d");
        assert!(!meta.clock_synced);
        assert_eq!(meta.time_ms(), 5);
    }

    #[test]
    fn decodes_the_timer_map() {
        // {"timer": true, "due_ms": 60000, "now_ms": 60250, "late_ms": 250}
        let mut cbor = alloc::vec![0xa4, 0x65, b't', b'i', b'm', b'e', b'r', 0xf5];
        cbor.extend([0x66, b'd', b'u', b'e', b'_', b'm', b's', 0x19, 0xea, 0x60]);
        cbor.extend([0x66, b'n', b'o', b'w', b'_', b'm', b's', 0x19, 0xeb, 0x5a]);
        cbor.extend([0x67, b'l', b'a', b't', b'e', b'_', b'm', b's', 0x18, 0xfa]);
        let t = Timer::decode(&cbor).unwrap();
        assert_eq!(
            t,
            Timer {
                now_ms: 60250,
                due_ms: 60000,
                late_ms: 250
            }
        );
        assert_eq!(Meta::decode(&cbor), None);
    }

    #[test]
    fn rejects_what_is_not_a_well_formed_map() {
        let mut wrong_type = EVENT.to_vec();
        wrong_type[18] = 0x61; // seq: a text of length 1 instead of a uint
        for cbor in [
            &[][..],
            &[0xa0],                   // {}: tp_init
            &[0x80],                   // []
            &EVENT[..EVENT.len() - 1], // truncated
            &wrong_type,
            &[0xa1, 0x61, b'x', 0xff], // a break where a value belongs
            &[0xbf, 0x61, b'x', 0x01], // an indefinite map without its break
            &[0xa1, 0x61, b'x', 0x1c], // reserved additional info
        ] {
            assert_eq!(Meta::decode(cbor), None, "{cbor:02x?}");
            assert_eq!(Timer::decode(cbor), None, "{cbor:02x?}");
        }
        // Deep nesting under an unknown key is refused rather than followed.
        let mut deep = alloc::vec![0xa1, 0x61, b'x'];
        deep.extend([0x81; 64]);
        deep.push(0x00);
        assert_eq!(Meta::decode(&deep), None);
    }
}
