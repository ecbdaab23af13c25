//! Versioned schema migrations for both databases, embedded in the binary.
//! Every role migrates its database at start, and `msys migrate` does it
//! alone. Applying is idempotent and safe when several processes start at
//! once: an advisory lock serialises them and each version is applied once,
//! in one transaction with its bookkeeping row.
//!
//! A schema that is already up to date is only read, never written: in
//! production the migrations run as a migration role (a Kubernetes Job) and
//! the services log in as an application role with DML rights only, which
//! may not run even `CREATE TABLE IF NOT EXISTS`.

use anyhow::Context;
use deadpool_postgres::Pool;

/// One schema change: its version, a name for people, and its SQL.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const USERS: &[Migration] = &[
    Migration { version: 1, name: "users_and_outbox", sql: include_str!("migrate/users/0001_users_and_outbox.sql") },
    Migration { version: 2, name: "idempotency_keys", sql: include_str!("migrate/users/0002_idempotency_keys.sql") },
];

pub const ORDERS: &[Migration] = &[
    Migration {
        version: 1,
        name: "orders_and_user_replica",
        sql: include_str!("migrate/orders/0001_orders_and_user_replica.sql"),
    },
    Migration { version: 2, name: "replica_limits", sql: include_str!("migrate/orders/0002_replica_limits.sql") },
];

/// An arbitrary constant: the key of the advisory lock migrations hold.
const MIGRATION_LOCK: i64 = 0x6d73_7973_6d69_6772; // "msysmigr"

/// Applies the migrations the database has not seen yet; returns how many.
pub async fn run(pool: &Pool, migrations: &[Migration]) -> anyhow::Result<usize> {
    let mut client = pool.get().await.context("connecting to migrate")?;
    if let Some(applied) = applied_versions(&client).await?
        && migrations.iter().all(|m| applied.contains(&m.version))
    {
        return Ok(0);
    }
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut count = 0;
    for migration in migrations.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(migration.sql)
            .await
            .with_context(|| format!("applying migration {} ({})", migration.version, migration.name))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await?;
        tracing::info!(version = migration.version, name = migration.name, "applied migration");
        count += 1;
    }
    tx.commit().await?;
    Ok(count)
}

/// The versions recorded in `schema_migrations`, or None before the first
/// migration created it; needs nothing but SELECT.
async fn applied_versions(client: &tokio_postgres::Client) -> anyhow::Result<Option<Vec<i32>>> {
    let exists: bool =
        client.query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[]).await?.try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let rows = client.query("SELECT version FROM schema_migrations", &[]).await?;
    Ok(Some(rows.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>()?))
}
