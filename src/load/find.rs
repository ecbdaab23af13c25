//! The capacity search (`--find-max --p99-under 20ms`): the highest constant
//! rate whose p99 (from the intended start, so queueing counts) stays under
//! the target. Short open-loop trials double the rate until one fails, then
//! bisect between the last pass and the first failure to within 10 %.

/// One trial of the search.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Trial {
    pub rate: f64,
    pub achieved_rps: f64,
    pub p99_ms: f64,
    pub error_rate: f64,
    pub dropped: u64,
    pub passed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FindMax {
    pub p99_under_ms: f64,
    pub trials: Vec<Trial>,
    /// The highest passing rate, if any passed.
    pub max_rps: Option<f64>,
    /// The highest rate the search was allowed to try (LOAD_MAX_RATE).
    #[serde(default)]
    pub rate_limit: f64,
    /// The search passed at `rate_limit` and went no further: the service was
    /// not saturated, so `max_rps` is a floor, not its capacity.
    #[serde(default)]
    pub stopped_at_limit: bool,
}

impl FindMax {
    /// Records the outcome once `next_rate` says the search is done.
    pub fn conclude(&mut self, rate_limit: f64) {
        self.rate_limit = rate_limit;
        self.max_rps = self
            .trials
            .iter()
            .filter(|t| t.passed)
            .map(|t| t.rate)
            .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
        self.stopped_at_limit = self.max_rps.is_some_and(|r| r >= rate_limit);
    }

    /// The search's answer in one line. A pass at the limit is not the
    /// capacity: calling it "the highest rate" would send readers away
    /// believing the service tops out where the load tool was told to stop.
    pub fn verdict(&self) -> String {
        match self.max_rps {
            Some(rate) if self.stopped_at_limit => format!(
                "≥ {}/s: stopped at LOAD_MAX_RATE, the service was not saturated (p99 still under target); \
                 raise LOAD_MAX_RATE to search further",
                thousands(rate)
            ),
            Some(rate) => format!("highest rate with p99 under target: {}/s", thousands(rate)),
            None => "no tried rate kept p99 under the target".to_owned(),
        }
    }
}

/// `50000.0` as "50,000": rates are read by people, and a search ends in round numbers.
pub fn thousands(rate: f64) -> String {
    let digits = format!("{:.0}", rate.abs());
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if rate < 0.0 { format!("-{out}") } else { out }
}

/// At most this many trials, whatever the answers.
pub const MAX_TRIALS: usize = 14;

/// A trial passes when p99 is under target, under 1 % of calls fail or are
/// dropped, and the engine reached 95 % of the rate (else it measured itself).
pub fn passes(
    p99_ms: f64,
    target_ms: f64,
    error_rate: f64,
    dropped: u64,
    requests: u64,
    achieved: f64,
    rate: f64,
) -> bool {
    let scheduled = (requests + dropped).max(1) as f64;
    p99_ms < target_ms && error_rate < 0.01 && (dropped as f64) / scheduled < 0.01 && achieved >= rate * 0.95
}

/// The next rate to try after `trials`, or None when the search is done.
/// Pure, so the search is tested without a system under test.
pub fn next_rate(trials: &[Trial], start: f64, max_rate: f64) -> Option<f64> {
    if trials.len() >= MAX_TRIALS {
        return None;
    }
    let Some(last) = trials.last() else { return Some(start.min(max_rate)) };
    let best_pass = trials
        .iter()
        .filter(|t| t.passed)
        .map(|t| t.rate)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
    let first_fail = trials
        .iter()
        .filter(|t| !t.passed)
        .map(|t| t.rate)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.min(r))));
    match (best_pass, first_fail) {
        // Still climbing: double, up to the limit.
        (Some(pass), None) => (last.rate < max_rate).then(|| (pass * 2.0).min(max_rate)),
        // Even the start failed: halve down to 1/s.
        (None, Some(fail)) => (fail > 1.0).then(|| (fail / 2.0).max(1.0)),
        (Some(pass), Some(fail)) if fail > pass * 1.1 => Some(((pass + fail) / 2.0).round()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search against a system whose p99 is under target up to `capacity`.
    fn search(capacity: f64, start: f64, max_rate: f64) -> (Vec<Trial>, Option<f64>) {
        let mut trials = Vec::new();
        while let Some(rate) = next_rate(&trials, start, max_rate) {
            trials.push(Trial { rate, passed: rate <= capacity, ..Trial::default() });
        }
        let best = trials
            .iter()
            .filter(|t| t.passed)
            .map(|t| t.rate)
            .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
        (trials, best)
    }

    #[test]
    fn finds_the_capacity_within_ten_percent() {
        let (trials, best) = search(1500.0, 100.0, 50_000.0);
        let best = best.expect("a rate passed");
        assert!((1500.0 / 1.1..=1500.0).contains(&best), "{best}");
        assert!(trials.len() <= MAX_TRIALS);
    }

    #[test]
    fn stops_at_the_rate_limit() {
        let (trials, best) = search(1e9, 100.0, 1000.0);
        assert_eq!(best, Some(1000.0));
        assert_eq!(trials.last().map(|t| t.rate), Some(1000.0));
    }

    fn concluded(capacity: f64, max_rate: f64) -> FindMax {
        let (trials, _) = search(capacity, 500.0, max_rate);
        let mut find = FindMax { p99_under_ms: 20.0, trials, ..FindMax::default() };
        find.conclude(max_rate);
        find
    }

    #[test]
    fn a_search_that_passes_at_the_limit_says_the_ceiling_was_hit_not_the_capacity() {
        let find = concluded(1e9, 50_000.0);
        assert_eq!(find.max_rps, Some(50_000.0));
        assert!(find.stopped_at_limit);
        let verdict = find.verdict();
        assert!(
            verdict.starts_with("≥ 50,000/s: stopped at LOAD_MAX_RATE, the service was not saturated"),
            "{verdict}"
        );
        assert!(!verdict.contains("highest rate"), "{verdict}");
    }

    #[test]
    fn a_search_that_found_the_capacity_below_the_limit_reports_the_highest_rate() {
        let find = concluded(12_000.0, 50_000.0);
        assert!(!find.stopped_at_limit);
        let best = find.max_rps.expect("a rate passed");
        assert!((12_000.0 / 1.1..=12_000.0).contains(&best), "{best}");
        assert_eq!(find.verdict(), format!("highest rate with p99 under target: {}/s", thousands(best)));
        // A failure at the limit is a capacity found, not a ceiling hit.
        let find = concluded(49_000.0, 50_000.0);
        assert!(!find.stopped_at_limit, "{:?}", find.trials);
        assert!(find.verdict().starts_with("highest rate"));
        assert_eq!(concluded(0.5, 50_000.0).verdict(), "no tried rate kept p99 under the target");
    }

    #[test]
    fn rates_are_printed_with_thousands_separators() {
        assert_eq!(thousands(50_000.0), "50,000");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(0.0), "0");
    }

    #[test]
    fn halves_when_even_the_start_is_too_fast() {
        let (_, best) = search(30.0, 100.0, 1000.0);
        let best = best.expect("a rate passed");
        assert!((27.0..=30.0).contains(&best), "{best}");
    }

    #[test]
    fn a_trial_that_could_not_reach_its_rate_fails() {
        assert!(passes(5.0, 20.0, 0.0, 0, 1000, 990.0, 1000.0));
        assert!(!passes(5.0, 20.0, 0.0, 0, 800, 800.0, 1000.0));
        assert!(!passes(25.0, 20.0, 0.0, 0, 1000, 1000.0, 1000.0));
        assert!(!passes(5.0, 20.0, 0.02, 0, 1000, 1000.0, 1000.0));
        assert!(!passes(5.0, 20.0, 0.0, 50, 950, 950.0, 1000.0));
    }
}
