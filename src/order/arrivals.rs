//! Per-user wake-ups for CreateOrder calls that wait for a user's first
//! event. A waiting call registers the user it waits for; whoever learns that
//! the user landed rings [`Arrivals::arrived`] for that user, and only the
//! calls waiting for that user wake up and look again.
//!
//! Two bells ring it:
//! - this process's replica, for each user it applied, right after the
//!   batch's transaction committed (so a woken call finds the row), with the
//!   apply's span, which the woken call links to;
//! - the sweep, for users applied by ANOTHER order process: the group splits
//!   the partitions between the members, so the event of the user a call
//!   waits for here may be applied by a member whose progress rings no bell
//!   in this process (and PostgreSQL says nothing about other sessions'
//!   commits unless asked). One query every `sweep_interval` covers all
//!   waiters, and none runs while nobody waits.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use deadpool_postgres::Pool;
use opentelemetry::trace::SpanContext;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Registry;

/// Sweep queries for awaited users (each covers every waiter).
pub const SWEEPS: &str = "user_wait_sweeps_total";

/// The default sweep interval (`ORDER_USER_SWEEP_INTERVAL`): how late a call
/// may learn of its user when another order process applied it.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// One awaited user's bell, shared by the calls waiting for it.
#[derive(Default)]
struct Bell {
    notify: Notify,
    /// The span of the apply that brought the user, once the replica here
    /// applied it (and traces are on).
    applied_by: Mutex<Option<SpanContext>>,
}

/// Per awaited user: its bell and how many calls wait for it.
type Waiting = HashMap<i64, (Arc<Bell>, usize)>;

/// The users that CreateOrder calls are waiting for; cheap to clone.
#[derive(Clone)]
pub struct Arrivals {
    waiting: Arc<Mutex<Waiting>>,
    metrics: Registry,
}

impl Arrivals {
    pub fn new(metrics: Registry) -> Self {
        metrics.add(SWEEPS, 0);
        Arrivals { waiting: Arc::default(), metrics }
    }

    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `user_id` is now in the database (committed): wakes the calls waiting
    /// for this user, and nobody else. `applied_by` is the span of the apply
    /// that brought it, if this process applied it with traces on.
    pub fn arrived(&self, user_id: i64, applied_by: Option<&SpanContext>) {
        let Some(bell) = self.waiting().get(&user_id).map(|(bell, _)| bell.clone()) else { return };
        if let Some(span) = applied_by.filter(|span| span.is_valid()) {
            // The first apply is the one that created the user.
            bell.applied_by.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(|| span.clone());
        }
        bell.notify.notify_waiters();
    }

    /// Registers a call waiting for `user_id`, until the returned guard drops.
    pub fn register(&self, user_id: i64) -> Waiter {
        let bell = {
            let mut waiting = self.waiting();
            let entry = waiting.entry(user_id).or_insert_with(|| (Arc::default(), 0));
            entry.1 += 1;
            entry.0.clone()
        };
        Waiter { arrivals: self.clone(), user_id, bell }
    }

    /// The users waited for right now.
    pub fn waited_for(&self) -> Vec<i64> {
        self.waiting().keys().copied().collect()
    }

    /// Runs until `stop`: whenever calls wait, looks every `interval` which
    /// of their users the database knows, live or deleted, and rings those:
    /// the users another order process applied (see the module doc).
    pub async fn sweep(self, pool: Pool, interval: Duration, stop: CancellationToken) {
        // A zero interval would make `interval` panic; 1 ms is already a busy loop.
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ids = self.waited_for();
            if ids.is_empty() {
                continue;
            }
            self.metrics.add(SWEEPS, 1);
            match landed(&pool, &ids).await {
                Ok(found) => found.into_iter().for_each(|id| self.arrived(id, None)),
                Err(error) => tracing::debug!(%error, "sweep for awaited users failed; retrying"),
            }
        }
    }
}

/// Which of `ids` the replica knows, as a live or a deleted user.
async fn landed(pool: &Pool, ids: &[i64]) -> Result<Vec<i64>, crate::db::DbError> {
    let client = pool.get().await?;
    let statement = client
        .prepare_cached(
            "SELECT user_id FROM known_users WHERE user_id = ANY($1)
             UNION ALL SELECT user_id FROM deleted_users WHERE user_id = ANY($1)",
        )
        .await?;
    let rows = client.query(&statement, &[&ids]).await?;
    rows.iter().map(|row| crate::db::col(row, "user_id")).collect()
}

/// One call's registration; deregisters on drop.
pub struct Waiter {
    arrivals: Arrivals,
    user_id: i64,
    bell: Arc<Bell>,
}

impl Waiter {
    /// The bell to listen on: create (and `enable`) the `Notified` before
    /// looking in the database, so an arrival in between is not missed.
    pub fn bell(&self) -> &Notify {
        &self.bell.notify
    }

    /// The span of the apply that brought the user here, if this process
    /// applied it with traces on.
    pub fn applied_by(&self) -> Option<SpanContext> {
        self.bell.applied_by.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self.arrivals.waiting();
        if let Some(entry) = waiting.get_mut(&self.user_id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                waiting.remove(&self.user_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    fn arrivals() -> Arrivals {
        Arrivals::new(Registry::new("order"))
    }

    #[tokio::test]
    async fn an_arrival_wakes_the_calls_waiting_for_that_user_and_no_other() {
        let arrivals = arrivals();
        let (one, two) = (arrivals.register(1), arrivals.register(2));
        let (woke_one, woke_two) = (one.bell().notified(), two.bell().notified());
        tokio::pin!(woke_one, woke_two);
        woke_one.as_mut().enable();
        woke_two.as_mut().enable();
        arrivals.arrived(1, None);
        assert!(tokio::time::timeout(Duration::from_secs(5), woke_one).await.is_ok(), "user 1's waiter woke");
        assert!(tokio::time::timeout(Duration::from_millis(50), woke_two).await.is_err(), "user 2's waiter slept on");
    }

    #[test]
    fn a_waiter_learns_the_span_of_the_first_apply_of_its_user() {
        let span = |n: u64| {
            SpanContext::new(TraceId::from(7u128), SpanId::from(n), TraceFlags::SAMPLED, true, TraceState::NONE)
        };
        let arrivals = arrivals();
        let waiter = arrivals.register(1);
        arrivals.arrived(1, None);
        assert_eq!(waiter.applied_by(), None, "the sweep knows no span");
        arrivals.arrived(1, Some(&span(3)));
        arrivals.arrived(1, Some(&span(4)));
        assert_eq!(waiter.applied_by(), Some(span(3)), "the creating apply's span");
        arrivals.arrived(2, Some(&span(5)));
        assert!(arrivals.waited_for() == vec![1], "nobody waited for user 2: nothing was kept for it");
    }

    #[test]
    fn registrations_are_dropped_with_their_last_waiter() {
        let arrivals = arrivals();
        let (a, b) = (arrivals.register(7), arrivals.register(7));
        assert_eq!(arrivals.waited_for(), vec![7]);
        drop(a);
        assert_eq!(arrivals.waited_for(), vec![7]);
        drop(b);
        assert!(arrivals.waited_for().is_empty());
    }
}
