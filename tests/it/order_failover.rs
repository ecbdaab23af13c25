//! Scale-out and failover of the order role: three `msys order` processes
//! in one group, one of them SIGKILLed.

use std::time::{Duration, Instant};

use msys::pb::{self, order_service_client::OrderServiceClient};
use tonic::transport::Channel;

use crate::support::{
    TestResult, UsersSide, eventually, free_port, metric, spawn_role, sql, unique, wait_until_replica_matches,
};

/// How long the partitions of a killed member may take to flow again.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

async fn channel_to(port: u16) -> Channel {
    eventually(Duration::from_secs(60), "the order process accepts connections", || async move {
        Channel::from_shared(format!("http://127.0.0.1:{port}")).ok()?.connect().await.ok()
    })
    .await
}

#[tokio::test]
async fn three_order_processes_share_the_partitions_and_a_sigkill_fails_over_within_ten_seconds() -> TestResult {
    let UsersSide { users_db, orders_db, kafka, user } = UsersSide::start().await;
    let mut users = pb::user_service_client::UserServiceClient::new(user.channel().await);
    let group = unique("order-service");
    let ports = [free_port(), free_port(), free_port()];
    let mut processes: Vec<_> = ports
        .iter()
        .map(|port| spawn_role("order", *port, &orders_db, &kafka, &[("ORDER_CONSUMER_GROUP", group.as_str())]))
        .collect();
    let mut channels = Vec::new();
    for port in ports {
        channels.push(channel_to(port).await);
    }
    eventually(Duration::from_secs(60), "each of the three processes holds one partition", || {
        let channels = channels.clone();
        async move {
            for channel in channels {
                if metric(channel, "partitions_assigned").await != 1 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let create = |i: usize| pb::CreateUserRequest { name: format!("u{i}"), email: format!("u{i}@example.org") };
    for i in 0..30 {
        users.create_user(create(i)).await?;
    }
    wait_until_replica_matches(&users_db, &orders_db).await;
    let mut applied_by = Vec::new();
    for channel in &channels {
        applied_by.push(metric(channel.clone(), "events_applied_total").await);
    }
    assert!(applied_by.iter().all(|n| *n > 0), "every process applied events: {applied_by:?}");
    assert_eq!(applied_by.iter().sum::<i64>(), 30, "each event applied once in total");

    let mut victim = processes.remove(0);
    victim.start_kill()?;
    victim.wait().await?;
    let mut orders = OrderServiceClient::new(channels[1].clone());
    // Users created after the kill land on every partition, the victim's too.
    let mut fresh = Vec::new();
    for i in 100..130 {
        fresh.push((users.create_user(create(i)).await?.into_inner().id, Instant::now()));
    }
    let mut slowest = Duration::ZERO;
    for (id, created) in fresh {
        loop {
            let placed =
                orders.create_order(pb::CreateOrderRequest { user_id: id, product: "pen".into(), quantity: 1 }).await;
            if placed.is_ok() {
                slowest = slowest.max(created.elapsed());
                break;
            }
            assert!(created.elapsed() < FAILOVER_BOUND, "user {id} not orderable {FAILOVER_BOUND:?} after creation");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("slowest user created after the kill became orderable after {slowest:?}");
    assert!(slowest < FAILOVER_BOUND, "a user became orderable only after {slowest:?}");
    wait_until_replica_matches(&users_db, &orders_db).await;
    let applied: i64 = sql(&orders_db).await.query_one("SELECT count(*) FROM applied_events", &[]).await?.get(0);
    assert_eq!(applied, 60, "every event applied exactly once");
    let mut survivors = 0;
    for channel in &channels[1..] {
        survivors += metric(channel.clone(), "partitions_assigned").await;
    }
    assert_eq!(survivors, 3, "the survivors hold all three partitions");
    for mut process in processes {
        process.start_kill()?;
        process.wait().await?;
    }
    user.stop().await;
    Ok(())
}
