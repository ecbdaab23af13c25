//! Load tests through the monitor (MonitorService/RunLoadTest): the admin
//! token guards starting and cancelling, one run at a time, a cancel ends a
//! run within a second, and the stream carries progress and the report.

use std::time::{Duration, Instant};

use msys::{
    load::{LoadLimits, service::LoadServiceArgs},
    monitor::{CollectArgs, MonitorArgs},
    pb::{self, load_test_event::Event, monitor_service_client::MonitorServiceClient},
};
use tonic::{Code, Request, Streaming, transport::Channel};

use crate::support::{Flow, RunningRole, TestResult, server_args, start_monitor};

const TOKEN: &str = "load-admin-7f3a";

pub(crate) async fn monitor_for(flow: &Flow, token: Option<&str>) -> RunningRole {
    let args = MonitorArgs {
        port: 0,
        metrics_port: 0,
        user_addr: format!("http://{}", flow.user.addr),
        order_addr: format!("http://{}", flow.order.addr),
        consumer_group: flow.group.clone(),
        dlq_topic: format!("{}.dlq", flow.kafka.user_events_topic),
        user_postgres: (&flow.users_db).into(),
        order_postgres: (&flow.orders_db).into(),
        kafka: flow.kafka.clone(),
        server: server_args(),
        collect: CollectArgs {
            interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(400),
            status_window: Duration::from_secs(4),
            stop_after: Duration::from_secs(12),
            history: Duration::from_secs(60),
        },
        load: LoadServiceArgs {
            admin_token: token.map(|t| t.parse().expect("a token")),
            limits: LoadLimits::default(),
        },
    };
    start_monitor(args).await
}

fn health_run(rate: f64, seconds: f64) -> pb::RunLoadTestRequest {
    pb::RunLoadTestRequest { scenario: "health".into(), rate, duration_seconds: seconds, ..Default::default() }
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

/// Reads the stream to its report.
async fn report_of(stream: &mut Streaming<pb::LoadTestEvent>) -> (Vec<pb::LoadProgress>, pb::LoadReport) {
    let mut progress = Vec::new();
    while let Some(event) = stream.message().await.expect("the stream carries events") {
        match event.event {
            Some(Event::Progress(p)) => progress.push(p),
            Some(Event::Report(r)) => return (progress, r),
            None => {}
        }
    }
    panic!("the stream ended without a report");
}

#[tokio::test]
async fn only_the_admin_token_starts_or_cancels_one_run_at_a_time_and_cancel_stops_it_within_a_second() -> TestResult {
    let _turn = crate::load::ONE_AT_A_TIME.lock().await;
    let flow = Flow::start().await;
    let monitor = monitor_for(&flow, Some(TOKEN)).await;
    let mut client = MonitorServiceClient::new(monitor.channel().await);

    let missing = client.run_load_test(health_run(20.0, 30.0)).await.expect_err("no token, no run");
    assert_eq!(missing.code(), Code::Unauthenticated);
    let wrong = client.run_load_test(with_token(health_run(20.0, 30.0), "guess")).await.expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(!wrong.message().contains(TOKEN) && !missing.message().contains(TOKEN));

    let mut stream = client.run_load_test(with_token(health_run(20.0, 30.0), TOKEN)).await?.into_inner();
    let first = stream.message().await?.expect("a first event");
    assert!(matches!(first.event, Some(Event::Progress(_))), "progress comes first: {first:?}");

    let second = client.run_load_test(with_token(health_run(20.0, 1.0), TOKEN)).await.expect_err("one at a time");
    assert_eq!(second.code(), Code::FailedPrecondition, "{second:?}");
    assert!(client.get_load_test(pb::GetLoadTestRequest {}).await?.into_inner().running);

    let unauthenticated =
        client.cancel_load_test(pb::CancelLoadTestRequest {}).await.expect_err("cancel needs the token");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    let asked = Instant::now();
    let cancel = client.cancel_load_test(with_token(pb::CancelLoadTestRequest {}, TOKEN)).await?.into_inner();
    assert!(cancel.cancelled);
    let (_, report) = report_of(&mut stream).await;
    assert!(asked.elapsed() < Duration::from_secs(1), "the run stopped {:?} after the cancel", asked.elapsed());
    assert!(report.cancelled, "{report:?}");
    assert!(report.requests > 0 && report.requests < 600, "{} requests before the cancel", report.requests);

    let state = client.get_load_test(pb::GetLoadTestRequest {}).await?.into_inner();
    assert!(!state.running);
    assert_eq!(state.last_report.map(|r| r.requests), Some(report.requests));
    monitor.stop().await;
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_run_streams_progress_every_second_then_the_report_with_the_event_lag_the_monitor_saw() -> TestResult {
    let _turn = crate::load::ONE_AT_A_TIME.lock().await;
    let flow = Flow::start().await;
    let monitor = monitor_for(&flow, None).await;
    let mut client: MonitorServiceClient<Channel> = MonitorServiceClient::new(monitor.channel().await);
    let request = pb::RunLoadTestRequest {
        scenario: "users".into(),
        rate: 20.0,
        duration_seconds: 3.0,
        thresholds: vec!["errors<1%".into(), "p99<1ms".into()],
        ..Default::default()
    };
    let mut stream = client.run_load_test(request).await?.into_inner();
    let (progress, report) = report_of(&mut stream).await;
    assert!((2..=4).contains(&progress.len()), "{} progress events in 3 s", progress.len());
    assert!(progress.windows(2).all(|w| w[0].elapsed_seconds < w[1].elapsed_seconds));
    assert_eq!(report.requests, 60, "{report:?}");
    assert_eq!(report.mode, "open");
    assert!(report.error.is_empty(), "{}", report.error);
    let verdicts: Vec<(String, bool)> = report.thresholds.iter().map(|t| (t.threshold.clone(), t.passed)).collect();
    assert_eq!(verdicts, vec![("errors<1%".into(), true), ("p99<1ms".into(), false)]);
    assert!(!report.passed);
    assert!(report.event_lag_mean_ms.is_some(), "the monitor saw the events applied: {report:?}");
    assert!(report.text.contains("Event lag during the run"));
    monitor.stop().await;
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn absurd_requests_are_refused_naming_the_field() -> TestResult {
    let flow = Flow::start().await;
    let monitor = monitor_for(&flow, None).await;
    let mut client = MonitorServiceClient::new(monitor.channel().await);
    for (request, field) in [
        (
            pb::RunLoadTestRequest {
                scenario: "everything".into(),
                rate: 1.0,
                duration_seconds: 1.0,
                ..Default::default()
            },
            "scenario",
        ),
        (health_run(1e9, 1.0), "rate"),
        (health_run(10.0, 1e7), "duration"),
        (health_run(0.0, 1.0), "rate"),
    ] {
        let status = client.run_load_test(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{field}: {}", status.message());
    }
    monitor.stop().await;
    flow.stop().await;
    Ok(())
}
