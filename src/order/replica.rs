//! The order service's replica of users: consumes `user-events` in the
//! consumer group `order-service` and applies each event (see `apply`).
//!
//! Offsets: an offset is stored only after its event's transaction
//! committed (or after a poison record was acknowledged by the dead-letter
//! topic), and only stored offsets are committed, so a crash at any point
//! makes the group re-read from an offset whose effect may or may not be in
//! the database; the event-id check in `apply` makes the second read a
//! no-op. Records of a partition are handled one at a time, in order.
//!
//! Poison: a record that cannot be decoded, or has an unknown `ce_type`,
//! goes to `user-events.dlq` with its key, value and headers plus
//! `dlq_error`, `dlq_topic`, `dlq_partition` and `dlq_offset`, and
//! consumption goes on. Nothing is ever skipped silently: if the DLQ cannot
//! take it, the consumer retries rather than move past it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use deadpool_postgres::Pool;
use rdkafka::{
    ClientContext, Message,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    message::{BorrowedMessage, Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::apply::{self, Origin, Outcome};
use crate::{config::KafkaArgs, events, kafka, metrics::Registry};

#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub group: String,
    pub dlq_topic: String,
}

/// Keeps the `partitions_assigned` gauge true to the group's decisions and
/// records that the consumer has joined its group (an assignment, even an
/// empty one when there are more members than partitions).
pub struct ReplicaContext {
    metrics: Registry,
    joined: Arc<AtomicBool>,
}

impl ClientContext for ReplicaContext {}

impl ConsumerContext for ReplicaContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.joined.store(true, Ordering::Relaxed);
                tracing::info!(partitions = partitions.count(), "partitions assigned");
                self.metrics.set("partitions_assigned", partitions.count() as i64);
            }
            Rebalance::Revoke(_) => {
                tracing::info!("partitions revoked");
                self.metrics.set("partitions_assigned", 0);
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance failed"),
        }
    }
}

pub struct Replica {
    pool: Pool,
    kafka: KafkaArgs,
    settings: ReplicaSettings,
    consumer: StreamConsumer<ReplicaContext>,
    dlq: FutureProducer,
    applied: Arc<Notify>,
    metrics: Registry,
}

impl Replica {
    pub fn new(pool: Pool, kafka: KafkaArgs, settings: ReplicaSettings, metrics: Registry) -> anyhow::Result<Self> {
        let consumer = kafka::client_config(&kafka, "msys-order-replica")
            .set("group.id", &settings.group)
            .set("enable.auto.offset.store", "false")
            // Commits what was stored, every second and when partitions move.
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            // Bounds how long a fetch waits for data: measured here, the
            // broker answers a waiting fetch only when this expires, so it
            // is the floor of the event lag (500 ms by default).
            .set("fetch.wait.max.ms", "50")
            .create_with_context(ReplicaContext { metrics: metrics.clone(), joined: Arc::new(AtomicBool::new(false)) })
            .context("creating the Kafka consumer")?;
        let dlq = kafka::producer(&kafka, "msys-order-dlq", Duration::from_secs(30))?;
        Ok(Replica { pool, kafka, settings, consumer, dlq, applied: Arc::new(Notify::new()), metrics })
    }

    /// Whether the consumer has joined its group at least once.
    pub fn joined(&self) -> Arc<AtomicBool> {
        self.consumer.context().joined.clone()
    }

    /// Rung after every applied event: CreateOrder waits on it for a user
    /// whose creation is still in flight.
    pub fn applied_signal(&self) -> Arc<Notify> {
        self.applied.clone()
    }

    /// Makes sure both topics exist with the configured partition count
    /// before subscribing: subscribing to a missing topic may auto-create it
    /// with the broker's default count.
    async fn ensure_topics(&self, shutdown: &CancellationToken) -> bool {
        let k = &self.kafka;
        let mut delay = Duration::from_millis(200);
        loop {
            let attempt = async {
                let (partitions, replication) = (k.user_events_partitions, k.user_events_replication_factor);
                kafka::ensure_topic(k, &k.user_events_topic, partitions, replication).await?;
                kafka::ensure_topic(k, &self.settings.dlq_topic, partitions, replication).await
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return false,
                result = attempt => result,
            };
            match result {
                Ok(()) => return true,
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "cannot reach Kafka yet; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(5)),
            }
        }
    }

    /// Consumes until `shutdown`; then commits the stored offsets and
    /// leaves the group, so a successor starts exactly where this one ended.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.ensure_topics(&shutdown).await {
            if let Err(error) = self.consumer.subscribe(&[&self.kafka.user_events_topic]) {
                tracing::error!(%error, "cannot subscribe to the user events topic");
            } else {
                self.consume(&shutdown).await;
            }
        }
        let Replica { consumer, .. } = self;
        let left = tokio::task::spawn_blocking(move || {
            if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                // Nothing stored since the last commit is the usual reason.
                tracing::debug!(%error, "final offset commit");
            }
            drop(consumer); // closes the consumer: leaves the group
        })
        .await;
        if left.is_err() {
            tracing::warn!("leaving the consumer group failed");
        }
        tracing::info!("user events consumer stopped");
    }

    async fn consume(&self, shutdown: &CancellationToken) {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = self.consumer.recv() => message,
            };
            match message {
                Ok(message) => {
                    if !self.handle(&message, shutdown).await {
                        return;
                    }
                    if let Err(error) = self.consumer.store_offset_from_message(&message) {
                        // The partition was revoked meanwhile; its new owner
                        // re-reads the record and finds it applied.
                        tracing::warn!(%error, "could not store the offset");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "Kafka consumer error");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    /// Applies or dead-letters one record, retrying until it succeeds.
    /// Returns false if stopped before it did (the offset is not stored).
    async fn handle(&self, message: &BorrowedMessage<'_>, shutdown: &CancellationToken) -> bool {
        let origin =
            Origin { topic: message.topic().to_owned(), partition: message.partition(), offset: message.offset() };
        let mut delay = Duration::from_millis(100);
        loop {
            let done = match events::decode(message) {
                Ok(decoded) => match apply::apply(&self.pool, &decoded, &origin).await {
                    Ok(outcome) => {
                        self.count(outcome, &decoded);
                        true
                    }
                    Err(error) => {
                        tracing::warn!(%error, cause = ?error, ?origin, "applying a user event failed; retrying");
                        false
                    }
                },
                Err(error) => match self.dead_letter(message, &error.to_string()).await {
                    Ok(()) => {
                        tracing::warn!(%error, ?origin, dlq = %self.settings.dlq_topic, "poison record dead-lettered");
                        self.metrics.add("events_dead_lettered_total", 1);
                        true
                    }
                    Err(dlq_error) => {
                        tracing::error!(%error, dlq_error = %format!("{dlq_error:#}"), ?origin, "cannot dead-letter a poison record; retrying");
                        false
                    }
                },
            };
            if done {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(5)),
            }
        }
    }

    fn count(&self, outcome: Outcome, decoded: &events::Decoded) {
        let counter = match outcome {
            Outcome::Applied => "events_applied_total",
            Outcome::Duplicate => "events_duplicate_total",
            Outcome::Stale => "events_stale_total",
        };
        self.metrics.add(counter, 1);
        if let Some(lag) = decoded
            .event
            .occurred_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| t.elapsed().ok())
        {
            self.metrics.set("last_event_lag_ms", lag.as_millis() as i64);
        }
        self.applied.notify_waiters();
    }

    /// Copies a record to the dead-letter topic and waits for the ack.
    async fn dead_letter(&self, message: &BorrowedMessage<'_>, error: &str) -> anyhow::Result<()> {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header { key: header.key, value: header.value });
            }
        }
        let (partition, offset) = (message.partition().to_string(), message.offset().to_string());
        for (key, value) in [
            ("dlq_error", error),
            ("dlq_topic", message.topic()),
            ("dlq_partition", partition.as_str()),
            ("dlq_offset", offset.as_str()),
        ] {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.settings.dlq_topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        self.dlq
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(error, _)| anyhow::Error::new(error))
            .context("sending to the dead-letter topic")?;
        Ok(())
    }
}
