//! weft-agent: the node binary. Parses its configuration and hands over to `app::run`.
// Unsafe code only where glibc's allocator is asked for memory back (`memory.rs`).
#![deny(unsafe_code)]

mod access_log;
mod admin;
mod app;
mod config;
mod events;
mod memory;
mod state;
mod telemetry;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = config::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match app::main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
