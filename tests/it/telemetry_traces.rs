//! One trace from the gRPC call through the outbox and Kafka into the order
//! replica: the caller's W3C `traceparent` is stored with the outbox row,
//! published as `ce_traceparent`, and continued by the order role's consumer
//! span, which reaches an OTLP receiver the test runs. The roles' log lines
//! along the way carry the same `trace_id`, so logs and traces join, with or
//! without a collector.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use msys::{
    config::{KafkaArgs, PostgresSettings},
    pb::{
        self, metrics_service_client::MetricsServiceClient, order_service_client::OrderServiceClient,
        user_service_client::UserServiceClient,
    },
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::span::SpanKind,
};
use rdkafka::{Message, message::OwnedMessage};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::support::{
    TestResult, UsersSide, eventually, free_port, header, read_all, role_command, unique, wait_for_outbox_drain,
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// The traces of a CreateOrder that waits for its user, and of that user's creation.
const ORDER_TRACE_ID: &str = "5a3e1c0d9b8f47a6b2c1d0e9f8a7b6c5";
const LATE_USER_TRACE_ID: &str = "6b4f2d1e0c9a48b7c3d2e1f0a9b8c7d6";

fn traceparent() -> String {
    traceparent_in(TRACE_ID)
}

fn traceparent_in(trace_id: &str) -> String {
    format!("00-{trace_id}-{CALLER_SPAN}-01")
}

fn traced<T>(message: T, trace_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("traceparent", traceparent_in(trace_id).parse().expect("ascii"));
    request.metadata_mut().insert("tracestate", "msys=test".parse().expect("ascii"));
    request
}

fn create_request(email: &str) -> tonic::Request<pb::CreateUserRequest> {
    traced(pb::CreateUserRequest { name: "Ada".into(), email: email.into() }, TRACE_ID)
}

#[tokio::test]
async fn without_a_collector_the_callers_trace_context_is_published_unchanged() -> TestResult {
    let side = UsersSide::start().await;
    let mut users = UserServiceClient::new(side.user.channel().await);
    users.create_user(create_request("ada@example.org")).await?;
    let mut plain = pb::CreateUserRequest { name: "Bob".into(), email: "bob@example.org".into() };
    users.create_user(std::mem::take(&mut plain)).await?;
    wait_for_outbox_drain(&side.users_db).await;
    let records = read_all(&side.kafka).await;
    let traced: Vec<_> = records.iter().filter_map(|r| header(r, "ce_traceparent")).collect();
    assert_eq!(traced, vec![traceparent()], "exactly the traced create carries the caller's context");
    let states: Vec<_> = records.iter().filter_map(|r| header(r, "ce_tracestate")).collect();
    assert_eq!(states, vec!["msys=test".to_owned()]);
    side.user.stop().await;
    Ok(())
}

/// A span as the receiver got it, with its service's name.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: Vec<(String, String)>,
    /// (trace id, span id) of each span this one links to.
    links: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().expect("receiver lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Received {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
                    links: span.links.iter().map(|link| (hex(&link.trace_id), hex(&link.span_id))).collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    async fn start(stop: CancellationToken) -> (Self, SocketAddr) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("addr");
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.cancelled_owned(),
            );
        tokio::spawn(server);
        (receiver, addr)
    }

    fn find(&self, service: &str, kind: SpanKind) -> Option<Received> {
        self.find_in(TRACE_ID, service, kind)
    }

    fn find_in(&self, trace_id: &str, service: &str, kind: SpanKind) -> Option<Received> {
        let spans = self.0.lock().expect("receiver lock");
        spans.iter().find(|s| s.service == service && s.kind == kind as i32 && s.trace_id == trace_id).cloned()
    }

    /// The spans of `service` in `trace_id` that link to `target`.
    fn linking_to(&self, trace_id: &str, service: &str, target: &Received) -> Vec<Received> {
        let spans = self.0.lock().expect("receiver lock");
        let link = (target.trace_id.clone(), target.span_id.clone());
        spans
            .iter()
            .filter(|s| s.service == service && s.trace_id == trace_id && s.links.contains(&link))
            .cloned()
            .collect()
    }
}

fn attribute<'a>(span: &'a Received, key: &str) -> Option<&'a str> {
    span.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn create_user_with_a_traceparent_is_one_trace_from_the_call_to_the_order_replica() -> TestResult {
    let stop = CancellationToken::new();
    let (receiver, otlp) = Receiver::start(stop.clone()).await;
    let UsersSide { users_db, orders_db, kafka, user } = UsersSide::start().await;
    user.stop().await; // this test runs both roles as processes, exporting to the receiver
    let endpoint = format!("http://{otlp}");
    let group = unique("order-service");
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OUTBOX_POLL_INTERVAL", "100ms"),
        ("ORDER_CONSUMER_GROUP", group.as_str()),
    ];
    let (user_port, order_port) = (free_port(), free_port());
    let (mut user, user_logs) = spawn_logging("user", user_port, &users_db, &kafka, &otel);
    // A CreateOrder below waits for its user: long enough for a loaded machine.
    let order_env = [otel.as_slice(), &[("ORDER_USER_WAIT", "60s")]].concat();
    let (mut order, order_logs) = spawn_logging("order", order_port, &orders_db, &kafka, &order_env);
    let mut users = connect(user_port).await;

    let created = users.create_user(create_request("ada@example.org")).await?.into_inner();
    wait_for_outbox_drain(&users_db).await;
    let records = read_all(&kafka).await;
    let published = header(&records[0], "ce_traceparent").expect("the record carries ce_traceparent");
    assert_eq!(&published[3..35], TRACE_ID, "the record continues the caller's trace: {published}");
    assert_ne!(&published[36..52], CALLER_SPAN, "its parent is msys's producer span, not the caller's");

    let server = eventually(Duration::from_secs(30), "the user role exports its server span", || async {
        receiver.find("msys-user", SpanKind::Server)
    })
    .await;
    assert_eq!(server.parent_span_id, CALLER_SPAN, "the server span is the caller's child");
    assert_eq!(attribute(&server, "rpc.method"), Some("CreateUser"));
    assert_eq!(attribute(&server, "rpc.grpc.status_code"), Some("0"), "the span records the call's gRPC status");
    let producer = eventually(Duration::from_secs(30), "the relay exports its producer span", || async {
        receiver.find("msys-user", SpanKind::Producer)
    })
    .await;
    assert_eq!(attribute(&producer, "messaging.system"), Some("kafka"));
    assert_eq!(attribute(&producer, "messaging.destination.name"), Some(kafka.user_events_topic.as_str()));

    let consumer =
        eventually(Duration::from_secs(60), "the order role exports a consumer span for the event", || async {
            receiver.find("msys-order", SpanKind::Consumer)
        })
        .await;
    assert_eq!(consumer.parent_span_id, &published[36..52], "the consumer span continues the record's context");
    assert_eq!(attribute(&consumer, "messaging.system"), Some("kafka"));
    assert_eq!(attribute(&consumer, "messaging.destination.name"), Some(kafka.user_events_topic.as_str()));
    assert_eq!(
        attribute(&consumer, "messaging.destination.partition.id"),
        Some(records[0].partition().to_string().as_str())
    );
    assert_eq!(attribute(&consumer, "messaging.kafka.offset"), Some(records[0].offset().to_string().as_str()));
    assert_eq!(consumer.name, format!("process {}", kafka.user_events_topic));

    let lines = Lines { user: &user_logs, order: &order_logs, user_id: created.id, record: &records[0] };
    for (role, message) in ALONG_THE_WAY {
        let trace_id = lines.trace_id_of(role, message).await;
        assert_eq!(trace_id.as_deref(), Some(TRACE_ID), "{role}'s {message:?} line carries the caller's trace id");
    }

    // A CreateOrder that waits for a user created after it links, in its own
    // trace, to the consumer span of the apply that brought the user.
    let order_channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{order_port}"))?;
    let order_channel = order_channel.connect().await?;
    let late_id = created.id + 1; // the next id of a fresh users table
    let mut orders = OrderServiceClient::new(order_channel.clone());
    let waiting = tokio::spawn(async move {
        let request = pb::CreateOrderRequest { user_id: late_id, product: "pen".into(), quantity: 1 };
        orders.create_order(traced(request, ORDER_TRACE_ID)).await
    });
    eventually(Duration::from_secs(30), "the CreateOrder waits for its user", || {
        let mut metrics = MetricsServiceClient::new(order_channel.clone());
        async move {
            let report = metrics.get_metrics(pb::GetMetricsRequest {}).await.ok()?.into_inner();
            (report.values.get("create_order_waiters").copied() == Some(1)).then_some(())
        }
    })
    .await;
    let request = pb::CreateUserRequest { name: "Late".into(), email: "late@example.org".into() };
    let late = users.create_user(traced(request, LATE_USER_TRACE_ID)).await?.into_inner();
    assert_eq!(late.id, late_id, "the user the order waits for");
    let placed = waiting.await??.into_inner();
    assert_eq!(placed.user_id, late_id);
    let apply = eventually(Duration::from_secs(30), "the order role exports the late user's consumer span", || async {
        receiver.find_in(LATE_USER_TRACE_ID, "msys-order", SpanKind::Consumer)
    })
    .await;
    let linking = eventually(Duration::from_secs(30), "the waiting CreateOrder's span links to the apply", || async {
        Some(receiver.linking_to(ORDER_TRACE_ID, "msys-order", &apply)).filter(|spans| !spans.is_empty())
    })
    .await;
    assert_eq!(linking.len(), 1, "one span of the CreateOrder carries the link: {linking:?}");
    assert_eq!(linking[0].name, "create_order", "{linking:?}");

    user.start_kill()?;
    order.start_kill()?;
    user.wait().await?;
    order.wait().await?;
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn without_a_collector_log_lines_still_carry_the_callers_trace_id() -> TestResult {
    let UsersSide { users_db, orders_db, kafka, user } = UsersSide::start().await;
    user.stop().await; // both roles run as processes, so that the test reads their logs
    let group = unique("order-service");
    let env = [("OUTBOX_POLL_INTERVAL", "100ms"), ("ORDER_CONSUMER_GROUP", group.as_str())];
    let user_port = free_port();
    let (mut user, user_logs) = spawn_logging("user", user_port, &users_db, &kafka, &env);
    let (mut order, order_logs) = spawn_logging("order", free_port(), &orders_db, &kafka, &env);
    let mut users = connect(user_port).await;

    let ada = users.create_user(create_request("ada@example.org")).await?.into_inner();
    let plain = pb::CreateUserRequest { name: "Bob".into(), email: "bob@example.org".into() };
    let bob = users.create_user(plain).await?.into_inner();
    wait_for_outbox_drain(&users_db).await;
    let records = read_all(&kafka).await;
    let record_of = |user_id: i64| {
        records.iter().find(|r| r.key() == Some(user_id.to_string().as_bytes())).expect("each create is published")
    };

    let ada = Lines { user: &user_logs, order: &order_logs, user_id: ada.id, record: record_of(ada.id) };
    let bob = Lines { user: &user_logs, order: &order_logs, user_id: bob.id, record: record_of(bob.id) };
    for (role, message) in ALONG_THE_WAY {
        let trace_id = ada.trace_id_of(role, message).await;
        assert_eq!(trace_id.as_deref(), Some(TRACE_ID), "{role}'s {message:?} line carries the caller's trace id");
        let none = bob.trace_id_of(role, message).await;
        assert_eq!(none, None, "{role}'s {message:?} line of a call without a traceparent has no trace id");
    }

    user.start_kill()?;
    order.start_kill()?;
    user.wait().await?;
    order.wait().await?;
    Ok(())
}

/// The filter the log tests run the roles with: the relay's and the
/// replica's per-record lines are at debug level.
const LOG_FILTER: &str = "info,msys::user::outbox=debug,msys::order::partition=debug";

/// A role as a process logging JSON at `LOG_FILTER`, and its log lines.
fn spawn_logging(
    role: &str,
    port: u16,
    db: &PostgresSettings,
    kafka: &KafkaArgs,
    extra: &[(&str, &str)],
) -> (tokio::process::Child, Logs) {
    let mut child = role_command(role, port, db, kafka, extra)
        .env("MSYS_LOG_FORMAT", "json")
        .env("RUST_LOG", LOG_FILTER)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn msys");
    let stderr = child.stderr.take().expect("stderr is piped");
    let logs = Logs::default();
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("a log line that is not JSON: {line}"));
            sink.0.lock().expect("logs lock").push(value);
        }
    });
    (child, logs)
}

async fn connect(port: u16) -> UserServiceClient<tonic::transport::Channel> {
    eventually(Duration::from_secs(30), "msys user accepts connections", || async move {
        UserServiceClient::connect(format!("http://127.0.0.1:{port}")).await.ok()
    })
    .await
}

/// A role's JSON log lines, as they arrive.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<Json>>>);

impl Logs {
    fn find(&self, message: &str, fields: &Json) -> Option<Json> {
        let lines = self.0.lock().expect("logs lock");
        let matches = |line: &&Json| {
            line["message"] == message
                && fields.as_object().is_some_and(|wanted| wanted.iter().all(|(k, v)| &line[k] == v))
        };
        lines.iter().find(matches).cloned()
    }
}

/// The log lines one created user leaves on its way through the system
/// (role, message): the user service's handler, the relay's publish, the
/// replica's apply.
const ALONG_THE_WAY: [(&str, &str); 3] =
    [("user", "created user"), ("user", "publishing user event"), ("order", "applied user event")];

/// Where to find one created user's lines.
struct Lines<'a> {
    user: &'a Logs,
    order: &'a Logs,
    user_id: i64,
    record: &'a OwnedMessage,
}

impl Lines<'_> {
    /// Waits for the line and returns its `trace_id`, if it has one.
    async fn trace_id_of(&self, role: &str, message: &str) -> Option<String> {
        let (logs, fields) = match role {
            "user" => (self.user, json!({ "user.id": self.user_id })),
            _ => (self.order, json!({ "partition": self.record.partition(), "offset": self.record.offset() })),
        };
        let line = eventually(Duration::from_secs(60), &format!("msys {role} logs {message:?}"), || async {
            logs.find(message, &fields)
        })
        .await;
        line.get("trace_id").map(|id| id.as_str().expect("trace_id is a string").to_owned())
    }
}
