//! Applying one user event to the orders database: the effect and the
//! record that the event was applied commit in ONE transaction. Whatever
//! the consumer does around it (crash, redelivery, rebalance, a replay from
//! offset 0), each event changes the database at most once, and an older
//! snapshot never overwrites a newer one.

use std::time::SystemTime;

use crate::{
    db::DbError,
    events::{Decoded, EventType},
};
use deadpool_postgres::Pool;

/// Where a record was read from, kept with the applied event for audits.
#[derive(Debug, Clone)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
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

const RECORD: &str = "
INSERT INTO applied_events (event_id, event_type, user_id, user_version, topic, partition, \"offset\", occurred_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (event_id) DO NOTHING";

const UPSERT_USER: &str = "
INSERT INTO known_users (user_id, name, email, version)
SELECT $1, $2, $3, $4
 WHERE NOT EXISTS (SELECT 1 FROM deleted_users WHERE user_id = $1)
ON CONFLICT (user_id) DO UPDATE
   SET name = EXCLUDED.name, email = EXCLUDED.email, version = EXCLUDED.version, applied_at = now()
 WHERE known_users.version < EXCLUDED.version";

const TOMBSTONE: &str = "INSERT INTO deleted_users (user_id, version) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING";

const CANCEL_OPEN_ORDERS: &str = "
UPDATE orders SET status = 'CANCELLED', cancel_reason = $2, updated_at = now()
 WHERE user_id = $1 AND status = 'OPEN'";

pub async fn apply(pool: &Pool, decoded: &Decoded, origin: &Origin) -> Result<Outcome, DbError> {
    let Decoded { kind, id: event_id, user, event } = decoded;
    let occurred_at = event.occurred_at.and_then(|t| SystemTime::try_from(t).ok());
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let recorded = tx
        .execute(
            RECORD,
            &[
                event_id,
                &kind.as_str(),
                &user.id,
                &user.version,
                &origin.topic,
                &origin.partition,
                &origin.offset,
                &occurred_at,
            ],
        )
        .await?;
    if recorded == 0 {
        tx.commit().await?;
        return Ok(Outcome::Duplicate);
    }
    let changed = match *kind {
        EventType::Created | EventType::Updated => {
            tx.execute(UPSERT_USER, &[&user.id, &user.name, &user.email, &user.version]).await?
        }
        EventType::Deleted => {
            let first = tx.execute(TOMBSTONE, &[&user.id, &user.version]).await?;
            tx.execute("DELETE FROM known_users WHERE user_id = $1", &[&user.id]).await?;
            let reason = format!("user {} was deleted", user.id);
            let cancelled = tx.execute(CANCEL_OPEN_ORDERS, &[&user.id, &reason]).await?;
            if cancelled > 0 {
                tracing::info!(user.id = user.id, orders = cancelled, "cancelled the open orders of a deleted user");
            }
            first
        }
    };
    tx.commit().await?;
    Ok(if changed == 0 { Outcome::Stale } else { Outcome::Applied })
}
