//! `msys all`: every implemented role in one process, each on its own port,
//! under one shutdown — one process to attach a debugger to, one log stream.

use clap::Args;
use futures::future::BoxFuture;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{KafkaArgs, OrderPostgresArgs, ServerArgs, UserPostgresArgs},
    frontend::{self, DashboardArgs, FrontendArgs},
    monitor::{self, CollectArgs, MonitorArgs},
    order::{self, OrderArgs, ReplicaArgs},
    user::{self, BatchArgs, RelayArgs, UserArgs},
};

/// The roles' settings, with the shared groups (Kafka, server) given once.
#[derive(Args, Debug, Clone)]
pub struct AllArgs {
    #[arg(long, env = "USER_SERVICE_PORT", default_value_t = 50051)]
    pub user_port: u16,
    #[arg(long, env = "ORDER_SERVICE_PORT", default_value_t = 50052)]
    pub order_port: u16,
    /// HTTP port of the user role's GET /metrics.
    #[arg(long, env = "USER_METRICS_PORT", default_value_t = 9451)]
    pub user_metrics_port: u16,
    /// HTTP port of the order role's GET /metrics.
    #[arg(long, env = "ORDER_METRICS_PORT", default_value_t = 9452)]
    pub order_metrics_port: u16,
    #[arg(long, env = "MONITOR_SERVICE_PORT", default_value_t = 50053)]
    pub monitor_port: u16,
    /// HTTP port of the monitor's GET /metrics.
    #[arg(long, env = "MONITOR_METRICS_PORT", default_value_t = 9453)]
    pub monitor_metrics_port: u16,
    #[arg(long, env = "FRONTEND_PORT", default_value_t = 80)]
    pub frontend_port: u16,
    #[command(flatten)]
    pub dashboard: DashboardArgs,
    #[command(flatten)]
    pub user_postgres: UserPostgresArgs,
    #[command(flatten)]
    pub order_postgres: OrderPostgresArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub relay: RelayArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub replica: ReplicaArgs,
    #[command(flatten)]
    pub monitor: CollectArgs,
    #[command(flatten)]
    pub load: crate::load::service::LoadServiceArgs,
}

/// Runs the roles until `shutdown` or until one of them stops: a role that
/// fails takes the others down with it, so the process never limps on half
/// alive. Returns the first error.
pub async fn run(args: AllArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let user_args = UserArgs {
        port: args.user_port,
        metrics_port: args.user_metrics_port,
        postgres: args.user_postgres,
        kafka: args.kafka.clone(),
        server: args.server.clone(),
        relay: args.relay,
        batch: args.batch,
    };
    // The monitor watches the roles of this process over the network, as it would elsewhere.
    let monitor_args = MonitorArgs {
        port: args.monitor_port,
        metrics_port: args.monitor_metrics_port,
        user_addr: format!("http://127.0.0.1:{}", args.user_port),
        order_addr: format!("http://127.0.0.1:{}", args.order_port),
        consumer_group: args.replica.consumer_group.clone(),
        dlq_topic: args.replica.dlq_topic.clone(),
        user_postgres: user_args.postgres.clone(),
        order_postgres: args.order_postgres.clone(),
        kafka: args.kafka.clone(),
        server: args.server.clone(),
        collect: args.monitor,
        load: args.load,
    };
    // The dashboard reads the monitor of this process over the network, as it would elsewhere.
    let frontend_args = FrontendArgs {
        port: args.frontend_port,
        monitor: format!("http://127.0.0.1:{}", args.monitor_port),
        dashboard: args.dashboard,
        server: args.server.clone(),
    };
    let order_args = OrderArgs {
        port: args.order_port,
        metrics_port: args.order_metrics_port,
        postgres: args.order_postgres,
        kafka: args.kafka,
        server: args.server,
        replica: args.replica,
    };
    let tasks = TaskTracker::new();
    let root = shutdown.child_token();
    let supervise = |role: &'static str, run: BoxFuture<'static, anyhow::Result<()>>| {
        let root = root.clone();
        tasks.spawn(async move {
            let result = run.await;
            report_exit(role, &result);
            root.cancel();
            result
        })
    };
    let user = supervise("user", Box::pin(user::run(user_args, root.child_token())));
    let order = supervise("order", Box::pin(order::run(order_args, root.child_token())));
    let monitor = supervise("monitor", Box::pin(monitor::run(monitor_args, root.child_token())));
    // Last, as in scripts/start.sh: it only reads the others.
    let frontend = supervise("frontend", Box::pin(frontend::run(frontend_args, root.child_token())));
    tasks.close();
    tasks.wait().await;
    let results = [user.await?, order.await?, monitor.await?, frontend.await?];
    results.into_iter().collect()
}

fn report_exit(role: &str, result: &anyhow::Result<()>) {
    match result {
        Ok(()) => tracing::info!(role, "role stopped"),
        Err(error) => {
            tracing::error!(role, error.message = %error, error.cause_chain = ?error, "role failed")
        }
    }
}
