// No panic on a request path: a hostile or unlucky request must get a status, never take a
// worker thread (or the process) down. Tests may unwrap.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser;
use ghmd::config::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            ghmd::telemetry::init(config.log_format);
            let allocator = ghmd::allocator::keep_large_buffers();
            tracing::info!(?allocator, "malloc thresholds for large request buffers");
            match ghmd::server::serve(config, ghmd::server::shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("ghmd: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Health(config) => match ghmd::health::check(&config).await {
            Ok(tonic_health::ServingStatus::Serving) => {
                println!("{} {:?}: SERVING", config.addr, config.service);
                ExitCode::SUCCESS
            }
            Ok(status) => {
                println!("{} {:?}: {status}", config.addr, config.service);
                ExitCode::FAILURE
            }
            Err(error) => {
                eprintln!("ghmd health: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => match ghmd::bench::main(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ghmd bench: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
