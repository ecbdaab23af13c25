//! `/api/load`: starts and cancels a load test on the monitor for the page.
//! The page's token (when the monitor requires one) travels as the bearer
//! token of the gRPC call; the frontend keeps no secret of its own. Progress
//! and the final report reach every open page as `load` SSE frames, and the
//! feed keeps the newest one, so a page opened mid-run shows the run at once.
//!
//! The monitor is the authority on everything (one run at a time, the token,
//! the limits): its refusals reach the page with their own message, mapped
//! onto the HTTP status a browser understands.

use std::{
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status, Streaming};

use super::{
    feed::{Feed, Frame, describe},
    load_view::{self, LoadForm, RunInfo},
    routes::App,
};
use crate::pb::{self, load_test_event::Event};

/// Deadline of a unary call to the monitor, and of the start of a run's stream.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A run's stream sends progress every second; this long without a word means it is lost.
const STREAM_STALL: Duration = Duration::from_secs(10);
/// How often a run started elsewhere (`msys load --via-monitor`) is polled with GetLoadTest.
const POLL: Duration = Duration::from_secs(1);

/// Why the panel could not do what the page asked; one mapping to HTTP below.
#[derive(Debug, thiserror::Error)]
pub enum PanelError {
    #[error("{0}")]
    Form(String),
    #[error("{}", .0.message())]
    Monitor(#[from] Status),
    #[error("the monitor did not answer {0} within {secs} s", secs = CALL_TIMEOUT.as_secs())]
    Timeout(&'static str),
}

impl IntoResponse for PanelError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            PanelError::Form(_) => (StatusCode::BAD_REQUEST, self.to_string()),
            PanelError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, self.to_string()),
            PanelError::Monitor(s) => match s.code() {
                Code::Unauthenticated => (StatusCode::UNAUTHORIZED, self.to_string()),
                Code::PermissionDenied => (StatusCode::FORBIDDEN, self.to_string()),
                // One run at a time: the page learns that one is already running.
                Code::FailedPrecondition => (StatusCode::CONFLICT, self.to_string()),
                Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, self.to_string()),
                Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, self.to_string()),
                Code::Unavailable => {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("the monitor is unreachable: {}", describe(s)))
                }
                Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, self.to_string()),
                _ => (StatusCode::BAD_GATEWAY, format!("the monitor failed: {}", describe(s))),
            },
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

/// What the panel remembers between requests: which run it is showing (a
/// generation, so an older follower stops when a newer run starts) and
/// whether the monitor wants a token, once known.
#[derive(Clone, Default)]
pub struct Panel(Arc<Mutex<PanelState>>);

#[derive(Default)]
struct PanelState {
    generation: u64,
    watching: bool,
    token_required: Option<bool>,
}

impl Panel {
    fn lock(&self) -> MutexGuard<'_, PanelState> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn learn_token_required(&self, required: bool) {
        self.lock().token_required = Some(required);
    }

    /// A run this frontend started: it supersedes whatever was being followed.
    fn watch_own(&self) -> Watching {
        self.watch(&mut self.lock())
    }

    /// A run started elsewhere, unless one is already being shown.
    fn watch_foreign(&self) -> Option<Watching> {
        let mut state = self.lock();
        (!state.watching).then(|| self.watch(&mut state))
    }

    /// A new generation becomes the one shown.
    fn watch(&self, state: &mut PanelState) -> Watching {
        state.generation += 1;
        state.watching = true;
        Watching { panel: self.clone(), generation: state.generation }
    }
}

/// The right to publish one run's frames; released when dropped (even by a panic).
struct Watching {
    panel: Panel,
    generation: u64,
}

impl Watching {
    fn current(&self) -> bool {
        self.panel.lock().generation == self.generation
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut state = self.panel.lock();
        if state.generation == self.generation {
            state.watching = false;
        }
    }
}

/// The bearer token: the `Authorization` header wins over the form field.
pub fn bearer(headers: &HeaderMap, form_token: Option<&str>) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or(form_token)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// `message` with `authorization: Bearer <token>` when the page gave one.
fn authorized<T>(message: T, token: Option<&str>) -> Result<Request<T>, PanelError> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| PanelError::Form("the token has characters a header cannot carry".into()))?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// A call to the monitor answered within CALL_TIMEOUT (for RunLoadTest: the
/// start of its stream). A unary caller also sends that deadline to the
/// monitor (`grpc-timeout`); RunLoadTest must not, it would bound the stream.
async fn unary<T>(
    what: &'static str,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, PanelError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Err(_) => Err(PanelError::Timeout(what)),
        Ok(answer) => Ok(answer?.into_inner()),
    }
}

fn publish(feed: &Feed, data: &Value) {
    feed.publish(Frame { event: "load", data: data.to_string().into() });
}

/// `GET /api/load`: whether the monitor answers (it runs the tests), whether
/// it wants a token, and the run under way or the last report. A run started
/// elsewhere is followed from here on, so every page sees its progress.
pub async fn available(State(app): State<App>) -> Response {
    let mut request = Request::new(pb::GetLoadTestRequest {});
    request.set_timeout(CALL_TIMEOUT);
    let state = match unary("GetLoadTest", app.feed.client().get_load_test(request)).await {
        Ok(state) => state,
        Err(error) => {
            let reason = match error {
                PanelError::Monitor(status) => format!("the monitor does not answer: {}", describe(&status)),
                other => other.to_string(),
            };
            return Json(json!({ "available": false, "reason": reason, "token_required": null, "current": null }))
                .into_response();
        }
    };
    let token_required = token_required(&app).await;
    let current = match (&state.running, state.progress, &state.last_report) {
        (true, progress, _) => {
            follow_foreign(&app);
            progress.map(|p| load_view::progress_frame(None, &p))
        }
        (false, _, Some(report)) => Some(load_view::report_frame(report, None, None)),
        (false, _, None) => None,
    };
    Json(json!({ "available": true, "token_required": token_required, "current": current })).into_response()
}

/// Whether the monitor wants a token, learned once: from a start the page
/// made, or else from a request the monitor refuses whatever its settings
/// (an empty scenario and a negative duration), which it checks the token
/// of first. None when the monitor did not say (the page then offers the field).
async fn token_required(app: &App) -> Option<bool> {
    if let Some(known) = app.load.lock().token_required {
        return Some(known);
    }
    let probe = pb::RunLoadTestRequest { duration_seconds: -1.0, ..Default::default() };
    let learned = match unary("RunLoadTest", app.feed.client().run_load_test(probe)).await {
        Err(PanelError::Monitor(status)) if status.code() == Code::Unauthenticated => Some(true),
        Err(PanelError::Monitor(status)) if status.code() == Code::InvalidArgument => Some(false),
        _ => None,
    };
    if let Some(required) = learned {
        tracing::debug!(required, "learned whether the monitor requires a token for load tests");
        app.load.learn_token_required(required);
    }
    learned
}

/// `POST /api/load`: starts a run on the monitor and follows its stream.
/// Answers 202 with the first frame once the monitor accepted the run.
pub async fn start(
    State(app): State<App>,
    headers: HeaderMap,
    form: Result<Json<LoadForm>, JsonRejection>,
) -> Response {
    let result = match form {
        Ok(Json(form)) => begin(&app, &headers, &form).await,
        Err(rejection) => Err(PanelError::Form(rejection.body_text())),
    };
    match result {
        Ok(first) => (StatusCode::ACCEPTED, Json(first)).into_response(),
        Err(error) => {
            tracing::info!(%error, "load test not started");
            error.into_response()
        }
    }
}

async fn begin(app: &App, headers: &HeaderMap, form: &LoadForm) -> Result<Value, PanelError> {
    let token = bearer(headers, form.token.as_deref());
    let (request, info) = load_view::request_of(form).map_err(PanelError::Form)?;
    // No grpc-timeout here: it would bound the whole stream, not its start.
    let mut client = app.feed.client();
    let call = client.run_load_test(authorized(request.clone(), token.as_deref())?);
    let stream = match unary("RunLoadTest", call).await {
        Err(PanelError::Monitor(status)) if status.code() == Code::Unauthenticated => {
            app.load.learn_token_required(true);
            return Err(status.into());
        }
        answer => answer?,
    };
    if token.is_none() {
        app.load.learn_token_required(false);
    }
    tracing::info!(scenario = info.scenario, mode = info.mode, "load test started from the dashboard");
    let watching = app.load.watch_own();
    let first = load_view::started_frame(&info, &request);
    publish(&app.feed, &first);
    tokio::spawn(consume(app.feed.clone(), watching, stream, info, first.clone(), app.stop.clone()));
    Ok(first)
}

/// Publishes every progress event of our run and then its report; a stream
/// that fails or goes quiet ends with a `lost` frame saying why.
async fn consume(
    feed: Feed,
    _watching: Watching,
    mut stream: Streaming<pb::LoadTestEvent>,
    info: RunInfo,
    mut last: Value,
    stop: CancellationToken,
) {
    let mut progress = None;
    let reason = loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = tokio::time::timeout(STREAM_STALL, stream.message()) => next,
        };
        match next {
            Err(_) => break format!("no word from the monitor for {} s", STREAM_STALL.as_secs()),
            Ok(Err(status)) => break format!("the monitor's stream failed: {}", describe(&status)),
            Ok(Ok(None)) => break "the monitor ended the stream without a report".to_owned(),
            Ok(Ok(Some(event))) => match event.event {
                Some(Event::Progress(p)) => {
                    last = load_view::progress_frame(Some(&info), &p);
                    progress = Some(p);
                    publish(&feed, &last);
                }
                Some(Event::Report(report)) => {
                    tracing::info!(
                        requests = report.requests,
                        cancelled = report.cancelled,
                        passed = report.passed,
                        "load test report"
                    );
                    publish(&feed, &load_view::report_frame(&report, progress.as_ref(), Some(&info)));
                    return;
                }
                None => {}
            },
        }
    };
    tracing::warn!(reason, "lost the load test's stream");
    publish(&feed, &load_view::lost_frame(&last, &reason));
}

/// Follows a run this frontend did not start (no stream to read): polls
/// GetLoadTest every second until it ends, then publishes its report.
fn follow_foreign(app: &App) {
    let Some(watching) = app.load.watch_foreign() else { return };
    let (feed, stop) = (app.feed.clone(), app.stop.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        let mut last = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut request = Request::new(pb::GetLoadTestRequest {});
            request.set_timeout(CALL_TIMEOUT);
            let answer = unary("GetLoadTest", feed.client().get_load_test(request)).await;
            if !watching.current() {
                return; // this frontend started a run of its own meanwhile
            }
            match answer {
                Err(error) => {
                    let last = last.as_ref().map(|p| load_view::progress_frame(None, p)).unwrap_or_else(|| json!({}));
                    publish(&feed, &load_view::lost_frame(&last, &error.to_string()));
                    return;
                }
                Ok(state) if state.running => {
                    if let Some(p) = state.progress {
                        publish(&feed, &load_view::progress_frame(None, &p));
                        last = Some(p);
                    }
                }
                Ok(state) => {
                    if let Some(report) = state.last_report {
                        publish(&feed, &load_view::report_frame(&report, last.as_ref(), None));
                    }
                    return;
                }
            }
        }
    });
}

/// `POST /api/load/cancel`: cancels the run under way; its stream then ends
/// with the partial report, which every page receives.
pub async fn cancel(State(app): State<App>, headers: HeaderMap) -> Response {
    let token = bearer(&headers, None);
    let result = async {
        let mut request = authorized(pb::CancelLoadTestRequest {}, token.as_deref())?;
        request.set_timeout(CALL_TIMEOUT);
        unary("CancelLoadTest", app.feed.client().cancel_load_test(request)).await
    }
    .await;
    match result {
        Ok(answer) => Json(json!({ "cancelled": answer.cancelled })).into_response(),
        Err(error) => error.into_response(),
    }
}
