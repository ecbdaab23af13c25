//! The load engine, shared by `msys load` and the monitor's RunLoadTest:
//! what to run ([`LoadConfig`], checked against [`LoadLimits`]), and
//! [`execute`], which runs it and returns a [`report::Report`].
//!
//! - `plan`: intended send times of rate-mode runs (constant, Poisson, ramp, step, spike);
//! - `run`: the open-loop and closed-loop engines and their HDR histograms;
//! - `scenario`: what one request does, and the readiness checks; `grpc`: the lean client it calls with;
//! - `pool` and `group`: the db-pool and consumer-group scenarios, which run in stages;
//! - `find`: the capacity search; `report`: text, JSON, thresholds and baseline.

pub mod cli;
pub mod find;
pub mod group;
pub mod grpc;
pub mod plan;
pub mod pool;
pub mod report;
pub mod run;
pub mod scenario;
pub mod service;

use std::time::{Duration, SystemTime};

use clap::Args;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use self::{
    find::{FindMax, Trial},
    plan::{Arrival, Plan, Shape},
    pool::PoolRole,
    report::{EventLag, Percentiles, Report},
    run::{Drive, Measured, Progress},
    scenario::{Mix, Scenario, ScenarioKind, Targets},
};
use crate::{config::KafkaArgs, error::ServiceError, pb};

#[derive(thiserror::Error, Debug)]
pub enum LoadError {
    /// The request is absurd or incomplete; the message says what to change.
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    /// A target cannot be reached or is not SERVING.
    #[error("{0}")]
    NotReady(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl LoadError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        LoadError::Invalid { field, message: message.into() }
    }
}

impl From<LoadError> for ServiceError {
    fn from(error: LoadError) -> Self {
        match error {
            LoadError::Invalid { field, message } => ServiceError::InvalidArgument { field, message },
            LoadError::NotReady(message) => ServiceError::Unavailable(message, None),
            LoadError::Unexpected(e) => ServiceError::Unexpected(e),
        }
    }
}

/// Bounds on what a load test may ask for: one typo must not flatten the
/// system (or the machine running the test). Configurable per deployment.
#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoadLimits {
    /// Highest request rate (per second) a run may schedule.
    #[arg(id = "load_max_rate", long = "load-max-rate", env = "LOAD_MAX_RATE", default_value_t = 50_000.0)]
    pub max_rate: f64,
    /// Longest run, warm-up included.
    #[arg(id = "load_max_duration", long = "load-max-duration", env = "LOAD_MAX_DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    pub max_duration: Duration,
    /// Most closed-loop workers.
    #[arg(
        id = "load_max_concurrency",
        long = "load-max-concurrency",
        env = "LOAD_MAX_CONCURRENCY",
        default_value_t = 2_000
    )]
    pub max_concurrency: usize,
    /// Most calls in flight in rate mode.
    #[arg(
        id = "load_max_in_flight",
        long = "load-max-in-flight",
        env = "LOAD_MAX_IN_FLIGHT",
        default_value_t = 20_000
    )]
    pub max_in_flight: usize,
    /// Most extra consumers of the consumer-group scenario.
    #[arg(id = "load_max_consumers", long = "load-max-consumers", env = "LOAD_MAX_CONSUMERS", default_value_t = 32)]
    pub max_consumers: usize,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_rate: 50_000.0,
            max_duration: Duration::from_secs(3600),
            max_concurrency: 2_000,
            max_in_flight: 20_000,
            max_consumers: 32,
        }
    }
}

mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v: f64 = serde::Deserialize::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

/// One load test, whoever asked for it (the CLI or RunLoadTest).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoadConfig {
    pub scenario: ScenarioKind,
    pub mix: Mix,
    /// Rate mode (open loop): the profile; `None` with `concurrency` set means closed loop.
    pub shape: Option<Shape>,
    pub arrival: Arrival,
    /// Closed loop: this many workers, each calling as soon as its last call ended.
    pub concurrency: Option<usize>,
    #[serde(with = "secs")]
    pub duration: Duration,
    #[serde(with = "secs")]
    pub warmup: Duration,
    pub max_in_flight: usize,
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// HTTP/2 connections per target.
    pub connections: usize,
    pub seed: u64,
    /// Capacity search: find the highest rate with p99 under this.
    #[serde(with = "opt_secs")]
    pub find_max_p99: Option<Duration>,
    pub targets: Targets,
    /// consumer-group: extra consumers.
    pub consumers: usize,
    /// db-pool: which role's pool, and its size when the role does not report it.
    pub pool_role: PoolRole,
    pub pool_size: Option<usize>,
    #[serde(with = "secs")]
    pub ready_timeout: Duration,
}

mod opt_secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let v: Option<f64> = serde::Deserialize::deserialize(d)?;
        v.map(|v| Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)).transpose()
    }
}

impl LoadConfig {
    /// A configuration with the defaults of `msys load`, for `scenario` at `rate`.
    pub fn new(scenario: ScenarioKind, targets: Targets) -> Self {
        LoadConfig {
            scenario,
            mix: Mix::default(),
            shape: None,
            arrival: Arrival::Constant,
            concurrency: None,
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            max_in_flight: 1_000,
            timeout: Duration::from_secs(10),
            connections: 4,
            seed: 1,
            find_max_p99: None,
            targets,
            consumers: 3,
            pool_role: PoolRole::Order,
            pool_size: None,
            ready_timeout: Duration::from_secs(30),
        }
    }

    fn per_request(&self) -> bool {
        !matches!(self.scenario, ScenarioKind::DbPool | ScenarioKind::ConsumerGroup)
    }

    /// Refuses what is absurd or contradictory, with a message saying what to change.
    pub fn validate(&self, limits: &LoadLimits) -> Result<(), LoadError> {
        let total = self.duration + self.warmup;
        if self.duration.is_zero() {
            return Err(LoadError::invalid("duration", "must be above 0, e.g. 10s"));
        }
        if total > limits.max_duration {
            return Err(LoadError::invalid(
                "duration",
                format!(
                    "{total:?} with the warm-up is above the limit of {:?} (LOAD_MAX_DURATION)",
                    limits.max_duration
                ),
            ));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(300) {
            return Err(LoadError::invalid("timeout", "must be between 1ms and 5m"));
        }
        if !(1..=64).contains(&self.connections) {
            return Err(LoadError::invalid("connections", "must be between 1 and 64"));
        }
        if self.ready_timeout > Duration::from_secs(600) {
            return Err(LoadError::invalid("ready_timeout", "must be at most 10m"));
        }
        if self.max_in_flight == 0 || self.max_in_flight > limits.max_in_flight {
            return Err(LoadError::invalid(
                "max_in_flight",
                format!("must be between 1 and {} (LOAD_MAX_IN_FLIGHT)", limits.max_in_flight),
            ));
        }
        match self.scenario {
            ScenarioKind::ConsumerGroup if self.consumers == 0 || self.consumers > limits.max_consumers => {
                return Err(LoadError::invalid(
                    "consumers",
                    format!("must be between 1 and {} (LOAD_MAX_CONSUMERS)", limits.max_consumers),
                ));
            }
            ScenarioKind::DbPool if self.pool_size == Some(0) => {
                return Err(LoadError::invalid("pool_size", "must be above 0"));
            }
            ScenarioKind::DbPool => {
                if let Some(size) = self.pool_size
                    && size * 4 > limits.max_concurrency
                {
                    return Err(LoadError::invalid(
                        "pool_size",
                        format!(
                            "the last stage runs 4 × {size} workers, above the limit of {} (LOAD_MAX_CONCURRENCY)",
                            limits.max_concurrency
                        ),
                    ));
                }
            }
            _ => {}
        }
        if !self.per_request() {
            return Ok(());
        }
        if let Some(p99) = self.find_max_p99 {
            if p99.is_zero() {
                return Err(LoadError::invalid("p99_under", "must be above 0, e.g. 20ms"));
            }
            if self.concurrency.is_some() {
                return Err(LoadError::invalid(
                    "find_max",
                    "the capacity search runs in rate mode: drop --concurrency",
                ));
            }
        }
        match (&self.shape, self.concurrency) {
            (Some(_), Some(_)) => Err(LoadError::invalid(
                "concurrency",
                "give either a rate (open loop) or a concurrency (closed loop), not both",
            )),
            (None, None) => Err(LoadError::invalid(
                "rate",
                "give a rate (e.g. --rate 200) or a concurrency (e.g. --concurrency 16)",
            )),
            (None, Some(n)) if n == 0 || n > limits.max_concurrency => Err(LoadError::invalid(
                "concurrency",
                format!("must be between 1 and {} (LOAD_MAX_CONCURRENCY)", limits.max_concurrency),
            )),
            (None, Some(_)) => Ok(()),
            (Some(shape), None) => validate_shape(shape, self.duration, limits),
        }
    }
}

fn validate_shape(shape: &Shape, duration: Duration, limits: &LoadLimits) -> Result<(), LoadError> {
    let rates: Vec<f64> = match *shape {
        Shape::Constant { rate } => vec![rate],
        Shape::Ramp { from, to, over_s } => {
            if !(over_s.is_finite() && over_s > 0.0) {
                return Err(LoadError::invalid("ramp", "the ramp's length must be above 0"));
            }
            vec![from, to]
        }
        Shape::Step { start, step, every_s } => {
            if !(every_s.is_finite() && every_s >= 0.1) {
                return Err(LoadError::invalid("step", "the step interval must be at least 100ms"));
            }
            vec![start, step.abs()]
        }
        Shape::Spike { base, peak, at_s, for_s } => {
            if !(at_s.is_finite() && for_s.is_finite() && at_s >= 0.0 && for_s > 0.0) {
                return Err(LoadError::invalid("spike", "the spike needs a start ≥ 0 and a length > 0"));
            }
            vec![base, peak]
        }
    };
    if rates.iter().any(|r| !r.is_finite() || *r < 0.0) {
        return Err(LoadError::invalid("rate", "rates must be finite and not negative"));
    }
    let peak = shape.peak_rate(duration.as_secs_f64());
    if peak <= 0.0 {
        return Err(LoadError::invalid("rate", "the profile never sends anything: give a rate above 0"));
    }
    if peak > limits.max_rate {
        return Err(LoadError::invalid(
            "rate",
            format!("the profile reaches {peak:.0}/s, above the limit of {:.0}/s (LOAD_MAX_RATE)", limits.max_rate),
        ));
    }
    Ok(())
}

/// The commit this binary was built from: `MSYS_COMMIT` if set (images), else
/// what git says about the source tree it was built in, else "unknown".
pub fn commit() -> String {
    if let Ok(commit) = std::env::var("MSYS_COMMIT") {
        return commit;
    }
    std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// A short id that keeps one run's emails and group names apart from another's.
pub fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Runs `config` to the end (or until `cancel`), sending progress once a second.
pub async fn execute(
    config: &LoadConfig,
    limits: &LoadLimits,
    kafka: &KafkaArgs,
    progress: Option<mpsc::Sender<Progress>>,
    cancel: CancellationToken,
) -> Result<Report, LoadError> {
    config.validate(limits)?;
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let run_id = run_id();
    let drive = Drive {
        warmup: config.warmup,
        duration: config.duration,
        timeout: config.timeout,
        max_in_flight: config.max_in_flight,
        progress_interval: Duration::from_secs(1),
    };
    let mut report = Report {
        scenario: config.scenario.name().to_owned(),
        started_at,
        commit: commit(),
        config: serde_json::to_value(config).unwrap_or_default(),
        limits: serde_json::to_value(limits).unwrap_or_default(),
        warmup_s: config.warmup.as_secs_f64(),
        ..Report::default()
    };
    match config.scenario {
        ScenarioKind::ConsumerGroup => {
            let (group, cancelled) =
                group::run(kafka, config.consumers, &run_id, config.duration, progress, cancel).await?;
            report.mode = "consumer-group".into();
            report.profile = format!("{} consumers", config.consumers);
            report.requests = group.records;
            report.ok = group.records;
            report.achieved_rps = group.records_per_s;
            report.duration_s = group.join_ms.unwrap_or(0.0) / 1000.0 + group.drain_ms.unwrap_or(0.0) / 1000.0;
            report.cancelled = cancelled;
            report.consumer_group = Some(group);
            return Ok(report);
        }
        ScenarioKind::DbPool => {
            let lag = LagProbe::start(&config.targets).await;
            let (tally, measured, pool, cancelled) = pool::run(
                config.pool_role,
                config.pool_size,
                &config.targets,
                &drive,
                config.connections,
                config.ready_timeout,
                progress,
                cancel,
            )
            .await?;
            report.mode = "stages".into();
            report.profile = format!("closed loop at ½, 1, 2 and 4 × the pool of {}", pool.pool_size);
            fill(&mut report, &Measured { tally, measured, cancelled }, 0.0);
            report.db_pool = Some(pool);
            report.event_lag = lag.finish().await;
            return Ok(report);
        }
        _ => {}
    }
    let scenario = std::sync::Arc::new(
        Scenario::prepare(
            config.scenario,
            config.mix,
            &config.targets,
            config.connections,
            config.ready_timeout,
            &run_id,
        )
        .await?,
    );
    let lag = LagProbe::start(&config.targets).await;
    if let Some(p99_under) = config.find_max_p99 {
        let start = match config.shape {
            Some(Shape::Constant { rate }) => rate,
            _ => 100.0,
        };
        let search = find_max(&scenario, config, &drive, start, p99_under, limits, progress, cancel).await;
        report.mode = "find-max".into();
        report.profile = format!("constant-rate trials of {:?} each", config.duration);
        let (best, search) = search;
        if let Some((measured, rate)) = best {
            report.target_rps = rate;
            fill(&mut report, &measured, rate);
        }
        report.find_max = Some(search);
    } else {
        let measured = match (&config.shape, config.concurrency) {
            (Some(shape), _) => {
                report.mode = "open".into();
                report.profile = describe(shape, config.arrival);
                report.target_rps =
                    Plan::expected_requests(shape, Duration::ZERO, config.duration) / config.duration.as_secs_f64();
                open(&scenario, shape, config, &drive, progress, cancel).await
            }
            (None, Some(n)) => {
                report.mode = "closed".into();
                report.profile = format!("{n} concurrent workers");
                let s = scenario.clone();
                run::closed_loop(
                    n,
                    &drive,
                    move |i| {
                        let s = s.clone();
                        async move { s.call(i).await }
                    },
                    progress,
                    cancel,
                )
                .await
            }
            (None, None) => return Err(LoadError::invalid("rate", "give a rate or a concurrency")),
        };
        let target = report.target_rps;
        fill(&mut report, &measured, target);
    }
    report.event_lag = lag.finish().await;
    Ok(report)
}

async fn open(
    scenario: &std::sync::Arc<Scenario>,
    shape: &Shape,
    config: &LoadConfig,
    drive: &Drive,
    progress: Option<mpsc::Sender<Progress>>,
    cancel: CancellationToken,
) -> Measured {
    let plan = Plan::new(shape, config.warmup, config.duration, config.arrival, config.seed);
    let (shape_at, warmup) = (shape.clone(), config.warmup);
    let rate_at = move |at: Duration| shape_at.rate_at(at.saturating_sub(warmup).as_secs_f64());
    let s = scenario.clone();
    run::open_loop(
        plan,
        drive,
        rate_at,
        move |i| {
            let s = s.clone();
            async move { s.call(i).await }
        },
        progress,
        cancel,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn find_max(
    scenario: &std::sync::Arc<Scenario>,
    config: &LoadConfig,
    drive: &Drive,
    start: f64,
    p99_under: Duration,
    limits: &LoadLimits,
    progress: Option<mpsc::Sender<Progress>>,
    cancel: CancellationToken,
) -> (Option<(Measured, f64)>, FindMax) {
    let target_ms = p99_under.as_secs_f64() * 1000.0;
    let mut search = FindMax { p99_under_ms: target_ms, ..FindMax::default() };
    let mut best: Option<(Measured, f64)> = None;
    while let Some(rate) = find::next_rate(&search.trials, start, limits.max_rate) {
        if cancel.is_cancelled() {
            break;
        }
        let shape = Shape::Constant { rate };
        let measured = open(scenario, &shape, config, drive, progress.clone(), cancel.clone()).await;
        let tally = &measured.tally;
        let requests = tally.requests();
        let achieved = requests as f64 / measured.measured.as_secs_f64().max(1e-9);
        let error_rate = if requests == 0 { 0.0 } else { tally.failed() as f64 / requests as f64 };
        let p99 = Percentiles::of(&tally.latency).p99;
        let passed =
            !measured.cancelled && find::passes(p99, target_ms, error_rate, tally.dropped, requests, achieved, rate);
        search.trials.push(Trial {
            rate,
            achieved_rps: achieved,
            p99_ms: p99,
            error_rate,
            dropped: tally.dropped,
            passed,
        });
        if passed && best.as_ref().is_none_or(|(_, r)| rate > *r) {
            best = Some((measured, rate));
        }
    }
    search.conclude(limits.max_rate);
    (best, search)
}

/// Copies what the engine measured into the report.
fn fill(report: &mut Report, measured: &Measured, target_rps: f64) {
    let tally = &measured.tally;
    report.requests = tally.requests();
    report.ok = tally.ok;
    report.dropped = tally.dropped;
    report.errors = tally.errors.clone();
    report.duration_s = measured.measured.as_secs_f64();
    report.achieved_rps = if report.duration_s > 0.0 { report.requests as f64 / report.duration_s } else { 0.0 };
    report.target_rps = target_rps;
    report.cancelled = measured.cancelled;
    report.latency_ms = Percentiles::of(&tally.latency);
    report.service_time_ms = Percentiles::of(&tally.service);
    report.latency_histogram = report::bars(&tally.latency);
}

pub fn describe(shape: &Shape, arrival: Arrival) -> String {
    let arrivals = match arrival {
        Arrival::Constant => "evenly spaced",
        Arrival::Poisson => "poisson arrivals",
    };
    let shape = match *shape {
        Shape::Constant { rate } => format!("constant {rate}/s"),
        Shape::Ramp { from, to, over_s } => format!("ramp {from}/s to {to}/s over {over_s} s"),
        Shape::Step { start, step, every_s } => format!("step from {start}/s by {step}/s every {every_s} s"),
        Shape::Spike { base, peak, at_s, for_s } => {
            format!("{base}/s with a spike to {peak}/s at {at_s} s for {for_s} s")
        }
    };
    format!("{shape}, {arrivals}")
}

/// Event lag during a run, read from the order role's own
/// `event_apply_lag_seconds` histogram before and after (the difference is
/// this run's events), when the order role is reachable and reports it.
struct LagProbe {
    client: Option<crate::pb::metrics_service_client::MetricsServiceClient<Channel>>,
    before: Option<pb::Histogram>,
}

const LAG_HISTOGRAM: &str = "event_apply_lag_seconds";

impl LagProbe {
    async fn start(targets: &Targets) -> Self {
        let client = match scenario::connect(&targets.order_addr, 1, Duration::from_secs(1)).await {
            Ok(mut channels) => channels.pop().map(crate::pb::metrics_service_client::MetricsServiceClient::new),
            Err(_) => None,
        };
        let mut probe = LagProbe { client, before: None };
        probe.before = probe.read().await;
        probe
    }

    async fn read(&mut self) -> Option<pb::Histogram> {
        let client = self.client.as_mut()?;
        let report = tokio::time::timeout(Duration::from_secs(2), client.get_metrics(pb::GetMetricsRequest {}))
            .await
            .ok()?
            .ok()?
            .into_inner();
        report.histograms.into_iter().filter(|h| h.name == LAG_HISTOGRAM).reduce(|mut a, b| {
            a.count += b.count;
            a.sum += b.sum;
            for (x, y) in a.buckets.iter_mut().zip(&b.buckets) {
                x.count += y.count;
            }
            a
        })
    }

    async fn finish(mut self) -> Option<EventLag> {
        let after = self.read().await?;
        Some(lag_between(self.before.as_ref(), &after, "the order role's event_apply_lag_seconds"))
    }
}

/// The events of `after` not already in `before`, summarised.
pub fn lag_between(before: Option<&pb::Histogram>, after: &pb::Histogram, source: &str) -> EventLag {
    let count_before = before.map_or(0, |b| b.count);
    let events = after.count.saturating_sub(count_before);
    let sum = after.sum - before.map_or(0.0, |b| b.sum);
    let mut p99_ms = 0.0;
    if events > 0 {
        let wanted = (events as f64 * 0.99).ceil() as u64;
        for (i, bucket) in after.buckets.iter().enumerate() {
            let earlier = before.and_then(|b| b.buckets.get(i)).map_or(0, |b| b.count);
            if bucket.count.saturating_sub(earlier) >= wanted {
                p99_ms = bucket.le_seconds * 1000.0;
                break;
            }
        }
    }
    EventLag {
        source: source.to_owned(),
        events,
        mean_ms: if events > 0 { sum / events as f64 * 1000.0 } else { 0.0 },
        p99_ms,
        max_lag_records: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LoadConfig {
        let targets = Targets { user_addr: "http://127.0.0.1:1".into(), order_addr: "http://127.0.0.1:2".into() };
        let mut config = LoadConfig::new(ScenarioKind::Users, targets);
        config.shape = Some(Shape::Constant { rate: 100.0 });
        config
    }

    fn refused(change: impl FnOnce(&mut LoadConfig)) -> String {
        let mut c = config();
        change(&mut c);
        c.validate(&LoadLimits::default()).expect_err("refused").to_string()
    }

    #[test]
    fn absurd_inputs_are_refused_with_the_limit_named() {
        assert!(config().validate(&LoadLimits::default()).is_ok());
        assert!(refused(|c| c.shape = Some(Shape::Constant { rate: 1e9 })).contains("LOAD_MAX_RATE"));
        assert!(refused(|c| c.shape = Some(Shape::Constant { rate: f64::NAN })).contains("finite"));
        assert!(refused(|c| c.shape = Some(Shape::Constant { rate: 0.0 })).contains("never sends"));
        assert!(refused(|c| c.duration = Duration::from_secs(86_400)).contains("LOAD_MAX_DURATION"));
        assert!(refused(|c| c.duration = Duration::ZERO).contains("above 0"));
        assert!(refused(|c| c.max_in_flight = 0).contains("LOAD_MAX_IN_FLIGHT"));
        assert!(refused(|c| c.concurrency = Some(4)).contains("not both"));
        assert!(
            refused(|c| {
                c.shape = None;
                c.concurrency = Some(1_000_000);
            })
            .contains("LOAD_MAX_CONCURRENCY")
        );
        assert!(refused(|c| c.shape = None).contains("give a rate"));
        assert!(
            refused(|c| c.shape = Some(Shape::Ramp { from: 1.0, to: 100_000.0, over_s: 10.0 })).contains("100000/s")
        );
        assert!(
            refused(|c| {
                c.scenario = ScenarioKind::ConsumerGroup;
                c.consumers = 1000;
            })
            .contains("LOAD_MAX_CONSUMERS")
        );
    }

    #[test]
    fn limits_are_configurable() {
        let limits = LoadLimits { max_rate: 10.0, ..LoadLimits::default() };
        assert!(config().validate(&limits).unwrap_err().to_string().contains("above the limit of 10/s"));
    }

    #[test]
    fn lag_between_counts_only_this_runs_events() {
        let bucket = |le_seconds, count| pb::Bucket { le_seconds, count };
        let before = pb::Histogram {
            name: LAG_HISTOGRAM.into(),
            count: 10,
            sum: 1.0,
            buckets: vec![bucket(0.01, 10), bucket(0.1, 10), bucket(f64::INFINITY, 10)],
            ..Default::default()
        };
        let after = pb::Histogram {
            count: 110,
            sum: 3.0,
            buckets: vec![bucket(0.01, 50), bucket(0.1, 110), bucket(f64::INFINITY, 110)],
            ..before.clone()
        };
        let lag = lag_between(Some(&before), &after, "test");
        assert_eq!(lag.events, 100);
        assert!((lag.mean_ms - 20.0).abs() < 1e-9);
        assert_eq!(lag.p99_ms, 100.0);
    }
}
