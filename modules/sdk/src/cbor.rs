//! CBOR encoding and decoding of serde types (feature `serde`, via `minicbor-serde`), for
//! payloads and state values.
//!
//! ```
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct Stats { count: u64, sum: f64 }
//!
//! let bytes = tidepool_sdk::cbor::encode(&Stats { count: 2, sum: 43.0 })?;
//! assert_eq!(tidepool_sdk::cbor::decode::<Stats>(&bytes)?, Stats { count: 2, sum: 43.0 });
//! # Ok::<(), tidepool_sdk::Error>(())
//! ```

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::Error;

/// `bytes` decoded from CBOR into `T`, which may borrow from them; [`Error::BadArgument`] if
/// they are not CBOR of that shape (trailing bytes included).
///
/// ```
/// // [1, 2] as CBOR.
/// let v: Vec<u8> = tidepool_sdk::cbor::decode(&[0x82, 0x01, 0x02])?;
/// assert_eq!(v, [1, 2]);
/// // "hi": a text string, borrowed.
/// assert_eq!(tidepool_sdk::cbor::decode::<&str>(&[0x62, b'h', b'i'])?, "hi");
/// assert!(tidepool_sdk::cbor::decode::<u8>(&[0x61, b'x']).is_err());
/// assert!(tidepool_sdk::cbor::decode::<u8>(&[0x01, 0x02]).is_err());
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Error> {
    let mut de = minicbor_serde::Deserializer::new(bytes);
    let value = T::deserialize(&mut de).map_err(|_| Error::BadArgument)?;
    if de.decoder().position() == bytes.len() {
        Ok(value)
    } else {
        Err(Error::BadArgument)
    }
}

/// `value` encoded as CBOR: structs as maps with text keys, integers in their shortest form,
/// floats as they are typed (an `f64` takes 9 bytes); [`Error::BadArgument`] if its
/// `Serialize` impl fails.
///
/// ```
/// let bytes = tidepool_sdk::cbor::encode(&(1u8, "a"))?;
/// assert_eq!(bytes, [0x82, 0x01, 0x61, b'a']);
/// # Ok::<(), tidepool_sdk::Error>(())
/// ```
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    minicbor_serde::to_vec(value).map_err(|_| Error::BadArgument)
}
