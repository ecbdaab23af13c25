//! SQL for users. Each change to a user and its outbox row are written by ONE
//! statement (a data-modifying CTE), so they commit or fail together with a
//! single round trip: there is no moment at which a user changed and its
//! event does not exist, or the other way round.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::Arc,
    time::SystemTime,
};

use deadpool_postgres::Pool;
use tokio::time::Instant;
use tokio_postgres::{Row, error::SqlState};

use super::domain::{Email, UserChanges, UserName};
use crate::{
    db::{self, DbError, col},
    error::ServiceError,
    events::EventType,
    pb,
    trace::TraceContext,
    validate::Page,
};

const COLUMNS: &str = "id, name, email, version, created_at, updated_at";

/// Creates a batch of users: `$1` names, `$2` emails, `$3` idempotency keys
/// (NULL for none), `$5` traceparents and `$6` tracestates (NULL for none;
/// arrays of one length), `$4` event type. A row whose email
/// or key is taken (by an existing user or by an earlier row of the same
/// batch, whatever the case) is skipped rather than failing the others.
/// Each input row draws its id before the insert, so the result names every
/// created user by its input position (`ord`, from 1): answers are matched
/// to callers by position, never by what the database made of an email.
/// `scripts/bench/create_user.sql` runs the same statement under pgbench;
/// keep them in step. (Kept short before `INSERT INTO users`: the monitor
/// shows a statement's first 300 characters.)
const CREATE: &str = "
WITH input AS MATERIALIZED (
    SELECT nextval(pg_get_serial_sequence('users', 'id')) AS id, *
      FROM unnest($1::text[], $2::text[], $3::text[], $5::text[], $6::text[])
           WITH ORDINALITY AS t(name, email, request_id, tp, ts, ord)
), u AS (
    INSERT INTO users (id, name, email, request_id)
    SELECT id, name, email, request_id FROM input ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id, name, email, version, created_at, updated_at
), o AS (
    INSERT INTO user_outbox (event_type, user_id, user_name, user_email, user_version, user_created_at, user_updated_at,
                             traceparent, tracestate)
    SELECT $4, u.id, u.name, u.email, u.version, u.created_at, u.updated_at, input.tp, input.ts
      FROM u JOIN input USING (id) ORDER BY id
)
SELECT input.ord, u.id, u.name, u.email, u.version, u.created_at, u.updated_at FROM u JOIN input USING (id)";

/// `$1` id, `$2` new name or NULL, `$3` new email or NULL, `$4` event type,
/// `$5` traceparent, `$6` tracestate.
const UPDATE: &str = "
WITH u AS (
    UPDATE users
       SET name = COALESCE($2, name), email = COALESCE($3, email),
           version = version + 1, updated_at = now()
     WHERE id = $1
    RETURNING id, name, email, version, created_at, updated_at
), o AS (
    INSERT INTO user_outbox (event_type, user_id, user_name, user_email, user_version, user_created_at, user_updated_at,
                             traceparent, tracestate)
    SELECT $4, id, name, email, version, created_at, updated_at, $5, $6 FROM u
)
SELECT id, name, email, version, created_at, updated_at FROM u";

/// `$1` id, `$2` event type, `$3` traceparent, `$4` tracestate. The event
/// carries the user as it was, with the next version, so consumers see the
/// deletion as newer than any update.
const DELETE: &str = "
WITH u AS (
    DELETE FROM users WHERE id = $1
    RETURNING id, name, email, version, created_at, updated_at
), o AS (
    INSERT INTO user_outbox (event_type, user_id, user_name, user_email, user_version, user_created_at, user_updated_at,
                             traceparent, tracestate)
    SELECT $2, id, name, email, version + 1, created_at, now(), $3, $4 FROM u
)
SELECT id FROM u";

fn user_from_row(row: &Row) -> Result<pb::User, DbError> {
    let created_at: SystemTime = col(row, "created_at")?;
    let updated_at: SystemTime = col(row, "updated_at")?;
    Ok(pb::User {
        id: col(row, "id")?,
        name: col(row, "name")?,
        email: col(row, "email")?,
        version: col(row, "version")?,
        created_at: Some(created_at.into()),
        updated_at: Some(updated_at.into()),
    })
}

/// Turns a failed write into what the client should hear.
fn write_error(error: DbError, email: Option<&Email>) -> ServiceError {
    if error.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        let email = email.map_or("", Email::as_str);
        return ServiceError::AlreadyExists(format!("a user with email {email:?} already exists"));
    }
    error.into()
}

/// A user to create, already validated.
pub struct NewUser {
    pub name: UserName,
    pub email: Email,
    /// The caller's idempotency key: a retry with the same key gets the user
    /// the first attempt created instead of ALREADY_EXISTS.
    pub request_id: Option<String>,
    /// Stored with the outbox row, published with the event.
    pub trace: TraceContext,
}

/// Creates every user of the batch in ONE statement (and so one commit),
/// each with its outbox row. Answers per item, in order: the user, or the
/// user an earlier call with the same idempotency key created, or
/// ALREADY_EXISTS if the email was taken, or the batch's failure.
pub async fn create_batch(
    pool: &Pool,
    batch: Vec<NewUser>,
    deadline: Option<Instant>,
) -> Vec<Result<pb::User, ServiceError>> {
    // Identical emails in one batch: only the first is sent; the others get
    // the first one's fate, as if they had arrived just after it.
    let mut first_of: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    let mut sent = Vec::with_capacity(batch.len()); // input position → batch index
    let (mut names, mut emails, mut keys) = (Vec::new(), Vec::new(), Vec::new());
    let (mut parents, mut states) = (Vec::new(), Vec::new());
    for (i, user) in batch.iter().enumerate() {
        if let Entry::Vacant(slot) = first_of.entry(user.email.as_str()) {
            slot.insert(i);
            sent.push(i);
            names.push(user.name.as_str());
            emails.push(user.email.as_str());
            keys.push(user.request_id.as_deref());
            parents.push(user.trace.traceparent.as_deref());
            states.push(user.trace.tracestate.as_deref());
        }
    }
    let created = async {
        let client = pool.get().await.map_err(DbError::from)?;
        let statement = client.prepare_cached(CREATE).await.map_err(DbError::from)?;
        let event = EventType::Created.as_str();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&names, &emails, &keys, &event, &parents, &states];
        let rows = db::within(&client, deadline, client.query(&statement, &params)).await?;
        let mut created: Vec<Option<pb::User>> = vec![None; batch.len()];
        for row in &rows {
            let ord: i64 = col(row, "ord")?;
            let slot = usize::try_from(ord - 1).ok().and_then(|position| sent.get(position));
            let Some(&i) = slot else {
                let message = format!("the create statement returned input position {ord} of {}", sent.len());
                return Err(ServiceError::Unexpected(anyhow::anyhow!(message)));
            };
            created[i] = Some(user_from_row(row)?);
        }
        // A retried call finds its key taken: it gets the user its first attempt created.
        let retried: Vec<&str> = batch
            .iter()
            .zip(&created)
            .filter(|(_, user)| user.is_none())
            .filter_map(|(new, _)| new.request_id.as_deref())
            .collect();
        let mut earlier = HashMap::new();
        if !retried.is_empty() {
            let statement = client
                .prepare_cached(&format!("SELECT request_id, {COLUMNS} FROM users WHERE request_id = ANY($1)"))
                .await
                .map_err(DbError::from)?;
            for row in db::within(&client, deadline, client.query(&statement, &[&retried])).await? {
                earlier.insert(col::<String>(&row, "request_id")?, user_from_row(&row)?);
            }
        }
        Ok::<_, ServiceError>((created, earlier))
    };
    let (created, earlier) = match created.await {
        Ok(created) => created,
        Err(error) => return shared_failure(error, batch.len()),
    };
    batch
        .iter()
        .zip(created)
        .map(|(user, created)| {
            // Only the first of the batch with this email was sent; a later one
            // finds it taken, as does a first one whose row was not inserted.
            let earlier = user.request_id.as_ref().and_then(|key| earlier.get(key).cloned());
            created.or(earlier).ok_or_else(|| {
                ServiceError::AlreadyExists(format!("a user with email {:?} already exists", user.email.as_str()))
            })
        })
        .collect()
}

/// Reads a batch of users by id with ONE query. Answers per id, in order:
/// the user or NOT_FOUND, or the batch's failure.
pub async fn get_batch(pool: &Pool, ids: Vec<i64>, deadline: Option<Instant>) -> Vec<Result<pb::User, ServiceError>> {
    let found = async {
        let client = pool.get().await.map_err(DbError::from)?;
        let statement = client
            .prepare_cached(&format!("SELECT {COLUMNS} FROM users WHERE id = ANY($1)"))
            .await
            .map_err(DbError::from)?;
        let rows = db::within(&client, deadline, client.query(&statement, &[&ids])).await?;
        rows.iter()
            .map(|row| user_from_row(row).map(|user| (user.id, user)))
            .collect::<Result<HashMap<i64, pb::User>, DbError>>()
    };
    match found.await {
        Ok(found) => ids.iter().map(|id| found.get(id).cloned().ok_or_else(|| not_found(*id))).collect(),
        Err(error) => shared_failure(error.into(), ids.len()),
    }
}

/// The same failure, once per item of a batch.
fn shared_failure(error: ServiceError, items: usize) -> Vec<Result<pb::User, ServiceError>> {
    let error = Arc::new(error);
    (0..items).map(|_| Err(ServiceError::Shared(error.clone()))).collect()
}

/// One page of users by ascending id, and the token of the next page if any.
pub async fn list(
    pool: &Pool,
    page: Page,
    deadline: Option<Instant>,
) -> Result<(Vec<pb::User>, Option<String>), ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement = client
        .prepare_cached(&format!("SELECT {COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2"))
        .await
        .map_err(DbError::from)?;
    // One row more than asked tells whether another page exists.
    let limit = i64::from(page.size) + 1;
    let after = page.after.unwrap_or(0);
    let rows = db::within(&client, deadline, client.query(&statement, &[&after, &limit])).await?;
    let mut users = rows.iter().map(user_from_row).collect::<Result<Vec<_>, _>>()?;
    let next = page.cut(&mut users, |u| u.id);
    Ok((users, next))
}

pub async fn update(
    pool: &Pool,
    id: i64,
    changes: &UserChanges,
    trace: &TraceContext,
    deadline: Option<Instant>,
) -> Result<pb::User, ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement = client.prepare_cached(UPDATE).await.map_err(DbError::from)?;
    let name = changes.name.as_ref().map(UserName::as_str);
    let email = changes.email.as_ref().map(Email::as_str);
    let event = EventType::Updated.as_str();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
        [&id, &name, &email, &event, &trace.traceparent, &trace.tracestate];
    let row = db::within(&client, deadline, client.query_opt(&statement, &params))
        .await
        .map_err(|e| write_error(e, changes.email.as_ref()))?;
    Ok(user_from_row(&row.ok_or_else(|| not_found(id))?)?)
}

pub async fn delete(pool: &Pool, id: i64, trace: &TraceContext, deadline: Option<Instant>) -> Result<(), ServiceError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let statement = client.prepare_cached(DELETE).await.map_err(DbError::from)?;
    let event = EventType::Deleted.as_str();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&id, &event, &trace.traceparent, &trace.tracestate];
    let row = db::within(&client, deadline, client.query_opt(&statement, &params)).await?;
    row.map(|_| ()).ok_or_else(|| not_found(id))
}

fn not_found(id: i64) -> ServiceError {
    ServiceError::NotFound(format!("user {id} does not exist"))
}
