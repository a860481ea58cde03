//! JSON payloads: a tiny allocation-free reader for one numeric field ([`number`],
//! [`number_text`], always there), and serde encoding and decoding (feature `serde`, via
//! `serde_json`). The reader is the fast path for a handler that needs one reading; decoding
//! the whole payload costs several times more fuel.
//!
//! ```
//! assert_eq!(tidepool_sdk::json::number(br#"{"v": 21.5}"#, "v"), Some(21.5));
//! ```

/// The number stored under `"key"` in a JSON payload, or `None` if there is no such key or its
/// value is not a number. [`number_text`] finds it.
///
/// ```
/// use tidepool_sdk::json::number;
/// assert_eq!(number(br#"{"v": 21.5}"#, "v"), Some(21.5));
/// assert_eq!(number(br#"{"t":1,"v":-3e2}"#, "v"), Some(-300.0));
/// assert_eq!(number(br#"{"v":"hot"}"#, "v"), None);
/// assert_eq!(number(br#"{"t":1}"#, "v"), None);
/// ```
pub fn number(payload: &[u8], key: &str) -> Option<f64> {
    number_text(payload, key)?.parse().ok()
}

/// The number stored under `"key"` in a JSON payload as it is written there (valid JSON, so
/// it can be copied into a message as is), or `None` if there is no such key or its value is
/// not a number.
///
/// It scans for the first `"key"` that is followed (after optional whitespace) by `:`, so a
/// string value equal to the key is skipped; nesting is ignored and the key must not need
/// escaping. Numbers follow JSON's grammar: `-`, digits, optional fraction and exponent.
///
/// ```
/// use tidepool_sdk::json::number_text;
/// assert_eq!(number_text(br#"{"v": 21.50, "t": 1}"#, "v"), Some("21.50"));
/// assert_eq!(number_text(br#"{"v":-1E+3}"#, "v"), Some("-1E+3"));
/// assert_eq!(number_text(br#"{"v":"21.5"}"#, "v"), None);
/// ```
pub fn number_text<'a>(payload: &'a [u8], key: &str) -> Option<&'a str> {
    let key = key.as_bytes();
    let mut rest = payload;
    while let Some(at) = find_quoted(rest, key) {
        rest = &rest[at + key.len() + 2..];
        let after = skip_ws(rest);
        if let Some(value) = after.strip_prefix(b":") {
            let value = skip_ws(value);
            let number = &value[..number_len(value)?];
            // SAFETY: `number_len` only takes ASCII bytes (digits, `-`, `+`, `.`, `e`, `E`).
            return Some(unsafe { core::str::from_utf8_unchecked(number) });
        }
    }
    None
}

/// Whether `text` is exactly one JSON number (no whitespace): the grammar [`number_text`]
/// accepts. Rust's `f64` parsing also takes `inf`, `+1` or `.5`, which JSON does not.
///
/// ```
/// use tidepool_sdk::json::is_number;
/// assert!(is_number("30") && is_number("-0.5e-3"));
/// assert!(!is_number("+30") && !is_number(".5") && !is_number("inf") && !is_number(" 1"));
/// ```
pub fn is_number(text: &str) -> bool {
    number_len(text.as_bytes()) == Some(text.len())
}

/// `bytes` decoded from JSON into `T`, which may borrow from them; [`Error::BadArgument`] if
/// they are not JSON of that shape.
///
/// ```
/// let v: Vec<f64> = tidepool_sdk::json::decode(b"[1.5, 2]")?;
/// assert_eq!(v, [1.5, 2.0]);
/// assert!(tidepool_sdk::json::decode::<f64>(b"\"x\"").is_err());
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
///
/// [`Error::BadArgument`]: crate::Error::BadArgument
#[cfg(feature = "serde")]
pub fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, crate::Error> {
    serde_json::from_slice(bytes).map_err(|_| crate::Error::BadArgument)
}

/// `value` encoded as compact JSON; [`Error::BadArgument`] if its `Serialize` impl fails (or
/// it is a map with non-string keys). Non-finite floats become `null`.
///
/// ```
/// let bytes = tidepool_sdk::json::encode(&("d1", 21.5))?;
/// assert_eq!(bytes, br#"["d1",21.5]"#);
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
///
/// [`Error::BadArgument`]: crate::Error::BadArgument
#[cfg(feature = "serde")]
pub fn encode<T: serde::Serialize + ?Sized>(
    value: &T,
) -> Result<alloc::vec::Vec<u8>, crate::Error> {
    serde_json::to_vec(value).map_err(|_| crate::Error::BadArgument)
}

/// Offset of the first `"key"` in `haystack`.
fn find_quoted(haystack: &[u8], key: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(quote) = find_quote(&haystack[from..]) {
        let at = from + quote;
        let rest = &haystack[at + 1..];
        if rest.starts_with(key) && rest.get(key.len()) == Some(&b'"') {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Offset of the first `"` in `s`. Tests eight bytes per step: a byte loop costs the
/// interpreter ~17 fuel per byte, this about a fifth of that.
fn find_quote(s: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    let mut skipped = 0;
    for chunk in s.chunks_exact(8) {
        let x = u64::from_le_bytes(chunk.try_into().ok()?) ^ (ONES * u64::from(b'"'));
        // Non-zero iff some byte of `x` is zero, i.e. some byte of `chunk` is a quote.
        if x.wrapping_sub(ONES) & !x & (ONES << 7) != 0 {
            break;
        }
        skipped += 8;
    }
    s[skipped..]
        .iter()
        .position(|&b| b == b'"')
        .map(|i| skipped + i)
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    &s[n..]
}

/// The length of the JSON number at the start of `s`, if one starts there.
fn number_len(s: &[u8]) -> Option<usize> {
    let digits = |from: usize| {
        s.get(from..)
            .map_or(0, |t| t.iter().take_while(|b| b.is_ascii_digit()).count())
    };
    let mut end = usize::from(s.first() == Some(&b'-'));
    let int = digits(end);
    if int == 0 {
        return None;
    }
    end += int;
    if s.get(end) == Some(&b'.') {
        let frac = digits(end + 1);
        if frac == 0 {
            return None;
        }
        end += 1 + frac;
    }
    if matches!(s.get(end), Some(b'e' | b'E')) {
        end += 1;
        if matches!(s.get(end), Some(b'+' | b'-')) {
            end += 1;
        }
        let exp = digits(end);
        if exp == 0 {
            return None;
        }
        end += exp;
    }
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::{find_quote, number};

    #[test]
    fn finds_quotes_like_a_byte_loop() {
        let text = br#"abcdefgh"ijklmnopqrstuvwx"yz0123456789ABCDEFGHIJKLMNOP""Q\"#;
        for start in 0..text.len() {
            for end in start..=text.len() {
                let s = &text[start..end];
                assert_eq!(
                    find_quote(s),
                    s.iter().position(|&b| b == b'"'),
                    "{start}..{end}"
                );
            }
        }
        // Bytes next to a quote (0x21, 0x23, 0xa2) must not be taken for one.
        assert_eq!(
            find_quote(&[0x21, 0x23, 0xa2, 0x21, 0x23, 0xa2, 0x21, 0x23, 0xa2, 0x22]),
            Some(9)
        );
    }

    #[test]
    fn reads_numbers() {
        assert_eq!(number(br#"{"v":0}"#, "v"), Some(0.0));
        assert_eq!(number(b"{ \"v\" \n:\t 1.25E+1 }", "v"), Some(12.5));
        assert_eq!(number(br#"{"t":1,"v":-3e2}"#, "t"), Some(1.0));
        assert_eq!(number(br#"{"name":"v","v":4}"#, "v"), Some(4.0));
        assert_eq!(number(br#"{"vv":1,"v":2}"#, "v"), Some(2.0));
        assert_eq!(number(br#"{"temp":7}"#, "temp"), Some(7.0));
    }

    #[test]
    fn rejects_non_numbers() {
        for payload in [
            &br#"{"v":}"#[..],
            br#"{"v":-}"#,
            br#"{"v":1.}"#,
            br#"{"v":.5}"#,
            br#"{"v":1e}"#,
            br#"{"v":null}"#,
            b"",
            br#"{"v""#,
        ] {
            assert_eq!(
                number(payload, "v"),
                None,
                "{}",
                core::str::from_utf8(payload).unwrap()
            );
        }
    }
}
