//! The agent's crash-safe, bounded disk buffer.
//!
//! Every encoded batch the agent produces lands here before it is shipped, and leaves
//! only when the collector acknowledged it durably (`ack`). That single rule is what
//! lets a gateway ride out hours offline and reboots without losing data, and it is
//! why the buffer, not the shipper, owns batch sequence numbers: a number is persisted
//! before it is handed out, so it never repeats across restarts and the collector can
//! deduplicate resent batches exactly.
//!
//! The buffer is bounded in bytes. When full it drops the oldest raw batches first,
//! then the oldest summary batches, and counts what it dropped. Raw data never
//! pushes out a summary: a raw batch that would only fit by evicting summaries is
//! itself dropped (counted, and said so in its receipt). When the disk fails (full, read-only) it keeps going on a small
//! memory-only queue with a loud flag, retries the disk periodically and moves the
//! memory entries back once the disk works again. Replay reads entries one at a time,
//! so draining a large backlog does not load it into memory.
//!
//! See `docs/agent-buffer.md` for the design, the fsync policies and the memory bound.

mod config;
mod entry;
mod error;
mod ledger;
mod replay;
mod storage;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

pub use config::{BufferConfig, FsyncPolicy};
pub use entry::{accounted_bytes, BatchClass, BatchHeader, BatchInfo, HEADER_BYTES, KEY_BYTES};
pub use error::{BufferError, EntryDefect};
pub use ledger::{BufferStats, BufferStatsSnapshot};
pub use replay::{BadEntry, Replay, ReplayOrder, StoredBatch};
pub use storage::FaultInjector;

use entry::{decode_header, decode_key, decode_value, encode_value};
use ledger::{Ledger, RoomDecision};
use storage::Storage;

/// How durable appended batches are after a call to [`DiskBuffer::flush`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flushed and fsynced: survives kill -9 and power loss.
    Durable,
    /// The `os` policy: written by sled's background flusher within its interval.
    Deferred,
    /// The disk is unavailable; batches are held in memory only and die with the process.
    MemoryOnly,
}

/// Where an appended batch was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Disk,
    Memory,
}

/// What `append` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    pub batch_seq: u64,
    /// The tier whose overflow policy handled the batch (where it is held, if stored).
    pub tier: Tier,
    /// Older batches dropped by the overflow policy to make room.
    pub dropped_batches: u32,
    /// `false` when the overflow policy dropped this batch itself: a raw batch that
    /// would only fit by evicting summaries. It is counted in `dropped_*_raw`, is not
    /// buffered, will never be replayed, shipped or acked, and its `batch_seq` stays a
    /// gap (sequence numbers never repeat, so nothing reuses it).
    pub stored: bool,
}

/// What `ack` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    Removed,
    /// The disk is unavailable; the removal is applied when it returns, and replay
    /// skips the batch meanwhile.
    Deferred,
    /// No such batch (already acked, or dropped by the overflow policy).
    Unknown,
}

/// Per-class figures of [`DiskBuffer::inspect`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassInspection {
    pub batches: u64,
    pub bytes: u64,
    pub readings: u64,
    pub oldest_seq: Option<u64>,
    pub newest_seq: Option<u64>,
    pub oldest_created_ms: Option<i64>,
    pub newest_created_ms: Option<i64>,
    pub oldest_event_ms: Option<i64>,
    /// Entries whose header could not be decoded (run `verify` for details).
    pub undecodable: u64,
}

impl ClassInspection {
    fn add(&mut self, batch_seq: u64, bytes: u64, header: Option<&BatchHeader>) {
        self.batches += 1;
        self.bytes += bytes;
        self.oldest_seq = Some(self.oldest_seq.map_or(batch_seq, |seq| seq.min(batch_seq)));
        self.newest_seq = Some(self.newest_seq.map_or(batch_seq, |seq| seq.max(batch_seq)));
        let Some(header) = header else {
            self.undecodable += 1;
            return;
        };
        self.readings += u64::from(header.reading_count);
        let created = header.created_ms;
        self.oldest_created_ms = Some(self.oldest_created_ms.map_or(created, |ms| ms.min(created)));
        self.newest_created_ms = Some(self.newest_created_ms.map_or(created, |ms| ms.max(created)));
        let event = header.oldest_event_ms;
        self.oldest_event_ms = Some(self.oldest_event_ms.map_or(event, |ms| ms.min(event)));
    }
}

/// What is buffered: the summary `tributary-agent buffer inspect` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BufferInspection {
    pub raw: ClassInspection,
    pub summary: ClassInspection,
    /// Batches held in memory only because the disk is unavailable (included above).
    pub memory_batches: u64,
    pub memory_only: bool,
    /// The next batch sequence number this buffer would allocate.
    pub next_seq: u64,
}

impl BufferInspection {
    pub fn batches(&self) -> u64 {
        self.raw.batches + self.summary.batches
    }

    pub fn bytes(&self) -> u64 {
        self.raw.bytes + self.summary.bytes
    }

    pub fn oldest_seq(&self) -> Option<u64> {
        [self.raw.oldest_seq, self.summary.oldest_seq]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn newest_seq(&self) -> Option<u64> {
        [self.raw.newest_seq, self.summary.newest_seq]
            .into_iter()
            .flatten()
            .max()
    }

    fn class_mut(&mut self, class: BatchClass) -> &mut ClassInspection {
        match class {
            BatchClass::Raw => &mut self.raw,
            BatchClass::Summary => &mut self.summary,
        }
    }
}

/// The result of [`DiskBuffer::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub entries_checked: u64,
    pub bad_entries: Vec<BadEntry>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.bad_entries.is_empty()
    }
}

struct MemoryEntry {
    class: BatchClass,
    /// Encoded exactly as on disk (header + payload), so moving it back is a plain insert.
    value: Vec<u8>,
}

struct State {
    /// `None` while the disk is unavailable (memory-only mode).
    storage: Option<Storage>,
    disk: Ledger,
    memory: BTreeMap<u64, MemoryEntry>,
    memory_ledger: Ledger,
    /// Acks of disk entries that arrived while the disk was unavailable.
    pending_disk_acks: BTreeSet<u64>,
    next_seq: u64,
    seq_reserved: u64,
    next_retry_ms: i64,
    /// The latest time the caller told us about (batch creation times, retry calls).
    last_now_ms: i64,
}

struct Inner {
    config: BufferConfig,
    faults: FaultInjector,
    stats: BufferStats,
    state: Mutex<State>,
}

/// The disk buffer. Cheap to clone; clones share one buffer, so the sources can
/// append while the shipper replays and acks.
#[derive(Clone)]
pub struct DiskBuffer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DiskBuffer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DiskBuffer")
            .field("path", &self.inner.config.path)
            .finish_non_exhaustive()
    }
}

impl DiskBuffer {
    /// Opens (or creates) the buffer at `config.path`, counting what is already there.
    /// The count reads every entry once (memory stays bounded by sled's cache).
    pub fn open(config: BufferConfig) -> Result<DiskBuffer, BufferError> {
        Self::open_with_faults(config, FaultInjector::default())
    }

    /// Like [`DiskBuffer::open`], with a fault hook that tests use to make the disk fail.
    pub fn open_with_faults(
        config: BufferConfig,
        faults: FaultInjector,
    ) -> Result<DiskBuffer, BufferError> {
        let open_error = |source| BufferError::Open {
            path: config.path.clone(),
            source,
        };
        let storage = Storage::open(&config, &faults).map_err(open_error)?;
        let disk = count_entries(&storage).map_err(open_error)?;
        let seq_reserved = storage.seq_reserved().map_err(open_error)?;
        let mut highest_stored: Option<u64> = None;
        for class in BatchClass::ALL {
            let last = storage.tree(class).last().map_err(open_error)?;
            if let Some(seq) = last.and_then(|(key, _)| decode_key(&key)) {
                highest_stored = Some(highest_stored.map_or(seq, |highest| highest.max(seq)));
            }
        }
        let next_seq =
            highest_stored.map_or(seq_reserved, |seq| seq_reserved.max(seq.saturating_add(1)));
        let state = State {
            storage: Some(storage),
            disk,
            memory: BTreeMap::new(),
            memory_ledger: Ledger::default(),
            pending_disk_acks: BTreeSet::new(),
            next_seq,
            seq_reserved: next_seq,
            next_retry_ms: i64::MIN,
            last_now_ms: i64::MIN,
        };
        let buffer = DiskBuffer {
            inner: Arc::new(Inner {
                config,
                faults,
                stats: BufferStats::new(),
                state: Mutex::new(state),
            }),
        };
        buffer.publish(&buffer.lock());
        Ok(buffer)
    }

    pub fn config(&self) -> &BufferConfig {
        &self.inner.config
    }

    /// The fault hook this buffer was opened with.
    pub fn faults(&self) -> &FaultInjector {
        &self.inner.faults
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state worse than a crash
        // would, and the buffer must keep working: take the state as it is.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands out the next batch sequence number. Numbers are reserved on disk in
    /// blocks before use, so they increase monotonically and never repeat, even after
    /// a crash. Fails only if a new block is needed while the disk is unavailable.
    pub fn allocate_seq(&self) -> Result<u64, BufferError> {
        let mut state = self.lock();
        if state.next_seq >= state.seq_reserved {
            let reserve_through = state
                .next_seq
                .saturating_add(self.inner.config.seq_block_size.max(1));
            let result = match &state.storage {
                Some(storage) => storage
                    .reserve_seq(reserve_through)
                    .map_err(|error| error.to_string()),
                None => Err("running memory-only after a storage error".to_string()),
            };
            if let Err(reason) = result {
                if state.storage.is_some() {
                    let now_ms = state.last_now_ms;
                    self.degrade(&mut state, now_ms, &reason);
                }
                return Err(BufferError::SequenceReservation {
                    path: self.inner.config.path.clone(),
                    reason,
                });
            }
            state.seq_reserved = reserve_through;
        }
        let batch_seq = state.next_seq;
        state.next_seq += 1;
        Ok(batch_seq)
    }

    /// The number `allocate_seq` would return next.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Stores a batch under `batch_seq` (from [`DiskBuffer::allocate_seq`]). Not durable
    /// until a later [`DiskBuffer::flush`] returns `Durable` (except with the
    /// `every_batch` policy, which flushes here). Makes room by the overflow policy;
    /// falls back to memory if the disk fails. `info.created_ms` also serves as "now"
    /// for retrying a failed disk.
    pub fn append(
        &self,
        batch_seq: u64,
        info: BatchInfo,
        payload: &[u8],
    ) -> Result<AppendReceipt, BufferError> {
        let max_buffer_bytes = self.inner.config.max_buffer_bytes;
        let batch_bytes = accounted_bytes(payload.len());
        let too_large = || BufferError::BatchTooLarge {
            batch_seq,
            batch_bytes,
            max_buffer_bytes,
        };
        if batch_bytes > max_buffer_bytes {
            self.inner
                .stats
                .rejected_too_large
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(too_large());
        }
        let value = encode_value(&info, payload).ok_or_else(too_large)?;
        let now_ms = info.created_ms;
        let mut state = self.lock();
        if batch_seq >= state.next_seq {
            return Err(BufferError::UnallocatedSeq {
                batch_seq,
                next_seq: state.next_seq,
            });
        }
        state.last_now_ms = state.last_now_ms.max(now_ms);
        if state.storage.is_none() && now_ms >= state.next_retry_ms {
            self.try_recover(&mut state, now_ms);
        }
        let mut receipt = AppendReceipt {
            batch_seq,
            tier: Tier::Disk,
            dropped_batches: 0,
            stored: true,
        };
        let mut disk_failure = None;
        if let Some(storage) = &state.storage {
            let mut disk = state.disk;
            match insert_on_disk(
                storage,
                &mut disk,
                max_buffer_bytes,
                &self.inner.stats,
                batch_seq,
                info.class,
                &value,
            ) {
                Ok(placement) => {
                    receipt.dropped_batches = placement.dropped_batches;
                    receipt.stored = placement.stored;
                }
                Err(error) => disk_failure = Some(error.to_string()),
            }
            state.disk = disk;
        }
        if let Some(reason) = disk_failure {
            self.degrade(&mut state, now_ms, &reason);
        }
        if state.storage.is_none() {
            receipt.tier = Tier::Memory;
            let placement = self.insert_in_memory(&mut state, batch_seq, info.class, value)?;
            receipt.dropped_batches = placement.dropped_batches;
            receipt.stored = placement.stored;
        }
        self.inner
            .stats
            .appended_batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.publish(&state);
        drop(state);
        if receipt.stored
            && receipt.tier == Tier::Disk
            && self.inner.config.fsync == FsyncPolicy::EveryBatch
        {
            self.flush()?;
        }
        Ok(receipt)
    }

    fn insert_in_memory(
        &self,
        state: &mut State,
        batch_seq: u64,
        class: BatchClass,
        value: Vec<u8>,
    ) -> Result<Placement, BufferError> {
        let memory_only_max_bytes = self.inner.config.memory_only_max_bytes;
        let batch_bytes = (entry::KEY_BYTES + value.len()) as u64;
        if batch_bytes > memory_only_max_bytes {
            self.inner
                .stats
                .rejected_too_large
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(BufferError::BatchTooLargeForMemory {
                batch_seq,
                batch_bytes,
                memory_only_max_bytes,
            });
        }
        let mut dropped_batches = 0;
        loop {
            let victim =
                match state
                    .memory_ledger
                    .make_room(class, batch_bytes, memory_only_max_bytes)
                {
                    RoomDecision::Store => break,
                    RoomDecision::DropIncoming => {
                        count_incoming_drop(
                            &self.inner.stats,
                            batch_seq,
                            class,
                            &value,
                            Tier::Memory,
                        );
                        return Ok(Placement {
                            stored: false,
                            dropped_batches,
                        });
                    }
                    RoomDecision::DropOldest(victim) => victim,
                };
            let oldest = state
                .memory
                .iter()
                .find(|(_, entry)| entry.class == victim)
                .map(|(seq, _)| *seq);
            let removed = oldest.and_then(|seq| state.memory.remove(&seq));
            match removed {
                Some(entry) => {
                    let readings =
                        decode_header(&entry.value).map_or(0, |header| header.reading_count);
                    state
                        .memory_ledger
                        .remove(victim, (entry::KEY_BYTES + entry.value.len()) as u64);
                    self.inner.stats.count_drop(victim, readings);
                    dropped_batches += 1;
                }
                None => state.memory_ledger.forget_class(victim),
            }
        }
        if let Some(previous) = state.memory.insert(batch_seq, MemoryEntry { class, value }) {
            state.memory_ledger.remove(
                previous.class,
                (entry::KEY_BYTES + previous.value.len()) as u64,
            );
        }
        state.memory_ledger.add(class, batch_bytes);
        Ok(Placement {
            stored: true,
            dropped_batches,
        })
    }

    /// Removes a batch the collector acknowledged durably. The removal itself is not
    /// flushed: if it is lost in a crash the batch is resent with its original
    /// sequence number and the collector deduplicates it.
    pub fn ack(&self, batch_seq: u64) -> Result<AckOutcome, BufferError> {
        let mut state = self.lock();
        let outcome = self.ack_locked(&mut state, batch_seq);
        if outcome != AckOutcome::Unknown {
            self.inner
                .stats
                .acked_batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.publish(&state);
        Ok(outcome)
    }

    fn ack_locked(&self, state: &mut State, batch_seq: u64) -> AckOutcome {
        if let Some(entry) = state.memory.remove(&batch_seq) {
            state
                .memory_ledger
                .remove(entry.class, (entry::KEY_BYTES + entry.value.len()) as u64);
            return AckOutcome::Removed;
        }
        if batch_seq >= state.next_seq {
            return AckOutcome::Unknown;
        }
        let Some(storage) = &state.storage else {
            state.pending_disk_acks.insert(batch_seq);
            return AckOutcome::Deferred;
        };
        let mut failure = None;
        for class in BatchClass::ALL {
            match storage.remove(class, batch_seq) {
                Ok(Some(value)) => {
                    state
                        .disk
                        .remove(class, (entry::KEY_BYTES + value.len()) as u64);
                    return AckOutcome::Removed;
                }
                Ok(None) => {}
                Err(error) => {
                    failure = Some(error.to_string());
                    break;
                }
            }
        }
        match failure {
            Some(reason) => {
                let now_ms = state.last_now_ms;
                self.degrade(state, now_ms, &reason);
                state.pending_disk_acks.insert(batch_seq);
                AckOutcome::Deferred
            }
            None => AckOutcome::Unknown,
        }
    }

    /// Makes every batch appended before this call durable (group commit: append
    /// many, flush once). Blocking; async callers use [`DiskBuffer::flush_async`].
    /// An error means the disk failed: the batches since the last successful flush may
    /// be lost, so do not acknowledge them upstream; the buffer is now memory-only.
    pub fn flush(&self) -> Result<Durability, BufferError> {
        let db = match self.db_for_flush()? {
            Ok(db) => db,
            Err(durability) => return Ok(durability),
        };
        let result = db.flush();
        drop(db);
        self.finish_flush(result)
    }

    /// The async form of [`DiskBuffer::flush`]; the fsync runs on sled's thread pool.
    pub async fn flush_async(&self) -> Result<Durability, BufferError> {
        let db = match self.db_for_flush()? {
            Ok(db) => db,
            Err(durability) => return Ok(durability),
        };
        let result = db.flush_async().await;
        drop(db);
        self.finish_flush(result)
    }

    /// The database to flush, or the durability to report without flushing.
    fn db_for_flush(&self) -> Result<Result<sled::Db, Durability>, BufferError> {
        let mut state = self.lock();
        let Some(storage) = &state.storage else {
            return Ok(Err(Durability::MemoryOnly));
        };
        if let FsyncPolicy::Os { .. } = self.inner.config.fsync {
            return Ok(Err(Durability::Deferred));
        }
        if let Err(error) = storage.faults().check("flushing") {
            let now_ms = state.last_now_ms;
            self.degrade(&mut state, now_ms, &error.to_string());
            return Err(BufferError::Storage {
                path: self.inner.config.path.clone(),
                operation: "flushing",
                source: error,
            });
        }
        Ok(Ok(storage.db().clone()))
    }

    fn finish_flush(&self, result: sled::Result<usize>) -> Result<Durability, BufferError> {
        match result {
            Ok(_) => Ok(Durability::Durable),
            Err(error) => {
                let mut state = self.lock();
                if state.storage.is_some() {
                    let now_ms = state.last_now_ms;
                    self.degrade(&mut state, now_ms, &error.to_string());
                }
                Err(BufferError::Storage {
                    path: self.inner.config.path.clone(),
                    operation: "flushing",
                    source: error,
                })
            }
        }
    }

    /// While memory-only, tries the disk again if `storage_retry_interval_ms` has passed
    /// since the last try, moving memory entries back on success. Returns whether the
    /// buffer is on disk afterwards. Appends call this too, with their batch's time.
    pub fn retry_storage(&self, now_ms: i64) -> bool {
        let mut state = self.lock();
        state.last_now_ms = state.last_now_ms.max(now_ms);
        if state.storage.is_none() && now_ms >= state.next_retry_ms {
            self.try_recover(&mut state, now_ms);
        }
        self.publish(&state);
        state.storage.is_some()
    }

    pub fn is_memory_only(&self) -> bool {
        self.lock().storage.is_none()
    }

    fn degrade(&self, state: &mut State, now_ms: i64, reason: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        state.storage = None;
        state.next_retry_ms = retry_time(now_ms, self.inner.config.storage_retry_interval_ms);
        self.inner.stats.storage_errors.fetch_add(1, Relaxed);
        self.inner.stats.memory_only.store(1, Relaxed);
        tracing::error!(
            path = %self.inner.config.path.display(),
            %reason,
            memory_only_max_bytes = self.inner.config.memory_only_max_bytes,
            "disk buffer storage failed; buffering in memory only until the disk works again \
             (batches held in memory are lost if the agent stops)"
        );
    }

    fn try_recover(&self, state: &mut State, now_ms: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        state.next_retry_ms = retry_time(now_ms, self.inner.config.storage_retry_interval_ms);
        let attempt = || -> sled::Result<(Storage, Ledger)> {
            let storage = Storage::open(&self.inner.config, &self.inner.faults)?;
            let mut disk = count_entries(&storage)?;
            for batch_seq in &state.pending_disk_acks {
                for class in BatchClass::ALL {
                    if let Some(value) = storage.remove(class, *batch_seq)? {
                        disk.remove(class, (entry::KEY_BYTES + value.len()) as u64);
                    }
                }
            }
            for (batch_seq, entry) in &state.memory {
                insert_on_disk(
                    &storage,
                    &mut disk,
                    self.inner.config.max_buffer_bytes,
                    &self.inner.stats,
                    *batch_seq,
                    entry.class,
                    &entry.value,
                )?;
            }
            storage.flush()?;
            Ok((storage, disk))
        };
        match attempt() {
            Ok((storage, disk)) => {
                let moved_batches = state.memory.len();
                state.storage = Some(storage);
                state.disk = disk;
                state.memory.clear();
                state.memory_ledger = Ledger::default();
                state.pending_disk_acks.clear();
                self.inner.stats.memory_only.store(0, Relaxed);
                self.inner.stats.storage_recoveries.fetch_add(1, Relaxed);
                tracing::warn!(
                    path = %self.inner.config.path.display(),
                    moved_batches,
                    "disk buffer storage works again; memory-only batches moved back to disk"
                );
            }
            Err(error) => {
                tracing::warn!(
                    path = %self.inner.config.path.display(),
                    %error,
                    retry_in_ms = self.inner.config.storage_retry_interval_ms,
                    "disk buffer storage still unavailable; staying memory-only"
                );
            }
        }
    }

    fn publish(&self, state: &State) {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.inner.stats;
        stats.batches_buffered.store(
            state.disk.total_batches() + state.memory_ledger.total_batches(),
            Relaxed,
        );
        stats.bytes_used.store(
            state.disk.total_bytes() + state.memory_ledger.total_bytes(),
            Relaxed,
        );
        stats
            .memory_batches
            .store(state.memory_ledger.total_batches(), Relaxed);
        stats
            .memory_bytes
            .store(state.memory_ledger.total_bytes(), Relaxed);
    }

    /// The live counters, for a metrics layer that reads them itself.
    pub fn stats_counters(&self) -> &BufferStats {
        &self.inner.stats
    }

    /// A snapshot of the counters, with the oldest unacked batch's age as of `now_ms`.
    pub fn stats(&self, now_ms: i64) -> BufferStatsSnapshot {
        let oldest_created_ms = {
            let mut state = self.lock();
            let oldest_seq_and_value =
                replay::next_entry(self, &mut state, ReplayOrder::OldestFirst, None);
            oldest_seq_and_value
                .and_then(|(_, _, value)| decode_header(&value).ok())
                .map(|header| header.created_ms)
        };
        self.inner.stats.oldest_unacked_created_ms.store(
            oldest_created_ms.unwrap_or(i64::MIN),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.inner.stats.snapshot(now_ms)
    }

    /// Trees to scan without holding the lock (sled iterators are consistent on their own).
    fn trees(&self) -> Option<[sled::Tree; 2]> {
        let state = self.lock();
        let storage = state.storage.as_ref()?;
        Some(BatchClass::ALL.map(|class| storage.tree(class).clone()))
    }

    /// What is buffered, by class. Reads every header once; memory stays bounded.
    pub fn inspect(&self) -> Result<BufferInspection, BufferError> {
        let mut inspection = BufferInspection::default();
        if let Some(trees) = self.trees() {
            for (class, tree) in BatchClass::ALL.into_iter().zip(trees.iter()) {
                for item in tree.iter() {
                    let (key, value) =
                        item.map_err(|source| self.storage_error("inspecting", source))?;
                    let batch_seq = decode_key(&key).unwrap_or(u64::MAX);
                    let header = decode_header(&value).ok();
                    inspection.class_mut(class).add(
                        batch_seq,
                        (key.len() + value.len()) as u64,
                        header.as_ref(),
                    );
                }
            }
        }
        let state = self.lock();
        for (batch_seq, entry) in &state.memory {
            let header = decode_header(&entry.value).ok();
            let bytes = (entry::KEY_BYTES + entry.value.len()) as u64;
            inspection
                .class_mut(entry.class)
                .add(*batch_seq, bytes, header.as_ref());
        }
        inspection.memory_batches = state.memory.len() as u64;
        inspection.memory_only = state.storage.is_none();
        inspection.next_seq = state.next_seq;
        Ok(inspection)
    }

    /// Decodes every stored entry's key, header and checksum and reports those that fail.
    pub fn verify(&self) -> Result<VerifyReport, BufferError> {
        let mut report = VerifyReport::default();
        let Some(trees) = self.trees() else {
            return Ok(report);
        };
        for (class, tree) in BatchClass::ALL.into_iter().zip(trees.iter()) {
            for item in tree.iter() {
                let (key, value) =
                    item.map_err(|source| self.storage_error("verifying", source))?;
                report.entries_checked += 1;
                let batch_seq = decode_key(&key);
                let defect = match (batch_seq, decode_value(&value)) {
                    (None, _) => Some(EntryDefect::BadKey {
                        key_bytes: key.len(),
                    }),
                    (Some(_), Err(defect)) => Some(defect),
                    (Some(_), Ok((header, _))) if header.class != class => {
                        Some(EntryDefect::ClassMismatch {
                            stored_in: class.name(),
                            header_says: header.class.name(),
                        })
                    }
                    (Some(_), Ok(_)) => None,
                };
                if let Some(defect) = defect {
                    report.bad_entries.push(BadEntry {
                        batch_seq,
                        stored_in: class,
                        defect,
                    });
                }
            }
        }
        Ok(report)
    }

    fn storage_error(&self, operation: &'static str, source: sled::Error) -> BufferError {
        BufferError::Storage {
            path: self.inner.config.path.clone(),
            operation,
            source,
        }
    }

    /// Unacked batches in sequence order, read lazily one entry at a time.
    pub fn replay(&self, order: ReplayOrder) -> Replay {
        Replay::new(self.clone(), order, None, None)
    }

    /// Unacked batches with `after < batch_seq < before` (either bound optional), in
    /// `order`. The shipper drains the backlog oldest-first below the first live
    /// sequence number while live batches go out newest-first above it.
    pub fn replay_range(
        &self,
        order: ReplayOrder,
        after: Option<u64>,
        before: Option<u64>,
    ) -> Replay {
        Replay::new(self.clone(), order, after, before)
    }

    /// Writes raw bytes under a key, bypassing every check: for tests that need a
    /// corrupted entry. Not for production use.
    #[doc(hidden)]
    pub fn write_raw_entry_for_test(
        &self,
        class: BatchClass,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), BufferError> {
        let state = self.lock();
        let Some(storage) = &state.storage else {
            return Ok(());
        };
        storage
            .tree(class)
            .insert(key, value)
            .map_err(|source| self.storage_error("writing a test entry", source))?;
        Ok(())
    }
}

fn retry_time(now_ms: i64, interval_ms: u64) -> i64 {
    now_ms.saturating_add(i64::try_from(interval_ms).unwrap_or(i64::MAX))
}

/// Counts what the storage holds, reading one entry at a time.
fn count_entries(storage: &Storage) -> sled::Result<Ledger> {
    let mut ledger = Ledger::default();
    for class in BatchClass::ALL {
        for item in storage.tree(class).iter() {
            let (key, value) = item?;
            ledger.add(class, (key.len() + value.len()) as u64);
        }
    }
    Ok(ledger)
}

/// What the overflow policy did with one incoming batch in one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placement {
    /// `false`: the incoming batch itself was dropped (and counted).
    stored: bool,
    /// Older batches dropped to make room.
    dropped_batches: u32,
}

/// Counts an incoming batch the overflow policy refused, as a drop of its class.
fn count_incoming_drop(
    stats: &BufferStats,
    batch_seq: u64,
    class: BatchClass,
    value: &[u8],
    tier: Tier,
) {
    let readings = decode_header(value).map_or(0, |header| header.reading_count);
    stats.count_drop(class, readings);
    tracing::debug!(
        batch_seq,
        %class,
        readings,
        ?tier,
        "buffer full of batches this class may not evict: dropped the incoming batch"
    );
}

/// Inserts an encoded entry on disk under the overflow policy ([`Ledger::make_room`]):
/// first dropping the oldest raw, then (for a summary) the oldest summary batches until
/// it fits under `max_buffer_bytes`, or dropping the entry itself when it is a raw
/// batch that only evicting summaries would make room for.
fn insert_on_disk(
    storage: &Storage,
    disk: &mut Ledger,
    max_buffer_bytes: u64,
    stats: &BufferStats,
    batch_seq: u64,
    class: BatchClass,
    value: &[u8],
) -> sled::Result<Placement> {
    let batch_bytes = (entry::KEY_BYTES + value.len()) as u64;
    let mut dropped_batches = 0;
    loop {
        let victim = match disk.make_room(class, batch_bytes, max_buffer_bytes) {
            RoomDecision::Store => break,
            RoomDecision::DropIncoming => {
                count_incoming_drop(stats, batch_seq, class, value, Tier::Disk);
                return Ok(Placement {
                    stored: false,
                    dropped_batches,
                });
            }
            RoomDecision::DropOldest(victim) => victim,
        };
        match storage.pop_oldest(victim)? {
            Some((key, old_value)) => {
                let readings = decode_header(&old_value).map_or(0, |header| header.reading_count);
                disk.remove(victim, (key.len() + old_value.len()) as u64);
                stats.count_drop(victim, readings);
                dropped_batches += 1;
                tracing::debug!(batch_seq = decode_key(&key), class = %victim, "buffer full: dropped oldest batch");
            }
            None => disk.forget_class(victim),
        }
    }
    if let Some(previous) = storage.insert(class, batch_seq, value)? {
        disk.remove(class, (entry::KEY_BYTES + previous.len()) as u64);
    }
    disk.add(class, batch_bytes);
    Ok(Placement {
        stored: true,
        dropped_batches,
    })
}
