//! The user role: users in their own PostgreSQL, served over gRPC, every
//! change published to `user-events` through the transactional outbox.

pub mod domain;
pub mod outbox;
pub mod repo;
pub mod service;

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::{Args, builder::RangedU64ValueParser};
use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes;

use self::outbox::{Relay, RelaySettings};
use crate::{
    batch::BatchLimits,
    config::{KafkaArgs, PostgresSettings, ServerArgs, UserPostgresArgs},
    db, grpc,
    metrics::{self, Registry},
    migrate,
    pb::user_service_server::UserServiceServer,
    retention,
    shutdown::{self, Supervisor},
};

const SERVICE_NAME: &str = "msys.v1.UserService";

/// Settings of `msys user`.
#[derive(Args, Debug, Clone)]
pub struct UserArgs {
    #[arg(long = "port", env = "USER_SERVICE_PORT", default_value_t = 50051)]
    pub port: u16,
    /// HTTP port of GET /metrics (Prometheus); 0 picks a free one.
    #[arg(long = "metrics-port", env = "USER_METRICS_PORT", default_value_t = 9451)]
    pub metrics_port: u16,
    #[command(flatten)]
    pub postgres: UserPostgresArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub relay: RelayArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
}

/// How concurrent CreateUser and GetUser calls share statements (see `batch`).
#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// Calls sent to PostgreSQL as one statement at most; 1 sends each alone.
    #[arg(long, env = "USER_BATCH_MAX", default_value_t = 128,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub batch_max: usize,
    /// Statements of each kind (creates, reads) at PostgreSQL at once; each
    /// holds a pooled connection while it runs. Two keeps one batch filling
    /// while the other runs: under GetUser load on 2 cores it served ~15% more
    /// reads than 4 (bigger batches, fewer round trips), and CreateUser the same.
    #[arg(long, env = "USER_BATCH_IN_FLIGHT", default_value_t = 2,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000))]
    pub batch_in_flight: usize,
}

impl From<&BatchArgs> for BatchLimits {
    fn from(a: &BatchArgs) -> Self {
        BatchLimits { max_batch: a.batch_max, in_flight: a.batch_in_flight }
    }
}

/// The outbox relay's knobs.
#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    /// Rows published per pass.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 500)]
    pub outbox_batch_size: i64,
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub outbox_poll_interval: Duration,
    #[arg(long, env = "KAFKA_MESSAGE_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub kafka_message_timeout: Duration,
    /// Published rows are kept this long (by the database's clock), then deleted.
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub outbox_retention: Duration,
    /// How often published rows past the retention are deleted; its own
    /// schedule, whether or not the relay is busy.
    #[arg(long, env = "OUTBOX_PRUNE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub outbox_prune_interval: Duration,
}

impl From<&RelayArgs> for RelaySettings {
    fn from(a: &RelayArgs) -> Self {
        RelaySettings {
            batch_size: a.outbox_batch_size.max(1),
            poll_interval: a.outbox_poll_interval,
            message_timeout: a.kafka_message_timeout,
        }
    }
}

/// A user role that has connected, migrated and bound its port, ready to run.
pub struct UserRole {
    listener: TcpListener,
    metrics_listener: TcpListener,
    pool: Pool,
    relay: Relay,
    metrics: Registry,
    batch: BatchLimits,
    server: ServerArgs,
    relay_args: RelayArgs,
}

impl UserRole {
    pub async fn build(args: UserArgs) -> anyhow::Result<Self> {
        let postgres = PostgresSettings::from(args.postgres.clone());
        db::wait_for_database(&postgres, args.server.startup_timeout).await?;
        let pool = db::pool(&postgres)?;
        migrate::run(&pool, migrate::USERS).await.context("migrating the users database")?;
        let metrics = Registry::new("user");
        db::export_pool_metrics(&pool, &metrics);
        let relay = Relay::new(pool.clone(), args.kafka.clone(), (&args.relay).into(), metrics.clone())?;
        let listener = grpc::bind(args.server.addr(args.port)?).await?;
        let metrics_listener = metrics::http::bind(args.server.addr(args.metrics_port)?).await?;
        Ok(UserRole {
            listener,
            metrics_listener,
            pool,
            relay,
            metrics,
            batch: (&args.batch).into(),
            server: args.server,
            relay_args: args.relay,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Where `GET /metrics` is served.
    pub fn metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.metrics_listener.local_addr()?)
    }

    /// Serves and relays until `shutdown`, or until a background task dies;
    /// then reports NOT_SERVING, keeps serving for the drain delay, stops
    /// taking RPCs, drains them, stops the relay and flushes the producer.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let UserRole { listener, metrics_listener, pool, relay, metrics, batch, server, relay_args } = self;
        tracing::info!(addr = %listener.local_addr()?, "user service listening");
        let (reporter, health) = tonic_health::server::health_reporter();
        grpc::set_health(&reporter, &[SERVICE_NAME], false).await;
        let tasks = TaskTracker::new();
        let role = shutdown.child_token();
        let supervisor = Supervisor::new(tasks.clone(), role.clone());
        let api = service::UserApi::new(pool.clone(), relay.waker(), batch, metrics.clone(), &tasks);
        let routes = Routes::new(health).add_service(UserServiceServer::new(api));

        // The relay goes on through the drain: requests taken meanwhile
        // still have their events published by this process.
        let background = CancellationToken::new();
        supervisor.spawn("outbox relay", background.clone(), relay.run(background.clone()));
        let serving_metrics = metrics::http::run(metrics_listener, metrics.clone(), background.clone());
        supervisor.spawn("metrics endpoint", background.clone(), serving_metrics);
        let (retention, every) = (relay_args.outbox_retention, relay_args.outbox_prune_interval);
        let pruning = retention::run(pool.clone(), retention::OUTBOX, retention, every, background.clone());
        supervisor.spawn("outbox pruning", background.clone(), pruning);
        let gauges = watch_backlog(pool.clone(), metrics.clone(), background.clone());
        supervisor.spawn("outbox backlog gauge", background.clone(), gauges);
        // SERVING while the database answers `SELECT 1`. The broker is
        // deliberately not part of it: while Kafka is away the service still
        // takes every request and the outbox holds the events, so it is
        // healthy; the backlog shows in the `outbox_pending` metric instead,
        // measured apart so that a huge backlog cannot slow the probe down.
        let probe = move || {
            let pool = pool.clone();
            async move {
                let up = db::ping(&pool, Duration::from_secs(2)).await;
                grpc::Probe { database: up, ready: up }
            }
        };
        let watcher = CancellationToken::new();
        let watch = grpc::watch_health(reporter.clone(), SERVICE_NAME, watcher.clone(), probe).await;
        supervisor.spawn("health watcher", watcher.clone(), watch);
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
        // The server stops after the drain, or on its own if it failed:
        // either way the background tasks go too.
        stop_accepting.cancel();
        watcher.cancel();
        grpc::set_health(&reporter, &[SERVICE_NAME], false).await;
        background.cancel();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks did not stop within the grace period");
        }
        tracing::info!("user service stopped");
        served.and(supervisor.result())
    }
}

/// Keeps `outbox_pending` and `outbox_oldest_pending_age_seconds` current,
/// once a second, until `stop`.
async fn watch_backlog(pool: Pool, metrics: Registry, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some((rows, oldest_age_seconds)) = outbox_backlog(&pool).await {
            metrics.set("outbox_pending", rows);
            metrics.set("outbox_oldest_pending_age_seconds", oldest_age_seconds);
        }
    }
}

/// An estimate of the rows not yet published (the span of their ids, an
/// upper bound: ids are not reused, so it is exact unless rows in between
/// were already stamped) and the age in whole seconds of the oldest (0 when
/// none), or None if the database did not answer in time. Both come from
/// the ends of the partial index on unpublished ids, without reading the
/// rows between: its cost does not grow with the backlog, unlike `count(*)`.
async fn outbox_backlog(pool: &Pool) -> Option<(i64, i64)> {
    const BACKLOG: &str = "
SELECT COALESCE((SELECT max(id) FROM user_outbox WHERE published_at IS NULL)
              - (SELECT min(id) FROM user_outbox WHERE published_at IS NULL) + 1, 0),
       COALESCE((SELECT floor(extract(epoch FROM clock_timestamp() - occurred_at))::bigint
                   FROM user_outbox WHERE published_at IS NULL ORDER BY id LIMIT 1), 0)";
    // The server gives up after 2 s (statement_timeout), so a query stuck
    // behind a lock never goes back to the pool still running: the next user
    // of that connection (the health probe) would wait behind it.
    let probe = async {
        let client = pool.get().await.ok()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let row = db::within(&client, Some(deadline), client.query_one(BACKLOG, &[])).await.ok()?;
        Some((row.try_get::<_, i64>(0).ok()?, row.try_get::<_, i64>(1).ok()?))
    };
    tokio::time::timeout(Duration::from_secs(3), probe).await.ok().flatten()
}

/// Runs the user role until `shutdown`.
pub async fn run(args: UserArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let role = tokio::select! {
        role = UserRole::build(args) => role?,
        // Stopped while still waiting for the database or the broker.
        _ = shutdown.cancelled() => return Ok(()),
    };
    role.run_until_stopped(shutdown).await
}
