//! `msys.v1.MonitorService`: the latest snapshot, a stream of them, and the
//! bounded history. Reads only what the collector published; never probes.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::collect::Shared;
use crate::{
    error::ServiceError,
    pb::{self, monitor_service_server::MonitorService},
};

/// Streams open at once; one more is refused rather than queued.
const MAX_WATCHERS: usize = 64;

pub struct MonitorApi {
    shared: Arc<Shared>,
    load: Arc<crate::load::service::LoadRunner>,
    watchers: Arc<Semaphore>,
    /// Ends open streams at shutdown, so the server's drain is not held up by them.
    shutdown: CancellationToken,
}

impl MonitorApi {
    pub fn new(shared: Arc<Shared>, shutdown: CancellationToken, load: Arc<crate::load::service::LoadRunner>) -> Self {
        MonitorApi { shared, load, watchers: Arc::new(Semaphore::new(MAX_WATCHERS)), shutdown }
    }
}

/// 0 means 1000; otherwise 100..=60000 ms.
pub fn watch_interval(interval_ms: u32) -> Result<Duration, ServiceError> {
    match interval_ms {
        0 => Ok(Duration::from_secs(1)),
        100..=60_000 => Ok(Duration::from_millis(interval_ms.into())),
        other => {
            Err(ServiceError::invalid("interval_ms", format!("must be 0 (one second) or 100..=60000, got {other}")))
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::Snapshot, Status>> + Send>>;
type LoadTestStream = Pin<Box<dyn Stream<Item = Result<pb::LoadTestEvent, Status>> + Send>>;

#[tonic::async_trait]
impl MonitorService for MonitorApi {
    async fn get_snapshot(&self, _: Request<pb::GetSnapshotRequest>) -> Result<Response<pb::Snapshot>, Status> {
        Ok(Response::new(pb::Snapshot::clone(&self.shared.latest.borrow())))
    }

    type WatchSnapshotsStream = SnapshotStream;

    async fn watch_snapshots(
        &self,
        request: Request<pb::WatchSnapshotsRequest>,
    ) -> Result<Response<Self::WatchSnapshotsStream>, Status> {
        let every = watch_interval(request.into_inner().interval_ms)?;
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("{MAX_WATCHERS} snapshot streams are open already; try again later"))
        })?;
        let mut latest = self.shared.latest.subscribe();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let snapshot = pb::Snapshot::clone(&latest.borrow_and_update());
                let sent = tokio::select! {
                    sent = tx.send(Ok(snapshot)) => sent,
                    _ = shutdown.cancelled() => return,
                };
                if sent.is_err() {
                    return; // the client went away
                }
                // At most one snapshot per `every`, and only a new one.
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                }
                tokio::select! {
                    changed = latest.changed() => if changed.is_err() { return },
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type RunLoadTestStream = LoadTestStream;

    async fn run_load_test(
        &self,
        request: Request<pb::RunLoadTestRequest>,
    ) -> Result<Response<Self::RunLoadTestStream>, Status> {
        let events = self.load.run(request)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn cancel_load_test(
        &self,
        request: Request<pb::CancelLoadTestRequest>,
    ) -> Result<Response<pb::CancelLoadTestResponse>, Status> {
        Ok(Response::new(self.load.cancel(request)?))
    }

    async fn get_load_test(
        &self,
        _: Request<pb::GetLoadTestRequest>,
    ) -> Result<Response<pb::GetLoadTestResponse>, Status> {
        Ok(Response::new(self.load.get()))
    }

    async fn get_history(&self, request: Request<pb::GetHistoryRequest>) -> Result<Response<pb::History>, Status> {
        let window = request.into_inner().window_seconds;
        let since = (window > 0).then(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            now.as_secs() as i64 - i64::from(window)
        });
        let events = self.shared.latest.borrow().events.clone();
        let history = self.shared.history();
        Ok(Response::new(pb::History {
            points: history.since(since),
            interval_ms: self.shared.interval.as_millis() as u32,
            capacity: history.capacity() as u32,
            memory_bytes: history.memory().1 as u64,
            events,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_interval_table() {
        assert_eq!(watch_interval(0).ok(), Some(Duration::from_secs(1)));
        assert_eq!(watch_interval(100).ok(), Some(Duration::from_millis(100)));
        assert_eq!(watch_interval(60_000).ok(), Some(Duration::from_secs(60)));
        for bad in [1, 99, 60_001, u32::MAX] {
            let error = watch_interval(bad).expect_err("out of range");
            assert!(error.to_string().contains("interval_ms"), "{error}");
        }
    }
}
