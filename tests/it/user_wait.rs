//! Issue 17 point 4: a CreateOrder waiting for its user's event is woken by
//! the apply of that user's event, at once, and by no other apply; the sweep
//! only finds users that another order process applied.

use std::time::Duration;

use msys::{
    events::{self, EventType},
    order::{arrivals::SWEEPS, service::WAITERS_GAUGE, service::WAKEUPS},
    pb::{self, order_service_client::OrderServiceClient},
};
use rdkafka::producer::FutureRecord;
use tonic::transport::Channel;

use crate::support::{
    RunningRole, TestResult, create_topic, eventually, fresh_database, init_logging, kafka_args, metric, order_args,
    orders_port, shared_broker, sql, start_order, unique, wait_for_assignment,
};

/// An order role whose calls never give up waiting on their own (the test
/// decides when a call must have been answered), sweeping every `sweep`.
async fn order_role(sweep: Duration) -> (RunningRole, msys::config::KafkaArgs, msys::config::PostgresSettings) {
    init_logging();
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let db = fresh_database(orders_port());
    let mut args = order_args(&db, &kafka, &unique("order-service"));
    args.replica.user_wait = Duration::from_secs(3600);
    args.replica.user_sweep_interval = sweep;
    (start_order(args).await, kafka, db)
}

fn order_for(user_id: i64) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest { user_id, product: "pen".into(), quantity: 1 }
}

/// "created" for user `id`, keyed and framed as the relay sends it.
async fn publish_created(kafka: &msys::config::KafkaArgs, id: i64) {
    let user = pb::User {
        id,
        name: format!("user {id}"),
        email: format!("u{id}@example.org"),
        version: 1,
        ..Default::default()
    };
    let event = pb::UserEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: EventType::Created.as_str().to_owned(),
        user: Some(user),
        occurred_at: Some(std::time::SystemTime::now().into()),
    };
    let record = events::encode(&event);
    let producer = msys::kafka::producer(kafka, "msys-test", Duration::from_secs(10)).expect("producer");
    let future =
        FutureRecord::to(&kafka.user_events_topic).key(&record.key).payload(&record.payload).headers(record.headers);
    producer.send(future, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("publish");
}

async fn wait_for_metric(channel: &Channel, name: &'static str, value: i64) {
    eventually(Duration::from_secs(60), &format!("{name} = {value}"), || {
        let channel = channel.clone();
        async move { (metric(channel, name).await == value).then_some(()) }
    })
    .await;
}

/// Spawns a CreateOrder for `user_id` and returns once it waits for its user.
async fn waiting_call(
    role: &RunningRole,
    user_id: i64,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::Order>, tonic::Status>> {
    let mut orders = OrderServiceClient::new(role.channel().await);
    let call = tokio::spawn(async move { orders.create_order(order_for(user_id)).await });
    wait_for_metric(&role.channel().await, WAITERS_GAUGE, 1).await;
    call
}

#[tokio::test]
async fn a_waiting_create_order_is_woken_by_its_users_apply_and_by_no_other() -> TestResult {
    const AWAITED: i64 = 7001;
    const OTHER: i64 = 7002;
    // No sweep within the test: only this process's replica can wake the call.
    let (role, kafka, _db) = order_role(Duration::from_secs(3600)).await;
    wait_for_assignment(&role, 3).await;
    let metrics = role.channel().await;
    let call = waiting_call(&role, AWAITED).await;

    publish_created(&kafka, OTHER).await;
    wait_for_metric(&metrics, "events_applied_total", 1).await;
    assert!(!call.is_finished(), "another user's apply answers nothing");

    publish_created(&kafka, AWAITED).await;
    let placed = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the call is answered as soon as its user is applied, not after ORDER_USER_WAIT")??
        .into_inner();
    assert_eq!(placed.user_id, AWAITED);
    assert_eq!(metric(metrics.clone(), WAKEUPS).await, 1, "woken once, by its own user's apply, not by the other's");
    assert_eq!(metric(metrics, SWEEPS).await, 0, "and no query looked for it meanwhile");
    role.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_user_applied_by_another_order_process_is_found_by_the_sweep() -> TestResult {
    const AWAITED: i64 = 7003;
    let (role, _kafka, db) = order_role(Duration::from_millis(100)).await;
    let metrics = role.channel().await;
    let call = waiting_call(&role, AWAITED).await;

    // What another member's apply leaves: the row, committed by another session.
    sql(&db)
        .await
        .execute(
            "INSERT INTO known_users (user_id, name, email, version) VALUES ($1, 'Cy', 'cy@example.org', 1)",
            &[&AWAITED],
        )
        .await?;
    let placed = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the sweep finds the user long before ORDER_USER_WAIT")??
        .into_inner();
    assert_eq!(placed.user_id, AWAITED);
    assert!(metric(metrics.clone(), SWEEPS).await >= 1, "a sweep found it");
    assert_eq!(metric(metrics, WAKEUPS).await, 1);
    role.stop().await;
    Ok(())
}
