//! What the user service publishes: exactly one CloudEvents record per
//! successful change, none for a failed one, keyed and ordered per user.

use std::collections::{HashMap, HashSet};

use msys::pb;
use prost::Message as _;
use rdkafka::Message;

use crate::support::{TestResult, UserSystem, header};

#[tokio::test]
async fn each_successful_mutation_publishes_exactly_one_cloudevent() -> TestResult {
    let mut system = UserSystem::start().await;
    let ada = system.create("Ada", "ada@example.org").await;
    let updated = system
        .client
        .update_user(pb::UpdateUserRequest { id: ada.id, name: None, email: Some("ada@lovelace.org".into()) })
        .await?
        .into_inner();
    system.client.delete_user(pb::DeleteUserRequest { id: ada.id }).await?;

    let records = system.published_events().await;
    assert_eq!(records.len(), 3, "one record per change");
    let partitions: HashSet<i32> = records.iter().map(|r| r.partition()).collect();
    assert_eq!(partitions.len(), 1, "one user's events share a partition");

    let expected_types = ["msys.user.created.v1", "msys.user.updated.v1", "msys.user.deleted.v1"];
    let mut ids = HashSet::new();
    for (record, expected_type) in records.iter().zip(expected_types) {
        assert_eq!(record.key(), Some(ada.id.to_string().as_bytes()), "key is the user id in decimal");
        assert_eq!(header(record, "ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(header(record, "ce_source").as_deref(), Some("/msys/user"));
        assert_eq!(header(record, "ce_type").as_deref(), Some(expected_type));
        assert_eq!(header(record, "content-type").as_deref(), Some("application/protobuf"));
        let time = header(record, "ce_time").expect("ce_time");
        humantime::parse_rfc3339(&time).unwrap_or_else(|e| panic!("ce_time {time:?} is RFC 3339: {e}"));
        let event = pb::UserEvent::decode(record.payload().expect("value"))?;
        let ce_id = header(record, "ce_id").expect("ce_id");
        assert_eq!(event.event_id, ce_id);
        uuid::Uuid::parse_str(&ce_id)?;
        assert!(ids.insert(ce_id), "event ids are unique");
        assert_eq!(event.r#type, expected_type);
    }
    let users: Vec<pb::User> = records
        .iter()
        .map(|r| pb::UserEvent::decode(r.payload().expect("value")).expect("event").user.expect("user"))
        .collect();
    assert_eq!(users[0], ada, "the created event carries the created user");
    assert_eq!(users[1], updated, "the updated event carries the updated user");
    assert_eq!(users[2].version, updated.version + 1, "a deletion is newer than the last update");
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn failed_mutations_publish_nothing() -> TestResult {
    let mut system = UserSystem::start().await;
    let ada = system.create("Ada", "ada@example.org").await;
    let duplicate = pb::CreateUserRequest { name: "Ada 2".into(), email: "ADA@example.org".into() };
    assert!(system.client.create_user(duplicate).await.is_err());
    let invalid = pb::CreateUserRequest { name: String::new(), email: "x@example.org".into() };
    assert!(system.client.create_user(invalid).await.is_err());
    let missing = pb::UpdateUserRequest { id: ada.id + 100, name: Some("x".into()), email: None };
    assert!(system.client.update_user(missing).await.is_err());
    assert!(system.client.delete_user(pb::DeleteUserRequest { id: ada.id + 100 }).await.is_err());

    let records = system.published_events().await;
    assert_eq!(records.len(), 1, "only the successful create was published");
    assert_eq!(header(&records[0], "ce_type").as_deref(), Some("msys.user.created.v1"));
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn each_users_events_arrive_in_commit_order() -> TestResult {
    let mut system = UserSystem::start().await;
    let mut users = Vec::new();
    for i in 0..12 {
        users.push(system.create(&format!("user {i}"), &format!("user{i}@example.org")).await);
    }
    // Interleave many changes of different users, concurrently.
    let mut tasks = Vec::new();
    for user in &users {
        let mut client = system.client.clone();
        let id = user.id;
        tasks.push(tokio::spawn(async move {
            for round in 0..5 {
                let request = pb::UpdateUserRequest { id, name: Some(format!("round {round}")), email: None };
                client.update_user(request).await.expect("update");
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let records = system.published_events().await;
    assert_eq!(records.len(), 12 * 6);
    // Within each partition, each user's versions must strictly increase.
    let mut last_version: HashMap<i64, i64> = HashMap::new();
    let mut by_partition: HashMap<i32, Vec<_>> = HashMap::new();
    for record in &records {
        by_partition.entry(record.partition()).or_default().push(record);
    }
    for partition in by_partition.values_mut() {
        partition.sort_by_key(|r| r.offset());
        for record in partition.iter() {
            let user = pb::UserEvent::decode(record.payload().expect("value"))?.user.expect("user");
            let previous = last_version.insert(user.id, user.version).unwrap_or(0);
            assert_eq!(user.version, previous + 1, "user {} events out of order", user.id);
        }
    }
    assert!(last_version.values().all(|v| *v == 6));
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn events_tail_prints_the_topic_as_json_lines() -> TestResult {
    let mut system = UserSystem::start().await;
    let ada = system.create("Ada", "ada@example.org").await;
    system.published_events().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_msys"))
        .args(["events", "tail", "--from-beginning", "--max", "1"])
        .env("KAFKA_HOST", &system.kafka.kafka_host)
        .env("KAFKA_PORT", system.kafka.kafka_port.to_string())
        .env("USER_EVENTS_TOPIC", &system.kafka.user_events_topic)
        .kill_on_drop(true)
        .output()
        .await?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let line: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(line["event"]["type"], "msys.user.created.v1");
    assert_eq!(line["event"]["user"]["id"], ada.id);
    assert_eq!(line["event"]["user"]["email"], "ada@example.org");
    assert_eq!(line["headers"]["ce_source"], "/msys/user");
    system.role.stop().await;
    Ok(())
}
