//! The consumer loop: log records in, engine output and checkpoints to the store, positions
//! committed after the store made them durable.
//!
//! One task drives every partition this processor owns, round-robin, with one engine each
//! and one store shared by all (a flush covers every partition's rows and checkpoints at
//! once, so the store sees few large writes). The loop reads the wall clock only through
//! the injected [`Clock`], and only for two things outside the engine's log time: ticking
//! caught-up engines (`advance_time`) and the store's batch age.
//!
//! Failure handling, in short: a record that cannot be decoded or that the engine refuses
//! is counted by reason, sampled in the log, and skipped (it can never succeed, and the
//! partition must not stall). A store flush that fails is retried with backoff while
//! consumption pauses (rows stay buffered; the log holds everything after the last
//! checkpoint). A log read that fails is retried with backoff.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tributary_protocol::batch::BatchDecoder;
use tributary_protocol::{Batch, BatchLimits};

use super::assignment::PartitionAssignment;
use super::metrics::{PartitionProgress, PipelineMetrics};
use super::publish::live_batch;
use super::PipelineError;
use crate::live::LiveFeed;
use crate::log::{Clock, DurableLog, LogError, LogRecord};
use crate::process::{EngineConfig, EngineOutput, IngestOutcome, ProcessError, WindowEngine};
use crate::store::{last_seen_from_batch, raw_rows_from_batch, Checkpoint, Store};

/// Where each partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// From the store's checkpoint of `(group, partition)`, restoring the engine state; a
    /// partition without one starts at the beginning of the retained log.
    #[default]
    Checkpoint,
    /// From this offset in every partition (clamped to the retained range), with a fresh
    /// engine: for replays into new tables.
    Offset(u64),
    /// From the first record at or after this log time in every partition, fresh engine.
    TimeMs(i64),
}

/// When the loop ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunUntil {
    /// Only when the shutdown token is cancelled (a running processor).
    #[default]
    Shutdown,
    /// Once every partition reached the end the log had when the loop started (a replay).
    CaughtUp,
}

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub engine: EngineConfig,
    /// Consumer name: keys the checkpoints in the store and the log's positions.
    pub group: String,
    pub partitions: PartitionAssignment,
    pub start: StartFrom,
    pub until: RunUntil,
    /// Bytes of record values read per partition per round.
    pub max_read_bytes: usize,
    /// How long to wait before polling again when every partition is caught up.
    pub poll_interval_ms: u64,
    /// When caught up, buffered results are flushed at most this often (fresh data for the
    /// dashboard without a flood of small inserts); behind, the store's batch policy rules.
    pub caught_up_flush_interval_ms: i64,
    /// Backoff between retries of a failed store flush or log read, doubling to the max.
    pub retry_initial_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    /// On shutdown, how long to keep retrying the final flush before giving up (nothing is
    /// lost then: the next start resumes from the last durable checkpoint).
    pub shutdown_flush_timeout_ms: u64,
    /// Limits applied when decoding records (they were checked by ingest already; this
    /// keeps a foreign or damaged record from allocating without bound).
    pub batch_limits: BatchLimits,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            group: "tributary-processor".to_string(),
            partitions: PartitionAssignment::All,
            start: StartFrom::Checkpoint,
            until: RunUntil::Shutdown,
            max_read_bytes: 4 << 20,
            poll_interval_ms: 20,
            caught_up_flush_interval_ms: 200,
            retry_initial_delay_ms: 100,
            retry_max_delay_ms: 5_000,
            shutdown_flush_timeout_ms: 30_000,
            batch_limits: BatchLimits::default(),
        }
    }
}

/// What a finished loop did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    pub records_processed: u64,
    /// Next offset per partition, as checkpointed.
    pub next_offsets: BTreeMap<u32, u64>,
}

/// One partition's engine and position.
struct PartitionRun {
    partition: u32,
    engine: WindowEngine,
    next_offset: u64,
    log_next_offset: u64,
    checkpointed_offset: u64,
    /// The end to reach for [`RunUntil::CaughtUp`].
    target_offset: u64,
    caught_up: bool,
    /// State or position changed since the last buffered checkpoint.
    changed: bool,
    /// Log time of the last record processed in this run.
    last_record_ms: Option<i64>,
}

impl PartitionRun {
    fn progress(&self) -> PartitionProgress {
        PartitionProgress {
            next_offset: self.next_offset,
            log_next_offset: self.log_next_offset.max(self.next_offset),
            checkpointed_offset: self.checkpointed_offset,
        }
    }
}

/// Logs at most one sample per reason every 10 s, with how many were not logged.
#[derive(Default)]
struct SkipSampler {
    last_logged: BTreeMap<&'static str, (Instant, u64)>,
}

impl SkipSampler {
    fn skipped(
        &mut self,
        reason: &'static str,
        record: &LogRecord,
        detail: &dyn std::fmt::Display,
    ) {
        let now = Instant::now();
        let entry = self
            .last_logged
            .entry(reason)
            .or_insert((now - Duration::from_secs(3600), 0));
        if now.duration_since(entry.0) >= Duration::from_secs(10) {
            tracing::warn!(
                reason,
                partition = record.partition,
                offset = record.offset,
                agent_id = %record.headers.agent_id,
                batch_seq = record.headers.batch_seq,
                not_logged_since_last_sample = entry.1,
                "skipping a log record the processor cannot use: {detail}"
            );
            *entry = (now, 0);
        } else {
            entry.1 += 1;
        }
    }
}

fn skip_reason(error: &ProcessError) -> &'static str {
    match error {
        ProcessError::UndefinedSeries { .. } => "undefined_series",
        ProcessError::ConflictingSeriesDefinition { .. } => "conflicting_series",
        ProcessError::TooManySeries { .. } => "too_many_series",
        ProcessError::TooManyAgents { .. } => "too_many_agents",
        _ => "other",
    }
}

fn backoff_ms(config: &ConsumerConfig, attempt: u32) -> u64 {
    let factor = 1_u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX);
    config
        .retry_initial_delay_ms
        .saturating_mul(factor)
        .min(config.retry_max_delay_ms)
}

/// Sleeps `delay_ms` unless `shutdown` is cancelled first; returns whether it was.
async fn pause(delay_ms: u64, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => false,
        _ = shutdown.cancelled() => true,
    }
}

/// The loop's working parts, so the steps can be methods.
struct Consumer<L, S, C> {
    log: Arc<L>,
    store: S,
    clock: C,
    config: ConsumerConfig,
    live: LiveFeed,
    metrics: Arc<PipelineMetrics>,
    shutdown: CancellationToken,
    runs: Vec<PartitionRun>,
    decoder: BatchDecoder,
    out: EngineOutput,
    sampler: SkipSampler,
    last_flush_ms: i64,
    records_processed: u64,
}

/// Runs the consumer loop until `shutdown` is cancelled (or, with [`RunUntil::CaughtUp`],
/// until the log's end at start is processed), then flushes, checkpoints and commits.
///
/// Errors are the ones retrying cannot fix (a checkpoint that does not restore, output the
/// store has no table for); everything transient is retried inside.
pub async fn run_consumer<L, S, C>(
    log: Arc<L>,
    store: S,
    clock: C,
    config: ConsumerConfig,
    live: LiveFeed,
    metrics: Arc<PipelineMetrics>,
    shutdown: CancellationToken,
) -> Result<ConsumerReport, PipelineError>
where
    L: DurableLog,
    S: Store + Sync,
    C: Clock,
{
    config.engine.validate()?;
    let partitions = config.partitions.resolve(log.partition_count())?;
    let mut consumer = Consumer {
        last_flush_ms: clock.now_ms(),
        log,
        store,
        clock,
        config,
        live,
        metrics,
        shutdown,
        runs: Vec::with_capacity(partitions.len()),
        decoder: BatchDecoder::new(),
        out: EngineOutput::default(),
        sampler: SkipSampler::default(),
        records_processed: 0,
    };
    for partition in partitions {
        match consumer.open_partition(partition).await? {
            Some(run) => consumer.runs.push(run),
            None => return Ok(consumer.report()),
        }
    }
    consumer.run().await
}

impl<L, S, C> Consumer<L, S, C>
where
    L: DurableLog,
    S: Store + Sync,
    C: Clock,
{
    /// Retries a log call with backoff until it succeeds or shutdown (`None`).
    async fn log_call<T, F, Fut>(&self, what: &str, mut call: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, LogError>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(value) => return Some(value),
                Err(error) => {
                    self.metrics.log_errors.fetch_add(1, Ordering::Relaxed);
                    let delay_ms = backoff_ms(&self.config, attempt);
                    tracing::warn!(%error, delay_ms, "durable log: {what} failed; retrying");
                    attempt += 1;
                    if pause(delay_ms, &self.shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The engine and start offset of one partition; `None` on shutdown while waiting.
    async fn open_partition(
        &mut self,
        partition: u32,
    ) -> Result<Option<PartitionRun>, PipelineError> {
        let log = self.log.clone();
        let Some(range) = self
            .log_call("read the offset range", || log.offset_range(partition))
            .await
        else {
            return Ok(None);
        };
        let (engine, next_offset) = match self.config.start {
            StartFrom::Checkpoint => {
                let mut attempt = 0;
                let checkpoint = loop {
                    match self
                        .store
                        .load_checkpoint(&self.config.group, partition)
                        .await
                    {
                        Ok(checkpoint) => break checkpoint,
                        Err(error) if error.is_transient() => {
                            self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                            let delay_ms = backoff_ms(&self.config, attempt);
                            tracing::warn!(%error, partition, delay_ms, "cannot read the checkpoint yet; retrying");
                            attempt += 1;
                            if pause(delay_ms, &self.shutdown).await {
                                return Ok(None);
                            }
                        }
                        Err(source) => {
                            return Err(PipelineError::LoadCheckpoint {
                                group: self.config.group.clone(),
                                partition,
                                source,
                            })
                        }
                    }
                };
                match checkpoint {
                    Some(checkpoint) => {
                        let engine = WindowEngine::restore(
                            self.config.engine.clone(),
                            &checkpoint.engine_state,
                        )
                        .map_err(|source| PipelineError::Restore {
                            group: self.config.group.clone(),
                            partition,
                            source,
                        })?;
                        tracing::info!(
                            partition,
                            next_offset = checkpoint.next_offset,
                            "resuming from the store's checkpoint"
                        );
                        (engine, checkpoint.next_offset)
                    }
                    None => {
                        tracing::info!(partition, offset = range.earliest, "no checkpoint for this group: starting at the beginning of the retained log");
                        (
                            WindowEngine::new(self.config.engine.clone())?,
                            range.earliest,
                        )
                    }
                }
            }
            StartFrom::Offset(offset) => (
                WindowEngine::new(self.config.engine.clone())?,
                offset.clamp(range.earliest, range.next),
            ),
            StartFrom::TimeMs(time_ms) => {
                let Some(offset) = self
                    .log_call("find the offset for a time", || {
                        log.offset_for_time(partition, time_ms)
                    })
                    .await
                else {
                    return Ok(None);
                };
                (WindowEngine::new(self.config.engine.clone())?, offset)
            }
        };
        let run = PartitionRun {
            partition,
            engine,
            next_offset,
            log_next_offset: range.next,
            checkpointed_offset: next_offset,
            target_offset: range.next,
            caught_up: false,
            changed: false,
            last_record_ms: None,
        };
        self.metrics.set_progress(partition, run.progress());
        Ok(Some(run))
    }

    fn report(&self) -> ConsumerReport {
        ConsumerReport {
            records_processed: self.records_processed,
            next_offsets: self
                .runs
                .iter()
                .map(|run| (run.partition, run.checkpointed_offset))
                .collect(),
        }
    }

    fn reached_targets(&self) -> bool {
        self.runs
            .iter()
            .all(|run| run.next_offset >= run.target_offset)
    }

    async fn run(mut self) -> Result<ConsumerReport, PipelineError> {
        let mut next_tick_ms = i64::MIN;
        let mut next_lag_refresh = Instant::now();
        let mut read_failures: u32 = 0;
        while !self.shutdown.is_cancelled() {
            let mut read_any = false;
            for index in 0..self.runs.len() {
                let (partition, from_offset) = match self.runs.get(index) {
                    Some(run) => (run.partition, run.next_offset),
                    None => continue,
                };
                if self.config.until == RunUntil::CaughtUp
                    && self
                        .runs
                        .get(index)
                        .is_some_and(|run| run.next_offset >= run.target_offset)
                {
                    continue;
                }
                match self
                    .log
                    .read(partition, from_offset, self.config.max_read_bytes)
                    .await
                {
                    Ok(records) => {
                        read_failures = 0;
                        if let Some(run) = self.runs.get_mut(index) {
                            run.caught_up = records.is_empty();
                        }
                        read_any |= !records.is_empty();
                        for record in &records {
                            self.process_record(index, record)?;
                        }
                    }
                    Err(LogError::OffsetOutOfRange { earliest, .. }) if earliest > from_offset => {
                        let lost = earliest - from_offset;
                        self.metrics
                            .records_retained_away
                            .fetch_add(lost, Ordering::Relaxed);
                        tracing::error!(partition, from_offset, earliest, lost, "log retention deleted records before they were processed; continuing at the earliest retained offset");
                        if let Some(run) = self.runs.get_mut(index) {
                            run.next_offset = earliest;
                            run.changed = true;
                        }
                    }
                    Err(error) => {
                        self.metrics.log_errors.fetch_add(1, Ordering::Relaxed);
                        let delay_ms = backoff_ms(&self.config, read_failures);
                        read_failures = read_failures.saturating_add(1);
                        tracing::warn!(%error, partition, delay_ms, "durable log read failed; retrying");
                        if pause(delay_ms, &self.shutdown).await {
                            break;
                        }
                    }
                }
                let now_ms = self.clock.now_ms();
                if self.store.flush_due(now_ms) {
                    self.checkpoint_and_flush(false).await?;
                }
            }

            if next_lag_refresh <= Instant::now() {
                next_lag_refresh = Instant::now() + Duration::from_secs(1);
                self.refresh_log_ends().await;
            }

            let now_ms = self.clock.now_ms();
            if now_ms >= next_tick_ms && self.runs.iter().any(|run| run.caught_up) {
                next_tick_ms = now_ms.saturating_add(self.config.engine.emit_interval_ms);
                self.tick_caught_up(now_ms)?;
            }
            let caught_up = self.runs.iter().all(|run| run.caught_up);
            let changed = self.runs.iter().any(|run| run.changed);
            let quiet_flush_due = caught_up
                && changed
                && now_ms.saturating_sub(self.last_flush_ms)
                    >= self.config.caught_up_flush_interval_ms;
            if self.store.flush_due(now_ms) || quiet_flush_due {
                self.checkpoint_and_flush(false).await?;
            }
            if self.config.until == RunUntil::CaughtUp && self.reached_targets() {
                break;
            }
            if !read_any && pause(self.config.poll_interval_ms, &self.shutdown).await {
                break;
            }
        }
        tracing::info!("consumer stopping: flushing results, checkpoints and positions");
        self.final_tick()?;
        self.checkpoint_and_flush(true).await?;
        Ok(self.report())
    }

    async fn refresh_log_ends(&mut self) {
        for run in &mut self.runs {
            if let Ok(range) = self.log.offset_range(run.partition).await {
                run.log_next_offset = range.next;
            }
            self.metrics.set_progress(run.partition, run.progress());
        }
    }

    /// Before the last flush, caught-up engines emit every window that changed, so the store
    /// ends as fresh as the live feed. At least one emission interval past the partition's last
    /// record, so the engine's own emission schedule cannot hold anything back. Engines still
    /// behind the log are not ticked: the wall clock would judge their backlog.
    fn final_tick(&mut self) -> Result<(), PipelineError> {
        let wall_ms = self.clock.now_ms();
        let emit_interval_ms = self.config.engine.emit_interval_ms;
        for index in 0..self.runs.len() {
            let Some(run) = self.runs.get(index) else {
                continue;
            };
            let caught_up = run.caught_up
                || run.next_offset >= run.log_next_offset
                || (self.config.until == RunUntil::CaughtUp
                    && run.next_offset >= run.target_offset);
            if caught_up {
                let now_ms = run.last_record_ms.map_or(wall_ms, |last_ms| {
                    wall_ms.max(last_ms.saturating_add(emit_interval_ms))
                });
                self.tick(index, now_ms)?;
            }
        }
        Ok(())
    }

    fn tick_caught_up(&mut self, now_ms: i64) -> Result<(), PipelineError> {
        for index in 0..self.runs.len() {
            if self.runs.get(index).is_some_and(|run| run.caught_up) {
                self.tick(index, now_ms)?;
            }
        }
        Ok(())
    }

    /// Advances one engine to the wall clock: running emissions, gap timeouts, idle flushes.
    fn tick(&mut self, index: usize, now_ms: i64) -> Result<(), PipelineError> {
        self.out.clear();
        let Some(run) = self.runs.get_mut(index) else {
            return Ok(());
        };
        run.engine.advance_time(now_ms, &mut self.out);
        if !self.out.results.is_empty() || !self.out.late.is_empty() {
            run.changed = true;
            self.write_output(now_ms, None)?;
        }
        Ok(())
    }

    /// Decodes one record, runs it through its partition's engine, buffers what it produced.
    fn process_record(&mut self, index: usize, record: &LogRecord) -> Result<(), PipelineError> {
        let now_ms = self.clock.now_ms();
        self.records_processed += 1;
        self.metrics
            .records_processed
            .fetch_add(1, Ordering::Relaxed);
        let Some(run) = self.runs.get_mut(index) else {
            return Ok(());
        };
        run.next_offset = record.offset.saturating_add(1);
        run.changed = true;
        run.last_record_ms = Some(record.timestamp_ms);
        let batch = match self
            .decoder
            .decode(&record.value, &self.config.batch_limits)
        {
            Ok(batch) => batch,
            Err(error) => {
                self.metrics.count_skipped("undecodable");
                self.sampler.skipped("undecodable", record, &error);
                return Ok(());
            }
        };
        self.out.clear();
        match run
            .engine
            .ingest_batch(&batch, record.timestamp_ms, &mut self.out)
        {
            Ok(IngestOutcome::Duplicate) => {
                self.metrics
                    .duplicate_batches
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(IngestOutcome::Processed) => {
                self.metrics
                    .readings_processed
                    .fetch_add(batch.readings.len() as u64, Ordering::Relaxed);
                self.metrics
                    .summaries_processed
                    .fetch_add(batch.summaries.len() as u64, Ordering::Relaxed);
                let (raw_rows, _undefined) = raw_rows_from_batch(&batch);
                self.store.write_raw_readings(raw_rows, now_ms);
                self.store
                    .write_last_seen(last_seen_from_batch(&batch, record.timestamp_ms), now_ms);
                self.write_output(record.timestamp_ms, Some(&batch))
            }
            Err(error) => {
                let reason = skip_reason(&error);
                self.metrics.count_skipped(reason);
                self.sampler.skipped(reason, record, &error);
                Ok(())
            }
        }
    }

    /// Buffers the engine's output in the store and pushes it to the live feed.
    fn write_output(
        &mut self,
        produced_ms: i64,
        batch: Option<&Batch>,
    ) -> Result<(), PipelineError> {
        let now_ms = self.clock.now_ms();
        self.store
            .write_window_results(&self.out.results, now_ms)
            .map_err(PipelineError::Store)?;
        self.store.write_late_readings(&self.out.late, now_ms);
        self.metrics
            .results_written
            .fetch_add(self.out.results.len() as u64, Ordering::Relaxed);
        let late_readings: u64 = self
            .out
            .late
            .iter()
            .map(|late| late.item.readings_worth())
            .sum();
        self.metrics
            .readings_late
            .fetch_add(late_readings, Ordering::Relaxed);
        if self.live.listeners() > 0 {
            self.live
                .publish(live_batch(produced_ms, &self.out.results, batch));
        }
        Ok(())
    }

    /// Buffers a checkpoint per changed partition, flushes the store (retrying with backoff
    /// while the store is down), then commits the log positions.
    async fn checkpoint_and_flush(&mut self, shutting_down: bool) -> Result<(), PipelineError> {
        let mut checkpointed = Vec::new();
        let mut open_windows = 0;
        let mut state_bytes = 0;
        for run in &mut self.runs {
            open_windows += run.engine.open_windows();
            if run.changed {
                state_bytes += run.engine.state_bytes();
                self.store.write_checkpoint(Checkpoint {
                    group: self.config.group.clone(),
                    partition: run.partition,
                    next_offset: run.next_offset,
                    engine_state: run.engine.checkpoint(),
                });
                checkpointed.push((run.partition, run.next_offset));
                run.changed = false;
            }
        }
        self.metrics
            .windows_open
            .store(open_windows as u64, Ordering::Relaxed);
        if state_bytes > 0 {
            self.metrics
                .engine_state_bytes
                .store(state_bytes as u64, Ordering::Relaxed);
        }
        if self.store.buffered_rows() == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let mut attempt = 0;
        let mut stop_deadline = shutting_down
            .then(|| Instant::now() + Duration::from_millis(self.config.shutdown_flush_timeout_ms));
        loop {
            match self.store.flush().await {
                Ok(_report) => break,
                Err(error) => {
                    self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    if self.shutdown.is_cancelled() && stop_deadline.is_none() {
                        stop_deadline = Some(
                            Instant::now()
                                + Duration::from_millis(self.config.shutdown_flush_timeout_ms),
                        );
                    }
                    if stop_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                        return Err(PipelineError::UnflushedAtShutdown {
                            buffered_rows: self.store.buffered_rows(),
                            last_error: error.to_string(),
                        });
                    }
                    let delay_ms = backoff_ms(&self.config, attempt);
                    attempt += 1;
                    tracing::warn!(%error, attempt, delay_ms, buffered_rows = self.store.buffered_rows(), "store flush failed; consumption paused, retrying (the log holds the data)");
                    if self.shutdown.is_cancelled() {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    } else {
                        // Cancellation only cuts the wait short; the deadline then ends the retries.
                        pause(delay_ms, &self.shutdown).await;
                    }
                }
            }
        }
        self.metrics
            .observe_flush_seconds(started.elapsed().as_secs_f64());
        self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
        self.last_flush_ms = self.clock.now_ms();
        for (partition, next_offset) in checkpointed {
            if let Some(run) = self.runs.iter_mut().find(|run| run.partition == partition) {
                run.checkpointed_offset = next_offset;
                self.metrics.set_progress(partition, run.progress());
            }
            // A hint for lag tooling: the checkpoint in the store is the truth.
            if let Err(error) = self
                .log
                .commit_position(&self.config.group, partition, next_offset)
                .await
            {
                self.metrics.log_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, partition, next_offset, "cannot commit the consumer position (a hint only; the store's checkpoint is durable)");
            }
        }
        Ok(())
    }
}
