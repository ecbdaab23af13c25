//! The Kafka collector: the topic's watermarks, the group's committed offsets
//! and the DLQ's size, read from the broker each tick; lag in records and in
//! seconds per partition; and the Burrow-style status from [`status`].
//!
//! Derivations:
//! - lag (records) = max(0, high watermark − committed offset), both read in
//!   the same probe, moments apart (kminion #27: reading them far apart gives
//!   false zeros);
//! - lag (seconds) = now − timestamp of the record at the committed offset,
//!   read with a consumer of the monitor's own (no group membership, no
//!   commits); when that record cannot be read, the moment the high
//!   watermark passed the committed offset is interpolated from the
//!   monitor's own (high watermark, time) samples, as kafka-lag-exporter's
//!   LookupTable does. The record's timestamp is the producer's CreateTime:
//!   when the user role's relay published it;
//! - messages per second = sum of the high watermark deltas / interval.
//!
//! librdkafka's calls block, so a probe runs on the blocking pool with a
//! deadline on every call; a probe still running when the next tick comes is
//! not doubled: that tick gives a stale sample saying so.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};

use super::status::{self, Rules, Sample};
use crate::{config::KafkaArgs, kafka::client_config, pb};

/// (high watermark, unix ms) points kept per partition for interpolation.
const LOOKUP_POINTS: usize = 900;

/// What one probe read from the broker.
#[derive(Debug, Default, Clone)]
pub struct Raw {
    /// (partition, low, high, committed).
    pub partitions: Vec<(i32, i64, i64, Option<i64>)>,
    pub dlq_records: Option<i64>,
    /// Unix ms of the record at the committed offset, for the partitions with lag.
    pub timestamps: HashMap<i32, i64>,
}

struct Clients {
    /// Metadata, watermarks and the group's committed offsets (its group.id
    /// is the watched group's; it never subscribes, so it never joins).
    group: BaseConsumer,
    /// Reads the record at a committed offset; a group of its own, never commits.
    reader: BaseConsumer,
}

#[derive(Default)]
struct PartitionState {
    window: VecDeque<Sample>,
    committed: Option<i64>,
    moved_at: f64,
    /// kafka-lag-exporter's lookup table: (high watermark, unix ms), the
    /// latest time each watermark was seen.
    lookup: VecDeque<(i64, i64)>,
    status: Option<pb::PartitionLag>,
}

pub struct KafkaTarget {
    topic: String,
    group: String,
    dlq_topic: String,
    servers: String,
    clients: Arc<Mutex<Clients>>,
    busy: Arc<AtomicBool>,
    rules: Rules,
    origin: Instant,
    partitions: BTreeMap<i32, PartitionState>,
    prev_total: Option<(Instant, i64)>,
    lag_history: VecDeque<(f64, i64)>,
    last: Option<pb::KafkaStatus>,
}

impl KafkaTarget {
    pub fn new(args: &KafkaArgs, group: &str, dlq_topic: &str, rules: Rules) -> anyhow::Result<Self> {
        let group_client: BaseConsumer = client_config(args, "msys-monitor")
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .context("creating the monitor's Kafka client")?;
        let reader: BaseConsumer = client_config(args, "msys-monitor-reader")
            .set("group.id", format!("msys-monitor-reader-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "50")
            .set("max.partition.fetch.bytes", "16384")
            .set("queued.min.messages", "1")
            .set("queued.max.messages.kbytes", "64")
            .create()
            .context("creating the monitor's Kafka reader")?;
        Ok(KafkaTarget {
            topic: args.user_events_topic.clone(),
            group: group.to_owned(),
            dlq_topic: dlq_topic.to_owned(),
            servers: args.bootstrap_servers(),
            clients: Arc::new(Mutex::new(Clients { group: group_client, reader })),
            busy: Arc::default(),
            rules,
            origin: Instant::now(),
            partitions: BTreeMap::new(),
            prev_total: None,
            lag_history: VecDeque::new(),
            last: None,
        })
    }

    /// One probe within `deadline`; never fails: an unreachable broker gives
    /// the last sample, stale, with the error and the group's status UNKNOWN.
    pub async fn sample(&mut self, deadline: Duration) -> pb::KafkaStatus {
        let started = Instant::now();
        let raw = self.read(deadline).await;
        let probe_ms = started.elapsed().as_secs_f64() * 1000.0;
        match raw {
            Ok(raw) => {
                let mut status = self.digest(raw);
                status.probe_ms = probe_ms;
                self.last = Some(status.clone());
                status
            }
            Err(error) => {
                let mut status = self.last.clone().unwrap_or_else(|| pb::KafkaStatus {
                    topic: self.topic.clone(),
                    consumer_group: self.group.clone(),
                    dlq_topic: self.dlq_topic.clone(),
                    ..Default::default()
                });
                status.reachable = false;
                status.stale = true;
                status.error = format!("{error:#}");
                status.group_status = pb::GroupStatus::Unknown.into();
                status.group_status_reason = format!("Kafka unreachable: {error:#}");
                status.probe_ms = probe_ms;
                self.prev_total = None;
                status
            }
        }
    }

    async fn read(&self, deadline: Duration) -> anyhow::Result<Raw> {
        if self.busy.swap(true, Ordering::AcqRel) {
            bail!("the previous Kafka probe is still running (broker slow or unreachable)");
        }
        let (clients, busy) = (self.clients.clone(), self.busy.clone());
        let (topic, dlq) = (self.topic.clone(), self.dlq_topic.clone());
        let servers = self.servers.clone();
        let job = tokio::task::spawn_blocking(move || {
            let result = clients
                .lock()
                .map_err(|_| anyhow::anyhow!("Kafka client lock poisoned"))
                .and_then(|c| read_blocking(&c, &topic, &dlq, deadline));
            busy.store(false, Ordering::Release);
            result.with_context(|| format!("asking {servers}"))
        });
        // Every librdkafka call inside has its own deadline; this one only
        // guards against a call that overruns it.
        match tokio::time::timeout(deadline + Duration::from_millis(250), job).await {
            Ok(joined) => joined.context("Kafka probe task")?,
            Err(_) => bail!("no answer from {} within {} ms", self.servers, deadline.as_millis()),
        }
    }

    fn digest(&mut self, raw: Raw) -> pb::KafkaStatus {
        let now = Instant::now();
        let at = now.duration_since(self.origin).as_secs_f64();
        let now_ms = unix_ms(SystemTime::now());
        let window = self.rules.window.as_secs_f64();
        let mut partitions = Vec::new();
        let mut verdicts = Vec::new();
        for &(partition, low, high, committed) in &raw.partitions {
            let state = self
                .partitions
                .entry(partition)
                .or_insert_with(|| PartitionState { moved_at: at, ..Default::default() });
            if committed != state.committed {
                state.committed = committed;
                state.moved_at = at;
            }
            let sample = Sample { at, committed, low, high };
            state.window.push_back(sample);
            while state.window.front().is_some_and(|s| at - s.at > window) {
                state.window.pop_front();
            }
            match state.lookup.back_mut() {
                Some(last) if last.0 == high => last.1 = now_ms,
                _ => state.lookup.push_back((high, now_ms)),
            }
            if state.lookup.len() > LOOKUP_POINTS {
                state.lookup.pop_front();
            }
            let lag = sample.lag();
            let (lag_seconds, source) = if lag == 0 {
                (0.0, pb::LagSecondsSource::NoLag)
            } else if let Some(ts) = raw.timestamps.get(&partition) {
                (((now_ms - ts) as f64 / 1000.0).max(0.0), pb::LagSecondsSource::RecordTimestamp)
            } else if let Some(t) = interpolate(&state.lookup, committed.unwrap_or(low).max(low)) {
                (((now_ms - t) as f64 / 1000.0).max(0.0), pb::LagSecondsSource::Interpolated)
            } else {
                (0.0, pb::LagSecondsSource::Unknown)
            };
            let since_moved = at - state.moved_at;
            let window_samples: Vec<Sample> = state.window.iter().copied().collect();
            let verdict = status::evaluate_partition(partition, &window_samples, since_moved, &self.rules);
            let rate = window_samples
                .iter()
                .rev()
                .nth(1)
                .filter(|p| at > p.at)
                .map(|p| (high - p.high).max(0) as f64 / (at - p.at))
                .unwrap_or(0.0);
            let p = pb::PartitionLag {
                partition,
                high_watermark: high,
                committed_offset: committed.unwrap_or(-1),
                lag,
                low_watermark: low,
                lag_seconds,
                lag_seconds_source: source.into(),
                status: verdict.status.into(),
                status_reason: verdict.reason.clone(),
                trend: verdict.trend.into(),
                messages_per_second: rate,
                seconds_since_commit_moved: since_moved,
            };
            state.status = Some(p.clone());
            partitions.push(p);
            verdicts.push(verdict);
        }
        let (group_status, reason) = status::evaluate_group(&verdicts);
        let total_high: i64 = raw.partitions.iter().map(|p| p.2).sum();
        let messages_per_second = match self.prev_total {
            Some((then, total)) if now > then => {
                (total_high - total).max(0) as f64 / now.duration_since(then).as_secs_f64()
            }
            _ => 0.0,
        };
        self.prev_total = Some((now, total_high));
        let consumer_lag: i64 = partitions.iter().map(|p| p.lag).sum();
        self.lag_history.push_back((at, consumer_lag));
        while self.lag_history.front().is_some_and(|(t, _)| at - t > window) {
            self.lag_history.pop_front();
        }
        let first_lag = self.lag_history.front().map(|(_, l)| *l).unwrap_or(consumer_lag);
        pb::KafkaStatus {
            reachable: true,
            topic: self.topic.clone(),
            messages_total: total_high,
            messages_per_second,
            consumer_group: self.group.clone(),
            consumer_lag,
            consumer_lag_seconds: partitions.iter().map(|p| p.lag_seconds).fold(0.0, f64::max),
            lag_trend: status::trend(first_lag, consumer_lag).into(),
            partitions,
            sampled_at: Some(SystemTime::now().into()),
            messages_source: "sum of the high watermark deltas over the interval".into(),
            group_status: group_status.into(),
            group_status_reason: reason,
            dlq_topic: self.dlq_topic.clone(),
            dlq_records: raw.dlq_records.unwrap_or(0),
            ..Default::default()
        }
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn read_blocking(c: &Clients, topic: &str, dlq: &str, deadline: Duration) -> anyhow::Result<Raw> {
    let end = Instant::now() + deadline;
    let left = || end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let metadata = c.group.fetch_metadata(None, left()).context("fetching metadata")?;
    let ids = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
    };
    let Some(mut ids_topic) = ids(topic) else { bail!("topic {topic} does not exist") };
    ids_topic.sort_unstable();
    let mut marks = Vec::new();
    for &p in &ids_topic {
        let (low, high) =
            c.group.fetch_watermarks(topic, p, left()).with_context(|| format!("watermarks of {topic}/{p}"))?;
        marks.push((p, low, high));
    }
    let mut tpl = TopicPartitionList::new();
    for &p in &ids_topic {
        tpl.add_partition(topic, p);
    }
    let committed = c.group.committed_offsets(tpl, left()).context("reading the group's committed offsets")?;
    let offset_of = |p: i32| match committed.find_partition(topic, p).map(|e| e.offset()) {
        Some(Offset::Offset(n)) if n >= 0 => Some(n),
        _ => None,
    };
    let partitions: Vec<_> = marks.iter().map(|&(p, low, high)| (p, low, high, offset_of(p))).collect();
    let dlq_records = match ids(dlq) {
        None => Some(0),
        Some(dlq_ids) => {
            let mut sum = 0;
            for p in dlq_ids {
                let (low, high) =
                    c.group.fetch_watermarks(dlq, p, left()).with_context(|| format!("watermarks of {dlq}/{p}"))?;
                sum += (high - low).max(0);
            }
            Some(sum)
        }
    };
    let timestamps = read_timestamps(&c.reader, topic, &partitions, end);
    Ok(Raw { partitions, dlq_records, timestamps })
}

/// The timestamps of the records at the committed offsets of the partitions
/// that lag, read until `end`. A partition whose record is not read in time
/// (or was removed by retention) is left out: its lag is interpolated.
fn read_timestamps(
    reader: &BaseConsumer,
    topic: &str,
    partitions: &[(i32, i64, i64, Option<i64>)],
    end: Instant,
) -> HashMap<i32, i64> {
    let mut wanted: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &(p, low, high, committed) in partitions {
        let at = committed.unwrap_or(low);
        if at >= low && at < high && tpl.add_partition_offset(topic, p, Offset::Offset(at)).is_ok() {
            wanted.insert(p, at);
        }
    }
    let mut found = HashMap::new();
    if wanted.is_empty() || reader.assign(&tpl).is_err() {
        return found;
    }
    while found.len() < wanted.len() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match reader.poll(left) {
            Some(Ok(message)) => {
                let p = message.partition();
                if wanted.get(&p).is_some_and(|at| message.offset() >= *at)
                    && let Some(ms) = message.timestamp().to_millis()
                {
                    found.entry(p).or_insert(ms);
                }
            }
            Some(Err(error)) => tracing::debug!(error = %error, "reading a record at a committed offset"),
            None => break,
        }
    }
    let _ = reader.unassign();
    found
}

/// The unix ms at which the high watermark passed `offset`, interpolated
/// between the two (high watermark, time) points around it; None when the
/// table does not reach back that far.
pub fn interpolate(table: &VecDeque<(i64, i64)>, offset: i64) -> Option<i64> {
    let mut before: Option<(i64, i64)> = None;
    for &(high, t) in table {
        if high <= offset {
            before = Some((high, t));
        } else {
            let (h0, t0) = before?;
            let fraction = (offset + 1 - h0) as f64 / (high - h0) as f64;
            return Some(t0 + ((t - t0) as f64 * fraction.clamp(0.0, 1.0)) as i64);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_table() {
        // High watermark 100 until t=1000, 200 at t=2000, 200 still at t=3000, 300 at t=4000.
        let table: VecDeque<(i64, i64)> = [(100, 1000), (200, 3000), (300, 4000)].into_iter().collect();
        let rows = [
            ("before the table", 50, None),
            ("first record after the first point", 100, Some(1020)),
            ("half way", 149, Some(2000)),
            ("last record of a step", 199, Some(3000)),
            ("in the last step", 249, Some(3500)),
            ("not written yet", 300, None),
        ];
        for (name, offset, expected) in rows {
            assert_eq!(interpolate(&table, offset), expected, "{name}");
        }
    }
}
