//! The handler's configuration: the manifest's `[config]` string map with the box's overrides.
//! Read it in `tp_init` (see [`handler!`](crate::handler)) and keep it in a
//! [`Cached`]: each read is a host call.
//!
//! ```no_run
//! let threshold = tidepool_sdk::config::get_f64("threshold").ok_or(tidepool_sdk::Error::NotFound)?;
//! # Ok::<(), tidepool_sdk::Error>(())
//! ```

use alloc::string::String;

use crate::{sys, Cached, Error};

/// The config value for `key`, or `None` if it is not set (or not UTF-8).
///
/// ```no_run
/// let field = tidepool_sdk::config::get("field");
/// let field = field.as_deref().unwrap_or("v");
/// ```
pub fn get(key: &str) -> Option<String> {
    let (key_ptr, key_len) = sys::raw(key.as_bytes());
    let bytes = sys::read_buffer(|out| {
        let (out_ptr, out_cap) = sys::raw(out);
        // SAFETY: `key` and `out` are live buffers; the host reads `key` and writes at most
        // `out_cap` bytes to `out`.
        unsafe { sys::config_get(key_ptr, key_len, out_ptr, out_cap) }
    })?;
    sys::utf8(&bytes)?;
    // SAFETY: just checked to be UTF-8.
    Some(unsafe { String::from_utf8_unchecked(bytes) })
}

/// The config value for `key` parsed as a number (surrounding whitespace allowed), or `None`
/// if it is not set or does not parse.
///
/// ```no_run
/// let threshold = tidepool_sdk::config::get_f64("threshold").unwrap_or(30.0);
/// ```
pub fn get_f64(key: &str) -> Option<f64> {
    get(key)?.trim().parse().ok()
}

/// The handler's parsed config, parsed once per instance into `cell`: `parse` gets [`get`] and
/// returns the config or a message, which is logged at error level and returned as
/// [`Error::BadArgument`]. Call it from `init` too, so that a bad config fails the load.
///
/// ```no_run
/// use tidepool_sdk::{config, Cached, Error};
///
/// struct Config { threshold: f64 }
///
/// fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
///     let text = get("threshold").ok_or_else(|| String::from("config `threshold` is required"))?;
///     let threshold = text.trim().parse().map_err(|_| String::from("`threshold` is not a number"))?;
///     Ok(Config { threshold })
/// }
///
/// static CONFIG: Cached<Config> = Cached::new();
///
/// fn init() -> Result<(), Error> {
///     config::cached(&CONFIG, parse).map(drop)
/// }
/// ```
pub fn cached<T>(
    cell: &'static Cached<T>,
    parse: impl FnOnce(fn(&str) -> Option<String>) -> Result<T, String>,
) -> Result<&'static T, Error> {
    cell.get_or_try_init(|| {
        parse(get).map_err(|msg| {
            crate::error!("{}", msg);
            Error::BadArgument
        })
    })
}
