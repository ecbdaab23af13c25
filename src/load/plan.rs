//! The schedule of a rate-mode run: a pure iterator of intended send times
//! (offsets from the run's start), with no clock in it, so every shape is
//! unit-tested exactly.
//!
//! A shape is a rate over time, r(t), made of piecewise-linear segments. The
//! expected number of requests by time t is N(t) = ∫r. Request k is due
//! where N(t) reaches its target count: k itself for constant arrivals
//! (request i due at i/rate, as wrk2 does), or a running sum of Exp(1)
//! draws for Poisson arrivals (a Poisson process in "operational time" is a
//! non-homogeneous Poisson process with rate r(t) in real time). One
//! formula thus serves every shape and both arrival processes.

use std::time::Duration;

/// How requests are spread within the rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Evenly spaced: request i is due at i / rate.
    Constant,
    /// Exponential gaps with the same mean: bursts as real clients make them.
    Poisson,
}

/// The load profile: how the target rate changes over the measured run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Shape {
    /// The same rate throughout.
    Constant { rate: f64 },
    /// From `from` to `to` linearly over `over_s` seconds, then `to`.
    Ramp { from: f64, to: f64, over_s: f64 },
    /// `start`, raised by `step` every `every_s` seconds.
    Step { start: f64, step: f64, every_s: f64 },
    /// `base`, except `peak` for `for_s` seconds from `at_s`.
    Spike { base: f64, peak: f64, at_s: f64, for_s: f64 },
}

impl Shape {
    /// The target rate at `t` seconds into the measured run.
    pub fn rate_at(&self, t: f64) -> f64 {
        match *self {
            Shape::Constant { rate } => rate,
            Shape::Ramp { from, to, over_s } => {
                if t >= over_s || over_s <= 0.0 {
                    to
                } else {
                    from + (to - from) * t / over_s
                }
            }
            Shape::Step { start, step, every_s } => start + step * (t / every_s).floor().max(0.0),
            Shape::Spike { base, peak, at_s, for_s } => {
                if t >= at_s && t < at_s + for_s {
                    peak
                } else {
                    base
                }
            }
        }
    }

    /// The highest rate the shape reaches within `duration_s`.
    pub fn peak_rate(&self, duration_s: f64) -> f64 {
        self.segments(duration_s).iter().map(|s| s.r0.max(s.r1)).fold(0.0, f64::max)
    }

    /// Piecewise-linear segments covering `[0, duration_s)`.
    fn segments(&self, duration_s: f64) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut push = |start: f64, end: f64, r0: f64, r1: f64| {
            let (start, end) = (start.max(0.0), end.min(duration_s));
            if end > start {
                out.push(Segment { length: end - start, r0, r1 });
            }
        };
        match *self {
            Shape::Constant { rate } => push(0.0, duration_s, rate, rate),
            Shape::Ramp { from, to, over_s } => {
                let over = over_s.min(duration_s);
                push(0.0, over, from, self.rate_at(over));
                push(over, duration_s, to, to);
            }
            Shape::Step { start, step, every_s } => {
                let mut t = 0.0;
                let mut rate = start;
                while t < duration_s {
                    push(t, t + every_s, rate, rate);
                    t += every_s;
                    rate += step;
                }
            }
            Shape::Spike { base, peak, at_s, for_s } => {
                push(0.0, at_s, base, base);
                push(at_s, at_s + for_s, peak, peak);
                push(at_s + for_s, duration_s, base, base);
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    length: f64,
    r0: f64,
    r1: f64,
}

impl Segment {
    fn area(&self) -> f64 {
        (self.r0 + self.r1) / 2.0 * self.length
    }

    /// The time into the segment where the cumulative count reaches `c`
    /// (0 <= c <= area): the root of r0·t + a·t²/2 = c, in the form that
    /// stays exact when the slope a is 0.
    fn time_for(&self, c: f64) -> f64 {
        let a = (self.r1 - self.r0) / self.length;
        let root = (self.r0 * self.r0 + 2.0 * a * c).max(0.0).sqrt();
        let denominator = self.r0 + root;
        if denominator <= 0.0 { 0.0 } else { (2.0 * c / denominator).min(self.length) }
    }
}

/// A small deterministic generator (splitmix64): Poisson schedules are
/// reproducible from their seed, and no dependency is needed for it.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// The intended send times of one run: a warm-up at the shape's starting
/// rate, then the shape itself. Yields offsets from the run's start.
#[derive(Debug, Clone)]
pub struct Plan {
    segments: Vec<Segment>,
    index: usize,
    /// Seconds at which the current segment starts.
    segment_start: f64,
    /// The cumulative count at which the current segment starts.
    count_start: f64,
    /// The cumulative count the next request is due at.
    target: f64,
    arrival: Arrival,
    random: SplitMix,
}

impl Plan {
    pub fn new(shape: &Shape, warmup: Duration, duration: Duration, arrival: Arrival, seed: u64) -> Self {
        let warmup_s = warmup.as_secs_f64();
        let mut segments = Vec::new();
        if warmup_s > 0.0 {
            let rate = shape.rate_at(0.0);
            segments.push(Segment { length: warmup_s, r0: rate, r1: rate });
        }
        segments.extend(shape.segments(duration.as_secs_f64()));
        let mut plan = Plan {
            segments,
            index: 0,
            segment_start: 0.0,
            count_start: 0.0,
            target: 0.0,
            arrival,
            random: SplitMix::new(seed),
        };
        if arrival == Arrival::Poisson {
            plan.target = plan.gap();
        }
        plan
    }

    fn gap(&mut self) -> f64 {
        match self.arrival {
            Arrival::Constant => 1.0,
            Arrival::Poisson => -self.random.next_unit().ln(),
        }
    }

    /// The number of requests the plan will yield (constant arrivals), or
    /// the expected number (Poisson).
    pub fn expected_requests(shape: &Shape, warmup: Duration, duration: Duration) -> f64 {
        Plan::new(shape, warmup, duration, Arrival::Constant, 0).segments.iter().map(Segment::area).sum()
    }
}

impl Iterator for Plan {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        loop {
            let segment = *self.segments.get(self.index)?;
            let within = self.target - self.count_start;
            if within < segment.area() {
                let at = self.segment_start + segment.time_for(within);
                let gap = self.gap();
                self.target += gap;
                return Some(Duration::from_secs_f64(at));
            }
            self.index += 1;
            self.segment_start += segment.length;
            self.count_start += segment.area();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn times(shape: Shape, warmup: f64, duration: f64) -> Vec<f64> {
        Plan::new(&shape, secs(warmup), secs(duration), Arrival::Constant, 1).map(|d| d.as_secs_f64()).collect()
    }

    #[test]
    fn constant_rate_sends_request_i_at_i_over_rate() {
        let t = times(Shape::Constant { rate: 100.0 }, 0.0, 2.0);
        assert_eq!(t.len(), 200);
        for (i, at) in t.iter().enumerate() {
            assert!((at - i as f64 / 100.0).abs() < 1e-9, "request {i} at {at}");
        }
    }

    #[test]
    fn warmup_runs_at_the_starting_rate_before_the_shape() {
        let t = times(Shape::Ramp { from: 10.0, to: 100.0, over_s: 10.0 }, 1.0, 10.0);
        assert_eq!(t.iter().filter(|&&at| at < 1.0).count(), 10);
    }

    #[test]
    fn ramp_count_is_the_area_under_the_rate() {
        // 100 -> 300 over 10 s: mean 200/s, 2000 requests; then 300/s for 5 s.
        let t = times(Shape::Ramp { from: 100.0, to: 300.0, over_s: 10.0 }, 0.0, 15.0);
        assert_eq!(t.len(), 2000 + 1500);
        let first_second = t.iter().filter(|&&at| at < 1.0).count();
        let last_ramp_second = t.iter().filter(|&&at| (9.0..10.0).contains(&at)).count();
        assert!((100..=111).contains(&first_second), "{first_second}");
        assert!((289..=300).contains(&last_ramp_second), "{last_ramp_second}");
        assert!(t.windows(2).all(|w| w[0] < w[1]), "times increase");
    }

    #[test]
    fn step_raises_the_rate_every_interval() {
        let t = times(Shape::Step { start: 10.0, step: 10.0, every_s: 1.0 }, 0.0, 3.0);
        let per_second: Vec<usize> =
            (0..3).map(|s| t.iter().filter(|&&at| at >= s as f64 && at < s as f64 + 1.0).count()).collect();
        assert_eq!(per_second, vec![10, 20, 30]);
    }

    #[test]
    fn spike_holds_the_peak_only_for_its_window() {
        let shape = Shape::Spike { base: 10.0, peak: 100.0, at_s: 2.0, for_s: 1.0 };
        let t = times(shape, 0.0, 5.0);
        let in_spike = t.iter().filter(|&&at| (2.0..3.0).contains(&at)).count();
        assert_eq!(in_spike, 100);
        assert_eq!(t.len(), 10 * 4 + 100);
    }

    #[test]
    fn poisson_keeps_the_mean_rate_with_irregular_gaps() {
        let plan = Plan::new(&Shape::Constant { rate: 1000.0 }, Duration::ZERO, secs(20.0), Arrival::Poisson, 7);
        let t: Vec<f64> = plan.map(|d| d.as_secs_f64()).collect();
        let n = t.len() as f64;
        assert!((n - 20_000.0).abs() < 20_000.0 * 0.03, "{n} requests");
        let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        // Exponential gaps: standard deviation equals the mean.
        assert!((var.sqrt() / mean - 1.0).abs() < 0.05, "cv {}", var.sqrt() / mean);
    }

    #[test]
    fn poisson_schedule_is_reproducible_from_its_seed() {
        let a: Vec<_> =
            Plan::new(&Shape::Constant { rate: 50.0 }, Duration::ZERO, secs(1.0), Arrival::Poisson, 3).collect();
        let b: Vec<_> =
            Plan::new(&Shape::Constant { rate: 50.0 }, Duration::ZERO, secs(1.0), Arrival::Poisson, 3).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn expected_requests_is_rate_times_duration() {
        let n = Plan::expected_requests(&Shape::Constant { rate: 200.0 }, secs(2.0), secs(8.0));
        assert!((n - 2000.0).abs() < 1e-6);
    }

    #[test]
    fn zero_rate_segments_yield_nothing_and_end() {
        assert!(times(Shape::Constant { rate: 0.0 }, 0.0, 5.0).is_empty());
        let t = times(Shape::Spike { base: 0.0, peak: 10.0, at_s: 1.0, for_s: 1.0 }, 0.0, 3.0);
        assert_eq!(t.len(), 10);
        assert!(t.iter().all(|&at| (1.0..2.0).contains(&at)));
    }
}
