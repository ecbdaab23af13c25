//! The order role: orders in their own PostgreSQL, served over gRPC, for
//! the users it learns about from `user-events`.

pub mod apply;
pub mod domain;
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

use self::replica::{Replica, ReplicaSettings};
use crate::{
    config::{KafkaArgs, OrderPostgresArgs, PostgresSettings, ServerArgs},
    db, grpc,
    metrics::Registry,
    migrate,
    pb::order_service_server::OrderServiceServer,
};

const SERVICE_NAME: &str = "msys.v1.OrderService";

/// Settings of `msys order`.
#[derive(Args, Debug, Clone)]
pub struct OrderArgs {
    #[arg(long = "port", env = "ORDER_SERVICE_PORT", default_value_t = 50052)]
    pub port: u16,
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
}

/// An order role that has connected, migrated and bound its port.
pub struct OrderRole {
    listener: TcpListener,
    pool: Pool,
    replica: Replica,
    metrics: Registry,
    user_wait: Duration,
    grace: Duration,
}

impl OrderRole {
    pub async fn build(args: OrderArgs) -> anyhow::Result<Self> {
        let postgres = PostgresSettings::from(args.postgres.clone());
        db::wait_for_database(&postgres, args.server.startup_timeout).await?;
        let pool = db::pool(&postgres)?;
        migrate::run(&pool, migrate::ORDERS).await.context("migrating the orders database")?;
        let metrics = Registry::new("order");
        let settings =
            ReplicaSettings { group: args.replica.consumer_group.clone(), dlq_topic: args.replica.dlq_topic.clone() };
        let replica = Replica::new(pool.clone(), args.kafka.clone(), settings, metrics.clone())?;
        let listener = grpc::bind(args.server.addr(args.port)?).await?;
        Ok(OrderRole {
            listener,
            pool,
            replica,
            metrics,
            user_wait: args.replica.user_wait,
            grace: args.server.shutdown_grace,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves and consumes until `shutdown`; then stops taking RPCs, lets
    /// in-flight ones finish, commits offsets and leaves the group.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let OrderRole { listener, pool, replica, metrics, user_wait, grace } = self;
        tracing::info!(addr = %listener.local_addr()?, "order service listening");
        let (reporter, health) = tonic_health::server::health_reporter();
        grpc::set_health(&reporter, &[SERVICE_NAME], false).await;
        let api = service::OrderApi::new(pool.clone(), replica.applied_signal(), user_wait);
        let routes = Routes::new(health).add_service(OrderServiceServer::new(api));

        let tasks = TaskTracker::new();
        let background = shutdown.child_token();
        // The server is SERVING while the orders database answers; the
        // OrderService once the consumer has joined its group too, so
        // "ready" means CreateOrder sees users as soon as they are created.
        let joined = replica.joined();
        let probe = move || {
            let (pool, joined) = (pool.clone(), joined.clone());
            async move {
                let database = db::ping(&pool, Duration::from_secs(2)).await;
                grpc::Probe { database, ready: joined.load(std::sync::atomic::Ordering::Relaxed) }
            }
        };
        tasks.spawn(grpc::watch_health(reporter.clone(), SERVICE_NAME, background.clone(), probe).await);
        let consumer_stop = CancellationToken::new();
        let consumer = tasks.spawn(replica.run(consumer_stop.clone()));
        tasks.close();

        let served = grpc::serve(listener, routes, metrics, shutdown.clone(), grace).await;
        grpc::set_health(&reporter, &[SERVICE_NAME], false).await;
        // The consumer stops after the RPCs drained: CreateOrder calls still
        // in flight may be waiting for an event it is about to apply.
        consumer_stop.cancel();
        background.cancel();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks did not stop within the grace period");
            consumer.abort();
        }
        tracing::info!("order service stopped");
        served
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
