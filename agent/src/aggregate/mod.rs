//! Edge pre-aggregation: readings in, raw and summary batches out.
//!
//! The stage between the sources and the disk buffer, sans-IO apart from the series
//! registry's sled tree. Per source, a [`WindowAggregator`] keeps per-series event-time
//! tumbling windows and applies the raw-forwarding policy; the [`BatchCutter`] groups raw
//! readings and window summaries into separate batches; [`AggregationStage::encode`] turns
//! a cut batch into the protocol's columnar bytes.
//!
//! Batches are stored *without* series definitions when the registry holds them durably:
//! the shipper attaches, per session, the definitions the collector has not confirmed
//! (from [`RegistryReader`]). A raw batch of a 10k-series fleet cut every second would
//! otherwise carry 10k keys each time: 80% of the bytes buffered per reading and over
//! half of the encoding time (`docs/benchmarks.md`, `bench agent`). The run loop makes the
//! registry durable before it appends batches that rely on it.
//!
//! - [`window`]: windows, watermark and idle close, raw policies;
//! - [`registry`]: stable series ids, persisted across restarts;
//! - [`cutter`]: size- and age-based batch cutting.

pub mod cutter;
pub mod registry;
pub mod window;

pub use cutter::{BatchCutter, CutBatch, DEFAULT_MAX_BATCH_AGE_MS, DEFAULT_MAX_ITEMS_PER_BATCH};
pub use registry::{RegistryError, RegistryReader, SeriesRegistry};
pub use window::{
    AggregateOutput, AggregatorCounters, ClosedWindow, ForwardedReading, WindowAggregator,
    WindowConfig, DEFAULT_ALLOWED_DISORDER_MS, DEFAULT_SERIES_EVICT_AFTER_MS, NOT_JOURNALED,
};

use tributary_protocol::batch::{series_ids_used, BatchEncoder, DEFAULT_ZSTD_LEVEL};
use tributary_protocol::model::{Reading, SeriesId};
use tributary_protocol::Batch;

use crate::buffer::BatchInfo;
use crate::source::SeriesKeyRef;

/// Index of a source within the stage (order of `add_source`).
pub type SourceIndex = usize;

/// All sources' aggregators, the shared registry and the batch cutter.
pub struct AggregationStage {
    registry: SeriesRegistry,
    sources: Vec<WindowAggregator>,
    cutter: BatchCutter,
    output: AggregateOutput,
    encoder: BatchEncoder,
}

impl std::fmt::Debug for AggregationStage {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AggregationStage")
            .field("series", &self.registry.len())
            .field("sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

impl AggregationStage {
    pub fn new(registry: SeriesRegistry, cutter: BatchCutter) -> Self {
        Self {
            registry,
            sources: Vec::new(),
            cutter,
            output: AggregateOutput::default(),
            encoder: BatchEncoder::new(DEFAULT_ZSTD_LEVEL),
        }
    }

    pub fn add_source(&mut self, config: WindowConfig) -> SourceIndex {
        self.sources.push(WindowAggregator::new(config));
        self.sources.len() - 1
    }

    pub fn registry(&self) -> &SeriesRegistry {
        &self.registry
    }

    pub fn source(&self, source: SourceIndex) -> Option<&WindowAggregator> {
        self.sources.get(source)
    }

    /// One reading of `source` (event time and flags already resolved), arrived at `now_ms`.
    /// Completed batches are appended to `cut`. An unknown `source` index is ignored. `key`
    /// is a borrowed [`SeriesKeyRef`] (or a `&SeriesKey`): only a new series allocates.
    #[allow(clippy::too_many_arguments)]
    pub fn observe<'k>(
        &mut self,
        source: SourceIndex,
        key: impl Into<SeriesKeyRef<'k>>,
        time_ms: i64,
        value: f64,
        flags: u8,
        journal_seq: u64,
        now_ms: i64,
        cut: &mut Vec<CutBatch>,
    ) -> Result<SeriesId, RegistryError> {
        let series = self.registry.intern_ref(key.into())?;
        if let Some(aggregator) = self.sources.get_mut(source) {
            aggregator.observe(
                Reading {
                    series,
                    time_ms,
                    value,
                    flags,
                },
                journal_seq,
                now_ms,
                &mut self.output,
            );
            self.drain_output(now_ms, cut);
        }
        Ok(series)
    }

    /// Re-observes a journaled reading after a restart (its series id is already
    /// registered); `allow_raw` false when its raw batch is known to be durable.
    pub fn replay(
        &mut self,
        source: SourceIndex,
        reading: Reading,
        journal_seq: u64,
        allow_raw: bool,
        now_ms: i64,
        cut: &mut Vec<CutBatch>,
    ) {
        if let Some(aggregator) = self.sources.get_mut(source) {
            aggregator.observe_with(reading, journal_seq, now_ms, allow_raw, &mut self.output);
            self.drain_output(now_ms, cut);
        }
    }

    /// Smallest journal sequence number among raw readings not yet in a cut batch.
    pub fn min_pending_raw_journal_seq(&self) -> u64 {
        self.cutter.min_pending_raw_journal_seq()
    }

    /// Open windows and late readings over all sources.
    pub fn window_counts(&self) -> (u64, u64) {
        let open = self
            .sources
            .iter()
            .map(|source| source.open_windows() as u64)
            .sum();
        let late = self
            .sources
            .iter()
            .map(|source| source.counters().late_readings)
            .sum();
        (open, late)
    }

    /// Series with aggregation state in memory, and idle series evicted so far (all sources).
    pub fn series_state_counts(&self) -> (u64, u64) {
        let tracked = self
            .sources
            .iter()
            .map(|source| source.tracked_series() as u64)
            .sum();
        let evicted = self
            .sources
            .iter()
            .map(|source| source.counters().series_evicted)
            .sum();
        (tracked, evicted)
    }

    /// Closes idle windows and cuts batches that are due by age.
    pub fn poll(&mut self, now_ms: i64, cut: &mut Vec<CutBatch>) {
        for aggregator in &mut self.sources {
            aggregator.poll(now_ms, &mut self.output);
        }
        self.drain_output(now_ms, cut);
        self.cutter.cut_due(now_ms, false, cut);
    }

    /// Closes every window and cuts everything pending (shutdown).
    pub fn close_all(&mut self, now_ms: i64, cut: &mut Vec<CutBatch>) {
        for aggregator in &mut self.sources {
            aggregator.close_all(&mut self.output);
        }
        self.drain_output(now_ms, cut);
        self.cutter.cut_due(now_ms, true, cut);
    }

    /// Cuts everything pending without closing windows.
    pub fn cut_pending(&mut self, now_ms: i64, cut: &mut Vec<CutBatch>) {
        self.cutter.cut_due(now_ms, true, cut);
    }

    /// Smallest journal sequence number whose reading is not yet in a cut batch: every
    /// journal entry below it is covered by batches once those are durable.
    pub fn min_unfinished_journal_seq(&self) -> u64 {
        let open = self
            .sources
            .iter()
            .map(WindowAggregator::min_open_journal_seq)
            .min()
            .unwrap_or(NOT_JOURNALED);
        open.min(self.cutter.min_pending_journal_seq())
    }

    /// When [`AggregationStage::poll`] next has batch work by age.
    pub fn next_cut_due_ms(&self) -> Option<i64> {
        self.cutter.next_due_ms()
    }

    fn drain_output(&mut self, now_ms: i64, cut: &mut Vec<CutBatch>) {
        for forwarded in self.output.raw.drain(..) {
            self.cutter.push_raw(forwarded, now_ms, cut);
        }
        for closed in self.output.closed.drain(..) {
            self.cutter.push_summary(closed, now_ms, cut);
        }
    }

    /// Encodes a cut batch under `batch_seq`, and the header the buffer stores with it.
    /// With `include_definitions` the batch carries the definition of every series it uses
    /// (self-contained); without, the shipper must attach them from the registry, so pass
    /// `false` only when the registry is persistent and flushed.
    pub fn encode(
        &mut self,
        cut: CutBatch,
        agent_id: &str,
        batch_seq: u64,
        created_ms: i64,
        include_definitions: bool,
    ) -> (Vec<u8>, BatchInfo) {
        let info = BatchInfo {
            class: cut.class,
            created_ms,
            oldest_event_ms: cut.oldest_event_ms(),
            reading_count: u32::try_from(cut.item_count()).unwrap_or(u32::MAX),
        };
        let mut batch = Batch {
            agent_id: agent_id.to_owned(),
            batch_seq,
            created_ms,
            series: Vec::new(),
            readings: cut.readings,
            summaries: cut.summaries,
        };
        if !include_definitions {
            return (self.encoder.encode(&batch), info);
        }
        // The definitions are lent by the registry for the encoding, not cloned: a raw
        // batch of a 10k-series fleet names every series, once a second.
        batch.series = self.registry.take_definitions(&series_ids_used(&batch));
        let bytes = self.encoder.encode(&batch);
        self.registry
            .restore_definitions(std::mem::take(&mut batch.series));
        (bytes, info)
    }
}
