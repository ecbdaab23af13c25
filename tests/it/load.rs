//! The load engine against the real system: stalls show in the percentiles,
//! the engine's counts agree with the target's own counters, the numbers of
//! a report are consistent, and thresholds decide the exit code.

use std::time::Duration;

use msys::{
    config::KafkaArgs,
    load::{
        self, LoadConfig, LoadLimits,
        plan::Shape,
        report::Report,
        scenario::{ScenarioKind, Targets},
    },
    pb::{self, metrics_service_client::MetricsServiceClient},
};
use tokio_util::sync::CancellationToken;

use crate::support::{
    TestResult, UserSystem, free_port, fresh_database, init_logging, kafka_args, shared_broker, spawn_role, unique,
    users_port,
};

/// The load tests take turns, as load tests on the monitor do: each drives
/// the machine hard, and the rest of the suite shares its two cores.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An address nothing listens on: the scenarios under test never need it.
fn nowhere() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

fn rate_config(scenario: ScenarioKind, user_addr: String, rate: f64, duration: Duration) -> LoadConfig {
    let mut config = LoadConfig::new(scenario, Targets { user_addr, order_addr: nowhere() });
    config.shape = Some(Shape::Constant { rate });
    config.duration = duration;
    config
}

async fn execute(config: &LoadConfig, kafka: &KafkaArgs) -> Report {
    load::execute(config, &LoadLimits::default(), kafka, None, CancellationToken::new()).await.expect("load test runs")
}

async fn calls_of(addr: &str, method: &str) -> u64 {
    try_calls_of(addr, method).await.expect("the role answers GetMetrics")
}

async fn try_calls_of(addr: &str, method: &str) -> Option<u64> {
    let mut client = MetricsServiceClient::connect(addr.to_owned()).await.ok()?;
    let report = client.get_metrics(pb::GetMetricsRequest {}).await.ok()?.into_inner();
    Some(report.methods.iter().find(|m| m.method == method).map_or(0, |m| m.total))
}

#[tokio::test]
async fn a_frozen_user_service_shows_in_p99_and_no_scheduled_request_vanishes() -> TestResult {
    let _turn = ONE_AT_A_TIME.lock().await;
    init_logging();
    let db = fresh_database(users_port());
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    let port = free_port();
    let mut role = spawn_role("user", port, &db, &kafka, &[]);
    let pid = role.id().expect("the role runs");
    // 200/s for 8 s; the engine itself waits until the role reports SERVING.
    let config = rate_config(ScenarioKind::Users, format!("http://127.0.0.1:{port}"), 200.0, Duration::from_secs(8));
    let run = tokio::spawn({
        let (config, kafka) = (config.clone(), kafka.clone());
        async move { execute(&config, &kafka).await }
    });
    // Freeze the role for 2 s in the middle of the run. Serving starts at the
    // first request, so wait for it before counting time.
    let addr = format!("http://127.0.0.1:{port}");
    crate::support::eventually(Duration::from_secs(60), "the run has started", || {
        let addr = addr.clone();
        async move { (try_calls_of(&addr, "/msys.v1.UserService/CreateUser").await? > 0).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(pid, "STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(pid, "CONT");
    let report = run.await?;
    let _ = role.kill().await;

    assert!(report.latency_ms.p99 >= 1000.0, "a 2 s freeze shows in p99: {:?}", report.latency_ms);
    let scheduled = (report.requests + report.dropped) as f64;
    assert!(
        (scheduled - 1600.0).abs() <= 16.0,
        "requests {} + dropped {} ≈ 200/s × 8 s",
        report.requests,
        report.dropped
    );
    // Service time started when the call was sent, so it hides nothing either,
    // but the intended-time latency is never below it.
    assert!(report.latency_ms.max >= report.service_time_ms.max);
    Ok(())
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name} {pid}");
}

#[tokio::test]
async fn the_engines_count_equals_the_targets_own_counter_and_the_numbers_agree() -> TestResult {
    let _turn = ONE_AT_A_TIME.lock().await;
    let system = UserSystem::start().await;
    let addr = format!("http://{}", system.role.addr);
    let method = "/msys.v1.UserService/CreateUser";
    let before = calls_of(&addr, method).await;
    let report =
        execute(&rate_config(ScenarioKind::Users, addr.clone(), 100.0, Duration::from_secs(2)), &system.kafka).await;
    let after = calls_of(&addr, method).await;

    assert_eq!(report.requests, after - before, "the engine and the role count the same calls");
    assert_eq!(report.requests, 200);
    assert_eq!(report.ok + report.error_count(), report.requests);
    assert_eq!(report.mode, "open");
    assert_eq!(report.target_rps, 100.0);
    // Mean and histogram agree.
    let l = &report.latency_ms;
    assert_eq!(l.count, report.requests, "every call is in the histogram");
    assert_eq!(report.latency_histogram.iter().map(|b| b.count).sum::<u64>(), report.requests);
    assert!(l.min <= l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max, "{l:?}");
    // The mean lies within what the histogram's bars allow: between the mean
    // of their lower edges and the mean of their upper edges. (Not "p50 ≤
    // mean": a backlog that builds up and drains, as on a machine busy with
    // the rest of the suite, skews latencies to the left, with mean < p50.)
    let (mut lower, mut low_edge) = (0.0, l.min);
    let mut upper = 0.0;
    for bar in &report.latency_histogram {
        lower += bar.count as f64 * low_edge;
        upper += bar.count as f64 * bar.le_ms;
        low_edge = bar.le_ms;
    }
    let n = report.requests as f64;
    assert!(
        lower / n <= l.mean + 1e-6 && l.mean <= upper / n + 1e-6,
        "mean {} outside [{}, {}]",
        l.mean,
        lower / n,
        upper / n
    );
    assert!(l.min <= l.mean && l.mean <= l.max, "{l:?}");
    let s = &report.service_time_ms;
    assert_eq!(s.count, report.requests);
    assert!(s.p50 <= l.p50 + 0.01, "service time never exceeds latency from intended start");
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_closed_loop_run_says_so_and_keeps_its_workers_busy() -> TestResult {
    let _turn = ONE_AT_A_TIME.lock().await;
    let system = UserSystem::start().await;
    let mut config = LoadConfig::new(
        ScenarioKind::Reads,
        Targets { user_addr: format!("http://{}", system.role.addr), order_addr: nowhere() },
    );
    config.concurrency = Some(4);
    config.duration = Duration::from_secs(1);
    config.warmup = Duration::from_millis(500);
    let report = execute(&config, &system.kafka).await;
    assert_eq!(report.mode, "closed");
    assert_eq!(report.target_rps, 0.0);
    assert!(report.requests > 20, "{} reads", report.requests);
    assert_eq!(report.error_count(), 0, "{:?}", report.errors);
    assert!((report.duration_s - 1.0).abs() < 0.05, "the warm-up is not measured: {}", report.duration_s);
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn load_waits_for_serving_targets_and_names_the_one_that_is_not() -> TestResult {
    let _turn = ONE_AT_A_TIME.lock().await;
    init_logging();
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    let mut config = rate_config(ScenarioKind::Users, nowhere(), 10.0, Duration::from_secs(1));
    config.ready_timeout = Duration::from_secs(1);
    let error = load::execute(&config, &LoadLimits::default(), &kafka, None, CancellationToken::new())
        .await
        .expect_err("no target, no load");
    assert!(error.to_string().contains(&config.targets.user_addr), "{error}");
    Ok(())
}

/// `msys load` as operators run it.
async fn msys_load(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_msys"))
        .arg("load")
        .args(args)
        .output()
        .await
        .expect("run msys load")
}

#[tokio::test]
async fn thresholds_decide_the_exit_code_and_the_report_says_which_failed() -> TestResult {
    let _turn = ONE_AT_A_TIME.lock().await;
    let system = UserSystem::start().await;
    let addr = format!("http://{}", system.role.addr);
    let dir = std::env::temp_dir().join(unique("load-report"));
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("report.json");
    let base = ["--scenario", "health", "--rate", "50", "--duration", "1s", "--no-progress", "--user-addr", &addr];

    let pass = msys_load(
        &[
            &base[..],
            &["--threshold", "p99<10s", "--threshold", "errors<1%"],
            &["--report", json.to_str().unwrap_or_default()],
        ]
        .concat(),
    )
    .await;
    assert_eq!(pass.status.code(), Some(0), "{}", String::from_utf8_lossy(&pass.stderr));
    let report: Report = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(report.scenario, "health");
    assert_eq!(report.requests, 50);
    assert!(report.thresholds.iter().all(|t| t.passed));
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    for field in [
        "scenario",
        "mode",
        "target_rps",
        "achieved_rps",
        "requests",
        "ok",
        "dropped",
        "errors",
        "latency_ms",
        "service_time_ms",
        "commit",
        "config",
        "limits",
    ] {
        assert!(raw.get(field).is_some(), "the JSON report has {field}");
    }
    for field in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(raw["latency_ms"].get(field).is_some(), "latency_ms has {field}");
    }

    let fail = msys_load(&[&base[..], &["--threshold", "p99<10s", "--threshold", "rps>100000"]].concat()).await;
    assert_eq!(fail.status.code(), Some(99));
    let text = String::from_utf8_lossy(&fail.stdout);
    assert!(text.contains("FAIL rps>100000") && text.contains("PASS p99<10s"), "{text}");

    // Against a far slower baseline nothing regressed; against one that
    // managed ten times the rate, the rate did.
    let baseline = dir.join("baseline.json");
    let mut slower = report.clone();
    slower.latency_ms.p50 = 10_000.0;
    slower.latency_ms.p99 = 10_000.0;
    slower.service_time_ms.p99 = 10_000.0;
    slower.achieved_rps = 1.0;
    std::fs::write(&baseline, serde_json::to_string(&slower)?)?;
    let better = msys_load(&[&base[..], &["--baseline", baseline.to_str().unwrap_or_default()]].concat()).await;
    assert_eq!(better.status.code(), Some(0), "{}", String::from_utf8_lossy(&better.stdout));
    let mut faster = report.clone();
    faster.achieved_rps = report.achieved_rps * 10.0;
    std::fs::write(&baseline, serde_json::to_string(&faster)?)?;
    let worse = msys_load(&[&base[..], &["--baseline", baseline.to_str().unwrap_or_default()]].concat()).await;
    assert_eq!(worse.status.code(), Some(99));
    assert!(String::from_utf8_lossy(&worse.stdout).contains("REGRESSED\tachieved rps"));

    let absurd = msys_load(&["--scenario", "users", "--rate", "1e9", "--user-addr", &addr]).await;
    assert_eq!(absurd.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&absurd.stderr).contains("LOAD_MAX_RATE"));
    std::fs::remove_dir_all(&dir)?;
    system.role.stop().await;
    Ok(())
}
