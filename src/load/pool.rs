//! The db-pool scenario: drives one role's database pool past its size in
//! closed-loop stages (½×, 1×, 2× and 4× the pool) and reports, per stage,
//! what the role says about its pool (waiters, connections in use, wait time,
//! from its own GetMetrics) beside what the client saw (rate, p99, errors).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{
    LoadError,
    run::{self, Drive, Progress, Tally},
    scenario::{Targets, connect, wait_serving},
};
use crate::pb::{self, metrics_service_client::MetricsServiceClient, order_service_client::OrderServiceClient};

/// Which role's pool the scenario drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PoolRole {
    User,
    Order,
}

/// One stage at a fixed concurrency.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PoolStage {
    pub concurrency: usize,
    pub requests: u64,
    pub achieved_rps: f64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The most requests the role reported waiting for a connection.
    /// None when the role does not export the gauge (a number nobody measured is not shown).
    pub waiters_max: Option<i64>,
    pub waiters_mean: Option<f64>,
    pub in_use_max: Option<i64>,
    /// Mean time a request waited for a connection, when the role reports it.
    pub wait_mean_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PoolReport {
    pub role: String,
    pub pool_size: i64,
    /// Where the pool size came from: the role's metrics or --pool-size.
    pub pool_size_source: String,
    pub stages: Vec<PoolStage>,
}

/// What the role says about its pool at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct PoolSample {
    size: i64,
    in_use: Option<i64>,
    waiters: Option<i64>,
    wait_count: u64,
    wait_sum_s: f64,
}

async fn sample(metrics: &mut MetricsServiceClient<Channel>) -> Option<PoolSample> {
    let report = tokio::time::timeout(Duration::from_secs(1), metrics.get_metrics(pb::GetMetricsRequest {}))
        .await
        .ok()?
        .ok()?
        .into_inner();
    let value = |name: &str| report.values.get(name).copied().unwrap_or(0);
    let wait = report.histograms.iter().find(|h| h.name.starts_with("db_pool_wait"));
    Some(PoolSample {
        size: value("db_pool_size"),
        in_use: report.values.get("db_pool_in_use").copied(),
        waiters: report.values.get("db_pool_waiters").copied(),
        wait_count: wait.map_or(0, |h| h.count),
        wait_sum_s: wait.map_or(0.0, |h| h.sum),
    })
}

/// Runs the stages; returns the merged tally, the measured time and the report.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    role: PoolRole,
    pool_size_flag: Option<usize>,
    targets: &Targets,
    drive: &Drive,
    connections: usize,
    ready_timeout: Duration,
    progress: Option<mpsc::Sender<Progress>>,
    cancel: CancellationToken,
) -> Result<(Tally, Duration, PoolReport, bool), LoadError> {
    let (addr, service) = match role {
        PoolRole::User => (&targets.user_addr, "msys.v1.UserService"),
        PoolRole::Order => (&targets.order_addr, "msys.v1.OrderService"),
    };
    let channels = connect(addr, connections, ready_timeout).await?;
    wait_serving(&channels[0], addr, service, ready_timeout).await?;
    let mut metrics = MetricsServiceClient::new(channels[0].clone());
    let reported = sample(&mut metrics).await.map_or(0, |s| s.size);
    // The flag wins: the role's gauge counts connections open so far, which
    // is below the pool's maximum until the pool has been busy.
    let (pool_size, source) = match (pool_size_flag, reported) {
        (Some(size), _) => (size as i64, "--pool-size"),
        (None, size) if size > 0 => (size, "the role's db_pool_size metric"),
        _ => {
            return Err(LoadError::invalid(
                "pool_size",
                format!("{addr} does not report db_pool_size; pass --pool-size with the role's pool size"),
            ));
        }
    };
    let size = pool_size.max(1) as usize;
    let levels = [size.div_ceil(2), size, size * 2, size * 4];
    let stage_drive = Drive {
        duration: drive.duration / levels.len() as u32,
        warmup: drive.warmup / levels.len() as u32,
        ..drive.clone()
    };
    let mut report = PoolReport {
        role: format!("{role:?}").to_lowercase(),
        pool_size,
        pool_size_source: source.to_owned(),
        stages: Vec::new(),
    };
    let mut total = Tally::default();
    let mut measured = Duration::ZERO;
    let mut cancelled = false;
    for concurrency in levels {
        let before = sample(&mut metrics).await.unwrap_or_default();
        let stop = CancellationToken::new();
        let sampler = tokio::spawn(watch_pool(metrics.clone(), stop.clone()));
        let call = pool_call(role, &channels);
        let result = run::closed_loop(concurrency, &stage_drive, call, progress.clone(), cancel.clone()).await;
        stop.cancel();
        let samples = sampler.await.unwrap_or_default();
        let after = sample(&mut metrics).await.unwrap_or_default();
        report.stages.push(stage(concurrency, &result, &samples, before, after));
        total.merge(&result.tally);
        measured += result.measured;
        if result.cancelled {
            cancelled = true;
            break;
        }
    }
    Ok((total, measured, report, cancelled))
}

fn stage(
    concurrency: usize,
    result: &run::Measured,
    samples: &[PoolSample],
    before: PoolSample,
    after: PoolSample,
) -> PoolStage {
    let tally = &result.tally;
    let requests = tally.requests();
    let seconds = result.measured.as_secs_f64().max(1e-9);
    let waits = after.wait_count.saturating_sub(before.wait_count);
    PoolStage {
        concurrency,
        requests,
        achieved_rps: requests as f64 / seconds,
        error_rate: if requests == 0 { 0.0 } else { tally.failed() as f64 / requests as f64 },
        p50_ms: tally.latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: tally.latency.value_at_quantile(0.99) as f64 / 1000.0,
        waiters_max: samples.iter().filter_map(|s| s.waiters).max(),
        waiters_mean: {
            let seen: Vec<f64> = samples.iter().filter_map(|s| s.waiters).map(|w| w as f64).collect();
            (!seen.is_empty()).then(|| seen.iter().sum::<f64>() / seen.len() as f64)
        },
        in_use_max: samples.iter().filter_map(|s| s.in_use).max(),
        wait_mean_ms: (waits > 0).then(|| (after.wait_sum_s - before.wait_sum_s) / waits as f64 * 1000.0),
    }
}

/// Samples the role's pool every 50 ms until `stop`.
async fn watch_pool(mut metrics: MetricsServiceClient<Channel>, stop: CancellationToken) -> Vec<PoolSample> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return samples,
            _ = tick.tick() => {}
        }
        if let Some(s) = sample(&mut metrics).await {
            samples.push(s);
        }
    }
}

/// One request that takes a connection from the role's pool.
fn pool_call(
    role: PoolRole,
    channels: &[Channel],
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = run::Outcome> + Send>> + Send + Sync + 'static {
    let channels = channels.to_vec();
    move |i| {
        let channel = channels[i as usize % channels.len()].clone();
        Box::pin(async move {
            match role {
                // ListUsers is not batched: each call holds a connection.
                PoolRole::User => {
                    let mut client = crate::pb::user_service_client::UserServiceClient::new(channel);
                    let request = pb::ListUsersRequest { page_size: 20, page_token: String::new() };
                    client.list_users(request).await.map(drop).map_err(|s| s.code())
                }
                PoolRole::Order => {
                    let mut client = OrderServiceClient::new(channel);
                    let request = pb::ListOrdersRequest {
                        user_id: (i % 1000 + 1) as i64,
                        page_size: 20,
                        page_token: String::new(),
                    };
                    client.list_orders(request).await.map(drop).map_err(|s| s.code())
                }
            }
        })
    }
}
