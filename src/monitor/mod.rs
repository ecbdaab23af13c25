//! The monitor role: one truthful, live view of both services, both
//! databases and Kafka, measured from outside over the network (the roles'
//! health and GetMetrics, SQL on each PostgreSQL, the broker's watermarks and
//! the group's committed offsets), served as snapshots, a stream of them and
//! a bounded history.

pub mod collect;
pub mod history;
pub mod kafka;
pub mod postgres;
pub mod service;
pub mod services;
pub mod status;
pub mod table;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::bail;
use clap::Args;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes;

use self::{
    collect::{Collector, Shared},
    history::History,
    kafka::KafkaTarget,
    postgres::PostgresTarget,
    services::ServiceTarget,
    status::Rules,
};
use crate::{
    config::{KafkaArgs, OrderPostgresArgs, PostgresSettings, ServerArgs, UserPostgresArgs},
    grpc,
    metrics::{self, Registry},
    pb::{self, monitor_service_server::MonitorServiceServer},
};

const SERVICE_NAME: &str = "msys.v1.MonitorService";

/// Settings of `msys monitor`.
#[derive(Args, Debug, Clone)]
pub struct MonitorArgs {
    #[arg(long = "port", env = "MONITOR_SERVICE_PORT", default_value_t = 50053)]
    pub port: u16,
    /// HTTP port of the monitor's own GET /metrics (Prometheus).
    #[arg(long = "metrics-port", env = "MONITOR_METRICS_PORT", default_value_t = 9453)]
    pub metrics_port: u16,
    /// The user role's gRPC address.
    #[arg(long, env = "MONITOR_USER_ADDR", default_value = "http://127.0.0.1:50051")]
    pub user_addr: String,
    /// The order role's gRPC address.
    #[arg(long, env = "MONITOR_ORDER_ADDR", default_value = "http://127.0.0.1:50052")]
    pub order_addr: String,
    /// The consumer group whose lag and status are watched.
    #[arg(long, env = "MONITOR_CONSUMER_GROUP", default_value = "order-service")]
    pub consumer_group: String,
    /// The dead-letter topic whose records are counted.
    #[arg(long, env = "USER_EVENTS_DLQ_TOPIC", default_value = "user-events.dlq")]
    pub dlq_topic: String,
    #[command(flatten)]
    pub user_postgres: UserPostgresArgs,
    #[command(flatten)]
    pub order_postgres: OrderPostgresArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub collect: CollectArgs,
    /// Load tests (RunLoadTest): the admin token and the limits.
    #[command(flatten)]
    pub load: crate::load::service::LoadServiceArgs,
}

/// How often and how patiently the monitor looks (shared with `msys all`).
#[derive(Args, Debug, Clone)]
pub struct CollectArgs {
    /// Time between two snapshots.
    #[arg(long = "interval", env = "MONITOR_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Deadline of each probe; capped at 80% of the interval so one
    /// collection always ends before the next is due.
    #[arg(long = "probe-timeout", env = "MONITOR_PROBE_TIMEOUT", default_value = "800ms", value_parser = humantime::parse_duration)]
    pub probe_timeout: Duration,
    /// How far back the consumer status looks (Burrow's window).
    #[arg(long = "status-window", env = "MONITOR_STATUS_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    pub status_window: Duration,
    /// A committed offset that has not moved for this long while records
    /// wait makes the partition STOPPED rather than STALLED.
    #[arg(long = "stop-after", env = "MONITOR_STOP_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stop_after: Duration,
    /// How much history to keep in memory for late-joining dashboards.
    #[arg(long = "history", env = "MONITOR_HISTORY", default_value = "15m", value_parser = humantime::parse_duration)]
    pub history: Duration,
}

/// A monitor that has bound its port and set up its probes.
pub struct MonitorRole {
    listener: TcpListener,
    metrics_listener: TcpListener,
    collector: Collector,
    shared: Arc<Shared>,
    metrics: Registry,
    grace: Duration,
    /// What RunLoadTest needs: the targets, the broker, the token and limits.
    load: (crate::load::scenario::Targets, KafkaArgs, crate::load::service::LoadServiceArgs),
}

impl MonitorRole {
    pub async fn build(args: MonitorArgs) -> anyhow::Result<Self> {
        let c = &args.collect;
        if c.interval < Duration::from_millis(100) || c.interval > Duration::from_secs(60) {
            bail!("--interval must be between 100ms and 60s, got {:?}", c.interval);
        }
        if c.stop_after < c.status_window {
            bail!("--stop-after ({:?}) must not be shorter than --status-window ({:?})", c.stop_after, c.status_window);
        }
        let deadline = c.probe_timeout.min(c.interval.mul_f64(0.8));
        let listener = grpc::bind(args.server.addr(args.port)?).await?;
        let local = listener.local_addr()?;
        let metrics_listener = metrics::http::bind(args.server.addr(args.metrics_port)?).await?;
        let metrics = Registry::new("monitor");
        let services = vec![
            ServiceTarget::remote("user", &args.user_addr, "msys.v1.UserService", deadline)?,
            ServiceTarget::remote("order", &args.order_addr, "msys.v1.OrderService", deadline)?,
            ServiceTarget::local("monitor", format!("http://{local}"), metrics.clone()),
        ];
        let users_db = PostgresTarget::new("users_db", PostgresSettings::from(args.user_postgres), true);
        let orders_db = PostgresTarget::new("orders_db", PostgresSettings::from(args.order_postgres), false);
        let rules = Rules { window: c.status_window, stop_after: c.stop_after };
        let kafka = KafkaTarget::new(&args.kafka, &args.consumer_group, &args.dlq_topic, rules)?;
        let collector = Collector::new(services, users_db, orders_db, kafka, deadline, c.interval);
        let shared = Arc::new(Shared {
            latest: tokio::sync::watch::Sender::new(Arc::new(pb::Snapshot::default())),
            history: std::sync::Mutex::new(History::new(c.history, c.interval)),
            interval: c.interval,
        });
        let targets =
            crate::load::scenario::Targets { user_addr: args.user_addr.clone(), order_addr: args.order_addr.clone() };
        let load = (targets, args.kafka.clone(), args.load);
        Ok(MonitorRole {
            listener,
            metrics_listener,
            collector,
            shared,
            metrics,
            grace: args.server.shutdown_grace,
            load,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Where `GET /metrics` is served.
    pub fn metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.metrics_listener.local_addr()?)
    }

    /// Takes a first snapshot, then serves and collects until `shutdown`.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let MonitorRole { listener, metrics_listener, mut collector, shared, metrics, grace, load } = self;
        tracing::info!(addr = %listener.local_addr()?, interval = ?collector.interval, "monitor listening");
        let (reporter, health) = tonic_health::server::health_reporter();
        grpc::set_health(&reporter, &[SERVICE_NAME], false).await;
        // GetSnapshot never answers an empty snapshot: the first is taken now.
        tokio::select! {
            _ = collector.collect_into(&shared) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        let (targets, kafka, load_args) = load;
        let load = crate::load::service::LoadRunner::new(
            targets,
            kafka,
            load_args,
            Some(shared.latest.subscribe()),
            shutdown.clone(),
        );
        let api = service::MonitorApi::new(shared.clone(), shutdown.clone(), Arc::new(load));
        let routes = Routes::new(health).add_service(MonitorServiceServer::new(api));
        let tasks = TaskTracker::new();
        let background = shutdown.child_token();
        tasks.spawn(collector.run(shared, background.clone()));
        tasks.spawn(metrics::http::run(metrics_listener, metrics.clone(), background.clone()));
        tasks.close();
        grpc::set_health(&reporter, &[SERVICE_NAME], true).await;

        let served = grpc::serve(listener, routes, metrics, shutdown.clone(), grace).await;
        grpc::set_health(&reporter, &[SERVICE_NAME], false).await;
        background.cancel();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!("the collector did not stop within the grace period");
        }
        tracing::info!("monitor stopped");
        served
    }
}

/// Runs the monitor until `shutdown`.
pub async fn run(args: MonitorArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let role = tokio::select! {
        role = MonitorRole::build(args) => role?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    role.run_until_stopped(shutdown).await
}
