//! The gRPC listener's accept loop, in place of tonic's plain `TcpIncoming`, so that no client
//! can hold the server's sockets or spin its accept loop:
//!
//! - at most `--max-connections` connections are open at once (clamped below the process's fd
//!   limit, so that the data dir and the metrics listener always have descriptors left);
//! - a connection must send the start of its handshake (the HTTP/2 client preface, or a TLS
//!   ClientHello's first bytes) within `--handshake-timeout`, or it is closed;
//! - when every slot is taken, a new connection evicts the oldest one still waiting for its
//!   handshake that has sent nothing (or else the oldest), so that silent sockets can never
//!   lock out a client that speaks at once; if
//!   every connection has completed its handshake, the new one is closed at once (the client
//!   sees a reset, not a hang);
//! - accept errors that mean "out of descriptors or memory" (EMFILE, ENFILE, ENOBUFS, ENOMEM)
//!   back off from 5 ms up to 1 s instead of retrying at once, and are logged at most once per
//!   10 s and counted in `ghmd_accept_errors_total`;
//! - the metrics listener (`src/http.rs`) gets the same bounds with smaller numbers, so that
//!   silent sockets on it cannot use up the descriptors the gRPC port needs;
//! - accepted sockets get TCP_NODELAY (a response written in two frames would otherwise wait
//!   40 ms for the client's delayed ACK) and TCP keepalive (so that the kernel reaps peers that
//!   vanished without a FIN even when HTTP/2 pings are off).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::ServeConfig;
use crate::metrics::Metrics;

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Descriptors kept back from `--max-connections` for everything else the process opens: the
/// listeners, the runtime's epoll and signal pipes, the data dir's lock, state and temp files,
/// and the metrics listener's connections.
pub const RESERVED_FDS: u64 = 128;

/// The fewest connections a clamp to the fd limit leaves, so that a tiny limit still serves.
const MIN_CONNECTIONS: usize = 16;

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long a new connection waits for an evicted one to give its slot back before it is
/// closed instead; the evicted connection's task only has to wake up and drop its socket.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// Longest HTTP/1 request head waited for; a longer one is handed to hyper, which refuses it.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// What a connection must send within the handshake timeout before it is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The 24-byte HTTP/2 client preface (plaintext gRPC).
    Http2Preface,
    /// A TLS ClientHello's first byte: tonic's TLS acceptor times the rest of the TLS
    /// handshake by the same timeout.
    TlsHello,
    /// An HTTP/1 request head, up to its blank line (the metrics listener's GETs).
    Http1RequestHead,
}

/// The limits of one listener.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake: Handshake,
    pub handshake_timeout: Duration,
    /// Idle time before the kernel's first keepalive probe; `None` leaves keepalive off.
    pub tcp_keepalive: Option<Duration>,
    /// A served connection from which nothing arrives for this long is closed (for HTTP/1,
    /// which has no pings); `None` leaves that to the protocol.
    pub read_idle_timeout: Option<Duration>,
}

impl ConnectionLimits {
    /// The limits the flags ask for, with `--max-connections` fitted to the fd limit (raised to
    /// its hard limit first).
    pub fn from_config(config: &ServeConfig) -> Self {
        let requested = usize::try_from(config.max_connections).unwrap_or(usize::MAX);
        let fd_limit = raise_fd_limit();
        let max_connections = fit_to_fd_limit(requested, fd_limit);
        if max_connections < requested {
            tracing::warn!(
                requested,
                max_connections,
                fd_limit,
                "--max-connections lowered to fit the fd limit (ulimit -n) less {RESERVED_FDS}"
            );
        }
        Self {
            max_connections,
            handshake: if config.tls_cert.is_some() {
                Handshake::TlsHello
            } else {
                Handshake::Http2Preface
            },
            handshake_timeout: config.handshake_timeout,
            tcp_keepalive: Some(config.tcp_keepalive),
            // HTTP/2 pings (--http2-keepalive-*) find dead peers.
            read_idle_timeout: None,
        }
    }
}

/// An accepted connection that has begun its handshake: the bytes read while waiting for it
/// are served again before the socket's own, and its slot is returned when it is dropped.
pub struct Conn {
    stream: TcpStream,
    prefix: Vec<u8>,
    consumed: usize,
    info: TcpConnectInfo,
    read_idle_timeout: Option<Duration>,
    /// Armed when a read finds nothing, cleared when bytes arrive.
    read_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: Slot,
}

impl Conn {
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.info.remote_addr
    }
}

/// One of `--max-connections`, held for a connection's lifetime.
struct Slot {
    _permit: OwnedSemaphorePermit,
    /// `None` on the metrics listener, whose connections are not the gRPC port's series.
    metrics: Option<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(metrics) = &self.metrics {
            metrics.connection_closed();
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    /// The same info as tonic's own TCP incoming, so that `Request::remote_addr` still works.
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.consumed < this.prefix.len() {
            let rest = &this.prefix[this.consumed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.consumed += n;
            if this.consumed == this.prefix.len() {
                this.prefix = Vec::new();
                this.consumed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        if let Poll::Ready(result) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            if buf.filled().len() > before {
                this.read_deadline = None;
            }
            return Poll::Ready(result);
        }
        if let Some(idle) = this.read_idle_timeout {
            let deadline = this
                .read_deadline
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing received for {idle:?}"),
                )));
            }
        }
        Poll::Pending
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The connections still waiting for their handshake, oldest first, each with its socket (to
/// see whether it has sent anything) and the signal that evicts it.
#[derive(Default)]
struct Handshaking {
    next_id: u64,
    waiting: BTreeMap<u64, Waiting>,
}

struct Waiting {
    stream: Arc<TcpStream>,
    evict: Arc<Notify>,
}

/// How many of the oldest handshaking connections an eviction looks at for a silent one.
const EVICTION_SCAN: usize = 64;

impl Handshaking {
    fn register(&mut self, stream: Arc<TcpStream>) -> (u64, Arc<Notify>) {
        let id = self.next_id;
        self.next_id += 1;
        let evict = Arc::new(Notify::new());
        self.waiting.insert(
            id,
            Waiting {
                stream,
                evict: Arc::clone(&evict),
            },
        );
        (id, evict)
    }

    /// Closes the oldest connection that has sent nothing yet, so that a client whose preface
    /// is already in the socket buffer (the server has not read it yet) is not the one to go
    /// under a flood of new connections; if every one looked at has sent something, the
    /// oldest goes.
    fn evict_one(&mut self) -> bool {
        let silent = self
            .waiting
            .iter()
            .take(EVICTION_SCAN)
            .find(|(_, waiting)| !has_sent_anything(&waiting.stream))
            .map(|(id, _)| *id);
        let victim = silent.or_else(|| self.waiting.keys().next().copied());
        match victim.and_then(|id| self.waiting.remove(&id)) {
            Some(waiting) => {
                waiting.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Whether bytes (or an EOF) wait in the socket's receive buffer, without taking them.
fn has_sent_anything(stream: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking: an empty buffer is WouldBlock, not a wait.
    match socket2::SockRef::from(stream).peek(&mut byte) {
        Ok(n) => n > 0,
        Err(_) => false,
    }
}

/// `requested`, lowered to what the fd limit leaves after [`RESERVED_FDS`], so that the cap
/// is reached before EMFILE is.
pub fn fit_to_fd_limit(requested: usize, fd_limit: Option<u64>) -> usize {
    match fd_limit {
        Some(limit) => {
            let room = usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
            requested.min(room.max(MIN_CONNECTIONS))
        }
        None => requested,
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one (as Go's runtime and nginx do), since the
/// soft default (often 1024) is a historical limit for select(2), which ghmd does not use.
/// Returns the soft limit in force afterwards.
#[cfg(unix)]
pub fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(not(unix))]
pub fn raise_fd_limit() -> Option<u64> {
    None
}

/// Accepts on `listener` under `limits`; the stream yields connections that have begun their
/// handshake. Dropping the stream (tonic does at shutdown) stops the accept loop and closes the
/// listening socket.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Metrics,
) -> ReceiverStream<io::Result<Conn>> {
    incoming_with(listener, limits, Some(metrics))
}

/// [`incoming`], counted in `metrics` if given.
pub fn incoming_with(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Option<Metrics>,
) -> ReceiverStream<io::Result<Conn>> {
    let (ready, stream) = mpsc::channel(1024);
    tokio::spawn(accept_loop(listener, limits, metrics, ready));
    ReceiverStream::new(stream)
}

/// Logs and counts the accept errors of exhaustion, once per interval, and sleeps a growing
/// delay after each one.
struct AcceptBackoff {
    delay: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    fn new() -> Self {
        Self {
            delay: FIRST_BACKOFF,
            last_log: None,
            unlogged: 0,
        }
    }

    fn succeeded(&mut self) {
        self.delay = FIRST_BACKOFF;
    }

    async fn failed(&mut self, error: &io::Error, metrics: Option<&Metrics>) {
        if let Some(metrics) = metrics {
            metrics.accept_error();
        }
        self.unlogged += 1;
        if self
            .last_log
            .is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL)
        {
            tracing::error!(
                %error,
                errors = self.unlogged,
                backoff = ?self.delay,
                "cannot accept connections (out of file descriptors or memory?); backing off. \
                 Raise the fd limit (ulimit -n) or lower --max-connections"
            );
            self.last_log = Some(Instant::now());
            self.unlogged = 0;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
    }
}

/// An error of one connection (it was reset before we took it), after which the next accept
/// can succeed at once.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || error.raw_os_error() == Some(libc::EPROTO)
}

async fn accept_loop(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Option<Metrics>,
    ready: mpsc::Sender<io::Result<Conn>>,
) {
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let handshaking = Arc::new(Mutex::new(Handshaking::default()));
    let mut backoff = AcceptBackoff::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = ready.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                backoff.failed(&error, metrics.as_ref()).await;
                continue;
            }
        };
        let Some(permit) = take_slot(&slots, &handshaking).await else {
            if let Some(metrics) = &metrics {
                metrics.connection_refused("at_limit");
            }
            tracing::debug!(%peer, limit = limits.max_connections, "connection closed: at --max-connections");
            drop(stream);
            continue;
        };
        configure(&stream, &limits);
        if let Some(metrics) = &metrics {
            metrics.connection_opened();
        }
        let slot = Slot {
            _permit: permit,
            metrics: metrics.clone(),
        };
        let stream = Arc::new(stream);
        let (id, evict) = handshaking.lock().register(Arc::clone(&stream));
        tokio::spawn(await_handshake(
            stream,
            peer,
            slot,
            limits.clone(),
            evict,
            id,
            Arc::clone(&handshaking),
            ready.clone(),
        ));
    }
}

/// A free slot, or the slot of the oldest connection still in its handshake.
async fn take_slot(
    slots: &Arc<Semaphore>,
    handshaking: &Mutex<Handshaking>,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = Arc::clone(slots).try_acquire_owned() {
        return Some(permit);
    }
    if !handshaking.lock().evict_one() {
        return None;
    }
    tokio::time::timeout(EVICTION_WAIT, Arc::clone(slots).acquire_owned())
        .await
        .ok()?
        .ok()
}

fn configure(stream: &TcpStream, limits: &ConnectionLimits) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    if let Some(idle) = limits.tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle.min(Duration::from_secs(10)));
        #[cfg(any(target_os = "linux", target_os = "macos"))]
        let keepalive = keepalive.with_retries(3);
        if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(%error, "cannot set TCP keepalive");
        }
    }
}

/// Reads the first bytes of the handshake within the timeout, then hands the connection to
/// tonic; a connection that stays silent, or is evicted, is closed here, before hyper or TLS
/// spend anything on it.
#[allow(clippy::too_many_arguments)]
async fn await_handshake(
    stream: Arc<TcpStream>,
    peer: SocketAddr,
    slot: Slot,
    limits: ConnectionLimits,
    evict: Arc<Notify>,
    id: u64,
    handshaking: Arc<Mutex<Handshaking>>,
    ready: mpsc::Sender<io::Result<Conn>>,
) {
    let wanted = match limits.handshake {
        Handshake::Http2Preface => HTTP2_PREFACE.len(),
        Handshake::TlsHello => 1,
        Handshake::Http1RequestHead => MAX_REQUEST_HEAD,
    };
    let mut prefix = vec![0u8; wanted];
    let mut filled = 0;
    let read = async {
        while filled < wanted {
            let before = filled;
            if stream.readable().await.is_err() {
                return false;
            }
            match stream.try_read(&mut prefix[filled..]) {
                Ok(0) => return false,
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return false,
            }
            let done = match limits.handshake {
                // Not HTTP/2 after all: let hyper answer it as it does.
                Handshake::Http2Preface => prefix[..filled] != HTTP2_PREFACE[..filled],
                Handshake::TlsHello => true,
                Handshake::Http1RequestHead => prefix[before.saturating_sub(3)..filled]
                    .windows(4)
                    .any(|window| window == b"\r\n\r\n"),
            };
            if done {
                break;
            }
        }
        true
    };
    let outcome = tokio::select! {
        began = read => if began { Ok(()) } else { Err(None) },
        () = tokio::time::sleep(limits.handshake_timeout) => Err(Some("handshake_timeout")),
        () = evict.notified() => Err(Some("evicted_in_handshake")),
    };
    handshaking.lock().waiting.remove(&id);
    // The registry's clone is gone with its entry: the stream is this task's alone again.
    let Ok(stream) = Arc::try_unwrap(stream) else {
        return;
    };
    match outcome {
        Ok(()) => {
            prefix.truncate(filled);
            let info = TcpConnectInfo {
                local_addr: stream.local_addr().ok(),
                remote_addr: Some(peer),
            };
            let conn = Conn {
                stream,
                prefix,
                consumed: 0,
                info,
                read_idle_timeout: limits.read_idle_timeout,
                read_deadline: None,
                _slot: slot,
            };
            let _ = ready.send(Ok(conn)).await;
        }
        Err(Some(reason)) => {
            if let Some(metrics) = &slot.metrics {
                metrics.connection_refused(reason);
            }
            tracing::debug!(%peer, reason, timeout = ?limits.handshake_timeout, "connection closed before its handshake");
        }
        Err(None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_below_the_fd_limit() {
        assert_eq!(fit_to_fd_limit(4096, None), 4096);
        assert_eq!(fit_to_fd_limit(4096, Some(1 << 20)), 4096);
        assert_eq!(fit_to_fd_limit(4096, Some(1024)), 1024 - 128);
        assert_eq!(fit_to_fd_limit(4096, Some(100)), MIN_CONNECTIONS);
    }

    #[tokio::test]
    async fn the_oldest_silent_handshake_is_evicted_first() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        let mut accepted = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            accepted.push(Arc::new(listener.accept().await.unwrap().0));
        }
        // The oldest has sent its first bytes; the server has not read them yet.
        tokio::io::AsyncWriteExt::write_all(&mut clients[0], b"PRI")
            .await
            .unwrap();
        while !has_sent_anything(&accepted[0]) {
            tokio::task::yield_now().await;
        }
        let mut waiting = Handshaking::default();
        let ids: Vec<u64> = accepted
            .iter()
            .map(|stream| waiting.register(Arc::clone(stream)).0)
            .collect();
        assert!(waiting.evict_one());
        assert!(
            waiting.waiting.contains_key(&ids[0]),
            "the speaking one was evicted"
        );
        assert!(!waiting.waiting.contains_key(&ids[1]));
        assert!(waiting.evict_one());
        assert!(!waiting.waiting.contains_key(&ids[2]));
        // Only a speaking one is left: it goes last.
        assert!(waiting.evict_one());
        assert!(!waiting.evict_one());
    }
}
