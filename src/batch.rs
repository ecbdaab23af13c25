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
use tokio::sync::{Semaphore, mpsc, oneshot};

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

type Job<T, R> = (T, oneshot::Sender<R>);

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
    /// Starts a dispatcher that runs `run` on each batch. `run` must answer
    /// every item, in order: the i-th result goes to the i-th item. An item
    /// it leaves unanswered gets [`Dropped`].
    pub fn spawn<F, Fut>(name: &'static str, limits: BatchLimits, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        Self::spawn_counted(name, limits, Gauge::default(), run)
    }

    /// Like [`Batcher::spawn`], keeping the number of queued items in `depth`
    /// (batchers given the same gauge add up in it).
    pub fn spawn_counted<F, Fut>(name: &'static str, limits: BatchLimits, depth: Gauge, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        // Zero would mean a batch that never forms; the command line refuses it already.
        let (max_batch, in_flight) = (limits.max_batch.max(1), limits.in_flight.max(1));
        // Bounded: when the database falls behind, callers wait here instead
        // of growing an unbounded queue.
        let (queue, jobs) = mpsc::channel(max_batch * in_flight * 2);
        tokio::spawn(dispatch(jobs, max_batch, in_flight, depth.clone(), Arc::new(run)));
        Batcher { name, queue, depth }
    }

    /// Submits one item and waits for its result.
    pub async fn call(&self, item: T) -> Result<R, Dropped> {
        let (reply, answer) = oneshot::channel();
        let queued = Queued::enter(&self.depth);
        self.queue.send((item, reply)).await.map_err(|_| Dropped(self.name))?;
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
    mut jobs: mpsc::Receiver<Job<T, R>>,
    max_batch: usize,
    in_flight: usize,
    depth: Gauge,
    run: Arc<F>,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
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
        tokio::spawn(async move {
            let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = batch.into_iter().unzip();
            let results = run(items).await;
            drop(slot);
            // A caller that gave up has dropped its receiver; nothing to do.
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// The batch sizes seen so far (a panicking test thread poisons nothing we care about).
    fn sizes(seen: &Mutex<Vec<usize>>) -> MutexGuard<'_, Vec<usize>> {
        seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[tokio::test]
    async fn a_lone_request_is_sent_at_once_and_answered() -> TestResult {
        let batcher =
            Batcher::spawn("test", BatchLimits { max_batch: 8, in_flight: 1 }, |items: Vec<u32>| async move {
                items.into_iter().map(|i| i * 2).collect::<Vec<_>>()
            });
        assert_eq!(batcher.call(21).await?, 42);
        Ok(())
    }

    #[tokio::test]
    async fn requests_queued_behind_a_busy_slot_go_out_together_and_each_gets_its_own_answer() -> TestResult {
        let batch_sizes = Arc::new(Mutex::new(Vec::new()));
        let (release, gate) = tokio::sync::watch::channel(false);
        let seen = batch_sizes.clone();
        let batcher = Batcher::spawn("test", BatchLimits { max_batch: 100, in_flight: 1 }, move |items: Vec<u32>| {
            sizes(&seen).push(items.len());
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                items.into_iter().map(|i| i + 1000).collect::<Vec<_>>()
            }
        });
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(0).await }
        });
        // Until the first batch is at the "database", the others must queue.
        while sizes(&batch_sizes).is_empty() {
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = (1..=10)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        while batcher.queue.capacity() > batcher.queue.max_capacity() - 10 {
            tokio::task::yield_now().await;
        }
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
        let batcher = Batcher::spawn_counted("test", limits, depth.clone(), move |items: Vec<u32>| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                items
            }
        });
        let call = |i| {
            let b = batcher.clone();
            tokio::spawn(async move { b.call(i).await })
        };
        let mut calls = vec![call(0)];
        // The first item is at the (blocked) database: the next four must wait in the queue.
        while !started.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        calls.extend((1..5).map(call));
        while depth.get() != 4 {
            tokio::task::yield_now().await;
        }
        release.send(true)?;
        for call in calls {
            call.await??;
        }
        assert_eq!(depth.get(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn an_item_the_batch_leaves_unanswered_gets_an_error_not_a_hang() {
        let batcher = Batcher::spawn("test", BatchLimits { max_batch: 8, in_flight: 1 }, |_: Vec<u32>| async move {
            Vec::<u32>::new()
        });
        assert!(batcher.call(1).await.is_err());
    }
}
