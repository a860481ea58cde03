//! Wall-clock helpers: milliseconds since the Unix epoch, and whether the clock looks set.

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
