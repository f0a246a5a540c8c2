//! The `tessera` binary: parse the command line, set up logging, run, map errors to an exit code.

use std::process::ExitCode;

use clap::Parser;
use tessera::cli::{Cli, Command};

// The relay allocates a few small buffers per transaction and frees them soon after, from one
// thread: mimalloc's thread-local free lists serve that pattern faster than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let command = cli.command.unwrap_or(Command::Serve { config: None });
    match tessera::run::run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            ExitCode::FAILURE
        }
    }
}
