//! The relay: publishes the outbox to `user-events` and stamps each row
//! published only after the broker acknowledged it.
//!
//! Order: one user's changes serialise on the user's row lock, so their
//! outbox ids grow in commit order, and the relay sends rows by ascending id
//! through an idempotent producer keyed by user id: each user's events reach
//! their partition in commit order. Only one relay publishes at a time (a
//! transaction-scoped advisory lock elects it): two relays claiming disjoint
//! batches with `SKIP LOCKED` could overtake each other and reorder a user's
//! events.
//!
//! Delivery: at least once. A crash between the broker's ack and the commit
//! that stamps the rows sends them again; consumers deduplicate by `ce_id`.

use std::{collections::HashSet, sync::Arc, time::Duration};

use anyhow::Context;
use deadpool_postgres::Pool;
use rdkafka::{
    error::KafkaError,
    producer::{FutureProducer, FutureRecord, Producer},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::KafkaArgs,
    db::{DbError, col},
    events, kafka,
    metrics::Registry,
    pb,
};

/// Key of the advisory lock held by the publishing relay ("msysoutb").
const RELAY_LOCK: i64 = 0x6d73_7973_6f75_7462;

const PENDING: &str = "
SELECT id, event_id, event_type, user_id, user_name, user_email, user_version,
       user_created_at, user_updated_at, occurred_at
  FROM user_outbox
 WHERE published_at IS NULL
 ORDER BY id
 LIMIT $1";

/// How the relay behaves; see `RelayArgs` for the knobs.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub batch_size: i64,
    /// How often to look for rows written by other instances; rows written
    /// by this process wake the relay at once.
    pub poll_interval: Duration,
    /// How long the producer keeps retrying a record before giving up on it
    /// (the row then stays unpublished and is retried by a later batch).
    pub message_timeout: Duration,
    /// Published rows are kept this long for inspection, then deleted.
    pub retention: Duration,
}

/// What one pass of the relay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Nothing was waiting.
    Idle,
    /// Another instance holds the relay lock.
    NotLeader,
    /// This many rows were acknowledged and stamped; `failed` were not.
    Published { published: usize, failed: usize },
}

pub struct Relay {
    pool: Pool,
    kafka: KafkaArgs,
    producer: FutureProducer,
    settings: RelaySettings,
    wake: Arc<Notify>,
    metrics: Registry,
}

/// One outbox row turned into the event it announces.
struct Pending {
    id: i64,
    user_id: i64,
    event: pb::UserEvent,
}

impl Relay {
    pub fn new(pool: Pool, kafka: KafkaArgs, settings: RelaySettings, metrics: Registry) -> anyhow::Result<Self> {
        let producer = kafka::producer(&kafka, "msys-user-relay", settings.message_timeout)?;
        Ok(Relay { pool, kafka, producer, settings, wake: Arc::new(Notify::new()), metrics })
    }

    /// Handed to the RPC handlers: they ring it after each committed change.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publishes at most one batch.
    pub async fn relay_once(&mut self) -> anyhow::Result<RelayOutcome> {
        let mut client = self.pool.get().await.context("connecting to the users database")?;
        let tx = client.transaction().await?;
        let leader: bool = tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RELAY_LOCK]).await?.try_get(0)?;
        if !leader {
            return Ok(RelayOutcome::NotLeader);
        }
        let rows = tx.query(PENDING, &[&self.settings.batch_size]).await?;
        if rows.is_empty() {
            return Ok(RelayOutcome::Idle);
        }
        let pending = rows.iter().map(pending_from_row).collect::<Result<Vec<_>, _>>()?;
        let delivered = self.send_in_order(&pending).await;
        let published: Vec<i64> = delivered.iter().map(|p| p.id).collect();
        tx.execute("UPDATE user_outbox SET published_at = now() WHERE id = ANY($1)", &[&published]).await?;
        tx.commit().await.context("stamping published outbox rows")?;
        let failed = pending.len() - published.len();
        self.metrics.add("events_published_total", published.len() as i64);
        self.metrics.add("events_publish_failures_total", failed as i64);
        Ok(RelayOutcome::Published { published: published.len(), failed })
    }

    /// Enqueues every record in id order, then awaits the acknowledgements.
    /// Returns the rows that may be stamped: delivered, and with no earlier
    /// undelivered row of the same user, so a retry can never put a user's
    /// older event after a newer one that was already stamped.
    async fn send_in_order<'a>(&mut self, pending: &'a [Pending]) -> Vec<&'a Pending> {
        let encoded: Vec<events::EncodedRecord> = pending.iter().map(|p| events::encode(&p.event)).collect();
        let mut deliveries = Vec::with_capacity(pending.len());
        for record in &encoded {
            let future_record = FutureRecord::to(&self.kafka.user_events_topic)
                .key(&record.key)
                .payload(&record.payload)
                .headers(record.headers.clone());
            match self.producer.send_result(future_record) {
                Ok(delivery) => deliveries.push(delivery),
                // The local queue is full or the producer is broken: stop
                // here, keep what was enqueued, retry the rest later.
                Err((error, _)) => {
                    tracing::warn!(%error, "could not enqueue outbox record");
                    break;
                }
            }
        }
        let results = futures::future::join_all(deliveries).await;
        let mut blocked_users = HashSet::new();
        let mut publishable = Vec::with_capacity(results.len());
        for (row, result) in pending.iter().zip(results.iter().map(Some).chain(std::iter::repeat(None))) {
            let ok = match result {
                Some(Ok(Ok(_))) => true,
                Some(Ok(Err((error, _)))) => {
                    self.note_failure(error);
                    false
                }
                Some(Err(_)) | None => false,
            };
            if ok && !blocked_users.contains(&row.user_id) {
                publishable.push(row);
            } else {
                blocked_users.insert(row.user_id);
            }
        }
        publishable
    }

    fn note_failure(&mut self, error: &KafkaError) {
        tracing::warn!(%error, "broker did not acknowledge an outbox record; it will be sent again");
        // An idempotent producer can enter a fatal state (e.g. fenced after
        // a sequence gap); it accepts nothing more, so replace it.
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::error!(?code, reason, "Kafka producer failed fatally; creating a new one");
            match kafka::producer(&self.kafka, "msys-user-relay", self.settings.message_timeout) {
                Ok(producer) => self.producer = producer,
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "could not recreate the producer")
                }
            }
        }
    }

    /// Deletes published rows older than the retention period.
    async fn prune(&self) -> anyhow::Result<u64> {
        let client = self.pool.get().await?;
        let cutoff = std::time::SystemTime::now() - self.settings.retention;
        Ok(client
            .execute("DELETE FROM user_outbox WHERE published_at IS NOT NULL AND published_at < $1", &[&cutoff])
            .await?)
    }

    /// Makes sure the topic exists, retrying until it does. The topic must
    /// exist with the configured partition count before the first event: a
    /// broker that auto-creates topics would pick its own count. Until then
    /// the outbox simply holds the events.
    async fn ensure_topic(&self, shutdown: &CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        let k = &self.kafka;
        loop {
            let attempt = kafka::ensure_topic(
                k,
                &k.user_events_topic,
                k.user_events_partitions,
                k.user_events_replication_factor,
            );
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = attempt => result,
            };
            match result {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "cannot make sure the topic exists yet; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff_step(&mut backoff)) => {}
            }
        }
    }

    /// Publishes until `shutdown`, then flushes the producer.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.ensure_topic(&shutdown).await;
        let mut backoff = Duration::from_millis(100);
        let mut last_prune = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            let wait = match self.relay_once().await {
                Ok(RelayOutcome::Published { published, failed: 0 })
                    if published as i64 >= self.settings.batch_size =>
                {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(RelayOutcome::Published { failed: 0, .. }) | Ok(RelayOutcome::Idle) => {
                    backoff = Duration::from_millis(100);
                    self.settings.poll_interval
                }
                Ok(RelayOutcome::NotLeader) => self.settings.poll_interval,
                Ok(RelayOutcome::Published { .. }) => backoff_step(&mut backoff),
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "outbox relay pass failed; retrying");
                    backoff_step(&mut backoff)
                }
            };
            if last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = tokio::time::Instant::now();
                match self.prune().await {
                    Ok(n) if n > 0 => tracing::info!(deleted = n, "pruned published outbox rows"),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(error = %format!("{error:#}"), "pruning the outbox failed")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let producer = self.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("producer did not flush within 5 s; unstamped rows will be sent on next start");
        }
    }
}

/// Doubles the backoff up to 5 s and returns the delay to wait now.
fn backoff_step(backoff: &mut Duration) -> Duration {
    let now = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    now
}

fn pending_from_row(row: &tokio_postgres::Row) -> Result<Pending, DbError> {
    let ts = |name: &str| -> Result<Option<prost_types::Timestamp>, DbError> {
        let time: std::time::SystemTime = col(row, name)?;
        Ok(Some(time.into()))
    };
    let event_id: Uuid = col(row, "event_id")?;
    let user_id: i64 = col(row, "user_id")?;
    Ok(Pending {
        id: col(row, "id")?,
        user_id,
        event: pb::UserEvent {
            event_id: event_id.to_string(),
            r#type: col(row, "event_type")?,
            user: Some(pb::User {
                id: user_id,
                name: col(row, "user_name")?,
                email: col(row, "user_email")?,
                version: col(row, "user_version")?,
                created_at: ts("user_created_at")?,
                updated_at: ts("user_updated_at")?,
            }),
            occurred_at: ts("occurred_at")?,
        },
    })
}
