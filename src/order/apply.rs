//! Applying a batch of user events to the orders database: every effect and
//! the record that each event was applied commit in ONE transaction, with a
//! fixed number of multi-row statements whatever the batch size (`unnest`
//! arrays). Whatever the consumer does around it (crash, redelivery,
//! rebalance, a replay from offset 0), each event changes the database at
//! most once, and an older snapshot never overwrites a newer one.
//!
//! Within a batch one user may appear several times (created, updated and
//! deleted in one poll): the events are folded in order, per user, onto the
//! state the database holds, so the outcome of each event and the final row
//! are exactly those of applying the events one by one.

use std::{
    collections::{HashMap, HashSet},
    time::SystemTime,
};

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::{
    db::{DbError, col},
    events::{Decoded, EventType},
};

/// One decoded record, where it was read from, and the span of its
/// processing (traces on), which a CreateOrder woken by it links to.
#[derive(Debug, Clone)]
pub struct Event {
    pub decoded: Decoded,
    pub offset: i64,
    pub span: Option<opentelemetry::trace::SpanContext>,
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Its id was applied before: a redelivery or a replay.
    Duplicate,
    /// A newer version of the user (or its deletion) was already applied.
    Stale,
}

/// Whether retrying an apply error may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The connection, the server or a lock conflict: retry the same batch.
    Transient,
    /// The data itself (SQLSTATE classes 22 and 23): retrying cannot help;
    /// the record that causes it goes to the dead-letter topic.
    Permanent,
}

/// Sorts an apply error. Anything not known to be about the data is treated
/// as transient: retrying (and saying so through readiness) is safe, while
/// dead-lettering a good record because of, say, a missing table loses it.
pub fn classify(error: &DbError) -> ErrorClass {
    match error.code().map(|c| c.code()) {
        Some(code) if code.starts_with("22") || code.starts_with("23") => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// The SQLSTATE and the server's message, for `dlq_error` and logs.
pub fn describe(error: &DbError) -> String {
    if let DbError::Query(e) = error
        && let Some(db) = e.as_db_error()
    {
        return format!("SQLSTATE {}: {}", db.code().code(), db.message());
    }
    format!("{error}: {}", std::error::Error::source(error).map(ToString::to_string).unwrap_or_default())
}

const RECORD: &str = "
INSERT INTO applied_events (event_id, event_type, user_id, user_version, topic, partition, \"offset\", occurred_at)
SELECT e, t, u, v, $5, $6, o, at
  FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int8[], $7::int8[], $8::timestamptz[]) AS x(e, t, u, v, o, at)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id";

const STATE: &str = "
SELECT x.id, k.version, d.user_id IS NOT NULL AS deleted
  FROM unnest($1::int8[]) AS x(id)
  LEFT JOIN known_users k ON k.user_id = x.id
  LEFT JOIN deleted_users d ON d.user_id = x.id";

const UPSERT_USERS: &str = "
INSERT INTO known_users (user_id, name, email, version)
SELECT u, n, e, v FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[]) AS x(u, n, e, v)
 WHERE NOT EXISTS (SELECT 1 FROM deleted_users d WHERE d.user_id = x.u)
ON CONFLICT (user_id) DO UPDATE
   SET name = EXCLUDED.name, email = EXCLUDED.email, version = EXCLUDED.version, applied_at = now()
 WHERE known_users.version < EXCLUDED.version";

const TOMBSTONES: &str = "
INSERT INTO deleted_users (user_id, version) SELECT * FROM unnest($1::int8[], $2::int8[])
ON CONFLICT (user_id) DO NOTHING";

const CANCEL_OPEN_ORDERS: &str = "
UPDATE orders SET status = 'CANCELLED', cancel_reason = 'user ' || user_id || ' was deleted', updated_at = now()
 WHERE user_id = ANY($1) AND status = 'OPEN'";

/// What the database holds for a user before the batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserState {
    pub version: Option<i64>,
    pub deleted: bool,
}

/// The net change a batch makes to one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Upsert { name: String, email: String, version: i64 },
    Delete { version: i64 },
}

/// Folds the new (not yet recorded) events in order onto the users' prior
/// states: each event's outcome as if applied alone, and each user's net
/// change. Deletion is final; a snapshot applies only over an older one.
pub fn fold<'a>(
    events: impl IntoIterator<Item = &'a Decoded>,
    prior: &HashMap<i64, UserState>,
) -> (Vec<Outcome>, HashMap<i64, Change>) {
    let mut state = prior.clone();
    let mut changes = HashMap::new();
    let outcomes = events
        .into_iter()
        .map(|Decoded { kind, user, .. }| {
            let now = state.entry(user.id).or_default();
            if now.deleted {
                return Outcome::Stale;
            }
            match kind {
                EventType::Created | EventType::Updated => {
                    if now.version.is_some_and(|v| v >= user.version) {
                        return Outcome::Stale;
                    }
                    now.version = Some(user.version);
                    let change =
                        Change::Upsert { name: user.name.clone(), email: user.email.clone(), version: user.version };
                    changes.insert(user.id, change);
                }
                EventType::Deleted => {
                    *now = UserState { version: None, deleted: true };
                    changes.insert(user.id, Change::Delete { version: user.version });
                }
            }
            Outcome::Applied
        })
        .collect();
    (outcomes, changes)
}

/// Applies `events` (all from one partition of `topic`, in offset order) in
/// one transaction and returns each event's outcome, in order.
pub async fn apply_batch(pool: &Pool, topic: &str, partition: i32, events: &[Event]) -> Result<Vec<Outcome>, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;

    // The same event twice in one batch (a relay retry) counts once.
    let mut seen = HashSet::with_capacity(events.len());
    let first: Vec<&Event> = events.iter().filter(|e| seen.insert(e.decoded.id)).collect();
    let ids: Vec<Uuid> = first.iter().map(|e| e.decoded.id).collect();
    let types: Vec<&str> = first.iter().map(|e| e.decoded.kind.as_str()).collect();
    let users: Vec<i64> = first.iter().map(|e| e.decoded.user.id).collect();
    let versions: Vec<i64> = first.iter().map(|e| e.decoded.user.version).collect();
    let offsets: Vec<i64> = first.iter().map(|e| e.offset).collect();
    let times: Vec<Option<SystemTime>> =
        first.iter().map(|e| e.decoded.event.occurred_at.and_then(|t| SystemTime::try_from(t).ok())).collect();
    // Recording first also serialises two members that briefly hold the
    // same partition during a rebalance: the second waits on the ids the
    // first inserted, then finds them applied.
    let record = tx.prepare_cached(RECORD).await?;
    let rows = tx.query(&record, &[&ids, &types, &users, &versions, &topic, &partition, &offsets, &times]).await?;
    let mut new = HashSet::with_capacity(rows.len());
    for row in &rows {
        new.insert(col::<Uuid>(row, "event_id")?);
    }
    let fresh: Vec<&Decoded> = first.iter().map(|e| &e.decoded).filter(|d| new.contains(&d.id)).collect();

    let mut prior = HashMap::new();
    if !fresh.is_empty() {
        let mut distinct: Vec<i64> = fresh.iter().map(|d| d.user.id).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let state = tx.prepare_cached(STATE).await?;
        for row in tx.query(&state, &[&distinct]).await? {
            prior
                .insert(col(&row, "id")?, UserState { version: col(&row, "version")?, deleted: col(&row, "deleted")? });
        }
    }
    let (fresh_outcomes, changes) = fold(fresh.iter().copied(), &prior);
    write_changes(&tx, changes).await?;
    tx.commit().await?;

    let by_id: HashMap<Uuid, Outcome> = fresh.iter().map(|d| d.id).zip(fresh_outcomes).collect();
    let mut reported = HashSet::with_capacity(events.len());
    Ok(events
        .iter()
        .map(|e| match by_id.get(&e.decoded.id) {
            Some(outcome) if reported.insert(e.decoded.id) => *outcome,
            _ => Outcome::Duplicate,
        })
        .collect())
}

async fn write_changes(tx: &deadpool_postgres::Transaction<'_>, changes: HashMap<i64, Change>) -> Result<(), DbError> {
    let (mut up_ids, mut names, mut emails, mut up_versions) = (vec![], vec![], vec![], vec![]);
    let (mut del_ids, mut del_versions) = (vec![], vec![]);
    for (id, change) in changes {
        match change {
            Change::Upsert { name, email, version } => {
                up_ids.push(id);
                names.push(name);
                emails.push(email);
                up_versions.push(version);
            }
            Change::Delete { version } => {
                del_ids.push(id);
                del_versions.push(version);
            }
        }
    }
    if !up_ids.is_empty() {
        let upsert = tx.prepare_cached(UPSERT_USERS).await?;
        tx.execute(&upsert, &[&up_ids, &names, &emails, &up_versions]).await?;
    }
    if !del_ids.is_empty() {
        let tombstones = tx.prepare_cached(TOMBSTONES).await?;
        tx.execute(&tombstones, &[&del_ids, &del_versions]).await?;
        tx.execute("DELETE FROM known_users WHERE user_id = ANY($1)", &[&del_ids]).await?;
        let cancelled = tx.execute(CANCEL_OPEN_ORDERS, &[&del_ids]).await?;
        if cancelled > 0 {
            tracing::info!(users = del_ids.len(), orders = cancelled, "cancelled the open orders of deleted users");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    fn event(kind: EventType, id: i64, version: i64, name: &str) -> Decoded {
        let user =
            pb::User { id, name: name.into(), email: format!("{name}@example.org"), version, ..Default::default() };
        Decoded {
            kind,
            id: Uuid::new_v4(),
            user: user.clone(),
            event: pb::UserEvent { user: Some(user), ..Default::default() },
        }
    }

    #[test]
    fn created_updated_and_deleted_in_one_batch_each_apply_and_leave_a_tombstone() {
        let batch = [
            event(EventType::Created, 7, 1, "ada"),
            event(EventType::Updated, 7, 2, "ada k"),
            event(EventType::Deleted, 7, 3, "ada k"),
        ];
        let (outcomes, changes) = fold(&batch, &HashMap::new());
        assert_eq!(outcomes, vec![Outcome::Applied; 3]);
        assert_eq!(changes, HashMap::from([(7, Change::Delete { version: 3 })]));
    }

    #[test]
    fn the_newest_snapshot_wins_and_older_ones_are_stale() {
        let batch = [
            event(EventType::Updated, 1, 3, "c"),
            event(EventType::Updated, 1, 2, "b"),
            event(EventType::Updated, 2, 5, "x"),
        ];
        let prior = HashMap::from([(2, UserState { version: Some(5), deleted: false })]);
        let (outcomes, changes) = fold(&batch, &prior);
        assert_eq!(outcomes, vec![Outcome::Applied, Outcome::Stale, Outcome::Stale]);
        let expected = Change::Upsert { name: "c".into(), email: "c@example.org".into(), version: 3 };
        assert_eq!(changes, HashMap::from([(1, expected)]));
    }

    #[test]
    fn nothing_brings_a_deleted_user_back() {
        let batch = [event(EventType::Created, 4, 9, "late"), event(EventType::Deleted, 4, 10, "late")];
        let prior = HashMap::from([(4, UserState { version: None, deleted: true })]);
        let (outcomes, changes) = fold(&batch, &prior);
        assert_eq!(outcomes, vec![Outcome::Stale, Outcome::Stale]);
        assert!(changes.is_empty());
    }
}
