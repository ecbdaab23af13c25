//! W3C trace context (`traceparent`, `tracestate`) across msys's boundaries:
//! gRPC metadata in, the outbox row (written in the same statement as the
//! change), the Kafka record as the CloudEvents distributed-tracing extension
//! (`ce_traceparent`, `ce_tracestate`), and the order role's consumer span.
//!
//! With traces off (no `OTEL_EXPORTER_OTLP_ENDPOINT`) the caller's context
//! is passed through unchanged, so a trace that started upstream still joins
//! its downstream parts; with traces on, what travels is the context of
//! msys's own span, a child of the caller's.
//!
//! Logs join traces either way: the spans made here carry their trace id to
//! the log formatter (`join_logs`), so every line logged inside them has it.
//! With traces off such a span is made only for a call or record that came
//! with a trace context: the untraced path makes no span and pays nothing.

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TraceId},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::message::Message;
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{Registry, registry::LookupSpan};

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

/// The trace a span belongs to, kept in its registry extensions for the log
/// formatter (`telemetry::WithTraceId`), which adds it to every line logged
/// inside the span or its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTraceId(pub TraceId);

/// Marks `span` with its trace id so the log lines inside it carry it: the
/// OpenTelemetry span's own with traces on, else the one `parent` names.
/// A span that is disabled (filtered out) or has no trace is left alone.
fn join_logs(span: &Span, parent: &TraceContext) {
    let trace_id = if telemetry::traces_enabled() {
        span.context().span().span_context().trace_id()
    } else {
        parent.trace_id().and_then(|hex| TraceId::from_hex(hex).ok()).unwrap_or(TraceId::INVALID)
    };
    if trace_id == TraceId::INVALID {
        return;
    }
    span.with_subscriber(|(id, dispatch)| {
        if let Some(span) = dispatch.downcast_ref::<Registry>().and_then(|registry| registry.span(id)) {
            span.extensions_mut().replace(LogTraceId(trace_id));
        }
    });
}

/// The server span of one gRPC call, child of the caller's context if it
/// sent one (OTel RPC conventions). Made when traces are on, or when the
/// caller sent a `traceparent` (then only for its logs).
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
    );
    let parent = TraceContext::from_headers(headers);
    if parent.traceparent.is_some() {
        let _ = span.set_parent(parent.parent());
    }
    join_logs(&span, &parent);
    span
}

/// The producer span of one outbox record sent to `topic`, child of the
/// context stored with the row; the record carries the span's context.
/// With traces off the stored context goes out unchanged, and a span (for
/// the logs only) is made only if the row has one.
pub fn producer(topic: &str, key: &str, event_id: &str, stored: &TraceContext) -> (TraceContext, Option<Span>) {
    let traces = telemetry::traces_enabled();
    if !traces && stored.traceparent.is_none() {
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
    );
    if stored.traceparent.is_some() {
        let _ = span.set_parent(stored.parent());
    }
    join_logs(&span, stored);
    let context = if traces { TraceContext::of(&span) } else { stored.clone() };
    (context, Some(span))
}

/// A consumer span for each record of a batch the order role applies,
/// continuing the record's `ce_traceparent` (OTel messaging conventions).
/// They end when dropped, after the batch committed. With traces off, only
/// records that carry a context get one (for their logs; the others get
/// `Span::none()`), and a batch without any gets an empty vector.
pub fn consumer_spans<M: Message>(batch: &[M]) -> Vec<Span> {
    let traces = telemetry::traces_enabled();
    let traced = |message: &M| crate::events::header(message, CE_TRACEPARENT).ok().flatten().is_some();
    if !traces && !batch.iter().any(traced) {
        return Vec::new();
    }
    batch
        .iter()
        .map(|message| {
            let parent = TraceContext::from_record(message);
            if !traces && parent.traceparent.is_none() {
                return Span::none();
            }
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
            );
            if parent.traceparent.is_some() {
                let _ = span.set_parent(parent.parent());
            }
            join_logs(&span, &parent);
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
