//! Store retention, run by the store's only writer between flushes.
//!
//! Why a wrapper around the store: the consumer loop owns the store (`&mut`), the embedded
//! store is single-process, and retention must not race the writer; so the pass runs right
//! after a successful flush, at most once per `interval_ms` of the injected clock. A failed
//! pass is logged and retried at the next interval: retention never stops processing.

use std::future::Future;

use crate::log::Clock;
use crate::process::{LateReading, WindowResult};
use crate::store::{
    Checkpoint, ClickHouseStore, EmbeddedStore, FlushReport, LastSeenRow, RawReadingRow, Store,
    StoreError,
};

/// A store that can delete what is past its retention.
pub trait Retain: Store {
    /// Deletes expired rows as of `now_ms`; returns a summary for the log.
    fn enforce_retention_at(
        &mut self,
        now_ms: i64,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;
}

impl Retain for EmbeddedStore {
    fn enforce_retention_at(
        &mut self,
        now_ms: i64,
    ) -> impl Future<Output = Result<String, StoreError>> + Send {
        let result = self
            .enforce_retention(now_ms)
            .map(|report| format!("{report:?}"));
        async move { result }
    }
}

impl Retain for ClickHouseStore {
    async fn enforce_retention_at(&mut self, now_ms: i64) -> Result<String, StoreError> {
        self.drop_expired_partitions(now_ms)
            .await
            .map(|dropped| format!("dropped partitions {dropped:?}"))
    }
}

/// `S`, plus a retention pass after a flush every `interval_ms`.
pub struct RetainingStore<S, C> {
    inner: S,
    clock: C,
    interval_ms: i64,
    next_pass_ms: i64,
}

impl<S: Retain, C: Clock> RetainingStore<S, C> {
    /// The first pass runs after the first flush.
    pub fn new(inner: S, clock: C, interval_ms: i64) -> Self {
        Self {
            inner,
            clock,
            interval_ms: interval_ms.max(1),
            next_pass_ms: i64::MIN,
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: Retain + Sync, C: Clock> Store for RetainingStore<S, C> {
    fn write_raw_readings(&mut self, rows: Vec<RawReadingRow>, now_ms: i64) {
        self.inner.write_raw_readings(rows, now_ms);
    }

    fn write_window_results(
        &mut self,
        results: &[WindowResult],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.inner.write_window_results(results, now_ms)
    }

    fn write_late_readings(&mut self, late: &[LateReading], now_ms: i64) {
        self.inner.write_late_readings(late, now_ms);
    }

    fn write_last_seen(&mut self, rows: Vec<LastSeenRow>, now_ms: i64) {
        self.inner.write_last_seen(rows, now_ms);
    }

    fn write_checkpoint(&mut self, checkpoint: Checkpoint) {
        self.inner.write_checkpoint(checkpoint);
    }

    fn load_checkpoint(
        &self,
        group: &str,
        partition: u32,
    ) -> impl Future<Output = Result<Option<Checkpoint>, StoreError>> + Send {
        self.inner.load_checkpoint(group, partition)
    }

    fn buffered_rows(&self) -> usize {
        self.inner.buffered_rows()
    }

    fn flush_due(&self, now_ms: i64) -> bool {
        self.inner.flush_due(now_ms)
    }

    async fn flush(&mut self) -> Result<FlushReport, StoreError> {
        let report = self.inner.flush().await?;
        let now_ms = self.clock.now_ms();
        if now_ms >= self.next_pass_ms {
            self.next_pass_ms = now_ms.saturating_add(self.interval_ms);
            match self.inner.enforce_retention_at(now_ms).await {
                Ok(summary) => tracing::info!(%summary, "store retention pass"),
                Err(error) => {
                    tracing::warn!(%error, "store retention pass failed; retrying at the next interval")
                }
            }
        }
        Ok(report)
    }
}
