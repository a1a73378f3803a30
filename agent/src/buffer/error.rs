//! Errors of the disk buffer. Each message says what failed, on which batch or path,
//! and what the operator can do about it.

use std::path::PathBuf;

use thiserror::Error;

/// Why a stored entry could not be decoded. Reported by `verify` and by replay, which
/// skips such entries rather than handing them to the shipper.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EntryDefect {
    #[error("entry is truncated: {value_bytes} bytes stored, shorter than its header says")]
    Truncated { value_bytes: usize },
    #[error("entry has unknown format version {version} (written by a newer agent?)")]
    UnknownVersion { version: u8 },
    #[error("entry has unknown batch class byte {class_byte}")]
    UnknownClass { class_byte: u8 },
    #[error("entry header says {header_payload_bytes} payload bytes but {stored_payload_bytes} are stored")]
    LengthMismatch {
        header_payload_bytes: u32,
        stored_payload_bytes: usize,
    },
    #[error("entry checksum mismatch: stored {stored_crc:#010x}, computed {computed_crc:#010x}")]
    ChecksumMismatch { stored_crc: u32, computed_crc: u32 },
    #[error("entry key is {key_bytes} bytes, expected an 8-byte big-endian batch sequence number")]
    BadKey { key_bytes: usize },
    #[error("entry is stored with the {stored_in} batches but its header says {header_says}")]
    ClassMismatch {
        stored_in: &'static str,
        header_says: &'static str,
    },
}

#[derive(Debug, Error)]
pub enum BufferError {
    #[error(
        "cannot open the disk buffer at {path}: {source}; check that the directory exists, is \
         writable, and is not opened by another agent process"
    )]
    Open { path: PathBuf, source: sled::Error },

    #[error(
        "batch {batch_seq} is {batch_bytes} bytes including its header, more than \
         max_buffer_bytes = {max_buffer_bytes}; raise max_buffer_bytes or ship smaller batches"
    )]
    BatchTooLarge {
        batch_seq: u64,
        batch_bytes: u64,
        max_buffer_bytes: u64,
    },

    #[error(
        "batch {batch_seq} is {batch_bytes} bytes, more than the memory-only fallback cap \
         memory_only_max_bytes = {memory_only_max_bytes} while the disk is unavailable"
    )]
    BatchTooLargeForMemory {
        batch_seq: u64,
        batch_bytes: u64,
        memory_only_max_bytes: u64,
    },

    #[error(
        "batch sequence number {batch_seq} was never allocated by this buffer (next is {next_seq}); \
         allocate sequence numbers with DiskBuffer::allocate_seq"
    )]
    UnallocatedSeq { batch_seq: u64, next_seq: u64 },

    #[error(
        "cannot reserve further batch sequence numbers: the disk buffer at {path} is unavailable \
         ({reason}); sequence numbers must be persisted before use so they never repeat. Free \
         disk space; the buffer retries every storage_retry_interval_ms"
    )]
    SequenceReservation { path: PathBuf, reason: String },

    #[error("disk buffer storage error at {path} while {operation}: {source}")]
    Storage {
        path: PathBuf,
        operation: &'static str,
        source: sled::Error,
    },
}
