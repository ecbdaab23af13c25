//! `GET /metrics` on every role: the Prometheus text format, accepted by
//! `promtool check metrics`, with the conventional gRPC metrics and the
//! role's own, agreeing with GetMetrics (one registry behind both).

use std::{net::SocketAddr, process::Stdio, time::Duration};

use msys::pb::{self, metrics_service_client::MetricsServiceClient};
use tokio::io::AsyncWriteExt;

use crate::support::{Flow, TestResult, eventually, http_exchange};

/// One plain HTTP/1.0 GET, as a scraper sends it: (status line, headers+body).
async fn scrape(addr: SocketAddr) -> (String, String) {
    http_exchange(addr, "GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n", Duration::from_secs(5)).await
}

/// The value of the sample line that starts with `series` (name and labels).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Runs `promtool check metrics` on `body` when promtool is installed
/// (scripts/test.sh installs it); returns whether it ran.
async fn promtool_accepts(role: &str, body: &str) -> bool {
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("promtool not installed: skipping the lint of the {role} role's /metrics");
        return false;
    };
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(body.as_bytes()).await.expect("write to promtool");
    drop(stdin);
    let output = child.wait_with_output().await.expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool check metrics rejected the {role} role's /metrics:\n{}{}\n---\n{body}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    true
}

#[tokio::test]
async fn every_role_serves_prometheus_metrics_that_promtool_accepts_and_getmetrics_agrees_with() -> TestResult {
    let mut flow = Flow::start().await;
    let ada = flow.create_user("Ada", "ada@example.org").await;
    let taken = flow.users.create_user(pb::CreateUserRequest { name: "Ada".into(), email: "ada@example.org".into() });
    assert_eq!(taken.await.expect_err("the email is taken").code(), tonic::Code::AlreadyExists);
    flow.orders.create_order(pb::CreateOrderRequest { user_id: ada.id, product: "pen".into(), quantity: 1 }).await?;

    // user role: wait for the relay and the outbox gauge to catch up.
    let user_metrics = flow.user.metrics_addr;
    let body = eventually(Duration::from_secs(20), "the user role reports its event published", || async {
        let (_, body) = scrape(user_metrics).await;
        (sample(&body, "msys_events_published_total") == Some(1.0)
            && sample(&body, "msys_outbox_pending_rows") == Some(0.0))
        .then_some(body)
    })
    .await;
    let (head, _) = scrape(user_metrics).await;
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let create = "grpc_service=\"msys.v1.UserService\",grpc_method=\"CreateUser\"";
    assert_eq!(sample(&body, &format!("grpc_server_started_total{{{create}}}")), Some(2.0), "{body}");
    assert_eq!(sample(&body, &format!("grpc_server_handled_total{{{create},grpc_code=\"OK\"}}")), Some(1.0));
    assert_eq!(sample(&body, &format!("grpc_server_handled_total{{{create},grpc_code=\"AlreadyExists\"}}")), Some(1.0));
    assert_eq!(sample(&body, &format!("grpc_server_handling_seconds_count{{{create}}}")), Some(2.0));
    assert!(sample(&body, &format!("grpc_server_handling_seconds_bucket{{{create},le=\"0.0001\"}}")).is_some());
    for series in [
        "msys_outbox_oldest_pending_age_seconds",
        "msys_batch_queue_depth_requests",
        "msys_db_pool_size_connections",
        "msys_db_pool_in_use_connections",
        "msys_db_pool_waiting_requests",
    ] {
        assert!(sample(&body, series).is_some(), "{series} missing from:\n{body}");
    }
    assert!(sample(&body, "msys_db_pool_size_connections").is_some_and(|n| n >= 1.0));

    // GetMetrics is computed from the same registry.
    let report =
        MetricsServiceClient::new(flow.user.channel().await).get_metrics(pb::GetMetricsRequest {}).await?.into_inner();
    let method = report.methods.iter().find(|m| m.method == "/msys.v1.UserService/CreateUser").expect("CreateUser");
    assert_eq!((method.total, method.ok, method.failed), (2, 1, 1));
    assert_eq!(method.latency_buckets.last().map(|b| (b.le_seconds, b.count)), Some((f64::INFINITY, 2)));
    assert!(method.p50_latency_ms > 0.0 && method.p50_latency_ms <= method.p99_latency_ms);
    assert_eq!(report.values.get("events_published_total"), Some(&1));
    // Bytes in per second (the monitor's Kafka panel) comes from this: the
    // record's key, value and CloudEvents headers, so well over 100 bytes.
    assert!(report.values.get("events_published_bytes_total").is_some_and(|b| *b > 100), "{:?}", report.values);
    assert!(sample(&body, "msys_events_published_bytes_total").is_some_and(|b| b > 100.0), "{body}");
    promtool_accepts("user", &body).await;

    // order role
    let (_, body) = scrape(flow.order.metrics_addr).await;
    let created = "grpc_service=\"msys.v1.OrderService\",grpc_method=\"CreateOrder\"";
    assert_eq!(sample(&body, &format!("grpc_server_handled_total{{{created},grpc_code=\"OK\"}}")), Some(1.0));
    assert_eq!(sample(&body, "msys_consumer_partitions_assigned"), Some(3.0), "{body}");
    assert!(sample(&body, "msys_db_pool_size_connections").is_some());
    promtool_accepts("order", &body).await;

    // monitor role: its own gRPC counters (the collector's health checks and
    // GetMetrics calls are the *targets'*; its server counts what it serves).
    let monitor = crate::load_monitor::monitor_for(&flow, None).await;
    let mut client = pb::monitor_service_client::MonitorServiceClient::new(monitor.channel().await);
    client.get_snapshot(pb::GetSnapshotRequest {}).await?;
    let (_, body) = scrape(monitor.metrics_addr).await;
    let snapshot = "grpc_service=\"msys.v1.MonitorService\",grpc_method=\"GetSnapshot\"";
    assert_eq!(
        sample(&body, &format!("grpc_server_handled_total{{{snapshot},grpc_code=\"OK\"}}")),
        Some(1.0),
        "{body}"
    );
    promtool_accepts("monitor", &body).await;
    monitor.stop().await;

    flow.stop().await;
    Ok(())
}
