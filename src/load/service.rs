//! Load tests over gRPC (MonitorService/RunLoadTest, CancelLoadTest,
//! GetLoadTest): one run at a time, started only by a caller that holds the
//! admin token when one is configured, streaming the engine's progress events
//! (the same ones `msys load` draws its bar from) and then the final report,
//! with the event lag the monitor observed during the run.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use super::{
    LoadConfig, LoadError, LoadLimits,
    cli::{parse_ramp, parse_spike, parse_step},
    plan::{Arrival, Shape},
    pool::PoolRole,
    report::{EventLag, Percentiles, Report, Threshold},
    run::Progress,
    scenario::{Mix, ScenarioKind, Targets},
};
use crate::{config::KafkaArgs, error::ServiceError, pb};

/// The admin token: compared in constant time, and never printed (its Debug
/// and Display show only that it is set).
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The token itself, to send it; never to print it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn matches(&self, offered: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), offered.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("the admin token is empty; unset MSYS_ADMIN_TOKEN to run without one".into());
        }
        Ok(Secret(text.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The monitor's settings for load tests.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LoadServiceArgs {
    /// When set, RunLoadTest and CancelLoadTest need `authorization: Bearer <token>`.
    #[arg(long = "admin-token", env = "MSYS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    #[command(flatten)]
    pub limits: LoadLimits,
}

#[derive(Default)]
struct State {
    running: Option<(CancellationToken, pb::LoadProgress)>,
    last: Option<pb::LoadReport>,
}

/// Runs the monitor's load tests.
pub struct LoadRunner {
    targets: Targets,
    kafka: KafkaArgs,
    limits: LoadLimits,
    token: Option<Secret>,
    state: Arc<Mutex<State>>,
    snapshots: Option<watch::Receiver<Arc<pb::Snapshot>>>,
    shutdown: CancellationToken,
}

pub type EventReceiver = mpsc::Receiver<Result<pb::LoadTestEvent, Status>>;

impl LoadRunner {
    pub fn new(
        targets: Targets,
        kafka: KafkaArgs,
        args: LoadServiceArgs,
        snapshots: Option<watch::Receiver<Arc<pb::Snapshot>>>,
        shutdown: CancellationToken,
    ) -> Self {
        LoadRunner {
            targets,
            kafka,
            limits: args.limits,
            token: args.admin_token,
            state: Arc::default(),
            snapshots,
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `authorization: Bearer <token>` when a token is configured.
    pub fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else { return Ok(()) };
        let offered = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match offered {
            Some(offered) if token.matches(offered.trim()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("the admin token is wrong")),
            None => Err(Status::unauthenticated(
                "load tests are write actions: send metadata `authorization: Bearer <MSYS_ADMIN_TOKEN>`",
            )),
        }
    }

    /// Starts a run and returns its event stream: progress once a second, then the report.
    pub fn run(&self, request: Request<pb::RunLoadTestRequest>) -> Result<EventReceiver, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let (config, thresholds) = config_from_request(&request, &self.targets).map_err(ServiceError::from)?;
        config.validate(&self.limits).map_err(ServiceError::from)?;
        let cancel = self.shutdown.child_token();
        {
            let mut state = self.lock();
            if let Some((_, progress)) = &state.running {
                return Err(Status::failed_precondition(format!(
                    "a load test is already running ({:.0} s of {:.0} s done); cancel it with CancelLoadTest or wait",
                    progress.elapsed_seconds, progress.total_seconds
                )));
            }
            state.running = Some((cancel.clone(), pb::LoadProgress::default()));
        }
        tracing::info!(scenario = config.scenario.name(), ?config.shape, ?config.concurrency, ?config.duration, "load test started");
        let (tx, rx) = mpsc::channel(16);
        let (state, kafka, limits, snapshots) =
            (self.state.clone(), self.kafka.clone(), self.limits.clone(), self.snapshots.clone());
        tokio::spawn(async move {
            let lag = snapshots.map(LagWatch::start);
            let (progress_tx, mut progress_rx) = mpsc::channel::<Progress>(16);
            let execute = super::execute(&config, &limits, &kafka, Some(progress_tx), cancel.clone());
            tokio::pin!(execute);
            // A cancelled run that cannot stop at once (still connecting to
            // its targets) is abandoned after half a second.
            let abandon = async {
                cancel.cancelled().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            tokio::pin!(abandon);
            let outcome = loop {
                tokio::select! {
                    Some(p) = progress_rx.recv() => {
                        let p = progress_pb(&p);
                        if let Some((_, latest)) = state.lock().unwrap_or_else(|e| e.into_inner()).running.as_mut() {
                            *latest = p;
                        }
                        // A slow client misses a tick rather than slowing the run.
                        let _ = tx.try_send(Ok(pb::LoadTestEvent { event: Some(pb::load_test_event::Event::Progress(p)) }));
                    }
                    result = &mut execute => break Some(result),
                    _ = &mut abandon => break None,
                }
            };
            let lag = match lag {
                Some(watch) => watch.finish(),
                None => None,
            };
            let report = match outcome {
                Some(Ok(mut report)) => {
                    if lag.is_some() {
                        report.event_lag = lag;
                    }
                    super::cli::finish(&mut report, &thresholds, None, None);
                    report_pb(&report)
                }
                Some(Err(error)) => {
                    pb::LoadReport { error: error.to_string(), cancelled: cancel.is_cancelled(), ..Default::default() }
                }
                None => pb::LoadReport {
                    error: "cancelled before any result".into(),
                    cancelled: true,
                    ..Default::default()
                },
            };
            tracing::info!(requests = report.requests, cancelled = report.cancelled, error = %report.error, "load test finished");
            {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                state.running = None;
                state.last = Some(report.clone());
            }
            let _ = tx.send(Ok(pb::LoadTestEvent { event: Some(pb::load_test_event::Event::Report(report)) })).await;
        });
        Ok(rx)
    }

    /// Cancels the running test, if any; the run's stream then ends with its partial report.
    pub fn cancel(&self, request: Request<pb::CancelLoadTestRequest>) -> Result<pb::CancelLoadTestResponse, Status> {
        self.authorize(&request)?;
        let cancelled = match &self.lock().running {
            Some((cancel, _)) => {
                cancel.cancel();
                true
            }
            None => false,
        };
        if cancelled {
            tracing::info!("load test cancelled on request");
        }
        Ok(pb::CancelLoadTestResponse { cancelled })
    }

    pub fn get(&self) -> pb::GetLoadTestResponse {
        let state = self.lock();
        pb::GetLoadTestResponse {
            running: state.running.is_some(),
            progress: state.running.as_ref().map(|(_, p)| *p),
            last_report: state.last.clone(),
        }
    }
}

/// The engine's configuration for a gRPC request, with the same defaults and
/// syntax as the CLI.
pub fn config_from_request(
    request: &pb::RunLoadTestRequest,
    targets: &Targets,
) -> Result<(LoadConfig, Vec<Threshold>), LoadError> {
    let scenario = ScenarioKind::parse(&request.scenario).ok_or_else(|| {
        LoadError::invalid(
            "scenario",
            format!(
                "{:?} is not a scenario: users, reads, orders, mixed, db-pool, consumer-group or health",
                request.scenario
            ),
        )
    })?;
    let mut config = LoadConfig::new(scenario, targets.clone());
    let finite = |field: &'static str, v: f64| {
        if v.is_finite() && v >= 0.0 { Ok(v) } else { Err(LoadError::invalid(field, "must be a finite number ≥ 0")) }
    };
    let seconds = |field: &'static str, v: f64| -> Result<Duration, LoadError> {
        let v = finite(field, v)?;
        Duration::try_from_secs_f64(v).map_err(|_| LoadError::invalid(field, "is out of range"))
    };
    config.duration = seconds("duration_seconds", request.duration_seconds)?;
    config.warmup = seconds("warmup_seconds", request.warmup_seconds)?;
    if request.timeout_seconds > 0.0 {
        config.timeout = seconds("timeout_seconds", request.timeout_seconds)?;
    }
    config.arrival = match request.arrival.as_str() {
        "" | "constant" => Arrival::Constant,
        "poisson" => Arrival::Poisson,
        other => return Err(LoadError::invalid("arrival", format!("{other:?} is not constant or poisson"))),
    };
    let rate = finite("rate", request.rate)?;
    let profiles = [
        (&request.ramp, parse_ramp as fn(&str) -> Result<Shape, String>, "ramp"),
        (&request.step, parse_step, "step"),
        (&request.spike, parse_spike, "spike"),
    ];
    let mut shape = None;
    for (text, parse, field) in profiles {
        if text.is_empty() {
            continue;
        }
        if shape.is_some() || rate > 0.0 {
            return Err(LoadError::invalid(field, "give one of rate, ramp, step and spike"));
        }
        shape = Some(parse(text).map_err(|m| LoadError::invalid(field, m))?);
    }
    config.shape = shape.or((rate > 0.0).then_some(Shape::Constant { rate }));
    config.concurrency = (request.concurrency > 0).then_some(request.concurrency as usize);
    if request.find_max {
        config.find_max_p99 = Some(Duration::from_secs_f64(finite("p99_under_ms", request.p99_under_ms)? / 1000.0));
        if config.shape.is_none() {
            config.shape = Some(Shape::Constant { rate: 100.0 });
        }
    }
    if !request.mix.is_empty() {
        config.mix = request.mix.parse::<Mix>().map_err(|m| LoadError::invalid("mix", m))?;
    }
    if request.max_in_flight > 0 {
        config.max_in_flight = request.max_in_flight as usize;
    }
    if request.consumers > 0 {
        config.consumers = request.consumers as usize;
    }
    if request.connections > 0 {
        config.connections = request.connections as usize;
    }
    config.pool_role = match request.pool_role.as_str() {
        "" | "order" => PoolRole::Order,
        "user" => PoolRole::User,
        other => return Err(LoadError::invalid("pool_role", format!("{other:?} is not user or order"))),
    };
    config.pool_size = (request.pool_size > 0).then_some(request.pool_size as usize);
    let thresholds = request
        .thresholds
        .iter()
        .map(|t| t.parse::<Threshold>().map_err(|m| LoadError::invalid("thresholds", m)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((config, thresholds))
}

pub fn progress_pb(p: &Progress) -> pb::LoadProgress {
    pb::LoadProgress {
        elapsed_seconds: p.elapsed_s,
        total_seconds: p.total_s,
        warming_up: p.warming_up,
        requests: p.requests,
        errors: p.errors,
        dropped: p.dropped,
        in_flight: p.in_flight,
        current_rps: p.current_rps,
        current_p99_ms: p.current_p99_ms,
        target_rps: p.target_rps,
    }
}

pub fn progress_from_pb(p: &pb::LoadProgress) -> Progress {
    Progress {
        elapsed_s: p.elapsed_seconds,
        total_s: p.total_seconds,
        warming_up: p.warming_up,
        requests: p.requests,
        errors: p.errors,
        dropped: p.dropped,
        in_flight: p.in_flight,
        current_rps: p.current_rps,
        current_p99_ms: p.current_p99_ms,
        target_rps: p.target_rps,
    }
}

fn summary(p: &Percentiles) -> pb::LatencySummary {
    pb::LatencySummary {
        count: p.count,
        min_ms: p.min,
        mean_ms: p.mean,
        p50_ms: p.p50,
        p90_ms: p.p90,
        p99_ms: p.p99,
        p999_ms: p.p999,
        max_ms: p.max,
    }
}

pub fn report_pb(report: &Report) -> pb::LoadReport {
    pb::LoadReport {
        scenario: report.scenario.clone(),
        mode: report.mode.clone(),
        profile: report.profile.clone(),
        target_rps: report.target_rps,
        achieved_rps: report.achieved_rps,
        requests: report.requests,
        ok: report.ok,
        dropped: report.dropped,
        errors: report.errors.clone().into_iter().collect(),
        latency: Some(summary(&report.latency_ms)),
        service_time: Some(summary(&report.service_time_ms)),
        cancelled: report.cancelled,
        thresholds: report
            .thresholds
            .iter()
            .map(|v| pb::ThresholdVerdict {
                threshold: v.threshold.clone(),
                actual: v.actual.clone(),
                passed: v.passed,
            })
            .collect(),
        passed: !report.failed_gates(),
        event_lag_p99_ms: report.event_lag.as_ref().map(|l| l.p99_ms),
        event_lag_mean_ms: report.event_lag.as_ref().map(|l| l.mean_ms),
        max_consumer_lag_records: report.event_lag.as_ref().and_then(|l| l.max_lag_records),
        json: serde_json::to_string(report).unwrap_or_default(),
        text: report.human(),
        started_at: report.started_at.clone(),
        error: String::new(),
    }
}

/// Event lag during a run as the monitor saw it: the order role's apply-lag
/// histogram from the snapshots before and after, and the largest consumer
/// lag of any snapshot in between.
struct LagWatch {
    snapshots: watch::Receiver<Arc<pb::Snapshot>>,
    before: Option<pb::Histogram>,
    max_lag: Arc<std::sync::atomic::AtomicI64>,
    stop: CancellationToken,
}

impl LagWatch {
    fn start(snapshots: watch::Receiver<Arc<pb::Snapshot>>) -> Self {
        let before = snapshots.borrow().event_flow.as_ref().and_then(|f| f.apply_lag.clone());
        let max_lag = Arc::new(std::sync::atomic::AtomicI64::new(-1));
        let stop = CancellationToken::new();
        let (mut rx, max, done) = (snapshots.clone(), max_lag.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                if let Some(kafka) = rx.borrow_and_update().kafka.as_ref().filter(|k| k.reachable) {
                    max.fetch_max(kafka.consumer_lag, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = done.cancelled() => return,
                }
            }
        });
        LagWatch { snapshots, before, max_lag, stop }
    }

    fn finish(self) -> Option<EventLag> {
        self.stop.cancel();
        let after = self.snapshots.borrow().event_flow.as_ref().and_then(|f| f.apply_lag.clone())?;
        let mut lag =
            super::lag_between(self.before.as_ref(), &after, "the monitor's snapshots (order role's apply lag)");
        let max = self.max_lag.load(std::sync::atomic::Ordering::Relaxed);
        lag.max_lag_records = (max >= 0).then_some(max);
        Some(lag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Targets {
        Targets { user_addr: "http://127.0.0.1:1".into(), order_addr: "http://127.0.0.1:2".into() }
    }

    #[test]
    fn requests_map_onto_the_cli_configuration() {
        let request = pb::RunLoadTestRequest {
            scenario: "reads".into(),
            ramp: "10:100/5s".into(),
            duration_seconds: 10.0,
            arrival: "poisson".into(),
            thresholds: vec!["p99<50ms".into()],
            ..Default::default()
        };
        let (config, thresholds) = config_from_request(&request, &targets()).expect("valid");
        assert_eq!(config.shape, Some(Shape::Ramp { from: 10.0, to: 100.0, over_s: 5.0 }));
        assert_eq!(config.arrival, Arrival::Poisson);
        assert_eq!(thresholds.len(), 1);
        assert!(config.validate(&LoadLimits::default()).is_ok());
    }

    #[test]
    fn bad_requests_name_their_field() {
        let bad = |change: fn(&mut pb::RunLoadTestRequest)| {
            let mut request = pb::RunLoadTestRequest {
                scenario: "users".into(),
                rate: 10.0,
                duration_seconds: 1.0,
                ..Default::default()
            };
            change(&mut request);
            config_from_request(&request, &targets()).map(drop).expect_err("refused").to_string()
        };
        assert!(bad(|r| r.scenario = "everything".into()).starts_with("scenario:"));
        assert!(bad(|r| r.rate = f64::INFINITY).starts_with("rate:"));
        assert!(bad(|r| r.ramp = "1:2/3s".into()).starts_with("ramp:"));
        assert!(bad(|r| r.arrival = "bursty".into()).starts_with("arrival:"));
        assert!(bad(|r| r.thresholds = vec!["p99".into()]).starts_with("thresholds:"));
        assert!(bad(|r| r.duration_seconds = -1.0).starts_with("duration_seconds:"));
    }

    #[test]
    fn the_token_is_never_shown() {
        let secret: Secret = "hunter2".parse().expect("a token");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        let args = LoadServiceArgs { admin_token: Some(secret.clone()), limits: LoadLimits::default() };
        assert!(!format!("{args:?}").contains("hunter2"));
        assert!(secret.matches("hunter2") && !secret.matches("hunter3") && !secret.matches("hunter22"));
    }
}
