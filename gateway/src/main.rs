//! The `tidepool` binary: the CLI's edge (clap, anyhow, logging set-up).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
