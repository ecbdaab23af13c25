//! SIGTERM: stop taking RPCs, finish the ones in flight, commit offsets,
//! leave the group — and exit 0.

use std::time::Duration;

use msys::pb::{self, order_service_client::OrderServiceClient};
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};

use crate::support::{
    TestResult, create_topic, eventually, free_port, fresh_database, kafka_args, metric, shared_broker, spawn_role,
    unique, users_port, wait_until_replica_matches,
};

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("the process is running").to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_orders_then_commits_offsets_and_exits_cleanly() -> TestResult {
    let crate::support::UsersSide { users_db, orders_db, kafka, user } = crate::support::UsersSide::start().await;
    let mut users = pb::user_service_client::UserServiceClient::new(user.channel().await);
    let group = unique("order-service");
    let port = free_port();
    let extra = [("ORDER_CONSUMER_GROUP", group.as_str()), ("ORDER_USER_WAIT", "10s")];
    let mut process = spawn_role("order", port, &orders_db, &kafka, &extra);
    let channel = eventually(Duration::from_secs(30), "msys order listens", || async move {
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).ok()?.connect().await.ok()
    })
    .await;
    eventually(Duration::from_secs(30), "the consumer holds the partitions", || {
        let channel = channel.clone();
        async move { (metric(channel, "partitions_assigned").await == 3).then_some(()) }
    })
    .await;
    for i in 0..5 {
        users.create_user(pb::CreateUserRequest { name: format!("u{i}"), email: format!("u{i}@example.org") }).await?;
    }
    wait_until_replica_matches(&users_db, &orders_db).await;

    // An order for a user who does not exist yet: the call waits for them.
    let mut orders = OrderServiceClient::new(channel.clone());
    let next_id = 6;
    let in_flight = tokio::spawn(async move {
        orders.create_order(pb::CreateOrderRequest { user_id: next_id, product: "pen".into(), quantity: 1 }).await
    });
    eventually(Duration::from_secs(10), "the order call is in flight", || {
        let channel = channel.clone();
        async move { (metric(channel, msys::metrics::RPCS_IN_FLIGHT).await >= 2).then_some(()) }
    })
    .await;

    sigterm(&process);
    // The user appears after SIGTERM: the draining role still applies events.
    let created =
        users.create_user(pb::CreateUserRequest { name: "late".into(), email: "late@example.org".into() }).await?;
    assert_eq!(created.into_inner().id, next_id);
    let placed = in_flight.await?;
    assert!(placed.is_ok(), "the in-flight call finished normally: {placed:?}");
    let status = tokio::time::timeout(Duration::from_secs(20), process.wait()).await??;
    assert!(status.success(), "msys order exits 0 after SIGTERM: {status:?}");

    // Offsets were committed up to the end of every partition.
    let marks = msys::kafka::watermarks(&kafka, &kafka.user_events_topic, Duration::from_secs(10)).await?;
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", kafka.bootstrap_servers()).set("group.id", &group).create()?;
    let mut partitions = TopicPartitionList::new();
    for (partition, _, _) in &marks {
        partitions.add_partition(&kafka.user_events_topic, *partition);
    }
    let committed =
        tokio::task::spawn_blocking(move || consumer.committed_offsets(partitions, Duration::from_secs(10))).await??;
    for (partition, _, high) in marks {
        let offset = committed.find_partition(&kafka.user_events_topic, partition).map(|p| p.offset());
        assert_eq!(offset, Some(Offset::Offset(high)), "partition {partition} committed to its end");
    }
    user.stop().await;
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_the_user_role_cleanly() -> TestResult {
    let db = fresh_database(users_port());
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let port = free_port();
    let mut process = spawn_role("user", port, &db, &kafka, &[]);
    let mut users = eventually(Duration::from_secs(30), "msys user listens", || async move {
        pb::user_service_client::UserServiceClient::connect(format!("http://127.0.0.1:{port}")).await.ok()
    })
    .await;
    users.create_user(pb::CreateUserRequest { name: "Ada".into(), email: "ada@example.org".into() }).await?;
    crate::support::wait_for_outbox_drain(&db).await;
    sigterm(&process);
    let status = tokio::time::timeout(Duration::from_secs(20), process.wait()).await??;
    assert!(status.success(), "msys user exits 0 after SIGTERM: {status:?}");
    Ok(())
}
