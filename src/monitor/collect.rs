//! One collection: every probe runs concurrently under its own deadline, and
//! their samples become one snapshot, one history point and, where a status
//! changed, a transition (logged once, kept in the snapshot's event list).
//! The loop never runs two collections at once: a tick that comes while one
//! is still running is skipped and counted.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{history::History, kafka::KafkaTarget, postgres::PostgresTarget, services::ServiceTarget};
use crate::pb;

/// Transitions kept in every snapshot (the latest; older ones are in the log).
const EVENTS_KEPT: usize = 100;

/// What the gRPC service reads: the latest snapshot and the history.
pub struct Shared {
    pub latest: watch::Sender<Arc<pb::Snapshot>>,
    pub history: Mutex<History>,
    pub interval: Duration,
}

impl Shared {
    pub fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Collector {
    pub services: Vec<ServiceTarget>,
    pub users_db: PostgresTarget,
    pub orders_db: PostgresTarget,
    pub kafka: KafkaTarget,
    pub deadline: Duration,
    pub interval: Duration,
    transitions: Transitions,
    flow_prev: Option<FlowCounters>,
    cost: Cost,
    sequence: u64,
}

#[derive(Clone, Copy)]
struct FlowCounters {
    at: Instant,
    written: Option<i64>,
    published: Option<i64>,
    applied: Option<i64>,
    bytes: Option<i64>,
}

impl Collector {
    pub fn new(
        services: Vec<ServiceTarget>,
        users_db: PostgresTarget,
        orders_db: PostgresTarget,
        kafka: KafkaTarget,
        deadline: Duration,
        interval: Duration,
    ) -> Self {
        Collector {
            services,
            users_db,
            orders_db,
            kafka,
            deadline,
            interval,
            transitions: Transitions::default(),
            flow_prev: None,
            cost: Cost::default(),
            sequence: 0,
        }
    }

    /// Collects every `interval` until `shutdown`, publishing into `shared`.
    pub async fn run(mut self, shared: Arc<Shared>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await; // the first snapshot was taken before serving
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.collect_into(&shared).await;
        }
    }

    /// One collection, published as the latest snapshot and a history point.
    pub async fn collect_into(&mut self, shared: &Shared) {
        let started = Instant::now();
        let snapshot = self.collect(started, shared).await;
        let elapsed = started.elapsed();
        if elapsed > self.interval {
            self.cost.skipped += (elapsed.as_secs_f64() / self.interval.as_secs_f64()) as u64;
        }
        shared.history().push(history_point(&snapshot));
        shared.latest.send_replace(Arc::new(snapshot));
    }

    async fn collect(&mut self, started: Instant, shared: &Shared) -> pb::Snapshot {
        let deadline = self.deadline;
        let (services, users_db, orders_db, kafka) = tokio::join!(
            futures::future::join_all(self.services.iter_mut().map(|s| s.sample(deadline))),
            self.users_db.sample(deadline),
            self.orders_db.sample(deadline),
            self.kafka.sample(deadline),
        );
        let mut databases = vec![users_db, orders_db];
        for db in &mut databases {
            let role = if db.name == "users_db" { "user" } else { "order" };
            db.pools = services.iter().filter(|s| s.name == role).filter_map(|s| s.pool.clone()).collect();
        }
        let mut kafka = kafka;
        let event_flow = self.event_flow(&services, &mut kafka);
        self.note_transitions(&services, &databases, &kafka);
        self.sequence += 1;
        let collect_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (history_points, history_capacity, history_bytes) = {
            let history = shared.history();
            (history.len() as u32 + 1, history.capacity() as u32, history.memory().1 as u64)
        };
        let monitor = self.cost.measure(collect_ms, self.sequence, history_points, history_capacity, history_bytes);
        pb::Snapshot {
            taken_at: Some(SystemTime::now().into()),
            services,
            databases,
            kafka: Some(kafka),
            sequence: self.sequence,
            interval_ms: self.interval.as_millis() as u32,
            event_flow: Some(event_flow),
            events: self.transitions.events.iter().cloned().collect(),
            monitor: Some(monitor),
        }
    }

    /// Outbox figures from the users database; applied/duplicates/DLQ and the
    /// commit→applied histogram from the order role's metrics (unset when it
    /// does not report them); bytes from the user role's metrics.
    fn event_flow(&mut self, services: &[pb::ServiceStatus], kafka: &mut pb::KafkaStatus) -> pb::EventFlow {
        let report = |name: &str| services.iter().find(|s| s.name == name && !s.stale).and_then(|s| s.metrics.as_ref());
        let order = report("order");
        let user = report("user");
        let value = |r: Option<&pb::MetricsReport>, name: &str| r.and_then(|r| r.values.get(name).copied());
        let outbox = self.users_db.outbox;
        let now = FlowCounters {
            at: Instant::now(),
            written: outbox.map(|o| o.written),
            published: outbox.map(|o| o.written - o.pending),
            applied: value(order, "events_applied_total"),
            bytes: value(user, "events_published_bytes_total"),
        };
        let prev = self.flow_prev;
        let rate = |f: fn(&FlowCounters) -> Option<i64>| -> Option<f64> {
            let p = prev?;
            let dt = now.at.duration_since(p.at).as_secs_f64();
            let (a, b) = (f(&p)?, f(&now)?);
            (dt > 0.0 && b >= a).then(|| (b - a) as f64 / dt)
        };
        let apply_lag = order.and_then(|r| r.histograms.iter().find(|h| h.name == "event_apply_lag_seconds")).cloned();
        let prev_lag = self.cost.prev_apply_lag.take();
        let interval_lag = apply_lag.as_ref().map(|h| {
            let before = prev_lag.as_ref().filter(|p| p.count <= h.count).map(|p| p.buckets.as_slice()).unwrap_or(&[]);
            super::services::minus_buckets(&h.buckets, before)
        });
        let ms = |q: f64, b: &[(f64, u64)]| super::services::quantile(q, b).map(|s| s * 1000.0);
        let all_lag: Option<Vec<(f64, u64)>> =
            apply_lag.as_ref().map(|h| h.buckets.iter().map(|b| (b.le_seconds, b.count)).collect());
        self.cost.prev_apply_lag = apply_lag.clone();
        let flow = pb::EventFlow {
            outbox_known: outbox.is_some(),
            outbox_written: outbox.map(|o| o.written).unwrap_or(0),
            outbox_published: now.published.unwrap_or(0),
            outbox_pending: outbox.map(|o| o.pending).unwrap_or(0),
            outbox_oldest_pending_age_seconds: outbox.map(|o| o.oldest_pending_age_seconds).unwrap_or(0.0),
            outbox_written_per_second: rate(|c| c.written).unwrap_or(0.0),
            outbox_published_per_second: rate(|c| c.published).unwrap_or(0.0),
            events_applied: now.applied,
            events_duplicate: value(order, "events_duplicate_total"),
            events_stale: value(order, "events_stale_total"),
            events_dead_lettered: value(order, "events_dead_lettered_total"),
            events_applied_per_second: rate(|c| c.applied),
            apply_lag_p50_ms: interval_lag.as_deref().and_then(|b| ms(0.5, b)),
            apply_lag_p99_ms: interval_lag.as_deref().and_then(|b| ms(0.99, b)),
            apply_lag_p50_ms_since_start: all_lag.as_deref().and_then(|b| ms(0.5, b)),
            apply_lag_p99_ms_since_start: all_lag.as_deref().and_then(|b| ms(0.99, b)),
            apply_lag,
        };
        match (now.bytes, rate(|c| c.bytes)) {
            (Some(total), per_second) => {
                kafka.bytes_total = total;
                kafka.bytes_per_second = per_second.unwrap_or(0.0);
                kafka.bytes_source = "the user role's events_published_bytes_total (what its producer sent)".into();
            }
            (None, _) => {
                kafka.bytes_source = "not reported: the user role does not report events_published_bytes_total".into();
            }
        }
        self.flow_prev = Some(now);
        flow
    }

    fn note_transitions(
        &mut self,
        services: &[pb::ServiceStatus],
        databases: &[pb::DatabaseStatus],
        kafka: &pb::KafkaStatus,
    ) {
        use pb::TransitionKind as K;
        for s in services {
            let word = pb::ServiceState::try_from(s.state).map(|x| short(x.as_str_name())).unwrap_or("UNKNOWN");
            self.transitions.observe(K::Service, format!("service {}", s.name), word, None, &s.error);
        }
        for d in databases {
            let word = if d.reachable { "UP" } else { "DOWN" };
            self.transitions.observe(K::Database, format!("database {}", d.name), word, None, &d.error);
        }
        let word = if kafka.reachable { "UP" } else { "DOWN" };
        self.transitions.observe(K::Kafka, "kafka".into(), word, None, &kafka.error);
        let group = pb::GroupStatus::try_from(kafka.group_status).unwrap_or_default();
        self.transitions.observe(
            K::Group,
            format!("group {}", kafka.consumer_group),
            group.as_str_name(),
            Some(group),
            &kafka.group_status_reason,
        );
        if kafka.reachable {
            for p in &kafka.partitions {
                let status = pb::GroupStatus::try_from(p.status).unwrap_or_default();
                self.transitions.observe(
                    K::Partition,
                    format!("partition {}", p.partition),
                    status.as_str_name(),
                    Some(status),
                    &p.status_reason,
                );
            }
        }
    }
}

fn short(name: &str) -> &str {
    name.strip_prefix("SERVICE_STATE_").unwrap_or(name)
}

/// The last status seen per subject, and the transitions between them.
#[derive(Default)]
struct Transitions {
    last: HashMap<String, (String, Option<pb::GroupStatus>)>,
    events: VecDeque<pb::StatusTransition>,
}

impl Transitions {
    /// Records `subject`'s status; a change from the previous one is a
    /// transition, logged once. The first status seen is not a transition.
    fn observe(
        &mut self,
        kind: pb::TransitionKind,
        subject: String,
        word: &str,
        group: Option<pb::GroupStatus>,
        reason: &str,
    ) {
        let previous = self.last.insert(subject.clone(), (word.to_owned(), group));
        let Some((from, from_group)) = previous else {
            tracing::info!(subject, status = word, reason, "monitor: first status");
            return;
        };
        if from == word {
            return;
        }
        let healthy = matches!(word, "UP" | "GROUP_STATUS_OK");
        if healthy {
            tracing::info!(subject, from, to = word, reason, "monitor: status changed");
        } else {
            tracing::warn!(subject, from, to = word, reason, "monitor: status changed");
        }
        self.events.push_back(pb::StatusTransition {
            at: Some(SystemTime::now().into()),
            kind: kind.into(),
            subject,
            from,
            to: word.to_owned(),
            reason: reason.to_owned(),
            from_group_status: from_group.unwrap_or_default().into(),
            to_group_status: group.unwrap_or_default().into(),
        });
        if self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
    }
}

/// The monitor's own costs, by the process's own accounting (procfs).
#[derive(Default)]
struct Cost {
    prev_cpu: Option<(Instant, f64)>,
    max_collect_ms: f64,
    skipped: u64,
    prev_apply_lag: Option<pb::Histogram>,
}

impl Cost {
    fn measure(&mut self, collect_ms: f64, taken: u64, points: u32, capacity: u32, bytes: u64) -> pb::MonitorCost {
        let now = Instant::now();
        let cpu = process_cpu_seconds().unwrap_or(0.0);
        let cpu_percent = match self.prev_cpu {
            Some((then, before)) if now > then => 100.0 * (cpu - before) / now.duration_since(then).as_secs_f64(),
            _ => 0.0,
        };
        self.prev_cpu = Some((now, cpu));
        self.max_collect_ms = self.max_collect_ms.max(collect_ms);
        pb::MonitorCost {
            cpu_seconds_total: cpu,
            cpu_percent,
            rss_bytes: process_rss_bytes().unwrap_or(0),
            collect_ms,
            max_collect_ms: self.max_collect_ms,
            snapshots_taken: taken,
            ticks_skipped: self.skipped,
            history_points: points.min(capacity),
            history_capacity: capacity,
            history_bytes: bytes,
        }
    }
}

/// User + system CPU time of this process (all threads), from /proc/self/stat.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux ABI msys runs on.
    Some((utime + stime) / 100.0)
}

/// Resident set size of this process, from /proc/self/status.
pub fn process_rss_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The figures charts draw, from one snapshot.
pub fn history_point(s: &pb::Snapshot) -> pb::HistoryPoint {
    let kafka = s.kafka.clone().unwrap_or_default();
    let flow = s.event_flow.clone().unwrap_or_default();
    let monitor = s.monitor.unwrap_or_default();
    pb::HistoryPoint {
        at: s.taken_at,
        services: s
            .services
            .iter()
            .map(|x| {
                let f = x.interval.unwrap_or_default();
                pb::ServicePoint {
                    name: x.name.clone(),
                    state: x.state,
                    requests_per_second: f.requests_per_second,
                    error_rate: f.error_rate,
                    p50_latency_ms: f.p50_latency_ms,
                    p99_latency_ms: f.p99_latency_ms,
                }
            })
            .collect(),
        databases: s
            .databases
            .iter()
            .map(|d| pb::DatabasePoint {
                name: d.name.clone(),
                reachable: d.reachable,
                connections: d.active_connections + d.idle_connections + d.idle_in_transaction_connections,
                transactions_per_second: d.transactions_per_second,
                cache_hit_percent: d.cache_hit_percent,
                size_bytes: d.size_bytes,
                blocked_sessions: d.blocked_sessions,
            })
            .collect(),
        kafka_reachable: kafka.reachable,
        messages_per_second: kafka.messages_per_second,
        bytes_per_second: kafka.bytes_per_second,
        consumer_lag: kafka.consumer_lag,
        consumer_lag_seconds: kafka.consumer_lag_seconds,
        group_status: kafka.group_status,
        partitions: kafka
            .partitions
            .iter()
            .map(|p| pb::PartitionPoint {
                partition: p.partition,
                lag: p.lag,
                lag_seconds: p.lag_seconds,
                committed_offset: p.committed_offset,
                high_watermark: p.high_watermark,
                status: p.status,
            })
            .collect(),
        outbox_pending: flow.outbox_pending,
        events_applied_per_second: flow.events_applied_per_second,
        apply_lag_p50_ms: flow.apply_lag_p50_ms,
        apply_lag_p99_ms: flow.apply_lag_p99_ms,
        monitor_cpu_percent: monitor.cpu_percent,
        monitor_rss_bytes: monitor.rss_bytes,
        collect_ms: monitor.collect_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transition_is_recorded_once_and_the_first_status_is_not_one() {
        let mut t = Transitions::default();
        let k = pb::TransitionKind::Group;
        let ok = Some(pb::GroupStatus::Ok);
        let stalled = Some(pb::GroupStatus::Stalled);
        t.observe(k, "group g".into(), "GROUP_STATUS_OK", ok, "fine");
        t.observe(k, "group g".into(), "GROUP_STATUS_OK", ok, "fine");
        t.observe(k, "group g".into(), "GROUP_STATUS_STALLED", stalled, "stuck");
        t.observe(k, "group g".into(), "GROUP_STATUS_STALLED", stalled, "stuck for longer");
        t.observe(k, "group g".into(), "GROUP_STATUS_OK", ok, "caught up");
        let seen: Vec<(&str, &str)> = t.events.iter().map(|e| (e.from.as_str(), e.to.as_str())).collect();
        assert_eq!(seen, [("GROUP_STATUS_OK", "GROUP_STATUS_STALLED"), ("GROUP_STATUS_STALLED", "GROUP_STATUS_OK")]);
        assert_eq!(t.events[0].reason, "stuck");
    }

    #[test]
    fn own_cpu_and_rss_are_readable() {
        assert!(process_cpu_seconds().is_some());
        assert!(process_rss_bytes().is_some_and(|b| b > 0));
    }
}
