//! Load shedding: a process-wide cap on RPCs being served at once. A request
//! beyond it is answered RESOURCE_EXHAUSTED at once, with a message saying
//! why, instead of joining an unbounded queue in front of the pool (where it
//! would only time out later, after costing memory and making every other
//! request slower). Health checks, reflection and metrics are never shed:
//! an overloaded server must still say how it is doing.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt};
use tokio::sync::Semaphore;

/// Paths that bypass the limit.
const EXEMPT: [&str; 4] =
    ["/grpc.health.v1.", "/grpc.reflection.v1.", "/grpc.reflection.v1alpha.", "/msys.v1.MetricsService/"];

/// The tower layer; clones share one limit.
#[derive(Clone)]
pub struct ConcurrencyLimit {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl ConcurrencyLimit {
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        ConcurrencyLimit { permits: Arc::new(Semaphore::new(limit)), limit }
    }
}

impl<S> tower::Layer<S> for ConcurrencyLimit {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limited { inner, limit: self.clone() }
    }
}

#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    limit: ConcurrencyLimit,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Limited<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        if EXEMPT.iter().any(|prefix| path.starts_with(prefix)) {
            return inner.call(request).boxed();
        }
        let Ok(permit) = self.limit.permits.clone().try_acquire_owned() else {
            let limit = self.limit.limit;
            tracing::debug!(path, limit, "shed a request: the server is at its concurrency limit");
            let status = tonic::Status::resource_exhausted(format!(
                "server overloaded: {limit} requests are already being served (MSYS_MAX_CONCURRENT_REQUESTS); \
                 retry with backoff"
            ));
            let response = status.into_http();
            return async move { Ok(response) }.boxed();
        };
        async move {
            let response = inner.call(request).await;
            drop(permit);
            response
        }
        .boxed()
    }
}
