//! What a role has done since it started, kept in one `prometheus-client`
//! registry per role: the conventional gRPC server metrics recorded by a
//! tower layer in front of every server ([`MetricsLayer`]), plus the role's
//! own counters, gauges and histograms. Two views of the same numbers:
//! `GET /metrics` in the Prometheus text format ([`http`]) and
//! `msys.v1.MetricsService/GetMetrics` ([`Registry::report`]), which the
//! monitor reads. There is no second store that could disagree.
//!
//! Code names a metric once, as in the GetMetrics contract
//! (`events_applied_total`, `outbox_pending`); [`names`] gives it its
//! Prometheus name with namespace and unit (`msys_outbox_pending_rows`).
//! A name ending in `_total` is a counter, any other a gauge.

mod histogram;
pub mod http;
mod layer;
mod names;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use tonic::{Code, Request, Response, Status};

pub use self::{
    histogram::{COUNT_BUCKETS, Histogram, LATENCY_BUCKETS, Snapshot},
    layer::{Metered, MetricsLayer, answered_code},
};
use crate::pb::{self, metrics_service_server::MetricsService};

/// Distinct RPC paths remembered; anything past it is counted under `other`
/// so a client sending random paths cannot grow the label sets without bound.
const MAX_METHODS: usize = 64;
/// Gauge of RPCs being served right now (a GetMetrics call counts itself).
pub const RPCS_IN_FLIGHT: &str = "rpcs_in_flight";
/// The buckets of latency histograms (kept under this name for callers of the first version).
pub const BUCKETS: &[f64] = LATENCY_BUCKETS;

type Labels = Vec<(&'static str, String)>;
type MethodLabels = [(&'static str, String); 2];
type CodeLabels = [(&'static str, String); 3];
type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;
type Collect = Box<dyn Fn(&Registry) + Send + Sync>;

/// A role's metrics, shared by its server layer, its tasks and its RPC.
/// Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    role: &'static str,
    started: Instant,
    /// What `/metrics` encodes; metrics are registered on first use.
    prometheus: Mutex<prometheus_client::registry::Registry>,
    grpc: Grpc,
    scalars: RwLock<HashMap<&'static str, Scalar>>,
    labeled: Mutex<BTreeMap<&'static str, LabeledGauges>>,
    histograms: RwLock<BTreeMap<&'static str, Histogram>>,
    /// Run before every read, to sample values that are cheaper to read
    /// than to track (the connection pool's state).
    collectors: Mutex<Vec<Collect>>,
}

#[derive(Clone)]
enum Scalar {
    Counter(Counter),
    Gauge(Gauge),
}

struct LabeledGauges {
    family: Family<Labels, Gauge>,
    /// The same gauges as the family's, kept in order for `report`.
    seen: BTreeMap<Labels, Gauge>,
}

/// The conventional gRPC server families (grpc-ecosystem/go-grpc-prometheus).
struct Grpc {
    started: Family<MethodLabels, Counter>,
    handled: Family<CodeLabels, Counter>,
    handling: HistogramFamily,
    methods: RwLock<HashMap<String, Arc<MethodMetrics>>>,
}

/// One RPC path's handles into the gRPC families, looked up once per call.
pub struct MethodMetrics {
    path: String,
    service: String,
    method: String,
    started: Counter,
    handling: Histogram,
    handled_family: Family<CodeLabels, Counter>,
    /// Indexed by gRPC code (0..=16), created on the first call ending so.
    handled: [OnceLock<Counter>; 17],
    max_micros: AtomicU64,
}

impl MethodMetrics {
    /// Counts one started RPC.
    pub fn start(&self) {
        self.started.inc();
    }

    /// Counts one finished RPC with its gRPC status code and latency.
    pub fn finish(&self, code: Code, latency: Duration) {
        let index = (code as usize).min(16);
        self.handled[index]
            .get_or_init(|| {
                self.handled_family.get_or_create_owned(&[
                    ("grpc_service", self.service.clone()),
                    ("grpc_method", self.method.clone()),
                    ("grpc_code", code_name(code).to_owned()),
                ])
            })
            .inc();
        self.handling.observe(latency.as_secs_f64());
        self.max_micros.fetch_max(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    fn report(&self) -> pb::MethodMetrics {
        let counts: Vec<u64> = self.handled.iter().map(|c| c.get().map_or(0, Counter::get)).collect();
        let total: u64 = counts.iter().sum();
        let ok = counts[0];
        let latency = self.handling.snapshot();
        let ms = |seconds: f64| seconds * 1000.0;
        pb::MethodMetrics {
            method: self.path.clone(),
            total,
            ok,
            failed: total - ok,
            avg_latency_ms: if latency.count == 0 { 0.0 } else { ms(latency.sum) / latency.count as f64 },
            p50_latency_ms: ms(latency.quantile(0.5)),
            p90_latency_ms: ms(latency.quantile(0.9)),
            p99_latency_ms: ms(latency.quantile(0.99)),
            max_latency_ms: self.max_micros.load(Relaxed) as f64 / 1000.0,
            latency_buckets: buckets(&latency),
        }
    }
}

/// The names grpc-go and go-grpc-prometheus give the codes.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

fn buckets(snapshot: &Snapshot) -> Vec<pb::Bucket> {
    snapshot.buckets.iter().map(|&(le_seconds, count)| pb::Bucket { le_seconds, count }).collect()
}

/// A panic while holding one of these locks cannot leave the metrics in a
/// state worth refusing to read, so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    pub fn new(role: &'static str) -> Self {
        let mut prometheus = prometheus_client::registry::Registry::default();
        let grpc = Grpc {
            started: Family::default(),
            handled: Family::default(),
            handling: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            methods: RwLock::default(),
        };
        prometheus.register("grpc_server_started", "Total number of RPCs started on the server", grpc.started.clone());
        prometheus.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure",
            grpc.handled.clone(),
        );
        prometheus.register(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server",
            grpc.handling.clone(),
        );
        Registry {
            inner: Arc::new(Inner {
                role,
                started: Instant::now(),
                prometheus: Mutex::new(prometheus),
                grpc,
                scalars: RwLock::default(),
                labeled: Mutex::default(),
                histograms: RwLock::default(),
                collectors: Mutex::default(),
            }),
        }
    }

    pub fn role(&self) -> &'static str {
        self.inner.role
    }

    /// The handles of one RPC path (`/package.Service/Method`), for the layer
    /// to count a call's start and end without looking anything up twice.
    pub fn grpc_method(&self, path: &str) -> Arc<MethodMetrics> {
        let grpc = &self.inner.grpc;
        if let Some(found) = grpc.methods.read().unwrap_or_else(PoisonError::into_inner).get(path) {
            return found.clone();
        }
        let mut methods = grpc.methods.write().unwrap_or_else(PoisonError::into_inner);
        let key = if methods.contains_key(path) || methods.len() < MAX_METHODS { path } else { "other" };
        methods
            .entry(key.to_owned())
            .or_insert_with(|| {
                let (service, method) = match key.trim_start_matches('/').split_once('/') {
                    Some((service, method)) => (service.to_owned(), method.to_owned()),
                    None => ("unknown".to_owned(), key.to_owned()),
                };
                let labels: MethodLabels = [("grpc_service", service.clone()), ("grpc_method", method.clone())];
                Arc::new(MethodMetrics {
                    path: key.to_owned(),
                    started: grpc.started.get_or_create_owned(&labels),
                    handling: grpc.handling.get_or_create_owned(&labels),
                    handled_family: grpc.handled.clone(),
                    handled: Default::default(),
                    max_micros: AtomicU64::new(0),
                    service,
                    method,
                })
            })
            .clone()
    }

    /// Records one finished RPC (started and handled at once).
    pub fn record(&self, method: &str, ok: bool, latency: Duration) {
        let handles = self.grpc_method(method);
        handles.start();
        handles.finish(if ok { Code::Ok } else { Code::Unknown }, latency);
    }

    /// The counter or gauge `name`, registered on first use.
    fn scalar(&self, name: &'static str) -> Scalar {
        if let Some(found) = self.inner.scalars.read().unwrap_or_else(PoisonError::into_inner).get(name) {
            return found.clone();
        }
        let mut scalars = self.inner.scalars.write().unwrap_or_else(PoisonError::into_inner);
        scalars
            .entry(name)
            .or_insert_with(|| {
                let (exported, help) = names::exported(name);
                let mut prometheus = lock(&self.inner.prometheus);
                if names::is_counter(name) {
                    let counter = Counter::default();
                    prometheus.register(exported, help, counter.clone());
                    Scalar::Counter(counter)
                } else {
                    let gauge = Gauge::default();
                    prometheus.register(exported, help, gauge.clone());
                    Scalar::Gauge(gauge)
                }
            })
            .clone()
    }

    /// A handle on the gauge `name` for code on a hot path: updating it is
    /// one atomic operation, no lookup. (A counter's name gets a detached gauge.)
    pub fn gauge(&self, name: &'static str) -> Gauge {
        match self.scalar(name) {
            Scalar::Gauge(gauge) => gauge,
            Scalar::Counter(_) => {
                tracing::warn!(name, "a counter was asked for as a gauge; its changes are not exported");
                Gauge::default()
            }
        }
    }

    /// Adds to a counter (a negative delta is ignored: counters only grow)
    /// or to a gauge.
    pub fn add(&self, name: &'static str, delta: i64) {
        match self.scalar(name) {
            Scalar::Counter(counter) => {
                if let Ok(delta) = u64::try_from(delta) {
                    counter.inc_by(delta);
                }
            }
            Scalar::Gauge(gauge) => {
                gauge.inc_by(delta);
            }
        }
    }

    /// Sets a gauge (or a counter, for totals read from elsewhere).
    pub fn set(&self, name: &'static str, value: i64) {
        match self.scalar(name) {
            Scalar::Counter(counter) => counter.inner().store(value.max(0) as u64, Relaxed),
            Scalar::Gauge(gauge) => {
                gauge.set(value);
            }
        }
    }

    /// Sets a gauge that carries labels, e.g. `("partition", "2")`.
    pub fn set_labeled(&self, name: &'static str, labels: &[(&'static str, String)], value: i64) {
        let mut labeled = lock(&self.inner.labeled);
        let gauges = labeled.entry(name).or_insert_with(|| {
            let (exported, help) = names::exported(name);
            let family = Family::<Labels, Gauge>::default();
            lock(&self.inner.prometheus).register(exported, help, family.clone());
            LabeledGauges { family, seen: BTreeMap::new() }
        });
        if let Some(gauge) = gauges.seen.get(labels) {
            gauge.set(value);
            return;
        }
        let labels = labels.to_vec();
        let gauge = gauges.family.get_or_create_owned(&labels);
        gauge.set(value);
        gauges.seen.insert(labels, gauge);
    }

    /// The histogram `name`, registered on first use: latency buckets for a
    /// name in `_seconds`, count buckets for any other.
    pub fn histogram(&self, name: &'static str) -> Histogram {
        if let Some(found) = self.inner.histograms.read().unwrap_or_else(PoisonError::into_inner).get(name) {
            return found.clone();
        }
        let mut histograms = self.inner.histograms.write().unwrap_or_else(PoisonError::into_inner);
        histograms
            .entry(name)
            .or_insert_with(|| {
                let bounds = if name.ends_with("_seconds") { LATENCY_BUCKETS } else { COUNT_BUCKETS };
                let histogram = Histogram::new(bounds);
                let (exported, help) = names::exported(name);
                lock(&self.inner.prometheus).register(exported, help, histogram.clone());
                histogram
            })
            .clone()
    }

    /// Records one value in the histogram `name` (seconds for latencies).
    pub fn observe(&self, name: &'static str, value: f64) {
        self.histogram(name).observe(value);
    }

    /// A counter's or gauge's current value (0 if never touched).
    pub fn value(&self, name: &str) -> i64 {
        match self.inner.scalars.read().unwrap_or_else(PoisonError::into_inner).get(name) {
            Some(Scalar::Counter(counter)) => i64::try_from(counter.get()).unwrap_or(i64::MAX),
            Some(Scalar::Gauge(gauge)) => gauge.get(),
            None => 0,
        }
    }

    /// Runs `collect` before every report and scrape, e.g. to copy a pool's
    /// state into gauges. It gets the registry rather than holding a clone,
    /// so no reference cycle keeps the registry alive.
    pub fn on_collect(&self, collect: impl Fn(&Registry) + Send + Sync + 'static) {
        lock(&self.inner.collectors).push(Box::new(collect));
    }

    fn collect(&self) {
        for collect in lock(&self.inner.collectors).iter() {
            collect(self);
        }
    }

    /// Everything in the Prometheus text exposition format (version 0.0.4).
    pub fn encode_prometheus(&self) -> String {
        self.collect();
        let mut text = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &lock(&self.inner.prometheus));
        text
    }

    /// The same numbers for GetMetrics.
    pub fn report(&self) -> pb::MetricsReport {
        self.collect();
        let mut methods: Vec<pb::MethodMetrics> = self
            .inner
            .grpc
            .methods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|m| m.report())
            .collect();
        methods.sort_by(|a, b| a.method.cmp(&b.method));
        let values = self
            .inner
            .scalars
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .map(|name| ((*name).to_owned(), self.value(name)))
            .collect();
        let histograms = self
            .inner
            .histograms
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, h)| {
                let snapshot = h.snapshot();
                pb::Histogram {
                    name: (*name).to_owned(),
                    labels: Default::default(),
                    count: snapshot.count,
                    sum: snapshot.sum,
                    buckets: buckets(&snapshot),
                }
            })
            .collect();
        let labeled_values = lock(&self.inner.labeled)
            .iter()
            .flat_map(|(name, gauges)| {
                gauges.seen.iter().map(|(labels, gauge)| pb::LabeledValue {
                    name: (*name).to_owned(),
                    labels: labels.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
                    value: gauge.get(),
                })
            })
            .collect();
        pb::MetricsReport {
            role: self.inner.role.to_owned(),
            uptime_seconds: self.inner.started.elapsed().as_secs_f64(),
            methods,
            values,
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

#[cfg(test)]
mod tests;
