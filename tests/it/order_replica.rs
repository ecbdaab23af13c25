//! The order service's replica of users under replay, stale and poison
//! records, several consumers, and SIGKILL.

use std::{collections::HashSet, time::Duration};

use msys::{config::KafkaArgs, events, pb};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};

use crate::support::{
    Flow, KNOWN_USERS, TestResult, USERS_TABLE, eventually, header, kafka_args, metric, read_all, shared_broker,
    spawn_role, sql, start_order, unique, user_rows, wait_until_replica_matches,
};

/// Everything the replica produced, to compare before and after.
async fn order_side_state(flow: &Flow) -> (Vec<(i64, String, String, i64)>, Vec<String>, Vec<String>) {
    let known = user_rows(&flow.orders_db, KNOWN_USERS).await;
    let client = sql(&flow.orders_db).await;
    let rows = |query: &'static str| {
        let client = &client;
        async move {
            let rows = client.query(query, &[]).await.expect("query");
            rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<String>>()
        }
    };
    let orders = rows("SELECT format('%s %s %s %s %s %s', id, user_id, status, cancel_reason, updated_at, quantity) FROM orders ORDER BY id").await;
    let deleted = rows("SELECT format('%s %s', user_id, version) FROM deleted_users ORDER BY user_id").await;
    (known, orders, deleted)
}

/// What `kafka-consumer-groups --reset-offsets --to-earliest` does: commit
/// each partition's low watermark for the (idle) group.
async fn reset_group_to_earliest(kafka: &KafkaArgs, group: &str) {
    let topic = kafka.user_events_topic.clone();
    let marks = msys::kafka::watermarks(kafka, &topic, Duration::from_secs(10)).await.expect("watermarks");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut offsets = TopicPartitionList::new();
    for (partition, low, _) in marks {
        offsets.add_partition_offset(&topic, partition, Offset::Offset(low)).expect("partition");
    }
    tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
        .await
        .expect("join")
        .expect("commit the reset offsets");
}

fn producer(kafka: &KafkaArgs) -> FutureProducer {
    msys::kafka::producer(kafka, "msys-test", Duration::from_secs(10)).expect("producer")
}

#[tokio::test]
async fn replaying_every_event_changes_nothing() -> TestResult {
    let mut flow = Flow::start().await;
    let ada = flow.create_user("Ada", "ada@example.org").await;
    let bob = flow.create_user("Bob", "bob@example.org").await;
    flow.users.update_user(pb::UpdateUserRequest { id: ada.id, name: Some("Ada K".into()), email: None }).await?;
    let chair = pb::CreateOrderRequest { user_id: bob.id, product: "chair".into(), quantity: 2 };
    flow.orders.create_order(chair).await?;
    flow.orders.create_order(pb::CreateOrderRequest { user_id: ada.id, product: "pen".into(), quantity: 1 }).await?;
    flow.users.delete_user(pb::DeleteUserRequest { id: bob.id }).await?;
    wait_until_replica_matches(&flow.users_db, &flow.orders_db).await;
    crate::support::wait_for_outbox_drain(&flow.users_db).await;
    let events = read_all(&flow.kafka).await.len() as i64;
    let applied = eventually(Duration::from_secs(20), "every event is applied", || {
        let channel = flow.order.channel();
        async move {
            let applied = metric(channel.await, "events_applied_total").await;
            (applied == events).then_some(applied)
        }
    })
    .await;
    let before = order_side_state(&flow).await;
    assert_eq!(before.1.len(), 2);

    // Stop the consumer, rewind its group to the start, start it again.
    flow.order.halt().await;
    reset_group_to_earliest(&flow.kafka, &flow.group).await;
    flow.order = start_order(crate::support::order_args(&flow.orders_db, &flow.kafka, &flow.group)).await;
    crate::support::wait_for_assignment(&flow.order, 3).await;
    eventually(Duration::from_secs(30), "every event is read again", || {
        let channel = flow.order.channel();
        async move { (metric(channel.await, "events_duplicate_total").await == applied).then_some(()) }
    })
    .await;
    assert_eq!(metric(flow.order.channel().await, "events_applied_total").await, 0, "no event applied twice");
    assert_eq!(order_side_state(&flow).await, before, "known_users, orders and deletions unchanged");
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn older_snapshots_never_overwrite_newer_ones() -> TestResult {
    let mut flow = Flow::start().await;
    let ada = flow.create_user("Ada", "ada@example.org").await;
    let bob = flow.create_user("Bob", "bob@example.org").await;
    let renamed = flow
        .users
        .update_user(pb::UpdateUserRequest { id: ada.id, name: Some("Ada K".into()), email: None })
        .await?
        .into_inner();
    flow.users.delete_user(pb::DeleteUserRequest { id: bob.id }).await?;
    wait_until_replica_matches(&flow.users_db, &flow.orders_db).await;

    // A late copy of Ada's first snapshot under a new event id, and a
    // "created" for Bob after his deletion, both keyed as the relay keys.
    let stale = |user: &pb::User, kind: events::EventType| pb::UserEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: kind.as_str().to_owned(),
        user: Some(user.clone()),
        occurred_at: user.updated_at,
    };
    let producer = producer(&flow.kafka);
    for event in [stale(&ada, events::EventType::Updated), stale(&bob, events::EventType::Created)] {
        let record = events::encode(&event);
        let future = FutureRecord::to(&flow.kafka.user_events_topic)
            .key(&record.key)
            .payload(&record.payload)
            .headers(record.headers);
        producer.send(future, Duration::from_secs(5)).await.map_err(|(e, _)| e)?;
    }
    eventually(Duration::from_secs(20), "both stale events are consumed", || {
        let channel = flow.order.channel();
        async move { (metric(channel.await, "events_stale_total").await == 2).then_some(()) }
    })
    .await;
    let known = user_rows(&flow.orders_db, KNOWN_USERS).await;
    assert_eq!(known, vec![(ada.id, renamed.name.clone(), renamed.email.clone(), renamed.version)]);
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn poison_records_are_dead_lettered_and_consumption_goes_on() -> TestResult {
    let mut flow = Flow::start().await;
    let producer = producer(&flow.kafka);
    let topic = flow.kafka.user_events_topic.clone();
    // On every partition, ahead of the good events to come: a value that is
    // not protobuf, an unknown ce_type, and a record with no headers at all.
    for partition in 0..3 {
        let headers = |ce_type: &str| {
            OwnedHeaders::new()
                .insert(Header { key: "ce_type", value: Some(ce_type) })
                .insert(Header { key: "ce_id", value: Some("not-a-uuid") })
        };
        let records = [
            FutureRecord::<str, [u8]>::to(&topic)
                .partition(partition)
                .key("1")
                .payload(b"\xff\xfe garbage".as_slice())
                .headers(headers("msys.user.created.v1")),
            FutureRecord::to(&topic)
                .partition(partition)
                .key("1")
                .payload(b"".as_slice())
                .headers(headers("msys.user.renamed.v9")),
            FutureRecord::to(&topic).partition(partition).key("1").payload(b"no headers".as_slice()),
        ];
        for record in records {
            producer.send(record, Duration::from_secs(5)).await.map_err(|(e, _)| e)?;
        }
    }
    let ada = flow.create_user("Ada", "ada@example.org").await;
    let placed =
        flow.orders.create_order(pb::CreateOrderRequest { user_id: ada.id, product: "pen".into(), quantity: 1 }).await;
    assert!(placed.is_ok(), "good events after poison ones are applied: {placed:?}");
    eventually(Duration::from_secs(20), "all nine poison records are dead-lettered", || {
        let channel = flow.order.channel();
        async move { (metric(channel.await, "events_dead_lettered_total").await == 9).then_some(()) }
    })
    .await;

    let dlq = kafka_args(&shared_broker(), &format!("{topic}.dlq"));
    let dead = read_all(&dlq).await;
    assert_eq!(dead.len(), 9);
    for record in &dead {
        assert_eq!(header(record, "dlq_topic").as_deref(), Some(topic.as_str()));
        assert!(header(record, "dlq_error").is_some_and(|e| !e.is_empty()));
        assert!(header(record, "dlq_offset").is_some() && header(record, "dlq_partition").is_some());
        assert_eq!(record.key(), Some(b"1".as_slice()), "the original key is kept");
    }
    let kept_types: HashSet<Option<String>> = dead.iter().map(|r| header(r, "ce_type")).collect();
    let expected: HashSet<Option<String>> =
        [Some("msys.user.created.v1".to_owned()), Some("msys.user.renamed.v9".to_owned()), None].into();
    assert_eq!(kept_types, expected, "the original headers are kept");
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn two_order_processes_share_the_partitions_and_apply_each_event_once() -> TestResult {
    let mut flow = Flow::start().await;
    let second = start_order(crate::support::order_args(&flow.orders_db, &flow.kafka, &flow.group)).await;
    eventually(Duration::from_secs(60), "both members hold partitions", || {
        let (a, b) = (flow.order.channel(), second.channel());
        async move {
            let (a, b) = (metric(a.await, "partitions_assigned").await, metric(b.await, "partitions_assigned").await);
            (a > 0 && b > 0 && a + b == 3).then_some(())
        }
    })
    .await;

    let mut writers = Vec::new();
    for w in 0..6 {
        let mut users = flow.users.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..50 {
                let request = pb::CreateUserRequest { name: format!("w{w}"), email: format!("w{w}-{i}@example.org") };
                users.create_user(request).await.expect("create");
            }
        }));
    }
    for writer in writers {
        writer.await?;
    }
    let _ = flow.create_user("last", "last@example.org").await;
    wait_until_replica_matches(&flow.users_db, &flow.orders_db).await;
    let applied_by = [
        metric(flow.order.channel().await, "events_applied_total").await,
        metric(second.channel().await, "events_applied_total").await,
    ];
    assert!(applied_by.iter().all(|n| *n > 0), "both processes applied events: {applied_by:?}");
    assert_eq!(applied_by.iter().sum::<i64>(), 301, "each event applied once in total");
    let rows: i64 = sql(&flow.orders_db).await.query_one("SELECT count(*) FROM applied_events", &[]).await?.get(0);
    assert_eq!(rows, 301);
    second.stop().await;
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn killing_the_order_role_mid_burst_leaves_the_replica_exact() -> TestResult {
    let crate::support::UsersSide { users_db, orders_db, kafka, user } = crate::support::UsersSide::start().await;
    let users = pb::user_service_client::UserServiceClient::new(user.channel().await);

    // A burst of 3000 events waits on the topic before the consumer starts.
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut users = users.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..190 {
                let request = pb::CreateUserRequest { name: format!("w{w}"), email: format!("w{w}-{i}@example.org") };
                users.create_user(request).await.expect("create");
            }
        }));
    }
    for writer in writers {
        writer.await?;
    }
    let mut users = users;
    for i in 0..40 {
        let id = (i % 50) + 1;
        users.update_user(pb::UpdateUserRequest { id, name: Some(format!("renamed {i}")), email: None }).await?;
    }
    crate::support::wait_for_outbox_drain(&users_db).await;

    let group = unique("order-service");
    let mut process = spawn_role("order", 0, &orders_db, &kafka, &[("ORDER_CONSUMER_GROUP", group.as_str())]);
    let orders = sql_when_ready(&orders_db).await;
    eventually(Duration::from_secs(60), "the consumer is part-way through the burst", || async {
        let row = orders.query_one("SELECT count(*) FROM applied_events", &[]).await.ok()?;
        (row.get::<_, i64>(0) >= 300).then_some(())
    })
    .await;
    process.start_kill()?;
    process.wait().await?;
    let at_kill: i64 = orders.query_one("SELECT count(*) FROM applied_events", &[]).await?.get(0);
    assert!(at_kill < 3080, "SIGKILL landed before the burst was consumed ({at_kill} applied)");

    let mut process = spawn_role("order", 0, &orders_db, &kafka, &[("ORDER_CONSUMER_GROUP", group.as_str())]);
    wait_until_replica_matches(&users_db, &orders_db).await;
    assert_eq!(user_rows(&users_db, USERS_TABLE).await.len(), 3040);
    let applied: i64 = orders.query_one("SELECT count(*) FROM applied_events", &[]).await?.get(0);
    assert_eq!(applied, 3080, "every event applied exactly once");
    process.start_kill()?;
    user.stop().await;
    Ok(())
}

/// The orders database once the order role has created and migrated it.
async fn sql_when_ready(db: &msys::config::PostgresSettings) -> tokio_postgres::Client {
    eventually(Duration::from_secs(30), "the orders database is migrated", || async {
        let client = crate::support::try_sql(db).await.ok()?;
        client.query_one("SELECT count(*) FROM applied_events", &[]).await.ok()?;
        Some(client)
    })
    .await
}

#[tokio::test]
async fn the_replica_catches_up_after_the_broker_comes_back() -> TestResult {
    use crate::support::{
        DedicatedBroker, create_topic, fresh_database, orders_port, start_user, user_args, users_port,
    };
    crate::support::init_logging();
    let mut broker = DedicatedBroker::start().await;
    let kafka = kafka_args(&broker.addr, "user-events");
    create_topic(&kafka).await;
    let (users_db, orders_db) = (fresh_database(users_port()), fresh_database(orders_port()));
    let user = start_user(user_args(&users_db, &kafka)).await;
    let order = start_order(crate::support::order_args(&orders_db, &kafka, "order-service")).await;
    crate::support::wait_for_assignment(&order, 3).await;
    let mut users = pb::user_service_client::UserServiceClient::new(user.channel().await);
    let create = |i: usize| pb::CreateUserRequest { name: format!("u{i}"), email: format!("u{i}@example.org") };
    for i in 0..10 {
        users.create_user(create(i)).await?;
    }
    wait_until_replica_matches(&users_db, &orders_db).await;

    broker.kill();
    for i in 10..30 {
        users.create_user(create(i)).await.expect("creates succeed while the broker is down");
    }
    broker.resume().await;
    wait_until_replica_matches(&users_db, &orders_db).await;
    let applied: i64 = sql(&orders_db).await.query_one("SELECT count(*) FROM applied_events", &[]).await?.get(0);
    assert_eq!(applied, 30, "every event applied once across the outage");
    order.stop().await;
    user.stop().await;
    Ok(())
}
