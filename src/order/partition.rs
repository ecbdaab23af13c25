//! One partition of `user-events`, applied batch by batch by its own task,
//! so that one partition's trouble (a database error on one of its records,
//! a slow batch) never holds the others.
//!
//! A batch is what one poll returned, up to `batch_size` records. Records
//! that do not decode go to the dead-letter topic; the others are applied in
//! one transaction (see `apply`). A transient error retries the same batch
//! with backoff and jitter; a permanent one bisects the batch until the one
//! record that causes it is found and dead-lettered, with its SQLSTATE and
//! message, while its neighbours are applied. Only when every record of the
//! batch is applied or acknowledged by the dead-letter topic is the offset
//! after the batch stored (and committed within a second): a crash at any
//! point re-reads records whose effect may already be committed, and the
//! event-id check makes that second read a no-op.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use deadpool_postgres::Pool;
use futures::FutureExt;
use opentelemetry::trace::TraceContextExt;
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer, stream_consumer::StreamPartitionQueue},
    message::{Header, Headers, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{
    apply::{self, ErrorClass, Event, Outcome},
    arrivals::Arrivals,
    replica::ReplicaContext,
};
use crate::{db::DbError, events, metrics::Registry, trace};

/// How long one batch may take in PostgreSQL before it counts as a
/// transient failure (a deadline) and is tried again.
const APPLY_DEADLINE: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// What the partition tasks, the rebalance callback and the health probe
/// share.
#[derive(Default)]
pub struct Shared {
    /// The consumer has joined its group at least once.
    pub joined: AtomicBool,
    /// Bumped whenever partitions are revoked: a task retrying a batch read
    /// before the bump leaves it to the partition's next owner.
    pub generation: AtomicU64,
    /// Partitions whose batch has been retried for longer than the bound,
    /// and why: while any is here, the OrderService is NOT_SERVING.
    stalled: Mutex<BTreeMap<i32, String>>,
    /// Next offset to apply, per partition this member has read from.
    positions: Mutex<BTreeMap<i32, i64>>,
}

impl Shared {
    /// Why the replica is not keeping up, if it is not.
    pub fn stalled(&self) -> Option<String> {
        let stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        (!stalled.is_empty())
            .then(|| stalled.iter().map(|(p, why)| format!("partition {p}: {why}")).collect::<Vec<_>>().join("; "))
    }

    fn set_stalled(&self, partition: i32, why: Option<String>) -> usize {
        let mut stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        match why {
            Some(why) => stalled.insert(partition, why),
            None => stalled.remove(&partition),
        };
        stalled.len()
    }

    pub fn positions(&self) -> BTreeMap<i32, i64> {
        self.positions.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_position(&self, partition: i32, next: i64, only_if_unknown: bool) {
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        if !only_if_unknown || !positions.contains_key(&partition) {
            positions.insert(partition, next);
        }
    }
}

/// What every partition task needs, cloned into each.
#[derive(Clone)]
pub struct Worker {
    pub pool: Pool,
    pub consumer: Arc<StreamConsumer<ReplicaContext>>,
    pub dlq: FutureProducer,
    pub topic: String,
    pub dlq_topic: String,
    pub batch_size: usize,
    pub stall_after: Duration,
    pub shared: Arc<Shared>,
    /// Told of each user a committed batch applied, to wake the CreateOrder
    /// calls waiting for that user.
    pub arrivals: Arrivals,
    pub metrics: Registry,
}

/// How a batch ended.
enum Done {
    /// Every record applied or dead-lettered: store the offset.
    Complete,
    /// Stopped or revoked before that: store nothing.
    GaveUp,
}

impl Worker {
    /// Applies the partition's records until `shutdown`. Records normally
    /// arrive on the partition's own queue; `fallback` carries any that the
    /// consumer's main queue received instead (fetched before the split).
    pub async fn run(
        self,
        partition: i32,
        queue: Option<StreamPartitionQueue<ReplicaContext>>,
        mut fallback: mpsc::Receiver<OwnedMessage>,
        shutdown: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = fallback.recv() => match message {
                    Some(message) => Ok(message),
                    None => return,
                },
                message = async {
                    match &queue {
                        Some(queue) => queue.recv().await.map(|m| m.detach()),
                        None => std::future::pending().await,
                    }
                } => message,
            };
            let first = match first {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, partition, "Kafka consumer error");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            // The rest of what the last fetch brought, without waiting.
            let mut batch = vec![first];
            while batch.len() < self.batch_size {
                if let Ok(message) = fallback.try_recv() {
                    batch.push(message);
                    continue;
                }
                match queue.as_ref().and_then(|q| q.recv().now_or_never()) {
                    Some(Ok(message)) => batch.push(message.detach()),
                    Some(Err(error)) => {
                        tracing::warn!(%error, partition, "Kafka consumer error");
                        break;
                    }
                    None => break,
                }
            }
            if matches!(self.handle(partition, &batch, &shutdown).await, Done::GaveUp) && shutdown.is_cancelled() {
                return;
            }
        }
    }

    async fn handle(&self, partition: i32, batch: &[OwnedMessage], shutdown: &CancellationToken) -> Done {
        let Some(last) = batch.last() else { return Done::Complete };
        // A consumer span per record (traces on, or the record is traced), ended when this returns.
        let spans = trace::consumer_spans(batch);
        let span_of = |index: usize| spans.get(index).cloned().unwrap_or_else(Span::none);
        let generation = self.shared.generation.load(Ordering::SeqCst);
        self.shared.set_position(partition, batch[0].offset(), true);
        self.metrics.observe("apply_batch_size", batch.len() as f64);

        let mut events = Vec::with_capacity(batch.len());
        let mut sources = Vec::with_capacity(batch.len());
        let mut poison: Vec<(usize, String)> = Vec::new();
        for (index, message) in batch.iter().enumerate() {
            match events::decode(message) {
                Ok(decoded) => {
                    let span = spans.get(index).map(|span| span.context().span().span_context().clone());
                    events.push(Event { decoded, offset: message.offset(), span });
                    sources.push(index);
                }
                Err(error) => poison.push((index, error.to_string())),
            }
        }
        let Some(rejected) = self.apply_isolating(partition, &events, generation, shutdown).await else {
            return Done::GaveUp;
        };
        poison.extend(rejected.into_iter().map(|(i, why)| (sources[i], why)));
        poison.sort_by_key(|(index, _)| *index);
        for (index, why) in &poison {
            let dead_letter = self.dead_letter_retrying(&batch[*index], why, generation, shutdown);
            if !dead_letter.instrument(span_of(*index)).await {
                return Done::GaveUp;
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (index, message) in batch.iter().enumerate().filter(|(i, _)| !poison.iter().any(|(p, _)| p == i)) {
                let _inside = span_of(index).entered();
                tracing::debug!(partition, offset = message.offset(), "applied user event");
            }
        }
        if let Err(error) = self.consumer.store_offset(&self.topic, partition, last.offset()) {
            // The partition was revoked meanwhile; its new owner re-reads
            // the batch and finds it applied.
            tracing::info!(%error, partition, "could not store the offset");
        }
        self.shared.set_position(partition, last.offset() + 1, false);
        Done::Complete
    }

    /// Applies `events`, splitting around records that fail permanently.
    /// Returns those records (index into `events`) with the reason, or None
    /// if it gave up (stopped, or the partition was revoked).
    async fn apply_isolating(
        &self,
        partition: i32,
        events: &[Event],
        generation: u64,
        shutdown: &CancellationToken,
    ) -> Option<Vec<(usize, String)>> {
        let mut rejected = Vec::new();
        let mut ranges = vec![(0, events.len())];
        while let Some((lo, hi)) = ranges.pop() {
            if lo == hi {
                continue;
            }
            match self.apply_retrying(partition, &events[lo..hi], generation, shutdown).await? {
                Ok(()) => {}
                Err(error) if hi - lo == 1 => {
                    let why = apply::describe(&error);
                    let offset = events[lo].offset;
                    tracing::warn!(partition, offset, error = %why, "a user event cannot be applied; dead-lettering it");
                    rejected.push((lo, why));
                }
                Err(_) => {
                    // Left half first: one user's events stay in order.
                    let mid = lo + (hi - lo) / 2;
                    ranges.push((mid, hi));
                    ranges.push((lo, mid));
                }
            }
        }
        Some(rejected)
    }

    /// Applies one slice in one transaction, retrying transient errors.
    /// Some(Err) is a permanent error; None means it gave up.
    async fn apply_retrying(
        &self,
        partition: i32,
        events: &[Event],
        generation: u64,
        shutdown: &CancellationToken,
    ) -> Option<Result<(), DbError>> {
        let mut delay = FIRST_RETRY;
        let mut failing_since: Option<Instant> = None;
        let mut stalled = false;
        loop {
            let attempt =
                tokio::time::timeout(APPLY_DEADLINE, apply::apply_batch(&self.pool, &self.topic, partition, events))
                    .await;
            let why = match attempt {
                Ok(Ok(outcomes)) => {
                    // Committed: a call woken now finds the user's row.
                    self.count(events, &outcomes);
                    self.announce(events, &outcomes);
                    if stalled {
                        let left = self.shared.set_stalled(partition, None);
                        self.metrics.set("replica_stalled_partitions", left as i64);
                        tracing::info!(partition, "the partition is applied again");
                    }
                    return Some(Ok(()));
                }
                Ok(Err(error)) if apply::classify(&error) == ErrorClass::Permanent => {
                    if stalled {
                        let left = self.shared.set_stalled(partition, None);
                        self.metrics.set("replica_stalled_partitions", left as i64);
                    }
                    return Some(Err(error));
                }
                Ok(Err(error)) => apply::describe(&error),
                Err(_) => format!("the batch did not commit within {APPLY_DEADLINE:?}"),
            };
            self.metrics.add("events_apply_retries_total", 1);
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.stall_after && !stalled {
                stalled = true;
                let reason = format!(
                    "retrying a batch at offset {} for {:?}: {why}",
                    events.first().map_or(-1, |e| e.offset),
                    since.elapsed()
                );
                tracing::warn!(partition, %reason, "the replica is stuck on a partition: OrderService NOT_SERVING");
                let count = self.shared.set_stalled(partition, Some(reason));
                self.metrics.set("replica_stalled_partitions", count as i64);
            } else if delay == FIRST_RETRY {
                tracing::warn!(partition, error = %why, "applying user events failed; retrying");
            } else {
                tracing::debug!(partition, error = %why, "applying user events failed again; retrying");
            }
            if self.shared.generation.load(Ordering::SeqCst) != generation {
                tracing::info!(partition, "partitions moved while retrying; the batch goes to their owner");
                if stalled {
                    let left = self.shared.set_stalled(partition, None);
                    self.metrics.set("replica_stalled_partitions", left as i64);
                }
                return None;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(jitter(delay)) => delay = (delay * 2).min(MAX_RETRY),
            }
        }
    }

    fn count(&self, events: &[Event], outcomes: &[Outcome]) {
        let now = SystemTime::now();
        let (mut applied, mut duplicate, mut stale) = (0, 0, 0);
        for (event, outcome) in events.iter().zip(outcomes) {
            match outcome {
                Outcome::Applied => applied += 1,
                Outcome::Duplicate => duplicate += 1,
                Outcome::Stale => stale += 1,
            }
            if *outcome != Outcome::Duplicate
                && let Some(lag) = event
                    .decoded
                    .event
                    .occurred_at
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .and_then(|t| now.duration_since(t).ok())
            {
                self.metrics.observe("event_apply_lag_seconds", lag.as_secs_f64());
                self.metrics.set("last_event_lag_ms", lag.as_millis() as i64);
            }
        }
        self.metrics.add("events_applied_total", applied);
        self.metrics.add("events_duplicate_total", duplicate);
        self.metrics.add("events_stale_total", stale);
    }

    /// Rings the bell of each user whose event this committed batch applied
    /// (created, updated or deleted: a call waiting for a deleted user is
    /// answered at once too), passing the apply's span. Calls waiting for
    /// other users sleep on.
    fn announce(&self, events: &[Event], outcomes: &[Outcome]) {
        for (event, outcome) in events.iter().zip(outcomes) {
            if *outcome == Outcome::Applied {
                self.arrivals.arrived(event.decoded.user.id, event.span.as_ref());
            }
        }
    }

    /// Dead-letters one record, retrying until the DLQ acknowledges it.
    /// Nothing is ever skipped silently. False if it gave up.
    async fn dead_letter_retrying(
        &self,
        message: &OwnedMessage,
        why: &str,
        generation: u64,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut delay = FIRST_RETRY;
        loop {
            match self.dead_letter(message, why).await {
                Ok(()) => {
                    let (partition, offset) = (message.partition(), message.offset());
                    tracing::warn!(partition, offset, error = why, dlq = %self.dlq_topic, "poison record dead-lettered");
                    self.metrics.add("events_dead_lettered_total", 1);
                    return true;
                }
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), partition = message.partition(),
                        offset = message.offset(), "cannot dead-letter a poison record; retrying");
                }
            }
            if self.shared.generation.load(Ordering::SeqCst) != generation {
                return false;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(jitter(delay)) => delay = (delay * 2).min(MAX_RETRY),
            }
        }
    }

    /// Copies a record to the dead-letter topic and waits for the ack.
    async fn dead_letter(&self, message: &OwnedMessage, error: &str) -> anyhow::Result<()> {
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
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.dlq_topic).headers(headers);
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

/// `delay` scaled by a random factor in [0.5, 1]: members retrying after
/// the same outage do not all come back in the same instant.
fn jitter(delay: Duration) -> Duration {
    let random = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
    delay / 2 + delay * random / 2000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_the_whole_delay() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000), "{d:?}");
        }
    }
}
