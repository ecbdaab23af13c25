//! What a role has done since it started: per-RPC counts and latency
//! histograms recorded by a tower layer in front of every gRPC server, plus
//! role-specific counters (events published, outbox backlog, …). Served by
//! `msys.v1.MetricsService/GetMetrics` on the role's own port.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use tonic::{Request, Response, Status};

use crate::pb::{self, metrics_service_server::MetricsService};

/// Distinct RPC paths remembered; anything past it is counted under `other`
/// so a client sending random paths cannot grow the map without bound.
const MAX_METHODS: usize = 64;
/// Gauge of RPCs being served right now (a GetMetrics call counts itself).
pub const RPCS_IN_FLIGHT: &str = "rpcs_in_flight";
/// Latencies are kept in microseconds up to one minute, 3 significant digits.
const MAX_LATENCY_US: u64 = 60_000_000;

#[derive(Default)]
struct Inner {
    methods: HashMap<String, MethodStats>,
    values: BTreeMap<&'static str, i64>,
    labeled: BTreeMap<(&'static str, Vec<(&'static str, String)>), i64>,
    histograms: BTreeMap<&'static str, ValueHistogram>,
}

/// Upper bounds of the buckets `observe` sorts values into: from 100 µs to
/// 60 s for latencies in seconds, and they serve counts (batch sizes) too.
pub const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0,
    100.0, 250.0, 500.0, 1000.0,
];

/// A cumulative-bucket histogram of arbitrary values (Prometheus style).
#[derive(Default)]
struct ValueHistogram {
    count: u64,
    sum: f64,
    /// counts[i] = values <= BUCKETS[i]; values above the last bound only in `count`.
    counts: Vec<u64>,
}

struct MethodStats {
    ok: u64,
    failed: u64,
    sum_us: u64,
    latency_us: Histogram<u64>,
}

impl MethodStats {
    fn new() -> Self {
        MethodStats {
            ok: 0,
            failed: 0,
            sum_us: 0,
            // The bounds are constants within hdrhistogram's limits.
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid")),
        }
    }
}

/// A role's metrics, shared by its server layer, its tasks and its RPC.
#[derive(Clone)]
pub struct Registry {
    role: &'static str,
    started: Instant,
    inner: Arc<Mutex<Inner>>,
}

impl Registry {
    pub fn new(role: &'static str) -> Self {
        Registry { role, started: Instant::now(), inner: Arc::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the counters in a
        // state worth refusing to read, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records one finished RPC.
    pub fn record(&self, method: &str, ok: bool, latency: Duration) {
        let mut inner = self.lock();
        let key =
            if inner.methods.contains_key(method) || inner.methods.len() < MAX_METHODS { method } else { "other" };
        let stats = inner.methods.entry(key.to_owned()).or_insert_with(MethodStats::new);
        if ok {
            stats.ok += 1;
        } else {
            stats.failed += 1;
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).clamp(1, MAX_LATENCY_US);
        stats.sum_us += us;
        stats.latency_us.saturating_record(us);
    }

    /// Adds to a counter.
    pub fn add(&self, name: &'static str, delta: i64) {
        *self.lock().values.entry(name).or_default() += delta;
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, value: i64) {
        self.lock().values.insert(name, value);
    }

    /// Sets a gauge that carries labels, e.g. `("partition", "2")`.
    pub fn set_labeled(&self, name: &'static str, labels: &[(&'static str, String)], value: i64) {
        self.lock().labeled.insert((name, labels.to_vec()), value);
    }

    /// Records one value in the histogram `name` (seconds for latencies).
    pub fn observe(&self, name: &'static str, value: f64) {
        let mut inner = self.lock();
        let h = inner.histograms.entry(name).or_default();
        if h.counts.is_empty() {
            h.counts = vec![0; BUCKETS.len()];
        }
        h.count += 1;
        h.sum += value;
        for (bound, count) in BUCKETS.iter().zip(h.counts.iter_mut()) {
            if value <= *bound {
                *count += 1;
            }
        }
    }

    /// A counter's or gauge's current value (0 if never touched).
    pub fn value(&self, name: &str) -> i64 {
        self.lock().values.get(name).copied().unwrap_or(0)
    }

    pub fn report(&self) -> pb::MetricsReport {
        let inner = self.lock();
        let ms = |us: u64| us as f64 / 1000.0;
        let mut methods: Vec<pb::MethodMetrics> = inner
            .methods
            .iter()
            .map(|(method, s)| {
                let total = s.ok + s.failed;
                pb::MethodMetrics {
                    method: method.clone(),
                    total,
                    ok: s.ok,
                    failed: s.failed,
                    avg_latency_ms: if total == 0 { 0.0 } else { ms(s.sum_us) / total as f64 },
                    p50_latency_ms: ms(s.latency_us.value_at_quantile(0.5)),
                    p99_latency_ms: ms(s.latency_us.value_at_quantile(0.99)),
                    max_latency_ms: ms(s.latency_us.max()),
                    p90_latency_ms: ms(s.latency_us.value_at_quantile(0.9)),
                    // Filled once the registry keeps Prometheus buckets (telemetry issue).
                    latency_buckets: Vec::new(),
                }
            })
            .collect();
        methods.sort_by(|a, b| a.method.cmp(&b.method));
        let bucket = |le: f64, count: u64| pb::Bucket { le_seconds: le, count };
        let histograms = inner
            .histograms
            .iter()
            .map(|(name, h)| pb::Histogram {
                name: (*name).to_owned(),
                labels: Default::default(),
                count: h.count,
                sum: h.sum,
                buckets: BUCKETS
                    .iter()
                    .zip(&h.counts)
                    .map(|(le, c)| bucket(*le, *c))
                    .chain(std::iter::once(bucket(f64::INFINITY, h.count)))
                    .collect(),
            })
            .collect();
        let labeled_values = inner
            .labeled
            .iter()
            .map(|((name, labels), value)| pb::LabeledValue {
                name: (*name).to_owned(),
                labels: labels.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
                value: *value,
            })
            .collect();
        pb::MetricsReport {
            role: self.role.to_owned(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            methods,
            values: inner.values.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            histograms,
            labeled_values,
        }
    }
}

#[tonic::async_trait]
impl MetricsService for Registry {
    async fn get_metrics(&self, _: Request<pb::GetMetricsRequest>) -> Result<Response<pb::MetricsReport>, Status> {
        Ok(Response::new(self.report()))
    }
}

/// Tower layer that times every request and reads its gRPC outcome.
#[derive(Clone)]
pub struct MetricsLayer {
    registry: Registry,
}

impl MetricsLayer {
    pub fn new(registry: Registry) -> Self {
        MetricsLayer { registry }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered { inner, registry: self.registry.clone() }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    registry: Registry,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The instance that was polled ready serves the request; a fresh
        // clone stays behind for the next one (see tonic's tower example).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let registry = self.registry.clone();
        let method = request.uri().path().to_owned();
        let started = Instant::now();
        let in_flight = InFlight::enter(registry.clone());
        Box::pin(async move {
            let response = inner.call(request).await;
            drop(in_flight);
            // A failed RPC is answered "trailers-only", with grpc-status in
            // the headers; a successful unary one carries it in the trailers,
            // so a missing header means OK.
            let ok = match &response {
                Ok(r) => r.headers().get("grpc-status").is_none_or(|status| status == "0"),
                Err(_) => false,
            };
            registry.record(&method, ok, started.elapsed());
            response
        })
    }
}

/// Counts an RPC in `rpcs_in_flight` for as long as it lives, including
/// when the client gives up and the future is dropped half-way.
struct InFlight(Registry);

impl InFlight {
    fn enter(registry: Registry) -> Self {
        registry.add(RPCS_IN_FLIGHT, 1);
        InFlight(registry)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.add(RPCS_IN_FLIGHT, -1);
    }
}
