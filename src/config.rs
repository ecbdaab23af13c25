//! Typed settings shared by the roles: PostgreSQL, Kafka and gRPC listener
//! arguments, each a clap `Args` with `env` fallbacks named as in the seed
//! (`USER_POSTGRES_HOST`, `KAFKA_HOST`, …). Defaults point at what
//! `scripts/start.sh` runs locally, so `msys user` works with no flags.

use std::{net::SocketAddr, time::Duration};

use clap::Args;

/// Declares one PostgreSQL argument group. Two roles each own a database, and
/// `msys all` flattens both groups into one command line, so every group needs
/// its own flag names and environment variables; a macro keeps them in step.
macro_rules! postgres_args {
    ($name:ident, $role:literal, $host:literal, $port:literal, $user:literal, $password:literal,
     $db:literal, $pool:literal, $host_env:literal, $port_env:literal, $user_env:literal,
     $password_env:literal, $db_env:literal, $pool_env:literal, $default_port:literal, $default_db:literal) => {
        #[doc = concat!("Connection to the ", $role, " database.")]
        #[derive(Args, Debug, Clone)]
        pub struct $name {
            #[arg(id = $host, long = $host, value_name = "HOST", env = $host_env, default_value = "127.0.0.1")]
            pub host: String,
            #[arg(id = $port, long = $port, value_name = "PORT", env = $port_env, default_value = $default_port)]
            pub port: u16,
            #[arg(id = $user, long = $user, value_name = "USER", env = $user_env, default_value = "postgres")]
            pub user: String,
            #[arg(id = $password, long = $password, value_name = "PASSWORD", env = $password_env, default_value = "postgres", hide_env_values = true)]
            pub password: String,
            #[arg(id = $db, long = $db, value_name = "DB", env = $db_env, default_value = $default_db)]
            pub dbname: String,
            /// Upper bound on connections this process opens; requests beyond it
            /// wait (bounded by the pool timeout) instead of overloading PostgreSQL.
            #[arg(id = $pool, long = $pool, value_name = "N", env = $pool_env, default_value_t = 32)]
            pub pool_size: usize,
        }

        impl From<&PostgresSettings> for $name {
            fn from(s: &PostgresSettings) -> Self {
                $name {
                    host: s.host.clone(),
                    port: s.port,
                    user: s.user.clone(),
                    password: s.password.clone(),
                    dbname: s.dbname.clone(),
                    pool_size: s.pool_size,
                }
            }
        }

        impl From<$name> for PostgresSettings {
            fn from(a: $name) -> Self {
                PostgresSettings {
                    host: a.host,
                    port: a.port,
                    user: a.user,
                    password: a.password,
                    dbname: a.dbname,
                    pool_size: a.pool_size,
                }
            }
        }
    };
}

postgres_args!(
    UserPostgresArgs,
    "users",
    "user-postgres-host",
    "user-postgres-port",
    "user-postgres-user",
    "user-postgres-password",
    "user-postgres-db",
    "user-postgres-pool-size",
    "USER_POSTGRES_HOST",
    "USER_POSTGRES_PORT",
    "USER_POSTGRES_USER",
    "USER_POSTGRES_PASSWORD",
    "USER_POSTGRES_DB",
    "USER_POSTGRES_POOL_SIZE",
    "5434",
    "users_db"
);
postgres_args!(
    OrderPostgresArgs,
    "orders",
    "order-postgres-host",
    "order-postgres-port",
    "order-postgres-user",
    "order-postgres-password",
    "order-postgres-db",
    "order-postgres-pool-size",
    "ORDER_POSTGRES_HOST",
    "ORDER_POSTGRES_PORT",
    "ORDER_POSTGRES_USER",
    "ORDER_POSTGRES_PASSWORD",
    "ORDER_POSTGRES_DB",
    "ORDER_POSTGRES_POOL_SIZE",
    "5435",
    "orders_db"
);

/// Where one role's database lives, whichever flags it came from.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
    pub pool_size: usize,
}

/// The Kafka cluster and the topic user events travel on.
#[derive(Args, Debug, Clone)]
pub struct KafkaArgs {
    #[arg(long, env = "KAFKA_HOST", default_value = "127.0.0.1")]
    pub kafka_host: String,
    #[arg(long, env = "KAFKA_PORT", default_value_t = 9093)]
    pub kafka_port: u16,
    /// More bootstrap brokers (host:port, comma separated) for a real cluster.
    #[arg(long, env = "KAFKA_EXTRA_BROKERS", default_value = "")]
    pub kafka_extra_brokers: String,
    #[arg(long, env = "USER_EVENTS_TOPIC", default_value = "user-events")]
    pub user_events_topic: String,
    /// Partitions of the topic when this process has to create it.
    #[arg(long, env = "USER_EVENTS_PARTITIONS", default_value_t = 3)]
    pub user_events_partitions: i32,
    #[arg(long, env = "USER_EVENTS_REPLICATION_FACTOR", default_value_t = 1)]
    pub user_events_replication_factor: i32,
}

impl KafkaArgs {
    /// The `bootstrap.servers` string librdkafka wants.
    pub fn bootstrap_servers(&self) -> String {
        let mut servers = format!("{}:{}", self.kafka_host, self.kafka_port);
        for extra in self.kafka_extra_brokers.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            servers.push(',');
            servers.push_str(extra);
        }
        servers
    }
}

/// How a role's gRPC server listens and stops.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Interface to bind; 0.0.0.0 so containers are reachable, 127.0.0.1 to stay private.
    #[arg(long, env = "MSYS_LISTEN_HOST", default_value = "0.0.0.0")]
    pub listen_host: String,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "MSYS_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// How long to wait for PostgreSQL at start before giving up.
    #[arg(long, env = "MSYS_STARTUP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub startup_timeout: Duration,
}

impl ServerArgs {
    pub fn addr(&self, port: u16) -> anyhow::Result<SocketAddr> {
        let ip: std::net::IpAddr = self
            .listen_host
            .parse()
            .map_err(|e| anyhow::anyhow!("--listen-host {:?} is not an IP address: {e}", self.listen_host))?;
        Ok(SocketAddr::new(ip, port))
    }
}
