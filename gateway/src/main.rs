//! The `tidepool` binary: the CLI's edge (clap, anyhow, logging set-up).

mod cli;

/// musl's own allocator serialises threads and keeps what it frees; the static board builds
/// (musl, `scripts/build.sh --board`) use mimalloc instead (cargo feature `mimalloc`, on by
/// default). glibc builds keep glibc's malloc.
#[cfg(all(target_env = "musl", feature = "mimalloc"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
