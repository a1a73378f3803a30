//! The consumer loop: log records in, engine output and checkpoints to the store, positions
//! committed after the store made them durable.
//!
//! One task drives every partition this processor owns, with one engine each and one store
//! shared by all (a flush covers every partition's rows and checkpoints at once, so the store
//! sees few large writes). Records come from one [`SourceReader`] over all owned partitions
//! (one wait per round, not one per idle partition) and are dispatched to their partition's
//! engine. The partitions are fixed ([`PartitionAssignment`]) or, with
//! [`PartitionAssignment::Group`], come and go with Kafka consumer-group rebalances: an
//! assigned partition is restored from its checkpoint and read from its offset; a revoked
//! one is checkpointed and flushed before the rebalance completes. The loop reads the wall
//! clock only through the injected [`Clock`], and only for two things outside the engine's
//! log time: ticking caught-up engines (`advance_time`) and the store's batch age.
//!
//! Failure handling, in short: a record that cannot be decoded or that the engine refuses
//! is counted by reason, sampled in the log, and skipped (it can never succeed, and the
//! partition must not stall). A store flush that fails is retried with backoff while
//! consumption pauses (rows stay buffered; the log holds everything after the last
//! checkpoint). A log read that fails is retried with backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tributary_protocol::batch::BatchDecoder;
use tributary_protocol::{Batch, BatchLimits};

use super::assignment::PartitionAssignment;
use super::metrics::{PartitionProgress, PipelineMetrics};
use super::publish::live_batch;
use super::source::{Fetched, RecordSource, SourceReader};
use super::PipelineError;
use crate::live::LiveFeed;
use crate::log::kafka_group::{Assignment, Membership, Revocation};
use crate::log::{Clock, LogError, LogRecord};
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
    /// Consumer name: keys the checkpoints in the store and the log's positions (and is
    /// the Kafka consumer group with [`PartitionAssignment::Group`]).
    pub group: String,
    pub partitions: PartitionAssignment,
    pub start: StartFrom,
    pub until: RunUntil,
    /// Bytes of record values read per partition per round.
    pub max_read_bytes: usize,
    /// How long to wait before polling again when every partition is caught up (a log
    /// whose reader does not wait for records itself: the embedded log).
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
            caught_up_flush_interval_ms: 100,
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
struct Consumer<L: RecordSource, S, C> {
    log: Arc<L>,
    reader: L::Reader,
    store: S,
    clock: C,
    config: ConsumerConfig,
    live: LiveFeed,
    metrics: Arc<PipelineMetrics>,
    shutdown: CancellationToken,
    runs: BTreeMap<u32, PartitionRun>,
    decoder: BatchDecoder,
    out: EngineOutput,
    sampler: SkipSampler,
    last_flush_ms: i64,
    records_processed: u64,
    /// Partitions the log had when last asked (they can grow while the loop runs).
    partition_count: u32,
    /// When to ask the log again whether partitions were added (`None`: they cannot be).
    next_partition_refresh: Option<Instant>,
    /// Log times of the records processed since the last flush, for the
    /// `log_to_stored_seconds` histogram once the flush makes them durable.
    unflushed_log_times_ms: Vec<i64>,
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
    L: RecordSource,
    S: Store + Sync,
    C: Clock,
{
    config.engine.validate()?;
    let mut config = config;
    if config.partitions == PartitionAssignment::Group && config.until == RunUntil::CaughtUp {
        // A replay reads every partition itself; it has no group to share them with.
        tracing::info!("a replay reads every partition: not joining a consumer group");
        config.partitions = PartitionAssignment::All;
    }
    let member = config.partitions == PartitionAssignment::Group;
    // Asked of the log, not taken from `partition_count()`: a Kafka log routes appends over
    // the partitions it had at connect, and the topic may have more by now.
    let partition_count = L::current_partition_count(&log)
        .await
        .unwrap_or_else(|_| log.partition_count())
        .max(log.partition_count());
    let partitions = if member {
        Vec::new()
    } else {
        config.partitions.resolve(partition_count)?
    };
    // A replay reads what the log had at its start; a running processor keeps looking.
    let next_partition_refresh = (config.until == RunUntil::Shutdown)
        .then(|| L::partition_refresh_interval(&log))
        .flatten()
        .map(|interval| Instant::now() + interval);
    let reader = L::open_reader(&log, member.then_some(config.group.as_str()))?;
    let mut consumer = Consumer {
        last_flush_ms: clock.now_ms(),
        log,
        reader,
        store,
        clock,
        config,
        live,
        metrics,
        shutdown,
        runs: BTreeMap::new(),
        decoder: BatchDecoder::new(),
        out: EngineOutput::default(),
        sampler: SkipSampler::default(),
        records_processed: 0,
        partition_count,
        next_partition_refresh,
        unflushed_log_times_ms: Vec::new(),
    };
    for partition in partitions {
        match consumer.open_partition(partition).await? {
            Some(run) => {
                consumer.runs.insert(partition, run);
            }
            None => {
                let report = consumer.report();
                consumer.reader.close().await;
                return Ok(report);
            }
        }
    }
    if !member {
        let positions = consumer.positions();
        consumer.reader.assign(&positions)?;
    }
    consumer.run().await
}

impl<L, S, C> Consumer<L, S, C>
where
    L: RecordSource,
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
                .values()
                .map(|run| (run.partition, run.checkpointed_offset))
                .collect(),
        }
    }

    fn reached_targets(&self) -> bool {
        self.runs
            .values()
            .all(|run| run.next_offset >= run.target_offset)
    }

    /// Where the reader continues each owned partition; with [`RunUntil::CaughtUp`], the
    /// partitions that reached their end are left out.
    fn positions(&self) -> BTreeMap<u32, u64> {
        self.runs
            .values()
            .filter(|run| {
                self.config.until != RunUntil::CaughtUp || run.next_offset < run.target_offset
            })
            .map(|run| (run.partition, run.next_offset))
            .collect()
    }

    /// How long a fetch may wait for records before the loop has work of its own: the next
    /// tick of caught-up engines, or the next flush of a caught-up processor.
    fn max_wait(&self, now_ms: i64, next_tick_ms: i64) -> Duration {
        let mut due_ms = now_ms.saturating_add(1_000);
        if self.runs.values().any(|run| run.caught_up) {
            due_ms = due_ms.min(next_tick_ms);
        }
        if self.runs.values().all(|run| run.caught_up) && self.runs.values().any(|run| run.changed)
        {
            due_ms = due_ms.min(
                self.last_flush_ms
                    .saturating_add(self.config.caught_up_flush_interval_ms),
            );
        }
        Duration::from_millis(due_ms.saturating_sub(now_ms).max(0) as u64)
    }

    /// The group gave this processor partitions: restore each from its checkpoint and
    /// answer with the offsets to read them from. `false` on shutdown while waiting.
    async fn take_partitions(&mut self, assignment: Assignment) -> Result<bool, PipelineError> {
        let mut starts = BTreeMap::new();
        if assignment
            .partitions()
            .iter()
            .any(|partition| *partition >= self.partition_count)
        {
            // The group saw partitions added to the topic before this processor did.
            let log = self.log.clone();
            match self
                .log_call("read the topic's partition count", || {
                    L::current_partition_count(&log)
                })
                .await
            {
                Some(count) => self.partition_count = self.partition_count.max(count),
                None => {
                    assignment.start_at(BTreeMap::new());
                    return Ok(false);
                }
            }
        }
        for partition in assignment.partitions().to_vec() {
            if partition >= self.partition_count {
                tracing::error!(partition, partition_count = self.partition_count, "the group assigned a partition the topic's metadata does not show yet; it is left to the next rebalance");
                continue;
            }
            if let Some(run) = self.runs.get(&partition) {
                starts.insert(partition, run.next_offset);
                continue;
            }
            match self.open_partition(partition).await? {
                Some(run) => {
                    starts.insert(partition, run.next_offset);
                    self.runs.insert(partition, run);
                }
                None => {
                    assignment.start_at(BTreeMap::new());
                    return Ok(false);
                }
            }
        }
        tracing::info!(?starts, "took partitions from the consumer group");
        assignment.start_at(starts);
        Ok(true)
    }

    /// The group takes partitions away: make their results and checkpoints durable, drop
    /// their engines, then let the rebalance complete.
    async fn release_partitions(&mut self, revocation: Revocation) -> Result<(), PipelineError> {
        let revoked: BTreeSet<u32> = revocation.partitions().iter().copied().collect();
        if revoked
            .iter()
            .any(|partition| self.runs.contains_key(partition))
        {
            self.checkpoint_and_flush(false).await?;
        }
        for partition in &revoked {
            if self.runs.remove(partition).is_some() {
                self.metrics.remove_progress(*partition);
            }
        }
        tracing::info!(partitions = ?revoked, lost = revocation.lost(), "released partitions to the consumer group (checkpointed)");
        revocation.done();
        Ok(())
    }

    /// Runs each record through its partition's engine; records of partitions this
    /// processor no longer owns, or below its position, are stale and skipped.
    async fn dispatch(&mut self, records: Vec<LogRecord>) -> Result<(), PipelineError> {
        let fetched: BTreeSet<u32> = records.iter().map(|record| record.partition).collect();
        for record in &records {
            let Some(run) = self.runs.get(&record.partition) else {
                continue;
            };
            if record.offset < run.next_offset {
                continue;
            }
            self.process_record(record)?;
            let now_ms = self.clock.now_ms();
            if self.store.flush_due(now_ms) {
                self.checkpoint_and_flush(false).await?;
            }
        }
        // Caught up: nothing came for the partition and the log's end (refreshed every
        // second) is reached. Only caught-up engines are ticked with the wall clock.
        for run in self.runs.values_mut() {
            run.caught_up =
                !fetched.contains(&run.partition) && run.next_offset >= run.log_next_offset;
        }
        Ok(())
    }

    /// Handles what cut a fetch short. Returns whether shutdown came while backing off.
    async fn read_failed(&mut self, error: LogError, failures: &mut u32) -> bool {
        match error {
            LogError::OffsetOutOfRange {
                partition,
                earliest,
                ..
            } if self
                .runs
                .get(&partition)
                .is_some_and(|run| earliest > run.next_offset) =>
            {
                if let Some(run) = self.runs.get_mut(&partition) {
                    let from_offset = run.next_offset;
                    let lost = earliest - from_offset;
                    self.metrics
                        .records_retained_away
                        .fetch_add(lost, Ordering::Relaxed);
                    tracing::error!(partition, from_offset, earliest, lost, "log retention deleted records before they were processed; continuing at the earliest retained offset");
                    run.next_offset = earliest;
                    run.changed = true;
                }
                if let Err(error) = self.reader.seek(partition, earliest) {
                    tracing::warn!(%error, partition, "cannot move the reader past the retained-away records; retrying");
                }
                false
            }
            LogError::ForeignRecord {
                partition, offset, ..
            } => {
                self.metrics.count_skipped("undecodable");
                tracing::warn!(%error, "skipping a record that was not written by Tributary");
                if let Some(run) = self.runs.get_mut(&partition) {
                    if offset >= run.next_offset {
                        run.next_offset = offset.saturating_add(1);
                        run.changed = true;
                    }
                }
                if let Err(error) = self.reader.seek(partition, offset.saturating_add(1)) {
                    tracing::warn!(%error, partition, "cannot move the reader past a foreign record");
                }
                false
            }
            error => {
                self.metrics.log_errors.fetch_add(1, Ordering::Relaxed);
                let delay_ms = backoff_ms(&self.config, *failures);
                *failures = failures.saturating_add(1);
                tracing::warn!(%error, delay_ms, "durable log read failed; retrying");
                pause(delay_ms, &self.shutdown).await
            }
        }
    }

    async fn run(mut self) -> Result<ConsumerReport, PipelineError> {
        let mut next_tick_ms = i64::MIN;
        let mut next_lag_refresh = Instant::now();
        let mut read_failures: u32 = 0;
        while !self.shutdown.is_cancelled() {
            let max_wait = self.max_wait(self.clock.now_ms(), next_tick_ms);
            let fetched = tokio::select! {
                fetched = self.reader.fetch(self.config.max_read_bytes, max_wait) => fetched,
                _ = self.shutdown.cancelled() => break,
            };
            let read_any;
            match fetched {
                Fetched::Membership(Membership::Assigned(assignment)) => {
                    if !self.take_partitions(assignment).await? {
                        break;
                    }
                    continue;
                }
                Fetched::Membership(Membership::Revoked(revocation)) => {
                    self.release_partitions(revocation).await?;
                    continue;
                }
                Fetched::Records { records, error } => {
                    read_any = !records.is_empty();
                    let assigned_before = self.positions().len();
                    self.dispatch(records).await?;
                    match error {
                        None => read_failures = 0,
                        Some(error) => {
                            if self.read_failed(error, &mut read_failures).await {
                                break;
                            }
                        }
                    }
                    if self.config.until == RunUntil::CaughtUp {
                        let positions = self.positions();
                        if positions.len() < assigned_before {
                            self.reader.assign(&positions)?;
                        }
                    }
                }
            }

            if next_lag_refresh <= Instant::now() {
                next_lag_refresh = Instant::now() + Duration::from_secs(1);
                self.refresh_log_ends().await;
            }
            if self
                .next_partition_refresh
                .is_some_and(|due| due <= Instant::now())
            {
                self.take_added_partitions().await?;
            }

            let now_ms = self.clock.now_ms();
            if now_ms >= next_tick_ms && self.runs.values().any(|run| run.caught_up) {
                next_tick_ms = now_ms.saturating_add(self.config.engine.emit_interval_ms);
                self.tick_caught_up(now_ms)?;
            }
            let caught_up = self.runs.values().all(|run| run.caught_up);
            let changed = self.runs.values().any(|run| run.changed);
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
            if !read_any
                && !self.reader.waits_for_records()
                && pause(self.config.poll_interval_ms, &self.shutdown).await
            {
                break;
            }
        }
        tracing::info!("consumer stopping: flushing results, checkpoints and positions");
        let result = match self.final_tick() {
            Ok(()) => self.checkpoint_and_flush(true).await,
            Err(error) => Err(error),
        };
        let report = self.report();
        // Leave the group only once the results are durable (or the flush gave up).
        self.reader.close().await;
        result.map(|()| report)
    }

    /// Asks the log whether partitions were added (Kafka topics can grow while the processor
    /// runs). With a fixed assignment that selects by rule (`all`, `INDEX/COUNT`), the new
    /// partitions it selects are opened like any other: from their checkpoint if a
    /// processor of this group ever stored one, else from the start of the retained log.
    /// A group member only learns the new count here; the group hands the partitions out
    /// by rebalancing (librdkafka refreshes the topic's metadata as often).
    async fn take_added_partitions(&mut self) -> Result<(), PipelineError> {
        let interval = L::partition_refresh_interval(&self.log).unwrap_or(Duration::from_secs(30));
        self.next_partition_refresh = Some(Instant::now() + interval);
        let count = match L::current_partition_count(&self.log).await {
            Ok(count) => count,
            Err(error) => {
                self.metrics.log_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "cannot ask the log for its partition count; asking again later");
                return Ok(());
            }
        };
        if count <= self.partition_count {
            return Ok(());
        }
        tracing::info!(
            from = self.partition_count,
            to = count,
            "partitions were added to the log"
        );
        self.partition_count = count;
        let selected = match &self.config.partitions {
            PartitionAssignment::All | PartitionAssignment::Share { .. } => {
                self.config.partitions.resolve(count)?
            }
            // A list names its partitions; a group member's come from the group.
            PartitionAssignment::List(_) | PartitionAssignment::Group => return Ok(()),
        };
        let added: Vec<u32> = selected
            .into_iter()
            .filter(|partition| !self.runs.contains_key(partition))
            .collect();
        if added.is_empty() {
            return Ok(());
        }
        let start = std::mem::replace(&mut self.config.start, StartFrom::Checkpoint);
        let mut opened = Ok(());
        for partition in &added {
            match self.open_partition(*partition).await {
                Ok(Some(run)) => {
                    self.runs.insert(*partition, run);
                }
                Ok(None) => break,
                Err(error) => {
                    opened = Err(error);
                    break;
                }
            }
        }
        self.config.start = start;
        opened?;
        tracing::info!(partitions = ?added, "reading partitions added to the log");
        let positions = self.positions();
        self.reader.assign(&positions)?;
        Ok(())
    }

    async fn refresh_log_ends(&mut self) {
        for run in self.runs.values_mut() {
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
        let partitions: Vec<u32> = self.runs.keys().copied().collect();
        for partition in partitions {
            let Some(run) = self.runs.get(&partition) else {
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
                self.tick(partition, now_ms)?;
            }
        }
        Ok(())
    }

    fn tick_caught_up(&mut self, now_ms: i64) -> Result<(), PipelineError> {
        let caught_up: Vec<u32> = self
            .runs
            .values()
            .filter(|run| run.caught_up)
            .map(|run| run.partition)
            .collect();
        for partition in caught_up {
            self.tick(partition, now_ms)?;
        }
        Ok(())
    }

    /// Advances one engine to the wall clock: running emissions, gap timeouts, idle flushes.
    fn tick(&mut self, partition: u32, now_ms: i64) -> Result<(), PipelineError> {
        self.out.clear();
        let Some(run) = self.runs.get_mut(&partition) else {
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
    fn process_record(&mut self, record: &LogRecord) -> Result<(), PipelineError> {
        let now_ms = self.clock.now_ms();
        self.records_processed += 1;
        self.metrics
            .records_processed
            .fetch_add(1, Ordering::Relaxed);
        self.metrics
            .log_to_read_seconds
            .observe_seconds(now_ms.saturating_sub(record.timestamp_ms).max(0) as f64 / 1e3);
        self.unflushed_log_times_ms.push(record.timestamp_ms);
        let Some(run) = self.runs.get_mut(&record.partition) else {
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
        for run in self.runs.values_mut() {
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
            self.unflushed_log_times_ms.clear();
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
        for log_time_ms in self.unflushed_log_times_ms.drain(..) {
            self.metrics.log_to_stored_seconds.observe_seconds(
                self.last_flush_ms.saturating_sub(log_time_ms).max(0) as f64 / 1e3,
            );
        }
        for (partition, next_offset) in &checkpointed {
            if let Some(run) = self.runs.get_mut(partition) {
                run.checkpointed_offset = *next_offset;
                self.metrics.set_progress(*partition, run.progress());
            }
        }
        // A hint for lag tooling: the checkpoint in the store is the truth.
        if !checkpointed.is_empty() {
            if let Err(error) = self.reader.commit(&self.config.group, &checkpointed).await {
                self.metrics.log_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, ?checkpointed, "cannot commit the consumer positions (a hint only; the store's checkpoint is durable)");
            }
        }
        Ok(())
    }
}
