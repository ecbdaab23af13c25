//! `/api/load`: starts and cancels a load test on the monitor for the page.
//! The page's token (when the monitor requires one) travels as the bearer
//! token of the gRPC call; the frontend keeps no secret of its own. Progress
//! and the final report reach every open page as `load` SSE frames.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::json;

use super::routes::App;

/// What the page's load panel sends.
#[derive(Deserialize, Debug)]
pub struct LoadForm {
    pub scenario: String,
    #[serde(default)]
    pub rate: Option<f64>,
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// e.g. "10s".
    pub duration: String,
    #[serde(default)]
    pub profile: Option<String>,
    /// Gates such as `p99<50ms`, `errors<1%`, judged in the final report.
    #[serde(default)]
    pub thresholds: Vec<String>,
    /// The admin token, when the monitor requires one.
    #[serde(default)]
    pub token: Option<String>,
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
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

/// Whether this build can run load tests, so the page can say why not.
pub async fn available(State(_app): State<App>) -> Response {
    Json(json!({
        "available": false,
        "reason": "this build's monitor API has no RunLoadTest yet; use `msys load` meanwhile",
    }))
    .into_response()
}

pub async fn start(State(_app): State<App>, headers: HeaderMap, Json(form): Json<LoadForm>) -> Response {
    let _token = bearer(&headers, form.token.as_deref());
    if form.scenario.trim().is_empty() {
        return problem(StatusCode::BAD_REQUEST, "scenario is required");
    }
    problem(
        StatusCode::NOT_IMPLEMENTED,
        "this monitor build has no RunLoadTest yet; start load tests with `msys load` meanwhile",
    )
}

pub async fn cancel(State(_app): State<App>, headers: HeaderMap) -> Response {
    let _token = bearer(&headers, None);
    problem(StatusCode::NOT_IMPLEMENTED, "this monitor build has no CancelLoadTest yet")
}
