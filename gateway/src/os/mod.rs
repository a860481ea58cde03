//! What the gateway asks of the operating system: the free-space watch on the data dir
//! ([`disk`]), how files are created ([`files`]: private by default, temp files that never
//! follow a planted link), systemd's notify protocol ([`notify`]: ready, stopping, watchdog
//! pings) and the watchdog's judgement of health ([`watchdog`], pure). (Signals live in
//! `cli/run.rs`; rlimits and privilege dropping are the board issue's.)

pub mod disk;
pub mod files;
pub mod notify;
pub mod watchdog;
