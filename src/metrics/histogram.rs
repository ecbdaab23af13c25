//! A cumulative-bucket histogram made of atomics: `observe` on the RPC hot
//! path is a handful of relaxed atomic adds, no lock. It is encoded through
//! `prometheus-client` (it implements `EncodeMetric`) and read back by
//! `Registry::report`, so `/metrics` and GetMetrics show the same numbers.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

/// Upper bounds for latencies in seconds: 1-2-3-5-7.5 steps per decade from
/// 100 µs to 10 s, so sub-millisecond reads and multi-second stalls both land
/// in a bucket of their own and percentiles interpolated from them stay
/// within a third of the true value.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0,
];

/// Upper bounds for counts (batch sizes, records): 1-2-5 steps from 1 to 5000.
pub const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];

/// Cheap to clone: clones share the counts.
#[derive(Clone, Debug)]
pub struct Histogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: Box<[AtomicU64]>,
    /// The sum as f64 bits, added with a compare-and-swap loop.
    sum: AtomicU64,
}

/// What a histogram holds at one moment, buckets cumulative and ending in +Inf.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub count: u64,
    pub sum: f64,
    /// (upper bound, observations <= bound), the last bound is +Inf.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram { inner: Arc::new(Inner { bounds, counts, sum: AtomicU64::new(0f64.to_bits()) }) }
    }

    pub fn observe(&self, value: f64) {
        let inner = &*self.inner;
        let index = inner.bounds.iter().position(|bound| value <= *bound).unwrap_or(inner.bounds.len());
        inner.counts[index].fetch_add(1, Relaxed);
        let mut current = inner.sum.load(Relaxed);
        loop {
            let next = (f64::from_bits(current) + value).to_bits();
            match inner.sum.compare_exchange_weak(current, next, Relaxed, Relaxed) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = &*self.inner;
        let mut cumulative = 0;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.counts.iter())
            .map(|(bound, count)| {
                cumulative += count.load(Relaxed);
                (bound, cumulative)
            })
            .collect();
        // The count is the +Inf bucket, so the two always agree even while
        // other threads observe.
        Snapshot { count: cumulative, sum: f64::from_bits(inner.sum.load(Relaxed)), buckets }
    }
}

impl Snapshot {
    /// The q-quantile estimated by linear interpolation inside the bucket it
    /// falls in, as PromQL's `histogram_quantile` does; values in the +Inf
    /// bucket answer the highest finite bound. 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut lower = (0.0, 0u64);
        for &(bound, cumulative) in &self.buckets {
            if cumulative as f64 >= rank && cumulative > 0 {
                if bound.is_infinite() {
                    return lower.0;
                }
                let in_bucket = (cumulative - lower.1) as f64;
                let into = (rank - lower.1 as f64).max(0.0);
                return lower.0 + (bound - lower.0) * if in_bucket > 0.0 { into / in_bucket } else { 1.0 };
            }
            lower = (bound, cumulative);
        }
        lower.0
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // The encoder wants each bucket's own count and accumulates them itself.
        let Snapshot { count, sum, buckets } = self.snapshot();
        let mut below = 0;
        let own: Vec<(f64, u64)> = buckets
            .into_iter()
            .map(|(bound, cumulative)| {
                let own = cumulative - below;
                below = cumulative;
                (bound, own)
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &own, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_in_the_total() {
        let h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 5.0, 50.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(1.0, 2), (10.0, 3), (f64::INFINITY, 4)]);
        assert_eq!(s.count, 4);
        assert_eq!(s.sum, 56.5);
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_promql() {
        let h = Histogram::new(&[1.0, 2.0, 4.0]);
        for v in [1.5, 1.5, 3.0, 3.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.quantile(0.5), 2.0);
        assert_eq!(s.quantile(0.75), 3.0);
        assert_eq!(s.quantile(0.25), 1.5);
    }

    #[test]
    fn an_empty_histogram_answers_zero_and_overflow_answers_the_top_bound() {
        let h = Histogram::new(&[1.0, 2.0]);
        assert_eq!(h.snapshot().quantile(0.99), 0.0);
        h.observe(100.0);
        assert_eq!(h.snapshot().quantile(0.99), 2.0);
    }
}
