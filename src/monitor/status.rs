//! The consumer-group evaluator, Burrow-style: no lag thresholds, a status
//! judged from how committed offsets and lag moved over a window of samples.
//! Pure functions of their inputs (no clock, no I/O), so every rule is pinned
//! by a table of situations below.
//!
//! Burrow (linkedin/Burrow `core/internal/evaluator/caching.go`) judges the
//! last 10 commits, with their broker timestamps. The broker this system runs
//! on does not tell when a group committed, only what, so the monitor samples
//! the committed offset every tick and knows when it last *moved*. Hence the
//! rules, checked in this order for a partition:
//! 1. no committed offset → EMPTY;
//! 2. lag 0 in any sample of the window → OK (Burrow's first rule);
//! 3. the offset has not moved for `stop_after` while records wait → STOPPED;
//! 4. the offset has not moved for the whole window while records wait → STALLED;
//! 5. commits move but lag never went down over the window, and grew → LAGGING;
//! 6. otherwise → OK (catching up).

use std::time::Duration;

use crate::pb::{GroupStatus, Trend};

/// One observation of a partition at `at` seconds (any fixed origin).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: f64,
    /// None when the group has no committed offset for the partition.
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
}

impl Sample {
    /// Records waiting: from the committed offset, or from the log start when
    /// nothing was committed yet.
    pub fn lag(&self) -> i64 {
        (self.high - self.committed.unwrap_or(self.low).max(self.low)).max(0)
    }
}

/// How long the evaluator looks back, and when "stuck" becomes "stopped".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    pub window: Duration,
    pub stop_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub status: GroupStatus,
    pub reason: String,
    pub trend: Trend,
}

/// Judges one partition from its samples in the window (oldest first; the
/// last is now) and how long ago its committed offset last moved.
pub fn evaluate_partition(partition: i32, window: &[Sample], since_moved: f64, rules: &Rules) -> Verdict {
    let Some(last) = window.last() else {
        return Verdict {
            status: GroupStatus::Unknown,
            reason: format!("partition {partition}: no samples yet"),
            trend: Trend::Flat,
        };
    };
    let first = window[0];
    let trend = match last.lag().cmp(&first.lag()) {
        std::cmp::Ordering::Greater => Trend::Growing,
        std::cmp::Ordering::Less => Trend::Shrinking,
        std::cmp::Ordering::Equal => Trend::Flat,
    };
    let verdict =
        |status, reason: String| Verdict { status, reason: format!("partition {partition}: {reason}"), trend };
    let lag = last.lag();
    if last.committed.is_none() {
        return verdict(GroupStatus::Empty, format!("no committed offset ({lag} records in the log)"));
    }
    if window.iter().any(|s| s.committed.is_some() && s.lag() == 0) {
        let reason = if lag == 0 {
            "caught up".to_owned()
        } else {
            format!("{lag} records waiting; caught up within the last {} s", secs(rules.window.as_secs_f64()))
        };
        return verdict(GroupStatus::Ok, reason);
    }
    if since_moved >= rules.stop_after.as_secs_f64() {
        return verdict(
            GroupStatus::Stopped,
            format!("no commit for {} s while {lag} records wait", secs(since_moved)),
        );
    }
    // `since_moved` counts from the first sample the monitor took, so it never
    // claims more than it saw; samples lost to a failed probe do not matter.
    if since_moved >= rules.window.as_secs_f64() {
        return verdict(
            GroupStatus::Stalled,
            format!("committed offset unchanged for {} s while {lag} records wait", secs(since_moved)),
        );
    }
    let span = last.at - first.at;
    // Burrow's WARN: lag never went down from one sample to the next, and grew.
    let never_decreased = window.windows(2).all(|w| w[1].lag() >= w[0].lag());
    if span + 0.5 >= rules.window.as_secs_f64() && never_decreased && last.lag() > first.lag() {
        return verdict(
            GroupStatus::Lagging,
            format!("lag went from {} to {lag} records over {} s while commits moved", first.lag(), secs(span)),
        );
    }
    verdict(GroupStatus::Ok, format!("{lag} records waiting, {}", trend_words(trend)))
}

/// The group's status: EMPTY when no partition has a commit; STOPPED when
/// every partition that has records waiting is stopped (nobody commits at
/// all); otherwise the worst partition's status and reason.
pub fn evaluate_group(partitions: &[Verdict]) -> (GroupStatus, String) {
    if partitions.is_empty() {
        return (GroupStatus::Unknown, "the topic has no partitions".into());
    }
    if partitions.iter().all(|p| p.status == GroupStatus::Empty) {
        return (GroupStatus::Empty, "the group has no committed offset".into());
    }
    let waiting: Vec<&Verdict> =
        partitions.iter().filter(|p| !matches!(p.status, GroupStatus::Ok | GroupStatus::Empty)).collect();
    if !waiting.is_empty() && waiting.iter().all(|p| p.status == GroupStatus::Stopped) {
        let reasons: Vec<&str> = waiting.iter().map(|p| p.reason.as_str()).collect();
        return (GroupStatus::Stopped, format!("no member is committing: {}", reasons.join("; ")));
    }
    let worst = partitions.iter().max_by_key(|p| severity(p.status)).unwrap_or(&partitions[0]);
    if worst.status == GroupStatus::Ok {
        return (GroupStatus::Ok, "every partition is caught up or catching up".into());
    }
    (worst.status, worst.reason.clone())
}

fn severity(status: GroupStatus) -> u8 {
    match status {
        GroupStatus::Ok | GroupStatus::Unspecified => 0,
        GroupStatus::Empty => 1,
        GroupStatus::Lagging => 2,
        GroupStatus::Unknown => 3,
        GroupStatus::Stalled => 4,
        GroupStatus::Stopped => 5,
    }
}

/// The trend of a whole series of totals (oldest first).
pub fn trend(first: i64, last: i64) -> Trend {
    match last.cmp(&first) {
        std::cmp::Ordering::Greater => Trend::Growing,
        std::cmp::Ordering::Less => Trend::Shrinking,
        std::cmp::Ordering::Equal => Trend::Flat,
    }
}

fn trend_words(trend: Trend) -> &'static str {
    match trend {
        Trend::Growing => "growing",
        Trend::Shrinking => "shrinking",
        _ => "flat",
    }
}

fn secs(s: f64) -> String {
    format!("{:.0}", s.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules { window: Duration::from_secs(10), stop_after: Duration::from_secs(30) };

    /// Samples one second apart from t = 0: (committed, high).
    fn series(points: &[(Option<i64>, i64)]) -> Vec<Sample> {
        points.iter().enumerate().map(|(i, (c, h))| Sample { at: i as f64, committed: *c, low: 0, high: *h }).collect()
    }

    fn moving(lags: &[i64]) -> Vec<Sample> {
        // Offsets advance by 10 each second; the high watermark sets the lag.
        series(&lags.iter().enumerate().map(|(i, lag)| (Some(10 * i as i64), 10 * i as i64 + lag)).collect::<Vec<_>>())
    }

    fn stuck(at: i64, highs: &[i64]) -> Vec<Sample> {
        series(&highs.iter().map(|h| (Some(at), *h)).collect::<Vec<_>>())
    }

    #[test]
    fn partition_rules_table() {
        let eleven = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
        let rows: Vec<(&str, Vec<Sample>, f64, GroupStatus, &str)> = vec![
            ("lag 0 now", moving(&[3, 2, 0]), 0.0, GroupStatus::Ok, "caught up"),
            (
                "lag 0 once in the window",
                moving(&[0, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15]),
                1.0,
                GroupStatus::Ok,
                "caught up within",
            ),
            (
                "no commit at all",
                series(&[(None, 7), (None, 9)]),
                0.0,
                GroupStatus::Empty,
                "no committed offset (9 records",
            ),
            (
                "offset stuck with lag, window full",
                stuck(100, &[150; 11]),
                12.0,
                GroupStatus::Stalled,
                "committed offset unchanged for 12 s while 50 records wait",
            ),
            (
                "offset stuck past stop_after",
                stuck(100, &[220; 11]),
                45.0,
                GroupStatus::Stopped,
                "no commit for 45 s while 120 records wait",
            ),
            (
                "stuck, samples lost to failed probes",
                stuck(100, &[150, 150]),
                11.0,
                GroupStatus::Stalled,
                "unchanged for 11 s",
            ),
            ("stuck but window not full yet", stuck(100, &[150, 150, 150]), 2.0, GroupStatus::Ok, "50 records waiting"),
            (
                "commits move, lag grows",
                moving(&eleven),
                0.0,
                GroupStatus::Lagging,
                "lag went from 5 to 15 records over 10 s",
            ),
            ("commits move, lag flat", moving(&[9; 11]), 0.0, GroupStatus::Ok, "9 records waiting, flat"),
            (
                "commits move, lag saw-tooths upwards",
                moving(&[5, 8, 6, 9, 7, 10, 8, 11, 9, 12, 10]),
                0.0,
                GroupStatus::Ok,
                "growing",
            ),
            (
                "commits move, lag shrinks",
                moving(&[15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5]),
                0.0,
                GroupStatus::Ok,
                "5 records waiting, shrinking",
            ),
        ];
        for (name, window, since_moved, status, reason) in rows {
            let v = evaluate_partition(2, &window, since_moved, &RULES);
            assert_eq!(v.status, status, "{name}: {v:?}");
            assert!(v.reason.starts_with("partition 2: "), "{name}: {}", v.reason);
            assert!(v.reason.contains(reason), "{name}: {:?} does not contain {reason:?}", v.reason);
        }
    }

    #[test]
    fn trend_follows_first_and_last_lag_of_the_window() {
        assert_eq!(evaluate_partition(0, &moving(&[1, 5]), 0.0, &RULES).trend, Trend::Growing);
        assert_eq!(evaluate_partition(0, &moving(&[5, 1]), 0.0, &RULES).trend, Trend::Shrinking);
        assert_eq!(evaluate_partition(0, &moving(&[0, 0]), 0.0, &RULES).trend, Trend::Flat);
    }

    #[test]
    fn lag_never_negative_and_counts_from_the_log_start_without_a_commit() {
        assert_eq!(Sample { at: 0.0, committed: Some(12), low: 0, high: 10 }.lag(), 0);
        assert_eq!(Sample { at: 0.0, committed: None, low: 4, high: 10 }.lag(), 6);
        assert_eq!(Sample { at: 0.0, committed: Some(1), low: 4, high: 10 }.lag(), 6);
    }

    fn verdict(status: GroupStatus, reason: &str) -> Verdict {
        Verdict { status, reason: reason.into(), trend: Trend::Flat }
    }

    #[test]
    fn group_rules_table() {
        let ok = verdict(GroupStatus::Ok, "p0 ok");
        let empty = verdict(GroupStatus::Empty, "p1 empty");
        let stalled = verdict(GroupStatus::Stalled, "p1 stalled");
        let stopped = verdict(GroupStatus::Stopped, "p2 stopped");
        let lagging = verdict(GroupStatus::Lagging, "p0 lagging");
        let rows: Vec<(&str, Vec<Verdict>, GroupStatus, &str)> = vec![
            ("no partitions", vec![], GroupStatus::Unknown, "no partitions"),
            ("all ok", vec![ok.clone(), ok.clone()], GroupStatus::Ok, "caught up"),
            ("no commits anywhere", vec![empty.clone(), empty.clone()], GroupStatus::Empty, "no committed offset"),
            ("one empty partition among ok ones", vec![ok.clone(), empty.clone()], GroupStatus::Empty, "p1 empty"),
            (
                "every waiting partition stopped",
                vec![ok.clone(), stopped.clone(), stopped.clone()],
                GroupStatus::Stopped,
                "no member is committing",
            ),
            ("worst wins", vec![lagging.clone(), stalled.clone(), ok.clone()], GroupStatus::Stalled, "p1 stalled"),
            ("stopped and lagging", vec![lagging, stopped], GroupStatus::Stopped, "p2 stopped"),
        ];
        for (name, partitions, status, reason) in rows {
            let (s, r) = evaluate_group(&partitions);
            assert_eq!(s, status, "{name}: {r}");
            assert!(r.contains(reason), "{name}: {r:?} does not contain {reason:?}");
        }
    }
}
