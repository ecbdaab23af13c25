//! Real faults: the broker killed, the database stopped, the user role
//! killed with SIGKILL. Each test runs its own server it can hurt.

use std::{collections::HashSet, time::Duration};

use msys::pb::{self, metrics_service_client::MetricsServiceClient, user_service_client::UserServiceClient};
use prost::Message as _;
use rdkafka::Message;
use tonic::Code;

use crate::support::{
    DedicatedBroker, DedicatedPostgres, TestResult, create_topic, eventually, fresh_database, header, init_logging,
    kafka_args, read_all, shared_broker, spawn_role, sql, start_user, unique, user_args, users_port,
    wait_for_outbox_drain,
};

#[tokio::test]
async fn creates_succeed_while_the_broker_is_down_and_every_event_arrives_once() -> TestResult {
    init_logging();
    let mut broker = DedicatedBroker::start().await;
    let kafka = kafka_args(&broker.addr, "user-events");
    create_topic(&kafka).await;
    let db = fresh_database(users_port());
    let role = start_user(user_args(&db, &kafka)).await;
    let mut users = UserServiceClient::new(role.channel().await);
    let mut metrics = MetricsServiceClient::new(role.channel().await);
    let create = |i: usize| pb::CreateUserRequest { name: format!("user {i}"), email: format!("u{i}@example.org") };

    for i in 0..5 {
        users.create_user(create(i)).await?;
    }
    wait_for_outbox_drain(&db).await;

    broker.kill();
    for i in 5..25 {
        users.create_user(create(i)).await.expect("creates succeed while the broker is down");
    }
    // The relay tried, and failed, to publish while the broker was away.
    eventually(Duration::from_secs(30), "the relay reports a failed delivery", || {
        let mut metrics = metrics.clone();
        async move {
            let report = metrics.get_metrics(pb::GetMetricsRequest {}).await.ok()?.into_inner();
            (report.values.get("events_publish_failures_total").copied().unwrap_or(0) > 0).then_some(())
        }
    })
    .await;
    let pending = metrics.get_metrics(pb::GetMetricsRequest {}).await?.into_inner().values["outbox_pending"];
    assert!(pending > 0, "the outbox holds the events meanwhile");

    broker.resume().await;
    wait_for_outbox_drain(&db).await;
    let records = read_all(&kafka).await;
    let ids: Vec<String> = records.iter().map(|r| header(r, "ce_id").expect("ce_id")).collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 25, "every event arrived, none twice");
    assert_eq!(distinct.len(), 25);
    role.stop().await;
    Ok(())
}

#[tokio::test]
async fn health_follows_the_database() -> TestResult {
    init_logging();
    let postgres = DedicatedPostgres::start();
    let db = postgres.database();
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    let role = start_user(user_args(&db, &kafka)).await;
    let addr = role.addr.to_string();
    let health = |expected: &'static str| {
        let addr = addr.clone();
        move || {
            let addr = addr.clone();
            async move {
                let status = msys::grpc::check_health(&addr, "", Duration::from_secs(2)).await.ok()?;
                (status == expected).then_some(())
            }
        }
    };
    eventually(Duration::from_secs(10), "health is SERVING", health("SERVING")).await;

    postgres.halt();
    eventually(Duration::from_secs(10), "health is NOT_SERVING", health("NOT_SERVING")).await;
    let mut users = UserServiceClient::new(role.channel().await);
    let request = pb::CreateUserRequest { name: "Ada".into(), email: "ada@example.org".into() };
    let refused = users.create_user(request.clone()).await.expect_err("no database, no user");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    postgres.resume();
    eventually(Duration::from_secs(15), "health is SERVING again", health("SERVING")).await;
    users.create_user(request).await.expect("requests succeed once the database is back");
    role.stop().await;
    Ok(())
}

async fn connect(port: u16) -> UserServiceClient<tonic::transport::Channel> {
    eventually(Duration::from_secs(30), "msys user accepts connections", || async move {
        UserServiceClient::connect(format!("http://127.0.0.1:{port}")).await.ok()
    })
    .await
}

#[tokio::test]
async fn killing_the_user_role_loses_and_invents_no_event() -> TestResult {
    init_logging();
    let db = fresh_database(users_port());
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let port = crate::support::free_port();
    let mut process = spawn_role("user", port, &db, &kafka, &[("OUTBOX_POLL_INTERVAL", "100ms")]);
    let client = connect(port).await;

    // A burst of creates from 8 clients; SIGKILL lands in the middle of it.
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..100 {
                let request = pb::CreateUserRequest { name: format!("w{w}"), email: format!("w{w}-{i}@example.org") };
                if client.create_user(request).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let users_db = sql(&db).await;
    eventually(Duration::from_secs(60), "some users exist", || async {
        let row = users_db.query_one("SELECT count(*) FROM users", &[]).await.ok()?;
        (row.get::<_, i64>(0) >= 100).then_some(())
    })
    .await;
    process.start_kill()?;
    process.wait().await?;
    let mut acknowledged = 0;
    for writer in writers {
        acknowledged += writer.await?;
    }

    let mut process = spawn_role("user", port, &db, &kafka, &[("OUTBOX_POLL_INTERVAL", "100ms")]);
    connect(port).await;
    wait_for_outbox_drain(&db).await;
    let user_ids: HashSet<i64> = users_db.query("SELECT id FROM users", &[]).await?.iter().map(|r| r.get(0)).collect();
    assert!(user_ids.len() >= acknowledged, "every acknowledged create is stored");
    assert!(user_ids.len() < 800, "the kill interrupted the burst");

    let records = read_all(&kafka).await;
    let mut event_ids = HashSet::new();
    let mut announced = HashSet::new();
    for record in &records {
        let event = pb::UserEvent::decode(record.payload().expect("value"))?;
        // At least once: a record may repeat, but only with its own ce_id.
        if event_ids.insert(event.event_id.clone()) {
            announced.insert(event.user.expect("user").id);
        }
    }
    assert_eq!(announced, user_ids, "exactly the stored users were announced: none lost, none invented");
    assert_eq!(event_ids.len(), user_ids.len(), "one distinct event per create");
    process.start_kill()?;
    Ok(())
}
