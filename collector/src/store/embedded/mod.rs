//! The embedded store: the processor's results on local disk (sled), for one machine with
//! no services. The default store; ClickHouse is the path past one machine.
//!
//! Why it is shaped this way: it must give the same answers as the ClickHouse store (the
//! query API does not know which one it reads), with the same idempotent write semantics,
//! so the consumer loop can retry and replay freely:
//! - raw and late rows are keyed by exactly the columns of the ClickHouse sorting keys, so
//!   a replayed row overwrites itself;
//! - a rollup keeps the highest `version` per (resolution, series, window, agent): the
//!   writer reads the stored version before replacing it (there is one writer);
//! - last-seen keeps the latest time per key;
//! - a flush is one sled batch (atomic, also across a crash) followed by an fsync, and the
//!   consumer's [`Checkpoint`]s ride in the same batch as the rows they account for.
//!
//! Everything lives in one sled tree, one leading byte per table; keys sort like the
//! queries read (series, then time; see [`keys`]) and values are small postcard records.
//! Raw readings are stored in blocks, one entry per series, minute and agent per flush
//! ([`raw_blocks`]: a sled insert per reading capped the whole embedded pipeline).
//! Layout, retention and memory: `docs/embedded-store.md`.

pub mod keys;
pub mod raw_blocks;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use self::keys::{hex, ordered_i64, prefix_successor, KeyReader, KeyWriter};
use super::{
    BatchPolicy, Checkpoint, DeviceRow, FlushReport, LastSeenRow, LateCountRow, LateRow,
    LatestValueRow, PendingWrites, RawReadingRow, RollupRow, SeenKind, SeriesRow, SeriesSelector,
    Store, StoreError,
};
use crate::process::{LateReading, WindowResult};

/// The on-disk format this code writes; refused when a store says it is newer.
/// 1: one entry per raw reading (table `R`); 2: raw readings in blocks (table `B`). A
/// format 1 store is opened and marked 2: its `R` rows stay readable and expire by
/// retention, new raw readings go to blocks (a format 1 build would not see them).
pub const FORMAT_VERSION: u32 = 2;

const TREE_NAME: &str = "tributary_store";
/// Raw readings one per entry (format 1): still read and expired, never written.
const TABLE_RAW: u8 = b'R';
/// Raw readings in blocks (format 2, [`raw_blocks`]).
const TABLE_RAW_BLOCK: u8 = b'B';
const TABLE_ROLLUP: u8 = b'U';
const TABLE_LATE: u8 = b'L';
const TABLE_LAST_SEEN: u8 = b'S';
const TABLE_CHECKPOINT: u8 = b'C';
/// Table `M` (metadata): the format version.
const FORMAT_KEY: &[u8] = b"Mformat";
/// How many raw readings may wait for a flush per `batch.max_batch_rows`: a reading costs
/// about 40 bytes buffered and a fraction of a sled entry written, a row of another table one
/// entry. 4: up to 200,000 readings (8 MB) per flush with the default policy.
const RAW_READINGS_PER_BATCH_ROW: usize = 4;
/// Deletions per sled batch during retention: bounds the memory one retention pass holds.
const RETENTION_CHUNK_KEYS: usize = 10_000;

fn default_cache_capacity_bytes() -> u64 {
    64 * 1024 * 1024
}

/// Where the embedded store lives and what it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedStoreConfig {
    /// The sled directory (created if missing). One process at a time.
    pub path: PathBuf,
    /// The rollup resolutions the window engine emits (the same list as its config).
    pub resolutions_ms: Vec<i64>,
    #[serde(default)]
    pub batch: BatchPolicy,
    /// Raw readings with event time older than `now - raw_retention_ms` are deleted by
    /// [`EmbeddedStore::enforce_retention`]; `None` keeps them forever.
    #[serde(default = "default_raw_retention_ms")]
    pub raw_retention_ms: Option<i64>,
    /// The same for rollup windows (by window start), at every resolution.
    #[serde(default = "default_rollup_retention_ms")]
    pub rollup_retention_ms: Option<i64>,
    /// The same for late rows (by event time).
    #[serde(default = "default_late_retention_ms")]
    pub late_retention_ms: Option<i64>,
    /// sled's page cache: the bulk of the store's memory.
    #[serde(default = "default_cache_capacity_bytes")]
    pub cache_capacity_bytes: u64,
}

const DAY_MS: i64 = 86_400_000;

fn default_raw_retention_ms() -> Option<i64> {
    Some(7 * DAY_MS)
}

fn default_rollup_retention_ms() -> Option<i64> {
    Some(90 * DAY_MS)
}

fn default_late_retention_ms() -> Option<i64> {
    Some(30 * DAY_MS)
}

impl EmbeddedStoreConfig {
    /// A store at `path` for the engine's `resolutions_ms`, with the default batching,
    /// retention (raw 7 days, rollups 90, late 30) and a 64 MiB cache.
    pub fn new(path: impl Into<PathBuf>, resolutions_ms: Vec<i64>) -> Self {
        Self {
            path: path.into(),
            resolutions_ms,
            batch: BatchPolicy::default(),
            raw_retention_ms: default_raw_retention_ms(),
            rollup_retention_ms: default_rollup_retention_ms(),
            late_retention_ms: default_late_retention_ms(),
            cache_capacity_bytes: default_cache_capacity_bytes(),
        }
    }
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub raw_rows_deleted: u64,
    pub rollup_rows_deleted: u64,
    pub late_rows_deleted: u64,
}

/// A raw row's value; the rest is in the key.
#[derive(Serialize, Deserialize)]
struct RawValue {
    value: f64,
    flags: u8,
}

/// A rollup row's value; series, window and agent are in the key.
#[derive(Serialize, Deserialize)]
struct RollupValue {
    version: u64,
    is_final: u8,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first_time_ms: i64,
    first_value: f64,
    last_time_ms: i64,
    last_value: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    sketch: Vec<u8>,
}

/// A late row's non-key columns.
#[derive(Serialize, Deserialize)]
struct LateValue {
    window_start_ms: i64,
    window_ms: u32,
    readings: u64,
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct CheckpointValue {
    next_offset: u64,
    engine_state: Vec<u8>,
}

fn series_key(table: u8, device_id: &str, metric: &str, tags: &str) -> KeyWriter {
    KeyWriter::new(table)
        .string(device_id)
        .string(metric)
        .string(tags)
}

/// A block's key: series, bucket start, agent, and its first reading's identity.
fn raw_block_key(
    (device_id, metric, tags, bucket_start_ms, agent_id): raw_blocks::GroupKey<'_>,
    first: &raw_blocks::BlockReading,
) -> Vec<u8> {
    series_key(TABLE_RAW_BLOCK, device_id, metric, tags)
        .i64(bucket_start_ms)
        .string(agent_id)
        .u64(first.batch_seq)
        .u32(first.position)
        .finish()
}

fn rollup_series_prefix(resolution_ms: i64, selector: &SeriesSelector) -> Vec<u8> {
    KeyWriter::new(TABLE_ROLLUP)
        .i64(resolution_ms)
        .string(&selector.device_id)
        .string(&selector.metric)
        .string(&selector.tags)
        .finish()
}

fn rollup_key(resolution_ms: i64, row: &RollupRow) -> Vec<u8> {
    KeyWriter::new(TABLE_ROLLUP)
        .i64(resolution_ms)
        .string(&row.device_id)
        .string(&row.metric)
        .string(&row.tags)
        .i64(row.window_start_ms)
        .string(&row.agent_id)
        .finish()
}

fn late_key(row: &LateRow) -> Vec<u8> {
    KeyWriter::new(TABLE_LATE)
        .i64(row.time_ms)
        .string(&row.device_id)
        .string(&row.metric)
        .string(&row.tags)
        .string(&row.agent_id)
        .u64(row.batch_seq)
        .i64(row.resolution_ms)
        .string(&row.item_kind)
        .f64(row.value)
        .finish()
}

fn last_seen_key(kind: &str, agent_id: &str, device_id: &str, metric: &str, tags: &str) -> Vec<u8> {
    KeyWriter::new(TABLE_LAST_SEEN)
        .string(kind)
        .string(agent_id)
        .string(device_id)
        .string(metric)
        .string(tags)
        .finish()
}

fn checkpoint_key(group: &str, partition: u32) -> Vec<u8> {
    KeyWriter::new(TABLE_CHECKPOINT)
        .string(group)
        .u32(partition)
        .finish()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain structs into a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// What readers and the writer share: the tree and where it lives, for error messages.
#[derive(Clone)]
struct Shared {
    db: sled::Db,
    tree: sled::Tree,
    path: Arc<Path>,
}

impl Shared {
    fn error(&self, operation: &str, source: sled::Error) -> StoreError {
        StoreError::Embedded {
            path: self.path.to_path_buf(),
            operation: operation.to_string(),
            source,
        }
    }

    fn corrupt(&self, what: &str, key: &[u8]) -> StoreError {
        StoreError::EmbeddedCorrupt {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            key_hex: hex(key),
        }
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<T, StoreError> {
        postcard::from_bytes(value).map_err(|_| self.corrupt(what, key))
    }

    /// Runs blocking sled work off the async runtime's threads.
    async fn blocking<T, F>(&self, operation: &str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || work(&shared))
            .await
            .map_err(|join_error| StoreError::EmbeddedTask {
                path: self.path.to_path_buf(),
                reason: format!("{operation}: {join_error}"),
            })?
    }

    /// The first key at or after `from` that starts with `prefix`.
    fn first_at_or_after(&self, from: &[u8], prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.tree.range(from..).next() {
            Some(Ok((key, _))) if key.starts_with(prefix) => Ok(Some(key.to_vec())),
            Some(Ok(_)) | None => Ok(None),
            Some(Err(source)) => Err(self.error("scan keys", source)),
        }
    }

    /// The series prefixes (`table [+ resolution] + device + metric + tags`) present under
    /// `table_prefix`, found by skipping from one series to the next (one seek per series).
    fn series_prefixes(&self, table_prefix: &[u8], table: u8) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut prefixes = Vec::new();
        let mut cursor = table_prefix.to_vec();
        while let Some(key) = self.first_at_or_after(&cursor, table_prefix)? {
            let mut reader =
                KeyReader::new(&key, table).ok_or_else(|| self.corrupt("a series key", &key))?;
            if table == TABLE_ROLLUP {
                reader
                    .i64()
                    .ok_or_else(|| self.corrupt("a rollup key", &key))?;
            }
            for _ in 0..3 {
                reader
                    .string()
                    .ok_or_else(|| self.corrupt("a series key", &key))?;
            }
            let prefix = key
                .get(..reader.consumed(&key))
                .ok_or_else(|| self.corrupt("a series key", &key))?
                .to_vec();
            match prefix_successor(&prefix) {
                Some(next) => cursor = next,
                None => {
                    prefixes.push(prefix);
                    break;
                }
            }
            prefixes.push(prefix);
        }
        Ok(prefixes)
    }

    /// Deletes the readings older than `before_ms` from the blocks under one series prefix:
    /// blocks of older buckets whole, the bucket holding `before_ms` reading by reading.
    /// Returns how many readings went. A block rewritten by the writer meanwhile (a
    /// replay merging into it) is read again (compare-and-swap), never overwritten.
    fn expire_raw_blocks(&self, prefix: &[u8], before_ms: i64) -> Result<u64, StoreError> {
        let boundary_bucket_ms = raw_blocks::bucket_start_ms(before_ms);
        let mut whole_to = prefix.to_vec();
        whole_to.extend_from_slice(&ordered_i64(boundary_bucket_ms));
        let mut deleted = 0_u64;
        loop {
            let mut batch = sled::Batch::default();
            let mut keys = 0;
            for entry in self
                .tree
                .range(prefix.to_vec()..whole_to.clone())
                .take(RETENTION_CHUNK_KEYS)
            {
                let (key, value) =
                    entry.map_err(|source| self.error("scan expired raw blocks", source))?;
                let block: raw_blocks::RawBlock = self.decode("a raw block", &key, &value)?;
                deleted += block.readings.len() as u64;
                batch.remove(key);
                keys += 1;
            }
            if keys == 0 {
                break;
            }
            self.tree
                .apply_batch(batch)
                .map_err(|source| self.error("delete expired raw blocks", source))?;
        }
        let mut boundary_to = prefix.to_vec();
        boundary_to.extend_from_slice(&ordered_i64(
            boundary_bucket_ms.saturating_add(raw_blocks::RAW_BLOCK_MS),
        ));
        let boundary_keys: Vec<sled::IVec> = self
            .tree
            .range(whole_to..boundary_to)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| self.error("scan expiring raw blocks", source))?;
        for key in boundary_keys {
            loop {
                let Some(current) = self
                    .tree
                    .get(&key)
                    .map_err(|source| self.error("read an expiring raw block", source))?
                else {
                    break;
                };
                let mut block: raw_blocks::RawBlock = self.decode("a raw block", &key, &current)?;
                let dropped = block.retain_from(boundary_bucket_ms, before_ms);
                if dropped == 0 {
                    break;
                }
                let replacement = (!block.readings.is_empty()).then(|| encode(&block));
                match self
                    .tree
                    .compare_and_swap(&key, Some(current), replacement)
                    .map_err(|source| self.error("rewrite an expiring raw block", source))?
                {
                    Ok(()) => {
                        deleted += dropped as u64;
                        break;
                    }
                    Err(_) => continue,
                }
            }
        }
        Ok(deleted)
    }

    /// Deletes every key in `[from, to)`, in bounded batches; returns how many.
    fn delete_range(&self, from: &[u8], to: &[u8]) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let mut batch = sled::Batch::default();
            let mut keys = 0;
            for entry in self.tree.range(from..to).keys().take(RETENTION_CHUNK_KEYS) {
                let key = entry.map_err(|source| self.error("scan expired rows", source))?;
                batch.remove(key);
                keys += 1;
            }
            if keys == 0 {
                return Ok(deleted);
            }
            self.tree
                .apply_batch(batch)
                .map_err(|source| self.error("delete expired rows", source))?;
            deleted += keys as u64;
        }
    }
}

/// The embedded implementation of [`Store`]. One writer; [`EmbeddedStore::reader`] hands out
/// readers that answer queries while it writes.
pub struct EmbeddedStore {
    shared: Shared,
    config: EmbeddedStoreConfig,
    pending: PendingWrites,
    /// Raw readings wait here, grouped into blocks (`pending.raw` stays empty).
    pending_raw: raw_blocks::PendingRaw,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `config.path`.
    pub fn open(config: EmbeddedStoreConfig) -> Result<Self, StoreError> {
        let path: Arc<Path> = Arc::from(config.path.as_path());
        let sled_config = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity_bytes)
            // Durability comes from the explicit flush at every `Store::flush`.
            .flush_every_ms(None);
        let opened = crate::sled_open::open(&sled_config);
        let db = opened.map_err(|source| StoreError::Embedded {
            path: path.to_path_buf(),
            operation: "open".to_string(),
            source,
        })?;
        let tree = db
            .open_tree(TREE_NAME)
            .map_err(|source| StoreError::Embedded {
                path: path.to_path_buf(),
                operation: format!("open tree {TREE_NAME}"),
                source,
            })?;
        let shared = Shared { db, tree, path };
        // A new store, or one an older format wrote, is marked with this build's format.
        let mark_format = match shared
            .tree
            .get(FORMAT_KEY)
            .map_err(|source| shared.error("read the format version", source))?
        {
            Some(found) => {
                let bytes: [u8; 4] = found
                    .as_ref()
                    .try_into()
                    .map_err(|_| shared.corrupt("the format version", FORMAT_KEY))?;
                let found = u32::from_be_bytes(bytes);
                if found > FORMAT_VERSION {
                    return Err(StoreError::EmbeddedFormatTooNew {
                        path: shared.path.to_path_buf(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                // Older rows stay readable; marking the store keeps an older build from
                // opening it and missing the raw blocks written from now on.
                found < FORMAT_VERSION
            }
            None => true,
        };
        if mark_format {
            shared
                .tree
                .insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                .map_err(|source| shared.error("record the format version", source))?;
            shared
                .db
                .flush()
                .map_err(|source| shared.error("flush", source))?;
        }
        Ok(Self {
            shared,
            config,
            pending: PendingWrites::default(),
            pending_raw: raw_blocks::PendingRaw::default(),
        })
    }

    pub fn config(&self) -> &EmbeddedStoreConfig {
        &self.config
    }

    /// A reader for the query API: cheap to clone, reads while this store writes.
    pub fn reader(&self) -> EmbeddedReader {
        let mut resolutions: Vec<i64> = self.config.resolutions_ms.clone();
        resolutions.dedup();
        EmbeddedReader {
            shared: self.shared.clone(),
            finest_resolution_ms: resolutions.iter().copied().min(),
            resolutions_ms: resolutions.into(),
        }
    }

    /// Deletes raw rows, rollup windows and late rows older than their retention at `now_ms`
    /// (by event time or window start; row by row, not by day), then makes that durable.
    /// Last-seen rows and checkpoints never expire. Blocking: run it on a blocking thread,
    /// or use [`EmbeddedStore::retention`] to run it from another task while this store writes.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<RetentionReport, StoreError> {
        self.retention().enforce_retention(now_ms)
    }

    /// A handle that enforces retention from another task (a periodic timer) while the
    /// consumer loop owns the store; deleting and writing at the same time is safe.
    pub fn retention(&self) -> EmbeddedRetention {
        EmbeddedRetention {
            shared: self.shared.clone(),
            resolutions_ms: self.config.resolutions_ms.clone().into(),
            raw_retention_ms: self.config.raw_retention_ms,
            rollup_retention_ms: self.config.rollup_retention_ms,
            late_retention_ms: self.config.late_retention_ms,
        }
    }

    /// Builds the one batch of a flush: rollups and last-seen rows merged with what is stored.
    fn build_batch(
        shared: &Shared,
        pending: &PendingWrites,
        pending_raw: &mut raw_blocks::PendingRaw,
    ) -> Result<(sled::Batch, usize), StoreError> {
        let mut batch = sled::Batch::default();
        // Raw readings are all in `pending_raw` (the embedded store never fills `pending.raw`).
        let mut rows = pending_raw.readings();
        for (group, readings) in pending_raw.sorted_blocks() {
            let Some(first) = readings.first() else {
                continue;
            };
            let key = raw_block_key(group, first);
            // A key seen before (a replay cutting its flushes differently) is merged, never
            // replaced: a reading only the stored block holds must not be lost.
            let stored = shared
                .tree
                .get(&key)
                .map_err(|source| shared.error("read a stored raw block", source))?;
            let value = match stored {
                Some(stored) => {
                    let stored: raw_blocks::RawBlock =
                        shared.decode("a raw block", &key, &stored)?;
                    encode(&stored.merge(&raw_blocks::RawBlock {
                        readings: readings.to_vec(),
                    }))
                }
                None => encode(&raw_blocks::RawBlockRef { readings }),
            };
            batch.insert(key, value);
        }
        for (resolution_ms, emitted) in &pending.rollups {
            // Highest version per window within the flush; on a tie the later write wins,
            // as ClickHouse keeps the last inserted of equal versions.
            let mut latest: BTreeMap<Vec<u8>, &RollupRow> = BTreeMap::new();
            for row in emitted {
                let key = rollup_key(*resolution_ms, row);
                match latest.get(&key) {
                    Some(kept) if kept.version > row.version => {}
                    _ => {
                        latest.insert(key, row);
                    }
                }
            }
            for (key, row) in latest {
                let stored = shared
                    .tree
                    .get(&key)
                    .map_err(|source| shared.error("read a stored window", source))?;
                if let Some(stored) = stored {
                    let stored: RollupValue = shared.decode("a rollup window", &key, &stored)?;
                    if stored.version > row.version {
                        continue;
                    }
                }
                batch.insert(
                    key,
                    encode(&RollupValue {
                        version: row.version,
                        is_final: row.is_final,
                        count: row.count,
                        sum: row.sum,
                        min: row.min,
                        max: row.max,
                        first_time_ms: row.first_time_ms,
                        first_value: row.first_value,
                        last_time_ms: row.last_time_ms,
                        last_value: row.last_value,
                        p50: row.p50,
                        p90: row.p90,
                        p99: row.p99,
                        sketch: row.sketch.clone(),
                    }),
                );
                rows += 1;
            }
        }
        for row in &pending.late {
            batch.insert(
                late_key(row),
                encode(&LateValue {
                    window_start_ms: row.window_start_ms,
                    window_ms: row.window_ms,
                    readings: row.readings,
                    reason: row.reason.clone(),
                }),
            );
            rows += 1;
        }
        for ((kind, agent_id, device_id, metric, tags), seen_ms) in &pending.last_seen {
            let key = last_seen_key(kind, agent_id, device_id, metric, tags);
            let stored = shared
                .tree
                .get(&key)
                .map_err(|source| shared.error("read a last-seen time", source))?;
            let stored_ms = match stored {
                Some(bytes) => Some(u64::from_be_bytes(
                    bytes
                        .as_ref()
                        .try_into()
                        .map_err(|_| shared.corrupt("a last-seen time", &key))?,
                )),
                None => None,
            };
            if stored_ms.is_some_and(|stored_ms| stored_ms >= *seen_ms) {
                continue;
            }
            batch.insert(key, &seen_ms.to_be_bytes());
            rows += 1;
        }
        for checkpoint in pending.checkpoints.values() {
            batch.insert(
                checkpoint_key(&checkpoint.group, checkpoint.partition),
                encode(&CheckpointValue {
                    next_offset: checkpoint.next_offset,
                    engine_state: checkpoint.engine_state.clone(),
                }),
            );
            rows += 1;
        }
        Ok((batch, rows))
    }

    async fn flush_pending(&mut self) -> Result<FlushReport, StoreError> {
        if self.pending.is_empty() && self.pending_raw.is_empty() {
            return Ok(FlushReport::default());
        }
        let pending = std::mem::take(&mut self.pending);
        let mut pending_raw = std::mem::take(&mut self.pending_raw);
        let shared = self.shared.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let built = Self::build_batch(&shared, &pending, &mut pending_raw);
            let result = built.and_then(|(batch, rows)| {
                shared
                    .tree
                    .apply_batch(batch)
                    .map_err(|source| shared.error("write a batch", source))?;
                shared
                    .db
                    .flush()
                    .map_err(|source| shared.error("flush to disk", source))?;
                Ok(rows)
            });
            (pending, pending_raw, result)
        })
        .await;
        match outcome {
            Ok((_, _, Ok(rows_written))) => Ok(FlushReport {
                rows_written,
                retries: 0,
            }),
            Ok((pending, pending_raw, Err(error))) => {
                self.pending = pending;
                self.pending_raw = pending_raw;
                Err(error)
            }
            Err(join_error) => Err(StoreError::EmbeddedTask {
                path: self.shared.path.to_path_buf(),
                reason: format!(
                    "flush: {join_error}; the buffered rows were lost with the task, so restart \
                     the consumer from its last checkpoint"
                ),
            }),
        }
    }
}

impl Store for EmbeddedStore {
    fn write_raw_readings(&mut self, rows: Vec<RawReadingRow>, now_ms: i64) {
        self.pending_raw.push(rows, now_ms);
    }

    fn write_window_results(
        &mut self,
        results: &[WindowResult],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.pending
            .push_results(results, &self.config.resolutions_ms, now_ms)
    }

    fn write_late_readings(&mut self, late: &[LateReading], now_ms: i64) {
        self.pending.push_late(late, now_ms);
    }

    fn write_last_seen(&mut self, rows: Vec<LastSeenRow>, now_ms: i64) {
        self.pending.push_last_seen(rows, now_ms);
    }

    fn write_checkpoint(&mut self, checkpoint: Checkpoint) {
        self.pending.push_checkpoint(checkpoint);
    }

    fn load_checkpoint(
        &self,
        group: &str,
        partition: u32,
    ) -> impl std::future::Future<Output = Result<Option<Checkpoint>, StoreError>> + Send {
        let reader = self.reader();
        let group = group.to_string();
        async move { reader.load_checkpoint(&group, partition).await }
    }

    fn buffered_rows(&self) -> usize {
        self.pending.row_count() + self.pending_raw.readings()
    }

    fn flush_due(&self, now_ms: i64) -> bool {
        // The cost of a flush is its sled entries: a block per series and minute, however
        // many readings it holds. So raw readings count as their blocks, bounded in number
        // (memory: about 40 bytes each) at RAW_READINGS_PER_BATCH_ROW x max_batch_rows.
        let policy = &self.config.batch;
        if self.pending.flush_due(policy, now_ms) {
            return true;
        }
        if self.pending_raw.is_empty() {
            return false;
        }
        self.pending.row_count() + self.pending_raw.blocks() >= policy.max_batch_rows
            || self.pending_raw.readings()
                >= policy
                    .max_batch_rows
                    .saturating_mul(RAW_READINGS_PER_BATCH_ROW)
            || self
                .pending_raw
                .oldest_buffered_ms()
                .is_none_or(|oldest| now_ms.saturating_sub(oldest) >= policy.max_batch_age_ms)
    }

    fn flush(
        &mut self,
    ) -> impl std::future::Future<Output = Result<FlushReport, StoreError>> + Send {
        self.flush_pending()
    }
}

/// Enforces the embedded store's retention; see [`EmbeddedStore::retention`].
#[derive(Clone)]
pub struct EmbeddedRetention {
    shared: Shared,
    resolutions_ms: Arc<[i64]>,
    raw_retention_ms: Option<i64>,
    rollup_retention_ms: Option<i64>,
    late_retention_ms: Option<i64>,
}

impl EmbeddedRetention {
    /// See [`EmbeddedStore::enforce_retention`]. Blocking.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<RetentionReport, StoreError> {
        let shared = &self.shared;
        let cutoff = |retention_ms: i64| now_ms.saturating_sub(retention_ms.max(0));
        let mut report = RetentionReport::default();
        if let Some(retention_ms) = self.raw_retention_ms {
            let before = cutoff(retention_ms);
            for prefix in shared.series_prefixes(&[TABLE_RAW], TABLE_RAW)? {
                let mut to = prefix.clone();
                to.extend_from_slice(&ordered_i64(before));
                report.raw_rows_deleted += shared.delete_range(&prefix, &to)?;
            }
            for prefix in shared.series_prefixes(&[TABLE_RAW_BLOCK], TABLE_RAW_BLOCK)? {
                report.raw_rows_deleted += shared.expire_raw_blocks(&prefix, before)?;
            }
        }
        if let Some(retention_ms) = self.rollup_retention_ms {
            let before = cutoff(retention_ms);
            for resolution_ms in self.resolutions_ms.iter() {
                let table_prefix = KeyWriter::new(TABLE_ROLLUP).i64(*resolution_ms).finish();
                for prefix in shared.series_prefixes(&table_prefix, TABLE_ROLLUP)? {
                    let mut to = prefix.clone();
                    to.extend_from_slice(&ordered_i64(before));
                    report.rollup_rows_deleted += shared.delete_range(&prefix, &to)?;
                }
            }
        }
        if let Some(retention_ms) = self.late_retention_ms {
            let to = KeyWriter::new(TABLE_LATE)
                .i64(cutoff(retention_ms))
                .finish();
            report.late_rows_deleted += shared.delete_range(&[TABLE_LATE], &to)?;
        }
        shared
            .db
            .flush()
            .map_err(|source| shared.error("flush after retention", source))?;
        Ok(report)
    }

    /// [`EmbeddedRetention::enforce_retention`] on a blocking thread.
    pub async fn enforce_retention_async(
        &self,
        now_ms: i64,
    ) -> Result<RetentionReport, StoreError> {
        let retention = self.clone();
        self.shared
            .blocking("enforce retention", move |_| {
                retention.enforce_retention(now_ms)
            })
            .await
    }
}

/// The read side of the embedded store: the same queries, with the same answers and order,
/// as [`super::ClickHouseReader`].
#[derive(Clone)]
pub struct EmbeddedReader {
    shared: Shared,
    resolutions_ms: Arc<[i64]>,
    finest_resolution_ms: Option<i64>,
}

/// Selectors deduplicated in the order the ClickHouse queries sort by.
fn sorted_selectors(series: &[SeriesSelector]) -> Vec<SeriesSelector> {
    series
        .iter()
        .cloned()
        .collect::<BTreeSet<SeriesSelector>>()
        .into_iter()
        .collect()
}

impl Shared {
    fn raw_range(
        &self,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RawReadingRow>, StoreError> {
        let mut rows = Vec::new();
        if from_ms >= to_ms {
            return Ok(rows);
        }
        for selector in sorted_selectors(series) {
            // Identity (time, agent, batch_seq, position) -> (value, flags): the order of
            // the format 1 keys, and of the ClickHouse query.
            let mut found: BTreeMap<(i64, String, u64, u32), (f64, u8)> = BTreeMap::new();
            self.raw_blocks_into(&selector, from_ms, to_ms, &mut found)?;
            self.legacy_raw_rows_into(&selector, from_ms, to_ms, &mut found)?;
            rows.extend(found.into_iter().map(
                |((time_ms, agent_id, batch_seq, position), (value, flags))| RawReadingRow {
                    agent_id,
                    batch_seq,
                    position,
                    device_id: selector.device_id.clone(),
                    metric: selector.metric.clone(),
                    tags: selector.tags.clone(),
                    time_ms,
                    value,
                    flags,
                },
            ));
        }
        Ok(rows)
    }

    /// Calls `each` with every entry of `table` for one series whose key time (the first field
    /// after the series) is in `[from_key_ms, to_ms)`, its reader past the series fields.
    fn series_entries(
        &self,
        table: u8,
        selector: &SeriesSelector,
        from_key_ms: i64,
        to_ms: i64,
        what: &str,
        mut each: impl FnMut(&mut KeyReader<'_>, &[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let prefix = series_key(table, &selector.device_id, &selector.metric, &selector.tags);
        let from = prefix.clone().i64(from_key_ms).finish();
        let to = prefix.i64(to_ms).finish();
        for entry in self.tree.range(from..to) {
            let (key, value) = entry.map_err(|source| self.error("read raw readings", source))?;
            let corrupt = || self.corrupt(what, &key);
            let mut reader = KeyReader::new(&key, table).ok_or_else(corrupt)?;
            for _ in 0..3 {
                reader.string().ok_or_else(corrupt)?;
            }
            each(&mut reader, &key, &value)?;
        }
        Ok(())
    }

    /// The readings in `[from_ms, to_ms)` of every block of the buckets that range touches.
    fn raw_blocks_into(
        &self,
        selector: &SeriesSelector,
        from_ms: i64,
        to_ms: i64,
        found: &mut BTreeMap<(i64, String, u64, u32), (f64, u8)>,
    ) -> Result<(), StoreError> {
        let from_key_ms = raw_blocks::bucket_start_ms(from_ms);
        let what = "a raw block key";
        self.series_entries(
            TABLE_RAW_BLOCK,
            selector,
            from_key_ms,
            to_ms,
            what,
            |reader, key, value| {
                let corrupt = || self.corrupt(what, key);
                let bucket_start_ms = reader.i64().ok_or_else(corrupt)?;
                let agent_id = reader.string().ok_or_else(corrupt)?;
                let block: raw_blocks::RawBlock = self.decode("a raw block", key, value)?;
                for reading in block.readings {
                    let time_ms = bucket_start_ms.saturating_add(i64::from(reading.offset_ms));
                    if time_ms < from_ms || time_ms >= to_ms {
                        continue;
                    }
                    found.insert(
                        (
                            time_ms,
                            agent_id.clone(),
                            reading.batch_seq,
                            reading.position,
                        ),
                        (reading.value, reading.flags),
                    );
                }
                Ok(())
            },
        )
    }

    /// Raw rows a format 1 build wrote, one per entry.
    fn legacy_raw_rows_into(
        &self,
        selector: &SeriesSelector,
        from_ms: i64,
        to_ms: i64,
        found: &mut BTreeMap<(i64, String, u64, u32), (f64, u8)>,
    ) -> Result<(), StoreError> {
        let what = "a raw reading key";
        self.series_entries(
            TABLE_RAW,
            selector,
            from_ms,
            to_ms,
            what,
            |reader, key, value| {
                let corrupt = || self.corrupt(what, key);
                let time_ms = reader.i64().ok_or_else(corrupt)?;
                let agent_id = reader.string().ok_or_else(corrupt)?;
                let batch_seq = reader.u64().ok_or_else(corrupt)?;
                let position = reader.u32().ok_or_else(corrupt)?;
                let stored: RawValue = self.decode("a raw reading", key, value)?;
                found.insert(
                    (time_ms, agent_id, batch_seq, position),
                    (stored.value, stored.flags),
                );
                Ok(())
            },
        )
    }

    fn decode_rollup(&self, key: &[u8], value: &[u8]) -> Result<RollupRow, StoreError> {
        let corrupt = || self.corrupt("a rollup key", key);
        let mut reader = KeyReader::new(key, TABLE_ROLLUP).ok_or_else(corrupt)?;
        reader.i64().ok_or_else(corrupt)?;
        let device_id = reader.string().ok_or_else(corrupt)?;
        let metric = reader.string().ok_or_else(corrupt)?;
        let tags = reader.string().ok_or_else(corrupt)?;
        let window_start_ms = reader.i64().ok_or_else(corrupt)?;
        let agent_id = reader.string().ok_or_else(corrupt)?;
        let stored: RollupValue = self.decode("a rollup window", key, value)?;
        Ok(RollupRow {
            agent_id,
            device_id,
            metric,
            tags,
            window_start_ms,
            version: stored.version,
            is_final: stored.is_final,
            count: stored.count,
            sum: stored.sum,
            min: stored.min,
            max: stored.max,
            first_time_ms: stored.first_time_ms,
            first_value: stored.first_value,
            last_time_ms: stored.last_time_ms,
            last_value: stored.last_value,
            p50: stored.p50,
            p90: stored.p90,
            p99: stored.p99,
            sketch: stored.sketch,
        })
    }

    fn rollup_range(
        &self,
        resolution_ms: i64,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RollupRow>, StoreError> {
        let mut rows = Vec::new();
        if from_ms >= to_ms {
            return Ok(rows);
        }
        for selector in sorted_selectors(series) {
            let prefix = rollup_series_prefix(resolution_ms, &selector);
            let mut from = prefix.clone();
            from.extend_from_slice(&ordered_i64(from_ms));
            let mut to = prefix;
            to.extend_from_slice(&ordered_i64(to_ms));
            for entry in self.tree.range(from..to) {
                let (key, value) = entry.map_err(|source| self.error("read rollups", source))?;
                rows.push(self.decode_rollup(&key, &value)?);
            }
        }
        Ok(rows)
    }

    /// The latest value of one series (given as its rollup key prefix): the last value of
    /// the window row with the greatest `last_time_ms`, the first such row in key order on
    /// a tie (as `argMax` keeps the first maximum it meets).
    fn latest_value(
        &self,
        resolution_ms: i64,
        prefix: &[u8],
    ) -> Result<Option<LatestValueRow>, StoreError> {
        // Backwards from the newest window: a window's readings lie inside it, so once a
        // window ends at or before the best time found, no older window can beat it.
        let mut candidates: Vec<RollupRow> = Vec::new();
        let mut best_time_ms: Option<i64> = None;
        for entry in self.tree.scan_prefix(prefix).rev() {
            let (key, value) = entry.map_err(|source| self.error("read rollups", source))?;
            let row = self.decode_rollup(&key, &value)?;
            if let Some(best) = best_time_ms {
                if row.window_start_ms.saturating_add(resolution_ms) <= best {
                    break;
                }
            }
            best_time_ms =
                Some(best_time_ms.map_or(row.last_time_ms, |best| best.max(row.last_time_ms)));
            candidates.push(row);
        }
        let mut latest: Option<RollupRow> = None;
        for row in candidates.into_iter().rev() {
            if latest
                .as_ref()
                .is_none_or(|kept| row.last_time_ms > kept.last_time_ms)
            {
                latest = Some(row);
            }
        }
        Ok(latest.map(|row| LatestValueRow {
            device_id: row.device_id,
            metric: row.metric,
            tags: row.tags,
            time_ms: row.last_time_ms,
            value: row.last_value,
        }))
    }

    fn latest_values(
        &self,
        finest_resolution_ms: i64,
        series: &[SeriesSelector],
    ) -> Result<Vec<LatestValueRow>, StoreError> {
        let prefixes = if series.is_empty() {
            let table_prefix = KeyWriter::new(TABLE_ROLLUP)
                .i64(finest_resolution_ms)
                .finish();
            self.series_prefixes(&table_prefix, TABLE_ROLLUP)?
        } else {
            sorted_selectors(series)
                .iter()
                .map(|selector| rollup_series_prefix(finest_resolution_ms, selector))
                .collect()
        };
        let mut rows = Vec::new();
        for prefix in prefixes {
            rows.extend(self.latest_value(finest_resolution_ms, &prefix)?);
        }
        Ok(rows)
    }

    /// Every last-seen row of one kind, in key order.
    fn last_seen_of(&self, kind: SeenKind) -> Result<Vec<LastSeenRow>, StoreError> {
        let prefix = KeyWriter::new(TABLE_LAST_SEEN)
            .string(kind.as_str())
            .finish();
        let mut rows = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, value) =
                entry.map_err(|source| self.error("read last-seen times", source))?;
            let corrupt = || self.corrupt("a last-seen key", &key);
            let mut reader = KeyReader::new(&key, TABLE_LAST_SEEN).ok_or_else(corrupt)?;
            let kind = reader.string().ok_or_else(corrupt)?;
            let agent_id = reader.string().ok_or_else(corrupt)?;
            let device_id = reader.string().ok_or_else(corrupt)?;
            let metric = reader.string().ok_or_else(corrupt)?;
            let tags = reader.string().ok_or_else(corrupt)?;
            let seen: [u8; 8] = value
                .as_ref()
                .try_into()
                .map_err(|_| self.corrupt("a last-seen time", &key))?;
            rows.push(LastSeenRow {
                kind,
                agent_id,
                device_id,
                metric,
                tags,
                last_seen_ms: u64::from_be_bytes(seen),
            });
        }
        Ok(rows)
    }

    fn list_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let mut devices: BTreeMap<String, (String, u64)> = BTreeMap::new();
        for row in self.last_seen_of(SeenKind::Device)? {
            match devices.get_mut(&row.device_id) {
                Some((agent_id, seen_ms)) => {
                    if row.last_seen_ms > *seen_ms {
                        *agent_id = row.agent_id;
                        *seen_ms = row.last_seen_ms;
                    }
                }
                None => {
                    devices.insert(row.device_id, (row.agent_id, row.last_seen_ms));
                }
            }
        }
        Ok(devices
            .into_iter()
            .map(|(device_id, (last_agent_id, last_seen_ms))| DeviceRow {
                device_id,
                last_agent_id,
                last_seen_ms,
            })
            .collect())
    }

    fn list_series(&self) -> Result<Vec<SeriesRow>, StoreError> {
        let mut series: BTreeMap<(String, String, String), u64> = BTreeMap::new();
        for row in self.last_seen_of(SeenKind::Series)? {
            let seen = series
                .entry((row.device_id, row.metric, row.tags))
                .or_insert(row.last_seen_ms);
            *seen = (*seen).max(row.last_seen_ms);
        }
        Ok(series
            .into_iter()
            .map(|((device_id, metric, tags), last_seen_ms)| SeriesRow {
                device_id,
                metric,
                tags,
                last_seen_ms,
            })
            .collect())
    }

    fn late_counts(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LateCountRow>, StoreError> {
        let mut counts: BTreeMap<(String, String, i64), (u64, u64)> = BTreeMap::new();
        if from_ms < to_ms {
            let from = KeyWriter::new(TABLE_LATE).i64(from_ms).finish();
            let to = KeyWriter::new(TABLE_LATE).i64(to_ms).finish();
            for entry in self.tree.range(from..to) {
                let (key, value) = entry.map_err(|source| self.error("read late rows", source))?;
                let corrupt = || self.corrupt("a late row key", &key);
                let mut reader = KeyReader::new(&key, TABLE_LATE).ok_or_else(corrupt)?;
                reader.i64().ok_or_else(corrupt)?;
                for _ in 0..3 {
                    reader.string().ok_or_else(corrupt)?;
                }
                let agent_id = reader.string().ok_or_else(corrupt)?;
                reader.u64().ok_or_else(corrupt)?;
                let resolution_ms = reader.i64().ok_or_else(corrupt)?;
                let stored: LateValue = self.decode("a late row", &key, &value)?;
                let entry = counts
                    .entry((agent_id, stored.reason, resolution_ms))
                    .or_insert((0, 0));
                entry.0 += 1;
                entry.1 = entry.1.saturating_add(stored.readings);
            }
        }
        Ok(counts
            .into_iter()
            .map(
                |((agent_id, reason, resolution_ms), (late_rows, late_readings))| LateCountRow {
                    agent_id,
                    reason,
                    resolution_ms,
                    late_rows,
                    late_readings,
                },
            )
            .collect())
    }

    fn load_checkpoint(
        &self,
        group: &str,
        partition: u32,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let key = checkpoint_key(group, partition);
        let Some(value) = self
            .tree
            .get(&key)
            .map_err(|source| self.error("read a checkpoint", source))?
        else {
            return Ok(None);
        };
        let stored: CheckpointValue = self.decode("a checkpoint", &key, &value)?;
        Ok(Some(Checkpoint {
            group: group.to_string(),
            partition,
            next_offset: stored.next_offset,
            engine_state: stored.engine_state,
        }))
    }
}

impl EmbeddedReader {
    /// The rollup resolutions the store keeps.
    pub fn resolutions_ms(&self) -> &[i64] {
        &self.resolutions_ms
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Devices and the agent that reported each last (the smallest agent id on a tie).
    pub async fn list_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        self.shared
            .blocking("list devices", |shared| shared.list_devices())
            .await
    }

    /// Every series with when it was last seen.
    pub async fn list_series(&self) -> Result<Vec<SeriesRow>, StoreError> {
        self.shared
            .blocking("list series", |shared| shared.list_series())
            .await
    }

    /// Latest value per series (all series when `series` is empty), from the finest rollup.
    pub async fn latest_values(
        &self,
        series: &[SeriesSelector],
    ) -> Result<Vec<LatestValueRow>, StoreError> {
        let Some(finest) = self.finest_resolution_ms else {
            return Ok(Vec::new());
        };
        let series = series.to_vec();
        self.shared
            .blocking("read latest values", move |shared| {
                shared.latest_values(finest, &series)
            })
            .await
    }

    /// Windows of `series` at `resolution_ms` starting in `[from_ms, to_ms)`, one row per
    /// agent and window at its highest version. An empty selection selects nothing.
    pub async fn rollup_range(
        &self,
        resolution_ms: i64,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RollupRow>, StoreError> {
        if !self.resolutions_ms.contains(&resolution_ms) {
            return Err(StoreError::UnknownResolution { resolution_ms });
        }
        let series = series.to_vec();
        self.shared
            .blocking("read a rollup range", move |shared| {
                shared.rollup_range(resolution_ms, &series, from_ms, to_ms)
            })
            .await
    }

    /// Raw readings of `series` in `[from_ms, to_ms)`, each once. An empty selection selects
    /// nothing.
    pub async fn raw_range(
        &self,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RawReadingRow>, StoreError> {
        let series = series.to_vec();
        self.shared
            .blocking("read a raw range", move |shared| {
                shared.raw_range(&series, from_ms, to_ms)
            })
            .await
    }

    /// Late rows and readings with event time in `[from_ms, to_ms)` per agent, reason, resolution.
    pub async fn late_counts(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<LateCountRow>, StoreError> {
        self.shared
            .blocking("count late readings", move |shared| {
                shared.late_counts(from_ms, to_ms)
            })
            .await
    }

    /// The latest durable checkpoint of `(group, partition)`.
    pub async fn load_checkpoint(
        &self,
        group: &str,
        partition: u32,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let group = group.to_string();
        self.shared
            .blocking("load a checkpoint", move |shared| {
                shared.load_checkpoint(&group, partition)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(time_ms: i64, batch_seq: u64, value: f64) -> RawReadingRow {
        RawReadingRow {
            agent_id: "agent".into(),
            batch_seq,
            position: 0,
            device_id: "device".into(),
            metric: "temperature".into(),
            tags: String::new(),
            time_ms,
            value,
            flags: 0,
        }
    }

    /// A store written by a format 1 build (one `R` entry per reading) opens, is marked
    /// format 2, and answers with its old rows and the new blocks merged in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_format_1_store_keeps_its_rows_readable_beside_the_blocks() {
        let directory = tempfile::tempdir().expect("tempdir");
        let config = EmbeddedStoreConfig::new(directory.path().join("store"), vec![60_000]);
        {
            let db = sled::open(&config.path).expect("sled");
            let tree = db.open_tree(TREE_NAME).expect("tree");
            tree.insert(FORMAT_KEY, &1_u32.to_be_bytes())
                .expect("format");
            let old = row(2_000, 1, 1.5);
            let key = series_key(TABLE_RAW, &old.device_id, &old.metric, &old.tags)
                .i64(old.time_ms)
                .string(&old.agent_id)
                .u64(old.batch_seq)
                .u32(old.position)
                .finish();
            let value = encode(&RawValue {
                value: old.value,
                flags: 0,
            });
            tree.insert(key, value).expect("legacy row");
            db.flush().expect("flush");
        }
        let mut store = EmbeddedStore::open(config.clone()).expect("open");
        let format = store
            .shared
            .tree
            .get(FORMAT_KEY)
            .expect("read")
            .expect("format");
        assert_eq!(format.as_ref(), &FORMAT_VERSION.to_be_bytes());
        store.write_raw_readings(vec![row(1_000, 2, 0.5), row(3_000, 2, 2.5)], 0);
        store.flush().await.expect("flush");
        let selector = SeriesSelector {
            device_id: "device".into(),
            metric: "temperature".into(),
            tags: String::new(),
        };
        let read = store
            .reader()
            .raw_range(std::slice::from_ref(&selector), 0, 10_000)
            .await
            .expect("read");
        let values: Vec<f64> = read.iter().map(|row| row.value).collect();
        assert_eq!(values, vec![0.5, 1.5, 2.5]);
        let report = store
            .enforce_retention(2_500 + 7 * DAY_MS)
            .expect("retention");
        assert_eq!(
            report.raw_rows_deleted, 2,
            "the old row and one block reading"
        );
        let left = store
            .reader()
            .raw_range(&[selector], 0, 10_000)
            .await
            .expect("read");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].time_ms, 3_000);
    }

    /// A replay that cuts its flushes differently writes a block with the key of an earlier
    /// one but fewer readings: the stored readings stay (merge, not replace).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_block_written_again_with_fewer_readings_loses_none() {
        let directory = tempfile::tempdir().expect("tempdir");
        let config = EmbeddedStoreConfig::new(directory.path().join("store"), vec![60_000]);
        let mut store = EmbeddedStore::open(config).expect("open");
        let rows = vec![row(1_000, 1, 1.0), row(2_000, 5, 2.0), row(3_000, 3, 3.0)];
        store.write_raw_readings(rows.clone(), 0);
        store.flush().await.expect("flush");
        store.write_raw_readings(vec![rows[0].clone()], 0);
        store.flush().await.expect("flush");
        store.write_raw_readings(vec![rows[2].clone(), row(4_000, 6, 4.0)], 0);
        store.flush().await.expect("flush");
        let selector = SeriesSelector {
            device_id: "device".into(),
            metric: "temperature".into(),
            tags: String::new(),
        };
        let read = store
            .reader()
            .raw_range(&[selector], 0, 60_000)
            .await
            .expect("read");
        let values: Vec<f64> = read.iter().map(|row| row.value).collect();
        assert_eq!(
            values,
            vec![1.0, 2.0, 3.0, 4.0],
            "each reading once, in time order"
        );
    }
}
