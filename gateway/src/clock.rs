//! Clock helpers: wall-clock milliseconds since the Unix epoch, whether the clock looks set,
//! monotonic milliseconds (for windows an NTP step must not move), and the [`Floor`]: the
//! time certificates are checked at on a board whose clock may read 1970 or 2099.

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

/// When this binary was built (Unix seconds; `SOURCE_DATE_EPOCH` when the build sets it): no
/// certificate is checked at an earlier time.
pub const BUILD_S: u64 = match u64::from_str_radix(env!("TIDEPOOL_BUILD_UNIX"), 10) {
    Ok(s) => s,
    Err(_) => 0,
};

/// How far the floor must have moved before it is written again: rarely (SD cards wear).
pub const FLOOR_WRITE_EVERY_S: u64 = 3600;

/// A lower bound on the true time that a wrong wall clock cannot move: the larger of the
/// last floor the store kept and [`BUILD_S`], plus the monotonic time elapsed since this
/// process started. Boards without a real-time clock boot at 1970 until NTP answers; rustls
/// checks certificates at [`Floor::trusted_s`] (the wall clock, never less than the floor) so
/// that devices are not locked out at boot. The floor itself only ever advances by monotonic
/// time, never by the wall clock: a forged NTP step to 2099 is used while it lasts (as the
/// wall clock is), but is never written down, so fixing the clock undoes it. Pure: time comes
/// in as arguments.
#[derive(Debug, Clone)]
pub struct Floor {
    base_s: u64,
    base_mono_ms: u64,
    persisted_s: u64,
}

impl Floor {
    /// `persisted`: the floor the store kept, if any; `mono_ms`: monotonic time now.
    pub fn new(persisted: Option<u64>, build_s: u64, mono_ms: u64) -> Floor {
        let persisted_s = persisted.unwrap_or(0);
        Floor {
            base_s: persisted_s.max(build_s),
            base_mono_ms: mono_ms,
            persisted_s,
        }
    }

    /// The floor now (Unix seconds).
    pub fn floor_s(&self, mono_ms: u64) -> u64 {
        self.base_s + mono_ms.saturating_sub(self.base_mono_ms) / 1000
    }

    /// The time certificates are checked at: the wall clock, never before the floor.
    pub fn trusted_s(&self, wall_s: u64, mono_ms: u64) -> u64 {
        wall_s.max(self.floor_s(mono_ms))
    }

    /// Whether the wall clock is at or past the floor (a wall clock behind it was never set,
    /// or was set back).
    pub fn wall_clock_plausible(&self, wall_s: u64, mono_ms: u64) -> bool {
        wall_s >= self.floor_s(mono_ms)
    }

    /// The floor to write now, if it has moved [`FLOOR_WRITE_EVERY_S`] since the last write
    /// (`force`: any move at all, at shutdown).
    pub fn due(&self, mono_ms: u64, force: bool) -> Option<u64> {
        let f = self.floor_s(mono_ms);
        let step = if force { 1 } else { FLOOR_WRITE_EVERY_S };
        (f >= self.persisted_s.saturating_add(step)).then_some(f)
    }

    /// Records that `floor_s` is durable.
    pub fn persisted(&mut self, floor_s: u64) {
        self.persisted_s = self.persisted_s.max(floor_s);
    }
}

/// The gateway's one floor, shared by the TLS checks, the committer that writes it and the
/// status. A std mutex: each section is a few arithmetic operations.
#[derive(Debug, Clone)]
pub struct SharedFloor(std::sync::Arc<std::sync::Mutex<Floor>>);

impl SharedFloor {
    pub fn new(floor: Floor) -> SharedFloor {
        SharedFloor(std::sync::Arc::new(std::sync::Mutex::new(floor)))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Floor) -> T) -> T {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// [`Floor::trusted_s`] now.
    pub fn trusted_s(&self) -> u64 {
        self.with(|f| f.trusted_s(now_ms() / 1000, mono_ms()))
    }

    /// [`Floor::wall_clock_plausible`] now.
    pub fn wall_clock_plausible(&self) -> bool {
        self.with(|f| f.wall_clock_plausible(now_ms() / 1000, mono_ms()))
    }

    /// [`Floor::floor_s`] now.
    pub fn floor_s(&self) -> u64 {
        self.with(|f| f.floor_s(mono_ms()))
    }

    /// [`Floor::due`] now.
    pub fn due(&self, force: bool) -> Option<u64> {
        self.with(|f| f.due(mono_ms(), force))
    }

    /// [`Floor::persisted`].
    pub fn persisted(&self, floor_s: u64) {
        self.with(|f| f.persisted(floor_s))
    }
}

/// The floor of the running gateway (`None`: no gateway in this process, the wall clock).
static FLOOR: std::sync::Mutex<Option<SharedFloor>> = std::sync::Mutex::new(None);

/// Makes `floor` the process's floor (the gateway, at start).
pub fn install_floor(floor: SharedFloor) {
    *FLOOR.lock().unwrap_or_else(|p| p.into_inner()) = Some(floor);
}

/// The installed floor, if any.
pub fn floor() -> Option<SharedFloor> {
    FLOOR.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The time certificates are checked at (Unix seconds): [`Floor::trusted_s`] when a gateway
/// installed its floor, else the wall clock.
pub fn trusted_now_s() -> u64 {
    match floor() {
        Some(f) => f.trusted_s(),
        None => now_ms() / 1000,
    }
}

/// Milliseconds since the system booted (`CLOCK_BOOTTIME`: counts suspend, is not moved by
/// the wall clock, and goes on across a gateway restart within the boot); 0 if unreadable.
pub fn boot_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`, new at every boot; empty if unreadable:
/// then no stamp of this boot is ever re-stamped, as if from another boot).
pub fn boot_id() -> std::sync::Arc<str> {
    static ID: std::sync::OnceLock<std::sync::Arc<str>> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
            .into()
    })
    .clone()
}

/// When the gateway took something in: its wall clock, and, only when that clock was not set
/// then ([`Stamp::set`]), the time since boot, from which the wall time is computed again once
/// the clock is set (the outbox's re-stamp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub wall_ms: u64,
    /// `Some(ms since boot)` when the wall clock was not set at `wall_ms`.
    pub boot_ms: Option<u64>,
}

impl Stamp {
    /// A stamp taken with the clock set (tests, the simulator, the sandbox benchmark).
    pub fn set(wall_ms: u64) -> Stamp {
        Stamp {
            wall_ms,
            boot_ms: None,
        }
    }
}

/// Whether the wall clock is set: it reads 2024 or later ([`looks_synced`]) and is not behind
/// the floor. A clock restored at boot from a saved time (systemd-timesyncd's clock file,
/// fake-hwclock) counts as set: it is off by the time the box was off at most. The kernel's own
/// NTP status (`adjtimex`) is not asked: containers and VMs report it unsynchronised while their
/// clock is right.
pub fn is_set(wall_ms: u64) -> bool {
    looks_synced(wall_ms) && floor().is_none_or(|f| wall_ms / 1000 >= f.floor_s())
}

/// What rustls checks certificates at (the devices' and operators' at the ingress, the cloud's
/// and the upstream's at the uplink; the NATS sink's TLS is its own): [`trusted_now_s`], the
/// clock floor's time once the gateway installed it, so a board that boots at 1970 still
/// takes its devices and reaches its cloud. In a CLI process (`send`, `deploy --gateway`),
/// which installs no floor, it is the wall clock.
#[derive(Debug)]
pub struct FloorTime;

impl rustls::time_provider::TimeProvider for FloorTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            std::time::Duration::from_secs(trusted_now_s()),
        ))
    }
}

/// The stamp for now.
pub fn stamp() -> Stamp {
    let wall_ms = now_ms();
    Stamp {
        wall_ms,
        boot_ms: (!is_set(wall_ms)).then(boot_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_clock_at_1970_is_checked_at_the_floor_and_the_floor_moves_with_monotonic_time() {
        let f = Floor::new(Some(NOW), NOW - 1000, 5_000);
        assert_eq!(f.trusted_s(86_400, 5_000), NOW);
        assert!(!f.wall_clock_plausible(86_400, 5_000));
        assert_eq!(f.trusted_s(86_400, 65_000), NOW + 60);
        // A right clock ahead of the floor is used as it is.
        assert_eq!(f.trusted_s(NOW + 10_000, 65_000), NOW + 10_000);
        assert!(f.wall_clock_plausible(NOW + 10_000, 65_000));
        // Nothing kept yet: the build time.
        assert_eq!(Floor::new(None, NOW, 0).trusted_s(0, 0), NOW);
    }

    #[test]
    fn a_wall_clock_jump_to_2099_is_never_written_down() {
        let year_2099 = 4_070_908_800;
        let mut f = Floor::new(Some(NOW), 0, 0);
        // Used while it lasts, as the wall clock is…
        assert_eq!(f.trusted_s(year_2099, 1_000), year_2099);
        // …but the floor advances only by the monotonic time elapsed: two hours.
        let two_hours = 2 * 3600 * 1000;
        assert_eq!(f.due(two_hours, false), Some(NOW + 7200));
        f.persisted(NOW + 7200);
        assert_eq!(f.due(two_hours + 1000, false), None, "written rarely");
        assert_eq!(
            f.due(two_hours + 1000, true),
            Some(NOW + 7201),
            "any move at shutdown"
        );
        let restarted = Floor::new(Some(NOW + 7201), 0, 0);
        assert_eq!(restarted.trusted_s(NOW + 7300, 0), NOW + 7300);
    }

    #[test]
    fn the_floor_is_written_only_after_it_moved_an_hour() {
        let f = Floor::new(Some(NOW), 0, 0);
        assert_eq!(f.due(3_599_999, false), None);
        assert_eq!(f.due(3_600_000, false), Some(NOW + 3600));
        assert_eq!(f.due(0, true), None, "no move, no write, even at shutdown");
    }
}
