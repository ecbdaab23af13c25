//! The dashboard's HTTP surface: the page and its assets, the JSON and SSE
//! API the page reads, the load-test proxy, `/healthz` and `/metrics`.
//! Every response carries the security headers: a CSP that allows only our
//! own origin and no inline script, `nosniff`, and no framing.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Query, Request, State},
    http::{HeaderName, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Semaphore, broadcast::error::RecvError};
use tokio_util::sync::CancellationToken;

use super::{assets, feed::Feed, load};
use crate::metrics::Registry;

/// `default-src 'self'` with nothing inline: scripts and styles come only
/// from files we serve. `img-src data:` is for the favicon-less page's
/// canvas exports; `frame-ancestors 'none'` forbids embedding (clickjacking).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
frame-ancestors 'none'";
/// The longest history a page may ask for (the monitor keeps at least 15 minutes).
const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// Gauge of open SSE streams.
const OPEN_STREAMS: &str = "sse_streams_open";
/// HTTP requests answered, those answered with a 5xx, and their latency.
const HTTP_REQUESTS: &str = "http_requests_total";
const HTTP_FAILURES: &str = "http_server_errors_total";
const HTTP_SECONDS: &str = "http_request_duration_seconds";

/// What every handler shares.
#[derive(Clone)]
pub struct App {
    pub feed: Feed,
    pub metrics: Registry,
    streams: Arc<Semaphore>,
    /// Fired at SIGTERM: /healthz starts answering 503 (draining).
    draining: CancellationToken,
    /// Fired after the drain delay: SSE streams end, and so does the
    /// following of a load test (the run itself goes on in the monitor).
    pub(super) stop: CancellationToken,
    /// The load panel's memory (which run is shown, whether a token is needed).
    pub(super) load: load::Panel,
}

impl App {
    pub fn new(
        feed: Feed,
        metrics: Registry,
        max_streams: usize,
        draining: CancellationToken,
        stop: CancellationToken,
    ) -> Self {
        App {
            feed,
            metrics,
            streams: Arc::new(Semaphore::new(max_streams)),
            draining,
            stop,
            load: load::Panel::default(),
        }
    }
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/snapshot", get(snapshot))
        .route("/api/history", get(history))
        .route("/api/events", get(events))
        .route("/api/load", get(load::available).post(load::start))
        .route("/api/load/cancel", post(load::cancel))
        .fallback(get(assets::serve))
        .with_state(app.clone())
        .merge(crate::metrics::http::router(app.metrics.clone()))
        .layer(middleware::from_fn_with_state(app, measure))
        .layer(middleware::from_fn(security_headers))
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    response
}

/// Counts HTTP requests and their latency in the role's registry (served at
/// `/metrics`). Not per route: the registry's labelled families are gRPC's,
/// and calling HTTP routes gRPC methods would mislead whoever reads them.
async fn measure(State(app): State<App>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    app.metrics.add(HTTP_REQUESTS, 1);
    if response.status().is_server_error() {
        app.metrics.add(HTTP_FAILURES, 1);
    }
    app.metrics.observe(HTTP_SECONDS, started.elapsed().as_secs_f64());
    response
}

/// Ready: the process answers and is not draining (503 then, so load
/// balancers move pages elsewhere). Whether the monitor answers is in the
/// body; a dashboard without its monitor still serves, and says so.
async fn healthz(State(app): State<App>) -> Response {
    if app.draining.is_cancelled() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "draining: this dashboard is shutting down");
    }
    let status = app.feed.status();
    ([(header::CONTENT_TYPE, "application/json")], status.data.to_string()).into_response()
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn json_text(text: &str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], text.to_owned()).into_response()
}

async fn snapshot(State(app): State<App>) -> Response {
    match app.feed.latest() {
        Some(data) => json_text(&data),
        None => problem(StatusCode::SERVICE_UNAVAILABLE, "no snapshot from the monitor yet"),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    /// Seconds back from now.
    window: Option<u64>,
}

async fn history(State(app): State<App>, Query(query): Query<HistoryQuery>) -> Response {
    let window = Duration::from_secs(query.window.unwrap_or(300));
    if window.is_zero() || window > MAX_WINDOW {
        return problem(StatusCode::BAD_REQUEST, format!("window must be 1..={} seconds", MAX_WINDOW.as_secs()));
    }
    match app.feed.history(window).await {
        Ok(history) => Json(history).into_response(),
        Err(status) => {
            problem(StatusCode::BAD_GATEWAY, format!("the monitor did not give its history: {}", status.message()))
        }
    }
}

/// One SSE stream per page: the monitor's status at once, the newest
/// snapshot and load-test frame if any, then everything live. Ends when the
/// role shuts down, so the server's drain is not held open by browsers.
async fn events(State(app): State<App>) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let permit = app
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| problem(StatusCode::SERVICE_UNAVAILABLE, "too many open dashboards; close one and retry"))?;
    let receiver = app.feed.subscribe();
    let mut first = vec![app.feed.status()];
    if let Some(data) = app.feed.latest() {
        first.push(super::feed::Frame { event: "snapshot", data });
    }
    first.extend(app.feed.latest_load());
    let live = futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(frame) => return Some((frame, receiver)),
                // A page that fell behind skips to the newest frames.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let gauge = OpenStream::new(app.metrics.clone(), permit);
    let stream = futures::stream::iter(first)
        .chain(live)
        .map(move |frame| {
            let _open = &gauge;
            Ok(Event::default().event(frame.event).data(&*frame.data))
        })
        .take_until(app.stop.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Holds a stream slot and counts the stream as open until it is dropped.
struct OpenStream {
    metrics: Registry,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl OpenStream {
    fn new(metrics: Registry, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics.add(OPEN_STREAMS, 1);
        OpenStream { metrics, _permit: permit }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics.add(OPEN_STREAMS, -1);
    }
}
