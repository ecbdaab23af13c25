//! The OrderService contract and the flow across both services.

use std::time::Duration;

use msys::pb::{self, OrderStatus};
use tonic::Code;

use crate::support::{Flow, TestResult, eventually};

fn order(user_id: i64, product: &str, quantity: i32) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest { user_id, product: product.into(), quantity }
}

fn expect_status<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>, code: Code, mentions: &str) {
    let status = result.expect_err("the request must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(mentions), "{:?} should mention {mentions:?}", status.message());
}

#[tokio::test]
async fn an_order_for_a_just_created_user_succeeds_and_for_a_stranger_fails() -> TestResult {
    let mut flow = Flow::start().await;
    let ada = flow.create_user("Ada", "ada@example.org").await;
    // No waiting here: CreateOrder itself gives the event time to arrive.
    let placed = flow.orders.create_order(order(ada.id, "notebook", 0)).await?.into_inner();
    assert_eq!(placed.user_id, ada.id);
    assert_eq!(placed.quantity, 1, "quantity 0 means 1");
    assert_eq!(placed.status(), OrderStatus::Open);

    expect_status(
        flow.orders.create_order(order(987654, "notebook", 1)).await,
        Code::FailedPrecondition,
        "user 987654 does not exist",
    );
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn order_requests_are_validated_and_listed_newest_first() -> TestResult {
    let mut flow = Flow::start().await;
    let ada = flow.create_user("Ada", "ada@example.org").await;
    let o = &mut flow.orders;
    expect_status(o.create_order(order(ada.id, "", 1)).await, Code::InvalidArgument, "product");
    expect_status(o.create_order(order(ada.id, &"p".repeat(201), 1)).await, Code::InvalidArgument, "product");
    expect_status(o.create_order(order(ada.id, "pen", -1)).await, Code::InvalidArgument, "quantity");
    expect_status(o.create_order(order(ada.id, "pen", 10_001)).await, Code::InvalidArgument, "quantity");
    expect_status(o.create_order(order(0, "pen", 1)).await, Code::InvalidArgument, "user_id");
    expect_status(o.get_order(pb::GetOrderRequest { id: 0 }).await, Code::InvalidArgument, "id");
    expect_status(o.get_order(pb::GetOrderRequest { id: 777777 }).await, Code::NotFound, "order 777777 does not exist");
    let list = |user_id, page_size, token: &str| pb::ListOrdersRequest { user_id, page_size, page_token: token.into() };
    expect_status(o.list_orders(list(0, 10, "")).await, Code::InvalidArgument, "user_id");
    expect_status(o.list_orders(list(ada.id, 5000, "")).await, Code::InvalidArgument, "page_size");

    let mut placed = Vec::new();
    for (i, quantity) in [1, 10_000, 3, 4, 5].into_iter().enumerate() {
        placed.push(o.create_order(order(ada.id, &format!("item {i}"), quantity)).await?.into_inner());
    }
    let fetched = o.get_order(pb::GetOrderRequest { id: placed[1].id }).await?.into_inner();
    assert_eq!(fetched, placed[1]);
    assert_eq!(fetched.quantity, 10_000);

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = o.list_orders(list(ada.id, 2, &token)).await?.into_inner();
        seen.extend(page.orders.iter().map(|o| o.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let newest_first: Vec<i64> = placed.iter().rev().map(|o| o.id).collect();
    assert_eq!(seen, newest_first);
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn cancelling_is_idempotent_and_unknown_orders_are_not_found() -> TestResult {
    let mut flow = Flow::start().await;
    let ada = flow.create_user("Ada", "ada@example.org").await;
    let placed = flow.orders.create_order(order(ada.id, "lamp", 2)).await?.into_inner();
    let cancel = |id, reason: &str| pb::CancelOrderRequest { id, reason: reason.into() };
    let cancelled = flow.orders.cancel_order(cancel(placed.id, "changed my mind")).await?.into_inner();
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
    assert_eq!(cancelled.cancel_reason, "changed my mind");
    let again = flow.orders.cancel_order(cancel(placed.id, "another reason")).await?.into_inner();
    assert_eq!(again, cancelled, "cancelling a cancelled order returns it unchanged");
    expect_status(flow.orders.cancel_order(cancel(424242, "")).await, Code::NotFound, "order 424242 does not exist");
    expect_status(flow.orders.cancel_order(cancel(-3, "")).await, Code::InvalidArgument, "id");
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn deleting_a_user_cancels_open_orders_and_refuses_new_ones() -> TestResult {
    let mut flow = Flow::start().await;
    let ada = flow.create_user("Ada", "ada@example.org").await;
    let bob = flow.create_user("Bob", "bob@example.org").await;
    let open = flow.orders.create_order(order(ada.id, "chair", 1)).await?.into_inner();
    let kept = flow.orders.create_order(order(ada.id, "desk", 1)).await?.into_inner();
    let bobs = flow.orders.create_order(order(bob.id, "desk", 1)).await?.into_inner();
    flow.orders.cancel_order(pb::CancelOrderRequest { id: kept.id, reason: "too big".into() }).await?;

    flow.users.delete_user(pb::DeleteUserRequest { id: ada.id }).await?;
    let orders = flow.orders.clone();
    let cancelled = eventually(Duration::from_secs(20), "Ada's open order is cancelled", || {
        let mut orders = orders.clone();
        async move {
            let o = orders.get_order(pb::GetOrderRequest { id: open.id }).await.ok()?.into_inner();
            (o.status() == OrderStatus::Cancelled).then_some(o)
        }
    })
    .await;
    assert_eq!(cancelled.cancel_reason, format!("user {} was deleted", ada.id));
    let kept_now = flow.orders.get_order(pb::GetOrderRequest { id: kept.id }).await?.into_inner();
    assert_eq!(kept_now.cancel_reason, "too big", "an order cancelled before keeps its reason");
    let bobs_now = flow.orders.get_order(pb::GetOrderRequest { id: bobs.id }).await?.into_inner();
    assert_eq!(bobs_now.status(), OrderStatus::Open, "other users' orders are untouched");
    expect_status(flow.orders.create_order(order(ada.id, "chair", 1)).await, Code::FailedPrecondition, "was deleted");
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn msys_all_runs_both_roles_in_one_process() -> TestResult {
    use clap::Parser;
    use msys::pb::{order_service_client::OrderServiceClient, user_service_client::UserServiceClient};

    use crate::support::*;
    init_logging();
    let (users_db, orders_db) = (fresh_database(users_port()), fresh_database(orders_port()));
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let (user_port, order_port, monitor_port) = (free_port(), free_port(), free_port());
    let cli = msys::cli::Cli::try_parse_from([
        "msys".to_owned(),
        "all".into(),
        format!("--user-port={user_port}"),
        format!("--order-port={order_port}"),
        format!("--monitor-port={monitor_port}"),
        "--monitor-metrics-port=0".into(),
        "--listen-host=127.0.0.1".into(),
        format!("--user-postgres-port={}", users_db.port),
        format!("--user-postgres-db={}", users_db.dbname),
        format!("--order-postgres-port={}", orders_db.port),
        format!("--order-postgres-db={}", orders_db.dbname),
        format!("--kafka-host={}", kafka.kafka_host),
        format!("--kafka-port={}", kafka.kafka_port),
        format!("--user-events-topic={}", kafka.user_events_topic),
        format!("--consumer-group={}", unique("order-service")),
    ])?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let process = tokio::spawn(msys::cli::run(cli.command, shutdown.clone()));
    let mut users = eventually(Duration::from_secs(30), "the user role listens", || async move {
        UserServiceClient::connect(format!("http://127.0.0.1:{user_port}")).await.ok()
    })
    .await;
    let mut orders = eventually(Duration::from_secs(30), "the order role listens", || async move {
        OrderServiceClient::connect(format!("http://127.0.0.1:{order_port}")).await.ok()
    })
    .await;
    let mut metrics =
        pb::metrics_service_client::MetricsServiceClient::connect(format!("http://127.0.0.1:{order_port}")).await?;
    eventually(Duration::from_secs(30), "the order role's consumer holds the partitions", || {
        let mut metrics = metrics.clone();
        async move {
            let report = metrics.get_metrics(pb::GetMetricsRequest {}).await.ok()?.into_inner();
            (report.values.get("partitions_assigned") == Some(&3)).then_some(())
        }
    })
    .await;
    let report = metrics.get_metrics(pb::GetMetricsRequest {}).await?.into_inner();
    assert_eq!(report.role, "order");
    let ada = users.create_user(pb::CreateUserRequest { name: "Ada".into(), email: "ada@example.org".into() }).await?;
    orders.create_order(order(ada.into_inner().id, "book", 1)).await?;
    // The monitor runs in the same process and sees both roles up.
    let monitor =
        msys::pb::monitor_service_client::MonitorServiceClient::connect(format!("http://127.0.0.1:{monitor_port}"));
    let mut monitor = monitor.await?;
    eventually(Duration::from_secs(15), "the monitor sees both roles up", || {
        let mut monitor = monitor.clone();
        async move {
            let s = monitor.get_snapshot(pb::GetSnapshotRequest {}).await.ok()?.into_inner();
            let up = |name: &str| s.services.iter().any(|x| x.name == name && x.healthy);
            (up("user") && up("order") && up("monitor")).then_some(())
        }
    })
    .await;
    assert!(monitor.get_snapshot(pb::GetSnapshotRequest {}).await?.into_inner().kafka.is_some_and(|k| k.reachable));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), process).await???;
    Ok(())
}

#[tokio::test]
async fn the_order_service_is_ready_only_once_its_consumer_joined_the_group() -> TestResult {
    use crate::support::*;
    init_logging();
    let check = |addr: String, service: &'static str| async move {
        msys::grpc::check_health(&addr, service, Duration::from_secs(2)).await.ok()
    };

    // No broker at all: the server lives (its database answers), the service is not ready.
    let unreachable = kafka_args(&format!("127.0.0.1:{}", free_port()), "user-events");
    let lonely = start_order(order_args(&fresh_database(orders_port()), &unreachable, "order-service")).await;
    let addr = lonely.addr.to_string();
    eventually(Duration::from_secs(10), "the server is SERVING", || {
        let addr = addr.clone();
        async move { (check(addr, "").await.as_deref() == Some("SERVING")).then_some(()) }
    })
    .await;
    assert_eq!(check(addr.clone(), "msys.v1.OrderService").await.as_deref(), Some("NOT_SERVING"));
    lonely.stop().await;

    // With the broker: ready means the partitions are held.
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let order = start_order(order_args(&fresh_database(orders_port()), &kafka, &unique("order-service"))).await;
    let addr = order.addr.to_string();
    eventually(Duration::from_secs(30), "the OrderService is SERVING", || {
        let addr = addr.clone();
        async move { (check(addr, "msys.v1.OrderService").await.as_deref() == Some("SERVING")).then_some(()) }
    })
    .await;
    assert_eq!(metric(order.channel().await, "partitions_assigned").await, 3);
    order.stop().await;
    Ok(())
}
