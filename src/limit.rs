//! Back-pressure: at most `--max-concurrent-requests` RPCs run at once, server-wide. One more
//! is answered RESOURCE_EXHAUSTED at once, so that a flood of callers learns to back off instead
//! of piling up futures, memory and latency in an unbounded queue.
//!
//! A permit is held from the moment the request arrives until its response body ends, so that a
//! stream counts for as long as it is open and a step-synchronous request for as long as it
//! waits. Health checks are exempt: a probe must see a busy server as alive.
//!
//! Two bounds keep a hostile client from holding what it was given:
//! - a request body that sends nothing for `--stream-idle-timeout` (a stream between messages,
//!   or a unary call whose message never comes) is failed with DEADLINE_EXCEEDED, which ends
//!   the call and gives its permit back; the clock runs only while the server waits for the
//!   client, never while a step waits for other ranks;
//! - Health/Watch streams, exempt from tokens and from the limit above, have a cap of their
//!   own (`--max-health-watches`), since each one is memory held for as long as it is open.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_layer::Layer;
use tower_service::Service;

/// Paths that are never limited.
const EXEMPT_PREFIX: &str = "/grpc.health.v1.Health/";
/// The one health method that stays open: limited by its own cap.
const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

/// An idle stream's timeout when none is set: the `--stream-idle-timeout` default.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct ConcurrencyLimitLayer {
    permits: Arc<Semaphore>,
    limit: usize,
    watches: Arc<Semaphore>,
    watch_limit: usize,
    idle_timeout: Duration,
}

impl ConcurrencyLimitLayer {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            limit,
            watches: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            watch_limit: Semaphore::MAX_PERMITS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }

    /// At most `limit` Health/Watch streams open at once.
    pub fn with_max_health_watches(mut self, limit: usize) -> Self {
        self.watch_limit = limit.min(Semaphore::MAX_PERMITS);
        self.watches = Arc::new(Semaphore::new(self.watch_limit));
        self
    }

    /// How long a request body may send nothing before the call is failed.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    layer: ConcurrencyLimitLayer,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ConcurrencyLimit<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    ReqBody: HttpBody<Data = bytes::Bytes> + Send + 'static,
    ReqBody::Error: Into<tonic::codegen::StdError>,
    ResBody: HttpBody<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = LimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let watch = path == WATCH_PATH;
        if !watch && path.starts_with(EXEMPT_PREFIX) {
            let request = request.map(|body| IdleBody::wrap(body, self.layer.idle_timeout));
            return LimitFuture::Admitted {
                inner: self.inner.call(request),
                permit: None,
            };
        }
        let permits = if watch {
            &self.layer.watches
        } else {
            &self.layer.permits
        };
        match Arc::clone(permits).try_acquire_owned() {
            Ok(permit) => {
                let request = request.map(|body| IdleBody::wrap(body, self.layer.idle_timeout));
                LimitFuture::Admitted {
                    inner: self.inner.call(request),
                    permit: Some(permit),
                }
            }
            Err(_) => {
                let message = if watch {
                    format!(
                        "ghmd has its limit of {} Health/Watch streams open \
                         (--max-health-watches); use Health/Check, or retry with backoff",
                        self.layer.watch_limit
                    )
                } else {
                    format!(
                        "ghmd is serving its limit of {} concurrent requests \
                         (--max-concurrent-requests); retry with backoff",
                        self.layer.limit
                    )
                };
                tracing::debug!(path, %message, "request refused");
                LimitFuture::Refused {
                    response: Some(tonic::Status::resource_exhausted(message).into_http()),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = LimitFutureProj]
    pub enum LimitFuture<F> {
        Admitted {
            #[pin]
            inner: F,
            permit: Option<OwnedSemaphorePermit>,
        },
        Refused {
            response: Option<http::Response<tonic::body::Body>>,
        },
    }
}

impl<F> LimitFuture<F> {
    /// A request let through, holding `permit` until its response body ends; `share` builds its
    /// per-caller permits on this.
    pub(crate) fn admitted(inner: F, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self::Admitted { inner, permit }
    }

    pub(crate) fn refused(status: tonic::Status) -> Self {
        Self::Refused {
            response: Some(status.into_http()),
        }
    }
}

impl<F, ResBody, E> Future for LimitFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    ResBody: HttpBody<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Output = Result<http::Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitFutureProj::Admitted { inner, permit } => {
                let response = std::task::ready!(inner.poll(cx))?;
                let permit = permit.take();
                Poll::Ready(Ok(response.map(|body| {
                    tonic::body::Body::new(PermitBody {
                        inner: body,
                        _permit: permit,
                    })
                })))
            }
            LimitFutureProj::Refused { response } => {
                Poll::Ready(Ok(response.take().unwrap_or_else(|| {
                    tonic::Status::internal("polled after completion").into_http()
                })))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that gives its permit back when it ends or is dropped.
    struct PermitBody<B> {
        #[pin]
        inner: B,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl<B: HttpBody> HttpBody for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if frame.is_none() {
            // The stream is over even if hyper keeps the body a while longer.
            this._permit.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with DEADLINE_EXCEEDED once the server has waited
    /// `idle` for its next frame. The clock starts when a poll finds nothing and stops at the
    /// next frame, so time the handler spends elsewhere (a step waiting for its ranks) is not
    /// counted.
    struct IdleBody<B> {
        #[pin]
        inner: B,
        idle: Duration,
        #[pin]
        deadline: Option<tokio::time::Sleep>,
        timed_out: bool,
    }
}

impl<B> IdleBody<B>
where
    B: HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    fn wrap(inner: B, idle: Duration) -> tonic::body::Body {
        tonic::body::Body::new(Self {
            inner,
            idle,
            deadline: None,
            timed_out: false,
        })
    }
}

impl<B> HttpBody for IdleBody<B>
where
    B: HttpBody<Data = bytes::Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = B::Data;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.timed_out {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.deadline.set(None);
                return Poll::Ready(frame.map(|result| result.map_err(Into::into)));
            }
            Poll::Pending => {}
        }
        if this.deadline.is_none() {
            this.deadline.set(Some(tokio::time::sleep(*this.idle)));
        }
        if let Some(deadline) = this.deadline.as_mut().as_pin_mut()
            && deadline.poll(cx).is_ready()
        {
            *this.timed_out = true;
            tracing::debug!(idle = ?this.idle, "request body idle: call ended");
            let status = tonic::Status::deadline_exceeded(format!(
                "no message on this call for {} (--stream-idle-timeout): the server ended it; \
                 open a new stream when there is something to send",
                humantime::format_duration(*this.idle)
            ));
            return Poll::Ready(Some(Err(Box::new(status))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
