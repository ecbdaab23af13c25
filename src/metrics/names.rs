//! How the names code records under (the GetMetrics contract the monitor
//! reads) map to Prometheus names, which carry an `msys_` namespace and their
//! unit, and the help text each gets. A name missing here is still exported,
//! as `msys_<name>` with its words as help, so a new metric never goes unseen.

/// (name in code and GetMetrics, Prometheus name, help). Counters keep their
/// `_total` (the encoder adds it back after the family name).
const KNOWN: &[(&str, &str, &str)] = &[
    ("rpcs_in_flight", "msys_grpc_server_in_flight_requests", "RPCs being served right now"),
    // user role
    ("outbox_pending", "msys_outbox_pending_rows", "Outbox rows not yet published to Kafka"),
    (
        "outbox_oldest_pending_age_seconds",
        "msys_outbox_oldest_pending_age_seconds",
        "Age of the oldest outbox row not yet published (0 when none)",
    ),
    ("events_published_total", "msys_events_published_total", "Outbox events the broker acknowledged"),
    (
        "events_published_bytes_total",
        "msys_events_published_bytes_total",
        "Key, value and header bytes of the outbox events the broker acknowledged",
    ),
    (
        "events_publish_failures_total",
        "msys_events_publish_failures_total",
        "Outbox events the broker did not acknowledge (retried later)",
    ),
    ("batch_queue_depth", "msys_batch_queue_depth_requests", "Requests queued for a batched statement"),
    ("create_batches_total", "msys_create_batches_total", "CreateUser batch statements sent"),
    ("create_batched_calls_total", "msys_create_batched_calls_total", "CreateUser calls carried by batches"),
    ("get_batches_total", "msys_get_batches_total", "GetUser batch statements sent"),
    ("get_batched_calls_total", "msys_get_batched_calls_total", "GetUser calls carried by batches"),
    // order role
    ("events_applied_total", "msys_events_applied_total", "User events applied to the replica"),
    ("events_duplicate_total", "msys_events_duplicate_total", "User events skipped as already applied"),
    ("events_stale_total", "msys_events_stale_total", "User events skipped as older than the replica"),
    ("events_dead_lettered_total", "msys_events_dead_lettered_total", "Records sent to the dead-letter topic"),
    ("events_apply_retries_total", "msys_events_apply_retries_total", "Retried attempts to apply events"),
    (
        "replica_stalled_partitions",
        "msys_replica_stalled_partitions",
        "Partitions whose batch has been retried past ORDER_APPLY_STALL_AFTER",
    ),
    ("create_order_waiters", "msys_create_order_waiting_requests", "CreateOrder calls waiting for their user's event"),
    (
        "user_wait_wakeups_total",
        "msys_user_wait_wakeups_total",
        "Times a waiting CreateOrder call was woken by its user's arrival to look again",
    ),
    (
        "user_wait_sweeps_total",
        "msys_user_wait_sweeps_total",
        "Queries for awaited users that another order process may have applied",
    ),
    ("partitions_assigned", "msys_consumer_partitions_assigned", "Partitions assigned to this consumer"),
    ("apply_batch_size", "msys_apply_batch_size_events", "Events applied per replica transaction"),
    (
        "event_apply_lag_seconds",
        "msys_event_apply_lag_seconds",
        "Time from an event's ce_time to its apply in the replica",
    ),
    ("consumer_position", "msys_consumer_position_offset", "Next offset the consumer will read, per partition"),
    ("consumer_lag_records", "msys_consumer_lag_records", "Records between the consumer and the high watermark"),
    // promtool rejects a unit other than the base one in a name, so this
    // one (milliseconds, older than the histogram above) says it in its help.
    ("last_event_lag_ms", "msys_last_event_lag", "Lag of the last applied event, in milliseconds"),
    // every role
    ("db_pool_size", "msys_db_pool_size_connections", "Connections the pool holds (open)"),
    ("db_pool_in_use", "msys_db_pool_in_use_connections", "Pool connections checked out"),
    ("db_pool_waiters", "msys_db_pool_waiting_requests", "Requests waiting for a pool connection"),
];

/// The Prometheus family name (a counter's without `_total`) and help.
pub fn exported(name: &str) -> (String, String) {
    let (full, help) = match KNOWN.iter().find(|(known, ..)| *known == name) {
        Some((_, full, help)) => ((*full).to_owned(), (*help).to_owned()),
        None => (format!("msys_{}", sanitize(name)), name.replace('_', " ")),
    };
    let family = full.strip_suffix("_total").map(str::to_owned).unwrap_or(full);
    (family, help)
}

/// Counters are the names that end in `_total` (the Prometheus convention).
pub fn is_counter(name: &str) -> bool {
    name.ends_with("_total")
}

/// Prometheus names are `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_names_get_their_unit_and_counters_lose_total_for_the_encoder() {
        assert_eq!(exported("outbox_pending").0, "msys_outbox_pending_rows");
        assert_eq!(exported("events_applied_total").0, "msys_events_applied");
        assert_eq!(exported("some-new thing").0, "msys_some_new_thing");
    }
}
