//! The scenarios that span roles or drive infrastructure: orders through the
//! event path, the weighted mix, the db-pool stages and the throwaway
//! consumer group.

use std::time::Duration;

use msys::load::{
    self, LoadConfig, LoadLimits,
    plan::Shape,
    pool::PoolRole,
    scenario::{ScenarioKind, Targets},
};
use tokio_util::sync::CancellationToken;

use crate::support::{
    Flow, TestResult, UserSystem, create_topic, fresh_database, order_args, orders_port, start_order, unique,
    wait_for_outbox_drain,
};

fn targets(flow: &Flow) -> Targets {
    Targets { user_addr: format!("http://{}", flow.user.addr), order_addr: format!("http://{}", flow.order.addr) }
}

#[tokio::test]
async fn orders_and_the_mix_run_through_the_event_path_without_errors() -> TestResult {
    let _turn = crate::load::ONE_AT_A_TIME.lock().await;
    let flow = Flow::start().await;
    let mut config = LoadConfig::new(ScenarioKind::Orders, targets(&flow));
    config.shape = Some(Shape::Constant { rate: 10.0 });
    config.duration = Duration::from_secs(2);
    let limits = LoadLimits::default();
    let orders = load::execute(&config, &limits, &flow.kafka, None, CancellationToken::new()).await?;
    assert_eq!(orders.requests, 20);
    assert_eq!(orders.ok, 20, "every virtual user could order: {:?}", orders.errors);

    config.scenario = ScenarioKind::Mixed;
    config.mix = "users=1,reads=2,orders=1".parse()?;
    config.shape = Some(Shape::Constant { rate: 40.0 });
    let mixed = load::execute(&config, &limits, &flow.kafka, None, CancellationToken::new()).await?;
    assert_eq!(mixed.requests, 80);
    assert_eq!(mixed.ok, 80, "{:?}", mixed.errors);
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn db_pool_reports_waiters_once_concurrency_exceeds_the_pool() -> TestResult {
    let _turn = crate::load::ONE_AT_A_TIME.lock().await;
    let system = UserSystem::start().await;
    let mut db = fresh_database(orders_port());
    db.pool_size = 2;
    let order = start_order(order_args(&db, &system.kafka, &unique("order-service"))).await;
    let mut config = LoadConfig::new(
        ScenarioKind::DbPool,
        Targets { user_addr: format!("http://{}", system.role.addr), order_addr: format!("http://{}", order.addr) },
    );
    config.pool_role = PoolRole::Order;
    config.pool_size = Some(2);
    config.duration = Duration::from_secs(4);
    let report = load::execute(&config, &LoadLimits::default(), &system.kafka, None, CancellationToken::new()).await?;
    let pool = report.db_pool.as_ref().expect("a pool report");
    let concurrency: Vec<usize> = pool.stages.iter().map(|s| s.concurrency).collect();
    assert_eq!(concurrency, vec![1, 2, 4, 8]);
    let beyond = &pool.stages[3];
    assert!(beyond.waiters_max.is_some_and(|w| w > 0), "8 callers on 2 connections wait: {pool:?}");
    assert!(pool.stages.iter().all(|s| s.requests > 0));
    assert_eq!(report.requests, pool.stages.iter().map(|s| s.requests).sum::<u64>());
    order.stop().await;
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn consumer_group_joins_drains_and_removes_its_group() -> TestResult {
    let _turn = crate::load::ONE_AT_A_TIME.lock().await;
    let mut system = UserSystem::start().await;
    create_topic(&system.kafka).await;
    for i in 0..30 {
        system.create(&format!("user {i}"), &format!("group-{i}@example.org")).await;
    }
    wait_for_outbox_drain(&system.db).await;
    let mut config = LoadConfig::new(
        ScenarioKind::ConsumerGroup,
        Targets { user_addr: format!("http://{}", system.role.addr), order_addr: String::new() },
    );
    config.consumers = 2;
    config.duration = Duration::from_secs(60);
    let report = load::execute(&config, &LoadLimits::default(), &system.kafka, None, CancellationToken::new()).await?;
    let group = report.consumer_group.as_ref().expect("a group report");
    assert_eq!(group.members, 2);
    assert_eq!(group.lag_at_start, 30);
    assert!(group.join_ms.is_some(), "{group:?}");
    assert!(group.drained, "{group:?}");
    assert!(group.records >= 30, "{group:?}");
    assert!(group.deleted, "the throwaway group is gone: {group:?}");
    assert!(!group_exists(&system.kafka, &group.group).await, "the broker no longer lists {}", group.group);
    system.role.stop().await;
    Ok(())
}

async fn group_exists(kafka: &msys::config::KafkaArgs, group: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = msys::kafka::client_config(kafka, "msys-test").create().expect("client");
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || {
        let list = consumer.fetch_group_list(Some(&group), Duration::from_secs(10)).expect("group list");
        list.groups().iter().any(|g| g.name() == group && g.state() != "Dead")
    })
    .await
    .expect("group list task")
}
