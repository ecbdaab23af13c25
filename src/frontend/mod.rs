//! The frontend role: the live dashboard on one HTTP port. It reads
//! everything from the monitor's gRPC API (one `WatchSnapshots` stream, plus
//! `GetHistory` when a page opens) and pushes it to browsers over
//! Server-Sent Events, one stream per page. The page itself is a small
//! bundle of our own ES modules and uPlot, embedded in the binary.

pub mod assets;
pub mod feed;
pub mod load;
pub mod load_view;
pub mod routes;
pub mod view;

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::feed::Feed;
use crate::{config::ServerArgs, metrics::Registry};

/// Settings of `msys frontend`.
#[derive(Args, Debug, Clone)]
pub struct FrontendArgs {
    #[arg(long = "port", env = "FRONTEND_PORT", default_value_t = 80)]
    pub port: u16,
    /// The monitor's gRPC address.
    #[arg(long = "monitor", env = "MONITOR_ADDR", default_value = "http://127.0.0.1:50053")]
    pub monitor: String,
    #[command(flatten)]
    pub dashboard: DashboardArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// How the dashboard follows the monitor.
#[derive(Args, Debug, Clone)]
pub struct DashboardArgs {
    /// How often the monitor sends a snapshot to the dashboard.
    #[arg(long, env = "FRONTEND_REFRESH", default_value = "1s", value_parser = humantime::parse_duration)]
    pub refresh: Duration,
    /// Open dashboards (SSE streams) served at once; more get 503.
    #[arg(long, env = "FRONTEND_MAX_STREAMS", default_value_t = 256)]
    pub max_streams: usize,
}

/// A frontend that has bound its port, ready to run.
pub struct FrontendRole {
    listener: TcpListener,
    feed: Feed,
    settings: DashboardArgs,
    metrics: Registry,
    grace: Duration,
    drain_delay: Duration,
}

impl FrontendRole {
    pub async fn build(args: FrontendArgs) -> anyhow::Result<Self> {
        if !(100..=60_000).contains(&args.dashboard.refresh.as_millis()) {
            anyhow::bail!("--refresh must be between 100ms and 60s, not {:?}", args.dashboard.refresh);
        }
        if args.dashboard.max_streams == 0 {
            anyhow::bail!("--max-streams must be at least 1");
        }
        // Three missed snapshots (at least 3 s) mean the monitor stopped
        // talking; the page then says so within 5 s at the default refresh.
        let stall = (args.dashboard.refresh * 3).max(Duration::from_secs(3));
        let metrics = Registry::new("frontend");
        let feed = Feed::new(&args.monitor, args.dashboard.refresh, stall, metrics.clone())?;
        let addr = args.server.addr(args.port)?;
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding HTTP port {addr}"))?;
        if !assets::bundled() {
            tracing::warn!("built without the dashboard bundle; run scripts/build-frontend.sh and rebuild");
        }
        Ok(FrontendRole {
            listener,
            feed,
            settings: args.dashboard,
            metrics,
            grace: args.server.shutdown_grace,
            drain_delay: args.server.drain_delay,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves the dashboard until `shutdown`. Then `/healthz` answers 503 for
    /// the drain delay (so load balancers stop sending pages here) while
    /// everything else still works; then open SSE streams end (they would
    /// hold the drain open for ever otherwise), and the drain itself is
    /// bounded by the grace period.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let FrontendRole { listener, feed, settings, metrics, grace, drain_delay } = self;
        let stop = CancellationToken::new();
        let _stop_after_delay = {
            let (shutdown, stop) = (shutdown.clone(), stop.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::sleep(drain_delay).await;
                stop.cancel();
            })
        };
        tracing::info!(addr = %listener.local_addr()?, "dashboard listening");
        let feed_stop = stop.child_token();
        let follow = tokio::spawn(feed.clone().run(feed_stop.clone()));
        let app = routes::App::new(feed, metrics, settings.max_streams, shutdown.clone(), stop.clone());
        let server = axum::serve(listener, routes::router(app)).with_graceful_shutdown(stop.clone().cancelled_owned());
        let mut server = tokio::spawn(server.into_future());
        let served = tokio::select! {
            result = &mut server => result.context("dashboard server task")?.context("dashboard server failed"),
            _ = stop.cancelled() => match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result.context("dashboard server task")?.context("dashboard server failed"),
                Err(_) => {
                    server.abort();
                    tracing::warn!(?grace, "dashboard connections did not close within the grace period; cut them off");
                    Ok(())
                }
            },
        };
        feed_stop.cancel();
        if tokio::time::timeout(grace, follow).await.is_err() {
            tracing::warn!("the monitor feed did not stop within the grace period");
        }
        tracing::info!("dashboard stopped");
        served
    }
}

/// Runs the frontend role until `shutdown`.
pub async fn run(args: FrontendArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    FrontendRole::build(args).await?.run_until_stopped(shutdown).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A frontend on a free port whose monitor does not exist (nothing listens on port 1).
    async fn start() -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
        start_draining_for(Duration::ZERO).await
    }

    async fn start_draining_for(
        drain_delay: Duration,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let args = FrontendArgs {
            port: 0,
            monitor: "http://127.0.0.1:1".into(),
            dashboard: DashboardArgs { refresh: Duration::from_secs(1), max_streams: 2 },
            server: ServerArgs {
                listen_host: "127.0.0.1".into(),
                shutdown_grace: Duration::from_secs(5),
                drain_delay,
                max_concurrent_requests: 100,
                startup_timeout: Duration::from_secs(1),
            },
        };
        let role = FrontendRole::build(args).await.expect("frontend builds");
        let addr = role.local_addr().expect("bound");
        let token = CancellationToken::new();
        let running = tokio::spawn(role.run_until_stopped(token.clone()));
        (addr, token, running)
    }

    async fn send(addr: SocketAddr, request: &str) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        stream.write_all(request.as_bytes()).await.expect("writes");
        stream
    }

    /// Sends `request` (which asks for `connection: close`) and reads the whole answer.
    async fn exchange(addr: SocketAddr, request: &str, within: Duration) -> String {
        let mut stream = send(addr, request).await;
        let mut answer = String::new();
        tokio::time::timeout(within, stream.read_to_string(&mut answer))
            .await
            .expect("answers in time")
            .expect("reads");
        answer
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        exchange(addr, &request, Duration::from_secs(5)).await
    }

    async fn post(addr: SocketAddr, path: &str, body: &str) -> String {
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        exchange(addr, &request, Duration::from_secs(10)).await
    }

    #[tokio::test]
    async fn without_a_monitor_the_load_panel_says_why_it_cannot_run_a_test() {
        let (addr, token, running) = start().await;
        let probe = get(addr, "/api/load").await;
        assert!(probe.starts_with("HTTP/1.1 200") && probe.contains("\"available\":false"), "{probe}");
        assert!(probe.contains("the monitor does not answer"), "{probe}");
        let good = r#"{"scenario":"users","rate":10,"duration":"2s"}"#;
        let refused = post(addr, "/api/load", good).await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("the monitor is unreachable"), "{refused}");
        // The form is checked before the monitor is asked.
        let bad = post(addr, "/api/load", r#"{"scenario":"users","duration":"2s"}"#).await;
        assert!(bad.starts_with("HTTP/1.1 400") && bad.contains("give a rate"), "{bad}");
        let garbled = post(addr, "/api/load", "{not json").await;
        assert!(garbled.starts_with("HTTP/1.1 400") && garbled.contains("\"error\""), "{garbled}");
        let cancel = post(addr, "/api/load/cancel", "{}").await;
        assert!(cancel.starts_with("HTTP/1.1 503"), "{cancel}");
        token.cancel();
        running.await.expect("joins").expect("stops cleanly");
    }

    #[tokio::test]
    async fn every_answer_carries_the_security_headers() {
        let (addr, token, running) = start().await;
        for path in ["/", "/healthz", "/api/snapshot", "/no-such-file"] {
            let answer = get(addr, path).await.to_ascii_lowercase();
            assert!(answer.contains("content-security-policy: default-src 'self'"), "{path}: {answer}");
            assert!(answer.contains("frame-ancestors 'none'"), "{path}");
            assert!(!answer.contains("unsafe-inline"), "{path}");
            assert!(answer.contains("x-content-type-options: nosniff"), "{path}");
        }
        token.cancel();
        running.await.expect("joins").expect("stops cleanly");
    }

    #[tokio::test]
    async fn without_a_monitor_the_api_says_so_plainly() {
        let (addr, token, running) = start().await;
        let snapshot = get(addr, "/api/snapshot").await;
        assert!(snapshot.starts_with("HTTP/1.1 503"), "{snapshot}");
        assert!(snapshot.contains("no snapshot from the monitor yet"));
        let bad = get(addr, "/api/history?window=0").await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        assert!(bad.contains("window must be"));
        let health = get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200") && health.contains("\"monitor\":\"unreachable\""), "{health}");
        token.cancel();
        running.await.expect("joins").expect("stops cleanly");
    }

    #[tokio::test]
    async fn open_event_streams_end_when_the_role_stops() {
        let (addr, token, running) = start().await;
        let mut stream = send(addr, "GET /api/events HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n").await;
        let mut buffer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("first frame in time")
            .expect("reads");
        let head = String::from_utf8_lossy(&buffer[..n]);
        assert!(head.contains("text/event-stream"), "{head}");
        token.cancel();
        // The drain would wait for ever on an endless stream; it must end well within the grace.
        let stopped = tokio::time::timeout(Duration::from_secs(3), running).await;
        stopped.expect("stopped before the grace period ran out").expect("joins").expect("stops cleanly");
        let mut rest = Vec::new();
        let eof = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut rest)).await;
        assert!(eof.is_ok(), "the browser's stream was not closed");
    }

    #[tokio::test]
    async fn while_draining_healthz_says_so_and_pages_are_still_served() {
        let (addr, token, running) = start_draining_for(Duration::from_secs(1)).await;
        token.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let health = get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 503") && health.contains("draining"), "{health}");
        assert!(get(addr, "/api/snapshot").await.contains("no snapshot from the monitor yet"));
        let stopped = tokio::time::timeout(Duration::from_secs(4), running).await;
        stopped.expect("stopped after the drain delay").expect("joins").expect("stops cleanly");
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_prometheus_format() {
        let (addr, token, running) = start().await;
        let _ = get(addr, "/healthz").await;
        let answer = get(addr, "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        for name in ["msys_http_requests_total", "msys_http_request_duration_seconds", "msys_monitor_stream_up 0"] {
            assert!(answer.contains(name), "{name} missing from /metrics:\n{answer}");
        }
        // promtool lints it when installed (scripts/test.sh installs it).
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned();
        if let Ok(mut child) = tokio::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(body.as_bytes()).await.expect("writes to promtool");
            drop(stdin);
            let output = child.wait_with_output().await.expect("promtool runs");
            assert!(
                output.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        token.cancel();
        running.await.expect("joins").expect("stops cleanly");
    }

    #[tokio::test]
    async fn streams_beyond_the_limit_are_refused_with_a_reason() {
        let (addr, token, running) = start().await;
        let request = "GET /api/events HTTP/1.1\r\nhost: x\r\n\r\n";
        let _first = send(addr, request).await;
        let _second = send(addr, request).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let third = get(addr, "/api/events").await;
        assert!(third.starts_with("HTTP/1.1 503"), "{third}");
        assert!(third.contains("too many open dashboards"));
        token.cancel();
        running.await.expect("joins").expect("stops cleanly");
    }
}
