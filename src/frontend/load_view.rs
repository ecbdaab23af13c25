//! The load panel's two translations: the page's form into a
//! `RunLoadTestRequest`, and the monitor's progress and report into the
//! `load` frames every page draws. Kept apart from the HTTP handlers so both
//! are plain functions with plain tests.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::pb;

/// Longest accepted text field: names and gates are short; anything longer is a mistake.
const MAX_FIELD: usize = 64;
/// At most this many threshold gates per run.
const MAX_THRESHOLDS: usize = 16;

/// What the page's load panel sends.
#[derive(Deserialize, Debug, Default)]
pub struct LoadForm {
    pub scenario: String,
    #[serde(default)]
    pub rate: Option<f64>,
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// e.g. "10s".
    pub duration: String,
    /// constant (default), ramp, step or spike: shapes derived from the rate
    /// and duration (see [`request_of`]).
    #[serde(default)]
    pub profile: Option<String>,
    /// Gates such as `p99<50ms`, `errors<1%`, judged in the final report.
    #[serde(default)]
    pub thresholds: Vec<String>,
    /// The admin token, when the monitor requires one.
    #[serde(default)]
    pub token: Option<String>,
}

/// What the panel asked for, to label progress frames (which carry only figures).
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub scenario: String,
    pub mode: &'static str,
}

/// The form as a `RunLoadTestRequest`. Checks what only the form can get
/// wrong (a missing rate, an unreadable duration, a profile without a rate);
/// scenario names, thresholds and limits are the monitor's to judge, so its
/// message reaches the page unchanged.
///
/// A form has one number, so the profiles are fixed shapes scaled by it:
/// ramp from a tenth of the rate to the rate over the whole run; step in
/// five equal steps up to the rate; spike from a quarter of the rate to the
/// rate for the middle fifth of the run.
pub fn request_of(form: &LoadForm) -> Result<(pb::RunLoadTestRequest, RunInfo), String> {
    let scenario = form.scenario.trim();
    if scenario.is_empty() {
        return Err("scenario is required".into());
    }
    if scenario.len() > MAX_FIELD {
        return Err(format!("scenario is longer than {MAX_FIELD} characters"));
    }
    let duration = humantime::parse_duration(form.duration.trim())
        .map_err(|e| format!("duration {:?} is not a duration such as 10s: {e}", form.duration))?;
    if duration.is_zero() {
        return Err("duration must be more than 0 s".into());
    }
    if form.thresholds.len() > MAX_THRESHOLDS || form.thresholds.iter().any(|t| t.len() > MAX_FIELD) {
        return Err(format!("at most {MAX_THRESHOLDS} thresholds of up to {MAX_FIELD} characters"));
    }
    let mut request = pb::RunLoadTestRequest {
        scenario: scenario.to_owned(),
        duration_seconds: duration.as_secs_f64(),
        thresholds: form.thresholds.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect(),
        ..Default::default()
    };
    let profile = form.profile.as_deref().map(str::trim).filter(|p| !p.is_empty()).unwrap_or("constant");
    let mode = match (form.rate, form.concurrency) {
        (Some(_), Some(_)) => return Err("give a rate or a concurrency, not both".into()),
        (None, None) => return Err("give a rate (requests per second) or a concurrency (workers)".into()),
        (None, Some(workers)) => {
            if workers == 0 {
                return Err("concurrency must be at least 1 worker".into());
            }
            if profile != "constant" {
                return Err(format!("the {profile} profile shapes a rate; a concurrency has none"));
            }
            request.concurrency = workers;
            "closed"
        }
        (Some(rate), None) => {
            if !(rate.is_finite() && rate > 0.0) {
                return Err("rate must be a number of requests per second above 0".into());
            }
            shape(&mut request, profile, rate, duration)?
        }
    };
    Ok((request, RunInfo { scenario: scenario.to_owned(), mode }))
}

/// Sets the rate or a profile in the CLI's syntax; returns the report's mode name.
fn shape(
    request: &mut pb::RunLoadTestRequest,
    profile: &str,
    rate: f64,
    run: Duration,
) -> Result<&'static str, String> {
    let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
    match profile {
        "constant" => {
            request.rate = rate;
            return Ok("open");
        }
        "ramp" => request.ramp = format!("{}:{rate}/{}", (rate / 10.0).max(1.0), ms(run)),
        "step" => request.step = format!("{}:{}/{}", rate / 5.0, rate / 5.0, ms(run / 5)),
        "spike" => request.spike = format!("{}:{rate}/{}@{}", rate / 4.0, ms(run / 5), ms(run * 2 / 5)),
        other => return Err(format!("profile {other:?} is not constant, ramp, step or spike")),
    }
    Ok("stages")
}

/// A frame while the run is under way.
pub fn progress_frame(info: Option<&RunInfo>, p: &pb::LoadProgress) -> Value {
    json!({
        "state": "running",
        "scenario": info.map(|i| i.scenario.as_str()),
        "mode": info.map(|i| i.mode),
        "elapsed_s": p.elapsed_seconds, "duration_s": p.total_seconds, "warming_up": p.warming_up,
        "target_rps": p.target_rps, "achieved_rps": p.current_rps, "p99_ms": p.current_p99_ms,
        "requests": p.requests, "ok": p.requests.saturating_sub(p.errors), "errors": p.errors,
        "dropped": p.dropped, "in_flight": p.in_flight,
        "report": Value::Null, "error": Value::Null,
    })
}

/// The frame just after the monitor accepted the run, before its first progress.
pub fn started_frame(info: &RunInfo, request: &pb::RunLoadTestRequest) -> Value {
    let progress =
        pb::LoadProgress { total_seconds: request.duration_seconds, target_rps: request.rate, ..Default::default() };
    progress_frame(Some(info), &progress)
}

/// Why the run ended: cancelled, failed before measuring, or judged by its thresholds.
fn final_state(r: &pb::LoadReport) -> &'static str {
    if r.cancelled {
        "cancelled"
    } else if !r.error.is_empty() {
        "error"
    } else if r.thresholds.is_empty() {
        "done"
    } else if r.passed {
        "passed"
    } else {
        "failed"
    }
}

fn latency(l: Option<&pb::LatencySummary>) -> Value {
    let Some(l) = l else { return Value::Null };
    json!({
        "count": l.count, "min": l.min_ms, "mean": l.mean_ms, "p50": l.p50_ms, "p90": l.p90_ms,
        "p99": l.p99_ms, "p999": l.p999_ms, "max": l.max_ms,
    })
}

/// The last frame of a run: its figures, and the whole report with the
/// threshold verdicts. `last` is the latest progress, for the elapsed time;
/// `info` names the run when the report cannot (it failed before measuring).
pub fn report_frame(r: &pb::LoadReport, last: Option<&pb::LoadProgress>, info: Option<&RunInfo>) -> Value {
    let or_asked = |own: &str, asked: Option<&str>| -> Value {
        if own.is_empty() { asked.map_or(Value::Null, |a| json!(a)) } else { json!(own) }
    };
    let errors: u64 = r.errors.values().sum();
    let error = (!r.error.is_empty()).then_some(r.error.as_str());
    let mut errors_by_code: Vec<(&String, &u64)> = r.errors.iter().collect();
    errors_by_code.sort();
    let report = json!({
        "scenario": r.scenario, "mode": r.mode, "profile": r.profile, "started_at": r.started_at,
        "target_rps": r.target_rps, "achieved_rps": r.achieved_rps,
        "requests": r.requests, "ok": r.ok, "dropped": r.dropped,
        "errors": errors_by_code.into_iter().map(|(code, n)| (code.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "latency_ms": latency(r.latency.as_ref()), "service_time_ms": latency(r.service_time.as_ref()),
        "cancelled": r.cancelled, "passed": r.passed,
        "thresholds": r.thresholds.iter().map(|t| json!({
            "threshold": t.threshold, "actual": t.actual, "passed": t.passed,
        })).collect::<Vec<_>>(),
        "event_lag_p99_ms": r.event_lag_p99_ms, "event_lag_mean_ms": r.event_lag_mean_ms,
        "max_consumer_lag_records": r.max_consumer_lag_records,
        "error": error, "text": r.text,
    });
    json!({
        "state": final_state(r),
        "scenario": or_asked(&r.scenario, info.map(|i| i.scenario.as_str())),
        "mode": or_asked(&r.mode, info.map(|i| i.mode)),
        "elapsed_s": last.map(|p| p.elapsed_seconds), "duration_s": last.map(|p| p.total_seconds),
        "warming_up": false,
        "target_rps": r.target_rps, "achieved_rps": r.achieved_rps,
        "p99_ms": r.latency.as_ref().map(|l| l.p99_ms),
        "requests": r.requests, "ok": r.ok, "errors": errors, "dropped": r.dropped, "in_flight": 0,
        "report": report, "error": error,
    })
}

/// The last frame when the frontend lost the run's stream before its report:
/// the figures seen last, and why (the run may still go on in the monitor).
pub fn lost_frame(last: &Value, reason: &str) -> Value {
    let mut frame = last.clone();
    frame["state"] = json!("lost");
    frame["error"] = json!(format!("{reason}; the test may still be running in the monitor"));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(rate: Option<f64>, concurrency: Option<u32>, profile: &str) -> LoadForm {
        LoadForm {
            scenario: "users".into(),
            rate,
            concurrency,
            duration: "10s".into(),
            profile: Some(profile.into()),
            thresholds: vec!["p99<50ms".into(), " ".into()],
            token: None,
        }
    }

    #[test]
    fn a_rate_is_an_open_loop_and_workers_a_closed_one() {
        let (request, info) = request_of(&form(Some(200.0), None, "constant")).expect("valid");
        assert_eq!((request.rate, request.concurrency, info.mode), (200.0, 0, "open"));
        assert_eq!(request.duration_seconds, 10.0);
        assert_eq!(request.thresholds, vec!["p99<50ms".to_owned()], "blank gates are dropped");
        let (request, info) = request_of(&form(None, Some(8), "constant")).expect("valid");
        assert_eq!((request.rate, request.concurrency, info.mode), (0.0, 8, "closed"));
    }

    #[test]
    fn profiles_become_the_cli_shapes_scaled_by_the_rate() {
        let (ramp, info) = request_of(&form(Some(200.0), None, "ramp")).expect("valid");
        assert_eq!((ramp.rate, ramp.ramp.as_str(), info.mode), (0.0, "20:200/10000ms", "stages"));
        let (step, _) = request_of(&form(Some(200.0), None, "step")).expect("valid");
        assert_eq!(step.step, "40:40/2000ms");
        let (spike, _) = request_of(&form(Some(200.0), None, "spike")).expect("valid");
        assert_eq!(spike.spike, "50:200/2000ms@4000ms");
        // The monitor parses them with the CLI's own parsers.
        assert!(crate::load::cli::parse_ramp(&ramp.ramp).is_ok());
        assert!(crate::load::cli::parse_step(&step.step).is_ok());
        assert!(crate::load::cli::parse_spike(&spike.spike).is_ok());
    }

    #[test]
    fn forms_the_monitor_could_not_read_are_refused_with_a_reason() {
        let refused = |f: LoadForm| request_of(&f).map(drop).expect_err("refused");
        assert!(refused(form(None, None, "constant")).contains("give a rate"));
        assert!(refused(form(Some(1.0), Some(1), "constant")).contains("not both"));
        assert!(refused(form(Some(f64::NAN), None, "constant")).contains("rate must be"));
        assert!(refused(form(Some(-5.0), None, "constant")).contains("rate must be"));
        assert!(refused(form(None, Some(0), "constant")).contains("at least 1"));
        assert!(refused(form(None, Some(4), "ramp")).contains("concurrency has none"));
        assert!(refused(form(Some(5.0), None, "wave")).contains("not constant, ramp"));
        assert!(
            refused(LoadForm { duration: "soon".into(), ..form(Some(5.0), None, "constant") }).contains("duration")
        );
        assert!(
            refused(LoadForm { duration: "0s".into(), ..form(Some(5.0), None, "constant") }).contains("more than 0")
        );
        assert!(refused(LoadForm { scenario: " ".into(), ..form(Some(5.0), None, "constant") }).contains("scenario"));
    }

    #[test]
    fn progress_frames_carry_target_and_achieved_rate_p99_errors_and_drops() {
        let info = RunInfo { scenario: "users".into(), mode: "open" };
        let p = pb::LoadProgress {
            elapsed_seconds: 3.0,
            total_seconds: 10.0,
            requests: 300,
            errors: 2,
            dropped: 1,
            current_rps: 98.5,
            current_p99_ms: 12.5,
            target_rps: 100.0,
            ..Default::default()
        };
        let frame = progress_frame(Some(&info), &p);
        assert_eq!(frame["state"], "running");
        assert_eq!(frame["scenario"], "users");
        assert_eq!((frame["target_rps"].as_f64(), frame["achieved_rps"].as_f64()), (Some(100.0), Some(98.5)));
        assert_eq!((frame["p99_ms"].as_f64(), frame["ok"].as_u64()), (Some(12.5), Some(298)));
        assert_eq!((frame["errors"].as_u64(), frame["dropped"].as_u64()), (Some(2), Some(1)));
        assert!(frame["report"].is_null());
        assert!(progress_frame(None, &p)["scenario"].is_null(), "a run started elsewhere has no known scenario");
    }

    #[test]
    fn the_report_frame_says_how_the_run_ended_and_lists_every_verdict() {
        let mut report = pb::LoadReport {
            scenario: "users".into(),
            mode: "open".into(),
            requests: 100,
            ok: 97,
            errors: [("Unavailable".to_owned(), 2), ("Internal".to_owned(), 1)].into(),
            latency: Some(pb::LatencySummary { p99_ms: 40.0, ..Default::default() }),
            thresholds: vec![
                pb::ThresholdVerdict { threshold: "p99<50ms".into(), actual: "40 ms".into(), passed: true },
                pb::ThresholdVerdict { threshold: "errors<1%".into(), actual: "3%".into(), passed: false },
            ],
            passed: false,
            ..Default::default()
        };
        let frame = report_frame(&report, None, None);
        assert_eq!(frame["state"], "failed");
        assert_eq!((frame["errors"].as_u64(), frame["p99_ms"].as_f64()), (Some(3), Some(40.0)));
        assert_eq!(frame["report"]["thresholds"][1]["threshold"], "errors<1%");
        assert_eq!(frame["report"]["thresholds"][1]["passed"], false);
        assert_eq!(frame["report"]["errors"]["Unavailable"], 2);
        report.passed = true;
        assert_eq!(report_frame(&report, None, None)["state"], "passed");
        report.thresholds.clear();
        assert_eq!(report_frame(&report, None, None)["state"], "done");
        report.cancelled = true;
        assert_eq!(report_frame(&report, None, None)["state"], "cancelled");
        let failed = pb::LoadReport { error: "no user service".into(), ..Default::default() };
        assert_eq!(report_frame(&failed, None, None)["state"], "error");
        assert_eq!(report_frame(&failed, None, None)["error"], "no user service");
        let asked = RunInfo { scenario: "orders".into(), mode: "closed" };
        assert_eq!(report_frame(&failed, None, Some(&asked))["scenario"], "orders", "named after what was asked");
    }
}
