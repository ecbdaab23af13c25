//! Turns SIGINT/SIGTERM into a `CancellationToken` that every role and task
//! watches. A second signal exits at once, for the impatient operator whose
//! drain is stuck.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, PoisonError},
};

use futures::FutureExt;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Returns a token cancelled on the first SIGINT or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining (signal again to exit now)");
        cancel.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Runs a role's background tasks (relay, consumer, health watcher) and
/// makes sure none dies unnoticed: a task that ends (or panics) before its
/// own stop token fired cancels the role, which then stops and reports the
/// failure. A process must never go on serving without the task that makes
/// its answers true.
#[derive(Clone)]
pub struct Supervisor {
    tasks: TaskTracker,
    role: CancellationToken,
    died: Arc<Mutex<Option<&'static str>>>,
}

impl Supervisor {
    /// `role` is cancelled when a task dies.
    pub fn new(tasks: TaskTracker, role: CancellationToken) -> Self {
        Supervisor { tasks, role, died: Arc::default() }
    }

    /// Spawns `task` on the role's tracker; it is expected to end only after `stop`.
    pub fn spawn<F>(&self, name: &'static str, stop: CancellationToken, task: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (role, died) = (self.role.clone(), self.died.clone());
        self.tasks.spawn(async move {
            let outcome = AssertUnwindSafe(task).catch_unwind().await;
            if stop.is_cancelled() && outcome.is_ok() {
                return;
            }
            match outcome {
                Ok(()) => tracing::error!(task = name, "background task stopped on its own; stopping the role"),
                Err(_) => tracing::error!(task = name, "background task panicked; stopping the role"),
            }
            died.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(name);
            role.cancel();
        })
    }

    /// The first task that died, if any.
    pub fn died(&self) -> Option<&'static str> {
        *self.died.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An error naming the dead task, for the role's result.
    pub fn result(&self) -> anyhow::Result<()> {
        match self.died() {
            Some(name) => Err(anyhow::anyhow!("the {name} task died, so the role stopped")),
            None => Ok(()),
        }
    }
}

/// The first half of a graceful stop, in the order load balancers need: once
/// `role` is cancelled, report NOT_SERVING for `services` (and the server),
/// keep serving for `drain_delay` so that traffic moves elsewhere, then cancel
/// `stop_accepting`, after which the server drains what is in flight.
/// `health_watcher` is cancelled first so it cannot flip health back.
pub async fn drain_in_order(
    role: CancellationToken,
    health_watcher: CancellationToken,
    reporter: tonic_health::server::HealthReporter,
    services: &'static [&'static str],
    drain_delay: std::time::Duration,
    stop_accepting: CancellationToken,
) {
    tokio::select! {
        _ = role.cancelled() => {}
        // The server stopped on its own (it failed): nothing to drain.
        _ = stop_accepting.cancelled() => return,
    }
    health_watcher.cancel();
    crate::grpc::set_health(&reporter, services, false).await;
    if !drain_delay.is_zero() {
        tracing::info!(?drain_delay, "NOT_SERVING; still accepting requests during the drain delay");
        tokio::time::sleep(drain_delay).await;
    }
    stop_accepting.cancel();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_background_task_that_ends_on_its_own_cancels_its_role() {
        let (tasks, role) = (TaskTracker::new(), CancellationToken::new());
        let supervisor = Supervisor::new(tasks.clone(), role.clone());
        supervisor.spawn("relay", CancellationToken::new(), async {});
        assert!(tokio::time::timeout(Duration::from_secs(10), role.cancelled()).await.is_ok());
        assert_eq!(supervisor.died(), Some("relay"));
        assert!(supervisor.result().is_err());
    }

    #[tokio::test]
    async fn a_background_task_that_panics_cancels_its_role() {
        let (tasks, role) = (TaskTracker::new(), CancellationToken::new());
        let supervisor = Supervisor::new(tasks.clone(), role.clone());
        supervisor.spawn("consumer", CancellationToken::new(), async { panic!("boom") });
        assert!(tokio::time::timeout(Duration::from_secs(10), role.cancelled()).await.is_ok());
        assert_eq!(supervisor.died(), Some("consumer"));
    }

    #[tokio::test]
    async fn a_task_stopped_by_its_token_is_not_a_death() {
        let (tasks, role, stop) = (TaskTracker::new(), CancellationToken::new(), CancellationToken::new());
        let supervisor = Supervisor::new(tasks.clone(), role.clone());
        let until_stopped = stop.clone();
        supervisor.spawn("health", stop.clone(), async move { until_stopped.cancelled().await });
        stop.cancel();
        tasks.close();
        assert!(tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await.is_ok());
        assert!(!role.is_cancelled());
        assert!(supervisor.result().is_ok());
    }

    #[tokio::test]
    async fn shutdown_reports_not_serving_then_waits_the_drain_delay_before_refusing_connections() {
        let (reporter, _health) = tonic_health::server::health_reporter();
        crate::grpc::set_health(&reporter, &["svc"], true).await;
        let (role, watcher, stop) = (CancellationToken::new(), CancellationToken::new(), CancellationToken::new());
        let delay = Duration::from_millis(300);
        let drain =
            tokio::spawn(drain_in_order(role.clone(), watcher.clone(), reporter, &["svc"], delay, stop.clone()));
        role.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(watcher.is_cancelled(), "the health watcher stops first");
        assert!(!stop.is_cancelled(), "connections are still accepted during the drain delay");
        assert!(tokio::time::timeout(Duration::from_secs(10), drain).await.is_ok());
        assert!(stop.is_cancelled());
    }
}
