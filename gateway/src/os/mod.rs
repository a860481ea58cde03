//! What the gateway asks of the operating system: the free-space watch on the data dir
//! ([`disk`]), how files are created ([`files`]: private by default, temp files that never
//! follow a planted link), systemd's notify protocol ([`notify`]: ready, stopping, watchdog
//! pings), the watchdog's judgement of health ([`watchdog`], pure), and the process as a
//! daemon ([`process`]: no core dumps, the open-file limit, the drop to `gateway.user`).
//! (Signals live in `cli/run.rs`.)

pub mod disk;
pub mod files;
pub mod notify;
pub mod process;
pub mod watchdog;
