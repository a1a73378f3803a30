//! The run loop: sources -> aggregation -> disk buffer, with the acknowledgement journal.
//!
//! One pipeline task owns the [`AggregationStage`] and is the only writer of batches; the
//! source shells (MQTT, serial) parse on their own tasks and send [`PipelineInput`]s over a
//! bounded channel, so a slow disk back-pressures the sources instead of growing memory.
//!
//! # The acknowledgement chain (MQTT QoS 1)
//!
//! The same for both MQTT modes: the subscribe shell acknowledges to the gateway's broker,
//! the embedded broker (`source::broker`) to the sensor.
//!
//! Batches are cut about once a second, but the broker must get its PUBACK within about
//! one group-commit interval (50 ms) or its in-flight window throttles us. And a reading in
//! an open window is in no batch at all. So the guarantee rests on a write-ahead *journal*:
//!
//! 1. every reading of a message that wants an acknowledgement gets a journal sequence
//!    number and is written to the `journal` tree of the agent's state database
//!    (`<buffer.path>.state`, sled); new series ids go to its `series` tree. Readings are
//!    journaled in *blocks*: one tree entry per commit (or per [`JOURNAL_BLOCK_MAX_BYTES`]),
//!    keyed by the sequence number of its first reading, holding consecutive readings.
//!    One sled write per reading was most of the agent's CPU at QoS 1;
//! 2. each commit (every `group_commit_interval_ms`) flushes the state database (journal
//!    blocks and new series ids), then appends the batches cut since the last one to the
//!    buffer and flushes it, and only then lets the MQTT shell acknowledge the messages
//!    ingested before the commit. State first because buffered batches carry no series
//!    definitions: a batch must never be on disk before the registry entries naming its
//!    series (sled may write a batch out before its buffer's flush). If the state flush
//!    fails, that commit's batches are encoded with their definitions instead;
//! 3. after the flush, the smallest journal sequence number still in an open window or an
//!    uncut batch is recorded as the `journal_covered_below` mark, and the blocks wholly
//!    below it are deleted: their data is in durable batches.
//!
//! After a crash, the journal is replayed into the windows before any source starts,
//! skipping the readings of a partly covered block that lie below the mark.
//! Readings whose raw batch was already durable (journal seq below the persisted
//! `raw_durable_below` mark) are not forwarded raw again. So kill -9 loses nothing a broker
//! was told was delivered. The one gap we know of: a crash in the instant after a buffer
//! flush and before the next state flush records the journal truncation can replay readings
//! that are already in durable batches (duplicates, never losses) — at most one commit
//! interval's worth.
//!
//! Serial lines and QoS 0 messages are not journaled by default: there is nobody to
//! acknowledge to, so a crash loses their open windows (at most one window width plus the
//! disorder allowance) and uncut raw readings (at most one batch age). A source with
//! `journal_all_readings = true` journals them too (same blocks, no extra write per reading).

mod journal_block;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tributary_protocol::model::Reading;

use crate::aggregate::{
    AggregationStage, CutBatch, RegistryError, SeriesRegistry, SourceIndex, NOT_JOURNALED,
};
use crate::buffer::{self, BatchClass, DiskBuffer, Durability};
use crate::config::{AgentConfig, FsyncPolicy, SourceKind};
use crate::metrics::{Metrics, SourceMetrics};
use crate::source::{ParsedReadings, TimePolicy};

/// Wall-clock milliseconds since the Unix epoch: the shells' clock (cores take time as input).
pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// What a source hands the pipeline: the readings of one message or line.
#[derive(Debug)]
pub struct PipelineInput {
    pub source: SourceIndex,
    /// Usually taken from the shell's `ReadingsPool`: dropped once ingested, it returns
    /// there emptied, so a message costs no allocation on either side.
    pub readings: ParsedReadings,
    pub receive_ms: i64,
    /// Set for messages that need an acknowledgement: the readings are journaled, and the
    /// sender fires once they are durable. Dropped without firing if the commit failed.
    pub durable: Option<oneshot::Sender<()>>,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("cannot open the agent state database at {}: {source}; check permissions and free space, or move a damaged directory aside", path.display())]
    StateOpen { path: PathBuf, source: sled::Error },
    #[error("agent state database at {}: {source}", path.display())]
    State { path: PathBuf, source: sled::Error },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("journal entry {journal_seq} is damaged ({reason}); move {} aside to start without it (its readings are lost)", path.display())]
    JournalCorrupt {
        journal_seq: String,
        reason: String,
        path: PathBuf,
    },
    #[error(transparent)]
    Buffer(#[from] buffer::BufferError),
    #[error("the agent state at {} holds no series registry, but the buffer holds {batches} batches that name their series by the registry's ids; restore {}, or move the buffer directory aside as well (its batches are then lost)", state_path.display(), state_path.display())]
    RegistryLost { state_path: PathBuf, batches: u64 },
}

/// Where the state database (series registry, journal) lives: beside the buffer.
pub fn state_path(buffer_path: &Path) -> PathBuf {
    let mut name = buffer_path
        .file_name()
        .map(|name| name.to_os_string())
        .unwrap_or_else(|| "buffer".into());
    name.push(".state");
    buffer_path.with_file_name(name)
}

/// The buffer settings of the config file, in the buffer module's terms.
pub fn buffer_config(config: &crate::config::BufferConfig) -> buffer::BufferConfig {
    let fsync = match config.fsync {
        FsyncPolicy::EveryBatch => buffer::FsyncPolicy::EveryBatch,
        FsyncPolicy::Group => buffer::FsyncPolicy::Group {
            interval_ms: config.group_commit_interval_ms,
        },
        FsyncPolicy::Os => buffer::FsyncPolicy::Os {
            interval_ms: config.group_commit_interval_ms.max(1),
        },
    };
    buffer::BufferConfig {
        path: config.path.clone(),
        max_buffer_bytes: config.max_buffer_bytes,
        fsync,
        cache_capacity_bytes: config.cache_capacity_bytes,
        ..buffer::BufferConfig::default()
    }
}

/// A journal block is written out early once it holds this many bytes (about 6,000
/// readings at ~10 bytes each, `journal_block`), so neither memory nor one sled value grows
/// with a burst between commits.
pub const JOURNAL_BLOCK_MAX_BYTES: usize = 64 * 1024;
const META_RAW_DURABLE_BELOW: &[u8] = b"raw_durable_below";
const META_JOURNAL_COVERED_BELOW: &[u8] = b"journal_covered_below";

fn read_mark(meta: &sled::Tree, key: &[u8]) -> sled::Result<u64> {
    Ok(meta
        .get(key)?
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// The pipeline task's state.
pub struct Pipeline {
    agent_id: String,
    stage: AggregationStage,
    buffer: DiskBuffer,
    state_path: PathBuf,
    state_db: sled::Db,
    journal: sled::Tree,
    meta: sled::Tree,
    time_policies: Vec<TimePolicy>,
    journal_all: Vec<bool>,
    source_metrics: Vec<Arc<SourceMetrics>>,
    metrics: Arc<Metrics>,
    next_journal_seq: u64,
    /// Key of the oldest journal block still stored (every block below it is deleted).
    journal_low: u64,
    journal_dirty: bool,
    /// Readings journaled since the last block was written: consecutive sequence numbers
    /// from `journal_block_first`, delta-encoded (`journal_block`).
    journal_block: journal_block::BlockWriter,
    journal_block_first: u64,
    /// A journal block could not be written: the next commit must not acknowledge.
    journal_write_failed: bool,
    /// Readings in stored journal blocks and the pending block (the metric, kept here so
    /// no commit has to count the tree).
    journal_readings: u64,
    /// The marks last written to the meta tree (rewritten only when they change, so an
    /// idle commit leaves the state database clean).
    written_marks: (u64, u64),
    pending_acks: Vec<oneshot::Sender<()>>,
    cut: Vec<CutBatch>,
    commit_interval: Duration,
    shipper: Option<crate::ship::ShipperHandle>,
    /// QoS 1 messages committed and not yet acknowledged (`source::broker::redelivery`).
    redelivery: Option<Arc<crate::source::broker::redelivery::RedeliveryLog>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Pipeline")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Opens the state database, builds the stage for `config.sources` and replays the
    /// journal left by a previous run. Returns the pipeline and how many readings it replayed.
    pub fn open(
        config: &AgentConfig,
        buffer: DiskBuffer,
        metrics: Arc<Metrics>,
    ) -> Result<(Pipeline, u64), RunError> {
        let path = state_path(&config.buffer.path);
        let state_error = |source| RunError::State {
            path: path.clone(),
            source,
        };
        let state_db = crate::sled_open::open(
            &sled::Config::new()
                .path(&path)
                .cache_capacity(config.buffer.state_cache_capacity_bytes),
        )
        .map_err(|source| RunError::StateOpen {
            path: path.clone(),
            source,
        })?;
        let registry = SeriesRegistry::open(state_db.open_tree("series").map_err(state_error)?)?;
        let batches_buffered = buffer.stats(0).batches_buffered;
        if registry.is_empty() && batches_buffered > 0 {
            // Fresh ids would give buffered batches' series the keys of new ones.
            return Err(RunError::RegistryLost {
                state_path: path,
                batches: batches_buffered,
            });
        }
        let journal = state_db.open_tree("journal").map_err(state_error)?;
        let meta = state_db.open_tree("meta").map_err(state_error)?;
        let mut stage = AggregationStage::new(registry, config.batching.cutter());
        let mut time_policies = Vec::new();
        for source in &config.sources {
            stage.add_source(source.aggregation.window_config());
            time_policies.push(source.time);
        }
        let raw_durable_below = read_mark(&meta, META_RAW_DURABLE_BELOW).map_err(state_error)?;
        let covered_below = read_mark(&meta, META_JOURNAL_COVERED_BELOW).map_err(state_error)?;
        let now = now_ms();
        let mut cut = Vec::new();
        let mut replayed = 0u64;
        let mut stored_readings = 0u64;
        // Sequence numbers below either mark may be named by persisted marks: never reuse them.
        let mut next_journal_seq = raw_durable_below.max(covered_below);
        let mut journal_low = NOT_JOURNALED;
        let mut block_readings = Vec::new();
        for entry in journal.iter() {
            let (key, value) = entry.map_err(state_error)?;
            let block_first = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| RunError::JournalCorrupt {
                    journal_seq: format!("{:?}", key.as_ref()),
                    reason: "key is not 8 bytes".to_owned(),
                    path: path.clone(),
                })?;
            journal_block::decode(&value, &mut block_readings).map_err(|defect| {
                RunError::JournalCorrupt {
                    journal_seq: block_first.to_string(),
                    reason: defect.0,
                    path: path.clone(),
                }
            })?;
            let mut journal_seq = block_first;
            for (source, reading) in block_readings.drain(..) {
                stored_readings += 1;
                let this_seq = journal_seq;
                journal_seq = journal_seq.saturating_add(1);
                if this_seq < covered_below {
                    // Already in durable batches; the block is only partly covered.
                    continue;
                }
                if source >= config.sources.len() {
                    tracing::warn!(journal_seq = this_seq, source, "journaled reading names a source that is no longer configured; replaying it into source 0");
                }
                let source = if source < config.sources.len() {
                    source
                } else {
                    0
                };
                stage.replay(
                    source,
                    reading,
                    this_seq,
                    this_seq >= raw_durable_below,
                    now,
                    &mut cut,
                );
                replayed += 1;
            }
            journal_low = journal_low.min(block_first);
            next_journal_seq = next_journal_seq.max(journal_seq);
        }
        if replayed > 0 {
            tracing::info!(
                replayed,
                "replayed the acknowledgement journal of the previous run into the windows"
            );
        }
        let source_metrics = metrics.sources.clone();
        let commit_interval =
            Duration::from_millis(config.buffer.group_commit_interval_ms.clamp(1, 1000));
        metrics
            .pipeline
            .journal_entries
            .store(stored_readings, Ordering::Relaxed);
        let pipeline = Pipeline {
            agent_id: config.agent_id.clone(),
            stage,
            buffer,
            state_path: path,
            state_db,
            journal,
            meta,
            time_policies,
            journal_all: config
                .sources
                .iter()
                .map(|source| source.journal_all_readings)
                .collect(),
            source_metrics,
            metrics,
            next_journal_seq,
            journal_low: journal_low.min(next_journal_seq),
            journal_dirty: stored_readings > 0,
            journal_block: journal_block::BlockWriter::new(),
            journal_block_first: next_journal_seq,
            journal_write_failed: false,
            journal_readings: stored_readings,
            written_marks: (raw_durable_below, covered_below),
            pending_acks: Vec::new(),
            cut,
            commit_interval,
            shipper: None,
            redelivery: None,
        };
        Ok((pipeline, replayed))
    }

    /// The agent's state database (the embedded brokers keep their sessions in it).
    pub fn state_database(&self) -> sled::Db {
        self.state_db.clone()
    }

    /// Records the QoS 1 messages of each commit in `log` (loading the previous run's records
    /// against this journal), so their redeliveries are not ingested twice.
    pub fn set_redelivery(
        &mut self,
        log: Arc<crate::source::broker::redelivery::RedeliveryLog>,
    ) -> sled::Result<usize> {
        let loaded = log.load(self.next_journal_seq)?;
        self.redelivery = Some(log);
        Ok(loaded)
    }

    /// Wakes `shipper` after every commit that appended batches (live data goes out at once).
    pub fn set_shipper(&mut self, shipper: crate::ship::ShipperHandle) {
        self.shipper = Some(shipper);
    }

    pub fn stage(&self) -> &AggregationStage {
        &self.stage
    }

    /// Read access to the series registry for the shipper, which attaches definitions to
    /// batches buffered without them.
    pub fn registry_reader(&self) -> Option<crate::aggregate::RegistryReader> {
        self.stage.registry().reader()
    }

    /// Takes one message's readings.
    pub fn ingest(&mut self, input: PipelineInput, now_ms: i64) {
        let policy = self
            .time_policies
            .get(input.source)
            .copied()
            .unwrap_or_default();
        let journaled =
            input.durable.is_some() || self.journal_all.get(input.source).copied().unwrap_or(false);
        if let Some(metrics) = self.source_metrics.get(input.source) {
            metrics
                .readings_in
                .fetch_add(input.readings.len() as u64, Ordering::Relaxed);
        }
        for parsed in input.readings.iter() {
            let (time_ms, flags) = policy.resolve(parsed.time_ms, input.receive_ms);
            let journal_seq = if journaled {
                self.next_journal_seq
            } else {
                NOT_JOURNALED
            };
            match self.stage.observe(
                input.source,
                parsed.key,
                time_ms,
                parsed.value,
                flags,
                journal_seq,
                now_ms,
                &mut self.cut,
            ) {
                Ok(series) => {
                    if journaled {
                        let reading = Reading {
                            series,
                            time_ms,
                            value: parsed.value,
                            flags,
                        };
                        if self.journal_block.is_empty() {
                            self.journal_block_first = journal_seq;
                        }
                        self.journal_block.push(input.source, &reading);
                        self.journal_readings += 1;
                        self.next_journal_seq += 1;
                        self.journal_dirty = true;
                        if self.journal_block.len_bytes() >= JOURNAL_BLOCK_MAX_BYTES {
                            self.write_journal_block();
                        }
                    }
                }
                Err(error) => {
                    if let Some(metrics) = self.source_metrics.get(input.source) {
                        metrics.reject("series_registry", &error);
                    }
                }
            }
        }
        if let Some(durable) = input.durable {
            if let Some(log) = &self.redelivery {
                log.ingested(input.source, self.next_journal_seq);
            }
            self.pending_acks.push(durable);
        }
    }

    /// Stores the pending journal block as one tree entry (made durable by the commit's
    /// state flush).
    fn write_journal_block(&mut self) {
        if let Some(log) = &self.redelivery {
            log.write_pending(); // Before the block: durable with it or before it.
        }
        // New series ids before the block that uses them (and before any batch).
        if let Err(error) = self.stage.registry().write_pending() {
            tracing::error!(%error, "cannot store new series ids; not acknowledging");
            self.journal_write_failed = true;
            return; // The block waits for its ids.
        }
        if self.journal_block.is_empty() {
            return;
        }
        let block = self.journal_block.take();
        if let Err(error) = self
            .journal
            .insert(self.journal_block_first.to_be_bytes(), block)
        {
            tracing::error!(%error, path = %self.state_path.display(), "cannot write the acknowledgement journal; not acknowledging");
            self.journal_write_failed = true;
        }
        self.journal_block_first = self.next_journal_seq;
    }

    fn has_work(&self) -> bool {
        !self.cut.is_empty() || !self.pending_acks.is_empty() || self.journal_dirty
    }

    /// One tick of the run loop at `now_ms`: closes idle windows, cuts batches due by age,
    /// and commits if anything is waiting (batches, acknowledgements, journal entries).
    pub async fn tick(&mut self, now_ms: i64) {
        self.stage.poll(now_ms, &mut self.cut);
        if self.has_work() {
            self.commit(now_ms).await;
        }
    }

    /// Flushes state, appends cut batches, flushes the buffer, releases acknowledgements,
    /// truncates the journal. On any failure nothing is acknowledged (the broker redelivers).
    pub async fn commit(&mut self, now_ms: i64) {
        let metrics = Arc::clone(&self.metrics);
        let pipeline = &metrics.pipeline;
        self.write_journal_block();
        // Before any append: the batches below rely on the registry for their definitions.
        let state_flushed = self.state_db.flush_async().await;
        let registry = self.stage.registry();
        let include_definitions =
            state_flushed.is_err() || !registry.is_persistent() || registry.has_unstored();
        let appended_any = !self.cut.is_empty();
        for cut in std::mem::take(&mut self.cut) {
            let class = cut.class;
            let batch_seq = match self.buffer.allocate_seq() {
                Ok(batch_seq) => batch_seq,
                Err(error) => {
                    pipeline.append_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%error, "cannot allocate a batch sequence number; batch lost");
                    self.pending_acks.clear();
                    continue;
                }
            };
            let (bytes, info) =
                self.stage
                    .encode(cut, &self.agent_id, batch_seq, now_ms, include_definitions);
            match self.buffer.append(batch_seq, info, &bytes) {
                Ok(receipt) => {
                    if !receipt.stored {
                        // The overflow policy dropped this raw batch itself (the buffer is
                        // full of summaries) and counted it in dropped_*_raw. It is not
                        // buffered, so the shipper never sees it; its seq stays a gap.
                        tracing::debug!(
                            batch_seq,
                            "buffer full of summaries: the new raw batch was dropped by policy"
                        );
                    }
                    let counter = if class == BatchClass::Raw {
                        &pipeline.batches_appended_raw
                    } else {
                        &pipeline.batches_appended_summary
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    pipeline
                        .bytes_appended
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                Err(error) => {
                    pipeline.append_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%error, batch_seq, "the buffer refused a batch");
                }
            }
        }
        let buffer_flushed = self.buffer.flush_async().await;
        pipeline.commits.fetch_add(1, Ordering::Relaxed);
        let journal_failed = std::mem::take(&mut self.journal_write_failed);
        let durable = match (&state_flushed, &buffer_flushed) {
            _ if journal_failed => false,
            (Ok(_), Ok(Durability::Durable | Durability::Deferred)) => true,
            (Err(error), _) => {
                tracing::error!(%error, path = %self.state_path.display(), "flushing the agent state failed; not acknowledging");
                false
            }
            (_, Err(error)) => {
                tracing::error!(%error, "flushing the buffer failed; not acknowledging");
                false
            }
            (_, Ok(Durability::MemoryOnly)) => {
                tracing::warn!(
                    "the buffer is memory-only; holding acknowledgements until the disk is back"
                );
                false
            }
        };
        if !durable {
            pipeline.commit_errors.fetch_add(1, Ordering::Relaxed);
            if let Some(log) = self.redelivery.as_ref().filter(|_| journal_failed) {
                log.commit_failed();
            }
            if journal_failed || !matches!(buffer_flushed, Ok(Durability::MemoryOnly)) {
                self.pending_acks.clear();
            }
            return;
        }
        if appended_any {
            if let Some(shipper) = &self.shipper {
                shipper.wake();
            }
        }
        let released = self.pending_acks.len() as u64;
        if let Some(log) = &self.redelivery {
            log.committed(released);
        }
        for durable in self.pending_acks.drain(..) {
            let _ = durable.send(());
        }
        pipeline.acks_sent.fetch_add(released, Ordering::Relaxed);
        self.truncate_journal();
        self.journal_dirty = false;
        let (open, late) = self.stage.window_counts();
        pipeline.open_windows.store(open, Ordering::Relaxed);
        pipeline.late_readings.store(late, Ordering::Relaxed);
        let (tracked, evicted) = self.stage.series_state_counts();
        pipeline.series_tracked.store(tracked, Ordering::Relaxed);
        pipeline.series_evicted.store(evicted, Ordering::Relaxed);
        pipeline
            .series
            .store(self.stage.registry().len() as u64, Ordering::Relaxed);
    }

    fn truncate_journal(&mut self) {
        let covered_below = self
            .stage
            .min_unfinished_journal_seq()
            .min(self.next_journal_seq);
        if covered_below > self.journal_low {
            let mut removed = 0u64;
            let mut next_low = covered_below;
            for entry in self
                .journal
                .range(self.journal_low.to_be_bytes()..covered_below.to_be_bytes())
            {
                let (key, value) = match entry {
                    Ok(entry) => entry,
                    Err(error) => {
                        tracing::error!(%error, "cannot read the acknowledgement journal to truncate it; will retry");
                        next_low = self.journal_low;
                        break;
                    }
                };
                let Ok(key_bytes) = <[u8; 8]>::try_from(key.as_ref()) else {
                    continue; // A damaged key is reported when the journal is next replayed.
                };
                let block_first = u64::from_be_bytes(key_bytes);
                let Some(readings) = journal_block::reading_count(&value) else {
                    continue; // A damaged block is reported when the journal is next replayed.
                };
                if block_first.saturating_add(readings) > covered_below {
                    // Partly covered: kept; replay skips its covered readings by the mark.
                    next_low = block_first;
                    break;
                }
                if let Err(error) = self.journal.remove(key) {
                    tracing::error!(%error, "cannot truncate the acknowledgement journal; will retry");
                    next_low = block_first;
                    break;
                }
                removed += readings;
            }
            self.journal_low = next_low;
            self.journal_readings = self.journal_readings.saturating_sub(removed);
        }
        let raw_durable_below = self
            .stage
            .min_pending_raw_journal_seq()
            .min(self.next_journal_seq);
        let marks = (raw_durable_below, covered_below);
        if marks != self.written_marks {
            let written = self
                .meta
                .insert(META_RAW_DURABLE_BELOW, &raw_durable_below.to_be_bytes())
                .and_then(|_| {
                    self.meta
                        .insert(META_JOURNAL_COVERED_BELOW, &covered_below.to_be_bytes())
                });
            match written {
                Ok(_) => self.written_marks = marks,
                Err(error) => tracing::error!(%error, "cannot record the journal marks"),
            }
        }
        self.metrics
            .pipeline
            .journal_entries
            .store(self.journal_readings, Ordering::Relaxed);
    }

    /// Runs until every sender of `inputs` is gone, then closes all windows and commits.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<PipelineInput>) {
        let mut ticker = tokio::time::interval(self.commit_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(input) => {
                        let now = now_ms();
                        self.ingest(input, now);
                        // Drain what is already queued before the next tick, without waiting.
                        while let Ok(input) = inputs.try_recv() {
                            self.ingest(input, now);
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => self.tick(now_ms()).await,
            }
        }
        let now = now_ms();
        self.stage.close_all(now, &mut self.cut);
        self.commit(now).await;
        tracing::info!("pipeline stopped: windows closed, buffer flushed");
    }
}

/// Runs the whole agent until `shutdown` is cancelled.
pub async fn run_agent(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let buffer = DiskBuffer::open(buffer_config(&config.buffer))?;
    let source_metrics: Vec<Arc<SourceMetrics>> = config
        .sources
        .iter()
        .map(|source| {
            let kind = match source.kind() {
                Some(SourceKind::MqttSubscribe(_)) => "mqtt_subscribe",
                Some(SourceKind::MqttBroker(_)) => "mqtt_broker",
                Some(SourceKind::Serial(_)) => "serial",
                None => "none",
            };
            Arc::new(SourceMetrics::new(&source.name, kind))
        })
        .collect();
    let metrics = Arc::new(Metrics::new(source_metrics.clone()));
    let (mut pipeline, _) = Pipeline::open(&config, buffer.clone(), Arc::clone(&metrics))?;
    let mut shipper = crate::ship::Shipper::new(ship_config(&config)?, buffer.clone())
        .context("cannot set up shipping to the collector (check the [collector] section)")?;
    if let Some(registry) = pipeline.registry_reader() {
        shipper.set_registry(registry);
    }
    let shipper_handle = shipper.handle();
    pipeline.set_shipper(shipper_handle.clone());
    let shipper_task = tokio::spawn(async move {
        if let Err(error) = shipper.run().await {
            tracing::error!(%error, "shipping stopped for good; batches keep buffering until the problem is fixed and the agent restarted");
        }
    });
    let (sender, receiver) = mpsc::channel::<PipelineInput>(4096);
    // The embedded brokers keep their persistent-session client ids in the state database.
    let state_db = pipeline.state_database();
    let redelivery = crate::source::broker::redelivery::RedeliveryLog::open(
        &state_db,
        config.sources.iter().map(|source| source.name.clone()).collect(),
    )
    .map(Arc::new)
    .and_then(|log| pipeline.set_redelivery(Arc::clone(&log)).map(|_| log))
    .map_err(|error| tracing::warn!(%error, "cannot open the redelivery records; a crash before PUBACKs may count messages twice"))
    .ok();
    let pipeline_task = tokio::spawn(pipeline.run(receiver));

    let sources_stop = CancellationToken::new();
    let mut source_tasks = Vec::new();
    for (index, source) in config.sources.iter().enumerate() {
        let source_metrics = Arc::clone(&source_metrics[index]);
        let sender = sender.clone();
        let stop = sources_stop.clone();
        match source.kind() {
            Some(SourceKind::MqttSubscribe(mqtt)) => {
                let router =
                    crate::config::topic_router(&mqtt.topics).map_err(anyhow::Error::msg)?;
                source_tasks.push(tokio::spawn(crate::source::mqtt::run_subscribe(
                    index,
                    mqtt.clone(),
                    router,
                    source_metrics,
                    sender,
                    redelivery.clone(),
                    stop,
                )));
            }
            Some(SourceKind::Serial(serial)) => {
                source_tasks.push(tokio::spawn(crate::source::serial::run_serial(
                    index,
                    serial.clone(),
                    source_metrics,
                    sender,
                    stop,
                )));
            }
            Some(SourceKind::MqttBroker(broker)) => {
                let router =
                    crate::config::topic_router(&broker.topics).map_err(anyhow::Error::msg)?;
                let settings = broker.settings().map_err(anyhow::Error::msg)?;
                let listener = crate::source::broker::bind(&broker.listen_address)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen for MQTT clients on {} (sources[{index}].mqtt_broker.listen_address); is another broker using the port?",
                            broker.listen_address
                        )
                    })?;
                source_tasks.push(tokio::spawn(crate::source::broker::run_broker(
                    index,
                    listener,
                    settings,
                    router,
                    source_metrics,
                    sender,
                    crate::source::broker::SessionStore::open(&state_db, &source.name)
                        .map_err(|error| tracing::warn!(%error, "cannot open the broker session store; persistent sessions last one run"))
                        .ok(),
                    redelivery.clone(),
                    stop,
                )));
            }
            None => {}
        }
    }
    drop(sender);

    let metrics_stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(&config.metrics.listen_address)
        .await
        .with_context(|| format!("cannot listen for /metrics on {} (metrics.listen_address); is another agent running?", config.metrics.listen_address))?;
    tracing::info!(address = %config.metrics.listen_address, "serving /metrics");
    let render_metrics = Arc::clone(&metrics);
    let render_buffer = buffer.clone();
    let ship_stats = Arc::clone(shipper_handle.stats());
    let render_redelivery = redelivery.clone();
    let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
        let mut text = render_metrics.render(
            &render_buffer.stats(now_ms()),
            &render_ship_stats(&ship_stats),
        );
        if let Some(log) = &render_redelivery {
            text.push_str(&log.render());
        }
        text
    });
    let metrics_task = tokio::spawn(crate::metrics::serve(
        listener,
        render,
        metrics_stop.clone(),
    ));

    shutdown.cancelled().await;
    tracing::info!("shutting down: stopping sources, closing windows, flushing the buffer");
    sources_stop.cancel();
    for task in source_tasks {
        // A source that does not stop in time must not keep the windows from closing.
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            tracing::warn!("a source did not stop within 5 s; aborting it");
            abort.abort();
        }
    }
    let _ = pipeline_task.await;
    if let Some(log) = &redelivery {
        // The records of messages acknowledged since the last commit go now, not at the
        // next start (where a stale record could be taken for a resend).
        log.write_pending();
        if let Err(error) = state_db.flush_async().await {
            tracing::warn!(%error, "cannot flush the redelivery records at shutdown");
        }
    }
    shipper_handle.stop();
    if tokio::time::timeout(Duration::from_secs(5), shipper_task)
        .await
        .is_err()
    {
        tracing::warn!("the shipper did not stop within 5 s");
    }
    metrics_stop.cancel();
    let _ = metrics_task.await;
    buffer.flush()?;
    Ok(())
}

/// The shipper's settings from the `[collector]` section.
pub fn ship_config(config: &AgentConfig) -> anyhow::Result<crate::ship::ShipConfig> {
    use anyhow::Context as _;
    let collector = &config.collector;
    let token = match (&collector.token, &collector.token_file) {
        (Some(token), _) => token.0.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read collector.token_file {}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => String::new(),
    };
    Ok(crate::ship::ShipConfig {
        collector_address: collector.address.clone(),
        server_name: collector.effective_server_name().to_owned(),
        agent_id: config.agent_id.clone(),
        token,
        server_fingerprint_sha256: collector.cert_fingerprint_sha256.clone(),
        ca_file: collector.ca_file.clone(),
        max_in_flight_batches: collector.max_batches_in_flight,
        backlog_max_bytes_per_second: collector.backlog_max_bytes_per_s,
        ..crate::ship::ShipConfig::default()
    })
}

fn render_ship_stats(stats: &crate::ship::ShipStats) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let counters = [
        (
            "tributary_agent_ship_sessions_total",
            "counter",
            stats.sessions.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_reconnects_total",
            "counter",
            stats.reconnects.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_connect_failures_total",
            "counter",
            stats.connect_failures.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_batches_sent_total",
            "counter",
            stats.batches_sent.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_bytes_sent_total",
            "counter",
            stats.bytes_sent.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_raw_bytes_sent_total",
            "counter",
            stats.raw_bytes_sent.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_summary_bytes_sent_total",
            "counter",
            stats.summary_bytes_sent.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_definition_bytes_sent_total",
            "counter",
            stats.definition_bytes_sent.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_batches_acked_total",
            "counter",
            stats.batches_acked.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_nacks_retryable_total",
            "counter",
            stats.nacks_retryable.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_dead_lettered_total",
            "counter",
            stats.dead_lettered.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_stream_failures_total",
            "counter",
            stats.stream_failures.load(Ordering::Relaxed),
        ),
        (
            "tributary_agent_ship_connected",
            "gauge",
            u64::from(stats.connected.load(Ordering::Relaxed)),
        ),
        (
            "tributary_agent_ship_rtt_ms",
            "gauge",
            stats.rtt_ms.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, value) in counters {
        let _ = writeln!(text, "# TYPE {name} {kind}\n{name} {value}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ParsedReading;
    use std::time::Instant;
    use tributary_protocol::model::SeriesKey;

    const T0_MS: i64 = 1_764_284_000_000;

    fn config(directory: &Path) -> AgentConfig {
        let text = format!(
            r#"
agent_id = "gw-blocks"
[collector]
address = "127.0.0.1:9"
token = "t"
cert_fingerprint_sha256 = "5E:9B:0C:21:7A:44:13:C8:F0:2D:6B:93:AA:10:7E:55:C4:21:08:3F:9D:6A:E2:71:B0:4C:58:13:2E:9F:07:D6"
[buffer]
path = "{}"
[[sources]]
name = "broker"
[sources.mqtt_subscribe]
broker_address = "127.0.0.1:1883"
client_id = "x"
[[sources.mqtt_subscribe.topics]]
template = "d/{{device}}/{{metric}}"
[sources.aggregation]
window_ms = 1000
raw = {{ policy = "none" }}
"#,
            directory.join("buffer").display()
        );
        AgentConfig::from_toml_str_validated(&text, "test").expect("valid config")
    }

    /// Opens buffer and pipeline, retrying while sled still holds the previous run's lock.
    fn open(config: &AgentConfig) -> (Pipeline, u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = Arc::new(Metrics::new(vec![Arc::new(SourceMetrics::new(
                "broker",
                "mqtt_subscribe",
            ))]));
            let attempt = DiskBuffer::open(buffer_config(&config.buffer))
                .map_err(|error| error.to_string())
                .and_then(|buffer| {
                    Pipeline::open(config, buffer, metrics).map_err(|error| error.to_string())
                });
            match attempt {
                Ok(opened) => return opened,
                Err(error) => {
                    assert!(Instant::now() < deadline, "cannot reopen: {error}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn acknowledged(time_ms: i64, value: f64) -> PipelineInput {
        let (sender, _receiver) = oneshot::channel();
        PipelineInput {
            source: 0,
            readings: vec![ParsedReading {
                key: SeriesKey::new("dev-1", "temp"),
                time_ms: Some(time_ms),
                value,
            }]
            .into(),
            receive_ms: T0_MS,
            durable: Some(sender),
        }
    }

    /// One journal block, part of it in a window that became a durable summary and part
    /// in a window still open: the block stays, and a restart replays only the open part.
    #[tokio::test]
    async fn a_partly_covered_block_replays_only_its_uncovered_readings() {
        let directory = tempfile::tempdir().expect("tempdir");
        let config = config(directory.path());
        {
            let (mut pipeline, replayed) = open(&config);
            assert_eq!(replayed, 0);
            pipeline.ingest(acknowledged(T0_MS + 10, 1.0), T0_MS);
            pipeline.ingest(acknowledged(T0_MS + 20, 2.0), T0_MS);
            // Far later: the watermark closes the first window; this one stays open.
            pipeline.ingest(acknowledged(T0_MS + 5_000, 3.0), T0_MS);
            // Past the batch age: the summary is cut and committed with the block.
            pipeline.tick(T0_MS + 2_000).await;
            assert_eq!(
                pipeline.stage().min_unfinished_journal_seq(),
                2,
                "journal seqs 0 and 1 are in a durable summary"
            );
            assert_eq!(
                pipeline.journal.len(),
                1,
                "one block for the three readings"
            );
            // Crash: dropped without closing the open window.
        }
        let (mut pipeline, replayed) = open(&config);
        assert_eq!(replayed, 1, "only the open window's reading comes back");
        assert_eq!(pipeline.stage().window_counts().0, 1);
        // New readings never reuse a sequence number of the kept block.
        pipeline.ingest(acknowledged(T0_MS + 5_100, 4.0), T0_MS);
        assert_eq!(pipeline.next_journal_seq, 4);
    }

    /// A journal block written by an older build (23 bytes a reading, no header) replays
    /// after an upgrade, and is deleted once its readings are in a durable summary.
    #[tokio::test]
    async fn a_journal_block_of_the_first_format_replays_and_is_truncated() {
        let directory = tempfile::tempdir().expect("tempdir");
        let config = config(directory.path());
        {
            let (mut pipeline, _) = open(&config);
            // Registers the series (id 0) and commits its block.
            pipeline.ingest(acknowledged(T0_MS + 10, 1.0), T0_MS);
            pipeline.tick(T0_MS + 100).await;
            assert_eq!(pipeline.journal.len(), 1);
            // The same reading and one more, as the first format stored them.
            let legacy = journal_block::legacy_block(
                &[(T0_MS + 10, 1.0f64), (T0_MS + 20, 2.0)].map(|(time_ms, value)| {
                    let reading = Reading {
                        series: 0,
                        time_ms,
                        value,
                        flags: 0,
                    };
                    (0, reading)
                }),
            );
            assert_eq!(legacy.len(), 2 * journal_block::LEGACY_READING_BYTES);
            pipeline
                .journal
                .insert(0u64.to_be_bytes(), legacy)
                .expect("insert");
            pipeline.state_db.flush().expect("flush");
            // Crash.
        }
        let (mut pipeline, replayed) = open(&config);
        assert_eq!(replayed, 2, "both readings of the old block come back");
        assert_eq!(pipeline.next_journal_seq, 2);
        // Far later: the watermark closes the window; its summary is cut and committed.
        pipeline.ingest(acknowledged(T0_MS + 5_000, 3.0), T0_MS);
        pipeline.tick(T0_MS + 2_000).await;
        assert_eq!(pipeline.stage().min_unfinished_journal_seq(), 2);
        let keys: Vec<u64> = pipeline
            .journal
            .iter()
            .keys()
            .map(|key| u64::from_be_bytes(key.expect("key").as_ref().try_into().expect("8 bytes")))
            .collect();
        assert_eq!(
            keys,
            vec![2],
            "the old block is gone, the open window's block stays"
        );
        assert_eq!(pipeline.journal_readings, 1);
    }
}
