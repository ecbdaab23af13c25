//! One `WatchSnapshots` stream on the monitor, shared by every open page.
//! Each snapshot is turned into JSON once and fanned out through a
//! `broadcast`, so a hundred browsers cost the monitor one stream. A watchdog
//! notices a monitor that stops talking without closing the connection (a
//! frozen process keeps its sockets open): after `stall` without a snapshot
//! the feed reports the monitor unreachable and connects again.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::view;
use crate::{
    metrics::Registry,
    pb::{self, monitor_service_client::MonitorServiceClient},
};

/// Frames a slow page may fall behind before it skips to the newest.
const FANOUT_CAPACITY: usize = 32;
/// Deadline of one unary call to the monitor (history, snapshot).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection delays: the first after a stream that delivered, and the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Gauge: 1 while snapshots flow from the monitor, 0 otherwise.
const MONITOR_UP: &str = "monitor_stream_up";
/// Snapshots received from the monitor.
const SNAPSHOTS: &str = "monitor_snapshots_received_total";

/// One server-sent event: its name and its JSON data.
#[derive(Clone, Debug)]
pub struct Frame {
    pub event: &'static str,
    pub data: Arc<str>,
}

#[derive(Default)]
struct State {
    /// The newest snapshot as the page reads it.
    latest: Option<Arc<str>>,
    /// When it arrived (the page shows how old the data is).
    received: Option<Instant>,
    /// Why the monitor is not answering; None while the stream flows.
    down: Option<String>,
    /// The newest load-test frame, so a page opened mid-run sees it.
    load: Option<Frame>,
}

/// The shared feed: the newest data, and the channel every page listens on.
#[derive(Clone)]
pub struct Feed {
    channel: Channel,
    interval: Duration,
    stall: Duration,
    tx: broadcast::Sender<Frame>,
    state: Arc<Mutex<State>>,
    metrics: Registry,
}

impl Feed {
    /// Prepares the connection (made lazily: the monitor may start later).
    pub fn new(monitor: &str, interval: Duration, stall: Duration, metrics: Registry) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(monitor.to_owned())
            .with_context(|| format!("--monitor {monitor:?} is not a valid URL"))?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let (tx, _) = broadcast::channel(FANOUT_CAPACITY);
        let state = State { down: Some("not connected yet".into()), ..State::default() };
        metrics.set(MONITOR_UP, 0);
        Ok(Feed { channel, interval, stall, tx, state: Arc::new(Mutex::new(state)), metrics })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn client(&self) -> MonitorServiceClient<Channel> {
        MonitorServiceClient::new(self.channel.clone())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Frame> {
        self.tx.subscribe()
    }

    /// The newest snapshot JSON, if any arrived yet.
    pub fn latest(&self) -> Option<Arc<str>> {
        self.lock().latest.clone()
    }

    /// The newest load-test frame, if a test ran since this process started.
    pub fn latest_load(&self) -> Option<Frame> {
        self.lock().load.clone()
    }

    /// Sends a frame to every page (and remembers load frames for late pages).
    pub fn publish(&self, frame: Frame) {
        if frame.event == "load" {
            self.lock().load = Some(frame.clone());
        }
        // No receiver is normal: no page is open.
        let _ = self.tx.send(frame);
    }

    /// Whether the monitor answers, and how old the newest data is.
    pub fn status(&self) -> Frame {
        let state = self.lock();
        let age_ms = state.received.map(|at| u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX));
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let data = json!({
            "monitor": if state.down.is_none() { "up" } else { "unreachable" },
            "reason": state.down, "last_data_age_ms": age_ms, "now_ms": now_ms as u64,
        });
        Frame { event: "status", data: data.to_string().into() }
    }

    /// The monitor's bounded history reduced to chart points.
    pub async fn history(&self, window: Duration) -> Result<serde_json::Value, tonic::Status> {
        let seconds = u32::try_from(window.as_secs()).unwrap_or(u32::MAX);
        let mut request = tonic::Request::new(pb::GetHistoryRequest { window_seconds: seconds });
        request.set_timeout(CALL_TIMEOUT);
        let history = tokio::time::timeout(CALL_TIMEOUT, self.client().get_history(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("the monitor did not answer GetHistory within 5 s"))??;
        Ok(view::history(history.get_ref()))
    }

    fn set_down(&self, reason: String) {
        let changed = {
            let mut state = self.lock();
            let changed = state.down.as_deref() != Some(reason.as_str());
            state.down = Some(reason.clone());
            changed
        };
        if changed {
            tracing::warn!(reason, "monitor unreachable");
        }
        self.metrics.set(MONITOR_UP, 0);
        self.publish(self.status());
    }

    fn accept(&self, snapshot: &pb::Snapshot) {
        let data: Arc<str> = view::snapshot(snapshot).to_string().into();
        let recovered = {
            let mut state = self.lock();
            state.latest = Some(data.clone());
            state.received = Some(Instant::now());
            state.down.take().is_some()
        };
        self.metrics.add(SNAPSHOTS, 1);
        if recovered {
            self.metrics.set(MONITOR_UP, 1);
            tracing::info!("monitor stream flowing");
            self.publish(self.status());
        }
        self.publish(Frame { event: "snapshot", data });
    }

    /// Follows the monitor until `shutdown`, reconnecting after every failure
    /// or stall, and tells the pages every second whether data flows.
    pub async fn run(self, shutdown: CancellationToken) {
        let beat = {
            let feed = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => feed.publish(feed.status()),
                    }
                }
            })
        };
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (reason, flowed) = tokio::select! {
                _ = shutdown.cancelled() => break,
                stopped = self.follow() => stopped,
            };
            self.set_down(reason);
            // A stream that delivered starts the next attempt afresh; repeated
            // failures back off up to 2 s, still well inside the page's 5 s.
            backoff = if flowed { FIRST_BACKOFF } else { (backoff * 2).min(MAX_BACKOFF) };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        beat.abort();
    }

    /// Reads one stream until it fails or stalls; returns why it stopped and
    /// whether any snapshot came through.
    async fn follow(&self) -> (String, bool) {
        let interval_ms = u32::try_from(self.interval.as_millis()).unwrap_or(1000);
        let mut client = self.client();
        let call = client.watch_snapshots(pb::WatchSnapshotsRequest { interval_ms });
        let mut stream = match tokio::time::timeout(self.stall, call).await {
            Err(_) => return (format!("no answer to WatchSnapshots within {} s", self.stall.as_secs()), false),
            Ok(Err(status)) => return (describe(&status), false),
            Ok(Ok(response)) => response.into_inner(),
        };
        let mut flowed = false;
        loop {
            let reason = match tokio::time::timeout(self.stall, stream.message()).await {
                Err(_) => format!("no snapshot for {} s", self.stall.as_secs()),
                Ok(Err(status)) => describe(&status),
                Ok(Ok(None)) => "the monitor ended the stream".into(),
                Ok(Ok(Some(snapshot))) => {
                    self.accept(&snapshot);
                    flowed = true;
                    continue;
                }
            };
            return (reason, flowed);
        }
    }
}

/// A transport error as one readable line (tonic's Display nests sources).
pub fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{}: {}", status.code().description(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        // Transport errors repeat their source's text at each level; say it once.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
