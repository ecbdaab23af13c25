//! The PostgreSQL collector: one connection of its own per database (never a
//! role's pool), a few catalogue queries per tick, and pg_stat_statements'
//! top statements. Every statement it sends starts with `/* msys-monitor */`,
//! so its own statements are left out of the top lists and the load the
//! monitor puts on the server can be read in pg_stat_statements.
//!
//! Derivations: transactions per second and rollback % are deltas of
//! pg_stat_database's xact_commit/xact_rollback over the interval, minus the
//! monitor's own transactions (one per statement it sent); cache hit % is
//! blks_hit / (blks_hit + blks_read) since the statistics were reset;
//! avg_query_ms is the delta of pg_stat_statements' total_exec_time over the
//! delta of its calls (the monitor's statements excluded).

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio_postgres::{Client, Row};

use crate::{config::PostgresSettings, pb};

const TAG: &str = "/* msys-monitor */";
/// Rows of each top-statements list.
const TOP: i64 = 5;
const QUERY_TEXT_CHARS: usize = 300;

const ACTIVITY: &str = "/* msys-monitor */
WITH a AS (
    SELECT * FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
), mine AS (SELECT * FROM a WHERE datname = current_database())
SELECT
    (SELECT count(*) FROM mine WHERE state = 'active') AS active,
    (SELECT count(*) FROM mine WHERE state = 'idle') AS idle,
    (SELECT count(*) FROM mine WHERE state LIKE 'idle in transaction%') AS idle_tx,
    (SELECT count(*) FROM a) + 1 AS server_connections,
    current_setting('max_connections')::bigint AS max_connections,
    pg_database_size(current_database()) AS size,
    d.xact_commit, d.xact_rollback, d.blks_hit, d.blks_read,
    (SELECT coalesce(extract(epoch FROM max(now() - query_start)), 0)::float8 FROM mine WHERE state = 'active') AS longest_query_s,
    (SELECT left(query, 300) FROM mine WHERE state = 'active' ORDER BY query_start LIMIT 1) AS longest_query,
    (SELECT coalesce(extract(epoch FROM max(now() - xact_start)), 0)::float8 FROM mine) AS longest_xact_s,
    (SELECT count(*) FROM mine WHERE cardinality(pg_blocking_pids(pid)) > 0) AS blocked
FROM pg_stat_database d WHERE d.datname = current_database()";

const STATEMENT_TOTALS: &str = "/* msys-monitor */
SELECT coalesce(sum(calls), 0)::bigint AS calls, coalesce(sum(total_exec_time), 0)::float8 AS total_ms
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query NOT LIKE '/* msys-monitor */%'";

const TOP_STATEMENTS: &str = "/* msys-monitor */
WITH s AS (
    SELECT query, calls, total_exec_time, mean_exec_time, rows FROM pg_stat_statements
    WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND query NOT LIKE '/* msys-monitor */%' AND calls > 0
)
(SELECT 'total' AS list, * FROM s ORDER BY total_exec_time DESC LIMIT $1)
UNION ALL
(SELECT 'mean' AS list, * FROM s ORDER BY mean_exec_time DESC LIMIT $1)";

/// The users database's outbox: ids handed out (the identity sequence),
/// rows still unpublished (a partial index keeps this cheap) and the oldest
/// of them. Published = written - pending.
const OUTBOX: &str = "/* msys-monitor */
SELECT
    coalesce(pg_sequence_last_value(pg_get_serial_sequence('user_outbox', 'id')::regclass), 0) AS written,
    (SELECT count(*) FROM user_outbox WHERE published_at IS NULL) AS pending,
    coalesce(extract(epoch FROM now() - (SELECT occurred_at FROM user_outbox WHERE published_at IS NULL ORDER BY id LIMIT 1)), 0)::float8 AS oldest_s";

/// What the outbox table says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outbox {
    pub written: i64,
    pub pending: i64,
    pub oldest_pending_age_seconds: f64,
}

#[derive(Clone, Copy)]
struct Counters {
    at: Instant,
    commits: i64,
    rollbacks: i64,
    size: i64,
    statement_calls: i64,
    statement_ms: f64,
    /// Statements the monitor itself sent since the previous sample.
    own_transactions: i64,
}

pub struct PostgresTarget {
    name: &'static str,
    settings: PostgresSettings,
    client: Option<Client>,
    statements: Result<(), String>,
    with_outbox: bool,
    prev: Option<Counters>,
    last: Option<pb::DatabaseStatus>,
    pub outbox: Option<Outbox>,
}

impl PostgresTarget {
    /// `with_outbox`: this is the users database, whose outbox the event flow reads.
    pub fn new(name: &'static str, settings: PostgresSettings, with_outbox: bool) -> Self {
        PostgresTarget {
            name,
            settings,
            client: None,
            statements: Err("not checked yet".into()),
            with_outbox,
            prev: None,
            last: None,
            outbox: None,
        }
    }

    /// One probe within `deadline`; never fails: an unreachable database gives
    /// its last sample, stale, with the error.
    pub async fn sample(&mut self, deadline: Duration) -> pb::DatabaseStatus {
        let started = Instant::now();
        let result = match tokio::time::timeout(deadline, self.probe()).await {
            Ok(result) => result.map_err(|e| format!("{e:#}")),
            Err(_) => Err(format!("no answer within {} ms", deadline.as_millis())),
        };
        let probe_ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(mut status) => {
                status.probe_ms = probe_ms;
                self.last = Some(status.clone());
                status
            }
            Err(error) => {
                // A broken or timed-out connection is not reused: the next tick reconnects.
                self.client = None;
                self.outbox = None;
                let mut status = self.last.clone().unwrap_or_else(|| pb::DatabaseStatus {
                    name: self.name.to_owned(),
                    database: self.settings.dbname.clone(),
                    ..Default::default()
                });
                status.reachable = false;
                status.stale = true;
                status.error = error;
                status.probe_ms = probe_ms;
                status
            }
        }
    }

    async fn connect(&mut self) -> anyhow::Result<&Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = crate::db::connect_single(&self.settings, "msys-monitor", Duration::from_secs(2)).await?;
            self.statements = enable_statements(&client).await;
            self.prev = None;
            self.client = Some(client);
        }
        self.client.as_ref().context("no connection")
    }

    async fn probe(&mut self) -> anyhow::Result<pb::DatabaseStatus> {
        let name = self.name;
        let dbname = self.settings.dbname.clone();
        let with_outbox = self.with_outbox;
        let statements_ok = {
            self.connect().await?;
            self.statements.clone()
        };
        let client = self.client.as_ref().context("no connection")?;
        let mut own = 1;
        let row = client.query_one(ACTIVITY, &[]).await.context("reading pg_stat_activity")?;
        let (mut calls, mut exec_ms, mut tops) = (0, 0.0, Vec::new());
        if statements_ok.is_ok() {
            let totals = client.query_one(STATEMENT_TOTALS, &[]).await.context("reading pg_stat_statements")?;
            calls = totals.try_get("calls")?;
            exec_ms = totals.try_get("total_ms")?;
            tops = client.query(TOP_STATEMENTS, &[&TOP]).await.context("reading pg_stat_statements")?;
            own += 2;
        }
        // A database the user role has not migrated yet has no outbox: that
        // leaves the event flow's outbox figures unknown, not the database down.
        let outbox = if with_outbox {
            own += 1;
            match client.query_one(OUTBOX, &[]).await {
                Ok(o) => Some(Outbox {
                    written: o.try_get("written")?,
                    pending: o.try_get("pending")?,
                    oldest_pending_age_seconds: o.try_get("oldest_s")?,
                }),
                Err(e) if e.code().is_some() => {
                    tracing::debug!(error = %e, "no outbox to read");
                    None
                }
                Err(e) => return Err(e).context("reading the outbox"),
            }
        } else {
            None
        };
        let now = Counters {
            at: Instant::now(),
            commits: row.try_get("xact_commit")?,
            rollbacks: row.try_get("xact_rollback")?,
            size: row.try_get("size")?,
            statement_calls: calls,
            statement_ms: exec_ms,
            own_transactions: own,
        };
        let mut status = pb::DatabaseStatus {
            name: name.to_owned(),
            database: dbname,
            reachable: true,
            sampled_at: Some(SystemTime::now().into()),
            active_connections: row.try_get("active")?,
            idle_connections: row.try_get("idle")?,
            idle_in_transaction_connections: row.try_get("idle_tx")?,
            server_connections: row.try_get("server_connections")?,
            max_connections: row.try_get("max_connections")?,
            size_bytes: now.size,
            cache_hit_percent: ratio(row.try_get("blks_hit")?, row.try_get("blks_read")?),
            longest_query_seconds: row.try_get("longest_query_s")?,
            longest_query: row.try_get::<_, Option<String>>("longest_query")?.unwrap_or_default(),
            longest_transaction_seconds: row.try_get("longest_xact_s")?,
            blocked_sessions: row.try_get("blocked")?,
            statements_enabled: statements_ok.is_ok(),
            statements_note: statements_ok.err().unwrap_or_default(),
            ..Default::default()
        };
        for top in &tops {
            let list: String = top.try_get("list")?;
            let stat = statement(top)?;
            if list == "total" { status.top_by_total_time.push(stat) } else { status.top_by_mean_time.push(stat) }
        }
        if let Some(prev) = self.prev {
            let dt = now.at.duration_since(prev.at).as_secs_f64();
            // The counters include this monitor's own transactions, one per statement sent last time.
            let commits = (now.commits - prev.commits - prev.own_transactions).max(0);
            let rollbacks = (now.rollbacks - prev.rollbacks).max(0);
            if dt > 0.0 {
                status.transactions_per_second = (commits + rollbacks) as f64 / dt;
                status.size_growth_bytes_per_second = (now.size - prev.size) as f64 / dt;
            }
            status.rollback_percent = percent(rollbacks, commits + rollbacks);
            let calls = now.statement_calls - prev.statement_calls;
            if calls > 0 {
                status.avg_query_ms = (now.statement_ms - prev.statement_ms) / calls as f64;
            }
        }
        self.prev = Some(now);
        self.outbox = outbox;
        Ok(status)
    }
}

/// Creates pg_stat_statements if it can, and says plainly why not otherwise.
async fn enable_statements(client: &Client) -> Result<(), String> {
    let not_enabled = |e: tokio_postgres::Error| {
        let detail = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
        format!("pg_stat_statements not enabled: {detail}")
    };
    client
        .batch_execute(&format!("{TAG} CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        .await
        .map_err(not_enabled)?;
    client.query_one(&format!("{TAG} SELECT count(*) FROM pg_stat_statements"), &[]).await.map_err(not_enabled)?;
    Ok(())
}

fn statement(row: &Row) -> anyhow::Result<pb::StatementStat> {
    let mut query: String = row.try_get("query")?;
    if query.chars().count() > QUERY_TEXT_CHARS {
        query = query.chars().take(QUERY_TEXT_CHARS).collect::<String>() + "…";
    }
    Ok(pb::StatementStat {
        query,
        calls: row.try_get("calls")?,
        mean_ms: row.try_get("mean_exec_time")?,
        total_ms: row.try_get("total_exec_time")?,
        rows: row.try_get("rows")?,
    })
}

/// hits / (hits + misses) as a percentage; 0 when there were none.
fn ratio(hits: i64, misses: i64) -> f64 {
    percent(hits, hits + misses)
}

fn percent(part: i64, whole: i64) -> f64 {
    if whole <= 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 }
}
