//! `msys status`: the current snapshot as a compact terminal table for a
//! person at a shell, or as proto3 JSON (enum words, as grpcurl prints them)
//! for scripts.

use std::{fmt::Write, time::Duration};

use anyhow::Context;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::pb::{self, monitor_service_client::MonitorServiceClient};

/// Asks the monitor at `addr` for its latest snapshot.
pub async fn fetch(addr: &str, timeout: Duration) -> anyhow::Result<pb::Snapshot> {
    let (channel, uri) = crate::grpc::connect(addr, timeout).await.context("reaching the monitor")?;
    let snapshot = MonitorServiceClient::new(channel)
        .get_snapshot(pb::GetSnapshotRequest {})
        .await
        .with_context(|| format!("GetSnapshot from {uri}"))?;
    Ok(snapshot.into_inner())
}

/// The snapshot as proto3 JSON, zero values included so scripts find every field.
pub fn json(snapshot: &pb::Snapshot) -> anyhow::Result<String> {
    let pool = DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).context("reading the embedded descriptors")?;
    let descriptor = pool.get_message_by_name("msys.v1.Snapshot").context("msys.v1.Snapshot is not described")?;
    let message =
        DynamicMessage::decode(descriptor, snapshot.encode_to_vec().as_slice()).context("re-reading the snapshot")?;
    let mut out = serde_json::Serializer::pretty(Vec::new());
    message
        .serialize_with_options(&mut out, &SerializeOptions::new().skip_default_fields(false))
        .context("writing JSON")?;
    String::from_utf8(out.into_inner()).context("JSON is UTF-8")
}

fn opt_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

fn bytes(n: i64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.1} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n:.0} B"),
    }
}

fn word<'a>(name: &'a str, prefix: &str) -> &'a str {
    name.strip_prefix(prefix).unwrap_or(name)
}

fn group_word(status: i32) -> &'static str {
    pb::GroupStatus::try_from(status).map(|s| word(s.as_str_name(), "GROUP_STATUS_")).unwrap_or("?")
}

/// The snapshot as a table for people.
pub fn render(s: &pb::Snapshot) -> String {
    let mut out = String::new();
    let taken = s
        .taken_at
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default();
    let cost = s.monitor.unwrap_or_default();
    let _ = writeln!(
        out,
        "msys status at {taken} (snapshot #{}, every {} ms, collected in {:.1} ms)\n",
        s.sequence, s.interval_ms, cost.collect_ms
    );
    let _ = writeln!(
        out,
        "{:<9} {:<12} {:>9} {:>6} {:>8} {:>8} {:>10}  NOTE",
        "SERVICE", "STATE", "REQ/S", "ERR%", "P50 ms", "P99 ms", "TOTAL"
    );
    for x in &s.services {
        let state = pb::ServiceState::try_from(x.state).map(|v| word(v.as_str_name(), "SERVICE_STATE_")).unwrap_or("?");
        let i = x.interval.unwrap_or_default();
        let total = x.since_start.map(|f| f.total).unwrap_or(0);
        let mut note = x.error.clone();
        if x.stale {
            note = format!("stale: {note}");
        }
        let _ = writeln!(
            out,
            "{:<9} {:<12} {:>9.1} {:>5.1}% {:>8} {:>8} {:>10}  {note}",
            x.name,
            state,
            i.requests_per_second,
            i.error_rate * 100.0,
            opt_ms(i.p50_latency_ms),
            opt_ms(i.p99_latency_ms),
            total
        );
    }
    let _ = writeln!(
        out,
        "\n{:<9} {:<5} {:>14} {:>9} {:>9} {:>8} {:>6} {:>6} {:>9} {:>7}",
        "DATABASE", "UP", "ACT/IDLE/IDLTX", "CONN/MAX", "SIZE", "TPS", "RB%", "HIT%", "LONGEST", "BLOCKED"
    );
    for d in &s.databases {
        let _ = writeln!(
            out,
            "{:<9} {:<5} {:>14} {:>9} {:>9} {:>8.1} {:>6.1} {:>6.1} {:>8.1}s {:>7}{}",
            d.name,
            if d.reachable { "yes" } else { "NO" },
            format!("{}/{}/{}", d.active_connections, d.idle_connections, d.idle_in_transaction_connections),
            format!("{}/{}", d.server_connections, d.max_connections),
            bytes(d.size_bytes),
            d.transactions_per_second,
            d.rollback_percent,
            d.cache_hit_percent,
            d.longest_transaction_seconds,
            d.blocked_sessions,
            if d.error.is_empty() {
                String::new()
            } else {
                format!("  {}{}", if d.stale { "stale: " } else { "" }, d.error)
            }
        );
        if !d.statements_enabled {
            let _ = writeln!(out, "          {}", d.statements_note);
        }
        for t in d.top_by_total_time.iter().take(3) {
            let query: String = t.query.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(70).collect();
            let _ = writeln!(
                out,
                "          {:>8} calls {:>9.3} ms mean {:>10.1} ms total  {query}",
                t.calls, t.mean_ms, t.total_ms
            );
        }
    }
    let k = s.kafka.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "\nKAFKA {} {}  {:.1} msg/s  {}  {} records  DLQ {} records{}",
        k.topic,
        if k.reachable { "reachable" } else { "UNREACHABLE" },
        k.messages_per_second,
        if k.bytes_source.starts_with("not reported") {
            "bytes/s -".to_owned()
        } else {
            format!("{}/s", bytes(k.bytes_per_second as i64))
        },
        k.messages_total,
        k.dlq_records,
        if k.error.is_empty() { String::new() } else { format!("  ({})", k.error) }
    );
    let _ = writeln!(
        out,
        "group {}: {}  lag {} records, {:.1} s ({})  {}",
        k.consumer_group,
        group_word(k.group_status),
        k.consumer_lag,
        k.consumer_lag_seconds,
        pb::Trend::try_from(k.lag_trend).map(|t| word(t.as_str_name(), "TREND_").to_lowercase()).unwrap_or_default(),
        k.group_status_reason
    );
    let _ = writeln!(
        out,
        "{:>4} {:>10} {:>10} {:>10} {:>8} {:>8}  {:<8} REASON",
        "PART", "LOW", "HIGH", "COMMITTED", "LAG", "LAG s", "STATUS"
    );
    for p in &k.partitions {
        let _ = writeln!(
            out,
            "{:>4} {:>10} {:>10} {:>10} {:>8} {:>8.1}  {:<8} {}",
            p.partition,
            p.low_watermark,
            p.high_watermark,
            p.committed_offset,
            p.lag,
            p.lag_seconds,
            group_word(p.status),
            p.status_reason
        );
    }
    let f = s.event_flow.clone().unwrap_or_default();
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "\nEVENTS outbox {} written, {} published, {} pending (oldest {:.1} s); applied {}, duplicates {}, dead-lettered {}; commit->applied p50 {} ms p99 {} ms",
        f.outbox_written,
        f.outbox_published,
        f.outbox_pending,
        f.outbox_oldest_pending_age_seconds,
        opt(f.events_applied),
        opt(f.events_duplicate),
        opt(f.events_dead_lettered),
        opt_ms(f.apply_lag_p50_ms_since_start),
        opt_ms(f.apply_lag_p99_ms_since_start)
    );
    for e in s.events.iter().rev().take(5) {
        let at =
            e.at.and_then(|t| std::time::SystemTime::try_from(t).ok())
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_default();
        let _ = writeln!(out, "  {at} {}: {} -> {}  {}", e.subject, e.from, e.to, e.reason);
    }
    let _ = writeln!(
        out,
        "\nMONITOR cpu {:.1}% rss {} history {}/{} points ({})",
        cost.cpu_percent,
        bytes(cost.rss_bytes),
        cost.history_points,
        cost.history_capacity,
        bytes(cost.history_bytes as i64)
    );
    out
}
