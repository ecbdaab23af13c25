//! One trace from the gRPC call through the outbox and Kafka into the order
//! replica: the caller's W3C `traceparent` is stored with the outbox row,
//! published as `ce_traceparent`, and continued by the order role's consumer
//! span, which reaches an OTLP receiver the test runs.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use msys::pb::{self, user_service_client::UserServiceClient};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::span::SpanKind,
};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use crate::support::{
    TestResult, UsersSide, eventually, free_port, header, read_all, spawn_role, unique, wait_for_outbox_drain,
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
}

fn create_request(email: &str) -> tonic::Request<pb::CreateUserRequest> {
    let mut request = tonic::Request::new(pb::CreateUserRequest { name: "Ada".into(), email: email.into() });
    request.metadata_mut().insert("traceparent", traceparent().parse().expect("ascii"));
    request.metadata_mut().insert("tracestate", "msys=test".parse().expect("ascii"));
    request
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
    parent_span_id: String,
    attributes: Vec<(String, String)>,
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
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
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
        let spans = self.0.lock().expect("receiver lock");
        spans.iter().find(|s| s.service == service && s.kind == kind as i32 && s.trace_id == TRACE_ID).cloned()
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
    let user_port = free_port();
    let mut user = spawn_role("user", user_port, &users_db, &kafka, &otel);
    let mut order = spawn_role("order", free_port(), &orders_db, &kafka, &otel);
    let mut users = eventually(Duration::from_secs(30), "msys user accepts connections", || async move {
        UserServiceClient::connect(format!("http://127.0.0.1:{user_port}")).await.ok()
    })
    .await;

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
    let _ = created;

    user.start_kill()?;
    order.start_kill()?;
    user.wait().await?;
    order.wait().await?;
    stop.cancel();
    Ok(())
}
