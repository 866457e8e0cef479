//! The `ghmd` binary: `serve` runs the library's server; `bench` and `health` are this binary's
//! own commands (the load generator and the container probe), kept out of the library.

// No panic on a request path: a hostile or unlucky request must get a status, never take a
// worker thread (or the process) down. Tests may unwrap.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod bench;
mod health_check;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ghmd::config::ServeConfig;

#[derive(Parser, Debug)]
#[command(
    name = "ghmd",
    version,
    about = "Gradient Harmonizing Mechanism weights as a gRPC service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the serve variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gRPC server.
    Serve(ServeConfig),
    /// Ask a ghmd's gRPC health service whether it serves; exit 0 if it does, 1 if not. For
    /// container HEALTHCHECKs and exec probes, so that the image needs no other binary.
    Health(health_check::HealthCheckArgs),
    /// Measure a ghmd (the given --target, or one started on a free loopback port) against
    /// baselines measured in the same run: see BENCHMARKS.md.
    Bench(bench::BenchArgs),
}

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
        Command::Health(args) => health_check::main(args).await,
        Command::Bench(args) => match bench::main(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ghmd bench: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
