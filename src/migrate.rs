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
    Migration {
        version: 3,
        name: "outbox_retention_index",
        sql: include_str!("migrate/users/0003_outbox_retention_index.sql"),
    },
    Migration {
        version: 4,
        name: "outbox_trace_context",
        sql: include_str!("migrate/users/0004_outbox_trace_context.sql"),
    },
];

pub const ORDERS: &[Migration] = &[
    Migration {
        version: 1,
        name: "orders_and_user_replica",
        sql: include_str!("migrate/orders/0001_orders_and_user_replica.sql"),
    },
    Migration { version: 2, name: "replica_limits", sql: include_str!("migrate/orders/0002_replica_limits.sql") },
    Migration {
        version: 3,
        name: "applied_events_retention_index",
        sql: include_str!("migrate/orders/0003_applied_events_retention_index.sql"),
    },
];

/// An arbitrary constant: the key of the advisory lock migrations hold.
const MIGRATION_LOCK: i64 = 0x6d73_7973_6d69_6772; // "msysmigr"

/// The SQLSTATE of "permission denied".
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Applies the migrations the database has not seen yet; returns how many.
/// A database that is up to date is only read (no lock, no DDL), so the
/// services, which connect as an application role with DML rights only,
/// start against a schema `msys migrate` prepared; one that is behind is
/// migrated if this login may, or refused with what to run.
pub async fn run(pool: &Pool, migrations: &[Migration]) -> anyhow::Result<usize> {
    let mut client = pool.get().await.context("connecting to migrate")?;
    if pending(&client, migrations).await?.is_empty() {
        return Ok(0);
    }
    apply(&mut client, migrations).await.map_err(|error| {
        let denied = error
            .chain()
            .filter_map(|e| e.downcast_ref::<tokio_postgres::Error>())
            .any(|e| e.code().is_some_and(|c| c.code() == INSUFFICIENT_PRIVILEGE));
        if denied {
            error.context(
                "this login may not change the schema (services run as a DML-only role): \
                 run `msys migrate` as the migration role first",
            )
        } else {
            error
        }
    })
}

/// Versions of `migrations` the database has not applied, read without DDL.
async fn pending(client: &tokio_postgres::Client, migrations: &[Migration]) -> anyhow::Result<Vec<i32>> {
    let applied = applied_versions(client).await?.unwrap_or_default();
    Ok(migrations.iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect())
}

/// Gives `role` what a service needs and nothing more: connecting, and
/// SELECT/INSERT/UPDATE/DELETE on the tables (and their sequences). No
/// DDL, no TRUNCATE, no creating objects in the schema. Run by `msys migrate
/// --grant-to` after migrating, so new tables are covered too.
pub async fn grant_dml(pool: &Pool, role: &str) -> anyhow::Result<()> {
    let client = pool.get().await.context("connecting to grant rights")?;
    let role = quote_ident(role);
    let database: String = client.query_one("SELECT current_database()", &[]).await?.try_get(0)?;
    let database = quote_ident(&database);
    client
        .batch_execute(&format!(
            "GRANT CONNECT ON DATABASE {database} TO {role};
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             GRANT USAGE ON SCHEMA public TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role};"
        ))
        .await
        .with_context(|| format!("granting DML rights to {role}"))?;
    Ok(())
}

/// A PostgreSQL identifier, quoted.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn apply(client: &mut deadpool_postgres::Client, migrations: &[Migration]) -> anyhow::Result<usize> {
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
