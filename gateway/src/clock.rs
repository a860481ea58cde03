//! Clock helpers: wall-clock milliseconds since the Unix epoch, whether the clock looks set,
//! and monotonic milliseconds (for windows an NTP step must not move).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// 2024-01-01T00:00:00Z: a clock before this has not been set (no RTC, no NTP yet).
const PLAUSIBLE_MS: u64 = 1_704_067_200_000;

/// Whether the wall clock looks synchronised.
pub fn looks_synced(now_ms: u64) -> bool {
    now_ms >= PLAUSIBLE_MS
}

/// Monotonic milliseconds since the first call in this process (never moved by the wall clock:
/// a deploy's probation window is measured with it).
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}
