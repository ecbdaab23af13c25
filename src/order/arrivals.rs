//! Per-user wake-ups for CreateOrder calls that wait for a user's first
//! event. A waiting call registers the user it waits for; whoever learns that
//! the user landed (the replica applying its event, or the sweep that sees
//! rows written by another order process) rings [`Arrivals::arrived`] for
//! that user, and only the calls waiting for that user wake up and look
//! again. Nothing is polled per waiter: one sweep query covers all of them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often the sweep looks for waited-for users that another order
/// process applied (their progress rings no bell in this process). One query
/// per interval for all waiters, and none while nobody waits.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Per awaited user: its bell and how many calls wait for it.
type Waiting = HashMap<i64, (Arc<Notify>, usize)>;

/// The users that CreateOrder calls are waiting for; cheap to clone.
#[derive(Clone, Default)]
pub struct Arrivals {
    waiting: Arc<Mutex<Waiting>>,
    /// Rung when anything was applied locally by a replica that does not
    /// (yet) name users: the sweep then runs at once.
    applied: Arc<Notify>,
}

impl Arrivals {
    pub fn new() -> Self {
        Arrivals::default()
    }

    /// Arrivals whose sweep also runs whenever `applied` is rung: the
    /// replica's "something was applied" signal, until it names users.
    pub fn with_signal(applied: Arc<Notify>) -> Self {
        Arrivals { waiting: Arc::default(), applied }
    }

    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An event for `user_id` was applied (or the user was found): wakes the
    /// calls waiting for this user, and nobody else. The replica calls this
    /// after committing a user's event.
    pub fn arrived(&self, user_id: i64) {
        if let Some((notify, _)) = self.waiting().get(&user_id) {
            notify.notify_waiters();
        }
    }

    /// Something was applied, without saying for whom: makes the sweep look
    /// at once. For replicas that cannot name the user.
    pub fn something_applied(&self) {
        self.applied.notify_one();
    }

    /// Registers a call waiting for `user_id`, until the returned guard drops.
    pub fn expect(&self, user_id: i64) -> Waiter {
        let notify = {
            let mut waiting = self.waiting();
            let entry = waiting.entry(user_id).or_insert_with(|| (Arc::new(Notify::new()), 0));
            entry.1 += 1;
            entry.0.clone()
        };
        Waiter { arrivals: self.clone(), user_id, notify }
    }

    /// The users waited for right now.
    pub fn waited_for(&self) -> Vec<i64> {
        self.waiting().keys().copied().collect()
    }

    /// Runs until `stop`: whenever calls wait, looks every [`SWEEP_INTERVAL`]
    /// (or at once when something was applied here) which of their users
    /// the database knows, live or deleted, and rings those.
    pub async fn sweep(self, pool: Pool, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.applied.notified() => {}
            }
            let ids = self.waited_for();
            if ids.is_empty() {
                continue;
            }
            match landed(&pool, &ids).await {
                Ok(found) => found.into_iter().for_each(|id| self.arrived(id)),
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
    notify: Arc<Notify>,
}

impl Waiter {
    /// The bell to listen on: create (and `enable`) the `Notified` before
    /// looking in the database, so an arrival in between is not missed.
    pub fn bell(&self) -> &Notify {
        &self.notify
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
    use super::*;

    #[tokio::test]
    async fn an_arrival_wakes_the_calls_waiting_for_that_user_and_no_other() {
        let arrivals = Arrivals::new();
        let (one, two) = (arrivals.expect(1), arrivals.expect(2));
        let (woke_one, woke_two) = (one.bell().notified(), two.bell().notified());
        tokio::pin!(woke_one, woke_two);
        woke_one.as_mut().enable();
        woke_two.as_mut().enable();
        arrivals.arrived(1);
        assert!(tokio::time::timeout(Duration::from_secs(5), woke_one).await.is_ok(), "user 1's waiter woke");
        assert!(tokio::time::timeout(Duration::from_millis(50), woke_two).await.is_err(), "user 2's waiter slept on");
    }

    #[test]
    fn registrations_are_dropped_with_their_last_waiter() {
        let arrivals = Arrivals::new();
        let (a, b) = (arrivals.expect(7), arrivals.expect(7));
        assert_eq!(arrivals.waited_for(), vec![7]);
        drop(a);
        assert_eq!(arrivals.waited_for(), vec![7]);
        drop(b);
        assert!(arrivals.waited_for().is_empty());
    }
}
