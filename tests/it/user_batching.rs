//! Concurrent CreateUser and GetUser calls share statements (src/batch.rs),
//! and sharing never mixes up answers: each caller gets its own user, its
//! own ALREADY_EXISTS or NOT_FOUND, and each created user exactly one event.
//!
//! To make the batches deterministic the role runs with one batch in flight,
//! and the test holds a table lock so that the first call's statement waits
//! at the database while the others queue behind it.

use std::{collections::HashSet, time::Duration};

use msys::pb;
use tonic::{Code, transport::Channel};

use crate::support::{
    RunningRole, TestResult, eventually, fresh_database, init_logging, kafka_args, metric, read_all, shared_broker,
    sql, start_user, unique, user_args, users_port, wait_for_outbox_drain,
};

type Client = pb::user_service_client::UserServiceClient<Channel>;

/// A user role whose batches go to the database one at a time.
async fn start_role_with_one_batch_in_flight() -> (RunningRole, msys::config::PostgresSettings, msys::config::KafkaArgs)
{
    init_logging();
    let db = fresh_database(users_port());
    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    let mut args = user_args(&db, &kafka);
    args.batch.batch_in_flight = 1;
    (start_user(args).await, db, kafka)
}

/// Waits until the server holds `calls` RPCs besides the GetMetrics asking.
async fn wait_for_calls_in_flight(role: &RunningRole, calls: i64) {
    let channel = role.channel().await;
    eventually(Duration::from_secs(10), &format!("{calls} calls are in flight"), || {
        let channel = channel.clone();
        async move { (metric(channel, "rpcs_in_flight").await > calls).then_some(()) }
    })
    .await;
}

/// A lock on `users` held by a transaction of its own: the next statement that
/// needs a conflicting lock waits at the database until `release`.
struct UsersLock(tokio_postgres::Client);

impl UsersLock {
    async fn hold(db: &msys::config::PostgresSettings, mode: &str) -> Result<Self, tokio_postgres::Error> {
        let client = sql(db).await;
        client.batch_execute(&format!("BEGIN; LOCK TABLE users IN {mode} MODE")).await?;
        Ok(UsersLock(client))
    }

    async fn release(self) -> Result<(), tokio_postgres::Error> {
        self.0.batch_execute("COMMIT").await
    }
}

fn create(client: &Client, name: &str, email: &str) -> tokio::task::JoinHandle<Result<pb::User, tonic::Status>> {
    let mut client = client.clone();
    let request = pb::CreateUserRequest { name: name.into(), email: email.into() };
    tokio::spawn(async move { client.create_user(request).await.map(|r| r.into_inner()) })
}

#[tokio::test]
async fn concurrent_creates_share_one_statement_and_each_caller_gets_its_own_user() -> TestResult {
    let (role, db, kafka) = start_role_with_one_batch_in_flight().await;
    let client = Client::new(role.channel().await);
    let lock = UsersLock::hold(&db, "SHARE").await?;
    let first = create(&client, "First", "first@example.org");
    wait_for_calls_in_flight(&role, 1).await;
    let others: Vec<_> =
        (0..40).map(|i| create(&client, &format!("User {i}"), &format!("user-{i}@example.org"))).collect();
    wait_for_calls_in_flight(&role, 41).await;
    lock.release().await?;

    let first = first.await??;
    assert_eq!(first.email, "first@example.org");
    let mut ids = HashSet::from([first.id]);
    for (i, call) in others.into_iter().enumerate() {
        let user = call.await??;
        assert_eq!(
            (user.name.as_str(), user.email.as_str()),
            (format!("User {i}").as_str(), format!("user-{i}@example.org").as_str())
        );
        assert!(ids.insert(user.id), "user {} was handed to two callers", user.id);
    }
    let channel = role.channel().await;
    assert_eq!(metric(channel.clone(), "create_batched_calls_total").await, 41);
    assert_eq!(metric(channel, "create_batches_total").await, 2, "the first call alone, then the 40 that queued");

    wait_for_outbox_drain(&db).await;
    let announced: Vec<i64> = read_all(&kafka)
        .await
        .iter()
        .map(|r| {
            let key = rdkafka::Message::key(r).expect("key");
            std::str::from_utf8(key).expect("utf-8").parse().expect("decimal id")
        })
        .collect();
    assert_eq!(announced.len(), 41, "one event per created user");
    assert_eq!(announced.into_iter().collect::<HashSet<_>>(), ids);
    role.stop().await;
    Ok(())
}

#[tokio::test]
async fn one_email_claimed_several_times_in_one_batch_creates_exactly_one_user() -> TestResult {
    let (role, db, _kafka) = start_role_with_one_batch_in_flight().await;
    let client = Client::new(role.channel().await);
    create(&client, "Taken", "taken@example.org").await??;
    let lock = UsersLock::hold(&db, "SHARE").await?;
    let blocker = create(&client, "Blocker", "blocker@example.org");
    wait_for_calls_in_flight(&role, 1).await;
    // Exact duplicates, the same address in other cases, an address taken
    // before the batch, and bystanders that must not suffer for them.
    let same = ["same@example.org", "Same@Example.org", "same@example.org", "SAME@EXAMPLE.ORG"];
    let same_calls: Vec<_> = same.iter().map(|email| create(&client, "Same", email)).collect();
    let taken = create(&client, "Taken again", "TAKEN@example.org");
    let bystanders: Vec<_> = (0..3).map(|i| create(&client, "Bystander", &format!("by-{i}@example.org"))).collect();
    wait_for_calls_in_flight(&role, 9).await;
    lock.release().await?;

    blocker.await??;
    let mut winners = Vec::new();
    for (email, call) in same.iter().zip(same_calls) {
        match call.await? {
            Ok(user) => winners.push(user),
            Err(status) => {
                assert_eq!(status.code(), Code::AlreadyExists, "{email}: {status:?}");
                assert!(status.message().contains(email), "{email}: {}", status.message());
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one of {same:?} is created, got {winners:?}");
    assert_eq!(winners[0].email, same[0], "the first caller wins");
    assert_eq!(taken.await?.map_err(|s| s.code()).err(), Some(Code::AlreadyExists));
    for call in bystanders {
        call.await??;
    }
    let rows = sql(&db).await.query_one("SELECT count(*) FROM users", &[]).await?.get::<_, i64>(0);
    assert_eq!(rows, 1 + 1 + 1 + 3, "taken, blocker, one of the same, three bystanders");
    let outbox = sql(&db).await.query_one("SELECT count(*) FROM user_outbox", &[]).await?.get::<_, i64>(0);
    assert_eq!(outbox, rows, "one outbox row per created user, none for a refused one");
    assert_eq!(metric(role.channel().await, "create_batches_total").await, 3, "taken, blocker, then the rest");
    role.stop().await;
    Ok(())
}

#[tokio::test]
async fn concurrent_reads_share_one_query_and_each_caller_gets_its_own_user_or_not_found() -> TestResult {
    let (role, db, _kafka) = start_role_with_one_batch_in_flight().await;
    let client = Client::new(role.channel().await);
    let mut users = Vec::new();
    for i in 0..5 {
        users.push(create(&client, &format!("Reader {i}"), &format!("reader-{i}@example.org")).await??);
    }
    let missing = users.iter().map(|u| u.id).max().unwrap_or(0) + 1000;
    let get = |id: i64| {
        let mut client = client.clone();
        tokio::spawn(async move { client.get_user(pb::GetUserRequest { id }).await.map(|r| r.into_inner()) })
    };
    let lock = UsersLock::hold(&db, "ACCESS EXCLUSIVE").await?;
    let first = get(users[0].id);
    wait_for_calls_in_flight(&role, 1).await;
    // Every user three times, interleaved with an id that does not exist.
    let wanted: Vec<i64> = (0..3).flat_map(|_| users.iter().map(|u| u.id).chain([missing])).collect();
    let calls: Vec<_> = wanted.iter().map(|id| get(*id)).collect();
    wait_for_calls_in_flight(&role, 1 + wanted.len() as i64).await;
    lock.release().await?;

    assert_eq!(first.await??, users[0]);
    for (id, call) in wanted.iter().zip(calls) {
        match call.await? {
            Ok(user) => assert_eq!(Some(&user), users.iter().find(|u| u.id == *id), "answer to GetUser({id})"),
            Err(status) => {
                assert_eq!(*id, missing, "GetUser({id}) failed: {status:?}");
                assert_eq!(status.code(), Code::NotFound);
                assert_eq!(status.message(), format!("user {missing} does not exist"));
            }
        }
    }
    let channel = role.channel().await;
    assert_eq!(metric(channel.clone(), "get_batches_total").await, 2, "the first read alone, then the rest together");
    assert_eq!(metric(channel, "get_batched_calls_total").await, 1 + wanted.len() as i64);
    role.stop().await;
    Ok(())
}
