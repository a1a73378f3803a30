//! Configuration of the disk buffer, as it appears under `[buffer]` in `agent.toml`.
//!
//! The defaults suit a small gateway: a 256 MiB cap on flash, group commit every
//! 20 ms (well under the 50 ms the MQTT acknowledgement chain allows), an 8 MiB
//! memory-only fallback while the disk is full, and a 16 MiB sled page cache so the
//! buffer's memory does not grow with the backlog.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// When appended batches are made durable (fsync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum FsyncPolicy {
    /// Every `append` flushes before returning. Safest, slowest: one fsync per batch.
    EveryBatch,
    /// The caller appends many batches and then awaits one `flush` that covers them
    /// all, at most every `interval_ms` (group commit). The default.
    Group { interval_ms: u64 },
    /// No explicit flush: sled's background flusher writes and fsyncs about every
    /// `interval_ms`. Fastest; a kill -9 or power loss loses the last moments, and
    /// `flush` returns without waiting.
    Os { interval_ms: u64 },
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::Group { interval_ms: 20 }
    }
}

impl FsyncPolicy {
    /// Sans-IO decision for the shell's commit loop: given when the last flush
    /// finished and how many appends are not yet covered by a flush, is one due now?
    pub fn flush_due(&self, unflushed_appends: u64, last_flush_ms: i64, now_ms: i64) -> bool {
        if unflushed_appends == 0 {
            return false;
        }
        match *self {
            FsyncPolicy::EveryBatch => true,
            FsyncPolicy::Group { interval_ms } => {
                now_ms.saturating_sub(last_flush_ms)
                    >= i64::try_from(interval_ms).unwrap_or(i64::MAX)
            }
            FsyncPolicy::Os { .. } => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Directory of the sled database. Created if missing.
    pub path: PathBuf,
    /// Cap on buffered bytes (keys, headers and payloads). Over it, the oldest raw
    /// batches are dropped first, then the oldest summary batches; a raw batch never
    /// evicts a summary (it is dropped itself when only that would make room).
    pub max_buffer_bytes: u64,
    pub fsync: FsyncPolicy,
    /// Cap on bytes held in memory while the disk is unavailable (full, read-only).
    pub memory_only_max_bytes: u64,
    /// How often to retry the disk while running memory-only.
    pub storage_retry_interval_ms: u64,
    /// sled's page cache. Bounds the buffer's memory independent of its size on disk.
    pub cache_capacity_bytes: u64,
    /// Sequence numbers are reserved on disk in blocks of this size (one extra fsync
    /// per block). After a crash the unused rest of a block is skipped, never reused.
    pub seq_block_size: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            path: PathBuf::from("/var/lib/tributary/buffer"),
            max_buffer_bytes: 256 * 1024 * 1024,
            fsync: FsyncPolicy::default(),
            memory_only_max_bytes: 8 * 1024 * 1024,
            storage_retry_interval_ms: 5_000,
            cache_capacity_bytes: 16 * 1024 * 1024,
            seq_block_size: 4096,
        }
    }
}

impl BufferConfig {
    /// The defaults with another path: the usual start for tests and tools.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        BufferConfig {
            path: path.into(),
            ..BufferConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_policy_waits_for_its_interval() {
        let policy = FsyncPolicy::Group { interval_ms: 20 };
        assert!(!policy.flush_due(0, 0, 1_000));
        assert!(!policy.flush_due(5, 1_000, 1_019));
        assert!(policy.flush_due(5, 1_000, 1_020));
        assert!(FsyncPolicy::EveryBatch.flush_due(1, 1_000, 1_000));
        assert!(!FsyncPolicy::Os { interval_ms: 1_000 }.flush_due(100, 0, 1_000_000));
    }
}
