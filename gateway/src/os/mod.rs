//! What the gateway asks of the operating system, through `nix`: for now the free-space watch
//! on the data dir ([`disk`]). (Signals live in `cli/run.rs`; sd_notify, rlimits and privilege
//! dropping are the board issue's.)

pub mod disk;
