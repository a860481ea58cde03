//! systemd's notify protocol, through `sd-notify` (a datagram to `$NOTIFY_SOCKET`: no
//! subprocess, no libsystemd, nothing at all when the variable is unset, as outside systemd):
//! `READY=1` once the store is open and the port bound, `STATUS=`, `WATCHDOG=1` every quarter
//! of `$WATCHDOG_USEC` while [`super::watchdog`] finds the gateway healthy, `STOPPING=1` when it
//! starts to stop. A failed send is logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(what: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, what) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// The gateway is ready (the store open, the port bound); `status` says where it listens.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The gateway has begun to stop.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// One watchdog ping.
pub fn ping() {
    send(&[NotifyState::Watchdog]);
}

/// A status line (`systemctl status` shows it).
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// The watchdog's period, when systemd asks for one: `$WATCHDOG_USEC`, for this process
/// (`$WATCHDOG_PID`, when set, must be ours, as libsystemd's `sd_watchdog_enabled` reads it).
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}
