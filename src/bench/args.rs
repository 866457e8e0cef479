//! The flags of `ghmd bench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Parser, ValueEnum};
use ghmd::config::parse_positive_duration;

/// A measurement of `ghmd bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchMode {
    /// 1M-element requests on 1 and 4 connections, against a TCP echo of the same bytes.
    Raw,
    /// Histogram requests at rising concurrency, against the gRPC health check.
    Small,
    /// Rounds of step-synchronous jobs of 2, 4 and 8 ranks.
    Steps,
    /// Resident memory per idle job (only on a server the bench starts).
    Jobs,
    /// One full step of thousands of ranks (--wide-world-sizes), and another job's latency
    /// meanwhile; not among the defaults (a minute of load at W = 65,536).
    WideSteps,
    /// The small mode with Seesaw's and EQLv2's steps at C = 1203 (LVIS), against the health
    /// check; not among the defaults.
    SmallMethods,
    /// Resident memory per idle Seesaw and EQLv2 job at C = 1203 (only on servers the bench
    /// starts); not among the defaults.
    JobsMethods,
    /// A training step's time with EQLv2's round trip awaited after a simulated forward pass,
    /// and with it in flight during the next one; not among the defaults.
    Eqlv2Overlap,
}

#[derive(Parser, Debug, Clone)]
pub struct BenchArgs {
    /// The server to measure, e.g. http://127.0.0.1:50051. Without it the bench starts
    /// `ghmd serve --in-memory` on a free loopback port, and stops it at the end.
    #[arg(long, env = "GHMD_BENCH_TARGET")]
    pub target: Option<String>,

    /// The measurements to run, comma-separated.
    #[arg(long = "mode", value_enum, value_delimiter = ',', default_values_t = [BenchMode::Raw, BenchMode::Small, BenchMode::Steps, BenchMode::Jobs])]
    pub modes: Vec<BenchMode>,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Bearer token, for a server started with --tokens-file.
    #[arg(long, env = "GHMD_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// How long each measured point runs.
    #[arg(long, value_parser = parse_positive_duration, default_value = "2s")]
    pub duration: Duration,

    /// Gradient norms per raw request.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    pub raw_elements: usize,

    /// The highest concurrency the small mode climbs to.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096).map(|n| n as usize))]
    pub max_concurrency: usize,

    /// Jobs the memory measurement creates.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000).map(|n| n as usize))]
    pub jobs: usize,

    /// Jobs of each method the jobs-methods measurement creates.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize))]
    pub method_jobs: usize,

    /// The simulated forward pass of the eqlv2-overlap mode (a thread spinning that long).
    #[arg(long, value_parser = parse_positive_duration, default_value = "10ms")]
    pub forward: Duration,

    /// The world sizes of the wide-steps mode, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = super::wide::WORLD_SIZES, value_parser = clap::value_parser!(u32).range(2..=65536))]
    pub wide_world_sizes: Vec<u32>,

    /// Allow a --target that is not on this machine's loopback interface. The bench is a load
    /// test: point it only at a server you may load.
    #[arg(long)]
    pub allow_remote: bool,

    /// An argument added to the `ghmd serve` the bench starts, e.g.
    /// --server-arg=--offload-elements=0; repeatable.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,

    /// The CPUs the started server may run on (`taskset -c` syntax, e.g. `1`). With the bench
    /// itself under `taskset -c 0`, client and server each get a core of their own, and the
    /// figures are the server's rather than the two's contention.
    #[arg(long)]
    pub server_cpus: Option<String>,

    /// The ghmd binary the bench starts when there is no --target; default: this one.
    #[arg(long)]
    pub server_binary: Option<PathBuf>,
}
