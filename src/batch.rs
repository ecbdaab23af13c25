//! Natural batching: requests that arrive while earlier ones are with the
//! database are sent to it together, as one statement.
//!
//! Why: on a busy server most of a short query's cost is per statement
//! (a round trip, parse/bind/execute, a commit and its WAL flush), not per
//! row. A dispatcher holds at most `in_flight` batches at the database; each
//! time one comes back it takes *everything* that queued meanwhile (up to
//! `max_batch`). An idle server therefore sends every request alone, at once,
//! with no timer and no added latency, and a loaded one sends fewer, larger
//! statements exactly when that pays.
//!
//! Consistency: a request only ever joins a batch that starts after it
//! arrived, so what it reads is at least as new as the database was when the
//! request came in (read-your-writes holds), and what it writes commits or
//! fails on its own terms (the batch function decides per item).

use std::{future::Future, sync::Arc};

use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};
use tokio_util::task::TaskTracker;

/// How much a dispatcher may batch and how many batches it keeps at the database.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Items in one batch at most.
    pub max_batch: usize,
    /// Batches being executed at the same time at most (each holds one
    /// pooled connection while it runs).
    pub in_flight: usize,
}

/// The dispatcher has stopped (the process is shutting down) or the batch
/// holding this item failed without answering it.
#[derive(thiserror::Error, Debug)]
#[error("the {0} batch was dropped before answering")]
pub struct Dropped(&'static str);

/// An item, its caller's deadline, and where its answer goes.
type Job<T, R> = (T, Option<Instant>, oneshot::Sender<R>);

/// A handle to submit items to one dispatcher; cheap to clone. The dispatcher
/// stops once every handle is gone and its batches have finished.
pub struct Batcher<T, R> {
    name: &'static str,
    queue: mpsc::Sender<Job<T, R>>,
    /// Items submitted and not yet taken into a batch (callers waiting for
    /// room in the queue included): one atomic add each way, no lock.
    depth: Gauge,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher { name: self.name, queue: self.queue.clone(), depth: self.depth.clone() }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts a dispatcher that runs `run` on each batch, with the latest
    /// deadline of its callers (None if any caller has none). `run` must
    /// answer every item, in order: the i-th result goes to the i-th item
    /// (debug builds check the count). An item it leaves unanswered gets
    /// [`Dropped`]. The dispatcher and its batches run on `tasks`, the role's
    /// tracker, so a role waits for them when it stops.
    pub fn spawn<F, Fut>(name: &'static str, limits: BatchLimits, tasks: &TaskTracker, run: F) -> Self
    where
        F: Fn(Vec<T>, Option<Instant>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        Self::spawn_counted(name, limits, tasks, Gauge::default(), run)
    }

    /// Like [`Batcher::spawn`], keeping the number of queued items in `depth`
    /// (batchers given the same gauge add up in it).
    pub fn spawn_counted<F, Fut>(
        name: &'static str,
        limits: BatchLimits,
        tasks: &TaskTracker,
        depth: Gauge,
        run: F,
    ) -> Self
    where
        F: Fn(Vec<T>, Option<Instant>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        // Zero would mean a batch that never forms; the command line refuses it already.
        let (max_batch, in_flight) = (limits.max_batch.max(1), limits.in_flight.max(1));
        // Bounded: when the database falls behind, callers wait here instead
        // of growing an unbounded queue.
        let (queue, jobs) = mpsc::channel(max_batch * in_flight * 2);
        tasks.spawn(dispatch(name, jobs, max_batch, in_flight, depth.clone(), Arc::new(run), tasks.clone()));
        Batcher { name, queue, depth }
    }

    /// Submits one item and waits for its result; `deadline` is when its
    /// caller stops waiting.
    pub async fn call(&self, item: T, deadline: Option<Instant>) -> Result<R, Dropped> {
        let (reply, answer) = oneshot::channel();
        let queued = Queued::enter(&self.depth);
        self.queue.send((item, deadline, reply)).await.map_err(|_| Dropped(self.name))?;
        // In the queue now: the dispatcher takes it off the gauge.
        queued.handed_over();
        answer.await.map_err(|_| Dropped(self.name))
    }
}

/// One item on the depth gauge until the queue has it; a caller that gives
/// up while waiting for room, or a send that fails, takes itself off again.
struct Queued<'a>(Option<&'a Gauge>);

impl<'a> Queued<'a> {
    fn enter(depth: &'a Gauge) -> Self {
        depth.inc();
        Queued(Some(depth))
    }

    fn handed_over(mut self) {
        self.0 = None;
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(depth) = self.0 {
            depth.dec();
        }
    }
}

async fn dispatch<T, R, F, Fut>(
    name: &'static str,
    mut jobs: mpsc::Receiver<Job<T, R>>,
    max_batch: usize,
    in_flight: usize,
    depth: Gauge,
    run: Arc<F>,
    tasks: TaskTracker,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>, Option<Instant>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<R>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        // A free slot first, then whatever queued while we waited for it:
        // that order is what makes batches grow with the load.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = Vec::new();
        if jobs.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        depth.dec_by(batch.len() as i64);
        let run = run.clone();
        tasks.spawn(async move {
            // The batch may run as long as its most patient caller waits.
            let deadline = batch
                .iter()
                .try_fold(None, |latest: Option<Instant>, (_, deadline, _)| {
                    let deadline = (*deadline)?;
                    Some(Some(latest.map_or(deadline, |latest| latest.max(deadline))))
                })
                .flatten();
            let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) =
                batch.into_iter().map(|(item, _, reply)| (item, reply)).unzip();
            let results = run(items, deadline).await;
            drop(slot);
            answer(name, replies, results);
        });
    }
}

/// Gives the i-th result to the i-th caller. A batch function that returns
/// fewer or more results than items is a bug: debug builds stop on it, and
/// release builds log it (the callers left over get [`Dropped`]).
fn answer<R>(name: &'static str, replies: Vec<oneshot::Sender<R>>, results: Vec<R>) {
    if results.len() != replies.len() {
        tracing::error!(batch = name, items = replies.len(), results = results.len(), "batch answered a wrong count");
        debug_assert_eq!(results.len(), replies.len(), "the {name} batch must answer every item exactly once");
    }
    // A caller that gave up has dropped its receiver; nothing to do.
    for (reply, result) in replies.into_iter().zip(results) {
        let _ = reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Mutex, MutexGuard, PoisonError},
        time::Duration,
    };

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// The batch sizes seen so far (a panicking test thread poisons nothing we care about).
    fn sizes(seen: &Mutex<Vec<usize>>) -> MutexGuard<'_, Vec<usize>> {
        seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spins (yielding) until `done`, failing the test after 10 s instead of hanging CI.
    async fn spin_until(what: &str, mut done: impl FnMut() -> bool) {
        let spin = async {
            while !done() {
                tokio::task::yield_now().await;
            }
        };
        assert!(tokio::time::timeout(Duration::from_secs(10), spin).await.is_ok(), "timed out waiting until {what}");
    }

    #[tokio::test]
    async fn a_lone_request_is_sent_at_once_and_answered() -> TestResult {
        let tasks = TaskTracker::new();
        let batcher = Batcher::spawn(
            "test",
            BatchLimits { max_batch: 8, in_flight: 1 },
            &tasks,
            |items: Vec<u32>, _| async move { items.into_iter().map(|i| i * 2).collect::<Vec<_>>() },
        );
        assert_eq!(batcher.call(21, None).await?, 42);
        Ok(())
    }

    #[tokio::test]
    async fn requests_queued_behind_a_busy_slot_go_out_together_and_each_gets_its_own_answer() -> TestResult {
        let batch_sizes = Arc::new(Mutex::new(Vec::new()));
        let (release, gate) = tokio::sync::watch::channel(false);
        let seen = batch_sizes.clone();
        let tasks = TaskTracker::new();
        let limits = BatchLimits { max_batch: 100, in_flight: 1 };
        let batcher = Batcher::spawn("test", limits, &tasks, move |items: Vec<u32>, _| {
            sizes(&seen).push(items.len());
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                items.into_iter().map(|i| i + 1000).collect::<Vec<_>>()
            }
        });
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(0, None).await }
        });
        // Until the first batch is at the "database", the others must queue.
        spin_until("the first batch runs", || !sizes(&batch_sizes).is_empty()).await;
        let rest: Vec<_> = (1..=10)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(i, None).await })
            })
            .collect();
        spin_until("ten calls queue", || batcher.queue.capacity() <= batcher.queue.max_capacity() - 10).await;
        release.send(true)?;
        assert_eq!(first.await??, 1000);
        for (i, task) in rest.into_iter().enumerate() {
            assert_eq!(task.await??, 1001 + i as u32);
        }
        assert_eq!(*sizes(&batch_sizes), vec![1, 10]);
        Ok(())
    }

    #[tokio::test]
    async fn the_depth_gauge_counts_items_waiting_for_a_batch_and_returns_to_zero() -> TestResult {
        let depth = Gauge::default();
        let (release, gate) = tokio::sync::watch::channel(false);
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = started.clone();
        let limits = BatchLimits { max_batch: 100, in_flight: 1 };
        let tasks = TaskTracker::new();
        let batcher = Batcher::spawn_counted("test", limits, &tasks, depth.clone(), move |items: Vec<u32>, _| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                items
            }
        });
        let call = |i| {
            let b = batcher.clone();
            tokio::spawn(async move { b.call(i, None).await })
        };
        let mut calls = vec![call(0)];
        // The first item is at the (blocked) database: the next four must wait in the queue.
        spin_until("the first batch runs", || started.load(std::sync::atomic::Ordering::SeqCst)).await;
        calls.extend((1..5).map(call));
        spin_until("four items queue", || depth.get() == 4).await;
        release.send(true)?;
        for call in calls {
            call.await??;
        }
        assert_eq!(depth.get(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn an_item_the_batch_leaves_unanswered_gets_an_error_not_a_hang() {
        let tasks = TaskTracker::new();
        let limits = BatchLimits { max_batch: 8, in_flight: 1 };
        // Release builds only log a wrong count; debug builds panic in the
        // batch task, which drops the reply: either way the caller hears.
        let batcher = Batcher::spawn("test", limits, &tasks, |_: Vec<u32>, _| async move { Vec::<u32>::new() });
        let answer = tokio::time::timeout(Duration::from_secs(10), batcher.call(1, None)).await;
        assert!(matches!(answer, Ok(Err(_))), "the caller is told, promptly");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "must answer every item exactly once")]
    fn debug_builds_stop_on_a_batch_that_answers_a_wrong_count() {
        let (reply, _answer) = oneshot::channel::<u32>();
        answer("test", vec![reply], vec![1, 2]);
    }

    #[tokio::test]
    async fn the_dispatcher_and_its_batches_run_on_the_roles_task_tracker() -> TestResult {
        let tasks = TaskTracker::new();
        let (release, gate) = tokio::sync::watch::channel(false);
        let limits = BatchLimits { max_batch: 8, in_flight: 1 };
        let batcher = Batcher::spawn("test", limits, &tasks, move |items: Vec<u32>, _| {
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                items
            }
        });
        let call = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(7, None).await }
        });
        spin_until("the dispatcher and the batch are tracked", || tasks.len() == 2).await;
        drop(batcher);
        tasks.close();
        // The role waits for the batch in flight; it ends once answered.
        assert!(tokio::time::timeout(Duration::from_millis(100), tasks.wait()).await.is_err());
        release.send(true)?;
        tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await?;
        assert_eq!(call.await??, 7);
        Ok(())
    }

    #[tokio::test]
    async fn a_batch_runs_with_its_most_patient_callers_deadline_or_none() -> TestResult {
        let tasks = TaskTracker::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let limits = BatchLimits { max_batch: 8, in_flight: 1 };
        let batcher = Batcher::spawn("test", limits, &tasks, {
            let seen = seen.clone();
            move |items: Vec<u32>, deadline| {
                seen.lock().unwrap_or_else(PoisonError::into_inner).push(deadline);
                async move { items }
            }
        });
        let soon = Instant::now() + Duration::from_secs(5);
        batcher.call(1, Some(soon)).await?;
        batcher.call(2, None).await?;
        assert_eq!(*seen.lock().unwrap_or_else(PoisonError::into_inner), vec![Some(soon), None]);
        Ok(())
    }
}
