//! PostgreSQL access shared by the roles: building a bounded connection pool,
//! creating the role's database on first start, and telling "the database is
//! down" apart from "this query failed".

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use tokio::time::Instant;
use tokio_postgres::{NoTls, error::SqlState};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PostgresSettings, SslMode};

/// How long a request waits for a connection before it is answered UNAVAILABLE;
/// short, because a client that waits longer than this would rather retry.
const POOL_WAIT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keepalives on every connection: a database host that vanishes
/// without a FIN (power loss, a partition) is noticed after idle + interval ×
/// retries ≈ 10 + 3 × 5 = 25 s, not after the kernel's two hours.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_RETRIES: u32 = 3;

/// The same bound, applied by the server to its end of the connection.
const SERVER_KEEPALIVES: &str = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3";

#[derive(thiserror::Error, Debug)]
pub enum DbError {
    /// No connection could be had, or it broke: the server is down,
    /// restarting, shutting down or unreachable.
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// A serialization failure or a deadlock: the transaction was rolled
    /// back and may be retried as it is.
    #[error("transaction conflict")]
    Conflict(#[source] tokio_postgres::Error),
    /// The statement was cancelled, normally by the call's statement timeout.
    #[error("statement cancelled: the deadline passed")]
    TimedOut,
    /// The server refused a connection because it has too many.
    #[error("database has too many connections")]
    Exhausted(#[source] anyhow::Error),
    /// The server answered with an error for this statement.
    #[error("query failed")]
    Query(#[source] tokio_postgres::Error),
    /// A column did not hold what the schema promises.
    #[error("column {0} could not be read")]
    Decode(String, #[source] tokio_postgres::Error),
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            // Connecting failed with a server error: 53300 (too many
            // connections) is an overload, the rest (57P03 starting up or
            // shutting down, 28P01, …) mean "no database for now".
            deadpool_postgres::PoolError::Backend(e) => match e.code().map(class) {
                Some(Class::Exhausted) => DbError::Exhausted(e.into()),
                _ => DbError::Unavailable(e.into()),
            },
            other => DbError::Unavailable(other.into()),
        }
    }
}

/// What a SQLSTATE means for the caller (see [`class`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The server is going away or the connection is gone: retry later.
    Unavailable,
    /// A concurrency conflict: retry now.
    Conflict,
    /// Cancelled (statement timeout): the deadline passed.
    TimedOut,
    /// Too many connections.
    Exhausted,
    /// Anything else: a bug or a constraint the caller maps itself.
    Query,
}

/// Sorts a SQLSTATE into what the client should hear. 57P01/57P02/57P03
/// (admin or crash shutdown, cannot connect now) and class 08 (connection
/// exception) are what a `pg_ctl restart` produces: they are not bugs.
pub fn class(code: &SqlState) -> Class {
    let code = code.code();
    match code {
        "57P01" | "57P02" | "57P03" => Class::Unavailable,
        _ if code.starts_with("08") => Class::Unavailable,
        "40001" | "40P01" => Class::Conflict,
        "57014" => Class::TimedOut,
        "53300" => Class::Exhausted,
        _ => Class::Query,
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> Self {
        // An error without a SQLSTATE never reached the server's executor:
        // the connection broke or closed, so it is an availability problem.
        if error.is_closed() {
            return DbError::Unavailable(error.into());
        }
        match error.code().map(class) {
            None | Some(Class::Unavailable) => DbError::Unavailable(error.into()),
            Some(Class::Conflict) => DbError::Conflict(error),
            Some(Class::TimedOut) => DbError::TimedOut,
            Some(Class::Exhausted) => DbError::Exhausted(error.into()),
            Some(Class::Query) => DbError::Query(error),
        }
    }
}

/// Runs `query` with the connection's statement timeout set to what is left
/// of the caller's deadline (the server default when the caller set none),
/// so a call the client has given up on stops using the database too: tonic
/// drops the handler at the deadline, but PostgreSQL would keep running (or
/// waiting for a lock) without this. The SET is pipelined with the query, so
/// it costs no extra round trip; it is sent with every call because pooled
/// connections keep session settings from one call to the next.
pub async fn within<T, F>(client: &tokio_postgres::Client, deadline: Option<Instant>, query: F) -> Result<T, DbError>
where
    F: Future<Output = Result<T, tokio_postgres::Error>>,
{
    let setting = match deadline {
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DbError::TimedOut);
            }
            format!("SET statement_timeout = {}", left.as_millis().max(1))
        }
        None => "SET statement_timeout TO DEFAULT".to_owned(),
    };
    let (set, result) = tokio::join!(client.simple_query(&setting), query);
    set?;
    Ok(result?)
}

impl DbError {
    /// The SQLSTATE of a server-side error, to map constraint violations.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            DbError::Query(e) => e.code(),
            DbError::Conflict(e) => e.code(),
            DbError::Unavailable(_) | DbError::TimedOut | DbError::Exhausted(_) | DbError::Decode(..) => None,
        }
    }
}

/// One column of a row, or an error naming it: a schema drift must reach
/// the client as an error, never as a panic in the handler.
pub fn col<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a tokio_postgres::Row, name: &str) -> Result<T, DbError> {
    row.try_get(name).map_err(|e| DbError::Decode(name.to_owned(), e))
}

fn pg_config(settings: &PostgresSettings, dbname: &str) -> anyhow::Result<tokio_postgres::Config> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&settings.host)
        .port(settings.port)
        .user(&settings.user)
        .password(settings.password()?)
        .dbname(dbname)
        // The process id tells operators (and the failover test) which
        // process a session in pg_stat_activity belongs to.
        .application_name(format!("msys-{}", std::process::id()))
        // The server's side of the keepalives: a client host that vanishes
        // loses its session (and the relay lock) within seconds.
        .options(SERVER_KEEPALIVES)
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .ssl_mode(match settings.tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
    Ok(config)
}

/// The TLS connector for `settings`, None for plain TCP. It verifies the
/// server's certificate chain and host name against the given CA file, or
/// the system's CA store.
fn tls(settings: &PostgresSettings) -> anyhow::Result<Option<MakeRustlsConnect>> {
    if settings.tls.mode == SslMode::Disable {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    match &settings.tls.root_cert {
        Some(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading the PostgreSQL CA file {}", path.display()))?
            {
                let cert = cert.with_context(|| format!("parsing the PostgreSQL CA file {}", path.display()))?;
                roots.add(cert).with_context(|| format!("a certificate of {} is not a usable CA", path.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        anyhow::bail!("no CA certificate to verify PostgreSQL's with: set *_POSTGRES_SSLROOTCERT");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(config)))
}

/// Opens one connection (outside the pool), with its driver on the runtime.
async fn connect(
    config: &tokio_postgres::Config,
    tls: &Option<MakeRustlsConnect>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    match tls {
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(connection);
            Ok(client)
        }
        Some(tls) => {
            let (client, connection) = config.connect(tls.clone()).await?;
            tokio::spawn(connection);
            Ok(client)
        }
    }
}

/// One connection of its own, outside any pool, e.g. the monitor's probe of
/// each database (it must not take a slot from a role's pool, and its
/// `application_name` tells its sessions apart in pg_stat_activity).
pub async fn connect_single(
    settings: &PostgresSettings,
    application_name: &str,
    timeout: Duration,
) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = pg_config(settings, &settings.dbname)?;
    config.application_name(application_name).connect_timeout(timeout);
    connect(&config, &tls(settings)?)
        .await
        .with_context(|| format!("connecting to {}:{}/{}", settings.host, settings.port, settings.dbname))
}

/// Builds the role's pool. The pool connects lazily; call [`ensure_database`]
/// first so that a wrong address fails at start, not at the first request.
pub fn pool(settings: &PostgresSettings) -> anyhow::Result<Pool> {
    let config = pg_config(settings, &settings.dbname)?;
    // Fast recycling skips a round trip per checkout; a broken connection
    // is noticed by the query that uses it and reported as UNAVAILABLE.
    let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
    let manager = match tls(settings)? {
        None => deadpool_postgres::Manager::from_config(config, NoTls, recycling),
        Some(tls) => deadpool_postgres::Manager::from_config(config, tls, recycling),
    };
    let mut config = PoolConfig::new(settings.pool_size.max(1));
    config.timeouts = Timeouts { wait: Some(POOL_WAIT), create: Some(CONNECT_TIMEOUT), recycle: Some(CONNECT_TIMEOUT) };
    Pool::builder(manager).config(config).runtime(Runtime::Tokio1).build().context("building the PostgreSQL pool")
}

/// Creates the role's database if it does not exist yet, so a fresh cluster
/// (initdb, or a new container) needs no manual step.
pub async fn ensure_database(settings: &PostgresSettings) -> anyhow::Result<()> {
    let tls = tls(settings)?;
    match connect(&pg_config(settings, &settings.dbname)?, &tls).await {
        Ok(_) => return Ok(()),
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!("connecting to PostgreSQL at {}:{} as {}", settings.host, settings.port, settings.user)
            });
        }
    }
    let client = connect(&pg_config(settings, "postgres")?, &tls)
        .await
        .context("connecting to the maintenance database `postgres` to create the role's database")?;
    let quoted = format!("\"{}\"", settings.dbname.replace('"', "\"\""));
    let created = client.batch_execute(&format!("CREATE DATABASE {quoted}")).await;
    drop(client);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_and_connection_states_are_unavailable_not_internal() {
        for code in ["57P01", "57P02", "57P03", "08000", "08003", "08006", "08001"] {
            assert_eq!(class(&SqlState::from_code(code)), Class::Unavailable, "{code}");
        }
    }

    #[test]
    fn conflicts_timeouts_and_connection_limits_have_their_own_class() {
        assert_eq!(class(&SqlState::T_R_SERIALIZATION_FAILURE), Class::Conflict);
        assert_eq!(class(&SqlState::T_R_DEADLOCK_DETECTED), Class::Conflict);
        assert_eq!(class(&SqlState::QUERY_CANCELED), Class::TimedOut);
        assert_eq!(class(&SqlState::TOO_MANY_CONNECTIONS), Class::Exhausted);
        assert_eq!(class(&SqlState::UNIQUE_VIOLATION), Class::Query);
    }

    #[test]
    fn every_sqlstate_class_reaches_the_client_with_its_grpc_code() {
        use crate::error::ServiceError;
        use tonic::{Code, Status};
        let code = |e: DbError| Status::from(ServiceError::from(e)).code();
        assert_eq!(code(DbError::Unavailable(anyhow::anyhow!("gone"))), Code::Unavailable);
        assert_eq!(code(DbError::TimedOut), Code::DeadlineExceeded);
        assert_eq!(code(DbError::Exhausted(anyhow::anyhow!("full"))), Code::ResourceExhausted);
    }

    fn remote(mode: SslMode) -> PostgresSettings {
        PostgresSettings {
            host: "db.example".into(),
            port: 5432,
            user: "app".into(),
            password: Some("secret".to_owned().into()),
            dbname: "users".into(),
            pool_size: 4,
            tls: crate::config::PostgresTls { mode, root_cert: None },
        }
    }

    #[test]
    fn the_sslmode_reaches_the_connection_settings() -> anyhow::Result<()> {
        use tokio_postgres::config::SslMode as Pg;
        assert_eq!(pg_config(&remote(SslMode::Disable), "users")?.get_ssl_mode(), Pg::Disable);
        assert_eq!(pg_config(&remote(SslMode::Prefer), "users")?.get_ssl_mode(), Pg::Prefer);
        assert_eq!(pg_config(&remote(SslMode::Require), "users")?.get_ssl_mode(), Pg::Require);
        assert_eq!(pg_config(&remote(SslMode::VerifyFull), "users")?.get_ssl_mode(), Pg::Require);
        assert!(tls(&remote(SslMode::Disable))?.is_none());
        Ok(())
    }

    #[test]
    fn a_ca_file_that_is_not_there_is_a_clear_error() {
        let mut settings = remote(SslMode::Require);
        settings.tls.root_cert = Some("/nonexistent/ca.pem".into());
        let error = tls(&settings).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn a_remote_database_needs_a_password_a_local_one_defaults_to_the_development_one() -> anyhow::Result<()> {
        let mut settings = remote(SslMode::Disable);
        settings.password = None;
        let error = pg_config(&settings, "users").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("_POSTGRES_PASSWORD"), "{error}");
        settings.host = "127.0.0.1".into();
        assert_eq!(pg_config(&settings, "users")?.get_password(), Some(&b"postgres"[..]));
        Ok(())
    }

    #[test]
    fn connections_use_tcp_keepalives_bounded_to_seconds() -> anyhow::Result<()> {
        let config = pg_config(&remote(SslMode::Disable), "users")?;
        assert!(config.get_keepalives());
        let retries = config.get_keepalives_retries().unwrap_or(9);
        let interval = config.get_keepalives_interval().unwrap_or(Duration::from_secs(75));
        let bound = config.get_keepalives_idle() + interval * retries;
        assert!(bound <= Duration::from_secs(30), "a dead peer is noticed after {bound:?}");
        Ok(())
    }
}
