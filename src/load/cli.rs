//! `msys load`: the command line over the engine, with a live progress bar
//! (indicatif), the ghz-style report, `--report` JSON, thresholds and a
//! baseline comparison. Exit code 99 when a threshold or the baseline fails.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    LoadConfig, LoadLimits,
    plan::{Arrival, Shape},
    pool::PoolRole,
    report::{self, Report, THRESHOLD_EXIT_CODE, Threshold},
    run::Progress,
    scenario::{Mix, ScenarioKind, Targets},
};
use crate::{config::KafkaArgs, pb};

#[derive(Args, Debug)]
pub struct LoadArgs {
    #[arg(long, value_enum)]
    pub scenario: ScenarioKind,
    /// Open loop: requests per second, whatever the responses.
    #[arg(long, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop: this many workers, each calling again once answered.
    #[arg(long)]
    pub concurrency: Option<usize>,
    #[arg(long, value_enum, default_value = "constant")]
    pub arrival: Arrival,
    /// Linear ramp FROM:TO/OVER, e.g. 100:2000/30s (then TO until the end).
    #[arg(long, value_parser = parse_ramp, conflicts_with_all = ["rate", "step", "spike", "concurrency"])]
    pub ramp: Option<Shape>,
    /// Steps START:STEP/EVERY, e.g. 100:100/5s.
    #[arg(long, value_parser = parse_step, conflicts_with_all = ["rate", "spike", "concurrency"])]
    pub step: Option<Shape>,
    /// A spike BASE:PEAK/FOR@AT, e.g. 100:1000/2s@10s (AT counted after the warm-up).
    #[arg(long, value_parser = parse_spike, conflicts_with_all = ["rate", "concurrency"])]
    pub spike: Option<Shape>,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Sent but excluded from the results.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Search the highest rate whose p99 stays under --p99-under (trials of --duration each).
    #[arg(long, requires = "p99_under")]
    pub find_max: bool,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub p99_under: Option<Duration>,
    /// Weights of the mixed scenario.
    #[arg(long, default_value = "users=1,reads=8,orders=1")]
    pub mix: Mix,
    /// Most calls in flight (open loop); a call due with none free is dropped.
    #[arg(long, default_value_t = 1000)]
    pub max_in_flight: usize,
    /// Deadline of each call.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// HTTP/2 connections per target.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Seed of the Poisson schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long = "user-addr", env = "LOAD_USER_ADDR", default_value = "http://127.0.0.1:50051")]
    pub user_addr: String,
    #[arg(long = "order-addr", env = "LOAD_ORDER_ADDR", default_value = "http://127.0.0.1:50052")]
    pub order_addr: String,
    /// consumer-group: extra consumers to start.
    #[arg(long, default_value_t = 3)]
    pub consumers: usize,
    /// db-pool: the role whose pool to drive.
    #[arg(long, value_enum, default_value = "order")]
    pub pool_role: PoolRole,
    /// db-pool: the pool's size, when the role does not report db_pool_size.
    #[arg(long)]
    pub pool_size: Option<usize>,
    /// How long to wait for every target to report SERVING.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// Write the report as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Pass/fail gate, repeatable: p99<50ms, errors<1%, rps>1000, dropped<1%, service_p99<5ms.
    #[arg(long = "threshold")]
    pub thresholds: Vec<Threshold>,
    /// An earlier --report to compare with.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// No progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Run the test in the monitor (RunLoadTest) rather than in this process.
    #[arg(long)]
    pub via_monitor: bool,
    /// The monitor, for --via-monitor.
    #[arg(long = "monitor", env = "MONITOR_ADDR", default_value = "http://127.0.0.1:50053")]
    pub monitor: String,
    /// Sent to the monitor as `authorization: Bearer` with --via-monitor.
    #[arg(long = "admin-token", env = "MSYS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<super::service::Secret>,
    #[command(flatten)]
    pub limits: LoadLimits,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

fn split_shape(text: &str, what: &str, example: &str) -> Result<(f64, f64, Duration), String> {
    let bad = || format!("{what} {text:?} is not of the form {example}");
    let (rates, over) = text.split_once('/').ok_or_else(bad)?;
    let (a, b) = rates.split_once(':').ok_or_else(bad)?;
    let a: f64 = a.trim().parse().map_err(|_| bad())?;
    let b: f64 = b.trim().parse().map_err(|_| bad())?;
    let over = humantime::parse_duration(over.trim()).map_err(|e| format!("{}: {e}", bad()))?;
    Ok((a, b, over))
}

pub fn parse_ramp(text: &str) -> Result<Shape, String> {
    let (from, to, over) = split_shape(text, "ramp", "FROM:TO/OVER, e.g. 100:2000/30s")?;
    Ok(Shape::Ramp { from, to, over_s: over.as_secs_f64() })
}

pub fn parse_step(text: &str) -> Result<Shape, String> {
    let (start, step, every) = split_shape(text, "step", "START:STEP/EVERY, e.g. 100:100/5s")?;
    Ok(Shape::Step { start, step, every_s: every.as_secs_f64() })
}

pub fn parse_spike(text: &str) -> Result<Shape, String> {
    let example = "BASE:PEAK/FOR@AT, e.g. 100:1000/2s@10s";
    let (head, at) = text.split_once('@').ok_or_else(|| format!("spike {text:?} is not of the form {example}"))?;
    let (base, peak, length) = split_shape(head, "spike", example)?;
    let at = humantime::parse_duration(at.trim()).map_err(|e| format!("spike start {at:?}: {e}"))?;
    Ok(Shape::Spike { base, peak, at_s: at.as_secs_f64(), for_s: length.as_secs_f64() })
}

impl LoadArgs {
    pub fn config(&self) -> LoadConfig {
        let targets = Targets { user_addr: self.user_addr.clone(), order_addr: self.order_addr.clone() };
        let mut config = LoadConfig::new(self.scenario, targets);
        config.mix = self.mix;
        config.shape = self
            .ramp
            .clone()
            .or_else(|| self.step.clone())
            .or_else(|| self.spike.clone())
            .or_else(|| self.rate.map(|rate| Shape::Constant { rate }));
        if self.find_max && config.shape.is_none() {
            config.shape = Some(Shape::Constant { rate: 100.0 });
        }
        config.arrival = self.arrival;
        config.concurrency = self.concurrency;
        config.duration = self.duration;
        config.warmup = self.warmup;
        config.max_in_flight = self.max_in_flight;
        config.timeout = self.timeout;
        config.connections = self.connections;
        config.seed = self.seed;
        config.find_max_p99 = if self.find_max { self.p99_under } else { None };
        config.consumers = self.consumers;
        config.pool_role = self.pool_role;
        config.pool_size = self.pool_size;
        config.ready_timeout = self.ready_timeout;
        config
    }
}

/// Shows progress events on a bar until the channel closes.
fn spawn_bar(mut events: mpsc::Receiver<Progress>, total: Duration, hidden: bool) -> tokio::task::JoinHandle<()> {
    let bar = if hidden { ProgressBar::hidden() } else { ProgressBar::new(total.as_secs().max(1)) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} s  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    tokio::spawn(async move {
        while let Some(p) = events.recv().await {
            bar.set_position(p.elapsed_s as u64);
            let phase = if p.warming_up { "warm-up  " } else { "" };
            bar.set_message(format!(
                "{phase}{:.0}/s{} p99 {} errors {} dropped {}",
                p.current_rps,
                if p.target_rps > 0.0 { format!(" (target {:.0})", p.target_rps) } else { String::new() },
                report::format_ms(p.current_p99_ms),
                p.errors,
                p.dropped
            ));
        }
        bar.finish_and_clear();
    })
}

/// Runs `msys load`. Exits the process with 99 when a gate fails.
pub async fn run(args: LoadArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.config();
    config.validate(&args.limits)?;
    let baseline: Option<Report> = match &args.baseline {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading baseline {}", path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("{} is not a load report", path.display()))?)
        }
        None => None,
    };
    let (tx, rx) = mpsc::channel(16);
    let bar = spawn_bar(rx, config.warmup + config.duration, args.no_progress);
    let result = if args.via_monitor {
        via_monitor(&args, tx, shutdown).await
    } else {
        super::execute(&config, &args.limits, &args.kafka, Some(tx), shutdown).await.map_err(anyhow::Error::from)
    };
    let _ = bar.await;
    let mut report = result?;
    finish(&mut report, &args.thresholds, baseline.as_ref(), args.baseline.as_deref());
    print!("{}", report.human());
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&report).context("encoding the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("\nReport written to {}", path.display());
    }
    if report.failed_gates() {
        eprintln!("load test failed its gates (exit code {THRESHOLD_EXIT_CODE})");
        std::process::exit(THRESHOLD_EXIT_CODE);
    }
    Ok(())
}

/// The CLI's flags as a RunLoadTest request (profiles in the CLI's own syntax).
pub fn request_from_args(args: &LoadArgs) -> pb::RunLoadTestRequest {
    let ms = |s: f64| format!("{}ms", (s * 1000.0).round());
    let mut request = pb::RunLoadTestRequest {
        scenario: args.scenario.name().to_owned(),
        rate: args.rate.unwrap_or(0.0),
        concurrency: args.concurrency.unwrap_or(0) as u32,
        duration_seconds: args.duration.as_secs_f64(),
        warmup_seconds: args.warmup.as_secs_f64(),
        arrival: format!("{:?}", args.arrival).to_lowercase(),
        mix: format!("users={},reads={},orders={}", args.mix.users, args.mix.reads, args.mix.orders),
        max_in_flight: args.max_in_flight as u32,
        timeout_seconds: args.timeout.as_secs_f64(),
        find_max: args.find_max,
        p99_under_ms: args.p99_under.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        consumers: args.consumers as u32,
        pool_role: format!("{:?}", args.pool_role).to_lowercase(),
        pool_size: args.pool_size.unwrap_or(0) as u32,
        thresholds: args.thresholds.iter().map(|t| t.text().to_owned()).collect(),
        connections: args.connections as u32,
        ..Default::default()
    };
    if let Some(Shape::Ramp { from, to, over_s }) = &args.ramp {
        request.ramp = format!("{from}:{to}/{}", ms(*over_s));
    }
    if let Some(Shape::Step { start, step, every_s }) = &args.step {
        request.step = format!("{start}:{step}/{}", ms(*every_s));
    }
    if let Some(Shape::Spike { base, peak, at_s, for_s }) = &args.spike {
        request.spike = format!("{base}:{peak}/{}@{}", ms(*for_s), ms(*at_s));
    }
    request
}

/// Runs the test in the monitor, drawing its progress on the same bar; Ctrl-C cancels it there.
async fn via_monitor(
    args: &LoadArgs,
    progress: mpsc::Sender<Progress>,
    shutdown: CancellationToken,
) -> anyhow::Result<Report> {
    let channel = tonic::transport::Endpoint::from_shared(args.monitor.clone())
        .with_context(|| format!("{:?} is not a valid address", args.monitor))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the monitor at {}", args.monitor))?;
    let mut client = pb::monitor_service_client::MonitorServiceClient::new(channel);
    let token = args.admin_token.as_ref();
    let mut stream = client
        .run_load_test(authorized(request_from_args(args), token)?)
        .await
        .map_err(|s| anyhow::anyhow!("the monitor refused the load test: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut cancel_sent = false;
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = shutdown.cancelled(), if !cancel_sent => {
                cancel_sent = true;
                let _ = client.cancel_load_test(authorized(pb::CancelLoadTestRequest {}, token)?).await;
                continue;
            }
        };
        let event =
            message.map_err(|s| anyhow::anyhow!("the monitor's stream failed: {:?}: {}", s.code(), s.message()))?;
        match event.and_then(|e| e.event) {
            Some(pb::load_test_event::Event::Progress(p)) => {
                let _ = progress.try_send(super::service::progress_from_pb(&p));
            }
            Some(pb::load_test_event::Event::Report(report)) => {
                if !report.error.is_empty() {
                    anyhow::bail!("the monitor's load test failed: {}", report.error);
                }
                return serde_json::from_str(&report.json).context("the monitor's report is not a load report");
            }
            None => anyhow::bail!("the monitor ended the stream without a report"),
        }
    }
}

/// `message` with `authorization: Bearer <token>` when a token is given.
fn authorized<T>(message: T, token: Option<&super::service::Secret>) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value =
            format!("Bearer {}", token.expose()).parse().context("MSYS_ADMIN_TOKEN is not valid in a header")?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// Adds threshold verdicts and the baseline comparison to the report.
pub fn finish(
    report: &mut Report,
    thresholds: &[Threshold],
    baseline: Option<&Report>,
    path: Option<&std::path::Path>,
) {
    report.thresholds = thresholds.iter().map(|t| t.check(report)).collect();
    if let Some(baseline) = baseline {
        report.baseline = Some(path.map_or("baseline".into(), |p| p.display().to_string()));
        report.comparisons = report::compare(baseline, report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_flags_parse_into_shapes() {
        assert_eq!(parse_ramp("100:2000/30s"), Ok(Shape::Ramp { from: 100.0, to: 2000.0, over_s: 30.0 }));
        assert_eq!(parse_step("100:50/5s"), Ok(Shape::Step { start: 100.0, step: 50.0, every_s: 5.0 }));
        assert_eq!(
            parse_spike("100:1000/2s@10s"),
            Ok(Shape::Spike { base: 100.0, peak: 1000.0, at_s: 10.0, for_s: 2.0 })
        );
        assert!(parse_ramp("100-2000/30s").unwrap_err().contains("FROM:TO/OVER"));
        assert!(parse_spike("100:1000/2s").unwrap_err().contains("BASE:PEAK/FOR@AT"));
        assert!(parse_step("a:1/1s").unwrap_err().contains("START:STEP/EVERY"));
    }
}
