//! The real ghmd binary as a child process, for what only a process has: signals (SIGTERM,
//! SIGHUP, kill -9), its data dir across restarts, its log and its memory. Both listeners are on
//! port 0 and the addresses are read from the start-up log, so no port is guessed or reused.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a start or an exit may take before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(60);

/// What a test wants of `ghmd serve` beyond the listeners and the JSON log.
pub struct Launch {
    data_dir: Option<PathBuf>,
    args: Vec<String>,
    rust_log: String,
    port: u16,
}

impl Launch {
    /// `--in-memory`: no data dir at all.
    pub fn in_memory() -> Self {
        Self {
            data_dir: None,
            args: Vec::new(),
            rust_log: "info".to_owned(),
            port: 0,
        }
    }

    pub fn with_data_dir(data_dir: &Path) -> Self {
        Self {
            data_dir: Some(data_dir.to_owned()),
            ..Self::in_memory()
        }
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|arg| (*arg).to_owned()));
        self
    }

    /// The gRPC port, for a restart that must come back where its clients look (a server that
    /// crashed behind its clients); 0, the default, takes a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// `RUST_LOG`; the default, info, is the least that logs the bound addresses.
    pub fn rust_log(mut self, filter: &str) -> Self {
        filter.clone_into(&mut self.rust_log);
        self
    }

    /// The command [`Launch::start`] runs, for a test that adds to it (limits set in the child)
    /// and starts it with [`Launch::start_command`].
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ghmd"));
        command
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port));
        command.args(["--metrics-listen", "127.0.0.1:0", "--log-format", "json"]);
        match &self.data_dir {
            Some(dir) => command.arg("--data-dir").arg(dir),
            None => command.arg("--in-memory"),
        };
        command
            .args(&self.args)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// Starts ghmd and waits until both listeners are up.
    pub fn start(self) -> Ghmd {
        Self::start_command(self.command())
    }

    /// Starts a [`Launch::command`] the caller has added to, and waits until both listeners
    /// are up.
    pub fn start_command(mut command: Command) -> Ghmd {
        let mut child = command.spawn().expect("spawn ghmd");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().expect("log lock").push(line.clone());
                    let _ = tx.send(line);
                }
            })
        };
        let deadline = Instant::now() + PATIENCE;
        let (mut addr, mut metrics_addr) = (None, None);
        while addr.is_none() || metrics_addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    addr = addr.or(logged_addr(&line, "ghmd serving gRPC"));
                    metrics_addr = metrics_addr.or(logged_addr(
                        &line,
                        "ghmd serving /metrics, /healthz and /readyz",
                    ));
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    panic!(
                        "ghmd did not start (exit {status:?}):\n{}",
                        log.lock().expect("log lock").join("\n")
                    );
                }
            }
        }
        Ghmd {
            child,
            addr: addr.expect("gRPC address"),
            metrics_addr: metrics_addr.expect("metrics address"),
            log,
            reader: Some(reader),
        }
    }

    /// Runs ghmd expecting it to stop by itself (a refusal to start): its status and stderr.
    pub fn run_to_exit(self) -> (ExitStatus, String) {
        let output = self.command().output().expect("run ghmd");
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

fn logged_addr(line: &str, message: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != message {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}

/// A running `ghmd serve`, killed if the test ends before it exits.
pub struct Ghmd {
    child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Ghmd {
    /// ghmd on `data_dir` with `extra` flags, the common case.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Launch::with_data_dir(data_dir).args(extra).start()
    }

    /// ghmd on `data_dir` expected to refuse to start: its status and stderr.
    pub fn run_to_exit(data_dir: &Path, extra: &[&str]) -> (ExitStatus, String) {
        Launch::with_data_dir(data_dir).args(extra).run_to_exit()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if ghmd has exited.
    pub fn has_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for ghmd")
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits until the log holds `needle` (the server acts on a signal asynchronously).
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident set size and its peak, in KiB, from /proc.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// `kill -NAME`, through the `kill` every POSIX system has, so that the tests need neither
    /// a signal crate nor an `unsafe` call.
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{name} {}", self.child.id());
    }

    /// Waits without blocking the test's runtime, whose tasks must still run to close the
    /// client connections a graceful shutdown waits for. Then reads the log to its end.
    async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for ghmd") {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ghmd did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What Kubernetes sends first: the exit status and the whole log.
    pub async fn sigterm(self) -> (ExitStatus, String) {
        self.signal("TERM");
        self.exited().await
    }

    /// Waits for an exit already under way (a signal sent earlier): its status and whole log.
    pub async fn exited(mut self) -> (ExitStatus, String) {
        let status = self.wait().await;
        (status, self.log())
    }

    /// kill -9: no snapshot at exit, no cleanup.
    pub async fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.wait().await;
    }
}

impl Drop for Ghmd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
