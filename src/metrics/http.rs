//! `GET /metrics`: a role's registry in the Prometheus text exposition
//! format, on a small HTTP server of its own port (Prometheus scrapes plain
//! HTTP/1.1; the gRPC port speaks only HTTP/2). Any role can run it with
//! [`bind`] + [`serve`], or mount [`router`] into an axum app it already has.

use std::net::SocketAddr;

use anyhow::Context;
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Registry;

/// Binds the metrics port before serving, so a test binding port 0 can
/// learn the address first.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the metrics port {addr}"))
}

/// The `/metrics` route alone.
pub fn router(registry: Registry) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state(registry)
}

async fn scrape(State(registry): State<Registry>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], registry.encode_prometheus())
}

/// Serves `/metrics` until `shutdown`. A scrape is answered in
/// microseconds, so the graceful drain needs no deadline of its own.
pub async fn serve(listener: TcpListener, registry: Registry, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
    axum::serve(listener, router(registry))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .with_context(|| format!("metrics server on {addr}"))
}

/// [`serve`] as a background task of a role: a failure is logged, not
/// fatal, since the role's service is unaffected and GetMetrics still answers.
pub async fn run(listener: TcpListener, registry: Registry, shutdown: CancellationToken) {
    if let Err(error) = serve(listener, registry, shutdown).await {
        tracing::error!(error.message = %error, error.cause_chain = ?error, "metrics server failed");
    }
}
