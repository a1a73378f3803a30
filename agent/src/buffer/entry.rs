//! The on-disk layout of one buffered batch: a fixed-size header followed by the
//! encoded batch, stored under its big-endian batch sequence number.
//!
//! The buffer must be able to account, drop and report on batches without decoding
//! the batch itself (that is the protocol crate's job and costs far more), so the
//! few facts the overflow policy and `inspect` need live in a small header of their
//! own. A CRC-32 over header and payload lets `verify` and replay tell a torn or
//! corrupted entry from a good one instead of handing garbage to the shipper.

use serde::{Deserialize, Serialize};

use super::error::EntryDefect;

/// Which kind of data a batch carries. The agent ships raw readings and window
/// summaries in separate batches so that, when the buffer is full, raw data can be
/// dropped first while the summaries keep the shape of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchClass {
    Raw,
    Summary,
}

impl BatchClass {
    pub const ALL: [BatchClass; 2] = [BatchClass::Raw, BatchClass::Summary];

    fn to_byte(self) -> u8 {
        match self {
            BatchClass::Raw => 1,
            BatchClass::Summary => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(BatchClass::Raw),
            2 => Some(BatchClass::Summary),
            _ => None,
        }
    }

    /// Position in per-class arrays (`[raw, summary]`).
    pub fn index(self) -> usize {
        match self {
            BatchClass::Raw => 0,
            BatchClass::Summary => 1,
        }
    }

    /// Whether an incoming batch of this class may evict a buffered batch of
    /// `buffered` to make room: raw data never pushes out a summary, a summary may push
    /// out anything (raw first, by the overflow policy's order).
    pub fn may_evict(self, buffered: BatchClass) -> bool {
        buffered.index() <= self.index()
    }

    pub fn name(self) -> &'static str {
        match self {
            BatchClass::Raw => "raw",
            BatchClass::Summary => "summary",
        }
    }
}

impl std::fmt::Display for BatchClass {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// What the caller tells the buffer about a batch when appending it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    pub class: BatchClass,
    /// When the agent created the batch (ms since the Unix epoch). Also serves as the
    /// buffer's notion of "now" for retrying a failed disk.
    pub created_ms: i64,
    /// Event time of the oldest reading or window start in the batch.
    pub oldest_event_ms: i64,
    /// Readings (raw) or window summaries (summary) in the batch; counted when dropped.
    pub reading_count: u32,
}

/// The stored header: the caller's [`BatchInfo`] plus the payload's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub class: BatchClass,
    pub created_ms: i64,
    pub oldest_event_ms: i64,
    pub reading_count: u32,
    pub payload_bytes: u32,
}

impl BatchHeader {
    pub fn info(&self) -> BatchInfo {
        BatchInfo {
            class: self.class,
            created_ms: self.created_ms,
            oldest_event_ms: self.oldest_event_ms,
            reading_count: self.reading_count,
        }
    }
}

const FORMAT_VERSION: u8 = 1;
const FIELDS_BYTES: usize = 1 + 1 + 8 + 8 + 4 + 4;
const CRC_BYTES: usize = 4;
/// Bytes of header in front of every stored payload.
pub const HEADER_BYTES: usize = FIELDS_BYTES + CRC_BYTES;
/// Bytes of a key (a big-endian `u64` batch sequence number).
pub const KEY_BYTES: usize = 8;

pub fn encode_key(batch_seq: u64) -> [u8; KEY_BYTES] {
    batch_seq.to_be_bytes()
}

pub fn decode_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; KEY_BYTES] = key.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Bytes an entry costs against `max_buffer_bytes`: key, header and payload.
pub fn accounted_bytes(payload_bytes: usize) -> u64 {
    (KEY_BYTES + HEADER_BYTES + payload_bytes) as u64
}

/// Builds the stored value: header then payload, checksummed together.
/// Fails only when the payload is larger than a `u32` can describe.
pub fn encode_value(info: &BatchInfo, payload: &[u8]) -> Option<Vec<u8>> {
    let payload_bytes = u32::try_from(payload.len()).ok()?;
    let mut value = Vec::with_capacity(HEADER_BYTES + payload.len());
    value.push(FORMAT_VERSION);
    value.push(info.class.to_byte());
    value.extend_from_slice(&info.created_ms.to_be_bytes());
    value.extend_from_slice(&info.oldest_event_ms.to_be_bytes());
    value.extend_from_slice(&info.reading_count.to_be_bytes());
    value.extend_from_slice(&payload_bytes.to_be_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&value);
    hasher.update(payload);
    value.extend_from_slice(&hasher.finalize().to_be_bytes());
    value.extend_from_slice(payload);
    Some(value)
}

fn read_array<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    bytes.get(offset..offset + N)?.try_into().ok()
}

/// Decodes only the header fields, without checking the payload. Used by the
/// accounting paths (overflow drops, open-time scan), which must work even on an
/// entry whose payload is damaged.
pub fn decode_header(value: &[u8]) -> Result<BatchHeader, EntryDefect> {
    if value.len() < HEADER_BYTES {
        return Err(EntryDefect::Truncated {
            value_bytes: value.len(),
        });
    }
    let version = value.first().copied().unwrap_or_default();
    if version != FORMAT_VERSION {
        return Err(EntryDefect::UnknownVersion { version });
    }
    let class_byte = value.get(1).copied().unwrap_or_default();
    let class =
        BatchClass::from_byte(class_byte).ok_or(EntryDefect::UnknownClass { class_byte })?;
    let truncated = || EntryDefect::Truncated {
        value_bytes: value.len(),
    };
    let created_ms = i64::from_be_bytes(read_array(value, 2).ok_or_else(truncated)?);
    let oldest_event_ms = i64::from_be_bytes(read_array(value, 10).ok_or_else(truncated)?);
    let reading_count = u32::from_be_bytes(read_array(value, 18).ok_or_else(truncated)?);
    let payload_bytes = u32::from_be_bytes(read_array(value, 22).ok_or_else(truncated)?);
    Ok(BatchHeader {
        class,
        created_ms,
        oldest_event_ms,
        reading_count,
        payload_bytes,
    })
}

/// Decodes the header and checks the payload's length and checksum.
/// Returns the header and the payload slice.
pub fn decode_value(value: &[u8]) -> Result<(BatchHeader, &[u8]), EntryDefect> {
    let header = decode_header(value)?;
    let payload = value.get(HEADER_BYTES..).unwrap_or_default();
    if payload.len() != header.payload_bytes as usize {
        return Err(EntryDefect::LengthMismatch {
            header_payload_bytes: header.payload_bytes,
            stored_payload_bytes: payload.len(),
        });
    }
    let stored_crc = u32::from_be_bytes(read_array(value, FIELDS_BYTES).ok_or(
        EntryDefect::Truncated {
            value_bytes: value.len(),
        },
    )?);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(value.get(..FIELDS_BYTES).unwrap_or_default());
    hasher.update(payload);
    let computed_crc = hasher.finalize();
    if computed_crc != stored_crc {
        return Err(EntryDefect::ChecksumMismatch {
            stored_crc,
            computed_crc,
        });
    }
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn class_strategy() -> impl Strategy<Value = BatchClass> {
        prop_oneof![Just(BatchClass::Raw), Just(BatchClass::Summary)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn value_round_trips(
            class in class_strategy(),
            created_ms in any::<i64>(),
            oldest_event_ms in any::<i64>(),
            reading_count in any::<u32>(),
            payload in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let info = BatchInfo { class, created_ms, oldest_event_ms, reading_count };
            let value = encode_value(&info, &payload).unwrap();
            prop_assert_eq!(value.len() as u64 + KEY_BYTES as u64, accounted_bytes(payload.len()));
            let (header, decoded_payload) = decode_value(&value).unwrap();
            prop_assert_eq!(header.info(), info);
            prop_assert_eq!(decoded_payload, &payload[..]);
        }

        #[test]
        fn any_single_byte_flip_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 1..256),
            position_seed in any::<usize>(),
            flip in 1u8..=255,
        ) {
            let info = BatchInfo { class: BatchClass::Raw, created_ms: 1, oldest_event_ms: 2, reading_count: 3 };
            let mut value = encode_value(&info, &payload).unwrap();
            let position = position_seed % value.len();
            value[position] ^= flip;
            prop_assert!(decode_value(&value).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_value(&bytes);
            let _ = decode_header(&bytes);
        }
    }

    #[test]
    fn keys_sort_in_sequence_order() {
        let mut keys: Vec<[u8; 8]> = [300u64, 2, 1 << 40, 255, 256]
            .iter()
            .map(|s| encode_key(*s))
            .collect();
        keys.sort();
        let seqs: Vec<u64> = keys.iter().map(|k| decode_key(k).unwrap()).collect();
        assert_eq!(seqs, vec![2, 255, 256, 300, 1 << 40]);
    }
}
