//! The monitor against the whole system on real servers: what it reports
//! must match what the test did, and a target going away must show up in the
//! next snapshot without breaking it.

use std::time::Duration;

use msys::{
    config::{KafkaArgs, PostgresSettings},
    monitor::{CollectArgs, MonitorArgs},
    pb::{self, monitor_service_client::MonitorServiceClient, user_service_client::UserServiceClient},
};
use tonic::transport::Channel;

use crate::support::{
    DedicatedBroker, DedicatedPostgres, Flow, RunningRole, TestResult, UsersSide, create_topic, eventually, free_port,
    fresh_database, kafka_args, metric, orders_port, server_args, shared_broker, spawn_role, start_monitor, unique,
    users_port,
};

const CREATE_USER: &str = "/msys.v1.UserService/CreateUser";
const GET_USER: &str = "/msys.v1.UserService/GetUser";
/// Nothing listens here: a service that is simply not there.
const NOWHERE: &str = "http://127.0.0.1:1";

fn collect(interval: Duration) -> CollectArgs {
    CollectArgs {
        interval,
        probe_timeout: Duration::from_millis(800),
        status_window: Duration::from_secs(4),
        stop_after: Duration::from_secs(12),
        history: Duration::from_secs(900),
    }
}

#[allow(clippy::too_many_arguments)]
fn monitor_args(
    users_db: &PostgresSettings,
    orders_db: &PostgresSettings,
    kafka: &KafkaArgs,
    group: &str,
    user_addr: &str,
    order_addr: &str,
    collect: CollectArgs,
) -> MonitorArgs {
    MonitorArgs {
        port: 0,
        metrics_port: 0,
        user_addr: user_addr.to_owned(),
        order_addr: order_addr.to_owned(),
        consumer_group: group.to_owned(),
        dlq_topic: format!("{}.dlq", kafka.user_events_topic),
        user_postgres: users_db.into(),
        order_postgres: orders_db.into(),
        kafka: kafka.clone(),
        server: server_args(),
        collect,
        load: Default::default(),
    }
}

async fn client(monitor: &RunningRole) -> MonitorServiceClient<Channel> {
    MonitorServiceClient::new(monitor.channel().await)
}

async fn latest(client: &mut MonitorServiceClient<Channel>) -> pb::Snapshot {
    client.get_snapshot(pb::GetSnapshotRequest {}).await.expect("GetSnapshot answers").into_inner()
}

/// The first snapshot whose collection started after this call: the one
/// after the snapshot that may be in progress now.
async fn next_snapshot(client: &mut MonitorServiceClient<Channel>) -> pb::Snapshot {
    let seen = latest(client).await.sequence;
    let mut c = client.clone();
    eventually(Duration::from_secs(10), "a new snapshot is taken", || {
        let mut c = c.clone();
        async move {
            let s = latest(&mut c).await;
            (s.sequence > seen + 1).then_some(s)
        }
    })
    .await;
    latest(&mut c).await
}

/// Polls snapshots until `check` holds; on time-out, fails showing the last one.
async fn wait_for(
    client: &MonitorServiceClient<Channel>,
    timeout: Duration,
    what: &str,
    check: impl Fn(&pb::Snapshot) -> bool,
) -> pb::Snapshot {
    let mut client = client.clone();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let s = latest(&mut client).await;
        if check(&s) {
            return s;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting until {what}; last snapshot:\n{}",
                msys::monitor::table::render(&s)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn service<'a>(s: &'a pb::Snapshot, name: &str) -> &'a pb::ServiceStatus {
    s.services.iter().find(|x| x.name == name).expect("service listed")
}

fn database<'a>(s: &'a pb::Snapshot, name: &str) -> &'a pb::DatabaseStatus {
    s.databases.iter().find(|x| x.name == name).expect("database listed")
}

fn since_start(s: &pb::Snapshot, name: &str, method: &str) -> u64 {
    service(s, name)
        .methods
        .iter()
        .find(|m| m.method == method)
        .and_then(|m| m.since_start.map(|f| f.total))
        .unwrap_or(0)
}

fn group_status(s: &pb::Snapshot) -> pb::GroupStatus {
    s.kafka.as_ref().and_then(|k| pb::GroupStatus::try_from(k.group_status).ok()).unwrap_or_default()
}

/// Fresh users and orders databases that exist (the monitor never creates them).
async fn existing_databases() -> (PostgresSettings, PostgresSettings) {
    let (users, orders) = (fresh_database(users_port()), fresh_database(orders_port()));
    msys::db::ensure_database(&users).await.expect("create users db");
    msys::db::ensure_database(&orders).await.expect("create orders db");
    (users, orders)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_snapshot_shows_exactly_the_requests_sent_on_their_method() -> TestResult {
    let mut flow = Flow::start().await;
    let (user, order) = (format!("http://{}", flow.user.addr), format!("http://{}", flow.order.addr));
    let args = monitor_args(
        &flow.users_db,
        &flow.orders_db,
        &flow.kafka,
        &flow.group,
        &user,
        &order,
        collect(Duration::from_secs(1)),
    );
    let monitor = start_monitor(args).await;
    let mut client = client(&monitor).await;
    let before = wait_for(&client, Duration::from_secs(10), "both services are up", |s| {
        service(s, "user").state == pb::ServiceState::Up as i32
            && service(s, "order").state == pb::ServiceState::Up as i32
    })
    .await;
    let (creates, reads) = (since_start(&before, "user", CREATE_USER), since_start(&before, "user", GET_USER));
    for i in 0..7 {
        flow.create_user(&format!("Counted {i}"), &format!("counted{i}@example.com")).await;
    }
    let after = next_snapshot(&mut client).await;
    let shown = msys::monitor::table::render(&after);
    assert_eq!(since_start(&after, "user", CREATE_USER), creates + 7, "seven CreateUser calls more:\n{shown}");
    assert_eq!(since_start(&after, "user", GET_USER), reads, "no GetUser call was made");
    assert_eq!(since_start(&after, "order", CREATE_USER), 0, "the order service has no CreateUser");
    let user = service(&after, "user");
    assert!(!user.stale && user.healthy && user.sampled_at.is_some());
    assert!(user.since_start.is_some_and(|f| f.total >= 7 && f.failed == 0));
    // Interval figures of consecutive snapshots add up to what was sent.

    let history = client.get_history(pb::GetHistoryRequest { window_seconds: 0 }).await?.into_inner();
    assert!(history.points.len() >= 2, "{} points", history.points.len());
    assert_eq!(history.capacity, 900, "15 minutes at 1 s");
    assert!(history.memory_bytes < 2_000_000, "{} bytes", history.memory_bytes);
    let recent = client.get_history(pb::GetHistoryRequest { window_seconds: 1 }).await?.into_inner();
    assert!(recent.points.len() < history.points.len() || history.points.len() <= 4);

    monitor.stop().await;
    flow.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn both_databases_report_connections_sizes_and_the_users_insert_among_top_statements() -> TestResult {
    let mut flow = Flow::start().await;
    let (user, order) = (format!("http://{}", flow.user.addr), format!("http://{}", flow.order.addr));
    let args = monitor_args(
        &flow.users_db,
        &flow.orders_db,
        &flow.kafka,
        &flow.group,
        &user,
        &order,
        collect(Duration::from_secs(1)),
    );
    let monitor = start_monitor(args).await;
    let mut client = client(&monitor).await;
    for i in 0..5 {
        flow.create_user(&format!("Top {i}"), &format!("top{i}@example.com")).await;
    }
    let s = wait_for(&client, Duration::from_secs(15), "the users insert is among the top statements", |s| {
        database(s, "users_db").top_by_total_time.iter().any(|t| t.query.contains("INSERT INTO users"))
    })
    .await;
    for name in ["users_db", "orders_db"] {
        let d = database(&s, name);
        assert!(d.reachable && !d.stale && d.error.is_empty(), "{name}: {d:?}");
        assert!(d.statements_enabled, "{name}: {}", d.statements_note);
        assert!(d.size_bytes > 1_000_000 && d.size_bytes < 1_000_000_000, "{name} size {}", d.size_bytes);
        assert!(d.max_connections >= 100, "{name} max_connections {}", d.max_connections);
        let mine = d.active_connections + d.idle_connections + d.idle_in_transaction_connections;
        assert!(mine >= 1, "{name}: the role's pool holds at least one connection");
        assert!(mine <= d.server_connections && d.server_connections <= d.max_connections, "{name}: {d:?}");
        assert!((0.0..=100.0).contains(&d.cache_hit_percent), "{name} hit {}", d.cache_hit_percent);
        assert!(d.top_by_total_time.iter().all(|t| !t.query.contains("msys-monitor")), "own statements left out");
    }
    let insert = database(&s, "users_db").top_by_total_time.iter().find(|t| t.query.contains("INSERT INTO users"));
    assert!(insert.is_some_and(|t| t.calls >= 1 && t.rows >= 1 && t.total_ms > 0.0), "{insert:?}");
    let flow_figures = next_snapshot(&mut client).await.event_flow.expect("event flow");
    assert!(flow_figures.outbox_known && flow_figures.outbox_written == 5, "{flow_figures:?}");
    monitor.stop().await;
    flow.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_orders_database_shows_it_down_with_the_error_then_up_again() -> TestResult {
    let cluster = DedicatedPostgres::start();
    let orders_db = cluster.database();
    msys::db::ensure_database(&orders_db).await?;
    let (users_db, _) = existing_databases().await;
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let args = monitor_args(
        &users_db,
        &orders_db,
        &kafka,
        &unique("group"),
        NOWHERE,
        NOWHERE,
        collect(Duration::from_secs(1)),
    );
    let monitor = start_monitor(args).await;
    let mut client = client(&monitor).await;
    wait_for(&client, Duration::from_secs(10), "orders_db is reachable", |s| database(s, "orders_db").reachable).await;

    cluster.halt();
    let down = next_snapshot(&mut client).await;
    let d = database(&down, "orders_db");
    assert!(!d.reachable && d.stale, "{d:?}");
    assert!(!d.error.is_empty(), "the error is shown");
    assert!(database(&down, "users_db").reachable, "the other database is unaffected");

    cluster.resume();
    let up = wait_for(&client, Duration::from_secs(15), "orders_db is reachable again", |s| {
        database(s, "orders_db").reachable
    })
    .await;
    assert!(database(&up, "orders_db").error.is_empty());
    let moves: Vec<(String, String)> = up
        .events
        .iter()
        .filter(|e| e.subject == "database orders_db")
        .map(|e| (e.from.clone(), e.to.clone()))
        .collect();
    assert_eq!(moves, [("UP".to_owned(), "DOWN".to_owned()), ("DOWN".to_owned(), "UP".to_owned())]);
    monitor.stop().await;
    Ok(())
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("the order process runs").to_string();
    let status = std::process::Command::new("kill").args([sig, &pid]).status().expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread")]
async fn freezing_the_order_role_shows_lag_rising_and_the_status_leaving_ok_then_back() -> TestResult {
    let UsersSide { users_db, orders_db, kafka, user } = UsersSide::start().await;
    let group = unique("order-service");
    let port = free_port();
    let order = spawn_role("order", port, &orders_db, &kafka, &[("ORDER_CONSUMER_GROUP", group.as_str())]);
    let order_addr = format!("http://127.0.0.1:{port}");
    let order_channel = eventually(Duration::from_secs(30), "the order process accepts connections", || {
        let addr = order_addr.clone();
        async move { Channel::from_shared(addr).ok()?.connect().await.ok() }
    })
    .await;
    eventually(Duration::from_secs(30), "the order role's consumer is assigned its partitions", || {
        let c = order_channel.clone();
        async move { (metric(c, "partitions_assigned").await == 3).then_some(()) }
    })
    .await;
    let user_addr = format!("http://{}", user.addr);
    let args =
        monitor_args(&users_db, &orders_db, &kafka, &group, &user_addr, &order_addr, collect(Duration::from_secs(1)));
    let monitor = start_monitor(args).await;
    let client = client(&monitor).await;
    let mut users = UserServiceClient::new(user.channel().await);
    let mut created = 0;
    let mut create = async |n: usize| {
        for _ in 0..n {
            created += 1;
            let request = pb::CreateUserRequest { name: "Lag".into(), email: format!("lag{created}@example.com") };
            users.create_user(request).await.expect("create user");
        }
    };
    create(30).await;
    wait_for(&client, Duration::from_secs(30), "every partition committed and caught up", |s| {
        let k = s.kafka.clone().unwrap_or_default();
        group_status(s) == pb::GroupStatus::Ok
            && k.consumer_lag == 0
            && k.partitions.iter().all(|p| p.committed_offset > 0)
    })
    .await;

    let before_freeze = latest(&mut client.clone()).await.events.len();
    signal(&order, "-STOP");
    create(12).await;
    let first = wait_for(&client, Duration::from_secs(30), "the status leaves OK", |s| {
        group_status(s) != pb::GroupStatus::Ok && s.kafka.as_ref().is_some_and(|k| k.consumer_lag >= 12)
    })
    .await;
    let k = first.kafka.clone().unwrap_or_default();
    assert!(!k.group_status_reason.is_empty(), "a reason is given");
    assert!(k.consumer_lag_seconds > 0.0, "lag in seconds: {k:?}");
    create(6).await;
    let later = wait_for(&client, Duration::from_secs(40), "the group is STOPPED and the lag grew", |s| {
        let k = s.kafka.clone().unwrap_or_default();
        let exact = k
            .partitions
            .iter()
            .filter(|p| p.lag > 0)
            .all(|p| p.lag_seconds_source == pb::LagSecondsSource::RecordTimestamp as i32);
        group_status(s) == pb::GroupStatus::Stopped
            && k.consumer_lag >= 18
            && exact
            && k.consumer_lag_seconds > first.kafka.as_ref().map_or(0.0, |f| f.consumer_lag_seconds)
    })
    .await;
    let k = later.kafka.clone().unwrap_or_default();
    assert!(k.group_status_reason.contains("no member is committing"), "{}", k.group_status_reason);
    assert_eq!(service(&later, "order").state, pb::ServiceState::Down as i32, "a frozen role does not answer");

    signal(&order, "-CONT");
    let back = wait_for(&client, Duration::from_secs(60), "lag is back to 0 and the status OK", |s| {
        group_status(s) == pb::GroupStatus::Ok
            && s.kafka.as_ref().is_some_and(|k| k.consumer_lag == 0 && k.consumer_lag_seconds == 0.0)
    })
    .await;
    let group_moves: Vec<(String, String)> = back
        .events
        .iter()
        .skip(before_freeze)
        .filter(|e| e.subject == format!("group {group}"))
        .map(|e| (e.from.clone(), e.to.clone()))
        .collect();
    let reasons: Vec<String> =
        back.events.iter().map(|e| format!("{} {} -> {}: {}", e.subject, e.from, e.to, e.reason)).collect();
    eprintln!("transitions:\n{}", reasons.join("\n"));
    let left_ok = group_moves.iter().filter(|(from, _)| from == "GROUP_STATUS_OK").count();
    let came_back = group_moves.iter().filter(|(_, to)| to == "GROUP_STATUS_OK").count();
    assert_eq!((left_ok, came_back), (1, 1), "left OK once and came back once: {group_moves:?}");
    assert!(group_moves.windows(2).all(|w| w[0].1 == w[1].0), "each transition follows the last: {group_moves:?}");
    assert!(group_moves.iter().any(|(_, to)| to == "GROUP_STATUS_STOPPED"), "{group_moves:?}");
    let service_moves: Vec<(String, String)> = back
        .events
        .iter()
        .skip(before_freeze)
        .filter(|e| e.subject == "service order")
        .map(|e| (e.from.clone(), e.to.clone()))
        .collect();
    assert_eq!(service_moves, [("UP".to_owned(), "DOWN".to_owned()), ("DOWN".to_owned(), "UP".to_owned())]);

    monitor.stop().await;
    drop(order);
    user.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_monitor_keeps_working_while_the_broker_is_down_and_recovers() -> TestResult {
    let mut broker = DedicatedBroker::start().await;
    let kafka = kafka_args(&broker.addr, &unique("user-events"));
    create_topic(&kafka).await;
    let (users_db, orders_db) = existing_databases().await;
    let args = monitor_args(
        &users_db,
        &orders_db,
        &kafka,
        &unique("group"),
        NOWHERE,
        NOWHERE,
        collect(Duration::from_secs(1)),
    );
    let monitor = start_monitor(args).await;
    let mut client = client(&monitor).await;
    wait_for(&client, Duration::from_secs(15), "Kafka is reachable", |s| s.kafka.as_ref().is_some_and(|k| k.reachable))
        .await;

    broker.kill();
    let down = wait_for(&client, Duration::from_secs(10), "Kafka is shown unreachable", |s| {
        s.kafka.as_ref().is_some_and(|k| !k.reachable)
    })
    .await;
    let k = down.kafka.clone().unwrap_or_default();
    assert!(k.stale && !k.error.is_empty(), "{k:?}");
    assert_eq!(k.group_status, pb::GroupStatus::Unknown as i32);
    assert!(database(&down, "users_db").reachable, "the rest of the snapshot is still measured");
    for _ in 0..3 {
        let s = next_snapshot(&mut client).await;
        assert!(s.kafka.as_ref().is_some_and(|k| !k.reachable));
    }

    broker.resume().await;
    wait_for(&client, Duration::from_secs(30), "Kafka is reachable again", |s| {
        s.kafka.as_ref().is_some_and(|k| k.reachable && !k.stale && k.partitions.len() == 3)
    })
    .await;
    monitor.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn msys_status_prints_the_table_and_json_that_parses() -> TestResult {
    let (users_db, orders_db) = existing_databases().await;
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let args = monitor_args(
        &users_db,
        &orders_db,
        &kafka,
        &unique("group"),
        NOWHERE,
        NOWHERE,
        collect(Duration::from_secs(1)),
    );
    let monitor = start_monitor(args).await;
    let addr = format!("http://{}", monitor.addr);
    let run = |json: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_msys"));
        command.args(["status", "--monitor", &addr]);
        if json {
            command.arg("--json");
        }
        command.output().expect("run msys status")
    };
    let table = run(false);
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let text = String::from_utf8(table.stdout)?;
    for heading in ["SERVICE", "DATABASE", "KAFKA", "users_db", "orders_db", "EVENTS", "MONITOR"] {
        assert!(text.contains(heading), "{heading} missing from:\n{text}");
    }
    let json = run(true);
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(value["services"].as_array().map(Vec::len), Some(3));
    let status = value["kafka"]["groupStatus"].as_str().unwrap_or_default();
    assert!(status.starts_with("GROUP_STATUS_"), "enum words in JSON, got {status:?}");
    assert_eq!(value["services"][0]["state"].as_str(), Some("SERVICE_STATE_DOWN"));

    // The stream sends snapshots as they are taken, and refuses a bad interval.
    let mut client = client(&monitor).await;
    let mut stream = client.watch_snapshots(pb::WatchSnapshotsRequest { interval_ms: 100 }).await?.into_inner();
    let a = stream.message().await?.expect("a first snapshot");
    let b = stream.message().await?.expect("a second snapshot");
    assert!(b.sequence > a.sequence, "{} then {}", a.sequence, b.sequence);
    let error =
        client.watch_snapshots(pb::WatchSnapshotsRequest { interval_ms: 5 }).await.expect_err("5 ms is refused");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(error.message().contains("interval_ms"), "{}", error.message());
    drop(stream);
    monitor.stop().await;
    Ok(())
}
