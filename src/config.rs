//! Every knob of `ghmd serve`: a flag, an environment variable, a default, and a line in the
//! README. The flags of the binary's other commands (`bench`, `health`) live with them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::jobs::{Quota, RegistryLimits};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

const MIB: usize = 1024 * 1024;

#[derive(Parser, Debug, Clone)]
pub struct ServeConfig {
    /// Address of the gRPC listener. Port 0 picks a free port (tests do this).
    #[arg(long, env = "GHMD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Log line format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "GHMD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Largest request message accepted, in bytes. The default takes 16,000,000 float32 norms.
    #[arg(long, env = "GHMD_MAX_RECV_MESSAGE_BYTES", default_value_t = 64 * MIB)]
    pub max_recv_message_bytes: usize,

    /// Largest response message sent, in bytes.
    #[arg(long, env = "GHMD_MAX_SEND_MESSAGE_BYTES", default_value_t = 64 * MIB)]
    pub max_send_message_bytes: usize,

    /// Batches with more elements than this are weighed on the blocking thread pool, so that
    /// they do not hold up small requests on the async runtime.
    #[arg(long, env = "GHMD_OFFLOAD_ELEMENTS", default_value_t = 1 << 16)]
    pub offload_elements: usize,

    /// The longest step_timeout a job may ask for.
    #[arg(long, env = "GHMD_MAX_STEP_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10m")]
    pub max_step_timeout: Duration,

    /// Step-synchronous jobs: how many applied steps keep their table, so that a rank that
    /// retries a step after its answer was lost gets the same answer.
    #[arg(long, env = "GHMD_KEPT_STEPS", default_value_t = 8)]
    pub kept_steps: usize,

    /// Step-synchronous jobs: how many steps may wait at once per job; more is
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "GHMD_MAX_PENDING_STEPS", default_value_t = 64)]
    pub max_pending_steps: usize,

    /// Jobs the server holds at most; CreateJob beyond is RESOURCE_EXHAUSTED. Jobs loaded from
    /// the data dir are all kept even if there are more.
    #[arg(long, env = "GHMD_MAX_JOBS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_jobs: u64,

    /// Bytes one job may hold: its fixed part (bins, kept steps, world size) and its pending
    /// steps. CreateJob past it, or a step contribution that would pass it, is
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "GHMD_MAX_JOB_BYTES", default_value_t = 256 * MIB as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_job_bytes: u64,

    /// Bytes every job together may hold (the same estimate). With the server's own baseline
    /// this keeps its memory inside the deployment's limit; see the README's Limits.
    #[arg(long, env = "GHMD_MAX_JOBS_BYTES", default_value_t = 1024 * MIB as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_jobs_bytes: u64,

    /// Jobs one caller (a token, or a peer address on an open server) may hold, unless its
    /// token sets max_jobs.
    #[arg(long, env = "GHMD_CALLER_MAX_JOBS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub caller_max_jobs: u64,

    /// Bytes one caller's jobs may hold, unless its token sets max_jobs_bytes.
    #[arg(long, env = "GHMD_CALLER_MAX_JOBS_BYTES", default_value_t = 256 * MIB as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub caller_max_jobs_bytes: u64,

    /// Jobs idle longer than this (no step, update or restore) are deleted by a background task.
    #[arg(long, env = "GHMD_JOB_TTL", value_parser = parse_positive_duration, default_value = "7d")]
    pub job_ttl: Duration,

    /// Gradient norms or residuals one request may carry; more is RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "GHMD_MAX_ELEMENTS_PER_REQUEST",
        default_value_t = 16_000_000
    )]
    pub max_elements_per_request: usize,

    /// After SIGINT/SIGTERM, how long in-flight requests may take before the server exits anyway.
    #[arg(long, env = "GHMD_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,

    /// PEM certificate chain of the server; with --tls-key, the port speaks only TLS.
    #[arg(long, env = "GHMD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "GHMD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): when set, every client must present a certificate they signed
    /// (mutual TLS).
    #[arg(long, env = "GHMD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// TOML file of bearer tokens, each with a name and the job-id prefixes it may use (see the
    /// README). Without it the server is open to anyone who reaches the port. SIGHUP rereads it.
    #[arg(long, env = "GHMD_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// RPCs served at once, server-wide (a stream counts while it is open); one more is answered
    /// RESOURCE_EXHAUSTED at once. Health checks are not counted.
    #[arg(long, env = "GHMD_MAX_CONCURRENT_REQUESTS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// RPCs one caller (a token, or a peer address on an open server) may have in flight, unless
    /// its token sets max_concurrent_requests: its share of --max-concurrent-requests.
    #[arg(long, env = "GHMD_CALLER_MAX_CONCURRENT_REQUESTS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub caller_max_concurrent_requests: u32,

    /// HTTP/2 streams one connection may have open at once.
    #[arg(long, env = "GHMD_MAX_STREAMS_PER_CONNECTION", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// gRPC connections open at once; a new one past it takes the slot of the oldest
    /// connection still in its handshake (preferring one that has sent nothing), or is closed
    /// at once if there is none. Lowered at
    /// start to the fd limit (raised to its hard limit first) less 128, so that the cap comes
    /// before EMFILE.
    #[arg(long, env = "GHMD_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A connection that has not sent the HTTP/2 client preface (or, with TLS, completed its
    /// TLS handshake) within this is closed.
    #[arg(long, env = "GHMD_HANDSHAKE_TIMEOUT", value_parser = parse_positive_duration, default_value = "10s")]
    pub handshake_timeout: Duration,

    /// How often an HTTP/2 ping is sent on every connection, so that peers that vanished are
    /// found.
    #[arg(long, env = "GHMD_HTTP2_KEEPALIVE_INTERVAL", value_parser = parse_positive_duration, default_value = "30s")]
    pub http2_keepalive_interval: Duration,

    /// A connection whose peer does not answer a ping within this is closed, and its streams
    /// with it.
    #[arg(long, env = "GHMD_HTTP2_KEEPALIVE_TIMEOUT", value_parser = parse_positive_duration, default_value = "20s")]
    pub http2_keepalive_timeout: Duration,

    /// Idle time of a TCP connection before the kernel's first keepalive probe (then every
    /// 10 s, 3 probes).
    #[arg(long, env = "GHMD_TCP_KEEPALIVE", value_parser = parse_positive_duration, default_value = "60s")]
    pub tcp_keepalive: Duration,

    /// A request stream that carries no message for this long is ended with DEADLINE_EXCEEDED
    /// and gives back its --max-concurrent-requests slot. A training loop sends every step, so
    /// it never waits this long; a unary request whose body never comes ends the same way.
    #[arg(long, env = "GHMD_STREAM_IDLE_TIMEOUT", value_parser = parse_positive_duration, default_value = "10m")]
    pub stream_idle_timeout: Duration,

    /// Health/Watch streams open at once (they need no token and are not counted in
    /// --max-concurrent-requests); one more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "GHMD_MAX_HEALTH_WATCHES", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_health_watches: u32,

    /// Snapshots failing in a row before the server reports not ready (/readyz 503,
    /// ghm.v1.Harmonizer's gRPC health NOT_SERVING), so that an orchestrator moves its traffic;
    /// the next snapshot written makes it ready again.
    #[arg(long, env = "GHMD_MAX_SNAPSHOT_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_snapshot_failures: u32,

    /// Address of the HTTP listener for /metrics, /healthz and /readyz. Port 0 picks a free port.
    #[arg(long, env = "GHMD_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,

    /// Export each job's EMA density per bin as the gauge ghmd_job_density.
    #[arg(long, env = "GHMD_JOB_METRICS")]
    pub job_metrics: bool,

    /// With --job-metrics: the most ghmd_job_density series one scrape carries. Jobs are taken
    /// in id order while their bins fit; the rest are counted in ghmd_job_density_omitted_jobs.
    #[arg(long, env = "GHMD_JOB_METRICS_MAX_SERIES", default_value_t = 1000)]
    pub job_metrics_max_series: usize,

    /// Where job specs and states are kept across restarts.
    #[arg(long, env = "GHMD_DATA_DIR", default_value = "./ghmd-data")]
    pub data_dir: PathBuf,

    /// How often the state is written to the data dir when it changed (and once more at shutdown).
    #[arg(long, env = "GHMD_SNAPSHOT_INTERVAL", value_parser = parse_positive_duration, default_value = "5s")]
    pub snapshot_interval: Duration,

    /// If the state file fails its version or checksum check, rename it aside and start empty
    /// instead of refusing to start.
    #[arg(long, env = "GHMD_DISCARD_CORRUPT_STATE")]
    pub discard_corrupt_state: bool,

    /// Keep everything in memory: no data dir is read or written.
    #[arg(long, env = "GHMD_IN_MEMORY")]
    pub in_memory: bool,

    /// Refuse job-scoped calls without the x-ghmd-job header (INVALID_ARGUMENT,
    /// JOB_HEADER_MISSING): for replicas behind a proxy that routes jobs by it. Without it a
    /// plain single server also serves clients that do not send it (grpcurl).
    #[arg(long, env = "GHMD_REQUIRE_JOB_HEADER")]
    pub require_job_header: bool,

    /// CreateJob with another run_id than the job's is RUN_ACTIVE while the job changed less
    /// than this long ago; after it the new run takes the job over, empty.
    #[arg(long, env = "GHMD_RUN_TAKEOVER_AFTER", value_parser = humantime::parse_duration, default_value = "120s")]
    pub run_takeover_after: Duration,
}

/// A zero interval would make the snapshot task spin (and a zero bench point measure nothing).
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be longer than 0".to_owned()),
        Ok(duration) => Ok(duration),
        Err(error) => Err(error.to_string()),
    }
}

impl ServeConfig {
    /// The defaults, with the environment's overrides, as `ghmd serve` with no flags would see.
    pub fn from_env() -> Self {
        Self::parse_from(["ghmd-serve"])
    }

    /// The flags' defaults, whatever the environment says: the one place they are written is
    /// the `#[arg]`s above.
    pub fn defaults() -> &'static Self {
        static DEFAULTS: OnceLock<ServeConfig> = OnceLock::new();
        DEFAULTS.get_or_init(|| {
            let command = Self::command().mut_args(|arg| arg.env(None::<&str>));
            // The defaults are constants of this file: a unit test parses them.
            command
                .try_get_matches_from(["ghmd-serve"])
                .and_then(|matches| Self::from_arg_matches(&matches))
                .unwrap_or_else(|error| error.exit())
        })
    }

    /// What the job registry takes from the flags.
    pub fn registry_limits(&self) -> RegistryLimits {
        RegistryLimits {
            offload_elements: self.offload_elements,
            kept_steps: self.kept_steps,
            max_pending_steps: self.max_pending_steps,
            max_jobs: to_usize(self.max_jobs),
            max_elements_per_request: self.max_elements_per_request,
            max_step_timeout: self.max_step_timeout,
            max_response_bytes: self.max_send_message_bytes,
            max_job_bytes: to_usize(self.max_job_bytes),
            max_jobs_bytes: to_usize(self.max_jobs_bytes),
            caller_quota: Quota {
                max_jobs: to_usize(self.caller_max_jobs),
                max_jobs_bytes: to_usize(self.caller_max_jobs_bytes),
            },
        }
    }
}

/// A limit past the address space is no limit.
fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// A registry made without a server (tests, benches, an embedding program) gets the limits of
/// `ghmd serve` with no flags.
impl Default for RegistryLimits {
    fn default() -> Self {
        ServeConfig::defaults().registry_limits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_what_serve_sees_without_flags_or_environment() {
        let defaults = ServeConfig::defaults();
        let limits = RegistryLimits::default();
        assert_eq!(limits.max_jobs as u64, defaults.max_jobs);
        assert_eq!(limits.kept_steps, defaults.kept_steps);
        // Where the test's environment sets no GHMD_* variable, `ghmd serve` sees the same.
        if !std::env::vars_os().any(|(name, _)| name.to_string_lossy().starts_with("GHMD_")) {
            let seen = ServeConfig::from_env();
            assert_eq!(format!("{seen:?}"), format!("{defaults:?}"));
        }
    }
}
