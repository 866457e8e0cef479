//! Lingering close for the gRPC listener's connections, as nginx and Apache do it.
//!
//! When a shutdown closes a connection right after the last bytes of a large response, the
//! client is usually still reading them and still sending HTTP/2 WINDOW_UPDATE frames. A socket
//! closed with such unread bytes in its receive buffer makes the kernel answer with a TCP RST,
//! and an RST makes the client's kernel drop what it had not read yet: the client sees a
//! connection reset in the middle of a response the server finished. Once open streams end at
//! SIGTERM, nothing else keeps such a connection open, so every connection here, once hyper is
//! done with it, sends its FIN and keeps reading (and discarding) until the client closes too,
//! for at most [`LINGER`]; and the server waits for those before it exits.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The longest a closed connection waits for its client to close its side.
pub const LINGER: Duration = Duration::from_secs(2);

/// Counts the connections still lingering, so that the server can wait for them.
#[derive(Clone, Debug, Default)]
pub struct Lingerers {
    inner: Arc<(AtomicUsize, Notify)>,
}

impl Lingerers {
    /// Waits until no connection lingers, or `max` has passed.
    pub async fn wait(&self, max: Duration) {
        let _ = tokio::time::timeout(max, async {
            loop {
                let notified = self.inner.1.notified();
                if self.inner.0.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    fn enter(&self) -> LingerGuard {
        self.inner.0.fetch_add(1, Ordering::SeqCst);
        LingerGuard(self.clone())
    }
}

struct LingerGuard(Lingerers);

impl Drop for LingerGuard {
    fn drop(&mut self) {
        self.0.inner.0.fetch_sub(1, Ordering::SeqCst);
        self.0.inner.1.notify_waiters();
    }
}

/// What a lingering connection needs of its socket: it is read and shut down by a task of its
/// own once dropped.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Socket for S {}

/// A connection that lingers when dropped.
pub struct LingeringStream<S: Socket> {
    /// `None` only once dropped.
    stream: Option<S>,
    lingerers: Lingerers,
}

impl<S: Socket> LingeringStream<S> {
    fn stream(&mut self) -> io::Result<&mut S> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl<S: Socket> AsyncRead for LingeringStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl<S: Socket> AsyncWrite for LingeringStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(stream) => Pin::new(stream).poll_write(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => Pin::new(stream).poll_flush(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => Pin::new(stream).poll_shutdown(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl<S: Socket + Connected<ConnectInfo = TcpConnectInfo>> Connected for LingeringStream<S> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match &self.stream {
            Some(stream) => stream.connect_info(),
            None => TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
        }
    }
}

impl<S: Socket> Drop for LingeringStream<S> {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        // Without a runtime (the process is ending anyway) the socket just closes.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let guard = self.lingerers.enter();
        runtime.spawn(async move {
            let _guard = guard;
            let _ = stream.shutdown().await;
            let mut discard = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(read) = stream.read(&mut discard).await {
                    if read == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

/// The connections of `incoming`, each lingering when closed.
pub fn lingering<S: Socket>(
    incoming: impl Stream<Item = io::Result<S>> + Send + 'static,
    lingerers: Lingerers,
) -> impl Stream<Item = io::Result<LingeringStream<S>>> + Send + 'static {
    incoming.map(move |accepted| {
        Ok(LingeringStream {
            stream: Some(accepted?),
            lingerers: lingerers.clone(),
        })
    })
}
