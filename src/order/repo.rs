//! SQL for orders. Placing an order reads the user under a share lock in the
//! same statement, so a deletion applied concurrently either waits for the
//! new order (and then cancels it) or runs first (and the order is refused):
//! no open order can outlive its user.

use std::time::SystemTime;

use deadpool_postgres::Pool;
use tokio_postgres::Row;

use super::domain::{NewOrder, status_from_db};
use crate::{
    db::{DbError, col},
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

/// Cancels an open order, or returns it unchanged if it was cancelled
/// already; no row means no such order.
const CANCEL: &str = "
WITH c AS (
    UPDATE orders SET status = 'CANCELLED', cancel_reason = $2, updated_at = now()
     WHERE id = $1 AND status = 'OPEN'
    RETURNING id, user_id, product, quantity, status, cancel_reason, created_at, updated_at
)
SELECT * FROM c
UNION ALL
SELECT id, user_id, product, quantity, status, cancel_reason, created_at, updated_at
  FROM orders WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM c)";

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

pub async fn place(pool: &Pool, order: &NewOrder) -> Result<Placement, ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement = client.prepare_cached(PLACE).await.map_err(DbError::from)?;
    let placed = client
        .query_opt(&statement, &[&order.user_id, &order.product, &order.quantity])
        .await
        .map_err(DbError::from)?;
    if let Some(row) = placed {
        return Ok(Placement::Placed(order_from_row(&row)?));
    }
    let deleted = client
        .query_opt("SELECT 1 FROM deleted_users WHERE user_id = $1", &[&order.user_id])
        .await
        .map_err(DbError::from)?;
    Ok(if deleted.is_some() { Placement::DeletedUser } else { Placement::UnknownUser })
}

pub async fn get(pool: &Pool, id: i64) -> Result<pb::Order, ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement =
        client.prepare_cached(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1")).await.map_err(DbError::from)?;
    let row = client.query_opt(&statement, &[&id]).await.map_err(DbError::from)?;
    Ok(order_from_row(&row.ok_or_else(|| not_found(id))?)?)
}

/// One page of a user's orders, newest first.
pub async fn list(pool: &Pool, user_id: i64, page: Page) -> Result<(Vec<pb::Order>, Option<String>), ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM orders WHERE user_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        ))
        .await
        .map_err(DbError::from)?;
    let before = page.after.unwrap_or(i64::MAX);
    let limit = i64::from(page.size) + 1;
    let rows = client.query(&statement, &[&user_id, &before, &limit]).await.map_err(DbError::from)?;
    let mut orders = rows.iter().map(order_from_row).collect::<Result<Vec<_>, _>>()?;
    let next = page.cut(&mut orders, |o| o.id);
    Ok((orders, next))
}

pub async fn cancel(pool: &Pool, id: i64, reason: &str) -> Result<pb::Order, ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement = client.prepare_cached(CANCEL).await.map_err(DbError::from)?;
    let row = client.query_opt(&statement, &[&id, &reason]).await.map_err(DbError::from)?;
    Ok(order_from_row(&row.ok_or_else(|| not_found(id))?)?)
}

fn not_found(id: i64) -> ServiceError {
    ServiceError::NotFound(format!("order {id} does not exist"))
}
