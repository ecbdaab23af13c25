//! The JSON the page reads, made from the monitor's protobuf messages. The
//! page never sees protobuf: statuses become words (`OK`, `STALLED`), times
//! become milliseconds since the epoch, and a live snapshot is also reduced
//! to the same chart point `GetHistory` returns, so history and live data
//! feed the charts through one shape.

use prost_types::Timestamp;
use serde_json::{Value, json};

use crate::pb;

/// Milliseconds since the epoch, or null when the monitor sent no time.
fn millis(at: Option<&Timestamp>) -> Value {
    at.map_or(Value::Null, |t| json!(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000))
}

/// The word of an enum value without its prefix: `GROUP_STATUS_OK` → `OK`.
fn word(name: Option<&str>, prefix: &str) -> String {
    name.map_or_else(|| "UNKNOWN".to_owned(), |n| n.strip_prefix(prefix).unwrap_or(n).to_owned())
}

fn group_status(value: i32) -> String {
    word(pb::GroupStatus::try_from(value).ok().map(|s| s.as_str_name()), "GROUP_STATUS_")
}

fn service_state(value: i32) -> String {
    word(pb::ServiceState::try_from(value).ok().map(|s| s.as_str_name()), "SERVICE_STATE_")
}

fn trend(value: i32) -> String {
    word(pb::Trend::try_from(value).ok().map(|s| s.as_str_name()), "TREND_")
}

fn lag_source(value: i32) -> String {
    word(pb::LagSecondsSource::try_from(value).ok().map(|s| s.as_str_name()), "LAG_SECONDS_SOURCE_")
}

fn figures(f: Option<&pb::RequestFigures>) -> Value {
    let Some(f) = f else { return Value::Null };
    json!({
        "total": f.total, "ok": f.ok, "failed": f.failed, "rps": f.requests_per_second,
        "error_rate": f.error_rate, "p50_ms": f.p50_latency_ms, "p90_ms": f.p90_latency_ms,
        "p99_ms": f.p99_latency_ms, "span_s": f.span_seconds,
    })
}

fn pool(p: &pb::PoolStatus) -> Value {
    json!({ "role": p.role, "size": p.size, "in_use": p.in_use, "waiters": p.waiters })
}

fn service(s: &pb::ServiceStatus) -> Value {
    json!({
        "name": s.name, "address": s.address, "state": service_state(s.state), "healthy": s.healthy,
        "error": s.error, "stale": s.stale, "sampled_at": millis(s.sampled_at.as_ref()),
        "uptime_s": s.uptime_seconds, "interval": figures(s.interval.as_ref()),
        "since_start": figures(s.since_start.as_ref()),
        "methods": s.methods.iter().map(|m| json!({
            "method": m.method, "interval": figures(m.interval.as_ref()),
            "since_start": figures(m.since_start.as_ref()),
        })).collect::<Vec<_>>(),
        "pool": s.pool.as_ref().map(pool),
    })
}

fn statement(s: &pb::StatementStat) -> Value {
    json!({ "query": s.query, "calls": s.calls, "mean_ms": s.mean_ms, "total_ms": s.total_ms, "rows": s.rows })
}

fn database(d: &pb::DatabaseStatus) -> Value {
    json!({
        "name": d.name, "database": d.database, "reachable": d.reachable, "error": d.error, "stale": d.stale,
        "sampled_at": millis(d.sampled_at.as_ref()),
        "active": d.active_connections, "idle": d.idle_connections,
        "idle_in_transaction": d.idle_in_transaction_connections,
        "server_connections": d.server_connections, "max_connections": d.max_connections,
        "size_bytes": d.size_bytes, "size_growth_bps": d.size_growth_bytes_per_second,
        "tps": d.transactions_per_second, "rollback_percent": d.rollback_percent,
        "cache_hit_percent": d.cache_hit_percent, "avg_query_ms": d.avg_query_ms,
        "longest_query_s": d.longest_query_seconds, "longest_query": d.longest_query,
        "longest_transaction_s": d.longest_transaction_seconds, "blocked_sessions": d.blocked_sessions,
        "statements_enabled": d.statements_enabled, "statements_note": d.statements_note,
        "top_by_total": d.top_by_total_time.iter().map(statement).collect::<Vec<_>>(),
        "top_by_mean": d.top_by_mean_time.iter().map(statement).collect::<Vec<_>>(),
        "pools": d.pools.iter().map(pool).collect::<Vec<_>>(),
    })
}

fn partition(p: &pb::PartitionLag) -> Value {
    json!({
        "partition": p.partition, "low": p.low_watermark, "high": p.high_watermark,
        "committed": p.committed_offset, "lag": p.lag, "lag_s": p.lag_seconds,
        "lag_s_source": lag_source(p.lag_seconds_source), "status": group_status(p.status),
        "reason": p.status_reason, "trend": trend(p.trend), "msgs_per_s": p.messages_per_second,
        "since_commit_moved_s": p.seconds_since_commit_moved,
    })
}

fn kafka(k: &pb::KafkaStatus) -> Value {
    json!({
        "reachable": k.reachable, "error": k.error, "stale": k.stale, "topic": k.topic,
        "sampled_at": millis(k.sampled_at.as_ref()),
        "messages_total": k.messages_total, "msgs_per_s": k.messages_per_second,
        "bytes_total": k.bytes_total, "bytes_per_s": k.bytes_per_second,
        "messages_source": k.messages_source, "bytes_source": k.bytes_source,
        "group": k.consumer_group, "lag": k.consumer_lag, "lag_s": k.consumer_lag_seconds,
        "lag_trend": trend(k.lag_trend), "group_status": group_status(k.group_status),
        "group_reason": k.group_status_reason, "dlq_topic": k.dlq_topic, "dlq_records": k.dlq_records,
        "partitions": k.partitions.iter().map(partition).collect::<Vec<_>>(),
    })
}

fn flow(f: &pb::EventFlow) -> Value {
    json!({
        "outbox_known": f.outbox_known, "outbox_written": f.outbox_written,
        "outbox_published": f.outbox_published, "outbox_pending": f.outbox_pending,
        "outbox_oldest_age_s": f.outbox_oldest_pending_age_seconds,
        "written_per_s": f.outbox_written_per_second, "published_per_s": f.outbox_published_per_second,
        "applied": f.events_applied, "duplicate": f.events_duplicate, "stale": f.events_stale,
        "dead_lettered": f.events_dead_lettered, "applied_per_s": f.events_applied_per_second,
        "apply_lag_p50_ms": f.apply_lag_p50_ms, "apply_lag_p99_ms": f.apply_lag_p99_ms,
        "apply_lag_p50_ms_since_start": f.apply_lag_p50_ms_since_start,
        "apply_lag_p99_ms_since_start": f.apply_lag_p99_ms_since_start,
    })
}

/// One status change, with both statuses as words.
pub fn transition(t: &pb::StatusTransition) -> Value {
    let strip =
        |s: &str| ["GROUP_STATUS_", "SERVICE_STATE_"].iter().find_map(|p| s.strip_prefix(p)).unwrap_or(s).to_owned();
    json!({
        "at": millis(t.at.as_ref()), "subject": t.subject, "from": strip(&t.from), "to": strip(&t.to),
        "reason": t.reason,
    })
}

/// Everything the panels show, from one snapshot.
pub fn snapshot(s: &pb::Snapshot) -> Value {
    json!({
        "at": millis(s.taken_at.as_ref()), "sequence": s.sequence, "interval_ms": s.interval_ms,
        "services": s.services.iter().map(service).collect::<Vec<_>>(),
        "databases": s.databases.iter().map(database).collect::<Vec<_>>(),
        "kafka": s.kafka.as_ref().map(kafka),
        "flow": s.event_flow.as_ref().map(flow),
        "events": s.events.iter().map(transition).collect::<Vec<_>>(),
        "monitor": s.monitor.as_ref().map(|m| json!({
            "cpu_percent": m.cpu_percent, "rss_bytes": m.rss_bytes, "collect_ms": m.collect_ms,
        })),
        // The same reduction the monitor stores in its history, so live and
        // past data are one series.
        "point": point(&crate::monitor::collect::history_point(s)),
    })
}

/// One chart point as JSON (compact keys: a 15-minute history is ~900 of them).
pub fn point(p: &pb::HistoryPoint) -> Value {
    json!({
        "t": millis(p.at.as_ref()),
        "svc": p.services.iter().map(|s| json!({
            "name": s.name, "state": service_state(s.state), "rps": s.requests_per_second,
            "err": s.error_rate, "p50": s.p50_latency_ms, "p99": s.p99_latency_ms,
        })).collect::<Vec<_>>(),
        "db": p.databases.iter().map(|d| json!({
            "name": d.name, "up": d.reachable, "conn": d.connections, "tps": d.transactions_per_second,
            "hit": d.cache_hit_percent, "size": d.size_bytes,
        })).collect::<Vec<_>>(),
        "kafka_up": p.kafka_reachable, "msgs": p.messages_per_second, "bytes": p.bytes_per_second,
        "lag": p.consumer_lag, "lag_s": p.consumer_lag_seconds, "group": group_status(p.group_status),
        "parts": p.partitions.iter().map(|q| json!({
            "p": q.partition, "lag": q.lag, "lag_s": q.lag_seconds, "status": group_status(q.status),
        })).collect::<Vec<_>>(),
        "pending": p.outbox_pending, "applied": p.events_applied_per_second,
        "alag50": p.apply_lag_p50_ms, "alag99": p.apply_lag_p99_ms,
    })
}

/// The history as the page wants it: points oldest first, plus transitions.
pub fn history(h: &pb::History) -> Value {
    json!({
        "interval_ms": h.interval_ms,
        "points": h.points.iter().map(point).collect::<Vec<_>>(),
        "events": h.events.iter().map(transition).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_reach_the_page_as_words() {
        let snapshot = pb::Snapshot {
            kafka: Some(pb::KafkaStatus {
                group_status: pb::GroupStatus::Stalled as i32,
                partitions: vec![pb::PartitionLag { status: pb::GroupStatus::Ok as i32, ..Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let view = self::snapshot(&snapshot);
        assert_eq!(view["kafka"]["group_status"], "STALLED");
        assert_eq!(view["kafka"]["partitions"][0]["status"], "OK");
        assert_eq!(view["point"]["group"], "STALLED");
    }

    #[test]
    fn unknown_enum_values_read_as_unknown() {
        assert_eq!(group_status(99), "UNKNOWN");
    }

    #[test]
    fn times_are_epoch_milliseconds() {
        let at = Timestamp { seconds: 1_700_000_000, nanos: 250_000_000 };
        assert_eq!(millis(Some(&at)), json!(1_700_000_000_250_i64));
        assert_eq!(millis(None), Value::Null);
    }
}
