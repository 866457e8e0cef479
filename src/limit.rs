//! Back-pressure: at most `--max-concurrent-requests` RPCs run at once, server-wide. One more
//! is answered RESOURCE_EXHAUSTED at once, so that a flood of callers learns to back off instead
//! of piling up futures, memory and latency in an unbounded queue.
//!
//! A permit is held from the moment the request arrives until its response body ends, so that a
//! stream counts for as long as it is open and a step-synchronous request for as long as it
//! waits. Health checks are exempt: a probe must see a busy server as alive.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_layer::Layer;
use tower_service::Service;

/// Paths that are never limited.
const EXEMPT_PREFIX: &str = "/grpc.health.v1.Health/";

#[derive(Clone)]
pub struct ConcurrencyLimitLayer {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl ConcurrencyLimitLayer {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            limit,
        }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit {
            inner,
            permits: Arc::clone(&self.permits),
            limit: self.limit,
        }
    }
}

#[derive(Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ConcurrencyLimit<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
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
        if request.uri().path().starts_with(EXEMPT_PREFIX) {
            return LimitFuture::Admitted {
                inner: self.inner.call(request),
                permit: None,
            };
        }
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => LimitFuture::Admitted {
                inner: self.inner.call(request),
                permit: Some(permit),
            },
            Err(_) => {
                tracing::debug!(
                    path = request.uri().path(),
                    limit = self.limit,
                    "request refused: at the concurrency limit"
                );
                LimitFuture::Refused {
                    response: Some(
                        tonic::Status::resource_exhausted(format!(
                            "ghmd is serving its limit of {} concurrent requests \
                             (--max-concurrent-requests); retry with backoff",
                            self.limit
                        ))
                        .into_http(),
                    ),
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
