//! Typed settings shared by the roles: PostgreSQL, Kafka and gRPC listener
//! arguments, each a clap `Args` with `env` fallbacks named as in the seed
//! (`USER_POSTGRES_HOST`, `KAFKA_HOST`, …). Defaults point at what
//! `scripts/start.sh` runs locally, so `msys user` works with no flags.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

/// A secret from the command line or the environment: kept out of `Debug`
/// output and logs (it prints as `[REDACTED]`).
fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value.to_owned()))
}

/// TLS to PostgreSQL, named as libpq's `sslmode`. msys always verifies the
/// server's certificate (chain and host name) when it uses TLS, against
/// `*_POSTGRES_SSLROOTCERT` or else the system's CA store, so `require`
/// behaves as libpq's `verify-full`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP (local development, or a private network).
    #[default]
    Disable,
    /// TLS if the server offers it, plain TCP otherwise.
    Prefer,
    /// TLS or no connection.
    Require,
    /// The same as require: the certificate and host name are verified.
    VerifyFull,
}

/// Declares one PostgreSQL argument group. Two roles each own a database, and
/// `msys all` flattens both groups into one command line, so every group needs
/// its own flag names and environment variables; a macro keeps them in step.
macro_rules! postgres_args {
    ($name:ident, $role:literal, $flag:literal, $env:literal, $default_port:literal, $default_db:literal) => {
        #[doc = concat!("Connection to the ", $role, " database.")]
        #[derive(Args, Debug, Clone)]
        pub struct $name {
            #[arg(id = concat!($flag, "-host"), long = concat!($flag, "-host"), value_name = "HOST")]
            #[arg(env = concat!($env, "_HOST"), default_value = "127.0.0.1")]
            pub host: String,
            #[arg(id = concat!($flag, "-port"), long = concat!($flag, "-port"), value_name = "PORT")]
            #[arg(env = concat!($env, "_PORT"), default_value = $default_port)]
            pub port: u16,
            #[arg(id = concat!($flag, "-user"), long = concat!($flag, "-user"), value_name = "USER")]
            #[arg(env = concat!($env, "_USER"), default_value = "postgres")]
            pub user: String,
            /// Required unless the database is on this machine (local
            /// development), where it defaults to `postgres`.
            #[arg(id = concat!($flag, "-password"), long = concat!($flag, "-password"), value_name = "PASSWORD")]
            #[arg(env = concat!($env, "_PASSWORD"), hide_env_values = true, value_parser = secret)]
            pub password: Option<SecretString>,
            #[arg(id = concat!($flag, "-db"), long = concat!($flag, "-db"), value_name = "DB")]
            #[arg(env = concat!($env, "_DB"), default_value = $default_db)]
            pub dbname: String,
            /// Upper bound on connections this process opens; requests beyond it
            /// wait (bounded by the pool timeout) instead of overloading PostgreSQL.
            #[arg(id = concat!($flag, "-pool-size"), long = concat!($flag, "-pool-size"), value_name = "N")]
            #[arg(env = concat!($env, "_POOL_SIZE"), default_value_t = 32)]
            pub pool_size: usize,
            /// TLS to the database (managed PostgreSQL services want require).
            #[arg(id = concat!($flag, "-sslmode"), long = concat!($flag, "-sslmode"), value_name = "MODE")]
            #[arg(env = concat!($env, "_SSLMODE"), value_enum, default_value = "disable")]
            pub sslmode: SslMode,
            /// PEM file of the CA(s) that signed the server's certificate;
            /// the system's CA store when unset.
            #[arg(id = concat!($flag, "-sslrootcert"), long = concat!($flag, "-sslrootcert"), value_name = "PEM")]
            #[arg(env = concat!($env, "_SSLROOTCERT"))]
            pub sslrootcert: Option<PathBuf>,
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
                    sslmode: s.tls.mode,
                    sslrootcert: s.tls.root_cert.clone(),
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
                    tls: PostgresTls { mode: a.sslmode, root_cert: a.sslrootcert },
                }
            }
        }
    };
}

postgres_args!(UserPostgresArgs, "users", "user-postgres", "USER_POSTGRES", "5434", "users_db");
postgres_args!(OrderPostgresArgs, "orders", "order-postgres", "ORDER_POSTGRES", "5435", "orders_db");

/// Where one role's database lives, whichever flags it came from.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// None: the local-development default, allowed only for a database on
    /// this machine (see [`PostgresSettings::password`]).
    pub password: Option<SecretString>,
    pub dbname: String,
    pub pool_size: usize,
    pub tls: PostgresTls,
}

/// How a role's connections to PostgreSQL are encrypted.
#[derive(Debug, Clone, Default)]
pub struct PostgresTls {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

/// The password of local development clusters (scripts/start.sh, compose).
const LOCAL_DEVELOPMENT_PASSWORD: &str = "postgres";

impl PostgresSettings {
    /// The password to log in with. Unset is allowed only for a database on
    /// this machine, where it means the local development default; anywhere
    /// else a forgotten variable must fail loudly rather than try a password
    /// everybody knows.
    pub fn password(&self) -> anyhow::Result<&str> {
        match &self.password {
            Some(password) => Ok(password.expose_secret()),
            None if is_local(&self.host) => Ok(LOCAL_DEVELOPMENT_PASSWORD),
            None => anyhow::bail!(
                "no password for the database {} on {}: set the *_POSTGRES_PASSWORD variable (only a database on \
                 this machine has a default password)",
                self.dbname,
                self.host
            ),
        }
    }
}

/// A loopback address, `localhost` or a Unix socket directory.
fn is_local(host: &str) -> bool {
    host == "localhost" || host.starts_with('/') || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
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
    #[command(flatten)]
    pub security: KafkaSecurityArgs,
}

/// How msys authenticates to Kafka and encrypts the traffic: what a managed
/// Kafka (Confluent Cloud, MSK, Aiven, …) asks for. The defaults (plaintext,
/// no SASL) fit a local broker.
#[derive(Args, Debug, Clone, Default)]
pub struct KafkaSecurityArgs {
    /// plaintext, ssl, sasl_plaintext or sasl_ssl (librdkafka's `security.protocol`).
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", value_enum, default_value = "plaintext")]
    pub kafka_security_protocol: KafkaSecurityProtocol,
    /// PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER (with sasl_*).
    #[arg(long, env = "KAFKA_SASL_MECHANISM")]
    pub kafka_sasl_mechanism: Option<String>,
    #[arg(long, env = "KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    #[arg(long, env = "KAFKA_SASL_PASSWORD", hide_env_values = true, value_parser = secret)]
    pub kafka_sasl_password: Option<SecretString>,
    /// PEM file of the CA(s) of the brokers' certificates; the system's CA store when unset.
    #[arg(long, env = "KAFKA_SSL_CA_LOCATION")]
    pub kafka_ssl_ca_location: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaSecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaSecurityArgs {
    /// The librdkafka properties these settings mean; the SASL password is
    /// the only secret, and it goes nowhere else.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let protocol = match self.kafka_security_protocol {
            KafkaSecurityProtocol::Plaintext => "plaintext",
            KafkaSecurityProtocol::Ssl => "ssl",
            KafkaSecurityProtocol::SaslPlaintext => "sasl_plaintext",
            KafkaSecurityProtocol::SaslSsl => "sasl_ssl",
        };
        let mut properties = vec![("security.protocol", protocol.to_owned())];
        if let Some(mechanism) = &self.kafka_sasl_mechanism {
            properties.push(("sasl.mechanism", mechanism.clone()));
        }
        if let Some(username) = &self.kafka_sasl_username {
            properties.push(("sasl.username", username.clone()));
        }
        if let Some(password) = &self.kafka_sasl_password {
            properties.push(("sasl.password", password.expose_secret().to_owned()));
        }
        if let Some(ca) = &self.kafka_ssl_ca_location {
            properties.push(("ssl.ca.location", ca.display().to_string()));
        }
        properties
    }
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
    /// After SIGTERM, how long the role keeps serving while reporting
    /// NOT_SERVING, before it stops accepting connections: the time load
    /// balancers and Kubernetes endpoints need to stop sending it traffic.
    #[arg(long, env = "MSYS_DRAIN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,
    /// RPCs served at once at most; more are answered RESOURCE_EXHAUSTED at
    /// once instead of queueing (health and metrics are never refused).
    #[arg(long, env = "MSYS_MAX_CONCURRENT_REQUESTS", default_value_t = crate::grpc::DEFAULT_MAX_CONCURRENT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_concurrent_requests: usize,
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Both {
        #[command(flatten)]
        postgres: UserPostgresArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    fn parse(args: &[&str]) -> Both {
        let mut argv = vec!["msys"];
        argv.extend_from_slice(args);
        match Both::try_parse_from(argv) {
            Ok(both) => both,
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn kafka_tls_and_sasl_settings_reach_the_client_configuration() {
        let both = parse(&[
            "--kafka-security-protocol",
            "sasl-ssl",
            "--kafka-sasl-mechanism",
            "SCRAM-SHA-512",
            "--kafka-sasl-username",
            "msys",
            "--kafka-sasl-password",
            "s3cret",
            "--kafka-ssl-ca-location",
            "/etc/msys/kafka-ca.pem",
        ]);
        let config = crate::kafka::client_config(&both.kafka, "test");
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("msys"));
        assert_eq!(config.get("sasl.password"), Some("s3cret"));
        assert_eq!(config.get("ssl.ca.location"), Some("/etc/msys/kafka-ca.pem"));
        // librdkafka was built with TLS: it reads the CA file (and fails on
        // one that is not there), and a SASL_SSL client starts.
        let missing_ca = config.create::<rdkafka::producer::BaseProducer>().err().map(|e| e.to_string());
        assert!(missing_ca.is_some_and(|e| e.contains("ssl.ca.location")));
        let mut without_ca = both.kafka.clone();
        without_ca.security.kafka_ssl_ca_location = None;
        let created = crate::kafka::client_config(&without_ca, "test").create::<rdkafka::producer::BaseProducer>();
        assert!(created.is_ok(), "{:?}", created.err());
    }

    #[test]
    fn plaintext_without_sasl_is_the_default() {
        let config = crate::kafka::client_config(&parse(&[]).kafka, "test");
        assert_eq!(config.get("security.protocol"), Some("plaintext"));
        assert_eq!(config.get("sasl.password"), None);
    }

    #[test]
    fn postgres_tls_settings_reach_the_settings_the_pool_is_built_from() {
        let both =
            parse(&["--user-postgres-sslmode", "verify-full", "--user-postgres-sslrootcert", "/etc/msys/pg-ca.pem"]);
        let settings = PostgresSettings::from(both.postgres);
        assert_eq!(settings.tls.mode, SslMode::VerifyFull);
        assert_eq!(settings.tls.root_cert, Some(PathBuf::from("/etc/msys/pg-ca.pem")));
    }

    #[test]
    fn passwords_never_show_in_debug_output() {
        let both = parse(&["--user-postgres-password", "pg-s3cret", "--kafka-sasl-password", "kafka-s3cret"]);
        let printed = format!("{both:?} {:?}", PostgresSettings::from(both.postgres.clone()));
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("REDACTED"), "{printed}");
    }
}
