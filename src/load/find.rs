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
