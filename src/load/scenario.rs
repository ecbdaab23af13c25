//! What one request of each scenario does, against the configured targets
//! only, and the checks made before the first one: every target must report
//! SERVING (Online Boutique's loadgenerator crash-looped on services that
//! were not ready yet), and the reads scenario needs users to read.

use std::time::Duration;

use anyhow::Context;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{
    LoadError,
    grpc::{CallError, Conn, Method},
    plan::SplitMix,
    run::Outcome,
};
use crate::pb;

/// The kinds of load `msys load --scenario` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// CreateUser with unique emails.
    Users,
    /// GetUser of existing ids.
    Reads,
    /// A virtual user is created, then orders as soon as the order service knows it.
    Orders,
    /// A weighted mix of users, reads and orders (--mix).
    Mixed,
    /// Drives one role's connection pool past its size, in stages.
    DbPool,
    /// Extra consumers in a throwaway group on the event topic.
    ConsumerGroup,
    /// The user role's grpc.health.v1 Check: measures the load tool itself.
    Health,
}

impl ScenarioKind {
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::Users => "users",
            ScenarioKind::Reads => "reads",
            ScenarioKind::Orders => "orders",
            ScenarioKind::Mixed => "mixed",
            ScenarioKind::DbPool => "db-pool",
            ScenarioKind::ConsumerGroup => "consumer-group",
            ScenarioKind::Health => "health",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::value_variants().iter().copied().find(|k| k.name() == name)
    }
}

/// Weights of the mixed scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mix {
    pub users: u32,
    pub reads: u32,
    pub orders: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix { users: 1, reads: 8, orders: 1 }
    }
}

impl std::str::FromStr for Mix {
    type Err = String;

    /// `users=1,reads=8,orders=1`; a kind left out weighs 0.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut mix = Mix { users: 0, reads: 0, orders: 0 };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) =
                part.split_once('=').ok_or_else(|| format!("{part:?} is not NAME=WEIGHT (e.g. reads=8)"))?;
            let weight: u32 =
                weight.trim().parse().map_err(|_| format!("weight {weight:?} of {name} is not a whole number"))?;
            if weight > 1000 {
                return Err(format!("weight {weight} of {name} is above 1000"));
            }
            match name.trim() {
                "users" => mix.users = weight,
                "reads" => mix.reads = weight,
                "orders" => mix.orders = weight,
                other => return Err(format!("unknown kind {other:?} in the mix: use users, reads and orders")),
            }
        }
        if mix.users + mix.reads + mix.orders == 0 {
            return Err("the mix has no weight: e.g. users=1,reads=8,orders=1".into());
        }
        Ok(mix)
    }
}

/// Addresses of the system under test: the only hosts the engine talks to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Targets {
    pub user_addr: String,
    pub order_addr: String,
}

/// Opens `n` connections (HTTP/2 multiplexes each) to `addr`, retrying for
/// up to `timeout` while the target is still starting.
pub async fn connect(addr: &str, n: usize, timeout: Duration) -> Result<Vec<Channel>, LoadError> {
    let uri = crate::grpc::uri_of(addr);
    let endpoint = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|_| LoadError::invalid("target", format!("{addr:?} is not a valid address")))?
        .connect_timeout(Duration::from_secs(2).min(timeout.max(Duration::from_millis(100))))
        .tcp_nodelay(true);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut channels = Vec::with_capacity(n);
    while channels.len() < n {
        match endpoint.connect().await {
            Ok(channel) => channels.push(channel),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                let cause = std::error::Error::source(&e).map_or(e.to_string(), |c| c.to_string());
                return Err(LoadError::NotReady(format!("cannot connect to {uri} within {timeout:?}: {cause}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    Ok(channels)
}

/// Waits until `service` at `addr` reports SERVING, for at most `timeout`.
pub async fn wait_serving(channel: &Channel, addr: &str, service: &str, timeout: Duration) -> Result<(), LoadError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut client = HealthClient::new(channel.clone());
    loop {
        let request = HealthCheckRequest { service: service.to_owned() };
        let last = match tokio::time::timeout(Duration::from_secs(2), client.check(request)).await {
            Ok(Ok(response)) => match ServingStatus::try_from(response.into_inner().status) {
                Ok(ServingStatus::Serving) => return Ok(()),
                Ok(status) => status.as_str_name().to_owned(),
                Err(_) => "an unknown status".to_owned(),
            },
            Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
            Err(_) => "no answer within 2 s".to_owned(),
        };
        if tokio::time::Instant::now() >= deadline {
            let name = if service.is_empty() { "the server" } else { service };
            return Err(LoadError::NotReady(format!(
                "{name} at {addr} is not SERVING after {timeout:?} (last answer: {last}); load starts only once every target is ready"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Connections to one target for the per-request calls (see `grpc`), each
/// with the URIs of the methods the scenarios call on it.
struct Lane {
    conn: Conn,
    create_user: Method,
    get_user: Method,
    list_users: Method,
    create_order: Method,
    health: Method,
}

/// Opens `n` lean connections to `addr`, for the calls themselves.
async fn lanes(addr: &str, n: usize, timeout: Duration) -> Result<Vec<Lane>, LoadError> {
    let mut lanes = Vec::with_capacity(n);
    for _ in 0..n {
        let conn = Conn::connect(addr, timeout.max(Duration::from_secs(1)))
            .await
            .map_err(|e| LoadError::NotReady(format!("cannot connect to {addr}: {e}")))?;
        lanes.push(Lane {
            create_user: conn.method("/msys.v1.UserService/CreateUser"),
            get_user: conn.method("/msys.v1.UserService/GetUser"),
            list_users: conn.method("/msys.v1.UserService/ListUsers"),
            create_order: conn.method("/msys.v1.OrderService/CreateOrder"),
            health: conn.method("/grpc.health.v1.Health/Check"),
            conn,
        });
    }
    Ok(lanes)
}

/// One per-request scenario, ready to fire: calls spread over `--connections` connections per target.
pub struct Scenario {
    kind: ScenarioKind,
    run_id: String,
    users: Vec<Lane>,
    orders: Vec<Lane>,
    read_ids: Vec<i64>,
    mix: Mix,
}

/// How many users the reads scenario creates when the user service has none.
const READ_SEED_USERS: usize = 100;

impl Scenario {
    /// Connects to the targets the scenario needs, waits until they serve,
    /// and prepares what its requests read.
    pub async fn prepare(
        kind: ScenarioKind,
        mix: Mix,
        targets: &Targets,
        connections: usize,
        ready_timeout: Duration,
        run_id: &str,
    ) -> Result<Self, LoadError> {
        let needs_users =
            matches!(kind, ScenarioKind::Users | ScenarioKind::Reads | ScenarioKind::Orders | ScenarioKind::Health)
                || (kind == ScenarioKind::Mixed && mix.users + mix.reads + mix.orders > 0);
        let needs_orders = kind == ScenarioKind::Orders || (kind == ScenarioKind::Mixed && mix.orders > 0);
        let mut scenario = Scenario {
            kind,
            run_id: run_id.to_owned(),
            users: Vec::new(),
            orders: Vec::new(),
            read_ids: Vec::new(),
            mix,
        };
        if needs_users {
            // The health scenario asks the server as a whole; the others need the user service.
            let service = if kind == ScenarioKind::Health { "" } else { "msys.v1.UserService" };
            let channels = connect(&targets.user_addr, 1, ready_timeout).await?;
            wait_serving(&channels[0], &targets.user_addr, service, ready_timeout).await?;
            scenario.users = lanes(&targets.user_addr, connections, ready_timeout).await?;
        }
        if needs_orders {
            let channels = connect(&targets.order_addr, 1, ready_timeout).await?;
            wait_serving(&channels[0], &targets.order_addr, "msys.v1.OrderService", ready_timeout).await?;
            scenario.orders = lanes(&targets.order_addr, connections, ready_timeout).await?;
        }
        if kind == ScenarioKind::Reads || (kind == ScenarioKind::Mixed && mix.reads > 0) {
            scenario.read_ids = scenario.existing_users().await.map_err(LoadError::Unexpected)?;
        }
        Ok(scenario)
    }

    /// Up to 1000 existing user ids; creates some first when there are none.
    async fn existing_users(&self) -> anyhow::Result<Vec<i64>> {
        let lane = &self.users[0];
        let page = pb::ListUsersRequest { page_size: 1000, page_token: String::new() };
        let listed: pb::ListUsersResponse =
            lane.conn.unary(&lane.list_users, &page).await.map_err(failed).context("listing users to read")?;
        let mut ids: Vec<i64> = listed.users.iter().map(|u| u.id).collect();
        if ids.is_empty() {
            for n in 0..READ_SEED_USERS {
                let request = pb::CreateUserRequest {
                    name: format!("load reader {n}"),
                    email: format!("reader-{}-{n}@load.msys.test", self.run_id),
                };
                let user: pb::User = lane
                    .conn
                    .unary(&lane.create_user, &request)
                    .await
                    .map_err(failed)
                    .context("creating users to read")?;
                ids.push(user.id);
            }
        }
        Ok(ids)
    }

    pub fn kind(&self) -> ScenarioKind {
        self.kind
    }

    /// Request `i` of the run.
    pub async fn call(&self, i: u64) -> Outcome {
        match self.kind {
            ScenarioKind::Users => self.create_user(i).await.map(drop),
            ScenarioKind::Reads => self.read(i).await,
            ScenarioKind::Orders => self.order(i).await,
            ScenarioKind::Mixed => {
                let total = u64::from(self.mix.users + self.mix.reads + self.mix.orders);
                let pick = SplitMix::new(i).next_u64() % total;
                if pick < u64::from(self.mix.users) {
                    self.create_user(i).await.map(drop)
                } else if pick < u64::from(self.mix.users + self.mix.reads) {
                    self.read(i).await
                } else {
                    self.order(i).await
                }
            }
            ScenarioKind::Health => {
                let lane = &self.users[i as usize % self.users.len()];
                let request = HealthCheckRequest { service: String::new() };
                lane.conn.unary::<_, HealthCheckResponse>(&lane.health, &request).await.map(drop).map_err(|e| e.code)
            }
            // Driven by their own runners, never per request.
            ScenarioKind::DbPool | ScenarioKind::ConsumerGroup => Err(Code::Unimplemented),
        }
    }

    async fn create_user(&self, i: u64) -> Result<i64, Code> {
        let lane = &self.users[i as usize % self.users.len()];
        let request = pb::CreateUserRequest {
            name: format!("load user {i}"),
            email: format!("load-{}-{i}@load.msys.test", self.run_id),
        };
        lane.conn.unary::<_, pb::User>(&lane.create_user, &request).await.map(|u| u.id).map_err(|e| e.code)
    }

    async fn read(&self, i: u64) -> Outcome {
        let lane = &self.users[i as usize % self.users.len()];
        let id = self.read_ids[(SplitMix::new(i ^ 0x5EED).next_u64() % self.read_ids.len() as u64) as usize];
        lane.conn.unary::<_, pb::User>(&lane.get_user, &pb::GetUserRequest { id }).await.map(drop).map_err(|e| e.code)
    }

    /// The event path is part of this latency: the order service answers
    /// only once the user's event has reached its replica. It waits for the
    /// event itself for a while (ORDER_USER_WAIT) and then says the user does
    /// not exist; the virtual user then asks again, so the order is placed as
    /// soon as the order service knows the user, bounded by the call's deadline.
    async fn order(&self, i: u64) -> Outcome {
        let user_id = self.create_user(i).await?;
        let lane = &self.orders[i as usize % self.orders.len()];
        loop {
            let request = pb::CreateOrderRequest { user_id, product: "load-test".into(), quantity: 1 };
            match lane.conn.unary::<_, pb::Order>(&lane.create_order, &request).await {
                Ok(_) => return Ok(()),
                Err(e) if e.code == Code::FailedPrecondition && e.message.contains("does not exist") => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e.code),
            }
        }
    }
}

/// A failed setup call as an error people can read.
fn failed(e: CallError) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code, e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_weights_and_rejects_nonsense() {
        assert_eq!("users=1,reads=8,orders=1".parse(), Ok(Mix { users: 1, reads: 8, orders: 1 }));
        assert_eq!("reads=3".parse(), Ok(Mix { users: 0, reads: 3, orders: 0 }));
        assert!("reads".parse::<Mix>().unwrap_err().contains("NAME=WEIGHT"));
        assert!("writes=1".parse::<Mix>().unwrap_err().contains("unknown kind"));
        assert!("users=0".parse::<Mix>().unwrap_err().contains("no weight"));
        assert!("users=-1".parse::<Mix>().unwrap_err().contains("whole number"));
    }

    #[test]
    fn scenario_names_round_trip() {
        for kind in <ScenarioKind as clap::ValueEnum>::value_variants() {
            assert_eq!(ScenarioKind::parse(kind.name()), Some(*kind));
        }
    }
}
