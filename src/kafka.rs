//! Kafka plumbing shared by the roles: the idempotent producer, consumer
//! settings, topic creation and listing. librdkafka calls that block run on
//! the blocking pool, never on the async runtime.

use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    error::RDKafkaErrorCode,
    producer::FutureProducer,
};

use crate::config::KafkaArgs;

/// Settings common to every client: where the brokers are, and a client id
/// that shows up in broker logs.
pub fn client_config(args: &KafkaArgs, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", args.bootstrap_servers()).set("client.id", client_id).set("log_level", "4");
    for (key, value) in args.security.properties() {
        config.set(key, value);
    }
    config
}

/// A producer that neither loses nor duplicates nor reorders what it has
/// accepted: idempotence (which implies acks=all and bounded in-flight
/// requests), and the murmur2 partitioner so a key lands on the partition a
/// Java client would choose. `linger.ms` 5: records enqueued within 5 ms
/// share one produce request per partition (the relay keeps several chunks
/// enqueued, so requests fill up under load; a lone record waits 5 ms).
pub fn producer(args: &KafkaArgs, client_id: &str, message_timeout: Duration) -> anyhow::Result<FutureProducer> {
    client_config(args, client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("message.timeout.ms", message_timeout.as_millis().to_string())
        .create()
        .context("creating the Kafka producer")
}

/// Creates `topic` if it does not exist. An existing topic is left as it is,
/// whatever its partition count.
pub async fn ensure_topic(args: &KafkaArgs, topic: &str, partitions: i32, replication: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(args, "msys-admin").create().context("creating the Kafka admin client")?;
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let new_topic = [NewTopic::new(topic, partitions, TopicReplication::Fixed(replication))];
    let request = admin.create_topics(&new_topic, &options);
    let results = tokio::time::timeout(Duration::from_secs(15), request)
        .await
        .map_err(|_| anyhow::anyhow!("no broker answered within 15 s"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("creating topic {topic} on {}", args.bootstrap_servers()))?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(topic, partitions, replication, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}

/// Topics and their partition counts, as the cluster reports them.
pub async fn list_topics(args: &KafkaArgs, timeout: Duration) -> anyhow::Result<Vec<(String, usize)>> {
    let consumer: BaseConsumer = client_config(args, "msys-admin").create().context("creating a Kafka client")?;
    let servers = args.bootstrap_servers();
    tokio::task::spawn_blocking(move || {
        let metadata =
            consumer.fetch_metadata(None, timeout).with_context(|| format!("fetching metadata from {servers}"))?;
        Ok(metadata.topics().iter().map(|t| (t.name().to_owned(), t.partitions().len())).collect())
    })
    .await?
}

/// Low and high watermarks of every partition of `topic`.
pub async fn watermarks(args: &KafkaArgs, topic: &str, timeout: Duration) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let consumer: BaseConsumer = client_config(args, "msys-admin").create().context("creating a Kafka client")?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        partitions
            .into_iter()
            .map(|p| {
                let (low, high) = consumer.fetch_watermarks(&topic, p, timeout)?;
                Ok((p, low, high))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await?
}
