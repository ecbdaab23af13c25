//! W3C trace context (`traceparent`, `tracestate`) across msys's boundaries:
//! gRPC metadata in, the outbox row (written in the same statement as the
//! change), the Kafka record as the CloudEvents distributed-tracing extension
//! (`ce_traceparent`, `ce_tracestate`), and the order role's consumer span.
//!
//! With traces off (no `OTEL_EXPORTER_OTLP_ENDPOINT`) no span is made here
//! and the caller's context is passed through unchanged, so a trace that
//! started upstream still joins its downstream parts; with traces on, what
//! travels is the context of msys's own span, a child of the caller's.

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::message::Message;
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// The Kafka binary binding of the CloudEvents `traceparent` extension.
pub const CE_TRACEPARENT: &str = "ce_traceparent";
pub const CE_TRACESTATE: &str = "ce_tracestate";
/// W3C caps tracestate at 32 list members; 512 bytes is what vendors keep.
const MAX_TRACESTATE: usize = 512;

/// A validated trace context; empty when the caller sent none (or garbage,
/// which W3C says to ignore rather than refuse).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceContext {
    pub fn new(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        let Some(traceparent) = traceparent.map(str::trim).filter(|tp| valid_traceparent(tp)) else {
            return TraceContext::default();
        };
        let tracestate = tracestate
            .map(str::trim)
            .filter(|ts| !ts.is_empty() && ts.len() <= MAX_TRACESTATE && ts.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .map(str::to_owned);
        TraceContext { traceparent: Some(traceparent.to_owned()), tracestate }
    }

    /// From gRPC request metadata (or any HTTP headers).
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        let get = |name| headers.get(name).and_then(|v| v.to_str().ok());
        TraceContext::new(get(TRACEPARENT), get(TRACESTATE))
    }

    /// From a `user-events` record's CloudEvents headers.
    pub fn from_record<M: Message>(message: &M) -> Self {
        let get = |name| crate::events::header(message, name).ok().flatten();
        TraceContext::new(get(CE_TRACEPARENT), get(CE_TRACESTATE))
    }

    /// What a change made by the current request should carry: the current
    /// span's context when traces are on, else what the caller sent.
    pub fn for_change(metadata: &tonic::metadata::MetadataMap) -> Self {
        if telemetry::traces_enabled() {
            let own = TraceContext::of(&Span::current());
            if own.traceparent.is_some() {
                return own;
            }
        }
        let get = |name| metadata.get(name).and_then(|v| v.to_str().ok());
        TraceContext::new(get(TRACEPARENT), get(TRACESTATE))
    }

    /// The context of `span` (empty if it is not recorded).
    pub fn of(span: &Span) -> Self {
        let mut carrier = Carrier::default();
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        TraceContext::new(carrier.traceparent.as_deref(), carrier.tracestate.as_deref())
    }

    /// As an OpenTelemetry parent context.
    pub fn parent(&self) -> Context {
        TraceContextPropagator::new().extract(self)
    }

    /// The 32 hex digits of the trace id.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.as_deref().map(|tp| &tp[3..35])
    }
}

/// `00-<32 hex trace id, not all 0>-<16 hex span id, not all 0>-<2 hex flags>`
/// (a future version may append fields after a dash; version ff is invalid).
fn valid_traceparent(tp: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    let mut parts = tp.split('-');
    let (Some(version), Some(trace), Some(span), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let rest_ok = if version == "00" { parts.next().is_none() } else { true };
    version.len() == 2
        && hex(version)
        && version != "ff"
        && trace.len() == 32
        && hex(trace)
        && nonzero(trace)
        && span.len() == 16
        && hex(span)
        && nonzero(span)
        && flags.len() == 2
        && hex(flags)
        && rest_ok
        && tp.len() <= 256
}

impl Extractor for TraceContext {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent.as_deref(),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

#[derive(Default)]
struct Carrier {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// Records the span's trace id in its `trace_id` field, so every log line
/// inside it carries the id and logs join traces.
fn record_trace_id(span: &Span) {
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// The server span of one gRPC call, child of the caller's context if it
/// sent one (OTel RPC conventions). Only made when traces are on.
pub fn server_span(path: &str, headers: &http::HeaderMap) -> Span {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("unknown", path));
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
        trace_id = Empty,
    );
    let parent = TraceContext::from_headers(headers);
    if parent.traceparent.is_some() {
        let _ = span.set_parent(parent.parent());
    }
    record_trace_id(&span);
    span
}

/// The producer span of one outbox record sent to `topic`, child of the
/// context stored with the row; the record carries the span's context.
/// With traces off: no span, and the stored context goes out unchanged.
pub fn producer(topic: &str, key: &str, event_id: &str, stored: &TraceContext) -> (TraceContext, Option<Span>) {
    if !telemetry::traces_enabled() {
        return (stored.clone(), None);
    }
    let span = tracing::info_span!(
        "publish",
        otel.name = %format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %topic,
        messaging.kafka.message.key = %key,
        messaging.message.id = %event_id,
        trace_id = Empty,
    );
    if stored.traceparent.is_some() {
        let _ = span.set_parent(stored.parent());
    }
    record_trace_id(&span);
    (TraceContext::of(&span), Some(span))
}

/// A consumer span for each record of a batch the order role applies,
/// continuing the record's `ce_traceparent` (OTel messaging conventions).
/// They end when dropped, after the batch committed. Empty with traces off.
pub fn consumer_spans<M: Message>(batch: &[M]) -> Vec<Span> {
    if !telemetry::traces_enabled() {
        return Vec::new();
    }
    batch
        .iter()
        .map(|message| {
            let span = tracing::info_span!(
                "process",
                otel.name = %format!("process {}", message.topic()),
                otel.kind = "consumer",
                messaging.system = "kafka",
                messaging.operation.type = "process",
                messaging.destination.name = %message.topic(),
                messaging.destination.partition.id = %message.partition(),
                messaging.kafka.offset = message.offset(),
                messaging.message.id = crate::events::header(message, "ce_id").ok().flatten().unwrap_or_default(),
                trace_id = Empty,
            );
            let parent = TraceContext::from_record(message);
            if parent.traceparent.is_some() {
                let _ = span.set_parent(parent.parent());
            }
            record_trace_id(&span);
            span
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_valid_traceparent_is_kept_and_names_its_trace() {
        let context = TraceContext::new(Some(TP), Some("congo=t61rcWkgMzE"));
        assert_eq!(context.trace_id(), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(context.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn malformed_trace_context_is_ignored_not_stored() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert_eq!(TraceContext::new(Some(bad), Some("a=b")), TraceContext::default(), "{bad:?}");
        }
        let long_state = "k=".to_owned() + &"v".repeat(600);
        assert_eq!(TraceContext::new(Some(TP), Some(&long_state)).tracestate, None);
    }

    #[test]
    fn the_propagator_reads_the_context_back() {
        let context = TraceContext::new(Some(TP), None);
        let parent = context.parent();
        assert_eq!(parent.span().span_context().trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert!(parent.span().span_context().is_remote());
    }
}
