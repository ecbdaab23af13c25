//! The command line: one binary, one subcommand per role plus the tools
//! operators need around them. Parsing only; `run` hands each command to
//! the module that owns it.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::{
    all,
    config::{KafkaArgs, OrderPostgresArgs, PostgresSettings, UserPostgresArgs},
    db, events, frontend, grpc, kafka, load, migrate, monitor, order,
    telemetry::LogFormat,
    user,
};

#[derive(Parser, Debug)]
#[command(name = "msys", version, about = "Event-driven microservices over gRPC, Kafka and PostgreSQL")]
pub struct Cli {
    /// Log lines as text for people or JSON for collectors.
    #[arg(long, env = "MSYS_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

// The command is parsed once per process and moved, never copied in bulk:
// boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// The user service (gRPC, default port 50051).
    User(user::UserArgs),
    /// The order service (gRPC, default port 50052).
    Order(order::OrderArgs),
    /// The monitoring service (gRPC, default port 50053).
    Monitor(monitor::MonitorArgs),
    /// Print the monitor's current snapshot as a table (or JSON).
    Status(StatusArgs),
    /// The dashboard (HTTP, default port 80).
    Frontend(frontend::FrontendArgs),
    /// Every implemented role in one process, each on its own port.
    All(all::AllArgs),
    /// Apply a role's schema migrations and exit.
    Migrate(MigrateArgs),
    /// Inspect and prepare the event topic.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Ask a role's grpc.health.v1 service; exit 0 only if SERVING.
    Health(HealthArgs),
    /// Load-test the system: open or closed loop, profiles, thresholds (exit 99 on failure).
    Load(Box<load::cli::LoadArgs>),
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateTarget {
    User,
    Order,
    All,
}

/// Run as the migration role (the schema's owner); the services then connect
/// as the application role named by --grant-to, with DML rights only.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    #[arg(value_enum)]
    pub target: MigrateTarget,
    /// The application role to grant SELECT/INSERT/UPDATE/DELETE (and nothing more) after migrating.
    #[arg(long, env = "MSYS_APP_ROLE")]
    pub grant_to: Option<String>,
    #[command(flatten)]
    pub user_postgres: UserPostgresArgs,
    #[command(flatten)]
    pub order_postgres: OrderPostgresArgs,
}

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// Print the topic's records as JSON lines.
    Tail(events::tail::TailArgs),
    /// Create the topic if it is missing (an existing one is left as it is).
    CreateTopic(CreateTopicArgs),
    /// List topics and their partition counts; fails if no broker answers.
    ListTopics {
        #[command(flatten)]
        kafka: KafkaArgs,
    },
}

#[derive(Args, Debug)]
pub struct CreateTopicArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Defaults to --user-events-topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Defaults to --user-events-partitions.
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Defaults to --user-events-replication-factor.
    #[arg(long)]
    pub replication_factor: Option<i32>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The monitor's gRPC address.
    #[arg(long, env = "MONITOR_ADDR", default_value = "http://127.0.0.1:50053")]
    pub monitor: String,
    /// Print the snapshot as proto3 JSON (enum words, every field) for scripts.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// HOST:PORT of the role.
    pub addr: String,
    /// A service name, e.g. msys.v1.UserService; empty for the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl Command {
    /// The subcommand's name (`user`, `order`, `all`, …), for the service
    /// name in traces (`msys-<role>`). Read from the variant's name so that
    /// it needs no change when a role gains or loses arguments.
    pub fn role(&self) -> String {
        let debug = format!("{self:?}");
        debug.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or("cli").to_ascii_lowercase()
    }
}

/// Runs one command until it finishes or `shutdown` fires.
pub async fn run(command: Command, shutdown: CancellationToken) -> anyhow::Result<()> {
    match command {
        Command::User(args) => user::run(args, shutdown).await,
        Command::All(args) => all::run(args, shutdown).await,
        Command::Order(args) => order::run(args, shutdown).await,
        Command::Monitor(args) => monitor::run(args, shutdown).await,
        Command::Status(args) => {
            let snapshot = monitor::table::fetch(&args.monitor, args.timeout).await?;
            if args.json {
                println!("{}", monitor::table::json(&snapshot)?);
            } else {
                print!("{}", monitor::table::render(&snapshot));
            }
            Ok(())
        }
        Command::Frontend(args) => frontend::run(args, shutdown).await,
        Command::Migrate(args) => run_migrate(args).await,
        Command::Events(EventsCommand::Tail(args)) => events::tail::run(args, shutdown).await,
        Command::Events(EventsCommand::CreateTopic(args)) => {
            let topic = args.topic.unwrap_or_else(|| args.kafka.user_events_topic.clone());
            let partitions = args.partitions.unwrap_or(args.kafka.user_events_partitions);
            let replication = args.replication_factor.unwrap_or(args.kafka.user_events_replication_factor);
            kafka::ensure_topic(&args.kafka, &topic, partitions, replication).await
        }
        Command::Events(EventsCommand::ListTopics { kafka: args }) => {
            for (topic, partitions) in kafka::list_topics(&args, Duration::from_secs(5)).await? {
                println!("{topic} {partitions}");
            }
            Ok(())
        }
        Command::Load(args) => load::cli::run(*args, shutdown).await,
        Command::Health(args) => {
            let status = grpc::check_health(&args.addr, &args.service, args.timeout).await?;
            println!("{status}");
            if status != "SERVING" {
                bail!("{} reports {status}", args.addr);
            }
            Ok(())
        }
    }
}

async fn run_migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let mut targets: Vec<(PostgresSettings, &[migrate::Migration])> = Vec::new();
    if matches!(args.target, MigrateTarget::User | MigrateTarget::All) {
        targets.push((args.user_postgres.into(), migrate::USERS));
    }
    if matches!(args.target, MigrateTarget::Order | MigrateTarget::All) {
        targets.push((args.order_postgres.into(), migrate::ORDERS));
    }
    for (settings, migrations) in targets {
        db::ensure_database(&settings).await?;
        let pool = db::pool(&settings)?;
        let applied = migrate::run(&pool, migrations).await?;
        println!("{}: {applied} migration(s) applied", settings.dbname);
        if let Some(role) = &args.grant_to {
            migrate::grant_dml(&pool, role).await?;
            println!("{}: {role} may read and write rows, and change nothing else", settings.dbname);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Cli;

    #[test]
    fn a_command_names_its_role_for_traces() {
        let role = |args: &[&str]| Cli::try_parse_from(args).map(|cli| cli.command.role()).ok();
        assert_eq!(role(&["msys", "user"]).as_deref(), Some("user"));
        assert_eq!(role(&["msys", "all"]).as_deref(), Some("all"));
        assert_eq!(role(&["msys", "events", "list-topics"]).as_deref(), Some("events"));
    }

    #[test]
    fn command_line_definition_is_consistent() {
        // Catches clashing argument ids between flattened groups (e.g. both
        // databases' --*-port) that clap would otherwise report at run time.
        Cli::command().debug_assert();
    }

    /// Every environment variable a flag reads, across all subcommands.
    fn env_vars(command: &clap::Command, found: &mut std::collections::BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(name) = arg.get_env() {
                found.insert(name.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            env_vars(sub, found);
        }
    }

    #[test]
    fn every_environment_variable_is_documented_in_the_example_file() {
        let example = include_str!("../config/msys.env.example");
        let documented: std::collections::BTreeSet<&str> = example
            .lines()
            .map(|line| line.trim_start_matches('#').trim_start())
            .filter_map(|line| line.split_once('=').map(|(name, _)| name))
            .collect();
        let mut used = std::collections::BTreeSet::new();
        env_vars(&Cli::command(), &mut used);
        let missing: Vec<_> = used.iter().filter(|name| !documented.contains(name.as_str())).collect();
        assert!(missing.is_empty(), "config/msys.env.example does not mention {missing:?}");
    }
}
