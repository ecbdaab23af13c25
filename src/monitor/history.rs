//! The bounded history: one reduced point per collection in a fixed-size ring,
//! so a dashboard that connects late can draw its charts at once.
//!
//! Memory: the ring holds `capacity` points and never grows past it; the
//! default is 15 minutes at a 1 s interval = 900 points. A point of this
//! system (3 services, 2 databases, 3 partitions) takes ~1.1 KB of heap and
//! struct (measured by [`point_bytes`], the figure `GetHistory` reports), so
//! the default ring stays under 1 MB.

use std::{collections::VecDeque, mem::size_of, time::Duration};

use crate::pb;

pub struct History {
    points: VecDeque<pb::HistoryPoint>,
    capacity: usize,
    bytes: usize,
}

impl History {
    /// A ring long enough for `span` at `interval` (at least one point, at
    /// most 100,000 whatever the settings).
    pub fn new(span: Duration, interval: Duration) -> Self {
        let capacity = (span.as_secs_f64() / interval.as_secs_f64().max(0.001)).ceil().clamp(1.0, 100_000.0) as usize;
        History { points: VecDeque::with_capacity(capacity), capacity, bytes: 0 }
    }

    pub fn push(&mut self, point: pb::HistoryPoint) {
        if self.points.len() == self.capacity
            && let Some(old) = self.points.pop_front()
        {
            self.bytes -= point_bytes(&old);
        }
        self.bytes += point_bytes(&point);
        self.points.push_back(point);
    }

    /// Points taken at or after `since_unix` seconds (all when None), oldest first.
    pub fn since(&self, since_unix: Option<i64>) -> Vec<pb::HistoryPoint> {
        let keep = |p: &&pb::HistoryPoint| match since_unix {
            None => true,
            Some(since) => p.at.as_ref().is_some_and(|t| t.seconds >= since),
        };
        self.points.iter().filter(keep).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes the points held now take, and what a full ring of points like
    /// the latest would take.
    pub fn memory(&self) -> (usize, usize) {
        let per_point = self.points.back().map(point_bytes).unwrap_or(0);
        (self.bytes, per_point * self.capacity)
    }
}

/// Heap and inline bytes of one point: the struct, its vectors' buffers and
/// the strings in them.
pub fn point_bytes(p: &pb::HistoryPoint) -> usize {
    size_of::<pb::HistoryPoint>()
        + p.services.capacity() * size_of::<pb::ServicePoint>()
        + p.services.iter().map(|s| s.name.capacity()).sum::<usize>()
        + p.databases.capacity() * size_of::<pb::DatabasePoint>()
        + p.databases.iter().map(|d| d.name.capacity()).sum::<usize>()
        + p.partitions.capacity() * size_of::<pb::PartitionPoint>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seconds: i64) -> pb::HistoryPoint {
        pb::HistoryPoint {
            at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            services: vec![pb::ServicePoint { name: "user".into(), ..Default::default() }; 3],
            databases: vec![pb::DatabasePoint { name: "users_db".into(), ..Default::default() }; 2],
            partitions: vec![pb::PartitionPoint::default(); 3],
            ..Default::default()
        }
    }

    #[test]
    fn default_ring_holds_fifteen_minutes_at_one_second_within_a_megabyte() {
        let mut history = History::new(Duration::from_secs(900), Duration::from_secs(1));
        assert_eq!(history.capacity(), 900);
        for s in 0..2000 {
            history.push(point(s));
        }
        assert_eq!(history.len(), 900, "the ring never grows past its capacity");
        let (now, full) = history.memory();
        assert_eq!(now, full);
        assert!(full < 1_000_000, "a full ring takes {full} bytes");
        let points = history.since(None);
        assert_eq!(points.first().and_then(|p| p.at).map(|t| t.seconds), Some(1100), "oldest dropped first");
        assert_eq!(points.last().and_then(|p| p.at).map(|t| t.seconds), Some(1999));
    }

    #[test]
    fn since_returns_only_the_window() {
        let mut history = History::new(Duration::from_secs(60), Duration::from_secs(1));
        for s in 0..10 {
            history.push(point(s));
        }
        assert_eq!(history.since(Some(7)).len(), 3);
        assert_eq!(history.since(Some(100)).len(), 0);
    }

    #[test]
    fn capacity_follows_span_and_interval_and_is_bounded() {
        assert_eq!(History::new(Duration::from_secs(900), Duration::from_millis(500)).capacity(), 1800);
        assert_eq!(History::new(Duration::from_secs(1), Duration::from_secs(60)).capacity(), 1);
        assert_eq!(History::new(Duration::from_secs(1_000_000), Duration::from_millis(1)).capacity(), 100_000);
    }
}
