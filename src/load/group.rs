//! The consumer-group scenario: K extra consumers join a throwaway group on
//! the event topic and read it from the beginning. It measures how long the
//! group took to join and balance (until every partition is assigned), the
//! consuming throughput, and the time to drain the lag (every partition read
//! up to the high watermark it had at the start); then it closes the members
//! and deletes the group, so it leaves nothing behind on the broker.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use rdkafka::{
    Message,
    admin::{AdminClient, AdminOptions},
    client::DefaultClientContext,
    consumer::{Consumer, StreamConsumer},
};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{LoadError, run::Progress};
use crate::{config::KafkaArgs, kafka};

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GroupReport {
    pub group: String,
    pub topic: String,
    pub members: usize,
    pub partitions: usize,
    /// Records between the low and high watermarks at the start.
    pub lag_at_start: i64,
    /// From the first subscribe until every partition had an owner.
    pub join_ms: Option<f64>,
    /// From full assignment until every partition was read to its start watermark.
    pub drain_ms: Option<f64>,
    pub records: u64,
    pub records_per_s: f64,
    pub drained: bool,
    pub deleted: bool,
    /// Why the group could not be deleted, if it could not.
    pub delete_error: Option<String>,
}

/// Runs the scenario for at most `limit`.
pub async fn run(
    kafka_args: &KafkaArgs,
    members: usize,
    run_id: &str,
    limit: Duration,
    progress: Option<mpsc::Sender<Progress>>,
    cancel: CancellationToken,
) -> Result<(GroupReport, bool), LoadError> {
    let topic = kafka_args.user_events_topic.clone();
    let group = format!("msys-load-{run_id}");
    let marks = kafka::watermarks(kafka_args, &topic, Duration::from_secs(10)).await.map_err(|e| {
        LoadError::NotReady(format!("the broker at {} did not answer: {e:#}", kafka_args.bootstrap_servers()))
    })?;
    if marks.is_empty() {
        return Err(LoadError::invalid("topic", format!("topic {topic} has no partitions (does it exist?)")));
    }
    let targets: BTreeMap<i32, i64> = marks.iter().map(|&(p, _, high)| (p, high)).collect();
    let mut report = GroupReport {
        group: group.clone(),
        topic: topic.clone(),
        members,
        partitions: marks.len(),
        lag_at_start: marks.iter().map(|&(_, low, high)| high - low).sum(),
        ..GroupReport::default()
    };
    let mut consumers = Vec::with_capacity(members);
    for n in 0..members {
        let consumer: StreamConsumer = kafka::client_config(kafka_args, &format!("{group}-{n}"))
            .set("group.id", &group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|e| LoadError::Unexpected(anyhow::anyhow!("creating consumer {n}: {e}")))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| LoadError::Unexpected(anyhow::anyhow!("subscribing to {topic}: {e}")))?;
        consumers.push(Arc::new(consumer));
    }
    let start = Instant::now();
    let deadline = start + limit;
    // Next offset to read per partition, and records read.
    let positions: Arc<Mutex<(BTreeMap<i32, i64>, u64)>> = Arc::default();
    let stop = CancellationToken::new();
    let mut readers = tokio::task::JoinSet::new();
    for consumer in &consumers {
        let (consumer, positions, stop) = (consumer.clone(), positions.clone(), stop.clone());
        readers.spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = consumer.recv() => m,
                };
                if let Ok(message) = message {
                    let mut guard = positions.lock().unwrap_or_else(|p| p.into_inner());
                    let next = guard.0.entry(message.partition()).or_insert(0);
                    *next = (*next).max(message.offset() + 1);
                    guard.1 += 1;
                }
            }
        });
    }
    let mut joined_at = None;
    let mut first_record = None;
    let mut cancelled = false;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut last_progress = start;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => { cancelled = true; break; }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if joined_at.is_none() {
            let mut owned = HashSet::new();
            for consumer in &consumers {
                if let Ok(list) = consumer.assignment() {
                    owned.extend(list.elements().iter().map(|e| e.partition()));
                }
            }
            if targets.keys().all(|p| owned.contains(p)) {
                joined_at = Some(now);
                report.join_ms = Some((now - start).as_secs_f64() * 1000.0);
            }
        }
        let (read, drained) = {
            let guard = positions.lock().unwrap_or_else(|p| p.into_inner());
            let drained = targets.iter().all(|(p, &high)| high == 0 || guard.0.get(p).copied().unwrap_or(0) >= high);
            (guard.1, drained)
        };
        if read > 0 && first_record.is_none() {
            first_record = Some(now);
        }
        if let Some(progress) = &progress
            && now - last_progress >= Duration::from_secs(1)
        {
            last_progress = now;
            let _ = progress.try_send(Progress {
                elapsed_s: (now - start).as_secs_f64(),
                total_s: limit.as_secs_f64(),
                requests: read,
                ..Progress::default()
            });
        }
        if let Some(joined) = joined_at
            && drained
        {
            report.drained = true;
            report.drain_ms = Some((now - joined).as_secs_f64() * 1000.0);
            break;
        }
    }
    stop.cancel();
    while readers.join_next().await.is_some() {}
    let (read, end) = (positions.lock().unwrap_or_else(|p| p.into_inner()).1, Instant::now());
    report.records = read;
    let reading = first_record.map_or(Duration::ZERO, |first| end - first).as_secs_f64();
    report.records_per_s = if reading > 0.0 { read as f64 / reading } else { 0.0 };
    // Leave the group before deleting it: a group with members cannot be deleted.
    for consumer in &consumers {
        consumer.unsubscribe();
    }
    // Closing a consumer leaves the group synchronously: off the runtime.
    let _ = tokio::task::spawn_blocking(move || drop(consumers)).await;
    match delete_group(kafka_args, &group).await {
        Ok(()) => report.deleted = true,
        Err(e) => report.delete_error = Some(format!("{e:#}")),
    }
    Ok((report, cancelled))
}

/// Deletes `group`, retrying while the broker still sees its members leave.
pub async fn delete_group(kafka_args: &KafkaArgs, group: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka::client_config(kafka_args, "msys-load-admin").create()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    let mut last = String::new();
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_secs(10), admin.delete_groups(&[group], &options)).await {
            Ok(Ok(results)) => match results.into_iter().next() {
                Some(Ok(_)) | None => return Ok(()),
                Some(Err((_, code))) => last = code.to_string(),
            },
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer within 10 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("deleting consumer group {group}: {last}")
}
