//! The on-disk record codec and the recovery scan, as pure functions over bytes.
//!
//! Why sans-IO: recovery after a kill -9 or a power loss is the part of the log that
//! must be right, and it is easiest to prove right when it is a function from bytes to
//! "these records are whole, the rest is a torn tail". The file-handling shell in
//! [`super::embedded`] feeds file contents through the same [`SegmentScanner`] that the
//! property tests drive with arbitrary truncations and bit flips.
//!
//! A segment file is an 8-byte magic followed by records. Each record is
//!
//! ```text
//! body_length: u32 LE   length of everything after the checksum
//! crc32:       u32 LE   CRC-32 (IEEE) of the body
//! body:
//!   offset:           u64 LE   the record's position in the partition, never reused
//!   timestamp_ms:     i64 LE   log append time, non-decreasing within a partition
//!   batch_seq:        u64 LE   the agent's batch sequence number
//!   protocol_version: u16 LE
//!   agent_id_length:  u16 LE
//!   agent_id:         UTF-8 bytes (also the record key)
//!   value:            the remaining bytes
//! ```
//!
//! The length comes before the checksum so that a reader knows how much to read; a
//! torn or garbage length is caught by the length limit or by the checksum.

use thiserror::Error;

/// The first bytes of every segment file: a format name and a format version.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TRBLOG\x00\x01";

/// Bytes before the body: the body length and its checksum.
pub const RECORD_PREFIX_BYTES: usize = 8;

/// Fixed-size part of the body, before the agent id and the value.
pub const RECORD_FIXED_BODY_BYTES: usize = 8 + 8 + 8 + 2 + 2;

/// Bytes of a record that hold everything but the agent id and the value; enough to
/// learn a record's offset and timestamp without reading its value.
pub const RECORD_HEADER_BYTES: usize = RECORD_PREFIX_BYTES + RECORD_FIXED_BODY_BYTES;

/// Hard upper bound on a body length read from disk. A length above this is garbage
/// (a torn write or damage), not a record, and is reported as corruption instead of
/// being allocated.
pub const MAX_RECORD_BODY_BYTES: u32 = 256 * 1024 * 1024;

/// Metadata of a record as the log stores it; the key is the agent id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta<'a> {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub agent_id: &'a str,
    pub batch_seq: u64,
    pub protocol_version: u16,
}

/// A decoded record borrowing from the buffer it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub meta: RecordMeta<'a>,
    pub value: &'a [u8],
}

/// Why bytes that should hold a record do not.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CorruptRecord {
    #[error("body length {body_length} is below the fixed header size {RECORD_FIXED_BODY_BYTES}")]
    BodyTooShort { body_length: u32 },
    #[error("body length {body_length} exceeds the limit of {MAX_RECORD_BODY_BYTES} bytes")]
    BodyTooLong { body_length: u32 },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("agent id length {agent_id_length} runs past the end of a {body_length}-byte body")]
    AgentIdOverrun {
        agent_id_length: u16,
        body_length: u32,
    },
    #[error("agent id is not valid UTF-8")]
    AgentIdNotUtf8,
    #[error("record holds offset {found}, but offset {expected} was expected next")]
    OffsetOutOfSequence { expected: u64, found: u64 },
    #[error(
        "record timestamp {found_ms} ms goes back before the previous record's {previous_ms} ms"
    )]
    TimestampWentBack { previous_ms: i64, found_ms: i64 },
    #[error("segment does not start with the Tributary log magic")]
    BadMagic,
    #[error("record is cut short: {needed_bytes} bytes needed")]
    Truncated { needed_bytes: usize },
}

/// Result of trying to decode one record at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole record, and how many bytes of the buffer it took.
    Record {
        record: RecordView<'a>,
        encoded_bytes: usize,
    },
    /// The buffer holds only the beginning of a record; `needed_bytes` is the whole
    /// record's size once known, or the prefix size before that.
    Incomplete { needed_bytes: usize },
    /// The bytes cannot be a record.
    Corrupt(CorruptRecord),
}

/// Size of the encoded form of a record with this agent id and value length.
pub fn encoded_len(agent_id: &str, value_len: usize) -> usize {
    RECORD_HEADER_BYTES + agent_id.len() + value_len
}

/// Appends the encoded record to `out`. The caller guarantees that the agent id is at
/// most `u16::MAX` bytes and that the body fits [`MAX_RECORD_BODY_BYTES`] (the log
/// checks both before encoding, see `EmbeddedLog::append`).
pub fn encode_record(meta: &RecordMeta<'_>, value: &[u8], out: &mut Vec<u8>) {
    let agent_id = meta.agent_id.as_bytes();
    let body_length = RECORD_FIXED_BODY_BYTES + agent_id.len() + value.len();
    let start = out.len();
    out.reserve(RECORD_PREFIX_BYTES + body_length);
    out.extend_from_slice(&(body_length as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    let body_start = out.len();
    out.extend_from_slice(&meta.offset.to_le_bytes());
    out.extend_from_slice(&meta.timestamp_ms.to_le_bytes());
    out.extend_from_slice(&meta.batch_seq.to_le_bytes());
    out.extend_from_slice(&meta.protocol_version.to_le_bytes());
    out.extend_from_slice(&(agent_id.len() as u16).to_le_bytes());
    out.extend_from_slice(agent_id);
    out.extend_from_slice(value);
    let crc = crc32fast::hash(&out[body_start..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(raw)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// The length fields of a record, read from its first [`RECORD_PREFIX_BYTES`] bytes.
/// Returns the whole record's encoded size, or why the prefix is impossible.
pub fn record_len_from_prefix(prefix: &[u8; RECORD_PREFIX_BYTES]) -> Result<usize, CorruptRecord> {
    let body_length = u32_at(prefix, 0);
    if (body_length as usize) < RECORD_FIXED_BODY_BYTES {
        return Err(CorruptRecord::BodyTooShort { body_length });
    }
    if body_length > MAX_RECORD_BODY_BYTES {
        return Err(CorruptRecord::BodyTooLong { body_length });
    }
    Ok(RECORD_PREFIX_BYTES + body_length as usize)
}

/// Offset and timestamp from the first [`RECORD_HEADER_BYTES`] of a record, without
/// checking the checksum (which needs the whole record). Used to skip over records
/// that a reader does not want.
pub fn peek_offset_and_timestamp(header: &[u8; RECORD_HEADER_BYTES]) -> (u64, i64) {
    let offset = u64_at(header, RECORD_PREFIX_BYTES);
    let timestamp_ms = u64_at(header, RECORD_PREFIX_BYTES + 8) as i64;
    (offset, timestamp_ms)
}

/// Decodes the record at the start of `buffer`, verifying its checksum.
pub fn decode_record(buffer: &[u8]) -> Decoded<'_> {
    let Some(prefix) = buffer.get(..RECORD_PREFIX_BYTES) else {
        return Decoded::Incomplete {
            needed_bytes: RECORD_PREFIX_BYTES,
        };
    };
    let mut prefix_array = [0u8; RECORD_PREFIX_BYTES];
    prefix_array.copy_from_slice(prefix);
    let encoded_bytes = match record_len_from_prefix(&prefix_array) {
        Ok(length) => length,
        Err(reason) => return Decoded::Corrupt(reason),
    };
    let Some(body) = buffer.get(RECORD_PREFIX_BYTES..encoded_bytes) else {
        return Decoded::Incomplete {
            needed_bytes: encoded_bytes,
        };
    };
    let stored = u32_at(prefix, 4);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Decoded::Corrupt(CorruptRecord::ChecksumMismatch { stored, computed });
    }
    let body_length = body.len() as u32;
    let agent_id_length = u16_at(body, 26);
    let agent_id_end = RECORD_FIXED_BODY_BYTES + agent_id_length as usize;
    let Some(agent_id_bytes) = body.get(RECORD_FIXED_BODY_BYTES..agent_id_end) else {
        return Decoded::Corrupt(CorruptRecord::AgentIdOverrun {
            agent_id_length,
            body_length,
        });
    };
    let Ok(agent_id) = std::str::from_utf8(agent_id_bytes) else {
        return Decoded::Corrupt(CorruptRecord::AgentIdNotUtf8);
    };
    let meta = RecordMeta {
        offset: u64_at(body, 0),
        timestamp_ms: u64_at(body, 8) as i64,
        batch_seq: u64_at(body, 16),
        protocol_version: u16_at(body, 24),
        agent_id,
    };
    let value = &body[agent_id_end..];
    Decoded::Record {
        record: RecordView { meta, value },
        encoded_bytes,
    }
}

/// Where a whole record sits in a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLocation {
    pub offset: u64,
    pub timestamp_ms: i64,
    /// Byte position of the record's first byte in the segment file.
    pub position: u64,
    pub encoded_bytes: u32,
}

/// Why a scan stopped before the end of the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// The remaining bytes are the start of a record that was never completely written.
    NeedMore { needed_bytes: usize },
    /// The bytes at the scan position are not a valid next record.
    Corrupt(CorruptRecord),
}

/// Walks the records of one segment, checking that each is whole, intact and follows
/// its predecessor (offsets consecutive, timestamps non-decreasing).
///
/// It holds no buffer: the caller passes bytes that start at [`Self::position`], and
/// the scanner reports how many it consumed. So the same code scans a whole file held
/// in memory (tests) or a file read in bounded chunks (recovery on open).
#[derive(Debug, Clone)]
pub struct SegmentScanner {
    next_offset: u64,
    position: u64,
    last_timestamp_ms: Option<i64>,
}

impl SegmentScanner {
    /// A scanner for a segment whose first record has `base_offset`, positioned just
    /// after the magic.
    pub fn new(base_offset: u64) -> Self {
        Self {
            next_offset: base_offset,
            position: SEGMENT_MAGIC.len() as u64,
            last_timestamp_ms: None,
        }
    }

    /// File position of the next byte the scanner expects.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Offset the next record must have.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn last_timestamp_ms(&self) -> Option<i64> {
        self.last_timestamp_ms
    }

    /// Scans whole records from `bytes` (which start at [`Self::position`]), calling
    /// `on_record` for each, and returns the number of bytes consumed and why it
    /// stopped (`NeedMore` when `bytes` ends inside or at the end of a record).
    pub fn scan(
        &mut self,
        bytes: &[u8],
        mut on_record: impl FnMut(RecordLocation, &RecordView<'_>),
    ) -> (usize, ScanStop) {
        let mut consumed = 0usize;
        loop {
            let rest = &bytes[consumed..];
            match decode_record(rest) {
                Decoded::Incomplete { needed_bytes } => {
                    return (consumed, ScanStop::NeedMore { needed_bytes })
                }
                Decoded::Corrupt(reason) => return (consumed, ScanStop::Corrupt(reason)),
                Decoded::Record {
                    record,
                    encoded_bytes,
                } => {
                    if record.meta.offset != self.next_offset {
                        let reason = CorruptRecord::OffsetOutOfSequence {
                            expected: self.next_offset,
                            found: record.meta.offset,
                        };
                        return (consumed, ScanStop::Corrupt(reason));
                    }
                    if let Some(previous_ms) = self.last_timestamp_ms {
                        if record.meta.timestamp_ms < previous_ms {
                            let reason = CorruptRecord::TimestampWentBack {
                                previous_ms,
                                found_ms: record.meta.timestamp_ms,
                            };
                            return (consumed, ScanStop::Corrupt(reason));
                        }
                    }
                    let location = RecordLocation {
                        offset: record.meta.offset,
                        timestamp_ms: record.meta.timestamp_ms,
                        position: self.position,
                        encoded_bytes: encoded_bytes as u32,
                    };
                    on_record(location, &record);
                    self.next_offset += 1;
                    self.position += encoded_bytes as u64;
                    self.last_timestamp_ms = Some(record.meta.timestamp_ms);
                    consumed += encoded_bytes;
                }
            }
        }
    }
}

/// What a whole segment held, as found by [`recover_segment`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRecovery {
    /// Every whole, intact record before the first problem, in order.
    pub records: Vec<RecordLocation>,
    /// Length of the valid prefix of the segment: truncate the file to this.
    pub valid_bytes: u64,
    /// Why the valid prefix ends before the file does, if it does. `NeedMore` means a
    /// torn tail (a write cut short); `Corrupt` means damaged bytes.
    pub stop: Option<ScanStop>,
}

/// Recovers a segment held entirely in `bytes`. A file too short to hold the magic is
/// an unfinished segment creation and recovers as empty; a wrong magic is corruption
/// at position 0.
pub fn recover_segment(bytes: &[u8], base_offset: u64) -> SegmentRecovery {
    let magic_len = SEGMENT_MAGIC.len();
    if bytes.len() < magic_len {
        let stop = (!bytes.is_empty()).then_some(ScanStop::NeedMore {
            needed_bytes: magic_len,
        });
        return SegmentRecovery {
            records: Vec::new(),
            valid_bytes: 0,
            stop,
        };
    }
    if bytes[..magic_len] != SEGMENT_MAGIC {
        return SegmentRecovery {
            records: Vec::new(),
            valid_bytes: 0,
            stop: Some(ScanStop::Corrupt(CorruptRecord::BadMagic)),
        };
    }
    let mut scanner = SegmentScanner::new(base_offset);
    let mut records = Vec::new();
    let (consumed, stop) = scanner.scan(&bytes[magic_len..], |location, _| records.push(location));
    let valid_bytes = (magic_len + consumed) as u64;
    let stop = match stop {
        ScanStop::NeedMore { .. } if valid_bytes == bytes.len() as u64 => None,
        other => Some(other),
    };
    SegmentRecovery {
        records,
        valid_bytes,
        stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build_segment(base_offset: u64, values: &[(String, Vec<u8>)]) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = SEGMENT_MAGIC.to_vec();
        let mut ends = Vec::new();
        for (index, (agent_id, value)) in values.iter().enumerate() {
            let meta = RecordMeta {
                offset: base_offset + index as u64,
                timestamp_ms: 1_000 + index as i64,
                agent_id,
                batch_seq: index as u64 * 3,
                protocol_version: 1,
            };
            encode_record(&meta, value, &mut bytes);
            ends.push(bytes.len() as u64);
        }
        (bytes, ends)
    }

    fn records_strategy() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        prop::collection::vec(
            (
                "[a-z0-9-]{0,12}",
                prop::collection::vec(any::<u8>(), 0..300),
            ),
            0..12,
        )
    }

    #[test]
    fn round_trip_one_record() {
        let meta = RecordMeta {
            offset: 7,
            timestamp_ms: -5,
            agent_id: "gw-1",
            batch_seq: 42,
            protocol_version: 3,
        };
        let mut bytes = Vec::new();
        encode_record(&meta, b"hello", &mut bytes);
        assert_eq!(bytes.len(), encoded_len("gw-1", 5));
        match decode_record(&bytes) {
            Decoded::Record {
                record,
                encoded_bytes,
            } => {
                assert_eq!(encoded_bytes, bytes.len());
                assert_eq!(record.meta, meta);
                assert_eq!(record.value, b"hello");
            }
            other => panic!("expected a record, got {other:?}"),
        }
        let mut header = [0u8; RECORD_HEADER_BYTES];
        header.copy_from_slice(&bytes[..RECORD_HEADER_BYTES]);
        assert_eq!(peek_offset_and_timestamp(&header), (7, -5));
    }

    #[test]
    fn garbage_length_is_corruption_not_allocation() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(matches!(
            decode_record(&bytes),
            Decoded::Corrupt(CorruptRecord::BodyTooLong { .. })
        ));
        let zeros = [0u8; 64];
        assert!(matches!(
            decode_record(&zeros),
            Decoded::Corrupt(CorruptRecord::BodyTooShort { .. })
        ));
    }

    #[test]
    fn short_file_recovers_empty() {
        let recovery = recover_segment(&SEGMENT_MAGIC[..3], 10);
        assert!(recovery.records.is_empty());
        assert_eq!(recovery.valid_bytes, 0);
        assert!(
            recover_segment(b"NOTALOG!xxxx", 0).stop
                == Some(ScanStop::Corrupt(CorruptRecord::BadMagic))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any prefix of a valid segment recovers exactly the records that end at or
        /// before the cut, and the valid length is the end of the last of them.
        #[test]
        fn any_truncation_recovers_the_complete_records(values in records_strategy(), base_offset in 0u64..1_000_000, cut_fraction in 0.0f64..=1.0) {
            let (bytes, ends) = build_segment(base_offset, &values);
            let cut = ((bytes.len() as f64) * cut_fraction) as usize;
            let recovery = recover_segment(&bytes[..cut], base_offset);
            let complete = ends.iter().filter(|end| **end as usize <= cut).count();
            prop_assert_eq!(recovery.records.len(), complete);
            for (index, location) in recovery.records.iter().enumerate() {
                prop_assert_eq!(location.offset, base_offset + index as u64);
            }
            let expected_valid = if cut < SEGMENT_MAGIC.len() { 0 } else if complete == 0 { SEGMENT_MAGIC.len() as u64 } else { ends[complete - 1] };
            prop_assert_eq!(recovery.valid_bytes, expected_valid);
            prop_assert_eq!(recovery.stop.is_none(), cut == 0 || cut as u64 == expected_valid);
        }

        /// Flipping any bit of a record is detected: the scan stops at or before that
        /// record, never returns it, and never returns a record after it.
        #[test]
        fn a_flipped_bit_is_detected(values in records_strategy().prop_filter("needs a record", |v| !v.is_empty()), pick in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (mut bytes, ends) = build_segment(0, &values);
            let flip_at = SEGMENT_MAGIC.len() + pick.index(bytes.len() - SEGMENT_MAGIC.len());
            bytes[flip_at] ^= 1 << bit;
            let damaged_record = ends.iter().position(|end| (flip_at as u64) < *end).unwrap_or(ends.len());
            let recovery = recover_segment(&bytes, 0);
            prop_assert_eq!(recovery.records.len(), damaged_record);
            prop_assert!(recovery.stop.is_some());
        }

        /// Feeding a segment in arbitrary chunks gives the same records as feeding it whole.
        #[test]
        fn chunked_scan_matches_whole_scan(values in records_strategy(), chunk_bytes in 1usize..700) {
            let (bytes, _) = build_segment(5, &values);
            let whole = recover_segment(&bytes, 5);
            let mut scanner = SegmentScanner::new(5);
            let mut found = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            for chunk in bytes[SEGMENT_MAGIC.len()..].chunks(chunk_bytes) {
                pending.extend_from_slice(chunk);
                let (consumed, stop) = scanner.scan(&pending, |location, _| found.push(location));
                prop_assert!(matches!(stop, ScanStop::NeedMore { .. }), "unexpected stop {:?}", stop);
                pending.drain(..consumed);
            }
            prop_assert!(pending.is_empty());
            prop_assert_eq!(found, whole.records);
        }
    }
}
