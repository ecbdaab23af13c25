//! The order role: orders in their own PostgreSQL, served over gRPC, for
//! the users it learns about from `user-events`.

pub mod apply;
pub mod arrivals;
pub mod domain;
pub mod partition;
pub mod replica;
pub mod repo;
pub mod service;

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::Args;
use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes;

use self::{
    arrivals::Arrivals,
    replica::{Replica, ReplicaSettings},
};
use crate::{
    config::{KafkaArgs, OrderPostgresArgs, PostgresSettings, ServerArgs},
    db, grpc,
    metrics::{self, Registry},
    migrate,
    pb::order_service_server::OrderServiceServer,
    retention,
    shutdown::{self, Supervisor},
};

const SERVICE_NAME: &str = "msys.v1.OrderService";

/// Settings of `msys order`.
#[derive(Args, Debug, Clone)]
pub struct OrderArgs {
    #[arg(long = "port", env = "ORDER_SERVICE_PORT", default_value_t = 50052)]
    pub port: u16,
    /// HTTP port of GET /metrics (Prometheus); 0 picks a free one.
    #[arg(long = "metrics-port", env = "ORDER_METRICS_PORT", default_value_t = 9452)]
    pub metrics_port: u16,
    #[command(flatten)]
    pub postgres: OrderPostgresArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub replica: ReplicaArgs,
}

/// How the order role follows `user-events`.
#[derive(Args, Debug, Clone)]
pub struct ReplicaArgs {
    /// Order processes in the same group share the topic's partitions.
    #[arg(long, env = "ORDER_CONSUMER_GROUP", default_value = "order-service")]
    pub consumer_group: String,
    /// Where records that are not valid user events go.
    #[arg(long, env = "USER_EVENTS_DLQ_TOPIC", default_value = "user-events.dlq")]
    pub dlq_topic: String,
    /// How long CreateOrder waits for a just-created user's event before
    /// answering FAILED_PRECONDITION.
    #[arg(long, env = "ORDER_USER_WAIT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub user_wait: Duration,
    /// CreateOrder calls waiting for their user at once at most; more are
    /// answered RESOURCE_EXHAUSTED instead of piling up.
    #[arg(long, env = "ORDER_MAX_USER_WAITERS", default_value_t = 1000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_user_waiters: usize,
    /// While CreateOrder calls wait, how often one query looks for their
    /// users in case another order process applied them (users this process
    /// applies wake their calls at once): the most such a call waits longer
    /// than it has to.
    #[arg(long, env = "ORDER_USER_SWEEP_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub user_sweep_interval: Duration,
    /// Ids of applied events are kept this long (by the database's clock)
    /// to recognise redeliveries, then deleted; version gating makes an
    /// event redelivered after that harmless.
    #[arg(long, env = "ORDER_APPLIED_EVENTS_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub applied_events_retention: Duration,
    /// How often applied event ids past the retention are deleted.
    #[arg(long, env = "ORDER_PRUNE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub prune_interval: Duration,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
}

/// How the replica's consumer reads and applies `user-events`; the defaults
/// suit both nisshi and Apache Kafka (see `config/msys.env.example`).
#[derive(Args, Debug, Clone)]
pub struct ConsumerArgs {
    /// Most records applied in one PostgreSQL transaction.
    #[arg(long, env = "ORDER_APPLY_BATCH", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub apply_batch: u32,
    /// How long the broker may hold a fetch that finds no data
    /// (`fetch.wait.max.ms`); the floor of the event lag on nisshi.
    #[arg(long, env = "ORDER_FETCH_WAIT_MAX", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub fetch_wait_max: Duration,
    /// A member silent this long is dropped from the group and its
    /// partitions move to the others (`session.timeout.ms`).
    #[arg(long, env = "ORDER_SESSION_TIMEOUT", default_value = "6s", value_parser = humantime::parse_duration)]
    pub session_timeout: Duration,
    /// How often a member tells the group it is alive; survivors learn of a
    /// rebalance at their next heartbeat (`heartbeat.interval.ms`).
    #[arg(long, env = "ORDER_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Static membership (`group.instance.id`): a member that restarts with
    /// the same id within the session timeout keeps its partitions without a
    /// rebalance. Empty: dynamic membership. Unique per process.
    #[arg(long, env = "ORDER_GROUP_INSTANCE_ID", default_value = "")]
    pub group_instance_id: String,
    /// A batch retried this long (e.g. the orders database is down) logs a
    /// warning and makes the OrderService NOT_SERVING until it applies.
    #[arg(long, env = "ORDER_APPLY_STALL_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stall_after: Duration,
}

impl Default for ConsumerArgs {
    fn default() -> Self {
        ConsumerArgs {
            apply_batch: 500,
            fetch_wait_max: Duration::from_millis(50),
            session_timeout: Duration::from_secs(6),
            heartbeat_interval: Duration::from_secs(1),
            group_instance_id: String::new(),
            stall_after: Duration::from_secs(30),
        }
    }
}

/// An order role that has connected, migrated and bound its port.
pub struct OrderRole {
    listener: TcpListener,
    metrics_listener: TcpListener,
    pool: Pool,
    replica: Replica,
    arrivals: Arrivals,
    metrics: Registry,
    user_wait: Duration,
    sweep_interval: Duration,
    max_user_waiters: usize,
    server: ServerArgs,
    retention: (Duration, Duration),
}

impl OrderRole {
    pub async fn build(args: OrderArgs) -> anyhow::Result<Self> {
        let postgres = PostgresSettings::from(args.postgres.clone());
        db::wait_for_database(&postgres, args.server.startup_timeout).await?;
        let pool = db::pool(&postgres)?;
        migrate::run(&pool, migrate::ORDERS).await.context("migrating the orders database")?;
        let metrics = Registry::new("order");
        db::export_pool_metrics(&pool, &metrics);
        let consumer = &args.replica.consumer;
        let settings = ReplicaSettings {
            group: args.replica.consumer_group.clone(),
            dlq_topic: args.replica.dlq_topic.clone(),
            batch_size: consumer.apply_batch as usize,
            fetch_wait_max: consumer.fetch_wait_max,
            session_timeout: consumer.session_timeout,
            heartbeat_interval: consumer.heartbeat_interval,
            group_instance_id: Some(consumer.group_instance_id.clone()).filter(|id| !id.is_empty()),
            stall_after: consumer.stall_after,
        };
        let arrivals = Arrivals::new(metrics.clone());
        let replica = Replica::new(pool.clone(), args.kafka.clone(), settings, arrivals.clone(), metrics.clone())?;
        let listener = grpc::bind(args.server.addr(args.port)?).await?;
        let metrics_listener = metrics::http::bind(args.server.addr(args.metrics_port)?).await?;
        Ok(OrderRole {
            listener,
            metrics_listener,
            pool,
            replica,
            arrivals,
            metrics,
            user_wait: args.replica.user_wait,
            sweep_interval: args.replica.user_sweep_interval,
            max_user_waiters: args.replica.max_user_waiters,
            server: args.server,
            retention: (args.replica.applied_events_retention, args.replica.prune_interval),
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Where `GET /metrics` is served.
    pub fn metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.metrics_listener.local_addr()?)
    }

    /// Serves and consumes until `shutdown`, or until a background task
    /// dies; then reports NOT_SERVING, keeps serving for the drain delay,
    /// stops taking RPCs, lets in-flight ones finish, commits offsets and
    /// leaves the group.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let OrderRole {
            listener,
            metrics_listener,
            pool,
            replica,
            arrivals,
            metrics,
            user_wait,
            sweep_interval,
            max_user_waiters,
            server,
            retention: (retention, prune_every),
        } = self;
        tracing::info!(addr = %listener.local_addr()?, "order service listening");
        let (reporter, health) = tonic_health::server::health_reporter();
        grpc::set_health(&reporter, &[SERVICE_NAME], false).await;
        let api = service::OrderApi::new(pool.clone(), arrivals.clone(), user_wait, max_user_waiters, metrics.clone());
        let routes = Routes::new(health).add_service(OrderServiceServer::new(api));

        let tasks = TaskTracker::new();
        let role = shutdown.child_token();
        let supervisor = Supervisor::new(tasks.clone(), role.clone());
        // The server is SERVING while the orders database answers; the
        // OrderService once the consumer has joined its group too, so
        // "ready" means CreateOrder sees users as soon as they are created;
        // a partition stuck on a batch (see ORDER_APPLY_STALL_AFTER) makes
        // it NOT_SERVING, with the reason logged when it changes.
        let shared = replica.shared();
        let mut last_reason = None;
        let probe_pool = pool.clone();
        let probe = move || {
            let (pool, shared) = (probe_pool.clone(), shared.clone());
            let stalled = shared.stalled();
            if stalled != last_reason {
                match &stalled {
                    Some(reason) => tracing::warn!(service = SERVICE_NAME, %reason, "not ready: the replica is stuck"),
                    None if last_reason.is_some() => tracing::info!(service = SERVICE_NAME, "the replica moves again"),
                    None => {}
                }
                last_reason = stalled.clone();
            }
            async move {
                let database = db::ping(&pool, Duration::from_secs(2)).await;
                let joined = shared.joined.load(std::sync::atomic::Ordering::Relaxed);
                grpc::Probe { database, ready: joined && stalled.is_none() }
            }
        };
        let watcher = CancellationToken::new();
        let watch = grpc::watch_health(reporter.clone(), SERVICE_NAME, watcher.clone(), probe).await;
        supervisor.spawn("health watcher", watcher.clone(), watch);
        // The consumer and the sweep stop after the RPCs drained: CreateOrder
        // calls still in flight may be waiting for an event about to land.
        let background = CancellationToken::new();
        let serving_metrics = metrics::http::run(metrics_listener, metrics.clone(), background.clone());
        supervisor.spawn("metrics endpoint", background.clone(), serving_metrics);
        let consumer = supervisor.spawn("event consumer", background.clone(), replica.run(background.clone()));
        let pruning =
            retention::run(pool.clone(), retention::APPLIED_EVENTS, retention, prune_every, background.clone());
        supervisor.spawn("applied events pruning", background.clone(), pruning);
        supervisor.spawn(
            "arrivals sweep",
            background.clone(),
            arrivals.sweep(pool, sweep_interval, background.clone()),
        );
        let stop_accepting = CancellationToken::new();
        tasks.spawn(shutdown::drain_in_order(
            role.clone(),
            watcher.clone(),
            reporter.clone(),
            &[SERVICE_NAME],
            server.drain_delay,
            stop_accepting.clone(),
        ));
        tasks.close();

        let (grace, limit) = (server.shutdown_grace, server.max_concurrent_requests);
        let served = grpc::serve_limited(listener, routes, metrics, stop_accepting.clone(), grace, limit).await;
        stop_accepting.cancel();
        watcher.cancel();
        grpc::set_health(&reporter, &[SERVICE_NAME], false).await;
        background.cancel();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks did not stop within the grace period");
            consumer.abort();
        }
        tracing::info!("order service stopped");
        served.and(supervisor.result())
    }
}

/// Runs the order role until `shutdown`.
pub async fn run(args: OrderArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let role = tokio::select! {
        role = OrderRole::build(args) => role?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    role.run_until_stopped(shutdown).await
}
