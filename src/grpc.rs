//! The gRPC server every role runs: its own services plus health,
//! reflection and metrics, behind the metrics layer, with a graceful drain
//! bounded by a deadline. Also the small health client behind `msys health`.

use std::{net::SocketAddr, pin::Pin, time::Duration};

use anyhow::Context;
use futures::future::Either;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::{
    service::Routes,
    transport::{Channel, Endpoint, Server, server::TcpIncoming},
};
use tonic_health::{ServingStatus, pb::health_client::HealthClient, server::HealthReporter};
use tracing::{Instrument, Span, instrument::Instrumented};

use crate::{
    metrics::{MetricsLayer, Registry, answered_code},
    overload::ConcurrencyLimit,
    pb::{self, metrics_service_server::MetricsServiceServer},
    telemetry, trace,
};

/// Binds a role's port. Done before serving, so a caller (a test binding port
/// 0) can learn the address before the first request.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding gRPC port {addr}"))
}

/// RPCs served at once by a role that sets no limit of its own.
pub const DEFAULT_MAX_CONCURRENT: usize = 1000;

/// Serves `routes` (the role's services and its health service) until
/// `shutdown` fires, then lets in-flight RPCs finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    metrics: Registry,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    serve_limited(listener, routes, metrics, shutdown, grace, DEFAULT_MAX_CONCURRENT).await
}

/// [`serve`], shedding RPCs beyond `max_concurrent` at once (see `overload`).
pub async fn serve_limited(
    listener: TcpListener,
    routes: Routes,
    metrics: Registry,
    shutdown: CancellationToken,
    grace: Duration,
    max_concurrent: usize,
) -> anyhow::Result<()> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both protocol versions: grpcurl and many tools still ask v1alpha.
    let routes = routes
        .add_service(reflection().build_v1().context("building the reflection service")?)
        .add_service(reflection().build_v1alpha().context("building the reflection service")?)
        .add_service(MetricsServiceServer::new(metrics.clone()));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = Server::builder()
        .layer(MetricsLayer::new(metrics))
        .layer(ConcurrencyLimit::new(max_concurrent))
        .layer(TraceLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let mut server = tokio::spawn(server);
    tokio::select! {
        result = &mut server => return result.context("gRPC server task")?.context("gRPC server failed"),
        _ = shutdown.cancelled() => {}
    }
    // Drains can hang on open streams (hyperium/hyper#4170): bound them.
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => result.context("gRPC server task")?.context("gRPC server failed"),
        Err(_) => {
            server.abort();
            tracing::warn!(?grace, "in-flight RPCs did not finish within the grace period; cut them off");
            Ok(())
        }
    }
}

/// Puts each call in a server span that continues the caller's W3C trace
/// context (`traceparent` metadata), when traces are on. With traces off a
/// call that brought a `traceparent` still gets the span, so that its log
/// lines carry the caller's trace id; any other call passes through (one
/// relaxed load and one header lookup per call, no span, no box).
#[derive(Clone, Copy)]
struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner }
    }
}

#[derive(Clone)]
struct Traced<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, TracedCall<S::Future>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !telemetry::traces_enabled() && !request.headers().contains_key(trace::TRACEPARENT) {
            return Either::Left(self.inner.call(request));
        }
        let span = trace::server_span(request.uri().path(), request.headers());
        let future = span.in_scope(|| self.inner.call(request));
        Either::Right(TracedCall { call: future.instrument(span.clone()), span })
    }
}

pin_project_lite::pin_project! {
    /// A call inside its server span, which records the call's gRPC status
    /// when it is answered (OTel RPC conventions: `rpc.grpc.status_code`,
    /// and an error status for the codes that mean the server failed).
    struct TracedCall<F> {
        #[pin]
        call: Instrumented<F>,
        span: Span,
    }
}

impl<F, RB, E> Future for TracedCall<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.call.poll(cx));
        let code = answered_code(&output);
        this.span.record("rpc.grpc.status_code", code as i64);
        if matches!(
            code,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        ) {
            this.span.record("otel.status_code", "error");
        }
        std::task::Poll::Ready(output)
    }
}

/// Marks the whole server and each named service as serving or not.
pub async fn set_health(reporter: &HealthReporter, services: &[&str], serving: bool) {
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    reporter.set_service_status("", status).await;
    for service in services {
        reporter.set_service_status(*service, status).await;
    }
}

/// What a role's health watcher learns each second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The role's database answers: the whole server (`""`) is SERVING.
    pub database: bool,
    /// The role can do its work, e.g. the order role's consumer has joined
    /// its group: the role's own service is SERVING when this and
    /// `database` hold. Liveness checks the server, readiness the service,
    /// so a broker outage at start delays readiness without restarts.
    pub ready: bool,
}

/// Probes once and publishes the result, then returns the watcher that keeps
/// the role's health true to `probe`, checking once a second until `shutdown`
/// and logging every transition. Awaiting the first probe before serving means
/// a role never answers requests while still showing the NOT_SERVING it
/// starts with (under load the first probe used to land after the first RPCs).
pub async fn watch_health<F, Fut>(
    reporter: HealthReporter,
    service: &'static str,
    shutdown: CancellationToken,
    mut probe: F,
) -> impl Future<Output = ()> + Send + 'static
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Probe> + Send,
{
    let mut last = None;
    publish_health(&reporter, service, &mut last, probe().await).await;
    async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: that probe already ran
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = probe().await;
            publish_health(&reporter, service, &mut last, now).await;
        }
    }
}

/// Sets the server's and `service`'s status from `now` where they changed since `last`.
async fn publish_health(reporter: &HealthReporter, service: &str, last: &mut Option<Probe>, now: Probe) {
    if last.map(|l| l.database) != Some(now.database) {
        if now.database {
            tracing::info!("database reachable: server SERVING");
        } else {
            tracing::warn!("database unreachable: server NOT_SERVING");
        }
        set_health(reporter, &[], now.database).await;
    }
    let serving = now.database && now.ready;
    if last.map(|l| l.database && l.ready) != Some(serving) {
        tracing::info!(service, serving, "service readiness changed");
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status(service, status).await;
    }
    *last = Some(now);
}

/// `addr` as a URI: a bare `host:port` means plaintext `http://host:port`,
/// the form the roles' address flags take.
pub fn uri_of(addr: &str) -> String {
    if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") }
}

/// A channel to `addr` for a one-shot client (`msys health`, `msys status`):
/// connecting and every call on it are bounded by `timeout`. Returns the URI
/// too, for the caller's error messages.
pub async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<(Channel, String)> {
    let uri = uri_of(addr);
    let channel = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("{uri:?} is not a valid address"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))?;
    Ok((channel, uri))
}

/// Asks a server's grpc.health.v1 service for `service`'s status (`""` is the
/// whole server). Used by `msys health` in scripts and container probes.
pub async fn check_health(addr: &str, service: &str, timeout: Duration) -> anyhow::Result<String> {
    let (channel, uri) = connect(addr, timeout).await?;
    let response = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: service.to_owned() })
        .await
        .with_context(|| format!("health check of {uri}"))?;
    let status = tonic_health::pb::health_check_response::ServingStatus::try_from(response.into_inner().status)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| "UNKNOWN".to_owned());
    Ok(status)
}
