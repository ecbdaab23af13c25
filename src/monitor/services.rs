//! The services collector: asks each role's grpc.health.v1 service and its
//! `MetricsService/GetMetrics` over the network, and turns two consecutive
//! reports into per-interval figures (counts from the difference of the
//! counters, percentiles from the difference of the cumulative latency
//! buckets). A role that does not answer within the deadline is DOWN and
//! keeps its last figures, flagged stale.

use std::time::{Duration, Instant, SystemTime};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::{
    metrics::Registry,
    pb::{self, metrics_service_client::MetricsServiceClient},
};

/// RPCs that exist to watch a role (health checks, metrics scrapes,
/// reflection) are listed per method but left out of the role's totals, so
/// requests per second means the role's own API, not the monitor's probes.
pub fn is_monitoring_rpc(method: &str) -> bool {
    method.starts_with("/grpc.health.")
        || method.starts_with("/grpc.reflection.")
        || method.starts_with("/msys.v1.MetricsService/")
}

// Three targets per monitor: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    Remote {
        health: HealthClient<Channel>,
        metrics: MetricsServiceClient<Channel>,
        service: &'static str,
    },
    /// The monitor itself: its own registry, read in-process.
    Local(Registry),
}

pub struct ServiceTarget {
    name: &'static str,
    address: String,
    source: Source,
    last_report: Option<pb::MetricsReport>,
    last: Option<pb::ServiceStatus>,
}

impl ServiceTarget {
    /// A role reached at `address`; `service` is the name its health
    /// service reports readiness under (e.g. msys.v1.UserService).
    pub fn remote(name: &'static str, address: &str, service: &'static str, timeout: Duration) -> anyhow::Result<Self> {
        let uri = crate::grpc::uri_of(address);
        let channel = Endpoint::from_shared(uri.clone())
            .map_err(|e| anyhow::anyhow!("{name} address {uri:?} is not valid: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_lazy();
        Ok(ServiceTarget {
            name,
            address: uri,
            source: Source::Remote {
                health: HealthClient::new(channel.clone()),
                metrics: MetricsServiceClient::new(channel),
                service,
            },
            last_report: None,
            last: None,
        })
    }

    pub fn local(name: &'static str, address: String, registry: Registry) -> Self {
        ServiceTarget { name, address, source: Source::Local(registry), last_report: None, last: None }
    }

    /// One probe within `deadline`; never fails: a target that does not
    /// answer gives its last sample, stale, with the error.
    pub async fn sample(&mut self, deadline: Duration) -> pb::ServiceStatus {
        let started = Instant::now();
        let answer = match &mut self.source {
            Source::Local(registry) => Ok((ServingStatus::Serving, registry.report())),
            Source::Remote { health, metrics, service } => {
                let probe = async {
                    let request = HealthCheckRequest { service: (*service).to_owned() };
                    let (h, m) = tokio::join!(health.check(request), metrics.get_metrics(pb::GetMetricsRequest {}));
                    let h = h.map_err(|s| describe(&s))?.into_inner();
                    let m = m.map_err(|s| describe(&s))?.into_inner();
                    Ok::<_, String>((ServingStatus::try_from(h.status).unwrap_or(ServingStatus::Unknown), m))
                };
                match tokio::time::timeout(deadline, probe).await {
                    Ok(answer) => answer,
                    Err(_) => Err(format!("no answer within {} ms", deadline.as_millis())),
                }
            }
        };
        let probe_ms = started.elapsed().as_secs_f64() * 1000.0;
        match answer {
            Ok((serving, report)) => {
                let (state, error) = match serving {
                    ServingStatus::Serving => (pb::ServiceState::Up, String::new()),
                    other => (pb::ServiceState::NotServing, format!("health check says {}", other.as_str_name())),
                };
                let (interval, since_start, methods) = figures(self.last_report.as_ref(), &report);
                let status = pb::ServiceStatus {
                    name: self.name.to_owned(),
                    address: self.address.clone(),
                    healthy: state == pb::ServiceState::Up,
                    state: state.into(),
                    error,
                    stale: false,
                    sampled_at: Some(SystemTime::now().into()),
                    uptime_seconds: report.uptime_seconds,
                    interval: Some(interval),
                    since_start: Some(since_start),
                    methods,
                    pool: pool(self.name, &report),
                    probe_ms,
                    metrics: Some(report.clone()),
                };
                self.last_report = Some(report);
                self.last = Some(status.clone());
                status
            }
            Err(error) => {
                let mut status = self.last.clone().unwrap_or_else(|| pb::ServiceStatus {
                    name: self.name.to_owned(),
                    address: self.address.clone(),
                    ..Default::default()
                });
                status.healthy = false;
                status.state = pb::ServiceState::Down.into();
                status.error = error;
                status.stale = true;
                status.probe_ms = probe_ms;
                // The next answer is compared with the last one we had: its
                // interval then spans the outage, which is what happened.
                status
            }
        }
    }
}

/// A status's words for a person: code and message, without tonic's framing.
fn describe(status: &tonic::Status) -> String {
    let source = std::error::Error::source(status).map(|s| format!(" ({s})")).unwrap_or_default();
    format!("{:?}: {}{source}", status.code(), status.message())
}

fn pool(role: &str, report: &pb::MetricsReport) -> Option<pb::PoolStatus> {
    let size = *report.values.get("db_pool_size")?;
    Some(pb::PoolStatus {
        role: role.to_owned(),
        size,
        in_use: report.values.get("db_pool_in_use").copied().unwrap_or(0),
        waiters: report.values.get("db_pool_waiters").copied().unwrap_or(0),
    })
}

/// Interval figures (from `prev` to `now`), since-start figures and the
/// per-method list. Without a usable `prev` (first sample, or the role
/// restarted and its counters went back), the interval is everything `now`
/// holds, over the role's uptime.
pub fn figures(
    prev: Option<&pb::MetricsReport>,
    now: &pb::MetricsReport,
) -> (pb::RequestFigures, pb::RequestFigures, Vec<pb::MethodFigures>) {
    let prev = prev.filter(|p| p.uptime_seconds < now.uptime_seconds && !went_back(p, now));
    let span = prev.map(|p| now.uptime_seconds - p.uptime_seconds).unwrap_or(now.uptime_seconds);
    let mut methods = Vec::new();
    let (mut interval_sum, mut total_sum) = (Counts::default(), Counts::default());
    for m in &now.methods {
        let before = prev.and_then(|p| p.methods.iter().find(|b| b.method == m.method));
        let delta = Counts::of(m).minus(before.map(Counts::of).unwrap_or_default());
        let buckets = minus_buckets(&m.latency_buckets, before.map(|b| b.latency_buckets.as_slice()).unwrap_or(&[]));
        let interval = delta.clone().with_buckets(buckets.clone()).figures(span);
        let all = minus_buckets(&m.latency_buckets, &[]);
        let mut since_start = Counts::of(m).with_buckets(all.clone()).figures(now.uptime_seconds);
        // The role's own HDR percentiles are finer than bucket interpolation.
        since_start.p50_latency_ms = Some(m.p50_latency_ms);
        since_start.p90_latency_ms = Some(m.p90_latency_ms);
        since_start.p99_latency_ms = Some(m.p99_latency_ms);
        if !is_monitoring_rpc(&m.method) {
            interval_sum.add(&delta.with_buckets(buckets));
            total_sum.add(&Counts::of(m).with_buckets(all));
        }
        methods.push(pb::MethodFigures {
            method: m.method.clone(),
            interval: Some(interval),
            since_start: Some(since_start),
        });
    }
    (interval_sum.figures(span), total_sum.figures(now.uptime_seconds), methods)
}

fn went_back(prev: &pb::MetricsReport, now: &pb::MetricsReport) -> bool {
    prev.methods.iter().any(|b| now.methods.iter().find(|m| m.method == b.method).is_none_or(|m| m.total < b.total))
}

#[derive(Default, Clone)]
struct Counts {
    ok: u64,
    failed: u64,
    /// Cumulative buckets (le seconds, count); None when they cannot be had.
    buckets: Option<Vec<(f64, u64)>>,
}

impl Counts {
    fn of(m: &pb::MethodMetrics) -> Self {
        Counts { ok: m.ok, failed: m.failed, buckets: None }
    }

    fn minus(self, before: Counts) -> Counts {
        Counts {
            ok: self.ok.saturating_sub(before.ok),
            failed: self.failed.saturating_sub(before.failed),
            buckets: None,
        }
    }

    fn with_buckets(mut self, buckets: Vec<(f64, u64)>) -> Counts {
        self.buckets = (!buckets.is_empty()).then_some(buckets);
        self
    }

    /// Adds another method's counts; buckets merge only when both have the same bounds.
    fn add(&mut self, other: &Counts) {
        let first = self.ok + self.failed == 0 && self.buckets.is_none();
        self.ok += other.ok;
        self.failed += other.failed;
        self.buckets = match (first, self.buckets.take(), &other.buckets) {
            (true, _, b) => b.clone(),
            (false, Some(a), Some(b)) if a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0) => {
                Some(a.iter().zip(b).map(|(x, y)| (x.0, x.1 + y.1)).collect())
            }
            _ => None,
        };
    }

    fn figures(&self, span: f64) -> pb::RequestFigures {
        let total = self.ok + self.failed;
        let q = |q| self.buckets.as_deref().and_then(|b| quantile(q, b)).map(|s| s * 1000.0);
        pb::RequestFigures {
            total,
            ok: self.ok,
            failed: self.failed,
            requests_per_second: if span > 0.0 { total as f64 / span } else { 0.0 },
            error_rate: if total == 0 { 0.0 } else { self.failed as f64 / total as f64 },
            p50_latency_ms: q(0.5),
            p90_latency_ms: q(0.9),
            p99_latency_ms: q(0.99),
            span_seconds: span,
        }
    }
}

/// `now - before` bucket by bucket (matching bounds); `now` alone when there
/// is no `before`; empty when the bounds do not match.
pub fn minus_buckets(now: &[pb::Bucket], before: &[pb::Bucket]) -> Vec<(f64, u64)> {
    if before.is_empty() {
        return now.iter().map(|b| (b.le_seconds, b.count)).collect();
    }
    if before.len() != now.len() || before.iter().zip(now).any(|(a, b)| a.le_seconds != b.le_seconds) {
        return Vec::new();
    }
    now.iter().zip(before).map(|(n, b)| (n.le_seconds, n.count.saturating_sub(b.count))).collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside the
/// bucket it falls in, as Prometheus' histogram_quantile does. None when the
/// buckets are empty; the last finite bound when it falls in +Inf.
pub fn quantile(q: f64, buckets: &[(f64, u64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(le, count) in buckets {
        if count as f64 >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = (count - below) as f64;
            let fraction = if inside > 0.0 { (rank - below as f64) / inside } else { 1.0 };
            return Some(lower + (le - lower) * fraction);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method(name: &str, ok: u64, failed: u64, buckets: &[(f64, u64)]) -> pb::MethodMetrics {
        pb::MethodMetrics {
            method: name.into(),
            total: ok + failed,
            ok,
            failed,
            p50_latency_ms: 1.0,
            p90_latency_ms: 2.0,
            p99_latency_ms: 3.0,
            latency_buckets: buckets.iter().map(|&(le_seconds, count)| pb::Bucket { le_seconds, count }).collect(),
            ..Default::default()
        }
    }

    fn report(uptime: f64, methods: Vec<pb::MethodMetrics>) -> pb::MetricsReport {
        pb::MetricsReport { role: "user".into(), uptime_seconds: uptime, methods, ..Default::default() }
    }

    const CREATE: &str = "/msys.v1.UserService/CreateUser";
    const CHECK: &str = "/grpc.health.v1.Health/Check";

    #[test]
    fn interval_counts_are_the_difference_of_two_reports_without_monitoring_rpcs() {
        let before = report(10.0, vec![method(CREATE, 100, 2, &[]), method(CHECK, 10, 0, &[])]);
        let now = report(12.0, vec![method(CREATE, 130, 4, &[]), method(CHECK, 12, 0, &[])]);
        let (interval, since_start, methods) = figures(Some(&before), &now);
        assert_eq!((interval.total, interval.ok, interval.failed), (32, 30, 2));
        assert_eq!(interval.requests_per_second, 16.0);
        assert_eq!(interval.error_rate, 2.0 / 32.0);
        assert_eq!(interval.span_seconds, 2.0);
        assert_eq!(interval.p50_latency_ms, None, "no buckets, no interval percentiles");
        assert_eq!(since_start.total, 134);
        let create = methods.iter().find(|m| m.method == CREATE).expect("listed");
        assert_eq!(create.interval.as_ref().map(|f| f.total), Some(32));
        assert_eq!(create.since_start.as_ref().and_then(|f| f.p99_latency_ms), Some(3.0));
        assert!(methods.iter().any(|m| m.method == CHECK), "monitoring RPCs are still listed per method");
    }

    #[test]
    fn a_restarted_role_gives_its_whole_uptime_as_the_interval() {
        let before = report(100.0, vec![method(CREATE, 500, 0, &[])]);
        let now = report(3.0, vec![method(CREATE, 6, 0, &[])]);
        let (interval, _, _) = figures(Some(&before), &now);
        assert_eq!((interval.total, interval.span_seconds), (6, 3.0));
    }

    #[test]
    fn interval_percentiles_come_from_bucket_differences() {
        let inf = f64::INFINITY;
        let before = report(1.0, vec![method(CREATE, 100, 0, &[(0.001, 100), (0.01, 100), (inf, 100)])]);
        // 100 more calls, all between 1 and 10 ms.
        let now = report(2.0, vec![method(CREATE, 200, 0, &[(0.001, 100), (0.01, 200), (inf, 200)])]);
        let (interval, since_start, _) = figures(Some(&before), &now);
        let p50 = interval.p50_latency_ms.expect("buckets give percentiles");
        assert!((p50 - 5.5).abs() < 1e-9, "p50 {p50}");
        let p50_all = since_start.p50_latency_ms.expect("since start too");
        assert!((p50_all - 1.0).abs() < 1e-9, "p50 since start {p50_all}");
    }

    #[test]
    fn quantile_table() {
        let inf = f64::INFINITY;
        type Row = (&'static str, f64, Vec<(f64, u64)>, Option<f64>);
        let rows: Vec<Row> = vec![
            ("empty", 0.5, vec![], None),
            ("no observations", 0.5, vec![(1.0, 0), (inf, 0)], None),
            ("middle of the first bucket", 0.5, vec![(1.0, 10), (inf, 10)], Some(0.5)),
            ("second bucket", 0.75, vec![(1.0, 5), (3.0, 10), (inf, 10)], Some(2.0)),
            ("falls in +Inf", 0.99, vec![(1.0, 5), (inf, 10)], Some(1.0)),
        ];
        for (name, q, buckets, expected) in rows {
            assert_eq!(quantile(q, &buckets), expected, "{name}");
        }
    }

    #[test]
    fn buckets_with_other_bounds_are_not_subtracted() {
        let a = [pb::Bucket { le_seconds: 1.0, count: 3 }];
        let b = [pb::Bucket { le_seconds: 2.0, count: 1 }];
        assert!(minus_buckets(&a, &b).is_empty());
        assert_eq!(minus_buckets(&a, &[]), vec![(1.0, 3)]);
    }
}
