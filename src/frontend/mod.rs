//! The frontend role: the live dashboard on one HTTP port. It reads
//! everything from the monitor's gRPC API (one `WatchSnapshots` stream, plus
//! `GetHistory` when a page opens) and pushes it to browsers over
//! Server-Sent Events, one stream per page. The page itself is a small
//! bundle of our own ES modules and uPlot, embedded in the binary.

pub mod assets;
pub mod feed;
pub mod load;
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
        let feed = Feed::new(&args.monitor, args.dashboard.refresh, stall)?;
        let addr = args.server.addr(args.port)?;
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding HTTP port {addr}"))?;
        if !assets::bundled() {
            tracing::warn!("built without the dashboard bundle; run scripts/build-frontend.sh and rebuild");
        }
        Ok(FrontendRole {
            listener,
            feed,
            settings: args.dashboard,
            metrics: Registry::new("frontend"),
            grace: args.server.shutdown_grace,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves the dashboard until `shutdown`. Open SSE streams end when the
    /// token fires (they would hold the drain open for ever otherwise), and
    /// the drain itself is bounded by the grace period.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let FrontendRole { listener, feed, settings, metrics, grace } = self;
        tracing::info!(addr = %listener.local_addr()?, "dashboard listening");
        let feed_stop = shutdown.child_token();
        let follow = tokio::spawn(feed.clone().run(feed_stop.clone()));
        let app = routes::App::new(feed, metrics, settings.max_streams, shutdown.clone());
        let server =
            axum::serve(listener, routes::router(app)).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let mut server = tokio::spawn(server.into_future());
        let served = tokio::select! {
            result = &mut server => result.context("dashboard server task")?.context("dashboard server failed"),
            _ = shutdown.cancelled() => match tokio::time::timeout(grace, &mut server).await {
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
