//! The order side's event pipeline: batched apply, poison that only the
//! database can refuse, and an orders-database outage.

use std::{collections::HashSet, time::Duration};

use msys::{
    config::KafkaArgs,
    events::{self, EventType},
    order::apply::{self, ErrorClass, Event},
    pb,
};
use rdkafka::{
    Message,
    producer::{FutureProducer, FutureRecord},
};

use crate::support::{
    DedicatedPostgres, Flow, KNOWN_USERS, TestResult, USERS_TABLE, UsersSide, eventually, fresh_database, header,
    kafka_args, metric, order_args, orders_port, read_all, shared_broker, sql, start_order, start_user, unique,
    user_args, user_rows, users_port, wait_for_assignment, wait_for_outbox_drain, wait_until_replica_matches,
};

fn user_event(kind: EventType, id: i64, version: i64, name: &str) -> pb::UserEvent {
    let now = std::time::SystemTime::now();
    pb::UserEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: kind.as_str().to_owned(),
        user: Some(pb::User {
            id,
            name: name.to_owned(),
            email: format!("u{id}@example.org"),
            version,
            created_at: Some(now.into()),
            updated_at: Some(now.into()),
        }),
        occurred_at: Some(now.into()),
    }
}

/// Sends `event` to `partition`, keyed and framed as the relay does.
async fn send_to(producer: &FutureProducer, kafka: &KafkaArgs, partition: i32, event: &pb::UserEvent) {
    let record = events::encode(event);
    let future = FutureRecord::to(&kafka.user_events_topic)
        .partition(partition)
        .key(&record.key)
        .payload(&record.payload)
        .headers(record.headers);
    producer.send(future, Duration::from_secs(5)).await.map_err(|(e, _)| e).expect("send a test record");
}

async fn count(db: &msys::config::PostgresSettings, query: &str) -> i64 {
    sql(db).await.query_one(query, &[]).await.expect("count").get(0)
}

#[tokio::test]
async fn a_burst_applies_in_batches_with_one_users_whole_life_in_one_transaction() -> TestResult {
    let UsersSide { users_db, orders_db, kafka, user } = UsersSide::start().await;
    let mut users = pb::user_service_client::UserServiceClient::new(user.channel().await);
    // First on its partition, so the consumer's first poll holds all three.
    let brief = users
        .create_user(pb::CreateUserRequest { name: "Brief".into(), email: "brief@example.org".into() })
        .await?
        .into_inner();
    let renamed = pb::UpdateUserRequest { id: brief.id, name: Some("Brief K".into()), email: None };
    users.update_user(renamed).await?;
    users.delete_user(pb::DeleteUserRequest { id: brief.id }).await?;
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut users = users.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..150 {
                let request = pb::CreateUserRequest { name: format!("w{w}"), email: format!("w{w}-{i}@example.org") };
                let created = users.create_user(request).await.expect("create").into_inner();
                if i % 10 == 0 {
                    let update = pb::UpdateUserRequest { id: created.id, name: Some(format!("w{w} {i}")), email: None };
                    users.update_user(update).await.expect("update");
                }
            }
        }));
    }
    for writer in writers {
        writer.await?;
    }
    wait_for_outbox_drain(&users_db).await;

    // Everything waits on the topic when the consumer starts.
    let order = start_order(order_args(&orders_db, &kafka, &unique("order-service"))).await;
    wait_until_replica_matches(&users_db, &orders_db).await;
    assert_eq!(user_rows(&users_db, USERS_TABLE).await.len(), 2400);

    let outbox: HashSet<uuid::Uuid> =
        sql(&users_db).await.query("SELECT event_id FROM user_outbox", &[]).await?.iter().map(|r| r.get(0)).collect();
    let applied: Vec<uuid::Uuid> = sql(&orders_db)
        .await
        .query("SELECT event_id FROM applied_events", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(outbox.len(), 2643);
    assert_eq!(applied.len(), outbox.len(), "each event recorded once");
    assert_eq!(applied.into_iter().collect::<HashSet<_>>(), outbox, "and exactly the events written");

    let brief_txs = count(
        &orders_db,
        &format!("SELECT count(DISTINCT xmin::text) FROM applied_events WHERE user_id = {}", brief.id),
    )
    .await;
    assert_eq!(brief_txs, 1, "created, updated and deleted in one batch transaction");
    let tombstones = format!("SELECT count(*) FROM deleted_users WHERE user_id = {}", brief.id);
    assert_eq!(count(&orders_db, &tombstones).await, 1);
    let transactions = count(&orders_db, "SELECT count(DISTINCT xmin::text) FROM applied_events").await;
    assert!(transactions < 100, "2643 events applied in batches, not one by one ({transactions} transactions)");
    let channel = order.channel().await;
    assert_eq!(metric(channel.clone(), "events_applied_total").await, 2643);
    assert_eq!(metric(channel, "events_stale_total").await, 0);
    order.stop().await;
    user.stop().await;
    Ok(())
}

#[tokio::test]
async fn values_postgres_refuses_are_permanent_errors_naming_their_sqlstate() -> TestResult {
    let db = fresh_database(orders_port());
    msys::db::ensure_database(&db).await?;
    let pool = msys::db::pool(&db)?;
    msys::migrate::run(&pool, msys::migrate::ORDERS).await?;
    let event = |id: i64, name: &str| {
        let pb_event = user_event(EventType::Created, id, 1, name);
        let decoded = msys::events::Decoded {
            kind: EventType::Created,
            id: pb_event.event_id.parse().expect("uuid"),
            user: pb_event.user.clone().expect("user"),
            event: pb_event,
        };
        Event { decoded, offset: 0, span: None }
    };
    for (poison, sqlstate) in [(event(1, "nul\0name"), "22021"), (event(0, "zero"), "23514")] {
        let error = apply::apply_batch(&pool, "t", 0, &[event(5, "ok"), poison]).await.expect_err("refused");
        assert_eq!(apply::classify(&error), ErrorClass::Permanent);
        let described = apply::describe(&error);
        assert!(described.starts_with(&format!("SQLSTATE {sqlstate}")), "{described}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM applied_events").await, 0, "a refused batch leaves nothing behind");
    Ok(())
}

#[tokio::test]
async fn poison_on_every_partition_is_dead_lettered_alone_and_consumption_goes_on() -> TestResult {
    let mut flow = Flow::start().await;
    // A limit the decoder does not know: only PostgreSQL refuses these.
    sql(&flow.orders_db)
        .await
        .execute("ALTER TABLE known_users ADD CONSTRAINT no_mallory CHECK (name <> 'Mallory')", &[])
        .await?;
    let producer = msys::kafka::producer(&flow.kafka, "msys-test", Duration::from_secs(10))?;
    let mut good = Vec::new();
    for partition in 0..3 {
        let base = 1_000_000 + i64::from(partition) * 100;
        let records = [
            (user_event(EventType::Created, base + 1, 1, "before"), true),
            (user_event(EventType::Created, base + 2, 1, "nul\0in the name"), false),
            (user_event(EventType::Created, -(base + 3), 1, "negative id"), false),
            (user_event(EventType::Created, base + 4, 1, "Mallory"), false),
            (user_event(EventType::Created, base + 5, 1, "after"), true),
            (user_event(EventType::Updated, base + 1, 2, "before, renamed"), true),
        ];
        for (event, ok) in &records {
            send_to(&producer, &flow.kafka, partition, event).await;
            if *ok {
                good.push(event.user.clone().expect("user").id);
            }
        }
    }
    eventually(Duration::from_secs(30), "all nine poison records are dead-lettered", || {
        let channel = flow.order.channel();
        async move { (metric(channel.await, "events_dead_lettered_total").await == 9).then_some(()) }
    })
    .await;
    let known: HashSet<i64> = user_rows(&flow.orders_db, KNOWN_USERS).await.into_iter().map(|r| r.0).collect();
    for id in good.iter().copied().collect::<HashSet<_>>() {
        assert!(known.contains(&id), "user {id}, a neighbour of poison, is applied");
    }
    let renamed = count(&flow.orders_db, "SELECT count(*) FROM known_users WHERE name = 'before, renamed'").await;
    assert_eq!(renamed, 3);

    let dlq = kafka_args(&shared_broker(), &format!("{}.dlq", flow.kafka.user_events_topic));
    let dead = read_all(&dlq).await;
    assert_eq!(dead.len(), 9);
    let errors: Vec<String> = dead.iter().map(|r| header(r, "dlq_error").expect("dlq_error")).collect();
    assert_eq!(errors.iter().filter(|e| e.contains("NUL")).count(), 3, "{errors:?}");
    assert_eq!(errors.iter().filter(|e| e.contains("user id")).count(), 3, "{errors:?}");
    let refused: Vec<&String> = errors.iter().filter(|e| e.starts_with("SQLSTATE 23514")).collect();
    assert_eq!(refused.len(), 3, "{errors:?}");
    assert!(refused.iter().all(|e| e.contains("no_mallory")), "{refused:?}");
    let partitions: HashSet<i32> =
        dead.iter().map(|r| header(r, "dlq_partition").expect("p").parse().expect("p")).collect();
    assert_eq!(partitions, HashSet::from([0, 1, 2]));

    // The consumer never stopped: a user created now is orderable.
    let ada = flow.create_user("Ada", "ada@example.org").await;
    let placed =
        flow.orders.create_order(pb::CreateOrderRequest { user_id: ada.id, product: "pen".into(), quantity: 1 });
    assert!(placed.await.is_ok(), "a fresh user is orderable after the poison");
    assert_eq!(metric(flow.order.channel().await, "events_dead_lettered_total").await, 9);
    assert!(dead.iter().all(|r| r.payload().is_some()), "the original value is kept");
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_orders_database_outage_is_retried_and_loses_nothing() -> TestResult {
    crate::support::init_logging();
    let postgres = DedicatedPostgres::start();
    let orders_db = postgres.database();
    let users_db = fresh_database(users_port());
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    crate::support::create_topic(&kafka).await;
    let user = start_user(user_args(&users_db, &kafka)).await;
    let order = start_order(order_args(&orders_db, &kafka, &unique("order-service"))).await;
    wait_for_assignment(&order, 3).await;
    let users = pb::user_service_client::UserServiceClient::new(user.channel().await);
    let writer = tokio::spawn(async move {
        let mut users = users;
        for i in 0..400 {
            let request = pb::CreateUserRequest { name: format!("u{i}"), email: format!("u{i}@example.org") };
            users.create_user(request).await.expect("creates go on: the users database is fine");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    postgres.halt();
    tokio::time::sleep(Duration::from_secs(4)).await;
    postgres.resume();
    writer.await?;
    wait_until_replica_matches(&users_db, &orders_db).await;
    assert_eq!(count(&orders_db, "SELECT count(*) FROM applied_events").await, 400, "nothing lost, nothing twice");
    let channel = order.channel().await;
    assert!(metric(channel.clone(), "events_apply_retries_total").await > 0, "the outage was retried");
    assert_eq!(metric(channel, "events_dead_lettered_total").await, 0, "nothing went to the DLQ");
    order.stop().await;
    user.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_partition_retried_past_the_bound_makes_the_order_service_not_serving_until_it_applies() -> TestResult {
    let UsersSide { users_db, orders_db, kafka, user } = UsersSide::start().await;
    let mut args = order_args(&orders_db, &kafka, &unique("order-service"));
    args.replica.consumer.stall_after = Duration::from_secs(1);
    let order = start_order(args).await;
    wait_for_assignment(&order, 3).await;
    let addr = order.addr.to_string();
    let health = |service: &'static str, expected: &'static str| {
        let addr = addr.clone();
        move || {
            let addr = addr.clone();
            async move {
                let status = msys::grpc::check_health(&addr, service, Duration::from_secs(2)).await.ok()?;
                (status == expected).then_some(())
            }
        }
    };
    const ORDERS: &str = "msys.v1.OrderService";
    eventually(Duration::from_secs(10), "the OrderService is SERVING", health(ORDERS, "SERVING")).await;

    // A fault only the replica meets (SQLSTATE 42P01, not about the data):
    // retried, never dead-lettered.
    let orders = sql(&orders_db).await;
    orders.execute("ALTER TABLE applied_events RENAME TO applied_events_away", &[]).await?;
    let mut users = pb::user_service_client::UserServiceClient::new(user.channel().await);
    users.create_user(pb::CreateUserRequest { name: "Stuck".into(), email: "stuck@example.org".into() }).await?;
    eventually(Duration::from_secs(15), "the OrderService is NOT_SERVING", health(ORDERS, "NOT_SERVING")).await;
    let status = msys::grpc::check_health(&addr, "", Duration::from_secs(2)).await?;
    assert_eq!(status, "SERVING", "the server itself stays live: its database answers");
    assert!(metric(order.channel().await, "events_apply_retries_total").await > 0);

    orders.execute("ALTER TABLE applied_events_away RENAME TO applied_events", &[]).await?;
    wait_until_replica_matches(&users_db, &orders_db).await;
    eventually(Duration::from_secs(10), "the OrderService is SERVING again", health(ORDERS, "SERVING")).await;
    assert_eq!(metric(order.channel().await, "events_dead_lettered_total").await, 0);
    order.stop().await;
    user.stop().await;
    Ok(())
}
