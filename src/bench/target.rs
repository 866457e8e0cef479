//! The server under test: one given by `--target`, or a `ghmd serve` the bench starts on a free
//! loopback port (the only kind whose memory it can read).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::BenchError;
use ghmd::client::{Credentials, MAX_MESSAGE_BYTES, Transport};
use ghmd::proto::harmonizer_client::HarmonizerClient;

pub fn harmonizer_with(channel: Channel, credentials: Credentials) -> HarmonizerClient<Transport> {
    HarmonizerClient::new(InterceptedService::new(channel, credentials))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// How long a started server may take to answer its first health check.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Jobs a started server accepts: the memory measurement creates 100,000 by default.
const MAX_JOBS: u64 = 10_000_000;

/// The flag of one caller's share of the requests in flight. The bench is one peer standing in
/// for many callers: on a server it starts, its share is the whole server's, so that an open
/// loop on a loaded machine, whose queue grows past the default share of 512 when the server
/// stalls, measures the stall instead of failing; unless `--server-arg` sets it.
const CALLER_SHARE_FLAG: &str = "--caller-max-concurrent-requests";

fn caller_share(extra_args: &[String]) -> Option<String> {
    let given = extra_args
        .iter()
        .any(|arg| arg.starts_with(CALLER_SHARE_FLAG));
    // The started server reads the same environment, so its defaults are these.
    let server_wide = extra_args
        .iter()
        .find_map(|arg| arg.strip_prefix("--max-concurrent-requests="))
        .map_or_else(
            || {
                ghmd::config::ServeConfig::from_env()
                    .max_concurrent_requests
                    .to_string()
            },
            str::to_owned,
        );
    (!given).then(|| format!("{CALLER_SHARE_FLAG}={server_wide}"))
}

/// A server to measure, and the way to reach it.
pub struct Target {
    pub uri: String,
    credentials: Credentials,
    server: Option<StartedServer>,
}

impl Target {
    /// `--target`, after checking that it is on this machine unless `allow_remote`.
    pub async fn given(
        uri: &str,
        credentials: Credentials,
        allow_remote: bool,
    ) -> Result<Self, BenchError> {
        let parsed: http::Uri = uri.parse().map_err(|e: http::uri::InvalidUri| {
            BenchError::Target(format!("--target {uri:?}: {e}"))
        })?;
        if parsed.scheme_str() != Some("http") {
            return Err(BenchError::Target(format!(
                "--target {uri:?}: only http:// targets are supported (TLS is not)"
            )));
        }
        let host = parsed
            .host()
            .ok_or_else(|| BenchError::Target(format!("--target {uri:?} has no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = parsed.port_u16().unwrap_or(80);
        if !allow_remote {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| BenchError::Target(format!("--target {uri:?}: {e}")))?
                .collect();
            if addrs.is_empty() || addrs.iter().any(|addr| !addr.ip().is_loopback()) {
                return Err(BenchError::Target(format!(
                    "--target {uri:?} is not on this machine's loopback interface; a bench is a \
                     load test, so pass --allow-remote only for a server you may load"
                )));
            }
        }
        Ok(Self {
            uri: uri.to_owned(),
            credentials,
            server: None,
        })
    }

    /// Starts `binary` (default: this very binary) as `ghmd serve` on a free loopback port, in
    /// memory, and waits until it answers health checks.
    pub async fn start(
        credentials: Credentials,
        binary: Option<&Path>,
        extra_args: &[String],
        cpus: Option<&str>,
    ) -> Result<Self, BenchError> {
        let server = StartedServer::spawn(binary, extra_args, cpus)?;
        let mut target = Self {
            uri: format!("http://{}", server.addr),
            credentials,
            server: Some(server),
        };
        target.wait_ready().await?;
        Ok(target)
    }

    pub fn started_by_bench(&self) -> bool {
        self.server.is_some()
    }

    /// The resident set of the started server, in bytes; `None` for a `--target`.
    pub fn server_rss(&self) -> Result<Option<u64>, BenchError> {
        match &self.server {
            Some(server) => resident_bytes(server.child.id()).map(Some),
            None => Ok(None),
        }
    }

    /// The CPU time (user + system) the started server has used so far; `None` for a
    /// `--target`. Its resolution is the kernel's USER_HZ, 10 ms.
    pub fn server_cpu(&self) -> Result<Option<Duration>, BenchError> {
        match &self.server {
            Some(server) => cpu_time(server.child.id()).map(Some),
            None => Ok(None),
        }
    }

    /// The time the started server's threads have spent waiting for a core so far; `None` for
    /// a `--target` or a kernel without schedstats.
    pub fn server_runqueue_wait(&self) -> Result<Option<Duration>, BenchError> {
        Ok(self
            .server
            .as_ref()
            .and_then(|server| runqueue_wait(server.child.id())))
    }

    /// A new HTTP/2 connection.
    pub async fn connect(&self) -> Result<Channel, BenchError> {
        Endpoint::from_shared(self.uri.clone())
            .map_err(|e| BenchError::Target(format!("{}: {e}", self.uri)))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| BenchError::Connect(format!("{}: {e}", self.uri)))
    }

    pub fn harmonizer(&self, channel: Channel) -> HarmonizerClient<Transport> {
        harmonizer_with(channel, self.credentials.clone())
    }

    /// The address and credentials, for a client on a runtime of its own.
    pub fn detached(&self) -> (String, Credentials) {
        (self.uri.clone(), self.credentials.clone())
    }

    pub fn health(&self, channel: Channel) -> HealthClient<Transport> {
        HealthClient::new(InterceptedService::new(channel, self.credentials.clone()))
    }

    async fn wait_ready(&mut self) -> Result<(), BenchError> {
        let start = Instant::now();
        let mut last_error = String::new();
        while start.elapsed() < READY_TIMEOUT {
            if let Some(server) = &mut self.server {
                server.check_running()?;
            }
            match self.connect().await {
                Ok(channel) => {
                    let request = HealthCheckRequest {
                        service: String::new(),
                    };
                    match self.health(channel).check(request).await {
                        Ok(_) => return Ok(()),
                        Err(status) => last_error = status.message().to_owned(),
                    }
                }
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(BenchError::Target(format!(
            "the server at {} did not answer within {READY_TIMEOUT:?}: {last_error}",
            self.uri
        )))
    }
}

/// A `ghmd serve` child process, killed when dropped.
struct StartedServer {
    child: Child,
    addr: SocketAddr,
}

impl StartedServer {
    fn spawn(
        binary: Option<&Path>,
        extra_args: &[String],
        cpus: Option<&str>,
    ) -> Result<Self, BenchError> {
        let addr = free_loopback_port()?;
        let exe = match binary {
            Some(path) => path.to_owned(),
            None => std::env::current_exe()
                .map_err(|e| BenchError::Target(format!("cannot find the ghmd binary: {e}")))?,
        };
        // taskset execs the server in its own process: the child's pid stays the server's.
        let mut command = match cpus {
            Some(cpus) => {
                let mut taskset = Command::new("taskset");
                taskset.arg("-c").arg(cpus).arg(exe);
                taskset
            }
            None => Command::new(exe),
        };
        let child = command
            .arg("serve")
            .arg(format!("--listen={addr}"))
            .arg("--metrics-listen=127.0.0.1:0")
            .arg("--in-memory")
            .arg(format!("--max-jobs={MAX_JOBS}"))
            .arg(format!("--caller-max-jobs={MAX_JOBS}"))
            .args(caller_share(extra_args))
            .args(extra_args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Target(format!("cannot start ghmd serve: {e}")))?;
        Ok(Self { child, addr })
    }

    fn check_running(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Target(format!(
                "the ghmd serve the bench started exited with {status} (its errors are above)"
            ))),
            Err(e) => Err(BenchError::Target(format!(
                "cannot watch the ghmd serve the bench started: {e}"
            ))),
        }
    }
}

impl Drop for StartedServer {
    fn drop(&mut self) {
        // In memory: nothing to flush, so no need for a graceful stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port the kernel just handed out, released for the server to bind. Another process could
/// take it in between; the readiness check would then fail loudly rather than measure it.
fn free_loopback_port() -> Result<SocketAddr, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| BenchError::Target(format!("cannot find a free port: {e}")))?;
    listener
        .local_addr()
        .map_err(|e| BenchError::Target(format!("cannot find a free port: {e}")))
}

/// VmRSS of a process, from /proc.
fn resident_bytes(pid: u32) -> Result<u64, BenchError> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .map_err(|e| BenchError::Memory(format!("cannot read {path}: {e}")))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| BenchError::Memory(format!("{path} has no VmRSS line")))
}

/// The run-queue wait of a process's live threads (the second field of each thread's
/// `schedstat`, in nanoseconds): time runnable but not running. Threads that ended are not
/// counted, so the difference of two readings is a lower bound.
pub fn runqueue_wait(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += schedstat.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// utime + stime of a process, from `/proc/<pid>/stat`, in USER_HZ ticks (100 per second on
/// every Linux architecture this runs on).
fn cpu_time(pid: u32) -> Result<Duration, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .map_err(|e| BenchError::Memory(format!("cannot read {path}: {e}")))?;
    // The command name, field 2, is in parentheses and may hold spaces: count from after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15, that is 11 and 12 after the state (field 3).
    let ticks = |index: usize| fields.get(index).and_then(|f| f.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok(Duration::from_millis((user + system) * 10)),
        _ => Err(BenchError::Memory(format!("{path} has no utime and stime"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_set_of_this_process_is_read_from_proc() {
        let rss = resident_bytes(std::process::id()).unwrap();
        // A Rust test binary has at least a megabyte resident and far less than the machine.
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
    }

    #[test]
    fn the_cpu_time_of_this_process_grows_as_it_works() {
        // Spin until the reading moves by two ticks; on a busy machine that may take a while
        // of wall time, so only a generous bound.
        let before = cpu_time(std::process::id()).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut now = before;
        while now < before + Duration::from_millis(20) && start.elapsed() < Duration::from_secs(30)
        {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            now = cpu_time(std::process::id()).unwrap();
        }
        assert!(
            now >= before + Duration::from_millis(20),
            "{before:?} -> {now:?}"
        );
    }

    #[test]
    fn the_runqueue_wait_of_this_process_is_read_from_proc() {
        let before = runqueue_wait(std::process::id()).expect("schedstat");
        let after = runqueue_wait(std::process::id()).expect("schedstat");
        // Threads may end in between (then it shrinks), but a reading is a sum of nanoseconds
        // no larger than the wall time the process has had, times its threads.
        assert!(before < Duration::from_secs(3600) && after < Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn a_target_off_loopback_needs_allow_remote() {
        let refused = Target::given("http://192.0.2.1:50051", Credentials::default(), false).await;
        assert!(
            matches!(&refused, Err(BenchError::Target(m)) if m.contains("--allow-remote")),
            "{:?}",
            refused.err()
        );
        assert!(
            Target::given("http://127.0.0.1:50051", Credentials::default(), false)
                .await
                .is_ok()
        );
        assert!(
            Target::given("http://[::1]:50051", Credentials::default(), false)
                .await
                .is_ok()
        );
        assert!(
            Target::given("https://127.0.0.1:50051", Credentials::default(), false)
                .await
                .is_err()
        );
    }
}
