//! `msys events tail`: prints the topic's records as JSON lines, for people
//! debugging the event flow (Debian's kcat cannot talk to every broker).

use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    message::{BorrowedMessage, Headers},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{config::KafkaArgs, kafka, pb};

#[derive(Args, Debug, Clone)]
pub struct TailArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Start at the oldest record instead of waiting for new ones.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<u64>,
}

/// Follows every partition of the topic (no consumer group, so it never
/// disturbs the services' offsets) until `shutdown` or `--max` records.
pub async fn run(args: TailArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topic = args.kafka.user_events_topic.clone();
    let partitions = kafka::watermarks(&args.kafka, &topic, Duration::from_secs(10)).await?;
    let consumer: StreamConsumer = kafka::client_config(&args.kafka, "msys-tail")
        .set("group.id", format!("msys-tail-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the Kafka consumer")?;
    let mut assignment = TopicPartitionList::new();
    let start = if args.from_beginning { Offset::Beginning } else { Offset::End };
    for (partition, _, _) in &partitions {
        assignment.add_partition_offset(&topic, *partition, start)?;
    }
    consumer.assign(&assignment).context("assigning partitions")?;
    let mut printed = 0;
    while args.max.is_none_or(|max| printed < max) {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = consumer.recv() => message.context("reading from Kafka")?,
        };
        println!("{}", to_json(&message));
        printed += 1;
    }
    Ok(())
}

/// One record as a JSON object: where it is, its headers, and the decoded
/// event, or the reason it could not be decoded.
pub fn to_json(message: &BorrowedMessage<'_>) -> Value {
    let headers: serde_json::Map<String, Value> = message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_owned(), Value::from(h.value.map(|v| String::from_utf8_lossy(v).into_owned()))))
                .collect()
        })
        .unwrap_or_default();
    let mut record = json!({
        "partition": message.partition(),
        "offset": message.offset(),
        "key": message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        "headers": headers,
    });
    match super::decode(message) {
        Ok(decoded) => record["event"] = event_json(&decoded.event),
        Err(error) => record["error"] = Value::from(error.to_string()),
    }
    record
}

fn time_json(ts: Option<prost_types::Timestamp>) -> Value {
    ts.and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| Value::from(humantime::format_rfc3339_micros(t).to_string()))
        .unwrap_or(Value::Null)
}

fn event_json(event: &pb::UserEvent) -> Value {
    let user = event.user.as_ref().map(|u| {
        json!({
            "id": u.id,
            "name": u.name,
            "email": u.email,
            "version": u.version,
            "created_at": time_json(u.created_at),
            "updated_at": time_json(u.updated_at),
        })
    });
    json!({
        "event_id": event.event_id,
        "type": event.r#type,
        "occurred_at": time_json(event.occurred_at),
        "user": user,
    })
}
