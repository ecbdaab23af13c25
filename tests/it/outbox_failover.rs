//! Issue 17, the outbox points: relay leadership bounded to seconds when the
//! leader freezes or dies, retention by age on schedules of their own, and
//! health that does not depend on the size of the backlog.

use std::{collections::HashSet, time::Duration};

use msys::{
    config::PostgresSettings,
    pb::{self, user_service_client::UserServiceClient},
};
use prost::Message as _;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::support::{
    TestResult, UserSystem, UsersSide, create_topic, eventually, free_port, fresh_database, init_logging, kafka_args,
    order_args, read_all, shared_broker, spawn_role, sql, start_order, start_user, unique, user_args, users_port,
    wait_for_assignment, wait_for_outbox_drain,
};

/// The relay lock's key (src/user/outbox.rs, RELAY_LOCK) as pg_locks shows a
/// bigint advisory key: high half in classid, low half in objid.
const LOCK_HIGH: i64 = 0x6d73_7973;
const LOCK_LOW: i64 = 0x6f75_7462;

/// The pid of the msys process whose session holds the relay lock, if any:
/// sessions are named `msys-<pid>`.
async fn lock_holder(client: &tokio_postgres::Client) -> Option<u32> {
    let row = client
        .query_opt(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = $1 AND l.objid::bigint = $2",
            &[&LOCK_HIGH, &LOCK_LOW],
        )
        .await
        .ok()??;
    row.get::<_, String>(0).strip_prefix("msys-")?.parse().ok()
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name} {pid}");
}

/// Whether a session of msys process `pid` waits on a row or table lock.
async fn waits_on_a_lock(client: &tokio_postgres::Client, pid: u32) -> bool {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
            &[&format!("msys-{pid}")],
        )
        .await;
    row.is_ok_and(|r| r.get::<_, i64>(0) > 0)
}

/// Stops whichever of `pids` leads the relay with `signal`, caught in the
/// middle of a pass, and returns its pid. Not a race against the pass: the
/// test locks rows still to be published, so the leader's pass, which must
/// stamp them before it ends, waits for them; only once it waits is the
/// leader stopped, then the rows are released. Stopped (STOP) or killed
/// (KILL), the leader can no longer end its pass itself.
async fn catch_the_leader_mid_pass(
    db: &PostgresSettings,
    observer: &tokio_postgres::Client,
    pids: &[u32],
    how: &str,
) -> u32 {
    let mut blocker = sql(db).await;
    let rows = blocker.transaction().await.expect("begin");
    let mut held = 0;
    for _ in 0..600 {
        let locked = rows.query("SELECT id FROM user_outbox WHERE published_at IS NULL FOR UPDATE", &[]).await;
        held = locked.expect("lock the unpublished rows").len();
        if held > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held > 0, "the writers left no unpublished row to hold in 600 tries");
    let leader = eventually(Duration::from_secs(30), "the relay leader waits on the held rows", || async {
        let holder = lock_holder(observer).await.filter(|pid| pids.contains(pid))?;
        waits_on_a_lock(observer, holder).await.then_some(holder)
    })
    .await;
    signal(leader, how);
    rows.rollback().await.expect("release the rows");
    leader
}

/// Creates users through `clients` until `stop`; returns how many were acknowledged.
fn writers(clients: Vec<UserServiceClient<Channel>>, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<u64>> {
    clients
        .into_iter()
        .enumerate()
        .map(|(w, mut client)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut i) = (0, 0);
                while !stop.is_cancelled() {
                    i += 1;
                    let mut request = tonic::Request::new(pb::CreateUserRequest {
                        name: format!("w{w}"),
                        email: format!("w{w}-{i}-{}@example.org", uuid::Uuid::new_v4().simple()),
                    });
                    request.set_timeout(Duration::from_secs(2));
                    match client.create_user(request).await {
                        Ok(_) => ok += 1,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                ok
            })
        })
        .collect()
}

async fn unpublished(client: &tokio_postgres::Client) -> i64 {
    let row = client.query_one("SELECT count(*) FROM user_outbox WHERE published_at IS NULL", &[]).await;
    row.map(|r| r.get(0)).unwrap_or(i64::MAX)
}

#[tokio::test]
async fn a_frozen_or_killed_relay_leader_hands_over_within_seconds_and_every_event_is_published() -> TestResult {
    init_logging();
    let db = fresh_database(users_port());
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let extra = [("OUTBOX_POLL_INTERVAL", "100ms"), ("OUTBOX_BATCH_SIZE", "50")];
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = spawn_role("user", port_a, &db, &kafka, &extra);
    let mut b = spawn_role("user", port_b, &db, &kafka, &extra);
    let connect = |port: u16| {
        eventually(Duration::from_secs(30), "msys user listens", move || async move {
            UserServiceClient::connect(format!("http://127.0.0.1:{port}")).await.ok()
        })
    };
    let (client_a, client_b) = (connect(port_a).await, connect(port_b).await);
    let pids = [a.id().expect("a runs"), b.id().expect("b runs")];
    let observer = sql(&db).await;

    // Frozen: the leader stops mid-pass and keeps its session.
    let stop = CancellationToken::new();
    let load = writers(vec![client_a.clone(), client_b.clone(), client_a.clone(), client_b.clone()], &stop);
    let frozen = catch_the_leader_mid_pass(&db, &observer, &pids, "STOP").await;
    let survivor = if frozen == pids[0] { client_b.clone() } else { client_a.clone() };
    let frozen_at = std::time::Instant::now();
    stop.cancel();
    for task in load {
        task.await?;
    }
    let mut survivor_client = survivor.clone();
    survivor_client
        .create_user(pb::CreateUserRequest { name: "after".into(), email: "after@example.org".into() })
        .await?;
    // PostgreSQL ends the frozen leader's session after LEADER_IDLE_TIMEOUT (5 s).
    eventually(Duration::from_secs(10), "the frozen leader loses the relay lock", || async {
        (lock_holder(&observer).await != Some(frozen)).then_some(())
    })
    .await;
    let handover = frozen_at.elapsed();
    eventually(Duration::from_secs(60), "the other relay publishes everything while the leader is frozen", || async {
        (unpublished(&observer).await == 0).then_some(())
    })
    .await;
    signal(frozen, "CONT");

    // Killed: the leader vanishes mid-pass.
    let stop = CancellationToken::new();
    let load = writers(vec![client_a.clone(), client_b.clone(), client_a.clone(), client_b.clone()], &stop);
    let killed = catch_the_leader_mid_pass(&db, &observer, &pids, "KILL").await;
    let killed_at = std::time::Instant::now();
    stop.cancel();
    for task in load {
        task.await?;
    }
    let mut survivor = if killed == pids[0] { client_b } else { client_a };
    survivor.create_user(pb::CreateUserRequest { name: "last".into(), email: "last@example.org".into() }).await?;
    eventually(Duration::from_secs(10), "the killed leader's lock is released", || async {
        (lock_holder(&observer).await != Some(killed)).then_some(())
    })
    .await;
    let released = killed_at.elapsed();
    eventually(Duration::from_secs(60), "the survivor publishes everything after the leader was killed", || async {
        (unpublished(&observer).await == 0).then_some(())
    })
    .await;
    eprintln!("relay lock freed {handover:?} after SIGSTOP, {released:?} after SIGKILL");

    // At least once: every stored user announced, repeats only of whole events.
    let users: HashSet<i64> = observer.query("SELECT id FROM users", &[]).await?.iter().map(|r| r.get(0)).collect();
    let mut announced = HashSet::new();
    for record in read_all(&kafka).await {
        let event = pb::UserEvent::decode(record.payload().expect("value"))?;
        announced.insert(event.user.expect("user").id);
    }
    assert_eq!(announced, users, "every stored user was announced, none invented");
    a.start_kill()?;
    b.start_kill()?;
    let _ = (a.wait().await, b.wait().await);
    Ok(())
}

#[tokio::test]
async fn published_outbox_rows_are_pruned_by_age_by_the_database_clock_on_their_own_schedule() -> TestResult {
    init_logging();
    let db = fresh_database(users_port());
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    create_topic(&kafka).await;
    let mut args = user_args(&db, &kafka);
    args.relay.outbox_retention = Duration::from_secs(3600);
    args.relay.outbox_prune_interval = Duration::from_millis(200);
    let role = start_user(args).await;
    let mut users = UserServiceClient::new(role.channel().await);
    let mut ids = Vec::new();
    for i in 0..3 {
        let request = pb::CreateUserRequest { name: format!("u{i}"), email: format!("u{i}@example.org") };
        ids.push(users.create_user(request).await?.into_inner().id);
    }
    wait_for_outbox_drain(&db).await;
    // Published two hours ago by the database's clock: past the retention.
    let client = sql(&db).await;
    client
        .execute("UPDATE user_outbox SET published_at = now() - interval '2 hours' WHERE user_id = $1", &[&ids[0]])
        .await?;
    eventually(Duration::from_secs(10), "the old published row is pruned", || async {
        let row = client.query_one("SELECT count(*) FROM user_outbox WHERE user_id = $1", &[&ids[0]]).await.ok()?;
        (row.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
    let left: i64 = client.query_one("SELECT count(*) FROM user_outbox", &[]).await?.get(0);
    assert_eq!(left, 2, "younger rows stay");
    role.stop().await;
    Ok(())
}

#[tokio::test]
async fn applied_event_ids_are_pruned_by_age() -> TestResult {
    let UsersSide { users_db: _, orders_db, kafka, user } = UsersSide::start().await;
    let mut args = order_args(&orders_db, &kafka, &unique("order-service"));
    args.replica.applied_events_retention = Duration::from_secs(3600);
    args.replica.prune_interval = Duration::from_millis(200);
    let order = start_order(args).await;
    wait_for_assignment(&order, 3).await;
    let mut users = UserServiceClient::new(user.channel().await);
    let mut ids = Vec::new();
    for i in 0..3 {
        let request = pb::CreateUserRequest { name: format!("u{i}"), email: format!("u{i}@example.org") };
        ids.push(users.create_user(request).await?.into_inner().id);
    }
    let client = sql(&orders_db).await;
    eventually(Duration::from_secs(30), "the three events are applied", || async {
        let row = client.query_one("SELECT count(*) FROM applied_events", &[]).await.ok()?;
        (row.get::<_, i64>(0) == 3).then_some(())
    })
    .await;
    client
        .execute("UPDATE applied_events SET applied_at = now() - interval '2 hours' WHERE user_id = $1", &[&ids[0]])
        .await?;
    eventually(Duration::from_secs(10), "the old applied event id is pruned", || async {
        let row = client.query_one("SELECT count(*) FROM applied_events", &[]).await.ok()?;
        (row.get::<_, i64>(0) == 2).then_some(())
    })
    .await;
    let known: i64 = client.query_one("SELECT count(*) FROM known_users", &[]).await?.get(0);
    assert_eq!(known, 3, "pruning forgets ids, never users");
    order.stop().await;
    user.stop().await;
    Ok(())
}

#[tokio::test]
async fn health_stays_serving_while_the_outbox_cannot_even_be_counted() -> TestResult {
    let mut system = UserSystem::start().await;
    system.create("Ada", "ada@example.org").await;
    let addr = system.role.addr.to_string();
    let status = || {
        let addr = addr.clone();
        async move { msys::grpc::check_health(&addr, "", Duration::from_secs(5)).await.ok() }
    };
    let serving = || async { status().await.as_deref() == Some("SERVING") };
    eventually(Duration::from_secs(10), "SERVING", || async { serving().await.then_some(()) }).await;
    // A long backlog scan stands in for anything that makes counting slow:
    // the outbox cannot be read at all for a while.
    let mut blocker = sql(&system.db).await;
    let tx = blocker.transaction().await?;
    tx.batch_execute("LOCK TABLE user_outbox IN ACCESS EXCLUSIVE MODE").await?;
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        // A check that itself times out on a loaded machine proves nothing either way.
        let now = status().await;
        assert_ne!(now.as_deref(), Some("NOT_SERVING"), "the database answers SELECT 1: the role stays SERVING");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tx.rollback().await?;
    system.role.stop().await;
    Ok(())
}
