//! Logging and tracing, set up once per process. Logs go to stderr so that
//! commands that print data (`msys events tail`) keep stdout clean.
//!
//! Traces: OpenTelemetry spans exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, with the standard `OTEL_*` variables (service name defaulting to
//! `msys-<role>`). Unset, no OpenTelemetry layer is installed at all and the
//! code that makes spans for traces skips them (see `trace`), so nothing is
//! exported and nothing is paid.
//!
//! Logs and traces join on `trace_id`: every log line emitted inside a span
//! that belongs to a trace carries it, as a top-level JSON field or a
//! trailing `trace_id=` in text (see `WithTraceId` and `trace::join_logs`).

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use clap::ValueEnum;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    fmt::{self, FmtContext, FormatEvent, FormatFields, format::Writer},
    prelude::*,
    registry::LookupSpan,
};

use crate::trace::LogTraceId;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Our own logs at info; the libraries' chatter (tokio-postgres NOTICEs,
/// librdkafka's reconnect attempts) only when it is a warning or worse.
const DEFAULT_FILTER: &str = "info,tokio_postgres=warn,librdkafka=warn,rdkafka=warn,opentelemetry=warn";

static TRACES: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: code that makes spans only for traces asks
/// this first, so with no collector it costs one load.
pub fn traces_enabled() -> bool {
    TRACES.load(Ordering::Relaxed)
}

/// Flushes the exporter when the process ends; hold it in `main`.
#[must_use = "dropping it at once would stop trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered, for at most 5 s.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            tracing::warn!(%error, "could not flush the last spans to the OTLP collector");
        }
    }
}

fn collector_configured() -> bool {
    let set = |name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The OTLP pipeline, if a collector is configured and the exporter builds.
fn tracer_provider(role: &str) -> Option<SdkTracerProvider> {
    if !collector_configured() {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("msys: OTLP exporter not started, traces are off: {error}");
            return None;
        }
    };
    // Resource::builder() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(format!("msys-{role}"));
    }
    Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// Installs the global subscriber for `role` (names the service in traces).
/// `RUST_LOG` replaces the default filter. Calling it twice is harmless: the
/// second call keeps the first subscriber, which is what tests that start
/// several roles in one process need.
pub fn init(format: LogFormat, role: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let provider = tracer_provider(role);
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("msys")).with_tracked_inactivity(false));
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal();
            fmt::layer()
                .with_ansi(ansi)
                .map_event_format(|f| WithTraceId { inner: f.with_ansi(ansi), json: false })
                .with_writer(std::io::stderr)
                .boxed()
        }
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .map_event_format(|f| WithTraceId { inner: f, json: true })
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let installed = tracing_subscriber::registry().with(logs).with(otel).with(filter).try_init().is_ok();
    // Err only means a subscriber is already installed.
    if installed && provider.is_some() {
        TRACES.store(true, Ordering::Relaxed);
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry { provider: if installed { provider } else { None } }
}

/// The event format, plus the trace id of the innermost span in the event's
/// scope that has one (`trace::join_logs` marks the spans that start or
/// continue a trace; their children inherit it through the scope). Lines
/// outside any trace are formatted as they are, without a copy.
struct WithTraceId<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let trace_id = ctx
            .event_scope()
            .and_then(|mut scope| scope.find_map(|span| span.extensions().get::<LogTraceId>().copied()));
        let Some(LogTraceId(trace_id)) = trace_id else {
            return self.inner.format_event(ctx, writer, event);
        };
        // The inner format ends the line (and, in JSON, the object): format
        // it aside and add the field before the end. A text format that
        // colours its output was told so itself (`Format::with_ansi`), since
        // this buffer's writer cannot be.
        let mut line = String::with_capacity(256);
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.trim_end_matches('\n');
        match body.strip_suffix('}') {
            Some(open) if self.json => writeln!(writer, "{open},\"trace_id\":\"{trace_id}\"}}"),
            _ if self.json => writer.write_str(&line),
            _ => writeln!(writer, "{body} trace_id={trace_id}"),
        }
    }
}
