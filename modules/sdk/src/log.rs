//! Logging to the gateway's log (capped per event by the host): [`log`], [`Level`] and the
//! `error!`/`warn!`/`info!`/`debug!`/`trace!` macros.

use core::fmt;

use crate::sys;

/// Severity of a log line.
///
/// ```
/// assert_eq!(tidepool_sdk::Level::Info as i32, 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(i32)]
pub enum Level {
    /// Something failed.
    Error = tidepool_abi::level::ERROR,
    /// Something looks wrong.
    Warn = tidepool_abi::level::WARN,
    /// Routine information.
    Info = tidepool_abi::level::INFO,
    /// Detail for debugging.
    Debug = tidepool_abi::level::DEBUG,
    /// Very fine detail.
    Trace = tidepool_abi::level::TRACE,
}

/// Writes `msg` to the gateway's log at `level`.
///
/// ```no_run
/// tidepool_sdk::log(tidepool_sdk::Level::Info, "started");
/// ```
pub fn log(level: Level, msg: &str) {
    let (ptr, len) = sys::raw(msg.as_bytes());
    // SAFETY: `msg` is a live borrowed slice; the host only reads it.
    unsafe { sys::log(level as i32, ptr, len) }
}

/// Backs the logging macros: formats only when the message is not a plain literal.
#[doc(hidden)]
pub fn log_fmt(level: Level, args: fmt::Arguments<'_>) {
    match args.as_str() {
        Some(msg) => log(level, msg),
        None => log(level, &alloc::format!("{args}")),
    }
}

/// Logs a formatted message at [`Level::Error`].
///
/// ```no_run
/// tidepool_sdk::error!("config `{}` is missing", "threshold");
/// ```
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::rt::log_fmt($crate::Level::Error, ::core::format_args!($($arg)+)) };
}

/// Logs a formatted message at [`Level::Warn`].
///
/// ```no_run
/// tidepool_sdk::warn!("no field `{}` in payload", "v");
/// ```
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::rt::log_fmt($crate::Level::Warn, ::core::format_args!($($arg)+)) };
}

/// Logs a formatted message at [`Level::Info`].
///
/// ```no_run
/// tidepool_sdk::info!("alert on {}", "devices/a/temp");
/// ```
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::rt::log_fmt($crate::Level::Info, ::core::format_args!($($arg)+)) };
}

/// Logs a formatted message at [`Level::Debug`].
///
/// ```no_run
/// tidepool_sdk::debug!("payload of {} bytes", 12);
/// ```
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::rt::log_fmt($crate::Level::Debug, ::core::format_args!($($arg)+)) };
}

/// Logs a formatted message at [`Level::Trace`].
///
/// ```no_run
/// tidepool_sdk::trace!("entered {}", "on_event");
/// ```
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::rt::log_fmt($crate::Level::Trace, ::core::format_args!($($arg)+)) };
}
