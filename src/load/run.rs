//! The engine: fires a scenario's calls on a schedule (open loop) or from N
//! workers (closed loop) and measures them without coordinated omission.
//!
//! Open loop, as wrk2 and k6's constant-arrival-rate do it: request i is due
//! at its planned time whatever happened to earlier ones. Its latency is
//! counted from that intended time, so a server stall shows in full in the
//! percentiles instead of being hidden by a sender that waited for it. The
//! in-flight cap (a semaphore) bounds memory; a request that finds no free
//! permit is counted as `dropped`, never silently delayed. Service time
//! (completion minus actual send) is kept beside it, so the two can be told
//! apart. Requests due during the warm-up are sent but not measured.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::{
    sync::{Semaphore, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::plan::Plan;

/// The highest value the histograms hold: one hour, in microseconds.
const HIGHEST_US: u64 = 3_600_000_000;

pub fn histogram() -> Histogram<u64> {
    // 3 significant digits over 1 µs..1 h: bounds that are valid by construction.
    Histogram::new_with_bounds(1, HIGHEST_US, 3).unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, HIGHEST_US)
}

/// What one call did: Ok, or the gRPC code it failed with.
pub type Outcome = Result<(), Code>;

/// Everything the measured part of a run observed.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Completion minus intended start (closed loop: minus actual start).
    pub latency: Histogram<u64>,
    /// Completion minus actual send.
    pub service: Histogram<u64>,
    pub ok: u64,
    /// By gRPC code name, e.g. "Unavailable".
    pub errors: BTreeMap<String, u64>,
    pub dropped: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { latency: histogram(), service: histogram(), ok: 0, errors: BTreeMap::new(), dropped: 0 }
    }
}

impl Tally {
    pub fn requests(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    fn record(&mut self, outcome: Outcome, latency: Duration, service: Duration) {
        // Saturated by `micros`, so recording cannot fail.
        let _ = self.latency.record(micros(latency));
        let _ = self.service.record(micros(service));
        match outcome {
            Ok(()) => self.ok += 1,
            Err(code) => *self.errors.entry(code_name(code)).or_default() += 1,
        }
    }

    /// Adds another tally (a stage of a multi-stage scenario).
    pub fn merge(&mut self, other: &Tally) {
        let _ = self.latency.add(&other.latency);
        let _ = self.service.add(&other.service);
        self.ok += other.ok;
        self.dropped += other.dropped;
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
    }
}

/// The name gRPC gives a status code, e.g. `DeadlineExceeded`.
pub fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// One progress event a second: the CLI's bar and the gRPC stream show these.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Progress {
    pub elapsed_s: f64,
    pub total_s: f64,
    /// Still in the warm-up, whose requests are not measured.
    pub warming_up: bool,
    /// Measured so far.
    pub requests: u64,
    pub errors: u64,
    pub dropped: u64,
    pub in_flight: u64,
    /// Completions in the last interval, per second.
    pub current_rps: f64,
    /// p99 of the calls completed in the last interval, from intended start.
    pub current_p99_ms: f64,
    /// The schedule's rate now; 0 in closed loop.
    pub target_rps: f64,
}

/// One shard of what the calls recorded: its tally and the current progress window.
struct Shard {
    tally: Tally,
    window: Histogram<u64>,
    window_done: u64,
}

impl Shard {
    fn new() -> Self {
        Shard { tally: Tally::default(), window: histogram(), window_done: 0 }
    }
}

/// Where the calls' results go while a run is under way.
///
/// Sharded: at ~10^5 calls a second from every core, one lock taken by every
/// completion is a point all cores queue on. Each call records into the
/// shard of its key (worker or request number); the once-a-second progress
/// tick and the final tally add the shards up.
#[derive(Clone)]
struct Recorder {
    shards: Arc<[Mutex<Shard>]>,
    measure_from: Instant,
}

/// Two shards per core, so two cores rarely want the same one, at most 16.
fn shard_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get() * 2).clamp(2, 16)
}

fn lock(shard: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    // A panic while holding the lock cannot leave the counters half-written
    // in a way that matters more than losing the run: take them as they are.
    shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Recorder {
    fn new(measure_from: Instant) -> Self {
        let shards: Vec<Mutex<Shard>> = (0..shard_count()).map(|_| Mutex::new(Shard::new())).collect();
        Recorder { shards: shards.into(), measure_from }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        lock(&self.shards[key as usize % self.shards.len()])
    }

    fn complete(&self, key: u64, intended: Instant, sent: Instant, done: Instant, outcome: Outcome) {
        if intended < self.measure_from {
            return;
        }
        let mut shard = self.shard(key);
        shard.tally.record(outcome, done - intended, done - sent);
        let _ = shard.window.record(micros(done - intended));
        shard.window_done += 1;
    }

    fn drop_one(&self, key: u64, intended: Instant) {
        if intended >= self.measure_from {
            self.shard(key).tally.dropped += 1;
        }
    }

    fn tick(&self, start: Instant, total: Duration, interval: Duration, in_flight: u64, target: f64) -> Progress {
        let mut window = histogram();
        let (mut requests, mut errors, mut dropped, mut done) = (0, 0, 0, 0);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            requests += shard.tally.requests();
            errors += shard.tally.failed();
            dropped += shard.tally.dropped;
            done += shard.window_done;
            let _ = window.add(&shard.window);
            shard.window.reset();
            shard.window_done = 0;
        }
        let now = Instant::now();
        Progress {
            elapsed_s: (now - start).as_secs_f64(),
            total_s: total.as_secs_f64(),
            warming_up: now < self.measure_from,
            requests,
            errors,
            dropped,
            in_flight,
            current_rps: done as f64 / interval.as_secs_f64(),
            current_p99_ms: if window.is_empty() { 0.0 } else { window.value_at_quantile(0.99) as f64 / 1000.0 },
            target_rps: target,
        }
    }

    fn finish(self) -> Tally {
        let mut tally = Tally::default();
        for shard in self.shards.iter() {
            tally.merge(&std::mem::take(&mut lock(shard).tally));
        }
        tally
    }
}

/// How a run is driven, whatever the scenario.
#[derive(Debug, Clone)]
pub struct Drive {
    pub warmup: Duration,
    pub duration: Duration,
    /// Deadline of one call; a late one fails with DEADLINE_EXCEEDED.
    pub timeout: Duration,
    /// Open loop: calls in flight at most; closed loop: ignored.
    pub max_in_flight: usize,
    pub progress_interval: Duration,
}

/// What a finished run measured.
#[derive(Debug, Clone)]
pub struct Measured {
    pub tally: Tally,
    /// The measured window's length (shorter when cancelled).
    pub measured: Duration,
    pub cancelled: bool,
}

/// Sends `on_progress` a snapshot every interval until `stop` fires.
fn spawn_ticker(
    recorder: Recorder,
    drive: &Drive,
    start: Instant,
    in_flight: impl Fn() -> u64 + Send + 'static,
    target: impl Fn(Duration) -> f64 + Send + 'static,
    progress: Option<mpsc::Sender<Progress>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let interval = drive.progress_interval;
    let total = drive.warmup + drive.duration;
    tokio::spawn(async move {
        let Some(progress) = progress else { return };
        let mut tick = tokio::time::interval_at(start + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let event = recorder.tick(start, total, interval, in_flight(), target(Instant::now() - start));
            // A slow reader misses a tick rather than slowing the engine.
            let _ = progress.try_send(event);
        }
    })
}

/// Calls `call(i)` at each time of `plan` (offsets from now), open loop.
pub async fn open_loop<F, Fut>(
    plan: Plan,
    drive: &Drive,
    rate_at: impl Fn(Duration) -> f64 + Send + 'static,
    call: F,
    progress: Option<mpsc::Sender<Progress>>,
    cancel: CancellationToken,
) -> Measured
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let measure_from = start + drive.warmup;
    let recorder = Recorder::new(measure_from);
    let permits = Arc::new(Semaphore::new(drive.max_in_flight));
    let stop_ticker = CancellationToken::new();
    let (max, sem) = (drive.max_in_flight, permits.clone());
    let ticker = spawn_ticker(
        recorder.clone(),
        drive,
        start,
        move || (max - sem.available_permits()) as u64,
        rate_at,
        progress,
        stop_ticker.clone(),
    );
    let timeout = drive.timeout;
    let mut cancelled = false;
    for (i, offset) in plan.enumerate() {
        let intended = start + offset;
        if intended > Instant::now() {
            tokio::select! {
                _ = cancel.cancelled() => { cancelled = true; break; }
                _ = tokio::time::sleep_until(intended) => {}
            }
        } else if cancel.is_cancelled() {
            cancelled = true;
            break;
        }
        let i = i as u64;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            recorder.drop_one(i, intended);
            continue;
        };
        let (call, recorder) = (call.clone(), recorder.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = match tokio::time::timeout(timeout, call(i)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Code::DeadlineExceeded),
            };
            recorder.complete(i, intended, sent, Instant::now(), outcome);
            drop(permit);
        });
    }
    let sent_until = Instant::now();
    // In-flight calls end within their deadline; a cancel cuts the wait short.
    let all = u32::try_from(drive.max_in_flight).unwrap_or(u32::MAX);
    tokio::select! {
        _ = permits.acquire_many(all) => {}
        _ = cancel.cancelled() => { cancelled = true; }
        _ = tokio::time::sleep(timeout + Duration::from_secs(1)) => {}
    }
    stop_ticker.cancel();
    let _ = ticker.await;
    let end = if cancelled { sent_until } else { start + drive.warmup + drive.duration };
    Measured { tally: recorder.finish(), measured: end.saturating_duration_since(measure_from), cancelled }
}

/// `concurrency` workers each call in a loop for the run's length: the
/// closed-loop mode, which measures capacity but, by design, hides stalls.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    drive: &Drive,
    call: F,
    progress: Option<mpsc::Sender<Progress>>,
    cancel: CancellationToken,
) -> Measured
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let measure_from = start + drive.warmup;
    let end = measure_from + drive.duration;
    let recorder = Recorder::new(measure_from);
    let stop_ticker = CancellationToken::new();
    let ticker = spawn_ticker(
        recorder.clone(),
        drive,
        start,
        move || concurrency as u64,
        |_| 0.0,
        progress,
        stop_ticker.clone(),
    );
    let timeout = drive.timeout;
    let workers_n = concurrency as u64;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..workers_n {
        let (call, recorder) = (call.clone(), recorder.clone());
        // Per call: one clock read and no shared state but the recorder's
        // shard. Request numbers interleave (worker, worker + N, …), so they
        // stay unique without a shared counter. A cancel aborts the workers
        // rather than each call watching the token, whose every check takes
        // the token's lock.
        workers.spawn(async move {
            let mut sent = Instant::now();
            let mut i = worker;
            while sent < end {
                let outcome =
                    tokio::time::timeout_at(sent + timeout, call(i)).await.unwrap_or(Err(Code::DeadlineExceeded));
                i += workers_n;
                let done = Instant::now();
                if done <= end {
                    recorder.complete(worker, sent, sent, done, outcome);
                }
                sent = done;
            }
        });
    }
    let drain = async |workers: &mut tokio::task::JoinSet<()>| while workers.join_next().await.is_some() {};
    let cancelled = tokio::select! {
        _ = drain(&mut workers) => false,
        _ = cancel.cancelled() => true,
    };
    if cancelled {
        workers.abort_all();
        drain(&mut workers).await;
    }
    stop_ticker.cancel();
    let _ = ticker.await;
    let finished = if cancelled { Instant::now().min(end) } else { end };
    Measured { tally: recorder.finish(), measured: finished.saturating_duration_since(measure_from), cancelled }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::plan::{Arrival, Shape};

    fn drive(warmup: f64, duration: f64, max_in_flight: usize) -> Drive {
        Drive {
            warmup: Duration::from_secs_f64(warmup),
            duration: Duration::from_secs_f64(duration),
            timeout: Duration::from_secs(5),
            max_in_flight,
            progress_interval: Duration::from_millis(100),
        }
    }

    fn plan(rate: f64, d: &Drive) -> Plan {
        Plan::new(&Shape::Constant { rate }, d.warmup, d.duration, Arrival::Constant, 0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_counts_from_the_intended_time() {
        // The "server" stalls between 1 s and 2 s: every call due then ends at 2 s.
        let d = drive(0.0, 3.0, 10_000);
        let origin = Instant::now();
        let call = move |_| async move {
            let now = Instant::now() - origin;
            if now >= Duration::from_secs(1) && now < Duration::from_secs(2) {
                tokio::time::sleep_until(origin + Duration::from_secs(2)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        };
        let m = open_loop(plan(100.0, &d), &d, |_| 100.0, call, None, CancellationToken::new()).await;
        assert_eq!(m.tally.requests(), 300);
        assert_eq!(m.tally.dropped, 0);
        // The first call due in the stall waited ~1 s: the maximum shows it.
        assert!(m.tally.latency.max() >= 990_000, "max {}", m.tally.latency.max());
        // A third of the calls were due in the stall, so p50 is still small and p90 is not.
        assert!(m.tally.latency.value_at_quantile(0.5) < 5_000);
        assert!(m.tally.latency.value_at_quantile(0.9) > 500_000);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_without_a_permit_are_dropped_not_delayed() {
        let d = drive(0.0, 1.0, 5);
        let call = |_| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        };
        let m = open_loop(plan(100.0, &d), &d, |_| 100.0, call, None, CancellationToken::new()).await;
        assert_eq!(m.tally.requests() + m.tally.dropped, 100);
        assert_eq!(m.tally.dropped, 95);
        // The 5 that went out hit the 5 s deadline.
        assert_eq!(m.tally.errors.get("DeadlineExceeded"), Some(&5));
    }

    #[tokio::test(start_paused = true)]
    async fn warmup_requests_are_sent_but_not_measured() {
        let d = drive(1.0, 2.0, 100);
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        let call = move |_| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { Err(Code::Unavailable) }
        };
        let m = open_loop(plan(50.0, &d), &d, |_| 50.0, call, None, CancellationToken::new()).await;
        assert_eq!(sent.load(std::sync::atomic::Ordering::Relaxed), 150);
        assert_eq!(m.tally.requests(), 100);
        assert_eq!(m.tally.errors.get("Unavailable"), Some(&100));
        assert_eq!(m.measured, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn progress_arrives_every_interval() {
        let d = drive(0.0, 1.0, 100);
        let (tx, mut rx) = mpsc::channel(100);
        let call = |_| async { Ok(()) };
        open_loop(plan(100.0, &d), &d, |_| 100.0, call, Some(tx), CancellationToken::new()).await;
        let mut events = Vec::new();
        while let Ok(event) = rx.try_recv() {
            events.push(event);
        }
        assert!((9..=11).contains(&events.len()), "{} events", events.len());
        assert!(events.iter().all(|e| e.target_rps == 100.0));
        assert!(events.last().is_some_and(|e| e.requests >= 90));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_the_schedule_at_once() {
        let d = drive(0.0, 60.0, 100);
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            trigger.cancel();
        });
        let began = Instant::now();
        let m = open_loop(plan(10.0, &d), &d, |_| 10.0, |_| async { Ok(()) }, None, cancel).await;
        assert!(m.cancelled);
        assert!(Instant::now() - began < Duration::from_secs(3));
        assert!((19..=21).contains(&m.tally.requests()), "{}", m.tally.requests());
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_keeps_n_calls_in_flight() {
        let d = drive(0.0, 1.0, 0);
        let call = |_| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(())
        };
        let m = closed_loop(4, &d, call, None, CancellationToken::new()).await;
        // 4 workers × 100 calls of 10 ms in 1 s.
        assert!((396..=400).contains(&m.tally.requests()), "{}", m.tally.requests());
        assert_eq!(m.tally.dropped, 0);
    }
}
