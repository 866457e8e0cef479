use std::process::ExitCode;

use clap::Parser;
use ghmd::config::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            ghmd::telemetry::init(config.log_format);
            match ghmd::server::serve(config, ghmd::server::shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("ghmd: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
