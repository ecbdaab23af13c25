//! SQL for orders. Placing an order reads the user under a share lock in the
//! same statement, so a deletion applied concurrently either waits for the
//! new order (and then cancels it) or runs first (and the order is refused):
//! no open order can outlive its user.

use std::time::SystemTime;

use deadpool_postgres::Pool;
use tokio::time::Instant;
use tokio_postgres::Row;

use super::domain::{NewOrder, status_from_db};
use crate::{
    db::{self, DbError, col},
    error::ServiceError,
    pb,
    validate::Page,
};

const PLACE: &str = "
WITH u AS (
    SELECT user_id FROM known_users WHERE user_id = $1 FOR SHARE
)
INSERT INTO orders (user_id, product, quantity)
SELECT user_id, $2, $3 FROM u
RETURNING id, user_id, product, quantity, status, cancel_reason, created_at, updated_at";

/// Cancels an open order. No row means it was not open: cancelled already
/// (see [`cancel`]) or not there at all.
const CANCEL: &str = "
UPDATE orders SET status = 'CANCELLED', cancel_reason = $2, updated_at = now()
 WHERE id = $1 AND status = 'OPEN'
RETURNING id, user_id, product, quantity, status, cancel_reason, created_at, updated_at";

const COLUMNS: &str = "id, user_id, product, quantity, status, cancel_reason, created_at, updated_at";

/// What happened to a request to place an order.
#[derive(Debug)]
pub enum Placement {
    Placed(pb::Order),
    /// The user is not (yet) known here.
    UnknownUser,
    /// The user existed and was deleted.
    DeletedUser,
}

fn order_from_row(row: &Row) -> Result<pb::Order, DbError> {
    let created_at: SystemTime = col(row, "created_at")?;
    let updated_at: SystemTime = col(row, "updated_at")?;
    let status: String = col(row, "status")?;
    Ok(pb::Order {
        id: col(row, "id")?,
        user_id: col(row, "user_id")?,
        product: col(row, "product")?,
        quantity: col(row, "quantity")?,
        status: status_from_db(&status).into(),
        created_at: Some(created_at.into()),
        updated_at: Some(updated_at.into()),
        cancel_reason: col(row, "cancel_reason")?,
    })
}

pub async fn place(pool: &Pool, order: &NewOrder, deadline: Option<Instant>) -> Result<Placement, ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement = client.prepare_cached(PLACE).await.map_err(DbError::from)?;
    let placed =
        db::within(&client, deadline, client.query_opt(&statement, &[&order.user_id, &order.product, &order.quantity]))
            .await?;
    if let Some(row) = placed {
        return Ok(Placement::Placed(order_from_row(&row)?));
    }
    let deleted = client
        .query_opt("SELECT 1 FROM deleted_users WHERE user_id = $1", &[&order.user_id])
        .await
        .map_err(DbError::from)?;
    Ok(if deleted.is_some() { Placement::DeletedUser } else { Placement::UnknownUser })
}

pub async fn get(pool: &Pool, id: i64, deadline: Option<Instant>) -> Result<pb::Order, ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement =
        client.prepare_cached(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1")).await.map_err(DbError::from)?;
    let row = db::within(&client, deadline, client.query_opt(&statement, &[&id])).await?;
    Ok(order_from_row(&row.ok_or_else(|| not_found(id))?)?)
}

/// One page of a user's orders, newest first.
pub async fn list(
    pool: &Pool,
    user_id: i64,
    page: Page,
    deadline: Option<Instant>,
) -> Result<(Vec<pb::Order>, Option<String>), ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM orders WHERE user_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        ))
        .await
        .map_err(DbError::from)?;
    let before = page.after.unwrap_or(i64::MAX);
    let limit = i64::from(page.size) + 1;
    let rows = db::within(&client, deadline, client.query(&statement, &[&user_id, &before, &limit])).await?;
    let mut orders = rows.iter().map(order_from_row).collect::<Result<Vec<_>, _>>()?;
    let next = page.cut(&mut orders, |o| o.id);
    Ok((orders, next))
}

/// Cancels an order, or returns it as it is if it was cancelled already.
/// Two statements, not one: under READ COMMITTED an UPDATE that waited for a
/// concurrent cancel sees the new row, but the rest of its statement reads
/// the snapshot taken before the wait, where the order was still OPEN. The
/// second statement takes a new snapshot, so the loser of a race reads the
/// winner's CANCELLED.
pub async fn cancel(pool: &Pool, id: i64, reason: &str, deadline: Option<Instant>) -> Result<pb::Order, ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement = client.prepare_cached(CANCEL).await.map_err(DbError::from)?;
    if let Some(row) = db::within(&client, deadline, client.query_opt(&statement, &[&id, &reason])).await? {
        return Ok(order_from_row(&row)?);
    }
    let current =
        client.prepare_cached(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1")).await.map_err(DbError::from)?;
    let row = db::within(&client, deadline, client.query_opt(&current, &[&id])).await?;
    Ok(order_from_row(&row.ok_or_else(|| not_found(id))?)?)
}

fn not_found(id: i64) -> ServiceError {
    ServiceError::NotFound(format!("order {id} does not exist"))
}
