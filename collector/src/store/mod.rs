//! Where the window processor's output lands: raw readings, rollups, late readings and
//! last-seen times, written idempotently and read back by the dashboard's queries.
//!
//! Why a trait plus a sans-IO buffer: the consumer loop must commit log offsets only after
//! what they produced is durable, and must be free to retry a write whose outcome it never
//! learned (a timeout, a crash, a replay). So every write is keyed: replaying or retrying it
//! replaces rows instead of adding them (raw and late rows by `(agent_id, batch_seq, …)`,
//! rollups by window with the highest `version` winning, last-seen by key with the latest
//! time winning). [`Store`] is what the loop calls; writes only buffer ([`PendingWrites`],
//! plain deterministic code), and [`Store::flush`] is the durability point.
//!
//! - [`schema`]: the DDL and queries for old (18.16) and current ClickHouse servers.
//! - [`clickhouse`](mod@clickhouse): the ClickHouse implementation, with batching, retry and
//!   backoff, and the partition-dropping retention task for servers without `TTL`.
//!
//! Design notes and the query set: `docs/clickhouse.md`.

pub mod clickhouse;
pub mod embedded;
pub mod queries;
pub mod schema;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;

use serde::{Deserialize, Serialize};
use tributary_protocol::{Batch, SeriesId, SeriesKey};

use crate::process::{LateItem, LateReading, LateReason, WindowResult};

pub use self::clickhouse::{ClickHouseReader, ClickHouseStore, ClickHouseStoreConfig};
pub use embedded::{
    EmbeddedReader, EmbeddedRetention, EmbeddedStore, EmbeddedStoreConfig, RetentionReport,
};
pub use queries::Queries;
pub use schema::{Dialect, RollupSpec, SchemaConfig, SchemaError, SeriesSelector};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store schema: {0}")]
    Schema(#[from] SchemaError),
    #[error(
        "window result for {resolution_ms} ms windows has no rollup table; add the resolution to the \
         store's `rollups` (the engine's resolutions and the store's must match)"
    )]
    UnknownResolution { resolution_ms: i64 },
    #[error("ClickHouse at {url}: {operation}: {source}")]
    ClickHouse {
        url: String,
        operation: String,
        #[source]
        source: ::clickhouse::error::Error,
    },
    #[error("ClickHouse at {url}: {operation} timed out after {timeout_ms} ms")]
    Timeout {
        url: String,
        operation: String,
        timeout_ms: u64,
    },
    #[error(
        "ClickHouse at {url}: gave up writing {table} after {attempts} attempts over {elapsed_ms} ms \
         (last error: {last_error}); the rows stay buffered, call flush again once the server is back"
    )]
    RetriesExhausted {
        url: String,
        table: String,
        attempts: u32,
        elapsed_ms: u64,
        last_error: String,
    },
    #[error(
        "embedded store at {path}: {operation}: {source}; check that the directory is writable, \
         the disk has space, and no other collector has the store open"
    )]
    Embedded {
        path: std::path::PathBuf,
        operation: String,
        #[source]
        source: sled::Error,
    },
    #[error(
        "embedded store at {path}: {what} (key {key_hex}) cannot be decoded; the store is damaged \
         or was written by another version: restore it from a backup or replay the log into a new \
         store directory"
    )]
    EmbeddedCorrupt {
        path: std::path::PathBuf,
        what: String,
        key_hex: String,
    },
    #[error(
        "embedded store at {path} has format version {found}, newer than this collector's \
         {supported}; upgrade the collector or point it at another directory"
    )]
    EmbeddedFormatTooNew {
        path: std::path::PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "embedded store at {path}: the blocking writer task failed ({reason}); the rows stay \
         buffered, call flush again"
    )]
    EmbeddedTask {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "database {database} has schema version {found}, newer than this collector's {supported}; \
         upgrade the collector or point it at another database"
    )]
    SchemaTooNew {
        database: String,
        found: u32,
        supported: u32,
    },
}

/// Server exception codes worth retrying: overload, timeouts, network, read-only replicas.
const TRANSIENT_SERVER_CODES: [u32; 10] = [159, 164, 202, 203, 209, 210, 241, 242, 252, 425];

impl StoreError {
    /// Whether retrying the same request may succeed: network failures and timeouts, and
    /// server exceptions that mean overload; not schema or syntax errors, which would only
    /// repeat.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Timeout { .. } => true,
            StoreError::ClickHouse { source, .. } => {
                let message = source.to_string();
                match message.split("Code: ").nth(1) {
                    Some(rest) => {
                        let digits: String =
                            rest.chars().take_while(char::is_ascii_digit).collect();
                        digits
                            .parse::<u32>()
                            .is_ok_and(|code| TRANSIENT_SERVER_CODES.contains(&code))
                    }
                    None => true,
                }
            }
            _ => false,
        }
    }
}

/// Renders tags as `name=value,name=value` (sorted as in [`SeriesKey`]); `%`, `,` and `=`
/// inside names and values are percent-escaped so the rendering is unambiguous.
pub fn render_tags(tags: &[(String, String)]) -> String {
    fn escape(text: &str, out: &mut String) {
        for character in text.chars() {
            match character {
                '%' => out.push_str("%25"),
                ',' => out.push_str("%2C"),
                '=' => out.push_str("%3D"),
                other => out.push(other),
            }
        }
    }
    let mut rendered = String::new();
    for (index, (name, value)) in tags.iter().enumerate() {
        if index > 0 {
            rendered.push(',');
        }
        escape(name, &mut rendered);
        rendered.push('=');
        escape(value, &mut rendered);
    }
    rendered
}

impl SeriesSelector {
    pub fn for_key(key: &SeriesKey) -> Self {
        Self {
            device_id: key.device_id.clone(),
            metric: key.metric.clone(),
            tags: render_tags(&key.tags),
        }
    }
}

/// One raw reading, keyed by where it came from so a retried or replayed insert replaces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ::clickhouse::Row)]
#[clickhouse(crate = "::clickhouse")]
pub struct RawReadingRow {
    pub agent_id: String,
    pub batch_seq: u64,
    /// Index of the reading within its batch's readings.
    pub position: u32,
    pub device_id: String,
    pub metric: String,
    pub tags: String,
    pub time_ms: i64,
    pub value: f64,
    pub flags: u8,
}

/// The raw rows of one batch. Readings whose series id the batch does not define are
/// skipped and counted (the window engine refuses such batches before this point).
pub fn raw_rows_from_batch(batch: &Batch) -> (Vec<RawReadingRow>, usize) {
    // One lookup per batch, tags rendered once per series: a flood batch defines 10,000
    // series for 30,000 readings, and a scan of the definitions per reading made this the
    // processor's largest cost (`bench e2e` flood, perf: a quarter of the collector's CPU).
    let mut series: HashMap<SeriesId, (&SeriesKey, String)> =
        HashMap::with_capacity(batch.series.len());
    for definition in &batch.series {
        series
            .entry(definition.id)
            .or_insert_with(|| (&definition.key, render_tags(&definition.key.tags)));
    }
    let mut rows = Vec::with_capacity(batch.readings.len());
    let mut undefined = 0;
    for (position, reading) in batch.readings.iter().enumerate() {
        let Some((key, tags)) = series.get(&reading.series) else {
            undefined += 1;
            continue;
        };
        rows.push(RawReadingRow {
            agent_id: batch.agent_id.clone(),
            batch_seq: batch.batch_seq,
            position: u32::try_from(position).unwrap_or(u32::MAX),
            device_id: key.device_id.clone(),
            metric: key.metric.clone(),
            tags: tags.clone(),
            time_ms: reading.time_ms,
            value: reading.value,
            flags: reading.flags,
        });
    }
    (rows, undefined)
}

/// `String` columns holding arbitrary bytes (the postcard-encoded sketch).
pub(crate) mod bytes_column {
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    struct BytesVisitor;

    impl<'de> de::Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("bytes")
        }
        fn visit_bytes<E: de::Error>(self, value: &[u8]) -> Result<Vec<u8>, E> {
            Ok(value.to_vec())
        }
        fn visit_byte_buf<E: de::Error>(self, value: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(value)
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<Vec<u8>, E> {
            Ok(value.as_bytes().to_vec())
        }
        fn visit_string<E: de::Error>(self, value: String) -> Result<Vec<u8>, E> {
            Ok(value.into_bytes())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

/// One emission of one window, at a version; the highest version per window wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ::clickhouse::Row)]
#[clickhouse(crate = "::clickhouse")]
pub struct RollupRow {
    pub agent_id: String,
    pub device_id: String,
    pub metric: String,
    pub tags: String,
    pub window_start_ms: i64,
    pub version: u64,
    pub is_final: u8,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first_time_ms: i64,
    pub first_value: f64,
    pub last_time_ms: i64,
    pub last_value: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    /// The window's sketch, postcard-encoded, so windows can be merged again later.
    #[serde(with = "bytes_column")]
    pub sketch: Vec<u8>,
}

impl RollupRow {
    pub fn from_result(result: &WindowResult) -> Self {
        let summary = &result.summary;
        let quantile = |q: f64| summary.quantile(q).unwrap_or(f64::NAN);
        Self {
            agent_id: result.agent_id.to_string(),
            device_id: result.series.device_id.clone(),
            metric: result.series.metric.clone(),
            tags: render_tags(&result.series.tags),
            window_start_ms: result.window_start_ms,
            version: result.version,
            is_final: u8::from(result.is_final),
            count: summary.count,
            sum: summary.sum,
            min: summary.min,
            max: summary.max,
            first_time_ms: summary.first_time_ms,
            first_value: summary.first_value,
            last_time_ms: summary.last_time_ms,
            last_value: summary.last_value,
            p50: quantile(0.5),
            p90: quantile(0.9),
            p99: quantile(0.99),
            // Encoding a sketch into a Vec cannot fail; an empty column would only lose re-merging.
            sketch: postcard::to_allocvec(&summary.sketch).unwrap_or_default(),
        }
    }

    /// Decodes the stored sketch (`None` if the bytes are not a sketch).
    pub fn decode_sketch(&self) -> Option<tributary_protocol::sketch::Sketch> {
        postcard::from_bytes(&self.sketch).ok()
    }
}

/// An item the window engine refused, for the late-data table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ::clickhouse::Row)]
#[clickhouse(crate = "::clickhouse")]
pub struct LateRow {
    pub agent_id: String,
    pub batch_seq: u64,
    pub device_id: String,
    pub metric: String,
    pub tags: String,
    /// 0 when refused before windowing (for every resolution).
    pub resolution_ms: i64,
    /// 0 when not computable.
    pub window_start_ms: i64,
    /// `reading` or `summary`.
    pub item_kind: String,
    /// The reading's event time, or the summary window's start.
    pub time_ms: i64,
    /// The summary's window width; 0 for a reading.
    pub window_ms: u32,
    /// The reading's value, or the summary's sum.
    pub value: f64,
    /// How many readings the item stands for.
    pub readings: u64,
    /// `window_closed`, `too_far_ahead`, `invalid` or `event_time_out_of_range`.
    pub reason: String,
}

impl LateRow {
    pub fn from_late(late: &LateReading) -> Self {
        let (item_kind, time_ms, window_ms, value) = match &late.item {
            LateItem::Reading { time_ms, value } => ("reading", *time_ms, 0, *value),
            LateItem::Summary {
                window_start_ms,
                window_ms,
                summary,
            } => ("summary", *window_start_ms, *window_ms, summary.sum),
        };
        let reason = match late.reason {
            LateReason::WindowClosed => "window_closed",
            LateReason::TooFarAhead => "too_far_ahead",
            LateReason::Invalid => "invalid",
            LateReason::EventTimeOutOfRange => "event_time_out_of_range",
        };
        Self {
            agent_id: late.agent_id.to_string(),
            batch_seq: late.batch_seq,
            device_id: late.series.device_id.clone(),
            metric: late.series.metric.clone(),
            tags: render_tags(&late.series.tags),
            resolution_ms: late.resolution_ms.unwrap_or(0),
            window_start_ms: late.window_start_ms.unwrap_or(0),
            item_kind: item_kind.to_string(),
            time_ms,
            window_ms,
            value,
            readings: late.item.readings_worth(),
            reason: reason.to_string(),
        }
    }
}

/// What a last-seen row is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeenKind {
    Agent,
    Device,
    Series,
}

impl SeenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SeenKind::Agent => "agent",
            SeenKind::Device => "device",
            SeenKind::Series => "series",
        }
    }
}

/// When an agent, device or series was last seen; the latest time per key wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ::clickhouse::Row)]
#[clickhouse(crate = "::clickhouse")]
pub struct LastSeenRow {
    /// [`SeenKind::as_str`].
    pub kind: String,
    pub agent_id: String,
    /// Empty for an agent.
    pub device_id: String,
    /// Empty for an agent or device.
    pub metric: String,
    pub tags: String,
    /// Milliseconds since the epoch; negative times are stored as 0.
    pub last_seen_ms: u64,
}

/// The agent, device and series sightings of one batch received at `received_ms` (log time).
pub fn last_seen_from_batch(batch: &Batch, received_ms: i64) -> Vec<LastSeenRow> {
    let seen_ms = u64::try_from(received_ms).unwrap_or(0);
    let row = |kind: SeenKind, device_id: &str, metric: &str, tags: String| LastSeenRow {
        kind: kind.as_str().to_string(),
        agent_id: batch.agent_id.clone(),
        device_id: device_id.to_string(),
        metric: metric.to_string(),
        tags,
        last_seen_ms: seen_ms,
    };
    let mut rows = vec![row(SeenKind::Agent, "", "", String::new())];
    // Sets, not scans per definition: quadratic in the batch's width otherwise (a fifth of
    // the collector's CPU in the `bench e2e` flood, 10,000 series per batch).
    let used: HashSet<SeriesId> = batch
        .readings
        .iter()
        .map(|reading| reading.series)
        .chain(batch.summaries.iter().map(|summary| summary.series))
        .collect();
    let mut devices: HashSet<&str> = HashSet::new();
    for definition in &batch.series {
        let key = &definition.key;
        if !used.contains(&definition.id) {
            continue;
        }
        if devices.insert(key.device_id.as_str()) {
            rows.push(row(SeenKind::Device, &key.device_id, "", String::new()));
        }
        rows.push(row(
            SeenKind::Series,
            &key.device_id,
            &key.metric,
            render_tags(&key.tags),
        ));
    }
    rows
}

/// Query results, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ::clickhouse::Row)]
#[clickhouse(crate = "::clickhouse")]
pub struct DeviceRow {
    pub device_id: String,
    pub last_agent_id: String,
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ::clickhouse::Row)]
#[clickhouse(crate = "::clickhouse")]
pub struct SeriesRow {
    pub device_id: String,
    pub metric: String,
    pub tags: String,
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ::clickhouse::Row)]
#[clickhouse(crate = "::clickhouse")]
pub struct LatestValueRow {
    pub device_id: String,
    pub metric: String,
    pub tags: String,
    pub time_ms: i64,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ::clickhouse::Row)]
#[clickhouse(crate = "::clickhouse")]
pub struct LateCountRow {
    pub agent_id: String,
    pub reason: String,
    pub resolution_ms: i64,
    pub late_rows: u64,
    pub late_readings: u64,
}

/// A consumer's position and engine state for one log partition, stored with its results.
///
/// Why in the store: exactly once needs the results and the position that produced them to
/// become durable together (embedded: one atomic batch) or in order (ClickHouse: the
/// checkpoint is inserted after the rows, so a crash in between only replays results that
/// replace themselves). On start the consumer restores `engine_state` and reads the log from
/// `next_offset`; the log's own committed offsets are only a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub group: String,
    pub partition: u32,
    pub next_offset: u64,
    pub engine_state: Vec<u8>,
}

/// When buffered writes should be flushed: enough rows, or the oldest waited long enough.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchPolicy {
    pub max_batch_rows: usize,
    pub max_batch_age_ms: i64,
}

impl Default for BatchPolicy {
    /// Large parts (ClickHouse wants few, big inserts) within the 1 s freshness goal.
    fn default() -> Self {
        Self {
            max_batch_rows: 50_000,
            max_batch_age_ms: 1_000,
        }
    }
}

/// Exponential backoff between retries of a failed insert, capped; and how long to keep
/// trying before handing the error (and the still-buffered rows) back to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    pub give_up_after_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay_ms: 100,
            max_delay_ms: 5_000,
            give_up_after_ms: 600_000,
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `attempt` (0 = the first retry).
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let factor = 1_u64.checked_shl(attempt.min(63)).unwrap_or(u64::MAX);
        self.initial_delay_ms
            .saturating_mul(factor)
            .min(self.max_delay_ms)
    }

    /// Whether to retry after `elapsed_ms` of failures, given the next delay.
    pub fn should_retry(&self, elapsed_ms: u64, next_delay_ms: u64) -> bool {
        elapsed_ms.saturating_add(next_delay_ms) <= self.give_up_after_ms
    }
}

/// Rows waiting for the next flush, per table. Plain data: no IO, time passed in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PendingWrites {
    pub raw: Vec<RawReadingRow>,
    /// Per resolution.
    pub rollups: BTreeMap<i64, Vec<RollupRow>>,
    pub late: Vec<LateRow>,
    /// Coalesced per key to the latest sighting.
    pub last_seen: BTreeMap<(String, String, String, String, String), u64>,
    /// The latest checkpoint per `(group, partition)`; written after every row above.
    pub checkpoints: BTreeMap<(String, u32), Checkpoint>,
    oldest_buffered_ms: Option<i64>,
}

impl PendingWrites {
    pub fn row_count(&self) -> usize {
        self.raw.len()
            + self.rollups.values().map(Vec::len).sum::<usize>()
            + self.late.len()
            + self.last_seen.len()
            + self.checkpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.row_count() == 0
    }

    fn touch(&mut self, now_ms: i64) {
        if self.oldest_buffered_ms.is_none() {
            self.oldest_buffered_ms = Some(now_ms);
        }
    }

    pub fn push_raw(&mut self, rows: impl IntoIterator<Item = RawReadingRow>, now_ms: i64) {
        self.raw.extend(rows);
        self.touch(now_ms);
    }

    /// Buffers window results; refuses (buffering none of them) a resolution without a table.
    pub fn push_results(
        &mut self,
        results: &[WindowResult],
        known: &[i64],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if let Some(result) = results
            .iter()
            .find(|result| !known.contains(&result.resolution_ms))
        {
            return Err(StoreError::UnknownResolution {
                resolution_ms: result.resolution_ms,
            });
        }
        for result in results {
            self.rollups
                .entry(result.resolution_ms)
                .or_default()
                .push(RollupRow::from_result(result));
        }
        self.touch(now_ms);
        Ok(())
    }

    pub fn push_late(&mut self, late: &[LateReading], now_ms: i64) {
        self.late.extend(late.iter().map(LateRow::from_late));
        self.touch(now_ms);
    }

    pub fn push_last_seen(&mut self, rows: impl IntoIterator<Item = LastSeenRow>, now_ms: i64) {
        for row in rows {
            let key = (row.kind, row.agent_id, row.device_id, row.metric, row.tags);
            let seen = self.last_seen.entry(key).or_insert(row.last_seen_ms);
            *seen = (*seen).max(row.last_seen_ms);
        }
        self.touch(now_ms);
    }

    /// Buffers a checkpoint, replacing an older buffered one of the same partition. It carries
    /// no time: a checkpoint alone (nothing else buffered) is due at once.
    pub fn push_checkpoint(&mut self, checkpoint: Checkpoint) {
        let key = (checkpoint.group.clone(), checkpoint.partition);
        self.checkpoints.insert(key, checkpoint);
    }

    /// The last-seen rows to insert.
    pub fn last_seen_rows(&self) -> Vec<LastSeenRow> {
        self.last_seen
            .iter()
            .map(
                |((kind, agent_id, device_id, metric, tags), seen)| LastSeenRow {
                    kind: kind.clone(),
                    agent_id: agent_id.clone(),
                    device_id: device_id.clone(),
                    metric: metric.clone(),
                    tags: tags.clone(),
                    last_seen_ms: *seen,
                },
            )
            .collect()
    }

    /// Whether `policy` says flush now.
    pub fn flush_due(&self, policy: &BatchPolicy, now_ms: i64) -> bool {
        if self.is_empty() {
            return false;
        }
        self.row_count() >= policy.max_batch_rows
            || self
                .oldest_buffered_ms
                .is_none_or(|oldest| now_ms.saturating_sub(oldest) >= policy.max_batch_age_ms)
    }

    /// Call once everything buffered is durable.
    pub fn mark_flushed(&mut self) {
        if self.is_empty() {
            self.oldest_buffered_ms = None;
        }
    }
}

/// What one flush wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub rows_written: usize,
    /// Failed attempts that were retried.
    pub retries: u32,
}

/// The store the consumer loop writes to.
///
/// Contract: `write_*` only buffer (cheap, no IO). Every write is idempotent: writing the
/// same rows again, in any later flush, leaves the stored state as if written once (raw and
/// late rows are keyed by their origin, rollups by window with the highest version winning,
/// last-seen by key with the latest time winning). After [`Store::flush`] returns `Ok`,
/// everything written before it is durable and visible to the queries, and the caller may
/// commit the log offsets that produced it. On `Err` nothing is lost: rows stay buffered and
/// the next `flush` sends them again.
pub trait Store: Send {
    fn write_raw_readings(&mut self, rows: Vec<RawReadingRow>, now_ms: i64);
    fn write_window_results(
        &mut self,
        results: &[WindowResult],
        now_ms: i64,
    ) -> Result<(), StoreError>;
    fn write_late_readings(&mut self, late: &[LateReading], now_ms: i64);
    fn write_last_seen(&mut self, rows: Vec<LastSeenRow>, now_ms: i64);
    /// Buffers a checkpoint; it becomes durable in the next `flush`, no earlier than every row
    /// written before it (embedded: same atomic batch; ClickHouse: inserted after the rows).
    fn write_checkpoint(&mut self, checkpoint: Checkpoint);
    /// The latest durable checkpoint of (group, partition), if any.
    fn load_checkpoint(
        &self,
        group: &str,
        partition: u32,
    ) -> impl Future<Output = Result<Option<Checkpoint>, StoreError>> + Send;
    /// Rows buffered and not yet durable.
    fn buffered_rows(&self) -> usize;
    /// Whether the batch policy says flush now (rows or age).
    fn flush_due(&self, now_ms: i64) -> bool;
    /// Writes everything buffered, retrying with backoff; the durability point.
    fn flush(&mut self) -> impl Future<Output = Result<FlushReport, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_render_sorted_and_unambiguous() {
        let key = SeriesKey::new("d", "m").with_tags([("zone", "a,b"), ("line", "x=1%")]);
        assert_eq!(render_tags(&key.tags), "line=x%3D1%25,zone=a%2Cb");
        assert_eq!(render_tags(&[]), "");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_gives_up_in_time() {
        let policy = RetryPolicy {
            initial_delay_ms: 100,
            max_delay_ms: 1_000,
            give_up_after_ms: 2_000,
        };
        let delays: Vec<u64> = (0..6).map(|attempt| policy.delay_ms(attempt)).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(policy.delay_ms(200), 1_000);
        assert!(policy.should_retry(1_000, 1_000));
        assert!(!policy.should_retry(1_500, 1_000));
    }

    #[test]
    fn flush_is_due_by_rows_or_by_age() {
        let policy = BatchPolicy {
            max_batch_rows: 3,
            max_batch_age_ms: 1_000,
        };
        let mut pending = PendingWrites::default();
        assert!(!pending.flush_due(&policy, 0));
        let seen = |agent: &str, ms: u64| LastSeenRow {
            kind: "agent".into(),
            agent_id: agent.into(),
            device_id: String::new(),
            metric: String::new(),
            tags: String::new(),
            last_seen_ms: ms,
        };
        pending.push_last_seen([seen("a", 5), seen("a", 9), seen("a", 7)], 100);
        assert_eq!(pending.row_count(), 1, "one row per key");
        assert_eq!(pending.last_seen_rows()[0].last_seen_ms, 9);
        assert!(!pending.flush_due(&policy, 1_099));
        assert!(pending.flush_due(&policy, 1_100));
        pending.push_last_seen([seen("b", 1), seen("c", 1)], 200);
        assert!(pending.flush_due(&policy, 200), "3 rows");
    }
}
