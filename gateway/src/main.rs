//! The `tidepool` binary: the CLI's edge (clap, anyhow, logging set-up).

mod cli;

/// With the cargo feature `mimalloc`, a musl build (`scripts/build.sh --board NAME --features
/// mimalloc`) allocates with mimalloc: about twice musl's throughput under load, at five times
/// its idle RSS (docs/performance.md), so the board builds keep musl's own by default.
#[cfg(all(target_env = "musl", feature = "mimalloc"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
