//! What the gateway asks of the operating system, through `nix`: the free-space watch on the
//! data dir ([`disk`]) and how files are created ([`files`]: private by default, temp files
//! that never follow a planted link). (Signals live in `cli/run.rs`; sd_notify, rlimits and
//! privilege dropping are the board issue's.)

pub mod disk;
pub mod files;
