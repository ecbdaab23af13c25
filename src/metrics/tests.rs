use super::*;

fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

#[test]
fn counters_gauges_and_labeled_gauges_read_back_and_export_with_their_units() {
    let metrics = Registry::new("test");
    metrics.add("events_published_total", 3);
    metrics.add("events_published_total", -1); // ignored: counters only grow
    metrics.set("outbox_pending", 7);
    metrics.add("outbox_pending", -2);
    metrics.set_labeled("consumer_lag_records", &[("partition", "2".into())], 11);
    assert_eq!(metrics.value("events_published_total"), 3);
    assert_eq!(metrics.value("outbox_pending"), 5);
    assert_eq!(metrics.value("never_touched"), 0);

    let text = metrics.encode_prometheus();
    assert!(text.contains("# TYPE msys_events_published_total counter"), "{text}");
    assert!(text.contains("\nmsys_events_published_total 3\n"), "{text}");
    assert!(text.contains("\nmsys_outbox_pending_rows 5\n"), "{text}");
    assert!(text.contains("msys_consumer_lag_records{partition=\"2\"} 11"), "{text}");

    let report = metrics.report();
    assert_eq!(report.values.get("events_published_total"), Some(&3));
    assert_eq!(report.values.get("outbox_pending"), Some(&5));
    let lag = &report.labeled_values[0];
    assert_eq!(
        (lag.name.as_str(), lag.labels.get("partition").map(String::as_str), lag.value),
        ("consumer_lag_records", Some("2"), 11)
    );
}

#[test]
fn rpcs_are_counted_by_service_method_and_code_in_both_views() {
    let metrics = Registry::new("test");
    let path = "/msys.v1.UserService/CreateUser";
    let create = metrics.grpc_method(path);
    for ms in [1, 2, 3] {
        create.start();
        create.finish(Code::Ok, Duration::from_millis(ms));
    }
    create.start();
    create.finish(Code::AlreadyExists, Duration::from_millis(40));

    let text = metrics.encode_prometheus();
    let labels = "grpc_service=\"msys.v1.UserService\",grpc_method=\"CreateUser\"";
    assert!(line(&text, &format!("grpc_server_started_total{{{labels}}} 4")).is_some(), "{text}");
    assert!(text.contains("grpc_code=\"AlreadyExists\""), "{text}");
    assert!(line(&text, "grpc_server_handling_seconds_count{").is_some_and(|l| l.ends_with(" 4")), "{text}");

    let report = metrics.report();
    let m = &report.methods[0];
    assert_eq!((m.method.as_str(), m.total, m.ok, m.failed), (path, 4, 3, 1));
    assert_eq!(m.max_latency_ms, 40.0);
    assert!((m.avg_latency_ms - 11.5).abs() < 1e-9, "{}", m.avg_latency_ms);
    assert!(m.p50_latency_ms >= 1.0 && m.p50_latency_ms <= 3.0, "{}", m.p50_latency_ms);
    assert!(m.p99_latency_ms > 30.0 && m.p99_latency_ms <= 50.0, "{}", m.p99_latency_ms);
    let last = m.latency_buckets.last().expect("buckets");
    assert_eq!((last.le_seconds, last.count), (f64::INFINITY, 4));
    assert!(m.latency_buckets.windows(2).all(|w| w[0].count <= w[1].count), "cumulative");
}

#[test]
fn histograms_pick_buckets_by_unit_and_report_the_same_counts() {
    let metrics = Registry::new("test");
    metrics.observe("event_apply_lag_seconds", 0.004);
    metrics.observe("apply_batch_size", 37.0);
    let report = metrics.report();
    let by_name = |name: &str| report.histograms.iter().find(|h| h.name == name).expect(name).clone();
    let lag = by_name("event_apply_lag_seconds");
    assert_eq!(lag.buckets.len(), LATENCY_BUCKETS.len() + 1);
    let batch = by_name("apply_batch_size");
    assert_eq!(batch.buckets.len(), COUNT_BUCKETS.len() + 1);
    assert_eq!((batch.count, batch.sum), (1, 37.0));
    let text = metrics.encode_prometheus();
    assert!(text.contains("msys_apply_batch_size_events_bucket{le=\"50\"} 1"), "{text}");
    assert!(text.contains("msys_event_apply_lag_seconds_count 1"), "{text}");
}

#[test]
fn collectors_run_before_every_read() {
    let metrics = Registry::new("test");
    let calls = Arc::new(AtomicU64::new(0));
    let seen = calls.clone();
    metrics.on_collect(move |m| m.set("db_pool_size", seen.fetch_add(1, Relaxed) as i64 + 1));
    assert_eq!(metrics.report().values.get("db_pool_size"), Some(&1));
    assert!(metrics.encode_prometheus().contains("msys_db_pool_size_connections 2"));
}

#[test]
fn paths_past_the_limit_share_one_label_set() {
    let metrics = Registry::new("test");
    for i in 0..(MAX_METHODS + 10) {
        metrics.record(&format!("/x.S/M{i}"), true, Duration::from_millis(1));
    }
    assert_eq!(metrics.report().methods.len(), MAX_METHODS + 1);
}
