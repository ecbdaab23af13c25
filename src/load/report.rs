//! The result of a run in three forms: the JSON report (`--report`), the
//! ghz-style text people read, and the verdicts CI acts on: thresholds
//! (`--threshold 'p99<50ms'`, k6's idea, exit code 99 when one fails) and a
//! comparison with an earlier report (`--baseline`) under a noise band.

use std::{collections::BTreeMap, fmt::Write as _};

use hdrhistogram::Histogram;

use super::{find::FindMax, group::GroupReport, pool::PoolReport};

/// Exit code when a threshold fails or the baseline shows a regression (as k6).
pub const THRESHOLD_EXIT_CODE: i32 = 99;

/// Summary of one HDR histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One bar of the latency histogram: calls that took at most `le_ms`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bar {
    pub le_ms: f64,
    pub count: u64,
}

/// Ten equal-width bars from the fastest to the slowest call, as ghz draws them.
pub fn bars(h: &Histogram<u64>) -> Vec<Bar> {
    if h.is_empty() {
        return Vec::new();
    }
    let (low, high) = (h.min(), h.max());
    let width = ((high - low) / 10).max(1);
    let mut out: Vec<Bar> = (1..=10).map(|k| Bar { le_ms: (low + width * k) as f64 / 1000.0, count: 0 }).collect();
    for v in h.iter_recorded() {
        let k = ((v.value_iterated_to().saturating_sub(low) / width) as usize).min(9);
        out[k].count += v.count_at_value();
    }
    if let Some(last) = out.last_mut() {
        last.le_ms = high as f64 / 1000.0;
    }
    out
}

/// Event lag seen during the run: commit in the user service → applied by the order service.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EventLag {
    /// Where the figures come from.
    pub source: String,
    pub events: u64,
    pub mean_ms: f64,
    /// Upper bound of the bucket holding the 99th percentile.
    pub p99_ms: f64,
    /// Largest consumer lag in records seen during the run, when known.
    pub max_lag_records: Option<i64>,
}

/// A threshold and whether the run met it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    pub threshold: String,
    pub actual: String,
    pub passed: bool,
}

/// One metric compared with the baseline.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    pub metric: String,
    pub baseline: f64,
    pub current: f64,
    pub change_pct: f64,
    pub regressed: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub scenario: String,
    /// open (rate), closed (concurrency), stages (db-pool), consumer-group or find-max.
    pub mode: String,
    /// The load shape in words, e.g. "constant 200/s, poisson arrivals".
    pub profile: String,
    /// Mean scheduled rate over the measured window; 0 in closed loop.
    pub target_rps: f64,
    pub achieved_rps: f64,
    /// Calls made in the measured window (ok + errors); dropped ones are not calls.
    pub requests: u64,
    pub ok: u64,
    pub dropped: u64,
    /// By gRPC code name.
    pub errors: BTreeMap<String, u64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub cancelled: bool,
    pub started_at: String,
    /// From the intended start (open loop), so stalls count in full.
    pub latency_ms: Percentiles,
    /// From the actual send.
    pub service_time_ms: Percentiles,
    pub latency_histogram: Vec<Bar>,
    pub commit: String,
    pub config: serde_json::Value,
    pub limits: serde_json::Value,
    pub event_lag: Option<EventLag>,
    pub db_pool: Option<PoolReport>,
    pub consumer_group: Option<GroupReport>,
    pub find_max: Option<FindMax>,
    pub thresholds: Vec<Verdict>,
    pub baseline: Option<String>,
    pub comparisons: Vec<Comparison>,
}

impl Report {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Failed calls over calls made, 0 when none was made.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.error_count() as f64 / self.requests as f64 }
    }

    /// Whether CI should fail the run: a threshold failed or a metric regressed.
    pub fn failed_gates(&self) -> bool {
        self.thresholds.iter().any(|v| !v.passed) || self.comparisons.iter().any(|c| c.regressed)
    }

    /// The ghz-style text report.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let ms = |v: f64| format_ms(v);
        let _ = writeln!(out, "\nSummary:");
        let _ = writeln!(out, "  Scenario:\t{} ({}, {})", self.scenario, self.mode, self.profile);
        let _ = writeln!(out, "  Commit:\t{}", self.commit);
        let _ = writeln!(out, "  Count:\t{}", self.requests);
        let _ = writeln!(
            out,
            "  Total:\t{:.2} s (after a {:.1} s warm-up){}",
            self.duration_s,
            self.warmup_s,
            if self.cancelled { ", CANCELLED" } else { "" }
        );
        if self.latency_ms.count > 0 {
            let _ = writeln!(out, "  Slowest:\t{}", ms(self.latency_ms.max));
            let _ = writeln!(out, "  Fastest:\t{}", ms(self.latency_ms.min));
            let _ = writeln!(out, "  Average:\t{}", ms(self.latency_ms.mean));
        }
        if self.target_rps > 0.0 {
            let _ = writeln!(out, "  Requests/sec:\t{:.1} (target {:.1})", self.achieved_rps, self.target_rps);
        } else {
            let _ = writeln!(out, "  Requests/sec:\t{:.1}", self.achieved_rps);
        }
        let _ = writeln!(out, "  Dropped:\t{} (no free in-flight slot at the intended time)", self.dropped);
        if !self.latency_histogram.is_empty() {
            let _ = writeln!(out, "\nResponse time histogram (from the intended start):");
            let top = self.latency_histogram.iter().map(|b| b.count).max().unwrap_or(1).max(1);
            for bar in &self.latency_histogram {
                let width = (bar.count * 40).div_ceil(top) as usize;
                let _ = writeln!(out, "  {:>10} [{}]\t|{}", ms(bar.le_ms), bar.count, "∎".repeat(width));
            }
            let l = &self.latency_ms;
            let s = &self.service_time_ms;
            let _ = writeln!(out, "\nLatency distribution:\t from intended start\t service time");
            for (name, a, b) in [
                ("50 %", l.p50, s.p50),
                ("90 %", l.p90, s.p90),
                ("99 %", l.p99, s.p99),
                ("99.9 %", l.p999, s.p999),
                ("max", l.max, s.max),
                ("mean", l.mean, s.mean),
            ] {
                let _ = writeln!(out, "  {name:<7}\t {:>12}\t\t {:>12}", ms(a), ms(b));
            }
        }
        let _ = writeln!(out, "\nStatus code distribution:");
        if self.ok > 0 {
            let _ = writeln!(out, "  [OK]\t{} responses", self.ok);
        }
        for (code, n) in &self.errors {
            let _ = writeln!(out, "  [{code}]\t{n} responses");
        }
        match &self.event_lag {
            Some(lag) => {
                let _ = write!(
                    out,
                    "\nEvent lag during the run ({}):\n  {} events, mean {}, p99 ≤ {}",
                    lag.source,
                    lag.events,
                    ms(lag.mean_ms),
                    ms(lag.p99_ms)
                );
                if let Some(records) = lag.max_lag_records {
                    let _ = write!(out, ", consumer lag at most {records} records");
                }
                let _ = writeln!(out);
            }
            None => {
                let _ =
                    writeln!(out, "\nEvent lag during the run: not observed (no event-producing load, or no source)");
            }
        }
        if let Some(pool) = &self.db_pool {
            let _ = writeln!(
                out,
                "\nConnection pool of the {} role: {} connections (from {})",
                pool.role, pool.pool_size, pool.pool_size_source
            );
            let _ =
                writeln!(out, "  concurrency\t  rps\t   p50\t   p99\terrors\twaiters max/mean\tin use max\twait mean");
            if pool.stages.iter().all(|s| s.waiters_max.is_none()) {
                let _ = writeln!(out, "  (n/a: the role does not export db_pool_waiters / db_pool_in_use)");
            }
            for s in &pool.stages {
                let wait = s.wait_mean_ms.map_or("-".to_owned(), ms);
                let _ = writeln!(
                    out,
                    "  {:>11}\t{:>5.0}\t{:>6}\t{:>6}\t{:>5.1}%\t{:>6} / {:<8}\t{:>10}\t{}",
                    s.concurrency,
                    s.achieved_rps,
                    ms(s.p50_ms),
                    ms(s.p99_ms),
                    s.error_rate * 100.0,
                    s.waiters_max.map_or("n/a".into(), |w| w.to_string()),
                    s.waiters_mean.map_or("n/a".into(), |w| format!("{w:.1}")),
                    s.in_use_max.map_or("n/a".into(), |w| w.to_string()),
                    wait
                );
            }
        }
        if let Some(group) = &self.consumer_group {
            let opt = |v: Option<f64>| v.map_or("never".to_owned(), ms);
            let _ = writeln!(
                out,
                "\nConsumer group {} on {} ({} members, {} partitions):",
                group.group, group.topic, group.members, group.partitions
            );
            let _ = writeln!(
                out,
                "  join and balance: {}\n  lag at start: {} records\n  drained: {} in {}\n  read: {} records, {:.0}/s\n  group deleted: {}{}",
                opt(group.join_ms),
                group.lag_at_start,
                group.drained,
                opt(group.drain_ms),
                group.records,
                group.records_per_s,
                group.deleted,
                group.delete_error.as_ref().map_or(String::new(), |e| format!(" ({e})"))
            );
        }
        if let Some(find) = &self.find_max {
            let _ = writeln!(out, "\nCapacity search (p99 under {}):", ms(find.p99_under_ms));
            for t in &find.trials {
                let _ = writeln!(
                    out,
                    "  {:>8.0}/s\tachieved {:>8.1}/s\tp99 {:>10}\terrors {:.2}%\tdropped {}\t{}",
                    t.rate,
                    t.achieved_rps,
                    ms(t.p99_ms),
                    t.error_rate * 100.0,
                    t.dropped,
                    if t.passed { "ok" } else { "too slow" }
                );
            }
            let _ = writeln!(out, "  => {}", find.verdict());
        }
        if !self.thresholds.is_empty() {
            let _ = writeln!(out, "\nThresholds:");
            for v in &self.thresholds {
                let _ = writeln!(
                    out,
                    "  {} {}\t(actual {})",
                    if v.passed { "PASS" } else { "FAIL" },
                    v.threshold,
                    v.actual
                );
            }
        }
        if let Some(baseline) = &self.baseline {
            let _ = writeln!(out, "\nAgainst baseline {baseline} (noise band: {}):", NOISE_BAND);
            for c in &self.comparisons {
                let _ = writeln!(
                    out,
                    "  {}\t{:<18}\t{:.3} -> {:.3} ({:+.1} %)",
                    if c.regressed { "REGRESSED" } else { "ok" },
                    c.metric,
                    c.baseline,
                    c.current,
                    c.change_pct
                );
            }
        }
        out
    }
}

pub fn format_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 1.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{:.0} µs", ms * 1000.0)
    }
}

// ---------------------------------------------------------------- thresholds

#[derive(Debug, Clone, Copy)]
enum Metric {
    Latency(fn(&Percentiles) -> f64),
    Service(fn(&Percentiles) -> f64),
    Errors,
    Dropped,
    Rps,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
}

/// A parsed `--threshold`, e.g. `p99<50ms`, `errors<1%`, `rps>1000`.
#[derive(Debug, Clone)]
pub struct Threshold {
    text: String,
    metric: Metric,
    op: Op,
    value: f64,
    /// The value is a share of the calls (errors, dropped) rather than a count.
    percent: bool,
}

fn percentile(name: &str) -> Option<fn(&Percentiles) -> f64> {
    Some(match name {
        "p50" => |p| p.p50,
        "p90" => |p| p.p90,
        "p99" => |p| p.p99,
        "p999" | "p99.9" => |p| p.p999,
        "max" => |p| p.max,
        "mean" | "avg" => |p| p.mean,
        _ => return None,
    })
}

impl std::str::FromStr for Threshold {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let (at, op, len) = ["<=", ">=", "<", ">"]
            .iter()
            .find_map(|sym| compact.find(sym).map(|at| (at, *sym, sym.len())))
            .ok_or_else(|| format!("threshold {text:?} has no comparison: write e.g. p99<50ms, errors<1%, rps>1000"))?;
        let op = match op {
            "<=" => Op::Le,
            ">=" => Op::Ge,
            "<" => Op::Lt,
            _ => Op::Gt,
        };
        let (name, value) = (&compact[..at], &compact[at + len..]);
        let metric = match name {
            "errors" | "error_rate" => Metric::Errors,
            "dropped" => Metric::Dropped,
            "rps" => Metric::Rps,
            _ => match name.strip_prefix("service_") {
                Some(rest) => Metric::Service(percentile(rest).ok_or_else(|| unknown(name))?),
                None => Metric::Latency(percentile(name).ok_or_else(|| unknown(name))?),
            },
        };
        let number = |digits: &str| -> Result<f64, String> {
            digits
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("threshold {text:?}: {value:?} is not a non-negative number"))
        };
        let (value, percent) = match metric {
            Metric::Latency(_) | Metric::Service(_) => {
                let (digits, scale) = if let Some(d) = value.strip_suffix("ms") {
                    (d, 1.0)
                } else if let Some(d) = value.strip_suffix("us").or_else(|| value.strip_suffix("µs")) {
                    (d, 0.001)
                } else if let Some(d) = value.strip_suffix('s') {
                    (d, 1000.0)
                } else {
                    return Err(format!("threshold {text:?}: give the time with a unit (us, ms or s), e.g. 50ms"));
                };
                (number(digits)? * scale, false)
            }
            Metric::Errors | Metric::Dropped => match value.strip_suffix('%') {
                Some(d) => (number(d)? / 100.0, true),
                None => (number(value)?, false),
            },
            Metric::Rps => (number(value)?, false),
        };
        Ok(Threshold { text: text.trim().to_owned(), metric, op, value, percent })
    }
}

fn unknown(name: &str) -> String {
    format!(
        "unknown threshold metric {name:?}: use p50, p90, p99, p999, max, mean (latency), service_p99 etc., errors, dropped or rps"
    )
}

impl Threshold {
    /// The threshold as it was written.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn check(&self, report: &Report) -> Verdict {
        let scheduled = report.requests + report.dropped;
        let share = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
        let (actual, shown) = match self.metric {
            Metric::Latency(f) => (f(&report.latency_ms), format_ms(f(&report.latency_ms))),
            Metric::Service(f) => (f(&report.service_time_ms), format_ms(f(&report.service_time_ms))),
            Metric::Errors if self.percent => {
                let v = report.error_rate();
                (v, format!("{:.3} %", v * 100.0))
            }
            Metric::Errors => (report.error_count() as f64, report.error_count().to_string()),
            Metric::Dropped if self.percent => {
                let v = share(report.dropped, scheduled);
                (v, format!("{:.3} %", v * 100.0))
            }
            Metric::Dropped => (report.dropped as f64, report.dropped.to_string()),
            Metric::Rps => (report.achieved_rps, format!("{:.1}/s", report.achieved_rps)),
        };
        let passed = match self.op {
            Op::Lt => actual < self.value,
            Op::Le => actual <= self.value,
            Op::Gt => actual > self.value,
            Op::Ge => actual >= self.value,
        };
        Verdict { threshold: self.text.clone(), actual: shown, passed }
    }
}

// ---------------------------------------------------------------- baseline

/// The noise band, as printed in reports. Two runs of the same build on this
/// machine differ by a few percent in p50 and rate and by more in p99 (it
/// rests on 1 % of the calls), so a change counts as a regression only past:
/// latency percentiles +10 % and at least +1 ms; achieved rate −5 %; error
/// rate +0.5 percentage points.
pub const NOISE_BAND: &str = "latency +10 % and +1 ms, rate -5 %, errors +0.5 pp";

/// Compares `current` with `baseline` metric by metric under [`NOISE_BAND`].
pub fn compare(baseline: &Report, current: &Report) -> Vec<Comparison> {
    let change = |b: f64, c: f64| if b == 0.0 { 0.0 } else { (c - b) / b * 100.0 };
    let latency = |metric: &str, b: f64, c: f64| Comparison {
        metric: metric.to_owned(),
        baseline: b,
        current: c,
        change_pct: change(b, c),
        regressed: c > b * 1.10 && c - b > 1.0,
    };
    let mut out = vec![
        latency("latency p50 ms", baseline.latency_ms.p50, current.latency_ms.p50),
        latency("latency p99 ms", baseline.latency_ms.p99, current.latency_ms.p99),
        latency("service p99 ms", baseline.service_time_ms.p99, current.service_time_ms.p99),
    ];
    out.push(Comparison {
        metric: "achieved rps".into(),
        baseline: baseline.achieved_rps,
        current: current.achieved_rps,
        change_pct: change(baseline.achieved_rps, current.achieved_rps),
        regressed: current.achieved_rps < baseline.achieved_rps * 0.95,
    });
    let (b, c) = (baseline.error_rate() * 100.0, current.error_rate() * 100.0);
    out.push(Comparison {
        metric: "error rate %".into(),
        baseline: b,
        current: c,
        change_pct: change(b, c),
        regressed: c > b + 0.5,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            requests: 1000,
            ok: 990,
            dropped: 10,
            errors: BTreeMap::from([("Unavailable".into(), 10)]),
            achieved_rps: 500.0,
            latency_ms: Percentiles { p50: 2.0, p99: 40.0, max: 80.0, mean: 3.0, ..Percentiles::default() },
            service_time_ms: Percentiles { p99: 20.0, ..Percentiles::default() },
            ..Report::default()
        }
    }

    fn check(expr: &str) -> bool {
        expr.parse::<Threshold>().expect(expr).check(&report()).passed
    }

    #[test]
    fn thresholds_compare_latency_with_units() {
        assert!(check("p99<50ms"));
        assert!(!check("p99<40ms"));
        assert!(check("p99<=40ms"));
        assert!(check("p99 < 0.05s"));
        assert!(!check("max<50000us"));
        assert!(check("service_p99<25ms"));
        assert!(check("mean>2ms"));
    }

    #[test]
    fn thresholds_on_errors_dropped_and_rate() {
        assert!(check("errors<2%"));
        assert!(!check("errors<1%"));
        assert!(check("errors<=10"));
        assert!(!check("dropped<0.5%"));
        assert!(check("rps>400"));
        assert!(!check("rps>1000"));
    }

    #[test]
    fn bad_thresholds_are_refused_with_a_reason() {
        let err = |e: &str| e.parse::<Threshold>().unwrap_err();
        assert!(err("p99").contains("no comparison"));
        assert!(err("p98<5ms").contains("unknown threshold metric"));
        assert!(err("p99<50").contains("unit"));
        assert!(err("rps>fast").contains("not a non-negative number"));
        assert!(err("errors<-1%").contains("not a non-negative number"));
    }

    #[test]
    fn baseline_flags_only_changes_beyond_the_noise_band() {
        let base = report();
        let mut same = report();
        same.latency_ms.p99 = 43.0; // +7.5 %: noise
        same.achieved_rps = 480.0; // -4 %: noise
        assert!(compare(&base, &same).iter().all(|c| !c.regressed));
        let mut worse = report();
        worse.latency_ms.p99 = 60.0;
        worse.achieved_rps = 400.0;
        worse.errors.insert("Internal".into(), 20);
        let regressed: Vec<_> = compare(&base, &worse).into_iter().filter(|c| c.regressed).map(|c| c.metric).collect();
        assert_eq!(regressed, vec!["latency p99 ms", "achieved rps", "error rate %"]);
        // Sub-millisecond moves are never regressions, however large in percent.
        let mut tiny = report();
        tiny.latency_ms.p50 = 2.9;
        assert!(compare(&base, &tiny).iter().all(|c| !c.regressed));
    }

    #[test]
    fn bars_count_every_call() {
        let mut h = crate::load::run::histogram();
        for v in [100, 200, 300, 5_000, 90_000] {
            h.record(v).unwrap();
        }
        let bars = bars(&h);
        assert_eq!(bars.len(), 10);
        assert_eq!(bars.iter().map(|b| b.count).sum::<u64>(), 5);
        assert_eq!(bars.last().map(|b| b.count), Some(1));
    }
}
