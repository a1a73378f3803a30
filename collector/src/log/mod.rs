//! The durable log: the collector's source of truth (Kappa architecture).
//!
//! Ingest appends each accepted batch as one record and acknowledges the agent only
//! once the log reports the record durable; the window processor reads the log from a
//! committed position, and reprocessing means replaying it from an offset or a time.
//! Nothing is written straight from the network to the store.
//!
//! [`DurableLog`] is the contract both backends meet: the embedded log
//! ([`embedded::EmbeddedLog`], segment files on local disk, the default for one
//! machine) and Kafka (a later step, over rdkafka). It is shaped after Kafka so that the
//! Kafka backend is a thin adapter:
//! - records are keyed by agent id, which picks the partition, so one agent's batches
//!   stay in order in one partition; headers carry agent id, batch sequence and
//!   protocol version;
//! - `append` resolves when the record is durable (Kafka: acks=all delivery report;
//!   embedded: fsync), never before;
//! - offsets are per partition, dense in the embedded log (Kafka may leave gaps, so
//!   readers must use the offsets of the records they got, not count);
//! - record timestamps are log append time, so "first offset at or after a time" is a
//!   meaningful replay start (Kafka: `offsetsForTimes` on a topic with LogAppendTime);
//! - consumer positions are named (Kafka: consumer group offsets) and store the *next*
//!   offset to read, as Kafka does.
//!
//! Retention is a backend concern (Kafka: topic config); the embedded log exposes
//! [`embedded::EmbeddedLog::enforce_retention`].

pub mod embedded;
pub mod kafka;
pub mod kafka_group;
mod positions;
pub mod record;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use thiserror::Error;

pub use embedded::{EmbeddedLog, EmbeddedLogConfig, LogStats, RetentionReport};

/// The headers every record carries. The agent id is also the record key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeaders {
    pub agent_id: String,
    pub batch_seq: u64,
    pub protocol_version: u16,
}

/// What ingest hands to the log: one accepted batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRecord {
    pub headers: RecordHeaders,
    pub value: Bytes,
}

/// Where a durable record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    pub partition: u32,
    pub offset: u64,
    /// Log append time the record was stamped with.
    pub timestamp_ms: i64,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub headers: RecordHeaders,
    pub value: Bytes,
}

/// The offsets a partition holds now: `[earliest, next)`. Empty when equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetRange {
    /// Oldest offset still retained.
    pub earliest: u64,
    /// Offset the next durable record will get; everything below it is durable.
    pub next: u64,
}

/// Everything that can go wrong with a durable log. Ingest maps
/// [`LogError::is_retryable`] errors to retryable nacks.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("durable log I/O failed: {action} {path}: {source}; check the disk (space, permissions, health) and restart the collector")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("durable log segment {path} is damaged at byte {position}: {reason}; it is a sealed segment, so this is not a torn write: restore the file from a backup, or move it and every later segment aside to start over from the records before it")]
    CorruptSegment {
        path: PathBuf,
        position: u64,
        reason: record::CorruptRecord,
    },
    #[error("durable log partition {partition} is stopped after an earlier write or fsync failure ({cause}); nothing after it was acknowledged; restart the collector so recovery can check the files")]
    Failed { partition: u32, cause: String },
    #[error("offset {requested} is outside partition {partition}'s retained range [{earliest}, {next}); retention may have deleted it: restart from {earliest} or from a time")]
    OffsetOutOfRange {
        partition: u32,
        requested: u64,
        earliest: u64,
        next: u64,
    },
    #[error("partition {partition} does not exist; this log has {partition_count} partitions")]
    UnknownPartition {
        partition: u32,
        partition_count: u32,
    },
    #[error("record of {record_bytes} bytes exceeds the log's limit of {max_record_bytes} bytes (agent {agent_id}, batch {batch_seq}); lower the agent's batch size or raise max_record_bytes")]
    RecordTooLarge {
        agent_id: String,
        batch_seq: u64,
        record_bytes: usize,
        max_record_bytes: usize,
    },
    #[error("agent id of {length} bytes is longer than the {max} bytes a record key may have")]
    AgentIdTooLong { length: usize, max: usize },
    #[error("consumer group name {name:?} is not usable: use 1 to 128 characters from A-Z a-z 0-9 . _ -")]
    InvalidGroupName { name: String },
    #[error("consumer positions file {path} is unreadable: {reason}; delete it to restart that group from its configured start")]
    CorruptPositions { path: PathBuf, reason: String },
    #[error("durable log directory {path} is already opened by another process (lock held); stop the other collector first")]
    Locked { path: PathBuf },
    #[error("durable log configuration is invalid: {0}")]
    InvalidConfig(String),
    #[error("durable log is closed")]
    Closed,
    #[error("Kafka {operation} on topic {topic} failed: {detail}; the agent keeps the batch and retries; check that the brokers in the collector config are reachable and the topic exists")]
    Kafka {
        operation: &'static str,
        topic: String,
        detail: String,
    },
    #[error("record at partition {partition} offset {offset} was not written by Tributary: {reason}; skip it by committing offset {offset} + 1 for the consumer group")]
    ForeignRecord {
        partition: u32,
        offset: u64,
        reason: String,
    },
}

impl LogError {
    /// Whether an agent should retry the batch later (nack with `retryable = true`).
    /// Everything but a record that can never fit is worth retrying: the log may be
    /// restarted or repaired meanwhile, and the agent keeps the batch until acked.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            LogError::RecordTooLarge { .. } | LogError::AgentIdTooLong { .. }
        )
    }
}

/// The log the collector writes accepted batches to and the processor reads from.
///
/// Methods return `Send` futures so the Kafka backend can be a true async client; the
/// embedded backend's reads are short bounded `pread`s done inline.
pub trait DurableLog: Send + Sync + 'static {
    /// Number of partitions; partitions are `0..partition_count()`.
    fn partition_count(&self) -> u32;

    /// Partition that records with this key (agent id) go to. Stable for a given
    /// partition count.
    fn partition_for_key(&self, agent_id: &str) -> u32 {
        partition_for_key(agent_id, self.partition_count())
    }

    /// Appends a record; resolves once it is durable. An agent may be acked only after
    /// this resolves `Ok`. Waits (asynchronously) when too much is in flight:
    /// backpressure, not an error.
    fn append(
        &self,
        record: AppendRecord,
    ) -> impl Future<Output = Result<AppendReceipt, LogError>> + Send;

    /// Reads durable records of `partition` starting at `from_offset`, in offset order,
    /// stopping once about `max_bytes` of values were read (at least one record is
    /// returned if any is available, however large). Empty when `from_offset` is the
    /// partition's next offset (caught up).
    fn read(
        &self,
        partition: u32,
        from_offset: u64,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<LogRecord>, LogError>> + Send;

    /// The retained offsets of `partition`.
    fn offset_range(
        &self,
        partition: u32,
    ) -> impl Future<Output = Result<OffsetRange, LogError>> + Send;

    /// The first offset whose record timestamp is at or after `time_ms`, or the
    /// partition's next offset if there is none (replay starts at the end).
    fn offset_for_time(
        &self,
        partition: u32,
        time_ms: i64,
    ) -> impl Future<Output = Result<u64, LogError>> + Send;

    /// Durably records that consumer `group` will continue `partition` at `next_offset`.
    fn commit_position(
        &self,
        group: &str,
        partition: u32,
        next_offset: u64,
    ) -> impl Future<Output = Result<(), LogError>> + Send;

    /// The position last committed by `group` for `partition`, if any.
    fn load_position(
        &self,
        group: &str,
        partition: u32,
    ) -> impl Future<Output = Result<Option<u64>, LogError>> + Send;
}

/// Maps an I/O error to [`LogError::Io`] naming the action and the file.
pub(crate) fn io_error<'a>(
    action: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Partition for an agent id: FNV-1a of the key modulo the partition count. Chosen
/// over `std`'s hasher because it must never change between releases: records of one
/// agent must keep landing in one partition across restarts.
pub fn partition_for_key(agent_id: &str, partition_count: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in agent_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partition_count.max(1))) as u32
}

/// Source of log append time. Injected so retention and time lookups are testable
/// without waiting; the log never reads a clock of its own.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// Wall-clock time, milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that tests set by hand.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicI64,
}

impl ManualClock {
    pub fn new(now_ms: i64) -> Self {
        Self {
            now_ms: AtomicI64::new(now_ms),
        }
    }

    pub fn set_ms(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance_ms(&self, delta_ms: i64) {
        self.now_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

impl<T: Clock> Clock for std::sync::Arc<T> {
    fn now_ms(&self) -> i64 {
        (**self).now_ms()
    }
}
