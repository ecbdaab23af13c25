//! Retention: tables that grow with every event (the user role's published
//! outbox rows, the order role's `applied_events`) are pruned by age on a
//! schedule of their own, whatever else the role is busy with, in bounded
//! chunks and by the database's clock (`now()`), so a skewed host clock
//! neither keeps rows forever nor deletes young ones.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::db::DbError;

/// Rows deleted per statement at most: short transactions, short locks.
pub const CHUNK: i64 = 10_000;

/// One table's pruning: `statement` deletes up to `$2` rows older than `$1`
/// seconds (a float) by the database clock, and returns how many it deleted.
#[derive(Debug, Clone, Copy)]
pub struct Prune {
    pub what: &'static str,
    pub statement: &'static str,
}

/// Published outbox rows, oldest ids first (index `user_outbox_published_at`).
pub const OUTBOX: Prune = Prune {
    what: "published outbox rows",
    statement: "DELETE FROM user_outbox WHERE id IN (
                    SELECT id FROM user_outbox
                     WHERE published_at < now() - make_interval(secs => $1)
                     ORDER BY published_at LIMIT $2)",
};

/// Ids of applied events (index `applied_events_applied_at`). Safe to forget:
/// version gating makes a redelivered event's effect a no-op anyway.
pub const APPLIED_EVENTS: Prune = Prune {
    what: "applied event ids",
    statement: "DELETE FROM applied_events WHERE event_id IN (
                    SELECT event_id FROM applied_events
                     WHERE applied_at < now() - make_interval(secs => $1)
                     ORDER BY applied_at LIMIT $2)",
};

/// Deletes everything older than `retention`, chunk by chunk; returns how many rows.
pub async fn prune(pool: &Pool, prune: Prune, retention: Duration) -> Result<u64, DbError> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(prune.statement).await?;
    let age = retention.as_secs_f64();
    let mut total = 0;
    loop {
        let deleted = client.execute(&statement, &[&age, &CHUNK]).await?;
        total += deleted;
        if deleted < CHUNK as u64 {
            return Ok(total);
        }
    }
}

/// Prunes every `interval` until `stop`. Failures (the database is away)
/// are logged and retried at the next tick.
pub async fn run(pool: Pool, prune_what: Prune, retention: Duration, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match prune(&pool, prune_what, retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, what = prune_what.what, "pruned"),
            Err(error) => tracing::warn!(error = %error, what = prune_what.what, "pruning failed; retrying later"),
        }
    }
}
