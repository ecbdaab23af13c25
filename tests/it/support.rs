//! The test system: real PostgreSQL clusters and a real broker, started by
//! `scripts/test.sh` and handed over in environment variables. Every test
//! gets its own databases and topic, so tests run in parallel without seeing
//! each other. Fault tests start dedicated servers of their own (a cluster
//! they can stop, a broker they can kill) through [`DedicatedPostgres`] and
//! [`DedicatedBroker`].

use std::{
    future::Future,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use msys::{
    config::{KafkaArgs, PostgresSettings, ServerArgs},
    order::{OrderArgs, OrderRole, ReplicaArgs},
    pb::{
        self, metrics_service_client::MetricsServiceClient, order_service_client::OrderServiceClient,
        user_service_client::UserServiceClient,
    },
    user::{BatchArgs, RelayArgs, UserArgs, UserRole},
};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    message::{Headers, OwnedMessage},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A variable `scripts/test.sh` exports; a clear message if it is missing.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests with scripts/test.sh"))
}

pub fn init_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = msys::telemetry::init(msys::telemetry::LogFormat::Text, "test");
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Settings for a fresh database named `msys_test_<uuid>` on `port`
/// (created by the role on start).
pub fn fresh_database(port: u16) -> PostgresSettings {
    PostgresSettings {
        host: env("MSYS_TEST_PG_HOST"),
        port,
        user: env("MSYS_TEST_PG_USER"),
        password: Some(env("MSYS_TEST_PG_PASSWORD").into()),
        dbname: unique("msys_test"),
        pool_size: 8,
        tls: Default::default(),
    }
}

pub fn users_port() -> u16 {
    env("MSYS_TEST_USER_PG_PORT").parse().expect("MSYS_TEST_USER_PG_PORT is a port")
}

pub fn shared_broker() -> String {
    env("MSYS_TEST_KAFKA")
}

/// Kafka settings for `broker` (host:port) and a topic of this test's own.
pub fn kafka_args(broker: &str, topic: &str) -> KafkaArgs {
    let (host, port) = broker.rsplit_once(':').expect("broker is host:port");
    KafkaArgs {
        kafka_host: host.to_owned(),
        kafka_port: port.parse().expect("broker port"),
        kafka_extra_brokers: String::new(),
        user_events_topic: topic.to_owned(),
        user_events_partitions: 3,
        user_events_replication_factor: 1,
        security: Default::default(),
    }
}

pub fn orders_port() -> u16 {
    env("MSYS_TEST_ORDER_PG_PORT").parse().expect("MSYS_TEST_ORDER_PG_PORT is a port")
}

pub fn server_args() -> ServerArgs {
    ServerArgs {
        listen_host: "127.0.0.1".into(),
        shutdown_grace: Duration::from_secs(10),
        startup_timeout: Duration::from_secs(30),
        drain_delay: Duration::ZERO,
        max_concurrent_requests: msys::grpc::DEFAULT_MAX_CONCURRENT,
    }
}

pub fn order_args(db: &PostgresSettings, kafka: &KafkaArgs, group: &str) -> OrderArgs {
    OrderArgs {
        port: 0,
        metrics_port: 0,
        postgres: db.into(),
        kafka: kafka.clone(),
        server: server_args(),
        replica: ReplicaArgs {
            consumer_group: group.to_owned(),
            dlq_topic: format!("{}.dlq", kafka.user_events_topic),
            user_wait: Duration::from_secs(2),
            consumer: Default::default(),
            max_user_waiters: 1000,
            user_sweep_interval: msys::order::arrivals::SWEEP_INTERVAL,
            applied_events_retention: Duration::from_secs(7 * 86_400),
            prune_interval: Duration::from_secs(60),
        },
    }
}

pub async fn start_order(args: OrderArgs) -> RunningRole {
    let role = OrderRole::build(args).await.expect("order role builds");
    let addr = role.local_addr().expect("bound");
    let metrics_addr = role.metrics_addr().expect("bound");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(role.run_until_stopped(shutdown.clone()));
    RunningRole { addr, metrics_addr, shutdown, task }
}

pub fn user_args(db: &PostgresSettings, kafka: &KafkaArgs) -> UserArgs {
    UserArgs {
        port: 0,
        metrics_port: 0,
        postgres: db.into(),
        kafka: kafka.clone(),
        server: server_args(),
        relay: RelayArgs {
            outbox_batch_size: 500,
            outbox_poll_interval: Duration::from_millis(100),
            kafka_message_timeout: Duration::from_secs(5),
            outbox_retention: Duration::from_secs(3600),
            outbox_prune_interval: Duration::from_secs(60),
        },
        batch: BatchArgs { batch_max: 128, batch_in_flight: 2 },
    }
}

/// A role running inside the test process.
pub struct RunningRole {
    pub addr: SocketAddr,
    /// Where the role serves `GET /metrics`.
    pub metrics_addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningRole {
    /// Stops the role and asserts it drained within its grace period.
    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// Like `stop`, for a role kept in a struct that will get a new one.
    pub async fn halt(&mut self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("role stops within its grace period")
            .expect("role task did not panic");
        result.expect("role exits cleanly");
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid uri")
            .connect()
            .await
            .expect("role accepts connections")
    }
}

pub async fn start_monitor(args: msys::monitor::MonitorArgs) -> RunningRole {
    let role = msys::monitor::MonitorRole::build(args).await.expect("monitor role builds");
    let addr = role.local_addr().expect("bound");
    let metrics_addr = role.metrics_addr().expect("bound");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(role.run_until_stopped(shutdown.clone()));
    RunningRole { addr, metrics_addr, shutdown, task }
}

pub async fn start_user(args: UserArgs) -> RunningRole {
    let role = UserRole::build(args).await.expect("user role builds");
    let addr = role.local_addr().expect("bound");
    let metrics_addr = role.metrics_addr().expect("bound");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(role.run_until_stopped(shutdown.clone()));
    RunningRole { addr, metrics_addr, shutdown, task }
}

/// The user role on its own database and topic, against the shared servers.
pub struct UserSystem {
    pub db: PostgresSettings,
    pub kafka: KafkaArgs,
    pub role: RunningRole,
    pub client: UserServiceClient<Channel>,
}

impl UserSystem {
    pub async fn start() -> Self {
        init_logging();
        let db = fresh_database(users_port());
        let kafka = kafka_args(&shared_broker(), &unique("user-events"));
        let role = start_user(user_args(&db, &kafka)).await;
        let client = UserServiceClient::new(role.channel().await);
        UserSystem { db, kafka, role, client }
    }

    pub async fn create(&mut self, name: &str, email: &str) -> pb::User {
        self.client
            .create_user(pb::CreateUserRequest { name: name.into(), email: email.into() })
            .await
            .expect("create user")
            .into_inner()
    }

    /// Waits until the relay has published everything, then returns every
    /// record on the topic.
    pub async fn published_events(&self) -> Vec<OwnedMessage> {
        wait_for_outbox_drain(&self.db).await;
        read_all(&self.kafka).await
    }
}

/// A direct connection to a test database, for assertions on its tables.
pub async fn sql(db: &PostgresSettings) -> tokio_postgres::Client {
    try_sql(db).await.expect("connect to the test database")
}

pub async fn try_sql(db: &PostgresSettings) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(&db.host)
        .port(db.port)
        .user(&db.user)
        .password(db.password().expect("test databases have a password"))
        .dbname(&db.dbname)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Starts a role (`user` or `order`) as a separate process, so a test can
/// signal or SIGKILL it, configured the way operators do: by environment.
pub fn spawn_role(
    role: &str,
    port: u16,
    db: &PostgresSettings,
    kafka: &KafkaArgs,
    extra: &[(&str, &str)],
) -> tokio::process::Child {
    role_command(role, port, db, kafka, extra).spawn().expect("spawn msys")
}

/// The command `spawn_role` runs (output discarded), for a test that wants
/// to change it first, e.g. to read the role's logs.
pub fn role_command(
    role: &str,
    port: u16,
    db: &PostgresSettings,
    kafka: &KafkaArgs,
    extra: &[(&str, &str)],
) -> tokio::process::Command {
    let prefix = if role == "user" { "USER_POSTGRES" } else { "ORDER_POSTGRES" };
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_msys"));
    command
        .args([role, "--port", &port.to_string(), "--metrics-port", "0", "--listen-host", "127.0.0.1"])
        .env(format!("{prefix}_HOST"), &db.host)
        .env(format!("{prefix}_PORT"), db.port.to_string())
        .env(format!("{prefix}_USER"), &db.user)
        .env(format!("{prefix}_PASSWORD"), db.password().expect("test databases have a password"))
        .env(format!("{prefix}_DB"), &db.dbname)
        .env("KAFKA_HOST", &kafka.kafka_host)
        .env("KAFKA_PORT", kafka.kafka_port.to_string())
        .env("USER_EVENTS_TOPIC", &kafka.user_events_topic)
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
}

pub async fn wait_for_outbox_drain(db: &PostgresSettings) {
    let client = sql(db).await;
    eventually(Duration::from_secs(30), "the outbox is fully published", || async {
        let row = client.query_one("SELECT count(*) FROM user_outbox WHERE published_at IS NULL", &[]).await.ok()?;
        (row.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
}

/// Polls `probe` until it returns Some, for at most `timeout`: the bounded
/// wait for flows that cross processes. Panics with `what` on time-out.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record of the topic, from the low to the high watermark of each
/// partition at the time of the call.
pub async fn read_all(kafka: &KafkaArgs) -> Vec<OwnedMessage> {
    let topic = &kafka.user_events_topic;
    let marks = msys::kafka::watermarks(kafka, topic, Duration::from_secs(10)).await.expect("watermarks");
    let expected: i64 = marks.iter().map(|(_, low, high)| high - low).sum();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", unique("msys-test-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for (partition, _, _) in &marks {
        assignment.add_partition_offset(topic, *partition, Offset::Beginning).expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::new();
    while (records.len() as i64) < expected {
        let message = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("read {} of {expected} records, then nothing for 20 s", records.len()))
            .expect("read a record");
        records.push(message.detach());
    }
    records
}

pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Whether this process runs as root (effective uid 0), read from procfs.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            uids.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root
/// (PostgreSQL refuses to run as root).
fn pg_tool(tool: &str) -> Command {
    let path = PathBuf::from(env("MSYS_PG_BINDIR")).join(tool);
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn scratch_dir(prefix: &str) -> PathBuf {
    let dir = PathBuf::from(env("MSYS_TEST_SCRATCH")).join(unique(prefix));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    if is_root() {
        let status = Command::new("chown").arg("postgres:postgres").arg(&dir).status().expect("chown");
        assert!(status.success(), "chown {dir:?} to postgres");
    }
    dir
}

/// A PostgreSQL cluster of one test's own, which it may stop and start.
pub struct DedicatedPostgres {
    pub port: u16,
    dir: PathBuf,
}

impl DedicatedPostgres {
    pub fn start() -> Self {
        let dir = scratch_dir("pg");
        let data = dir.join("data");
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, "postgres\n").expect("write password file");
        if is_root() {
            Command::new("chown").arg("postgres:postgres").arg(&pwfile).status().expect("chown");
        }
        let status = pg_tool("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed");
        let cluster = DedicatedPostgres { port: free_port(), dir };
        cluster.resume();
        cluster
    }

    /// Starts (again) the stopped cluster on its port.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let status = pg_tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-o", &options, "start"])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(status.success(), "pg_ctl start failed; see {:?}", self.dir.join("log"));
    }

    /// Stops the cluster at once, as a crash or an outage would.
    pub fn halt(&self) {
        let status = pg_tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl stop");
        assert!(status.success(), "pg_ctl stop failed");
    }

    /// `pg_ctl restart -m <mode>`: fast ends sessions with 57P01, immediate
    /// kills the server like a crash.
    pub fn restart(&self, mode: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let status = pg_tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-m", mode, "-o", &options, "restart"])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl restart");
        assert!(status.success(), "pg_ctl restart -m {mode} failed");
    }

    pub fn database(&self) -> PostgresSettings {
        PostgresSettings { port: self.port, host: "127.0.0.1".into(), ..fresh_database(self.port) }
    }
}

impl Drop for DedicatedPostgres {
    fn drop(&mut self) {
        let _ = pg_tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A broker process of one test's own, which it may kill and restart.
pub struct DedicatedBroker {
    pub addr: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl DedicatedBroker {
    pub async fn start() -> Self {
        let dir = scratch_dir("broker");
        let mut broker = DedicatedBroker { addr: format!("127.0.0.1:{}", free_port()), dir, child: None };
        broker.resume().await;
        broker
    }

    /// Starts the broker (again) on the same port and storage.
    pub async fn resume(&mut self) {
        let url = format!("tcp://{}", self.addr);
        let log = std::fs::File::create(self.dir.join("broker.log")).expect("broker log");
        let child = Command::new(env("MSYS_NISSHI_BIN"))
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://nisshi.db"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nisshi");
        self.child = Some(child);
        let addr = self.addr.clone();
        eventually(Duration::from_secs(30), "the dedicated broker accepts connections", || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }
        })
        .await;
    }

    /// kill -9: the broker vanishes mid-conversation.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for DedicatedBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates `topic` with 3 partitions before any client can auto-create it.
pub async fn create_topic(kafka: &KafkaArgs) {
    msys::kafka::ensure_topic(kafka, &kafka.user_events_topic, 3, 1).await.expect("create topic");
}

/// Both services on their own databases, one topic and one consumer group.
pub struct Flow {
    pub users_db: PostgresSettings,
    pub orders_db: PostgresSettings,
    pub kafka: KafkaArgs,
    pub group: String,
    pub user: RunningRole,
    pub order: RunningRole,
    pub users: UserServiceClient<Channel>,
    pub orders: OrderServiceClient<Channel>,
}

impl Flow {
    pub async fn start() -> Self {
        let UsersSide { users_db, orders_db, kafka, user } = UsersSide::start().await;
        let group = unique("order-service");
        let order = start_order(order_args(&orders_db, &kafka, &group)).await;
        wait_for_assignment(&order, 3).await;
        let users = UserServiceClient::new(user.channel().await);
        let orders = OrderServiceClient::new(order.channel().await);
        Flow { users_db, orders_db, kafka, group, user, order, users, orders }
    }

    pub async fn create_user(&mut self, name: &str, email: &str) -> pb::User {
        self.users
            .create_user(pb::CreateUserRequest { name: name.into(), email: email.into() })
            .await
            .expect("create user")
            .into_inner()
    }

    pub async fn stop(self) {
        self.order.stop().await;
        self.user.stop().await;
    }
}

/// Every user as (id, name, email, version), from either side.
pub async fn user_rows(db: &PostgresSettings, query: &str) -> Vec<(i64, String, String, i64)> {
    let mut rows: Vec<_> = sql(db)
        .await
        .query(query, &[])
        .await
        .expect("query users")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    rows.sort();
    rows
}

pub const USERS_TABLE: &str = "SELECT id, name, email, version FROM users";
pub const KNOWN_USERS: &str = "SELECT user_id, name, email, version FROM known_users";

/// Waits until the order side's `known_users` equals the `users` table.
pub async fn wait_until_replica_matches(users_db: &PostgresSettings, orders_db: &PostgresSettings) {
    let mut last = (0, 0);
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let (users, known) = (user_rows(users_db, USERS_TABLE).await, user_rows(orders_db, KNOWN_USERS).await);
            if users == known {
                return;
            }
            last = (users.len(), known.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(result.is_ok(), "known_users never matched users (last seen {} users, {} known)", last.0, last.1);
}

pub async fn metric(channel: Channel, name: &str) -> i64 {
    let report =
        MetricsServiceClient::new(channel).get_metrics(pb::GetMetricsRequest {}).await.expect("metrics").into_inner();
    report.values.get(name).copied().unwrap_or(0)
}

/// Waits until the order role's consumer holds `partitions` partitions: a
/// new group's first assignment takes the broker's initial rebalance delay
/// (3 s, as in Apache Kafka), during which no event is applied.
pub async fn wait_for_assignment(order: &RunningRole, partitions: i64) {
    let channel = order.channel().await;
    eventually(Duration::from_secs(30), "the order role's consumer is assigned its partitions", || {
        let channel = channel.clone();
        async move { (metric(channel, "partitions_assigned").await == partitions).then_some(()) }
    })
    .await;
}

/// The user role running in-process on fresh databases and a fresh topic,
/// for tests that run the order role as a process of its own.
pub struct UsersSide {
    pub users_db: PostgresSettings,
    pub orders_db: PostgresSettings,
    pub kafka: KafkaArgs,
    pub user: RunningRole,
}

impl UsersSide {
    pub async fn start() -> Self {
        init_logging();
        let users_db = fresh_database(users_port());
        let orders_db = fresh_database(orders_port());
        let kafka = kafka_args(&shared_broker(), &unique("user-events"));
        create_topic(&kafka).await;
        let user = start_user(user_args(&users_db, &kafka)).await;
        UsersSide { users_db, orders_db, kafka, user }
    }
}

/// One plain HTTP exchange over a fresh connection: sends `request` (which
/// must ask the server to close, HTTP/1.0 or `connection: close`) and reads
/// the whole answer within `within`. Returns (head, body).
pub async fn http_exchange(addr: SocketAddr, request: &str, within: Duration) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connects");
    stream.write_all(request.as_bytes()).await.expect("sends the request");
    let mut answer = String::new();
    tokio::time::timeout(within, stream.read_to_string(&mut answer))
        .await
        .expect("answers in time")
        .expect("reads the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a complete HTTP answer: head and body");
    (head.to_owned(), body.to_owned())
}
