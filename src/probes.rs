//! The plain-HTTP listener beside gRPC: `/metrics` for Prometheus, `/healthz` (the process
//! answers) and `/readyz` (state loaded and gRPC serving; not while shutting down, nor while
//! snapshots keep failing), for whatever cannot speak gRPC health checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::{Exposition, Format};
use crate::transport::{Conn, ConnectionLimits, Handshake};

/// The metrics listener's bounds: scrapers and probes need a handful of connections, and none
/// of them may use up the descriptors the gRPC port needs (its `--max-connections` leaves 128
/// for everything else). A connection must send its request head within 10 s, and one that
/// sends nothing for 60 s after it (an idle keep-alive) is closed: a scraper reconnects.
const METRICS_LIMITS: ConnectionLimits = ConnectionLimits {
    max_connections: 64,
    handshake: Handshake::Http1RequestHead,
    handshake_timeout: Duration::from_secs(10),
    tcp_keepalive: None,
    read_idle_timeout: Some(Duration::from_secs(60)),
};

/// Whether the server is ready for traffic: set once the state is loaded and gRPC serves,
/// cleared as soon as a shutdown begins so that load balancers stop sending first, and while
/// the snapshots fail (a server that cannot save what it acknowledges should be moved).
#[derive(Clone, Debug)]
pub struct Readiness(Arc<ReadinessState>);

#[derive(Debug)]
struct ReadinessState {
    serving: AtomicBool,
    /// Why the snapshots make the server not ready, if they do.
    snapshot_failure: Mutex<Option<String>>,
    /// Whether the server is ready, for the gRPC health service to follow.
    ready: watch::Sender<bool>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(ReadinessState {
            serving: AtomicBool::new(false),
            snapshot_failure: Mutex::new(None),
            ready: watch::Sender::new(false),
        }))
    }
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.serving.store(ready, Ordering::SeqCst);
        self.publish();
    }

    /// `Some(why)` makes the server not ready until it is called with `None`.
    pub fn set_snapshot_failure(&self, why: Option<String>) {
        *self.0.snapshot_failure.lock() = why;
        self.publish();
    }

    pub fn is_ready(&self) -> bool {
        self.0.serving.load(Ordering::SeqCst) && self.snapshot_failure().is_none()
    }

    /// Why the snapshots make the server not ready, if they do.
    pub fn snapshot_failure(&self) -> Option<String> {
        self.0.snapshot_failure.lock().clone()
    }

    fn publish(&self) {
        let ready = self.is_ready();
        self.0.ready.send_if_modified(|current| {
            let changed = *current != ready;
            *current = ready;
            changed
        });
    }
}

/// Keeps the gRPC health status of `S` equal to `readiness` from its next change on, so that a
/// gRPC readiness probe and /readyz never disagree. The whole server ("") stays SERVING: it is
/// what liveness probes ask, and a restart would lose the very steps a failing disk has not
/// saved. Runs until `readiness` is dropped.
pub async fn mirror_readiness<S: NamedService>(readiness: Readiness, reporter: HealthReporter) {
    let mut ready = readiness.0.ready.subscribe();
    drop(readiness);
    while ready.changed().await.is_ok() {
        let status = if *ready.borrow_and_update() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status(S::NAME, status).await;
    }
}

#[derive(Clone)]
struct HttpState {
    exposition: Exposition,
    readiness: Readiness,
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    exposition: Exposition,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            exposition,
            readiness,
        });
    let local_addr = listener.local_addr()?;
    let bounded = BoundedListener {
        incoming: crate::transport::incoming_with(listener, METRICS_LIMITS, None),
        local_addr,
    };
    axum::serve(bounded, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The metrics port's connections, through the same accept loop as the gRPC port's.
struct BoundedListener {
    incoming: ReceiverStream<std::io::Result<Conn>>,
    local_addr: SocketAddr,
}

impl axum::serve::Listener for BoundedListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.remote_addr().unwrap_or(self.local_addr);
                    return (conn, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop only ends when this stream is dropped.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

async fn metrics(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = Format::negotiate(accept);
    match state.exposition.encode(format) {
        Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot encode the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            )
                .into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    if state.readiness.is_ready() {
        return (StatusCode::OK, "ready\n".to_owned());
    }
    let body = match state.readiness.snapshot_failure() {
        Some(why) => format!("not ready: {why}\n"),
        None => "not ready\n".to_owned(),
    };
    (StatusCode::SERVICE_UNAVAILABLE, body)
}
