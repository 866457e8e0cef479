//! A tower layer around the whole tonic server that counts requests by method and gRPC status
//! and times them, so that the services themselves carry no metrics code.
//!
//! A gRPC status travels in one of two places: in the response headers when the call fails
//! before any message ("trailers-only"), or in the trailers after the last message. The layer
//! wraps the response body and records the call when the trailers pass through, when the body
//! ends without them, or when the body is dropped unfinished (the client went away).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prost::Message;
use tower_layer::Layer;
use tower_service::Service;

use super::{MethodSeries, Metrics};

/// The method label of a path that no service defines: one series for all of them, so that a
/// client sending random paths cannot create series without bound.
const UNKNOWN_METHOD: &str = "unknown";

/// The canonical upper-case name of a gRPC status code, as gRPC's own tooling writes it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Clones (one per connection and one per request, as hyper's service adapter makes them) copy
/// one `Arc`.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    methods: Arc<MethodTable>,
}

struct MethodTable {
    known: HashMap<String, Arc<MethodSeries>>,
    unknown: Arc<MethodSeries>,
}

impl GrpcMetricsLayer {
    /// `descriptor_sets` are the encoded file descriptor sets of every service the server
    /// mounts; their methods are the only method labels the layer will use.
    pub fn new(metrics: Metrics, descriptor_sets: &[&[u8]]) -> Self {
        let mut known = HashMap::new();
        for encoded in descriptor_sets {
            // The sets are compiled into the binary; one that does not decode is a build bug,
            // and its methods are then merely counted as "unknown".
            let Ok(set) = prost_types::FileDescriptorSet::decode(*encoded) else {
                tracing::warn!("a compiled-in descriptor set does not decode");
                continue;
            };
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    let service_name = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    for method in &service.method {
                        let method = format!("{service_name}/{}", method.name());
                        let series = Arc::new(metrics.method_series(&method));
                        known.insert(method, series);
                    }
                }
            }
        }
        Self {
            methods: Arc::new(MethodTable {
                known,
                unknown: Arc::new(metrics.method_series(UNKNOWN_METHOD)),
            }),
        }
    }

    fn series(&self, path: &str) -> &Arc<MethodSeries> {
        let method = path.strip_prefix('/').unwrap_or(path);
        self.methods
            .known
            .get(method)
            .unwrap_or(&self.methods.unknown)
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let record = Record {
            series: Arc::clone(self.layer.series(request.uri().path())),
            start: Instant::now(),
            header_code: None,
            done: false,
        };
        MeteredFuture {
            inner: self.inner.call(request),
            record: Some(record),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's future, unboxed: the record moves into the response body.
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }
}

impl<F, ResBody, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<MeteredBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        // Polled again after Ready only by a broken executor; the record was already moved.
        let Some(mut record) = this.record.take() else {
            return Poll::Pending;
        };
        Poll::Ready(match result {
            Ok(response) => {
                record.header_code = grpc_status(response.headers());
                Ok(response.map(|inner| MeteredBody { inner, record }))
            }
            Err(error) => {
                // The transport turns a service error into a broken connection.
                record.finish(Some(tonic::Code::Internal));
                Err(error)
            }
        })
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|value| tonic::Code::from_bytes(value.as_bytes()))
}

/// One call's measurement, recorded exactly once.
struct Record {
    series: Arc<MethodSeries>,
    start: Instant,
    /// The status of a trailers-only response.
    header_code: Option<tonic::Code>,
    done: bool,
}

impl Record {
    /// Records the call with `code`, falling back to the status in the response headers, and
    /// to UNKNOWN if there was none anywhere (what a gRPC client would report).
    fn finish(&mut self, code: Option<tonic::Code>) {
        if self.done {
            return;
        }
        self.done = true;
        let code = code.or(self.header_code).unwrap_or(tonic::Code::Unknown);
        self.series.request_finished(code, self.start.elapsed());
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.done {
            // The body was dropped before its end: either a trailers-only response that was
            // never polled (its status is in the headers), or a client that went away.
            let code = self.header_code.unwrap_or(tonic::Code::Cancelled);
            self.finish(Some(code));
        }
    }
}

pin_project_lite::pin_project! {
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        record: Record,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.record.finish(grpc_status(trailers));
                }
            }
            Poll::Ready(Some(Err(_))) => this.record.finish(Some(tonic::Code::Internal)),
            Poll::Ready(None) => this.record.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_methods_of_the_descriptor_sets_become_labels() {
        let layer = GrpcMetricsLayer::new(
            Metrics::new(),
            &[
                crate::proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
        );
        assert_eq!(
            layer.series("/grpc.health.v1.Health/Check").method,
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(
            layer.series("/ghm.v1.Harmonizer/CreateJob").method,
            "ghm.v1.Harmonizer/CreateJob"
        );
        assert_eq!(
            layer.series("/ghm.v1.Harmonizer/Nope").method,
            UNKNOWN_METHOD
        );
        assert_eq!(layer.series("/x").method, UNKNOWN_METHOD);
    }

    #[test]
    fn every_code_has_its_canonical_name() {
        for value in 0..=16 {
            let code = tonic::Code::from_i32(value);
            let name = code_name(code);
            assert!(name.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
            // tonic's Debug of a code is its CamelCase name: compare without underscores.
            assert_eq!(
                name.replace('_', "").to_lowercase(),
                format!("{code:?}").to_lowercase()
            );
        }
    }
}
