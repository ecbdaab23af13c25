//! The dashboard's static files, embedded in the binary so `msys frontend`
//! needs nothing beside it (offline, one file to deploy). The bundle is built
//! by `scripts/build-frontend.sh` into `frontend/dist/` (git-ignored); a plain
//! `cargo build` on a machine without node still compiles, and the page then
//! says how to build the assets instead of failing.

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use rust_embed::RustEmbed;

/// `debug-embed` makes debug builds embed too, so tests serve exactly what a
/// release would; `allow_missing` keeps the build working without the bundle.
#[derive(RustEmbed)]
#[folder = "frontend/dist/"]
#[allow_missing = true]
struct Bundle;

/// What the page says when the binary was built without the bundle.
const MISSING_BUNDLE: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>msys dashboard: assets not built</title></head><body>\
<h1>The dashboard's assets are not in this build</h1>\
<p>This msys binary was compiled without the web bundle (it needs node and npm).</p>\
<p>Build it and recompile: <code>scripts/build-frontend.sh &amp;&amp; cargo build</code> \
(<code>scripts/start.sh</code> and <code>scripts/test.sh</code> do both).</p>\
<p>The JSON API still answers: <a href=\"/api/snapshot\">/api/snapshot</a>.</p>\
</body></html>";

/// True when the bundle was embedded at build time.
pub fn bundled() -> bool {
    Bundle::get("index.html").is_some()
}

/// Serves `/` and every embedded file; anything else is 404.
pub async fn serve(uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    match Bundle::get(path) {
        Some(file) => {
            let mime = file.metadata.mimetype();
            let mut response = Body::from(file.data.into_owned()).into_response();
            let headers = response.headers_mut();
            if let Ok(value) = HeaderValue::from_str(mime) {
                headers.insert(header::CONTENT_TYPE, value);
            }
            // File names carry no hash, so browsers revalidate; the bundle is small.
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
        None if path == "index.html" => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"))],
            MISSING_BUNDLE,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}
