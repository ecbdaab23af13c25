//! The order service's replica of users: consumes `user-events` in the
//! consumer group `order-service` and applies it partition by partition,
//! each partition in its own task on its own rdkafka queue
//! (`split_partition_queue`), batch by batch (see `partition` and `apply`).
//!
//! The main consumer queue serves the group protocol (joins, heartbeats,
//! rebalances); a record that still arrives there (fetched before its
//! partition was split off) is handed to that partition's task, in order.
//!
//! Offsets: only stored offsets are committed (every second, and on
//! rebalance and shutdown), and a partition task stores an offset only after
//! the batch before it committed or was dead-lettered.
//!
//! Failover: a member that dies is noticed after `session.timeout.ms`; the
//! survivors learn of the rebalance at their next heartbeat and rejoin at
//! once, because the main queue is always being served. See
//! `config/msys.env.example` for the defaults and the measured figure.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use deadpool_postgres::Pool;
use rdkafka::{
    ClientContext, Message,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    message::OwnedMessage,
    producer::FutureProducer,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    arrivals::Arrivals,
    partition::{Shared, Worker},
};
use crate::{config::KafkaArgs, kafka, metrics::Registry};

#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub group: String,
    pub dlq_topic: String,
    /// Most records applied in one transaction.
    pub batch_size: usize,
    /// `fetch.wait.max.ms`: how long the broker may hold a fetch that has
    /// no data yet.
    pub fetch_wait_max: Duration,
    pub session_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// `group.instance.id` (static membership), if set.
    pub group_instance_id: Option<String>,
    /// How long a batch may be retried before readiness drops.
    pub stall_after: Duration,
}

/// Keeps the `partitions_assigned` gauge true to the group's decisions,
/// records that the consumer has joined its group (an assignment, even an
/// empty one when there are more members than partitions), and tells the
/// partition tasks when partitions move.
pub struct ReplicaContext {
    metrics: Registry,
    shared: Arc<Shared>,
}

impl ClientContext for ReplicaContext {}

impl ConsumerContext for ReplicaContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.shared.joined.store(true, Ordering::Relaxed);
                let ids: Vec<i32> = partitions.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?ids, "partitions assigned");
                self.metrics.set("partitions_assigned", partitions.count() as i64);
            }
            Rebalance::Revoke(_) => {
                self.shared.generation.fetch_add(1, Ordering::SeqCst);
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
    consumer: Arc<StreamConsumer<ReplicaContext>>,
    dlq: FutureProducer,
    arrivals: Arrivals,
    shared: Arc<Shared>,
    metrics: Registry,
}

impl Replica {
    /// A replica that tells `arrivals` of every user it applies.
    pub fn new(
        pool: Pool,
        kafka: KafkaArgs,
        settings: ReplicaSettings,
        arrivals: Arrivals,
        metrics: Registry,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        let mut config = kafka::client_config(&kafka, "msys-order-replica");
        config
            .set("group.id", &settings.group)
            .set("enable.auto.offset.store", "false")
            // Commits what was stored, every second and when partitions move.
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", settings.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", settings.heartbeat_interval.as_millis().to_string())
            // See ORDER_FETCH_WAIT_MAX in config/msys.env.example: nisshi
            // answers a fetch with no data only when this expires.
            .set("fetch.wait.max.ms", settings.fetch_wait_max.as_millis().to_string());
        if let Some(id) = &settings.group_instance_id {
            config.set("group.instance.id", id);
        }
        let consumer = config
            .create_with_context(ReplicaContext { metrics: metrics.clone(), shared: shared.clone() })
            .context("creating the Kafka consumer")?;
        let dlq = kafka::producer(&kafka, "msys-order-dlq", Duration::from_secs(30))?;
        Ok(Replica { pool, kafka, settings, consumer: Arc::new(consumer), dlq, arrivals, shared, metrics })
    }

    /// Joined, and why not keeping up, for the readiness probe.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Makes sure both topics exist with the configured partition count
    /// before subscribing: subscribing to a missing topic may auto-create it
    /// with the broker's default count. Returns the topic's partition count.
    async fn ensure_topics(&self, shutdown: &CancellationToken) -> Option<i32> {
        let k = &self.kafka;
        let mut delay = Duration::from_millis(200);
        loop {
            let attempt = async {
                let (partitions, replication) = (k.user_events_partitions, k.user_events_replication_factor);
                kafka::ensure_topic(k, &k.user_events_topic, partitions, replication).await?;
                kafka::ensure_topic(k, &self.settings.dlq_topic, partitions, replication).await?;
                let consumer = self.consumer.clone();
                let topic = k.user_events_topic.clone();
                tokio::task::spawn_blocking(move || {
                    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
                    let count = metadata.topics().iter().map(|t| t.partitions().len()).sum::<usize>();
                    anyhow::Ok(i32::try_from(count)?)
                })
                .await?
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return None,
                result = attempt => result,
            };
            match result {
                Ok(count) if count > 0 => return Some(count),
                Ok(_) => tracing::warn!("the user events topic has no partitions yet; retrying"),
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "cannot reach Kafka yet; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(5)),
            }
        }
    }

    /// Consumes until `shutdown`; then lets the partition tasks finish their
    /// batch, commits the stored offsets and leaves the group, so a
    /// successor starts exactly where this one ended.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Some(partitions) = self.ensure_topics(&shutdown).await {
            let tasks = TaskTracker::new();
            let stop = CancellationToken::new();
            let mut routes = HashMap::new();
            for partition in 0..partitions {
                routes.insert(partition, self.spawn_partition(&tasks, partition, &stop));
            }
            tasks.spawn(lag_reporter(self.consumer.clone(), self.kafka.clone(), self.shared.clone(), stop.clone()));
            if let Err(error) = self.consumer.subscribe(&[&self.kafka.user_events_topic]) {
                tracing::error!(%error, "cannot subscribe to the user events topic");
            } else {
                self.serve_group(&shutdown, &tasks, &stop, &mut routes).await;
            }
            stop.cancel();
            drop(routes);
            tasks.close();
            tasks.wait().await;
        }
        let Replica { consumer, .. } = self;
        let left = tokio::task::spawn_blocking(move || {
            if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                // Nothing stored since the last commit is the usual reason.
                tracing::debug!(%error, "final offset commit");
            }
            match Arc::try_unwrap(consumer) {
                Ok(consumer) => drop(consumer), // closes the consumer: leaves the group
                Err(_) => tracing::warn!("the consumer is still shared; leaving the group when it drops"),
            }
        })
        .await;
        if left.is_err() {
            tracing::warn!("leaving the consumer group failed");
        }
        tracing::info!("user events consumer stopped");
    }

    fn spawn_partition(
        &self,
        tasks: &TaskTracker,
        partition: i32,
        stop: &CancellationToken,
    ) -> mpsc::Sender<OwnedMessage> {
        let queue = self.consumer.split_partition_queue(&self.kafka.user_events_topic, partition);
        if queue.is_none() {
            tracing::warn!(partition, "cannot split off the partition's queue; its records come through the main one");
        }
        let (sender, receiver) = mpsc::channel(1024);
        let worker = Worker {
            pool: self.pool.clone(),
            consumer: self.consumer.clone(),
            dlq: self.dlq.clone(),
            topic: self.kafka.user_events_topic.clone(),
            dlq_topic: self.settings.dlq_topic.clone(),
            batch_size: self.settings.batch_size,
            stall_after: self.settings.stall_after,
            shared: self.shared.clone(),
            arrivals: self.arrivals.clone(),
            metrics: self.metrics.clone(),
        };
        tasks.spawn(worker.run(partition, queue, receiver, stop.clone()));
        sender
    }

    /// Serves the main queue until `shutdown`: group events, and records of
    /// partitions not (yet) split off, routed to their partition's task.
    async fn serve_group(
        &self,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
        stop: &CancellationToken,
        routes: &mut HashMap<i32, mpsc::Sender<OwnedMessage>>,
    ) {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = self.consumer.recv() => message,
            };
            match message {
                Ok(message) => {
                    let partition = message.partition();
                    let message = message.detach();
                    tracing::debug!(partition, offset = message.offset(), "record on the main queue");
                    let route = routes.entry(partition).or_insert_with(|| self.spawn_partition(tasks, partition, stop));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        sent = route.send(message) => if sent.is_err() { return },
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
}

/// Every two seconds: each assigned partition's applied position and how
/// many records lie beyond it (`consumer_position`, `consumer_lag_records`).
async fn lag_reporter(
    consumer: Arc<StreamConsumer<ReplicaContext>>,
    kafka: KafkaArgs,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let metrics = consumer.context().metrics.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (consumer, topic, positions) = (consumer.clone(), kafka.user_events_topic.clone(), shared.positions());
        let marks = tokio::task::spawn_blocking(move || {
            let assigned = consumer.assignment().ok()?;
            let mut marks = Vec::new();
            for element in assigned.elements() {
                let partition = element.partition();
                if let Ok((_, high)) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(1)) {
                    marks.push((partition, high));
                }
            }
            Some(marks)
        })
        .await;
        let Ok(Some(marks)) = marks else { continue };
        for (partition, high) in marks {
            let Some(position) = positions.get(&partition).copied() else { continue };
            let labels = [("partition", partition.to_string())];
            metrics.set_labeled("consumer_position", &labels, position);
            metrics.set_labeled("consumer_lag_records", &labels, (high - position).max(0));
        }
    }
}
