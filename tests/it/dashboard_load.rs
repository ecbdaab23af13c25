//! The dashboard's load panel against a real monitor: `POST /api/load`
//! forwards the page's token, the monitor's refusals reach the page as HTTP
//! statuses with the monitor's own message, and every open page receives
//! the run's progress and its report as `load` frames, including a page
//! opened later and a run started somewhere else.

use std::{net::SocketAddr, time::Duration};

use msys::{
    config::ServerArgs,
    frontend::{DashboardArgs, FrontendArgs, FrontendRole},
    pb::{self, monitor_service_client::MonitorServiceClient},
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    load_monitor::monitor_for,
    support::{Flow, TestResult, http_exchange, server_args},
};

const TOKEN: &str = "panel-admin-52c1";

struct Dashboard {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Dashboard {
    async fn start(monitor: SocketAddr) -> Self {
        let args = FrontendArgs {
            port: 0,
            monitor: format!("http://{monitor}"),
            dashboard: DashboardArgs { refresh: Duration::from_secs(1), max_streams: 8 },
            server: ServerArgs { shutdown_grace: Duration::from_secs(3), ..server_args() },
        };
        let role = FrontendRole::build(args).await.expect("frontend builds");
        let addr = role.local_addr().expect("bound");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(role.run_until_stopped(shutdown.clone()));
        Dashboard { addr, shutdown, task }
    }

    /// One HTTP/1.1 exchange: the status code and the JSON body.
    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n\
             {auth}content-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (head, body) = http_exchange(self.addr, &request, Duration::from_secs(15)).await;
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn start_load(&self, token: Option<&str>, body: &str) -> (u16, Value) {
        self.call("POST", "/api/load", token, body).await
    }

    async fn page(&self) -> Page {
        Page::open(self.addr).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        stopped.expect("frontend stops in time").expect("joins").expect("stops cleanly");
    }
}

/// What a browser tab receives: the `/api/events` stream, read as HTTP/1.0
/// (so the body is the bare event stream, without chunk framing).
struct Page {
    stream: TcpStream,
    buffer: String,
}

impl Page {
    async fn open(addr: SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        stream
            .write_all(b"GET /api/events HTTP/1.0\r\nhost: x\r\naccept: text/event-stream\r\n\r\n")
            .await
            .expect("writes");
        let mut page = Page { stream, buffer: String::new() };
        while !page.buffer.contains("\r\n\r\n") {
            page.read_more().await;
        }
        let body = page.buffer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        page.buffer = body;
        page
    }

    async fn read_more(&mut self) {
        let mut chunk = vec![0u8; 16 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(15), self.stream.read(&mut chunk))
            .await
            .expect("the page hears something within 15 s (status frames come every second)")
            .expect("reads");
        assert!(n > 0, "the event stream ended");
        self.buffer.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }

    /// The next `load` frame, skipping snapshots and status frames.
    async fn next_load(&mut self) -> Value {
        loop {
            while let Some((event, rest)) = self.buffer.split_once("\n\n") {
                let (event, rest) = (event.to_owned(), rest.to_owned());
                self.buffer = rest;
                if event.lines().any(|l| l == "event: load") {
                    let data: String =
                        event.lines().filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:"))).collect();
                    return serde_json::from_str(&data).expect("load frames are JSON");
                }
            }
            self.read_more().await;
        }
    }

    /// Reads load frames until one matches, within `timeout`.
    async fn load_until(&mut self, timeout: Duration, what: &str, mut matches: impl FnMut(&Value) -> bool) -> Value {
        let wait = async {
            loop {
                let frame = self.next_load().await;
                if matches(&frame) {
                    return frame;
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| panic!("no load frame where {what} within {timeout:?}"))
    }
}

fn health_run(rate: u32, duration: &str) -> String {
    format!(r#"{{"scenario":"health","rate":{rate},"duration":"{duration}","thresholds":["errors<1%","p99<1ms"]}}"#)
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn the_panel_forwards_the_token_and_maps_the_monitors_refusals_to_http_statuses() -> TestResult {
    let _turn = crate::load::ONE_AT_A_TIME.lock().await;
    let flow = Flow::start().await;
    let monitor = monitor_for(&flow, Some(TOKEN)).await;
    let dashboard = Dashboard::start(monitor.addr).await;

    let (status, probe) = dashboard.call("GET", "/api/load", None, "").await;
    assert_eq!(status, 200);
    assert_eq!((probe["available"].as_bool(), probe["token_required"].as_bool()), (Some(true), Some(true)), "{probe}");

    let (status, body) = dashboard.start_load(None, &health_run(20, "30s")).await;
    assert_eq!(status, 401, "{body}");
    assert!(error_of(&body).contains("authorization: Bearer"), "the monitor's message reaches the page: {body}");
    let (status, body) = dashboard.start_load(Some("guess"), &health_run(20, "30s")).await;
    assert_eq!((status, error_of(&body)), (401, "the admin token is wrong"));
    let (status, body) =
        dashboard.start_load(Some(TOKEN), r#"{"scenario":"everything","rate":5,"duration":"1s"}"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).starts_with("scenario"), "{body}");

    let mut page = dashboard.page().await;
    // The token may also come in the form, as the page's token field sends it.
    let form = format!(r#"{{"scenario":"health","rate":20,"duration":"30s","token":"{TOKEN}"}}"#);
    let (status, first) = dashboard.start_load(None, &form).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!((first["state"].as_str(), first["scenario"].as_str()), (Some("running"), Some("health")));

    let (status, body) = dashboard.start_load(Some(TOKEN), &health_run(20, "1s")).await;
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("already running"), "{body}");

    let progress =
        page.load_until(Duration::from_secs(10), "requests were made", |f| f["requests"].as_u64() > Some(0)).await;
    assert_eq!(progress["state"], "running");
    assert_eq!(progress["target_rps"].as_f64(), Some(20.0), "{progress}");
    assert!(progress["achieved_rps"].as_f64() > Some(0.0), "{progress}");
    assert!(progress["p99_ms"].is_number() && progress["dropped"].is_number(), "{progress}");

    let (status, body) = dashboard.call("POST", "/api/load/cancel", Some("guess"), "{}").await;
    assert_eq!((status, error_of(&body)), (401, "the admin token is wrong"));
    let (status, body) = dashboard.call("POST", "/api/load/cancel", Some(TOKEN), "{}").await;
    assert_eq!((status, body["cancelled"].as_bool()), (200, Some(true)), "{body}");
    let last = page.load_until(Duration::from_secs(5), "the run ended", |f| f["state"] != "running").await;
    assert_eq!(last["state"], "cancelled", "{last}");
    assert_eq!(last["report"]["cancelled"], true, "{last}");

    // A page opened now sees the last run's report at once.
    let mut later = dashboard.page().await;
    let seen = later.load_until(Duration::from_secs(5), "a report is shown", |f| !f["report"].is_null()).await;
    assert_eq!(seen["state"], "cancelled");

    dashboard.stop().await;
    monitor.stop().await;
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_run_started_elsewhere_shows_on_the_page_with_its_report_and_thresholds() -> TestResult {
    let _turn = crate::load::ONE_AT_A_TIME.lock().await;
    let flow = Flow::start().await;
    let monitor = monitor_for(&flow, None).await;
    let dashboard = Dashboard::start(monitor.addr).await;
    let mut page = dashboard.page().await;

    // As `msys load --via-monitor` does: straight to the monitor, not through the dashboard.
    let mut client = MonitorServiceClient::new(monitor.channel().await);
    let request = pb::RunLoadTestRequest {
        scenario: "health".into(),
        rate: 20.0,
        duration_seconds: 5.0,
        thresholds: vec!["errors<1%".into(), "p99<1ms".into()],
        ..Default::default()
    };
    let _events = client.run_load_test(request).await?.into_inner();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (status, probe) = dashboard.call("GET", "/api/load", None, "").await;
    assert_eq!(status, 200);
    assert_eq!(probe["token_required"].as_bool(), Some(false), "{probe}");
    assert_eq!(probe["current"]["state"], "running", "the page is told about the run under way: {probe}");

    let mut followed = Vec::new();
    let last = page
        .load_until(Duration::from_secs(15), "the run ended", |f| {
            followed.push(f["elapsed_s"].as_f64());
            f["state"] != "running"
        })
        .await;
    assert!(followed.iter().any(|e| *e > Some(1.5)), "the page saw the run progress: {followed:?}");
    assert_eq!(last["state"], "failed", "p99<1ms cannot pass: {last}");
    let verdicts: Vec<(&str, bool)> = last["report"]["thresholds"]
        .as_array()
        .expect("verdicts")
        .iter()
        .map(|t| (t["threshold"].as_str().unwrap_or_default(), t["passed"].as_bool().unwrap_or_default()))
        .collect();
    assert_eq!(verdicts, vec![("errors<1%", true), ("p99<1ms", false)]);
    assert_eq!(last["requests"].as_u64(), Some(100), "{last}");

    dashboard.stop().await;
    monitor.stop().await;
    flow.stop().await;
    Ok(())
}
