//! The live feed: what the processor just produced, pushed to whoever listens (the query
//! API's WebSocket clients) without a round trip through the store.
//!
//! Why a broadcast channel of small batches: the consumer loop must never wait for a
//! listener. `tokio::sync::broadcast` keeps a bounded ring; a listener that falls behind
//! gets `Lagged` and skips ahead (the WebSocket tells its client so), and the sender never
//! blocks. The loop publishes one [`LiveBatch`] per log record it processed (and per
//! engine tick), so the per-message overhead is paid per batch, not per reading.
//!
//! What is pushed is not yet durable in the store: it is the freshest view. A client that
//! reconnects reads the store's answers through the query API and then follows the feed.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

/// A window result as the processor emitted it (running or final).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveWindow {
    pub agent_id: String,
    pub device_id: String,
    pub metric: String,
    /// Rendered as in the store (`name=value,...`, see `store::render_tags`).
    pub tags: String,
    pub resolution_ms: i64,
    pub window_start_ms: i64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub last_time_ms: i64,
    pub last_value: f64,
    pub is_final: bool,
}

/// The newest raw reading of one series in one log record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveReading {
    pub agent_id: String,
    pub device_id: String,
    pub metric: String,
    pub tags: String,
    pub time_ms: i64,
    pub value: f64,
}

/// What one step of the processor produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveBatch {
    /// Log append time of the record (or the wall clock of the tick) that produced it.
    pub produced_ms: i64,
    pub windows: Vec<LiveWindow>,
    pub readings: Vec<LiveReading>,
}

impl LiveBatch {
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.readings.is_empty()
    }
}

/// Cloneable handle on the feed: the processor publishes, listeners subscribe.
#[derive(Debug, Clone)]
pub struct LiveFeed {
    sender: broadcast::Sender<Arc<LiveBatch>>,
}

impl LiveFeed {
    /// A feed that keeps at most `capacity` batches for the slowest listener.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self { sender }
    }

    /// Publishes a batch; never blocks, and does nothing when nobody listens.
    pub fn publish(&self, batch: LiveBatch) {
        if !batch.is_empty() && self.sender.receiver_count() > 0 {
            let _ = self.sender.send(Arc::new(batch));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveBatch>> {
        self.sender.subscribe()
    }

    pub fn listeners(&self) -> usize {
        self.sender.receiver_count()
    }
}

impl Default for LiveFeed {
    fn default() -> Self {
        Self::new(1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(value: f64) -> LiveReading {
        LiveReading {
            agent_id: "gw-1".into(),
            device_id: "dev-1".into(),
            metric: "temperature".into(),
            tags: String::new(),
            time_ms: 1_000,
            value,
        }
    }

    #[test]
    fn a_slow_listener_lags_and_skips_ahead_without_blocking_the_publisher() {
        let feed = LiveFeed::new(2);
        let mut listener = feed.subscribe();
        for value in 0..5 {
            feed.publish(LiveBatch {
                produced_ms: value,
                windows: Vec::new(),
                readings: vec![reading(value as f64)],
            });
        }
        assert!(matches!(
            listener.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(3))
        ));
        assert_eq!(listener.try_recv().map(|batch| batch.produced_ms), Ok(3));
        assert_eq!(listener.try_recv().map(|batch| batch.produced_ms), Ok(4));
    }

    #[test]
    fn empty_batches_are_not_published() {
        let feed = LiveFeed::new(4);
        let mut listener = feed.subscribe();
        feed.publish(LiveBatch::default());
        assert!(matches!(
            listener.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
    }
}
