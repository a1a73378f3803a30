//! The embedded durable log: append-only segment files on local disk, one machine.
//!
//! Why segment files and not sled: measured, see `docs/embedded-log.md`. In short, a
//! log only ever appends and reads forward, so plain files with a checksum per record
//! do one sequential write and one `fdatasync` per group of appends, and retention is
//! deleting whole files; sled pays for a B-tree, its own page cache and compaction.
//!
//! Layout under the configured directory:
//!
//! ```text
//! LOCK                                  flock'ed while open: one process at a time
//! partition-0000/00000000000000000000.log   segment files named by their first offset
//! positions/<group>.positions           consumer positions (see positions.rs)
//! ```
//!
//! Durability (group commit): appenders encode their record into the partition's
//! pending buffer under a mutex and get an offset at once; one flusher thread per
//! partition takes everything pending, writes it with one positioned write per segment,
//! issues one `fdatasync`, then publishes the records to readers and wakes the
//! appenders. However many appends arrive during one fsync, the next fsync covers them
//! all. Only records that were fsynced are ever reported durable or visible to readers.
//!
//! Recovery on open: every segment is scanned with the pure [`SegmentScanner`]. In the
//! last (active) segment the first incomplete or damaged record and everything after it
//! is a torn write that was never reported durable, so the file is truncated there. A
//! problem in an older segment cannot be a torn write (a segment is fsynced before the
//! next is created), so it is an error that names the file, not something to repair
//! silently. The next offset continues from the last intact record, so offsets that
//! were reported stay unique. If a write or fsync fails, the partition stops accepting
//! appends: after a failed fsync the file's contents are unknown until recovery runs.
//!
//! Reads use positioned reads through a sparse in-memory index (one entry per
//! `index_interval_bytes`), so memory stays bounded whatever the log's size. Opening a
//! log scans all its segments once to rebuild that index.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::io_error;
use super::positions::{sync_directory, PositionStore};
use super::record::{
    self, decode_record, encode_record, encoded_len, peek_offset_and_timestamp,
    record_len_from_prefix, CorruptRecord, Decoded, RecordLocation, RecordMeta, ScanStop,
    SegmentScanner, RECORD_HEADER_BYTES, RECORD_PREFIX_BYTES, SEGMENT_MAGIC,
};
use super::{
    partition_for_key, AppendReceipt, AppendRecord, Clock, DurableLog, LogError, LogRecord,
    OffsetRange, RecordHeaders,
};

const MIB: u64 = 1024 * 1024;
const RECOVERY_CHUNK_BYTES: usize = 1024 * 1024;
const BACKPRESSURE_UNIT_BYTES: usize = 1024;

/// Settings of the embedded log. Sizes are per partition.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedLogConfig {
    /// Where the log lives; created if missing.
    pub directory: PathBuf,
    /// Number of partitions; records go to one by a hash of the agent id. Fixed when
    /// the log is created (changing it would move agents between partitions).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// A segment is sealed and a new one started once it would grow past this.
    #[serde(default = "default_segment_max_bytes")]
    pub segment_max_bytes: u64,
    /// A segment is also sealed once its first record is this old, so that age
    /// retention can delete data of a quiet log.
    #[serde(default = "default_segment_max_age_ms")]
    pub segment_max_age_ms: i64,
    /// Retention by size: oldest segments are deleted while a partition holds more
    /// than this many bytes (the active segment is never deleted).
    #[serde(default)]
    pub retention_max_bytes: Option<u64>,
    /// Retention by age: segments whose newest record is older than this are deleted.
    #[serde(default)]
    pub retention_max_age_ms: Option<i64>,
    /// Largest record (encoded, with headers) an append accepts.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// Bytes that may wait for an fsync per partition before appends wait: the log's
    /// backpressure.
    #[serde(default = "default_max_unflushed_bytes")]
    pub max_unflushed_bytes: usize,
    /// Distance in bytes between entries of the in-memory read index.
    #[serde(default = "default_index_interval_bytes")]
    pub index_interval_bytes: u64,
}

fn default_partitions() -> u32 {
    1
}
fn default_segment_max_bytes() -> u64 {
    256 * MIB
}
fn default_segment_max_age_ms() -> i64 {
    60 * 60 * 1000
}
fn default_max_record_bytes() -> usize {
    16 * MIB as usize
}
fn default_max_unflushed_bytes() -> usize {
    64 * MIB as usize
}
fn default_index_interval_bytes() -> u64 {
    64 * 1024
}

impl EmbeddedLogConfig {
    /// Defaults for everything but the directory.
    pub fn new(directory: impl Into<PathBuf>) -> Self {
        Self {
            directory: directory.into(),
            partitions: default_partitions(),
            segment_max_bytes: default_segment_max_bytes(),
            segment_max_age_ms: default_segment_max_age_ms(),
            retention_max_bytes: None,
            retention_max_age_ms: None,
            max_record_bytes: default_max_record_bytes(),
            max_unflushed_bytes: default_max_unflushed_bytes(),
            index_interval_bytes: default_index_interval_bytes(),
        }
    }

    /// Checks the settings against each other; says which one to change.
    pub fn validate(&self) -> Result<(), LogError> {
        let problem = if self.partitions == 0 || self.partitions > 4096 {
            Some(format!(
                "partitions is {}, must be 1 to 4096",
                self.partitions
            ))
        } else if self.segment_max_bytes < 4096 {
            Some(format!(
                "segment_max_bytes is {}, must be at least 4096",
                self.segment_max_bytes
            ))
        } else if self.segment_max_age_ms <= 0 {
            Some(format!(
                "segment_max_age_ms is {}, must be positive",
                self.segment_max_age_ms
            ))
        } else if self.max_record_bytes < RECORD_HEADER_BYTES
            || self.max_record_bytes > record::MAX_RECORD_BODY_BYTES as usize
        {
            Some(format!(
                "max_record_bytes is {}, must be {} to {}",
                self.max_record_bytes,
                RECORD_HEADER_BYTES,
                record::MAX_RECORD_BODY_BYTES
            ))
        } else if self.max_unflushed_bytes < self.max_record_bytes {
            Some(format!(
                "max_unflushed_bytes ({}) must be at least max_record_bytes ({}) or a largest record could never be appended",
                self.max_unflushed_bytes, self.max_record_bytes
            ))
        } else if self.index_interval_bytes == 0 {
            Some("index_interval_bytes must be positive".to_owned())
        } else if self.retention_max_age_ms.is_some_and(|age| age <= 0) {
            Some("retention_max_age_ms must be positive when set".to_owned())
        } else {
            None
        };
        match problem {
            Some(problem) => Err(LogError::InvalidConfig(problem)),
            None => Ok(()),
        }
    }
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    /// Per partition, the earliest retained offset after the pass.
    pub earliest_offsets: Vec<u64>,
}

#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    offset: u64,
    position: u64,
    timestamp_ms: i64,
}

/// A segment as readers see it: only durable records are counted.
struct Segment {
    base_offset: u64,
    next_offset: u64,
    path: PathBuf,
    file: Arc<File>,
    size_bytes: u64,
    last_timestamp_ms: Option<i64>,
    index: Vec<IndexEntry>,
    bytes_since_index_entry: u64,
}

impl Segment {
    fn new(base_offset: u64, path: PathBuf, file: Arc<File>) -> Self {
        Self {
            base_offset,
            next_offset: base_offset,
            path,
            file,
            size_bytes: SEGMENT_MAGIC.len() as u64,
            last_timestamp_ms: None,
            index: Vec::new(),
            bytes_since_index_entry: 0,
        }
    }

    fn note_record(&mut self, location: RecordLocation, index_interval_bytes: u64) {
        if self.index.is_empty() || self.bytes_since_index_entry >= index_interval_bytes {
            self.index.push(IndexEntry {
                offset: location.offset,
                position: location.position,
                timestamp_ms: location.timestamp_ms,
            });
            self.bytes_since_index_entry = 0;
        }
        self.bytes_since_index_entry += u64::from(location.encoded_bytes);
        self.next_offset = location.offset + 1;
        self.size_bytes = location.position + u64::from(location.encoded_bytes);
        self.last_timestamp_ms = Some(location.timestamp_ms);
    }

    /// Position to start scanning from to find `offset`: the last index entry at or
    /// before it.
    fn position_for_offset(&self, offset: u64) -> u64 {
        let after = self.index.partition_point(|entry| entry.offset <= offset);
        match after.checked_sub(1).and_then(|at| self.index.get(at)) {
            Some(entry) => entry.position,
            None => SEGMENT_MAGIC.len() as u64,
        }
    }

    fn position_for_time(&self, time_ms: i64) -> u64 {
        let after = self
            .index
            .partition_point(|entry| entry.timestamp_ms < time_ms);
        match after.checked_sub(1).and_then(|at| self.index.get(at)) {
            Some(entry) => entry.position,
            None => SEGMENT_MAGIC.len() as u64,
        }
    }
}

struct SegmentSet {
    /// Oldest first; the last one is the active segment. Never empty.
    segments: VecDeque<Segment>,
}

impl SegmentSet {
    fn range(&self) -> OffsetRange {
        let earliest = self
            .segments
            .front()
            .map_or(0, |segment| segment.base_offset);
        let next = self
            .segments
            .back()
            .map_or(earliest, |segment| segment.next_offset);
        OffsetRange { earliest, next }
    }

    fn segment_for_offset(&self, offset: u64) -> Option<&Segment> {
        let after = self
            .segments
            .partition_point(|segment| segment.base_offset <= offset);
        after.checked_sub(1).and_then(|at| self.segments.get(at))
    }
}

/// A record waiting for the fsync that makes it durable.
struct PendingRecord {
    receipt: AppendReceipt,
    encoded_bytes: u32,
    reply: oneshot::Sender<Result<AppendReceipt, String>>,
    _budget: OwnedSemaphorePermit,
}

struct AppendQueue {
    next_offset: u64,
    last_timestamp_ms: i64,
    encoded: Vec<u8>,
    records: Vec<PendingRecord>,
    closed: bool,
    failure: Option<String>,
}

/// A record the flusher wrote, and the segment (path, file) it opened, if it is the
/// first record of a new one.
type WrittenRecord = (RecordLocation, Option<(PathBuf, Arc<File>)>);

/// The flusher's view of the segment it appends to.
struct ActiveSegment {
    base_offset: u64,
    file: Arc<File>,
    size_bytes: u64,
    first_timestamp_ms: Option<i64>,
}

struct Partition {
    id: u32,
    directory: PathBuf,
    queue: Mutex<AppendQueue>,
    queue_changed: Condvar,
    segments: RwLock<SegmentSet>,
    unflushed_budget: Arc<Semaphore>,
    budget_units: u32,
    segment_max_bytes: u64,
    segment_max_age_ms: i64,
    index_interval_bytes: u64,
    fsyncs: AtomicU64,
    records_flushed: AtomicU64,
    /// The partition's next offset, updated after each group commit, so consumers can
    /// wait for new records instead of polling.
    durable_next_offset: watch::Sender<u64>,
}

/// Counters for metrics and for checking that group commit groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Group commits (each one `fdatasync` of the active segment, plus one per roll).
    pub group_commits: u64,
    pub records_flushed: u64,
}

fn segment_path(directory: &Path, base_offset: u64) -> PathBuf {
    directory.join(format!("{base_offset:020}.log"))
}

fn parse_segment_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The embedded log. Cheap to share behind an `Arc`; dropping it flushes what is
/// pending, stops the flusher threads and releases the directory lock.
pub struct EmbeddedLog {
    partitions: Vec<Arc<Partition>>,
    positions: PositionStore,
    clock: Arc<dyn Clock>,
    flushers: Mutex<Vec<JoinHandle<()>>>,
    max_record_bytes: usize,
    retention_max_bytes: Option<u64>,
    retention_max_age_ms: Option<i64>,
    _lock: File,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EmbeddedLog")
            .field("partitions", &self.partitions.len())
            .finish_non_exhaustive()
    }
}

fn lock_directory(directory: &Path) -> Result<File, LogError> {
    let path = directory.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error("open lock file", &path))?;
    // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::WouldBlock {
            return Err(LogError::Locked {
                path: directory.to_path_buf(),
            });
        }
        return Err(LogError::Io {
            action: "lock",
            path,
            source: error,
        });
    }
    Ok(file)
}

fn count_partition_directories(directory: &Path) -> Result<u32, LogError> {
    let mut count = 0;
    for entry in fs::read_dir(directory).map_err(io_error("list", directory))? {
        let entry = entry.map_err(io_error("list", directory))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with("partition-"))
        {
            count += 1;
        }
    }
    Ok(count)
}

fn create_segment_file(
    directory: &Path,
    base_offset: u64,
) -> Result<(PathBuf, Arc<File>), LogError> {
    let path = segment_path(directory, base_offset);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_error("create segment", &path))?;
    file.write_all_at(&SEGMENT_MAGIC, 0)
        .map_err(io_error("write segment magic", &path))?;
    file.sync_data()
        .map_err(io_error("fsync new segment", &path))?;
    sync_directory(directory)?;
    Ok((path, Arc::new(file)))
}

/// Scans one segment file in bounded chunks; returns the segment's metadata, the
/// length of its valid prefix and why the valid prefix ends early, if it does.
fn scan_segment_file(
    path: PathBuf,
    file: Arc<File>,
    base_offset: u64,
    index_interval_bytes: u64,
) -> Result<(Segment, Option<ScanStop>), LogError> {
    let file_bytes = file
        .metadata()
        .map_err(io_error("stat segment", &path))?
        .len();
    let mut segment = Segment::new(base_offset, path, file);
    let magic_len = SEGMENT_MAGIC.len() as u64;
    if file_bytes < magic_len {
        // A segment whose creation was cut short (even a 0-byte file): no magic, so
        // it must be rewritten before anything is appended to it.
        segment.size_bytes = 0;
        return Ok((
            segment,
            Some(ScanStop::NeedMore {
                needed_bytes: SEGMENT_MAGIC.len(),
            }),
        ));
    }
    let mut magic = [0u8; SEGMENT_MAGIC.len()];
    segment
        .file
        .read_exact_at(&mut magic, 0)
        .map_err(io_error("read segment", &segment.path))?;
    if magic != SEGMENT_MAGIC {
        segment.size_bytes = 0;
        return Ok((segment, Some(ScanStop::Corrupt(CorruptRecord::BadMagic))));
    }
    let mut scanner = SegmentScanner::new(base_offset);
    let mut buffer: Vec<u8> = Vec::with_capacity(RECOVERY_CHUNK_BYTES);
    let mut read_position = magic_len;
    loop {
        let unread = file_bytes - read_position;
        let (consumed, stop) = scanner.scan(&buffer, |location, _| {
            segment.note_record(location, index_interval_bytes)
        });
        buffer.drain(..consumed);
        let needed_bytes = match stop {
            ScanStop::Corrupt(reason) => return Ok((segment, Some(ScanStop::Corrupt(reason)))),
            ScanStop::NeedMore { needed_bytes } => needed_bytes,
        };
        if unread == 0 {
            let stop = (!buffer.is_empty()).then_some(ScanStop::NeedMore { needed_bytes });
            return Ok((segment, stop));
        }
        if (buffer.len() as u64) + unread < needed_bytes as u64 {
            // The file ends inside this record: a torn tail. Do not read (or allocate)
            // for a length that the file cannot hold.
            return Ok((segment, Some(ScanStop::NeedMore { needed_bytes })));
        }
        let want = needed_bytes
            .saturating_sub(buffer.len())
            .max(RECOVERY_CHUNK_BYTES)
            .min(unread as usize);
        let filled = buffer.len();
        buffer.resize(filled + want, 0);
        segment
            .file
            .read_exact_at(&mut buffer[filled..], read_position)
            .map_err(io_error("read segment", &segment.path))?;
        read_position += want as u64;
    }
}

fn recover_partition(
    id: u32,
    directory: &Path,
    index_interval_bytes: u64,
) -> Result<SegmentSet, LogError> {
    fs::create_dir_all(directory).map_err(io_error("create partition directory", directory))?;
    let mut bases = Vec::new();
    for entry in fs::read_dir(directory).map_err(io_error("list", directory))? {
        let entry = entry.map_err(io_error("list", directory))?;
        if let Some(base) = parse_segment_name(&entry.path()) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    let mut segments: VecDeque<Segment> = VecDeque::new();
    for (index, base_offset) in bases.iter().copied().enumerate() {
        let is_last = index + 1 == bases.len();
        let path = segment_path(directory, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_error("open segment", &path))?;
        let (mut segment, stop) =
            scan_segment_file(path, Arc::new(file), base_offset, index_interval_bytes)?;
        if let Some(previous) = segments.back() {
            if previous.next_offset != base_offset {
                let reason = CorruptRecord::OffsetOutOfSequence {
                    expected: previous.next_offset,
                    found: base_offset,
                };
                return Err(LogError::CorruptSegment {
                    path: segment.path,
                    position: 0,
                    reason,
                });
            }
        }
        if let Some(stop) = stop {
            if !is_last {
                let reason = match stop {
                    ScanStop::Corrupt(reason) => reason,
                    ScanStop::NeedMore { needed_bytes } => {
                        CorruptRecord::Truncated { needed_bytes }
                    }
                };
                return Err(LogError::CorruptSegment {
                    path: segment.path,
                    position: segment.size_bytes,
                    reason,
                });
            }
            tracing::warn!(
                partition = id,
                segment = %segment.path.display(),
                valid_bytes = segment.size_bytes,
                reason = ?stop,
                "durable log: truncating a torn or damaged tail of the active segment (records there were never reported durable)"
            );
            if segment.size_bytes < SEGMENT_MAGIC.len() as u64 {
                segment
                    .file
                    .set_len(0)
                    .map_err(io_error("truncate segment", &segment.path))?;
                segment
                    .file
                    .write_all_at(&SEGMENT_MAGIC, 0)
                    .map_err(io_error("write segment magic", &segment.path))?;
                segment.size_bytes = SEGMENT_MAGIC.len() as u64;
            } else {
                segment
                    .file
                    .set_len(segment.size_bytes)
                    .map_err(io_error("truncate segment", &segment.path))?;
            }
            segment
                .file
                .sync_all()
                .map_err(io_error("fsync truncated segment", &segment.path))?;
        }
        segments.push_back(segment);
    }
    if segments.is_empty() {
        let (path, file) = create_segment_file(directory, 0)?;
        segments.push_back(Segment::new(0, path, file));
    }
    Ok(SegmentSet { segments })
}

impl Partition {
    /// Writes one group of encoded records (offset order) and fsyncs, rolling to new
    /// segments as needed. Returns each record's location and, for records that start
    /// a new segment, that segment's path and file.
    fn write_group(
        &self,
        active: &mut ActiveSegment,
        encoded: &[u8],
        records: &[PendingRecord],
    ) -> Result<Vec<WrittenRecord>, LogError> {
        let mut locations = Vec::with_capacity(records.len());
        let mut run_start = 0usize;
        let mut cursor = 0usize;
        let mut run_position = active.size_bytes;
        for pending in records {
            let length = pending.encoded_bytes as usize;
            let holds_records = active.size_bytes > SEGMENT_MAGIC.len() as u64;
            let too_big = active.size_bytes + length as u64 > self.segment_max_bytes;
            let too_old = active.first_timestamp_ms.is_some_and(|first| {
                pending.receipt.timestamp_ms.saturating_sub(first) >= self.segment_max_age_ms
            });
            let mut new_segment = None;
            if holds_records && (too_big || too_old) {
                let path = segment_path(&self.directory, active.base_offset);
                active
                    .file
                    .write_all_at(&encoded[run_start..cursor], run_position)
                    .map_err(io_error("write segment", &path))?;
                active
                    .file
                    .sync_data()
                    .map_err(io_error("fsync segment", &path))?;
                let (path, file) = create_segment_file(&self.directory, pending.receipt.offset)?;
                *active = ActiveSegment {
                    base_offset: pending.receipt.offset,
                    file: file.clone(),
                    size_bytes: SEGMENT_MAGIC.len() as u64,
                    first_timestamp_ms: None,
                };
                run_start = cursor;
                run_position = active.size_bytes;
                new_segment = Some((path, file));
            }
            let location = RecordLocation {
                offset: pending.receipt.offset,
                timestamp_ms: pending.receipt.timestamp_ms,
                position: active.size_bytes,
                encoded_bytes: pending.encoded_bytes,
            };
            active.size_bytes += length as u64;
            active
                .first_timestamp_ms
                .get_or_insert(pending.receipt.timestamp_ms);
            cursor += length;
            locations.push((location, new_segment));
        }
        let path = segment_path(&self.directory, active.base_offset);
        active
            .file
            .write_all_at(&encoded[run_start..cursor], run_position)
            .map_err(io_error("write segment", &path))?;
        active
            .file
            .sync_data()
            .map_err(io_error("fsync segment", &path))?;
        Ok(locations)
    }

    fn publish(&self, locations: Vec<WrittenRecord>) {
        let mut set = self
            .segments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (location, new_segment) in locations {
            if let Some((path, file)) = new_segment {
                set.segments
                    .push_back(Segment::new(location.offset, path, file));
            }
            if let Some(segment) = set.segments.back_mut() {
                segment.note_record(location, self.index_interval_bytes);
            }
        }
        self.durable_next_offset.send_replace(set.range().next);
    }

    fn run_flusher(self: Arc<Self>, mut active: ActiveSegment) {
        let mut encoded = Vec::new();
        loop {
            let records = {
                let mut queue = self
                    .queue
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                while queue.records.is_empty() && !queue.closed {
                    queue = self
                        .queue_changed
                        .wait(queue)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                if queue.records.is_empty() {
                    return;
                }
                encoded.clear();
                std::mem::swap(&mut encoded, &mut queue.encoded);
                std::mem::take(&mut queue.records)
            };
            match self.write_group(&mut active, &encoded, &records) {
                Ok(locations) => {
                    self.fsyncs.fetch_add(1, Ordering::Relaxed);
                    self.records_flushed
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    self.publish(locations);
                    for pending in records {
                        // The appender may have given up waiting; the record is durable anyway.
                        let _ = pending.reply.send(Ok(pending.receipt));
                    }
                }
                Err(error) => {
                    let cause = error.to_string();
                    tracing::error!(partition = self.id, %cause, "durable log: write failed; partition stops accepting appends");
                    let mut queue = self
                        .queue
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    queue.failure = Some(cause.clone());
                    let stranded = std::mem::take(&mut queue.records);
                    drop(queue);
                    for pending in records.into_iter().chain(stranded) {
                        let _ = pending.reply.send(Err(cause.clone()));
                    }
                    return;
                }
            }
        }
    }

    /// Reads durable records from `from_offset`, at most about `max_bytes` of values.
    fn read(&self, from_offset: u64, max_bytes: usize) -> Result<Vec<LogRecord>, LogError> {
        let (file, path, mut position, end_position) = {
            let set = self
                .segments
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let range = set.range();
            if from_offset < range.earliest || from_offset > range.next {
                return Err(LogError::OffsetOutOfRange {
                    partition: self.id,
                    requested: from_offset,
                    earliest: range.earliest,
                    next: range.next,
                });
            }
            if from_offset == range.next {
                return Ok(Vec::new());
            }
            let Some(segment) = set.segment_for_offset(from_offset) else {
                return Ok(Vec::new());
            };
            (
                segment.file.clone(),
                segment.path.clone(),
                segment.position_for_offset(from_offset),
                segment.size_bytes,
            )
        };
        let chunk_bytes = max_bytes.clamp(64 * 1024, 8 * MIB as usize);
        let mut buffer: Vec<u8> = Vec::new();
        let mut buffer_position = position;
        let mut records = Vec::new();
        let mut value_bytes = 0usize;
        while position < end_position {
            let cursor = (position - buffer_position) as usize;
            match decode_record(buffer.get(cursor..).unwrap_or(&[])) {
                Decoded::Record {
                    record,
                    encoded_bytes,
                } => {
                    position += encoded_bytes as u64;
                    if record.meta.offset < from_offset {
                        continue;
                    }
                    value_bytes += record.value.len();
                    records.push(LogRecord {
                        partition: self.id,
                        offset: record.meta.offset,
                        timestamp_ms: record.meta.timestamp_ms,
                        headers: RecordHeaders {
                            agent_id: record.meta.agent_id.to_owned(),
                            batch_seq: record.meta.batch_seq,
                            protocol_version: record.meta.protocol_version,
                        },
                        value: Bytes::copy_from_slice(record.value),
                    });
                    if value_bytes >= max_bytes {
                        break;
                    }
                }
                Decoded::Incomplete { needed_bytes } => {
                    if position + needed_bytes as u64 > end_position {
                        let reason = CorruptRecord::Truncated { needed_bytes };
                        return Err(LogError::CorruptSegment {
                            path,
                            position,
                            reason,
                        });
                    }
                    let want = (needed_bytes.max(chunk_bytes) as u64).min(end_position - position)
                        as usize;
                    buffer.clear();
                    buffer.resize(want, 0);
                    file.read_exact_at(&mut buffer, position)
                        .map_err(io_error("read segment", &path))?;
                    buffer_position = position;
                }
                Decoded::Corrupt(reason) => {
                    return Err(LogError::CorruptSegment {
                        path,
                        position,
                        reason,
                    })
                }
            }
        }
        Ok(records)
    }

    fn offset_for_time(&self, time_ms: i64) -> Result<u64, LogError> {
        let (file, path, mut position, end_position, segment_next) = {
            let set = self
                .segments
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let found = set.segments.iter().find(|segment| {
                segment
                    .last_timestamp_ms
                    .is_some_and(|last| last >= time_ms)
            });
            let Some(segment) = found else {
                return Ok(set.range().next);
            };
            (
                segment.file.clone(),
                segment.path.clone(),
                segment.position_for_time(time_ms),
                segment.size_bytes,
                segment.next_offset,
            )
        };
        let mut header = [0u8; RECORD_HEADER_BYTES];
        while position < end_position {
            file.read_exact_at(&mut header, position)
                .map_err(io_error("read segment", &path))?;
            let mut prefix = [0u8; RECORD_PREFIX_BYTES];
            prefix.copy_from_slice(&header[..RECORD_PREFIX_BYTES]);
            let length =
                record_len_from_prefix(&prefix).map_err(|reason| LogError::CorruptSegment {
                    path: path.clone(),
                    position,
                    reason,
                })?;
            let (offset, timestamp_ms) = peek_offset_and_timestamp(&header);
            if timestamp_ms >= time_ms {
                return Ok(offset);
            }
            position += length as u64;
        }
        // The segment's last record is at or after the time, so the loop returns
        // before this unless the file changed under us.
        Ok(segment_next)
    }

    fn enforce_retention(
        &self,
        now_ms: i64,
        max_bytes: Option<u64>,
        max_age_ms: Option<i64>,
    ) -> (Vec<Segment>, u64) {
        let mut set = self
            .segments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total_bytes: u64 = set.segments.iter().map(|segment| segment.size_bytes).sum();
        let mut removed = Vec::new();
        while set.segments.len() > 1 {
            let Some(oldest) = set.segments.front() else {
                break;
            };
            let too_big = max_bytes.is_some_and(|limit| total_bytes > limit);
            let too_old = max_age_ms.is_some_and(|age| {
                oldest
                    .last_timestamp_ms
                    .is_none_or(|last| last < now_ms.saturating_sub(age))
            });
            if !(too_big || too_old) {
                break;
            }
            if let Some(segment) = set.segments.pop_front() {
                total_bytes -= segment.size_bytes;
                removed.push(segment);
            }
        }
        (removed, set.range().earliest)
    }
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `config.directory`, recovering from any crash,
    /// and starts one flusher thread per partition. `clock` stamps records with their
    /// log append time.
    pub fn open(config: EmbeddedLogConfig, clock: impl Clock) -> Result<Self, LogError> {
        config.validate()?;
        let root = config.directory.clone();
        fs::create_dir_all(&root).map_err(io_error("create log directory", &root))?;
        let lock = lock_directory(&root)?;
        let existing = count_partition_directories(&root)?;
        if existing != 0 && existing != config.partitions {
            return Err(LogError::InvalidConfig(format!(
                "{} holds a log with {existing} partitions but partitions = {}; the count is fixed when a log is created",
                root.display(),
                config.partitions
            )));
        }
        let budget_units = (config.max_unflushed_bytes / BACKPRESSURE_UNIT_BYTES)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize))
            as u32;
        let mut partitions = Vec::new();
        let mut flushers = Vec::new();
        for id in 0..config.partitions {
            let directory = root.join(format!("partition-{id:04}"));
            let set = recover_partition(id, &directory, config.index_interval_bytes)?;
            let Some(last) = set.segments.back() else {
                return Err(LogError::InvalidConfig(format!(
                    "partition {id} recovered no segment"
                )));
            };
            let active = ActiveSegment {
                base_offset: last.base_offset,
                file: last.file.clone(),
                size_bytes: last.size_bytes,
                first_timestamp_ms: last.index.first().map(|entry| entry.timestamp_ms),
            };
            let durable_next_offset = last.next_offset;
            let queue = AppendQueue {
                next_offset: last.next_offset,
                last_timestamp_ms: set
                    .segments
                    .iter()
                    .rev()
                    .find_map(|segment| segment.last_timestamp_ms)
                    .unwrap_or(i64::MIN),
                encoded: Vec::new(),
                records: Vec::new(),
                closed: false,
                failure: None,
            };
            let partition = Arc::new(Partition {
                id,
                directory,
                queue: Mutex::new(queue),
                queue_changed: Condvar::new(),
                segments: RwLock::new(set),
                unflushed_budget: Arc::new(Semaphore::new(budget_units as usize)),
                budget_units,
                segment_max_bytes: config.segment_max_bytes,
                segment_max_age_ms: config.segment_max_age_ms,
                index_interval_bytes: config.index_interval_bytes,
                fsyncs: AtomicU64::new(0),
                records_flushed: AtomicU64::new(0),
                durable_next_offset: watch::Sender::new(durable_next_offset),
            });
            let flusher_partition = partition.clone();
            let handle = std::thread::Builder::new()
                .name(format!("log-flush-{id}"))
                .spawn(move || flusher_partition.run_flusher(active))
                .map_err(io_error("start flusher thread for", &root))?;
            partitions.push(partition);
            flushers.push(handle);
        }
        let positions = PositionStore::open(root.join("positions"))?;
        Ok(Self {
            partitions,
            positions,
            clock: Arc::new(clock),
            flushers: Mutex::new(flushers),
            max_record_bytes: config.max_record_bytes,
            retention_max_bytes: config.retention_max_bytes,
            retention_max_age_ms: config.retention_max_age_ms,
            _lock: lock,
        })
    }

    fn partition(&self, partition: u32) -> Result<&Arc<Partition>, LogError> {
        self.partitions
            .get(partition as usize)
            .ok_or(LogError::UnknownPartition {
                partition,
                partition_count: self.partitions.len() as u32,
            })
    }

    /// Appends a record and waits until it is fsynced. See [`DurableLog::append`].
    pub async fn append_durable(&self, record: AppendRecord) -> Result<AppendReceipt, LogError> {
        let agent_id = record.headers.agent_id.as_str();
        if agent_id.len() > u16::MAX as usize {
            return Err(LogError::AgentIdTooLong {
                length: agent_id.len(),
                max: u16::MAX as usize,
            });
        }
        let record_bytes = encoded_len(agent_id, record.value.len());
        if record_bytes > self.max_record_bytes {
            return Err(LogError::RecordTooLarge {
                agent_id: agent_id.to_owned(),
                batch_seq: record.headers.batch_seq,
                record_bytes,
                max_record_bytes: self.max_record_bytes,
            });
        }
        let partition_id = partition_for_key(agent_id, self.partitions.len() as u32);
        let partition = self.partition(partition_id)?;
        let units = record_bytes
            .div_ceil(BACKPRESSURE_UNIT_BYTES)
            .clamp(1, partition.budget_units as usize) as u32;
        let budget = partition
            .unflushed_budget
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| LogError::Closed)?;
        let reply = {
            let mut queue = partition
                .queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(cause) = &queue.failure {
                return Err(LogError::Failed {
                    partition: partition_id,
                    cause: cause.clone(),
                });
            }
            if queue.closed {
                return Err(LogError::Closed);
            }
            let timestamp_ms = self.clock.now_ms().max(queue.last_timestamp_ms);
            let offset = queue.next_offset;
            let meta = RecordMeta {
                offset,
                timestamp_ms,
                agent_id,
                batch_seq: record.headers.batch_seq,
                protocol_version: record.headers.protocol_version,
            };
            encode_record(&meta, &record.value, &mut queue.encoded);
            queue.next_offset += 1;
            queue.last_timestamp_ms = timestamp_ms;
            let (reply, receiver) = oneshot::channel();
            queue.records.push(PendingRecord {
                receipt: AppendReceipt {
                    partition: partition_id,
                    offset,
                    timestamp_ms,
                },
                encoded_bytes: record_bytes as u32,
                reply,
                _budget: budget,
            });
            partition.queue_changed.notify_one();
            receiver
        };
        match reply.await {
            Ok(Ok(receipt)) => Ok(receipt),
            Ok(Err(cause)) => Err(LogError::Failed {
                partition: partition_id,
                cause,
            }),
            Err(_) => Err(LogError::Closed),
        }
    }

    /// Reads durable records; see [`DurableLog::read`]. Blocking (bounded `pread`s).
    pub fn read_records(
        &self,
        partition: u32,
        from_offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        self.partition(partition)?.read(from_offset, max_bytes)
    }

    /// The retained, durable offsets of a partition.
    pub fn retained_offsets(&self, partition: u32) -> Result<OffsetRange, LogError> {
        let partition = self.partition(partition)?;
        let set = partition
            .segments
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(set.range())
    }

    /// See [`DurableLog::offset_for_time`]. Blocking (bounded `pread`s).
    pub fn offset_at_time(&self, partition: u32, time_ms: i64) -> Result<u64, LogError> {
        self.partition(partition)?.offset_for_time(time_ms)
    }

    /// Bytes on disk of a partition's segments, and how many segments there are.
    pub fn disk_usage(&self, partition: u32) -> Result<(u64, usize), LogError> {
        let partition = self.partition(partition)?;
        let set = partition
            .segments
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok((
            set.segments.iter().map(|segment| segment.size_bytes).sum(),
            set.segments.len(),
        ))
    }

    /// Watches a partition's next durable offset: a consumer that has caught up awaits
    /// `changed()` instead of polling `read`.
    pub fn watch_durable_offset(&self, partition: u32) -> Result<watch::Receiver<u64>, LogError> {
        Ok(self.partition(partition)?.durable_next_offset.subscribe())
    }

    /// Counters summed over all partitions since open.
    pub fn stats(&self) -> LogStats {
        let mut stats = LogStats::default();
        for partition in &self.partitions {
            stats.group_commits += partition.fsyncs.load(Ordering::Relaxed);
            stats.records_flushed += partition.records_flushed.load(Ordering::Relaxed);
        }
        stats
    }

    /// See [`DurableLog::commit_position`]. Blocking (one small file write and fsyncs).
    pub fn commit_consumer_position(
        &self,
        group: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), LogError> {
        self.partition(partition)?;
        self.positions.commit(group, partition, next_offset)
    }

    /// See [`DurableLog::load_position`].
    pub fn consumer_position(&self, group: &str, partition: u32) -> Result<Option<u64>, LogError> {
        self.partition(partition)?;
        self.positions.load(group, partition)
    }

    /// Deletes whole old segments beyond the configured size and age limits, judged at
    /// `now_ms`. The active segment of a partition is never deleted. Call it
    /// periodically (for example once a minute) from the collector's housekeeping.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<RetentionReport, LogError> {
        let mut report = RetentionReport::default();
        for partition in &self.partitions {
            let (removed, earliest) = partition.enforce_retention(
                now_ms,
                self.retention_max_bytes,
                self.retention_max_age_ms,
            );
            for segment in removed {
                // Oldest first: a crash part-way leaves a contiguous run of newer segments.
                fs::remove_file(&segment.path)
                    .map_err(io_error("delete expired segment", &segment.path))?;
                report.segments_deleted += 1;
                report.bytes_deleted += segment.size_bytes;
            }
            report.earliest_offsets.push(earliest);
        }
        Ok(report)
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        for partition in &self.partitions {
            let mut queue = partition
                .queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            queue.closed = true;
            partition.queue_changed.notify_all();
        }
        let handles = std::mem::take(
            &mut *self
                .flushers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for handle in handles {
            let _ = handle.join();
        }
    }
}

impl DurableLog for EmbeddedLog {
    fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    fn append(
        &self,
        record: AppendRecord,
    ) -> impl std::future::Future<Output = Result<AppendReceipt, LogError>> + Send {
        self.append_durable(record)
    }

    fn read(
        &self,
        partition: u32,
        from_offset: u64,
        max_bytes: usize,
    ) -> impl std::future::Future<Output = Result<Vec<LogRecord>, LogError>> + Send {
        std::future::ready(self.read_records(partition, from_offset, max_bytes))
    }

    fn offset_range(
        &self,
        partition: u32,
    ) -> impl std::future::Future<Output = Result<OffsetRange, LogError>> + Send {
        std::future::ready(self.retained_offsets(partition))
    }

    fn offset_for_time(
        &self,
        partition: u32,
        time_ms: i64,
    ) -> impl std::future::Future<Output = Result<u64, LogError>> + Send {
        std::future::ready(self.offset_at_time(partition, time_ms))
    }

    fn commit_position(
        &self,
        group: &str,
        partition: u32,
        next_offset: u64,
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send {
        std::future::ready(self.commit_consumer_position(group, partition, next_offset))
    }

    fn load_position(
        &self,
        group: &str,
        partition: u32,
    ) -> impl std::future::Future<Output = Result<Option<u64>, LogError>> + Send {
        std::future::ready(self.consumer_position(group, partition))
    }
}
