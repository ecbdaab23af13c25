//! PostgreSQL access shared by the roles: building a bounded connection pool,
//! creating the role's database on first start, and telling "the database is
//! down" apart from "this query failed".

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::{NoTls, error::SqlState};

use crate::config::PostgresSettings;

/// How long a request waits for a connection before it is answered UNAVAILABLE;
/// short, because a client that waits longer than this would rather retry.
const POOL_WAIT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(thiserror::Error, Debug)]
pub enum DbError {
    /// No connection could be had: the server is down, unreachable or full.
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// The server answered with an error for this statement.
    #[error("query failed")]
    Query(#[source] tokio_postgres::Error),
    /// A column did not hold what the schema promises.
    #[error("column {0} could not be read")]
    Decode(String, #[source] tokio_postgres::Error),
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        DbError::Unavailable(error.into())
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> Self {
        // An error without a SQLSTATE never reached the server's executor:
        // the connection broke or closed, so it is an availability problem.
        if error.code().is_none() || error.is_closed() {
            DbError::Unavailable(error.into())
        } else {
            DbError::Query(error)
        }
    }
}

impl DbError {
    /// The SQLSTATE of a server-side error, to map constraint violations.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            DbError::Query(e) => e.code(),
            DbError::Unavailable(_) | DbError::Decode(..) => None,
        }
    }
}

/// One column of a row, or an error naming it: a schema drift must reach
/// the client as an error, never as a panic in the handler.
pub fn col<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a tokio_postgres::Row, name: &str) -> Result<T, DbError> {
    row.try_get(name).map_err(|e| DbError::Decode(name.to_owned(), e))
}

fn pg_config(settings: &PostgresSettings, dbname: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&settings.host)
        .port(settings.port)
        .user(&settings.user)
        .password(&settings.password)
        .dbname(dbname)
        .application_name("msys")
        .connect_timeout(CONNECT_TIMEOUT);
    config
}

/// Builds the role's pool. The pool connects lazily; call [`ensure_database`]
/// first so that a wrong address fails at start, not at the first request.
pub fn pool(settings: &PostgresSettings) -> anyhow::Result<Pool> {
    let manager = deadpool_postgres::Manager::from_config(
        pg_config(settings, &settings.dbname),
        NoTls,
        // Fast recycling skips a round trip per checkout; a broken connection
        // is noticed by the query that uses it and reported as UNAVAILABLE.
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    );
    let mut config = PoolConfig::new(settings.pool_size.max(1));
    config.timeouts = Timeouts { wait: Some(POOL_WAIT), create: Some(CONNECT_TIMEOUT), recycle: Some(CONNECT_TIMEOUT) };
    Pool::builder(manager).config(config).runtime(Runtime::Tokio1).build().context("building the PostgreSQL pool")
}

/// Creates the role's database if it does not exist yet, so a fresh cluster
/// (initdb, or a new container) needs no manual step.
pub async fn ensure_database(settings: &PostgresSettings) -> anyhow::Result<()> {
    let target = pg_config(settings, &settings.dbname);
    match target.connect(NoTls).await {
        Ok(_) => return Ok(()),
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!("connecting to PostgreSQL at {}:{} as {}", settings.host, settings.port, settings.user)
            });
        }
    }
    let (client, connection) = pg_config(settings, "postgres")
        .connect(NoTls)
        .await
        .context("connecting to the maintenance database `postgres` to create the role's database")?;
    let driver = tokio::spawn(connection);
    let quoted = format!("\"{}\"", settings.dbname.replace('"', "\"\""));
    let created = client.batch_execute(&format!("CREATE DATABASE {quoted}")).await;
    drop(client);
    let _ = driver.await;
    match created {
        Ok(()) => {
            tracing::info!(database = %settings.dbname, "created database");
            Ok(())
        }
        // Another process created it between our two connections.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating database {quoted}")),
    }
}

/// Waits until the database accepts connections, for at most `timeout`:
/// roles started together with their database (compose, start.sh after a
/// reboot) should not fail because PostgreSQL is still starting.
pub async fn wait_for_database(settings: &PostgresSettings, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        match ensure_database(settings).await {
            Ok(()) => return Ok(()),
            Err(error) if tokio::time::Instant::now() + delay < deadline => {
                tracing::info!(error = %format!("{error:#}"), "database not ready yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) => {
                return Err(error.context(format!("database not reachable within {timeout:?}")));
            }
        }
    }
}

/// Answers whether a pooled connection can run a trivial query in time.
pub async fn ping(pool: &Pool, timeout: Duration) -> bool {
    let probe = async {
        let client = pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(_)))
}

/// Exports the pool's state as the gauges `db_pool_size` (connections open),
/// `db_pool_in_use` (checked out) and `db_pool_waiters` (requests waiting for
/// one), sampled at every scrape and report: reading the pool's status is a
/// few loads, cheaper than tracking each checkout.
pub fn export_pool_metrics(pool: &Pool, metrics: &crate::metrics::Registry) {
    let pool = pool.clone();
    metrics.on_collect(move |metrics| {
        let status = pool.status();
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.set("db_pool_size", as_i64(status.size));
        metrics.set("db_pool_in_use", as_i64(status.size.saturating_sub(status.available)));
        metrics.set("db_pool_waiters", as_i64(status.waiting));
    });
}
