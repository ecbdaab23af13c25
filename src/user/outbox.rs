//! The relay: publishes the outbox to `user-events` and stamps each row
//! published only after the broker acknowledged it.
//!
//! Order: one user's changes serialise on the user's row lock, so their
//! outbox ids grow in commit order, and the relay sends rows by ascending id
//! through an idempotent producer keyed by user id: each user's events reach
//! their partition in commit order. One relay publishes a pass at a time (a
//! transaction-scoped advisory lock elects it): two relays claiming disjoint
//! batches with `SKIP LOCKED` could overtake each other and reorder a user's
//! events.
//!
//! Leadership is bounded: the pass sets `idle_in_transaction_session_timeout`
//! to [`LEADER_IDLE_TIMEOUT`] and, while it awaits the broker, touches its
//! transaction every [`LEADER_HEARTBEAT`]. A leader that freezes (SIGSTOP, a
//! stalled VM) or whose host or network dies mid-pass stops touching it, and
//! PostgreSQL ends its session, and so releases the lock, after at most that
//! timeout; a killed leader's connection closes at once. Another relay takes
//! over at its next poll: the handover takes at most LEADER_IDLE_TIMEOUT +
//! OUTBOX_POLL_INTERVAL.
//!
//! Delivery: at least once, so a record may repeat. A leader that dies or is
//! cut off between the broker's ack and the commit that stamps the rows has
//! them sent again by the next one; consumers deduplicate by `ce_id` and
//! `version` (the order role does).

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use deadpool_postgres::Pool;
use futures::channel::oneshot::Canceled;
use rdkafka::{
    error::KafkaError,
    message::Headers,
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, future_producer::OwnedDeliveryResult},
};
use tokio::sync::Notify;
use tokio_postgres::{IsolationLevel, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::KafkaArgs,
    db::{DbError, col},
    events, kafka,
    metrics::Registry,
    pb,
    trace::{self, TraceContext},
};

/// Key of the advisory lock held by the publishing relay ("msysoutb").
const RELAY_LOCK: i64 = 0x6d73_7973_6f75_7462;

const PENDING: &str = "
SELECT id, event_id, event_type, user_id, user_name, user_email, user_version,
       user_created_at, user_updated_at, occurred_at, traceparent, tracestate
  FROM user_outbox
 WHERE published_at IS NULL AND id > $1
 ORDER BY id
 LIMIT $2";

/// How long a relay pass may sit idle in its transaction before PostgreSQL
/// ends the session and frees the relay lock for another instance.
pub const LEADER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a pass that awaits the broker touches its transaction, so a
/// live leader is never taken for a dead one.
const LEADER_HEARTBEAT: Duration = Duration::from_millis(500);

/// Chunks of `batch_size` rows at the broker at once.
const CHUNKS_IN_FLIGHT: usize = 16;
/// Chunks per pass: the stamps commit at least this often.
const PASS_CHUNKS: usize = 40;

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
}

/// What one pass of the relay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Nothing was waiting.
    Idle,
    /// Another instance holds the relay lock.
    NotLeader,
    /// This many rows were acknowledged and stamped; `failed` were not;
    /// `more`: the pass stopped at its size limit, more rows may wait.
    Published { published: usize, failed: usize, more: bool },
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
    /// The context of the request that made the change.
    trace: TraceContext,
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

    /// Publishes what is pending, up to `PASS_CHUNKS` chunks of
    /// `batch_size` rows, keeping up to `CHUNKS_IN_FLIGHT` chunks at the
    /// broker at once: while one chunk awaits its acks, the next ones are
    /// read and enqueued, so the producer always has records to batch.
    ///
    /// One REPEATABLE READ transaction per pass: every chunk is read from
    /// the same snapshot, so reading on from the last id seen never skips a
    /// row that commits meanwhile and publishes a user's later change
    /// before it (that row waits for the next pass, with everything after
    /// it). Rows are stamped chunk by chunk as their acks arrive, and the
    /// stamps commit with the pass.
    pub async fn relay_once(&mut self) -> anyhow::Result<RelayOutcome> {
        let mut client = self.pool.get().await.context("connecting to the users database")?;
        let tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).start().await?;
        // The timeout first, in the same round trip: a leader frozen right
        // after winning the lock must already be bounded by it, or it would
        // hold the lock for as long as it stays frozen.
        let elect = format!(
            "SET LOCAL idle_in_transaction_session_timeout = {}; SELECT pg_try_advisory_xact_lock({RELAY_LOCK})",
            LEADER_IDLE_TIMEOUT.as_millis()
        );
        let leader = tx
            .simple_query(&elect)
            .await?
            .iter()
            .any(|message| matches!(message, SimpleQueryMessage::Row(row) if row.get(0) == Some("t")));
        if !leader {
            return Ok(RelayOutcome::NotLeader);
        }
        let mut in_flight = VecDeque::new();
        let mut blocked_users = HashSet::new();
        let (mut cursor, mut chunks, mut reading) = (0_i64, 0, true);
        let (mut published, mut failed, mut published_bytes) = (0, 0, 0_usize);
        loop {
            while reading && in_flight.len() < CHUNKS_IN_FLIGHT && chunks < PASS_CHUNKS {
                let rows = tx.query(PENDING, &[&cursor, &self.settings.batch_size]).await?;
                let pending = rows.iter().map(pending_from_row).collect::<Result<Vec<_>, _>>()?;
                chunks += 1;
                reading = pending.len() as i64 == self.settings.batch_size;
                let Some(last) = pending.last() else { break };
                cursor = last.id;
                let (deliveries, sizes, all_enqueued) = self.enqueue(&pending);
                reading &= all_enqueued;
                in_flight.push_back((pending, deliveries, sizes));
            }
            let Some((pending, deliveries, sizes)) = in_flight.pop_front() else { break };
            // Awaiting the acks, the transaction is idle: touch it so that
            // PostgreSQL keeps this (live) leader's session and lock.
            let acks = futures::future::join_all(deliveries);
            tokio::pin!(acks);
            let mut heartbeat = tokio::time::interval(LEADER_HEARTBEAT);
            heartbeat.tick().await;
            let results = loop {
                tokio::select! {
                    results = &mut acks => break results,
                    _ = heartbeat.tick() => { tx.simple_query("SELECT 1").await?; }
                }
            };
            let (stamp, stamp_bytes) = self.publishable(&pending, &sizes, results, &mut blocked_users);
            // The time the chunk's acks arrived (this statement's start), not
            // the pass's start (`now()`): a pass covers up to PASS_CHUNKS
            // chunks, and stamping them all with its first instant made the
            // relay look up to twice as fast as it is to anyone timing it
            // from the stamps (scripts/bench-pipeline.sh does).
            tx.execute("UPDATE user_outbox SET published_at = statement_timestamp() WHERE id = ANY($1)", &[&stamp])
                .await?;
            published_bytes += stamp_bytes;
            published += stamp.len();
            failed += pending.len() - stamp.len();
        }
        if published + failed == 0 {
            return Ok(RelayOutcome::Idle);
        }
        tx.commit().await.context("stamping published outbox rows")?;
        self.metrics.add("events_published_total", published as i64);
        // Key, value and header bytes of the acknowledged records: what the
        // monitor derives "bytes in per second" from (the broker reports none).
        self.metrics.add("events_published_bytes_total", published_bytes as i64);
        self.metrics.add("events_publish_failures_total", failed as i64);
        Ok(RelayOutcome::Published { published, failed, more: reading })
    }

    /// Enqueues the chunk's records in id order; false if the producer
    /// refused one (its queue is full or it is broken): the rest of the
    /// chunk waits for a later pass.
    /// Also returns each enqueued record's size (key, value and headers).
    fn enqueue(&self, pending: &[Pending]) -> (Vec<DeliveryFuture>, Vec<usize>, bool) {
        let mut deliveries = Vec::with_capacity(pending.len());
        let mut sizes = Vec::with_capacity(pending.len());
        let topic = &self.kafka.user_events_topic;
        for row in pending {
            let record = events::encode(&row.event);
            // With traces on, a producer span per record, the record carrying its context;
            // with traces off, a span only for a traced row, so its log lines name its trace.
            let (trace, span) = trace::producer(topic, &record.key, &row.event.event_id, &row.trace);
            let _inside = span.as_ref().map(tracing::Span::enter);
            tracing::debug!(event.id = %row.event.event_id, user.id = row.user_id, "publishing user event");
            let record = record.with_trace(&trace);
            let size = record.key.len()
                + record.payload.len()
                + record.headers.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len)).sum::<usize>();
            let future_record = FutureRecord::to(&self.kafka.user_events_topic)
                .key(&record.key)
                .payload(&record.payload)
                .headers(record.headers);
            match self.producer.send_result(future_record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    sizes.push(size);
                }
                Err((error, _)) => {
                    tracing::warn!(%error, "could not enqueue outbox record");
                    return (deliveries, sizes, false);
                }
            }
        }
        (deliveries, sizes, true)
    }

    /// The ids of the rows that may be stamped: delivered, and with no
    /// earlier undelivered row of the same user in this pass, so a retry can
    /// never put a user's older event after a newer one already stamped.
    /// Also the bytes of their records (`sizes` holds those of the rows that
    /// were enqueued, which come first).
    fn publishable(
        &mut self,
        pending: &[Pending],
        sizes: &[usize],
        results: Vec<Result<OwnedDeliveryResult, Canceled>>,
        blocked_users: &mut HashSet<i64>,
    ) -> (Vec<i64>, usize) {
        let mut publishable = Vec::with_capacity(results.len());
        let mut bytes = 0;
        let results = results.into_iter().map(Some).chain(std::iter::repeat_with(|| None));
        for (index, (row, result)) in pending.iter().zip(results).enumerate() {
            let ok = match result {
                Some(Ok(Ok(_))) => true,
                Some(Ok(Err((error, _)))) => {
                    self.note_failure(&error);
                    false
                }
                Some(Err(_)) | None => false,
            };
            if ok && !blocked_users.contains(&row.user_id) {
                publishable.push(row.id);
                bytes += sizes.get(index).copied().unwrap_or(0);
            } else {
                blocked_users.insert(row.user_id);
            }
        }
        (publishable, bytes)
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
        while !shutdown.is_cancelled() {
            let wait = match self.relay_once().await {
                Ok(RelayOutcome::Published { failed: 0, more: true, .. }) => {
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
    let traceparent: Option<String> = col(row, "traceparent")?;
    let tracestate: Option<String> = col(row, "tracestate")?;
    Ok(Pending {
        id: col(row, "id")?,
        user_id,
        trace: TraceContext::new(traceparent.as_deref(), tracestate.as_deref()),
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
