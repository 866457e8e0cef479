//! Fair sharing of `--max-concurrent-requests`: one caller (a token, or on an open server a
//! peer's IP address) holds at most its share of it (its token's `max_concurrent_requests`, or
//! `--caller-max-concurrent-requests`), so that one team's burst of streams or waiting steps
//! leaves room for the others. One more request of that caller is RESOURCE_EXHAUSTED at once,
//! naming the caller and its share.
//!
//! It wraps the Harmonizer inside the authentication interceptor, so that it knows who calls;
//! its permit, like the server-wide one of `limit`, is held until the response body ends.

use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use dashmap::DashMap;
use tokio::sync::Semaphore;
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::Access;
use crate::limit::LimitFuture;

/// Callers remembered at most before those with nothing in flight are forgotten: an open
/// server's peers may be many addresses.
const MAX_REMEMBERED: usize = 10_000;

/// How a caller is named in refusals, logs and quotas.
pub fn caller_name(access: &Access, peer: Option<IpAddr>) -> String {
    match (access, peer) {
        (Access::Caller(caller), _) => format!("token {}", caller.name),
        (Access::Open, Some(ip)) => format!("peer {ip}"),
        (Access::Open, None) => "peer unknown".to_owned(),
    }
}

/// The peer's address, as tonic's listener records it, over TCP or TLS.
fn peer_of<B>(request: &http::Request<B>) -> Option<IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
        .map(|addr| addr.ip())
}

struct Share {
    limit: usize,
    permits: Arc<Semaphore>,
}

#[derive(Clone)]
pub struct CallerShareLayer {
    default_limit: usize,
    shares: Arc<DashMap<String, Share>>,
}

impl CallerShareLayer {
    pub fn new(default_limit: usize) -> Self {
        Self {
            default_limit,
            shares: Arc::new(DashMap::new()),
        }
    }
}

impl<S> Layer<S> for CallerShareLayer {
    type Service = CallerShare<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerShare {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallerShare<S> {
    inner: S,
    layer: CallerShareLayer,
}

impl CallerShareLayer {
    /// The caller's semaphore, sized by its latest request's quota: a token whose share a
    /// reloaded tokens file changed gets a new one (requests in flight keep their old permits).
    fn permits(&self, caller: &str, limit: usize) -> Arc<Semaphore> {
        // Every request comes here: a known caller with an unchanged share costs a read lock of
        // one shard and no allocation.
        if let Some(share) = self.shares.get(caller)
            && share.limit == limit
        {
            return Arc::clone(&share.permits);
        }
        if self.shares.len() >= MAX_REMEMBERED {
            self.shares
                .retain(|_, share| share.permits.available_permits() < share.limit);
        }
        let mut share = self
            .shares
            .entry(caller.to_owned())
            .or_insert_with(|| Share {
                limit,
                permits: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            });
        if share.limit != limit {
            *share = Share {
                limit,
                permits: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            };
        }
        Arc::clone(&share.permits)
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CallerShare<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = LimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // Without an Access the interceptor refused the request already; nothing to share.
        let Some(access) = request.extensions().get::<Access>().cloned() else {
            return LimitFuture::admitted(self.inner.call(request), None);
        };
        let limit = match &access {
            Access::Caller(caller) => caller
                .max_concurrent_requests
                .unwrap_or(self.layer.default_limit),
            Access::Open => self.layer.default_limit,
        };
        let caller = caller_name(&access, peer_of(&request));
        match self.layer.permits(&caller, limit).try_acquire_owned() {
            Ok(permit) => LimitFuture::admitted(self.inner.call(request), Some(permit)),
            Err(_) => {
                tracing::debug!(%caller, limit, "request refused: the caller's share is in use");
                LimitFuture::refused(tonic::Status::resource_exhausted(format!(
                    "caller {caller:?} has {limit} requests in flight, its share of the \
                     server's (max_concurrent_requests in its token, or \
                     --caller-max-concurrent-requests); retry with backoff"
                )))
            }
        }
    }
}

/// The wrapped service keeps its gRPC name, so that the router still finds it.
impl<S: tonic::server::NamedService> tonic::server::NamedService for CallerShare<S> {
    const NAME: &'static str = S::NAME;
}
