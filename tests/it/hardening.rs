//! Issue 17: what a careful reviewer and fault runs found, each as a test
//! that fails without its fix.

use std::{collections::HashSet, time::Duration};

use msys::pb::{self, OrderStatus, order_service_client::OrderServiceClient, user_service_client::UserServiceClient};
use tonic::{Code, Request};

use crate::support::{
    DedicatedPostgres, Flow, TestResult, UserSystem, create_topic, eventually, free_port, fresh_database, init_logging,
    kafka_args, order_args, orders_port, shared_broker, spawn_role, sql, start_order, start_user, unique, user_args,
    users_port,
};

fn create(name: &str, email: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest { name: name.into(), email: email.into() }
}

/// Waits until a backend of `dbname` waits for a lock: the call under test
/// is blocked at the database.
async fn wait_for_lock_waiter(client: &tokio_postgres::Client, dbname: &str) {
    wait_for_lock_waiters(client, dbname, 1).await;
}

/// Waits until `count` backends of `dbname` wait for a lock.
async fn wait_for_lock_waiters(client: &tokio_postgres::Client, dbname: &str, count: i64) {
    eventually(Duration::from_secs(10), "statements wait for the row lock", || async {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                &[&dbname],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) >= count).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_loser_of_two_concurrent_cancels_also_sees_cancelled() -> TestResult {
    let mut flow = Flow::start().await;
    let user = flow.create_user("Ada", "ada@example.org").await;
    let order = |product: &str| pb::CreateOrderRequest { user_id: user.id, product: product.into(), quantity: 1 };
    let placed = flow.orders.create_order(order("pen")).await?.into_inner();

    // The winner's cancel holds the row; the loser's starts, and waits for it.
    let mut winner = sql(&flow.orders_db).await;
    let tx = winner.transaction().await?;
    tx.execute(
        "UPDATE orders SET status = 'CANCELLED', cancel_reason = 'first', updated_at = now() WHERE id = $1",
        &[&placed.id],
    )
    .await?;
    let mut orders = flow.orders.clone();
    let loser = tokio::spawn(async move {
        orders.cancel_order(pb::CancelOrderRequest { id: placed.id, reason: "second".into() }).await
    });
    wait_for_lock_waiter(&sql(&flow.orders_db).await, &flow.orders_db.dbname).await;
    tx.commit().await?;
    let answer = loser.await??.into_inner();
    assert_eq!(answer.status(), OrderStatus::Cancelled, "the loser is told the truth: {answer:?}");
    assert_eq!(answer.cancel_reason, "first", "the winner's reason stands");

    // And through the API only: many pairs of cancels racing.
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(flow.orders.create_order(order(&format!("item {i}"))).await?.into_inner().id);
    }
    let mut calls = Vec::new();
    for id in &ids {
        for reason in ["a", "b"] {
            let mut orders = flow.orders.clone();
            let request = pb::CancelOrderRequest { id: *id, reason: reason.into() };
            calls.push(tokio::spawn(async move { orders.cancel_order(request).await }));
        }
    }
    for call in calls {
        let answer = call.await??.into_inner();
        assert_eq!(answer.status(), OrderStatus::Cancelled, "{answer:?}");
    }
    flow.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_callers_deadline_reaches_the_database_and_cancels_the_statement() -> TestResult {
    let mut system = UserSystem::start().await;
    let user = system.create("Ada", "ada@example.org").await;
    let mut holder = sql(&system.db).await;
    let tx = holder.transaction().await?;
    tx.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&user.id]).await?;

    let mut update = Request::new(pb::UpdateUserRequest { id: user.id, name: Some("Ada L.".into()), email: None });
    update.set_timeout(Duration::from_millis(500));
    let refused = system.client.update_user(update).await.expect_err("the row is locked past the deadline");
    assert!(matches!(refused.code(), Code::DeadlineExceeded | Code::Cancelled), "{refused:?}");
    // The statement itself stopped at the deadline: nothing waits for the lock any more.
    let observer = sql(&system.db).await;
    let dbname = system.db.dbname.clone();
    eventually(Duration::from_secs(3), "the abandoned UPDATE no longer waits at the database", || async {
        let row = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                &[&dbname],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
    tx.rollback().await?;
    system.role.stop().await;
    Ok(())
}

fn with_key(request: pb::CreateUserRequest, key: &str) -> Request<pb::CreateUserRequest> {
    let mut request = Request::new(request);
    request.metadata_mut().insert("idempotency-key", key.parse().expect("ascii key"));
    request
}

#[tokio::test]
async fn a_create_retried_with_its_idempotency_key_returns_the_original_user() -> TestResult {
    let mut system = UserSystem::start().await;
    let first = system.client.create_user(with_key(create("Ada", "ada@example.org"), "req-1")).await?.into_inner();
    let retry = system.client.create_user(with_key(create("Ada", "ada@example.org"), "req-1")).await?.into_inner();
    assert_eq!(retry, first, "the retry gets the user its first attempt created");

    let other = system.client.create_user(with_key(create("Ada", "ada@example.org"), "req-2")).await;
    assert_eq!(other.map(|_| ()).expect_err("another key, same email").code(), Code::AlreadyExists);
    let plain = system.client.create_user(create("Ada", "ada@example.org")).await;
    assert_eq!(plain.map(|_| ()).expect_err("no key, same email").code(), Code::AlreadyExists);

    // Retries racing the original in one batch all get the one user.
    let mut calls = Vec::new();
    for _ in 0..16 {
        let mut client = system.client.clone();
        calls.push(tokio::spawn(async move {
            client.create_user(with_key(create("Bob", "bob@example.org"), "req-3")).await
        }));
    }
    let mut ids = HashSet::new();
    for call in calls {
        ids.insert(call.await??.into_inner().id);
    }
    assert_eq!(ids.len(), 1, "one user for one key: {ids:?}");
    let bad = system.client.create_user(with_key(create("Cy", "cy@example.org"), &"k".repeat(201))).await;
    assert_eq!(bad.map(|_| ()).expect_err("key too long").code(), Code::InvalidArgument);
    let events = system.published_events().await;
    assert_eq!(events.len(), 2, "one event per user created, none for the retries");
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn batched_creates_are_matched_to_callers_by_position_not_by_the_stored_email() -> TestResult {
    let system = UserSystem::start().await;
    // An operator's trigger that normalises emails: the stored string is no
    // longer the one the caller sent.
    sql(&system.db)
        .await
        .batch_execute(
            "CREATE FUNCTION lower_email() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN NEW.email := lower(NEW.email); RETURN NEW; END $$;
             CREATE TRIGGER users_lower_email BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION lower_email();",
        )
        .await?;
    let mut calls = Vec::new();
    for i in 0..32 {
        let mut client = system.client.clone();
        calls.push(tokio::spawn(async move {
            let request = create(&format!("Caller {i}"), &format!("Caller.{i}@Example.ORG"));
            client.create_user(request).await.map(|r| (i, r.into_inner()))
        }));
    }
    for call in calls {
        let (i, user) = call.await??;
        assert_eq!(user.name, format!("Caller {i}"), "each caller gets its own user");
        assert_eq!(user.email, format!("caller.{i}@example.org"));
    }
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_server_at_its_concurrency_limit_sheds_requests_with_a_clear_resource_exhausted() -> TestResult {
    init_logging();
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let mut args = order_args(&fresh_database(orders_port()), &kafka, &unique("order-service"));
    args.server.max_concurrent_requests = 2;
    args.replica.user_wait = Duration::from_secs(20);
    let role = start_order(args).await;
    let orders = OrderServiceClient::new(role.channel().await);
    // Two calls wait for a user nobody creates: the server is full.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let mut orders = orders.clone();
            tokio::spawn(async move {
                orders
                    .create_order(pb::CreateOrderRequest { user_id: 424242, product: "pen".into(), quantity: 1 })
                    .await
            })
        })
        .collect();
    let metrics = role.channel().await;
    eventually(Duration::from_secs(10), "both waiting calls are in flight", || {
        let metrics = metrics.clone();
        // The metrics call counts itself too.
        async move { (crate::support::metric(metrics, msys::metrics::RPCS_IN_FLIGHT).await >= 3).then_some(()) }
    })
    .await;
    let shed = eventually(Duration::from_secs(10), "a request beyond the limit is shed", || {
        let mut orders = orders.clone();
        async move {
            let mut request = Request::new(pb::GetOrderRequest { id: 1 });
            request.set_timeout(Duration::from_secs(1));
            let status = orders.get_order(request).await.err()?;
            (status.code() == Code::ResourceExhausted).then_some(status)
        }
    })
    .await;
    assert!(shed.message().contains("overloaded"), "{shed:?}");
    // Health checks are never shed.
    msys::grpc::check_health(&role.addr.to_string(), "", Duration::from_secs(2)).await?;
    for call in waiting {
        call.abort();
    }
    role.stop().await;
    Ok(())
}

#[tokio::test]
async fn create_order_calls_waiting_for_users_are_capped() -> TestResult {
    init_logging();
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let mut args = order_args(&fresh_database(orders_port()), &kafka, &unique("order-service"));
    args.replica.max_user_waiters = 2;
    // The two waiters hold their places until the test lets them go: with a
    // wait that could run out, a slow machine freed a place before the third
    // call came, and that call waited instead of being refused.
    args.replica.user_wait = Duration::from_secs(3600);
    let role = start_order(args).await;
    let orders = OrderServiceClient::new(role.channel().await);
    let order = |user_id| pb::CreateOrderRequest { user_id, product: "pen".into(), quantity: 1 };
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let mut orders = orders.clone();
            tokio::spawn(async move { orders.create_order(order(500 + i)).await })
        })
        .collect();
    let metrics = role.channel().await;
    let waiters = |expected: i64| {
        let metrics = metrics.clone();
        // Only a bound for a failure to be reported: nothing here races a clock.
        eventually(Duration::from_secs(120), "the waiting calls are counted", move || {
            let metrics = metrics.clone();
            async move {
                let waiting = crate::support::metric(metrics, msys::order::service::WAITERS_GAUGE).await;
                (waiting == expected).then_some(())
            }
        })
    };
    waiters(2).await;
    let refused = orders.clone().create_order(order(600)).await.expect_err("a third waiter is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("ORDER_MAX_USER_WAITERS"), "{refused:?}");
    for call in &waiting {
        assert!(!call.is_finished(), "the two waiters still wait");
    }
    // A caller who gives up frees its place.
    for call in waiting {
        call.abort();
    }
    waiters(0).await;
    role.stop().await;
    Ok(())
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("the process is running").to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

#[tokio::test]
async fn on_sigterm_a_role_reports_not_serving_and_keeps_serving_through_the_drain_delay() -> TestResult {
    init_logging();
    let db = fresh_database(users_port());
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let port = free_port();
    let mut process = spawn_role("user", port, &db, &kafka, &[("MSYS_DRAIN_DELAY", "4s")]);
    let addr = format!("127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "msys user is SERVING", || {
        let addr = addr.clone();
        async move { (msys::grpc::check_health(&addr, "", Duration::from_secs(1)).await.ok()? == "SERVING").then_some(()) }
    })
    .await;
    let started = std::time::Instant::now();
    sigterm(&process);
    eventually(Duration::from_secs(2), "health turns NOT_SERVING at once", || {
        let addr = addr.clone();
        async move {
            (msys::grpc::check_health(&addr, "", Duration::from_secs(1)).await.ok()? == "NOT_SERVING").then_some(())
        }
    })
    .await;
    // Still accepting new connections and serving them meanwhile.
    let mut users = UserServiceClient::connect(format!("http://{addr}")).await?;
    users.create_user(create("Late", "late@example.org")).await?;
    assert!(started.elapsed() < Duration::from_secs(4), "checked within the drain delay");
    let status = tokio::time::timeout(Duration::from_secs(20), process.wait()).await??;
    assert!(status.success(), "exits 0 after the drain: {status:?}");
    assert!(started.elapsed() >= Duration::from_secs(4), "not before the drain delay");
    Ok(())
}

#[tokio::test]
async fn every_call_failed_by_a_database_restart_is_unavailable() -> TestResult {
    init_logging();
    let postgres = DedicatedPostgres::start();
    let db = postgres.database();
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    let role = start_user(user_args(&db, &kafka)).await;
    let client = UserServiceClient::new(role.channel().await);
    let seed = client.clone().create_user(create("Seed", "seed@example.org")).await?.into_inner();
    let stop = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (mut client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut failures, mut i) = (Vec::new(), 0);
                while !stop.is_cancelled() {
                    i += 1;
                    let result = if i % 2 == 0 {
                        client.create_user(create("Load", &format!("w{w}-{i}@example.org"))).await.map(|_| ())
                    } else {
                        client.get_user(pb::GetUserRequest { id: seed.id }).await.map(|_| ())
                    };
                    if let Err(status) = result {
                        failures.push(status);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                failures
            })
        })
        .collect();
    let recovered = |what: &'static str| {
        let client = client.clone();
        eventually(Duration::from_secs(30), what, move || {
            let mut client = client.clone();
            async move { client.get_user(pb::GetUserRequest { id: seed.id }).await.ok().map(|_| ()) }
        })
    };
    let mut cut_mid_statement = 0;
    for mode in ["fast", "immediate"] {
        // Calls caught mid-statement by the restart: updates waiting for a
        // row lock that a test session holds.
        let mut holder = sql(&db).await;
        let tx = holder.transaction().await?;
        tx.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&seed.id]).await?;
        let blocked: Vec<_> = (0..3)
            .map(|i| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let request = pb::UpdateUserRequest { id: seed.id, name: Some(format!("Seed {i}")), email: None };
                    client.update_user(request).await.map(|_| ())
                })
            })
            .collect();
        wait_for_lock_waiters(&sql(&db).await, &db.dbname, 3).await;
        postgres.restart(mode);
        drop(tx);
        // A blocked update may still commit if the holder dies first and the
        // update runs before its own backend is told to stop; every one that
        // fails must be UNAVAILABLE.
        for call in blocked {
            if let Err(status) = call.await? {
                assert_eq!(status.code(), Code::Unavailable, "a call cut by a {mode} restart: {status:?}");
                cut_mid_statement += 1;
            }
        }
        recovered("calls succeed after the restart").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await?);
    }
    assert!(cut_mid_statement > 0, "the restarts cut calls in the middle of their statements");
    let wrong: Vec<_> = failures.iter().filter(|s| s.code() != Code::Unavailable).collect();
    assert!(wrong.is_empty(), "{} of {} failed calls were not UNAVAILABLE: {wrong:?}", wrong.len(), failures.len());
    role.stop().await;
    Ok(())
}

#[tokio::test]
async fn services_run_as_a_dml_only_role_that_msys_migrate_grants() -> TestResult {
    init_logging();
    let owner = fresh_database(users_port());
    let app = unique("msys_app");
    let maintenance = msys::config::PostgresSettings { dbname: "postgres".into(), ..owner.clone() };
    sql(&maintenance).await.batch_execute(&format!("CREATE ROLE {app} LOGIN PASSWORD 'app-secret'")).await?;
    let as_app = msys::config::PostgresSettings {
        user: app.clone(),
        password: Some("app-secret".to_owned().into()),
        ..owner.clone()
    };
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;

    // The schema owner migrates and grants; before that the app role cannot start.
    sql(&maintenance).await.batch_execute(&format!("CREATE DATABASE {}", owner.dbname)).await?;
    let refused = msys::user::UserRole::build(user_args(&as_app, &kafka)).await.err().expect("no schema, no start");
    assert!(format!("{refused:#}").contains("msys migrate"), "{refused:#}");
    let migrate = tokio::process::Command::new(env!("CARGO_BIN_EXE_msys"))
        .args(["migrate", "user", "--grant-to", &app])
        .env("USER_POSTGRES_HOST", &owner.host)
        .env("USER_POSTGRES_PORT", owner.port.to_string())
        .env("USER_POSTGRES_USER", &owner.user)
        .env("USER_POSTGRES_PASSWORD", owner.password()?)
        .env("USER_POSTGRES_DB", &owner.dbname)
        .output()
        .await?;
    assert!(migrate.status.success(), "msys migrate: {}", String::from_utf8_lossy(&migrate.stderr));

    // The service works as the app role: writes, reads, and the relay publishes.
    let role = start_user(user_args(&as_app, &kafka)).await;
    let mut users = UserServiceClient::new(role.channel().await);
    let ada = users.create_user(create("Ada", "ada@example.org")).await?.into_inner();
    users.update_user(pb::UpdateUserRequest { id: ada.id, name: Some("Ada L.".into()), email: None }).await?;
    users.delete_user(pb::DeleteUserRequest { id: ada.id }).await?;
    crate::support::wait_for_outbox_drain(&owner).await;
    role.stop().await;

    // And that is all it may do.
    let app_client = sql(&as_app).await;
    for ddl in
        ["CREATE TABLE intruder (i int)", "DROP TABLE users", "ALTER TABLE users ADD COLUMN x int", "TRUNCATE users"]
    {
        let denied = app_client.batch_execute(ddl).await.expect_err(ddl);
        let code = denied.code().map(|c| c.code().to_owned());
        assert!(matches!(code.as_deref(), Some("42501")), "{ddl}: {denied:?}");
    }
    Ok(())
}

/// Resident memory of a process, from procfs.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS value")
}

/// Closed-loop CreateUser and GetUser load from `clients` callers until `stop`.
fn load(
    client: &UserServiceClient<tonic::transport::Channel>,
    clients: usize,
    stop: &tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<(u64, u64)>> {
    (0..clients)
        .map(|c| {
            let (mut client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed, mut i) = (0, 0, 0u64);
                while !stop.is_cancelled() {
                    i += 1;
                    let email = format!("c{c}-{i}-{}@example.org", uuid::Uuid::new_v4().simple());
                    let result = if i % 2 == 0 {
                        client.create_user(create("Load", &email)).await.map(|_| ())
                    } else {
                        client.get_user(pb::GetUserRequest { id: 1 }).await.map(|_| ())
                    };
                    if result.is_ok() { ok += 1 } else { failed += 1 }
                }
                (ok, failed)
            })
        })
        .collect()
}

/// Issue 17 point 8. With RUST_BACKTRACE=1 in the environment (as on the
/// machine the figures came from) every failed call's anyhow error captured a
/// backtrace and its log line symbolised it, loading the binary's debug info
/// for good: idle RSS went from 30 to 196 MB here. The process runs with
/// RUST_BACKTRACE=1, as operators often do.
#[tokio::test]
async fn memory_after_a_database_restart_under_load_stays_bounded() -> TestResult {
    init_logging();
    let postgres = DedicatedPostgres::start();
    let db = postgres.database();
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let port = free_port();
    let process = spawn_role("user", port, &db, &kafka, &[("RUST_BACKTRACE", "1")]);
    let pid = process.id().expect("running");
    let client = eventually(Duration::from_secs(30), "msys user listens", || async move {
        UserServiceClient::connect(format!("http://127.0.0.1:{port}")).await.ok()
    })
    .await;
    client.clone().create_user(create("Seed", "seed@example.org")).await?;

    // Warm: the same load without a fault, then idle.
    let stop = tokio_util::sync::CancellationToken::new();
    let workers = load(&client, 64, &stop);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    for w in workers {
        w.await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rss_kib(pid);

    let stop = tokio_util::sync::CancellationToken::new();
    let workers = load(&client, 64, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Down for a while each time: the callers' failures pile up meanwhile.
    postgres.halt();
    tokio::time::sleep(Duration::from_secs(3)).await;
    postgres.resume();
    tokio::time::sleep(Duration::from_secs(2)).await;
    postgres.restart("fast");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (o, f) = w.await?;
        ok += o;
        failed += f;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    eprintln!("memory: idle {before} KiB before, {after} KiB after two restarts ({ok} calls ok, {failed} failed)");
    assert!(after <= before + 10 * 1024, "idle memory grew from {before} KiB to {after} KiB after the restarts");
    drop(process);
    Ok(())
}
