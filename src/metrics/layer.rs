//! The tower layer in front of every role's gRPC server: counts each call
//! started and handled, by service, method and gRPC code, and times it.
//! Per call it costs one read-locked map lookup and a few atomic adds.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use prometheus_client::metrics::gauge::Gauge;
use tonic::Code;

use super::{MethodMetrics, RPCS_IN_FLIGHT, Registry};

/// Tower layer that times every request and reads its gRPC outcome.
#[derive(Clone)]
pub struct MetricsLayer {
    registry: Registry,
    in_flight: Gauge,
}

impl MetricsLayer {
    pub fn new(registry: Registry) -> Self {
        let in_flight = registry.gauge(RPCS_IN_FLIGHT);
        MetricsLayer { registry, in_flight }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered { inner, registry: self.registry.clone(), in_flight: self.in_flight.clone() }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    registry: Registry,
    in_flight: Gauge,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The instance that was polled ready serves the request; a fresh
        // clone stays behind for the next one (see tonic's tower example).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = Call::enter(self.registry.grpc_method(request.uri().path()), &self.in_flight);
        Box::pin(async move {
            let response = inner.call(request).await;
            call.finish(answered_code(&response));
            response
        })
    }
}

/// The gRPC status a server answered a call with, as far as the response
/// head shows it. A failed RPC is answered "trailers-only", with grpc-status
/// in the headers; a successful unary one carries it in the trailers, so a
/// missing header means OK. The trace layer records the same code.
pub fn answered_code<RB, E>(response: &Result<http::Response<RB>, E>) -> Code {
    match response {
        Ok(r) => r.headers().get("grpc-status").map_or(Code::Ok, |status| Code::from_bytes(status.as_bytes())),
        Err(_) => Code::Unknown,
    }
}

/// One RPC between start and end. It counts in `rpcs_in_flight` for as long
/// as it lives; dropped unfinished (the client gave up and the server's
/// future was dropped half-way), it is counted as CANCELLED.
struct Call {
    method: Arc<MethodMetrics>,
    started: Instant,
    in_flight: Gauge,
    finished: bool,
}

impl Call {
    fn enter(method: Arc<MethodMetrics>, in_flight: &Gauge) -> Self {
        method.start();
        in_flight.inc();
        Call { method, started: Instant::now(), in_flight: in_flight.clone(), finished: false }
    }

    fn finish(mut self, code: Code) {
        self.finished = true;
        self.method.finish(code, self.started.elapsed());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.in_flight.dec();
        if !self.finished {
            self.method.finish(Code::Cancelled, self.started.elapsed());
        }
    }
}
