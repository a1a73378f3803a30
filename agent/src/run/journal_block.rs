//! The acknowledgement journal's block format: readings delta-encoded, ~10 bytes each.
//!
//! Why: the journal holds every reading of every open window until its batch is durable,
//! and sled keeps the blocks in memory while they live. At 23 bytes a reading (source,
//! series, time, value, flags written out in full) the journal was the largest single item
//! of the agent process's heap with 10k series at QoS 1 (7.2 MiB of ~25 MiB live at the
//! peak, `docs/benchmarks.md`, "Session 7: the agent process's memory"). Readings of one
//! block are mostly of one source, with consecutive series ids and equal or close
//! timestamps (a device's message), so only the value needs its full 8 bytes.
//!
//! Layout of a block (one sled value, keyed by its first reading's journal sequence number):
//!
//! - [`BLOCK_TAG`], then the number of readings as a big-endian `u32`;
//! - per reading: a control byte, then the fields its bits announce, then the value's 8
//!   bytes (`f64` bits, big-endian):
//!   - [`SOURCE_CHANGED`]: the source index, LEB128;
//!   - [`SERIES_JUMP`]: series id minus (previous series id + 1), zigzag LEB128 (without
//!     the bit the series is the previous one's id plus one);
//!   - [`TIME_CHANGED`]: time minus the previous reading's time in ms, zigzag LEB128;
//!   - [`FLAGS_FOLLOW`]: the flags byte (without the bit the flags are 0).
//!
//!   The "previous" values start at source 0, series id -1 and time 0 in every block, so
//!   a block decodes on its own.
//!
//! Blocks written before this format (23 bytes per reading, no header) still replay: their
//! first byte is the high byte of a source index, never [`BLOCK_TAG`] (a source index would
//! have to reach 65,024).

use tributary_protocol::batch::varint::{unzigzag, write_i64, write_u64};
use tributary_protocol::model::Reading;

use crate::aggregate::SourceIndex;

/// First byte of a block in this format.
pub const BLOCK_TAG: u8 = 0xFE;
/// Tag and reading count.
pub const HEADER_BYTES: usize = 1 + 4;
/// Bytes of one reading in blocks of the first format (source, series, time, value, flags).
pub const LEGACY_READING_BYTES: usize = 2 + 4 + 8 + 8 + 1;

/// Control-byte bits.
pub const SOURCE_CHANGED: u8 = 0b0001;
pub const SERIES_JUMP: u8 = 0b0010;
pub const TIME_CHANGED: u8 = 0b0100;
pub const FLAGS_FOLLOW: u8 = 0b1000;
const KNOWN_BITS: u8 = SOURCE_CHANGED | SERIES_JUMP | TIME_CHANGED | FLAGS_FOLLOW;

/// What the delta encoding compares a reading with.
#[derive(Debug, Clone, Copy)]
struct Previous {
    source: SourceIndex,
    series: i64,
    time_ms: i64,
}

impl Previous {
    const START: Previous = Previous {
        source: 0,
        series: -1,
        time_ms: 0,
    };
}

/// The block being filled between two commits.
#[derive(Debug)]
pub struct BlockWriter {
    bytes: Vec<u8>,
    readings: u32,
    previous: Previous,
}

impl Default for BlockWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockWriter {
    pub fn new() -> Self {
        Self {
            bytes: Vec::new(),
            readings: 0,
            previous: Previous::START,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.readings == 0
    }

    /// Bytes the block holds so far (header included once a reading is in).
    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn push(&mut self, source: SourceIndex, reading: &Reading) {
        if self.readings == 0 {
            self.bytes.push(BLOCK_TAG);
            self.bytes.extend_from_slice(&[0; 4]);
        }
        let previous = self.previous;
        let series = i64::from(reading.series);
        let series_jump = series - (previous.series + 1);
        let time_delta = reading.time_ms.wrapping_sub(previous.time_ms);
        let mut control = 0u8;
        if source != previous.source {
            control |= SOURCE_CHANGED;
        }
        if series_jump != 0 {
            control |= SERIES_JUMP;
        }
        if time_delta != 0 {
            control |= TIME_CHANGED;
        }
        if reading.flags != 0 {
            control |= FLAGS_FOLLOW;
        }
        self.bytes.push(control);
        if control & SOURCE_CHANGED != 0 {
            write_u64(&mut self.bytes, source as u64);
        }
        if control & SERIES_JUMP != 0 {
            write_i64(&mut self.bytes, series_jump);
        }
        if control & TIME_CHANGED != 0 {
            write_i64(&mut self.bytes, time_delta);
        }
        if control & FLAGS_FOLLOW != 0 {
            self.bytes.push(reading.flags);
        }
        self.bytes
            .extend_from_slice(&reading.value.to_bits().to_be_bytes());
        self.readings += 1;
        self.previous = Previous {
            source,
            series,
            time_ms: reading.time_ms,
        };
    }

    /// The finished block (empty if no reading was pushed); the writer starts a new one.
    pub fn take(&mut self) -> Vec<u8> {
        if let Some(count) = self.bytes.get_mut(1..HEADER_BYTES) {
            count.copy_from_slice(&self.readings.to_be_bytes());
        }
        self.readings = 0;
        self.previous = Previous::START;
        // The next block grows again from small: a burst's 64 KiB is not kept per commit.
        std::mem::take(&mut self.bytes)
    }
}

/// Why a stored block cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDefect(pub String);

/// How many readings a stored block holds, from its header alone (or, for the first
/// format, its length). `None` if the block is malformed.
pub fn reading_count(block: &[u8]) -> Option<u64> {
    match block.first() {
        Some(&BLOCK_TAG) => {
            let count: [u8; 4] = block.get(1..HEADER_BYTES)?.try_into().ok()?;
            Some(u64::from(u32::from_be_bytes(count)))
        }
        Some(_) if block.len() % LEGACY_READING_BYTES == 0 => {
            Some((block.len() / LEGACY_READING_BYTES) as u64)
        }
        _ => None,
    }
}

/// Decodes a stored block of either format into `out` (cleared first).
pub fn decode(block: &[u8], out: &mut Vec<(SourceIndex, Reading)>) -> Result<(), BlockDefect> {
    out.clear();
    match block.first() {
        None => Err(BlockDefect("the block is empty".to_owned())),
        Some(&BLOCK_TAG) => decode_delta(block, out),
        Some(_) => decode_legacy(block, out),
    }
}

fn decode_legacy(block: &[u8], out: &mut Vec<(SourceIndex, Reading)>) -> Result<(), BlockDefect> {
    if block.len() % LEGACY_READING_BYTES != 0 {
        return Err(BlockDefect(format!(
            "value is {} bytes, expected a non-zero multiple of {LEGACY_READING_BYTES}",
            block.len()
        )));
    }
    for record in block.chunks_exact(LEGACY_READING_BYTES) {
        let mut input = Input(record);
        let source = usize::from(u16::from_be_bytes(input.array()?));
        let series = u32::from_be_bytes(input.array()?);
        let time_ms = i64::from_be_bytes(input.array()?);
        let value = f64::from_bits(u64::from_be_bytes(input.array()?));
        let [flags] = input.array()?;
        out.push((
            source,
            Reading {
                series,
                time_ms,
                value,
                flags,
            },
        ));
    }
    Ok(())
}

fn decode_delta(block: &[u8], out: &mut Vec<(SourceIndex, Reading)>) -> Result<(), BlockDefect> {
    let mut input = Input(block.get(1..).unwrap_or_default());
    let count = u32::from_be_bytes(input.array()?);
    let mut previous = Previous::START;
    for index in 0..count {
        let [control] = input.array()?;
        if control & !KNOWN_BITS != 0 {
            return Err(BlockDefect(format!(
                "reading {index}: unknown control bits {control:#010b}"
            )));
        }
        let source = if control & SOURCE_CHANGED != 0 {
            usize::try_from(input.varint()?)
                .map_err(|_| BlockDefect(format!("reading {index}: source index too large")))?
        } else {
            previous.source
        };
        let series = if control & SERIES_JUMP != 0 {
            (previous.series + 1).checked_add(unzigzag(input.varint()?))
        } else {
            Some(previous.series + 1)
        };
        let series = series
            .and_then(|series| u32::try_from(series).ok())
            .ok_or_else(|| BlockDefect(format!("reading {index}: series id out of range")))?;
        let time_ms = if control & TIME_CHANGED != 0 {
            previous.time_ms.wrapping_add(unzigzag(input.varint()?))
        } else {
            previous.time_ms
        };
        let flags = if control & FLAGS_FOLLOW != 0 {
            let [flags] = input.array()?;
            flags
        } else {
            0
        };
        let value = f64::from_bits(u64::from_be_bytes(input.array()?));
        out.push((
            source,
            Reading {
                series,
                time_ms,
                value,
                flags,
            },
        ));
        previous = Previous {
            source,
            series: i64::from(series),
            time_ms,
        };
    }
    if !input.0.is_empty() {
        return Err(BlockDefect(format!(
            "{} bytes after the {count} readings the header announces",
            input.0.len()
        )));
    }
    Ok(())
}

/// The unread rest of a block.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], BlockDefect> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| BlockDefect("the block ends inside a reading".to_owned()))?;
        self.0 = rest;
        Ok(*head)
    }

    fn varint(&mut self) -> Result<u64, BlockDefect> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let [byte] = self.array()?;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(BlockDefect("a number is longer than 10 bytes".to_owned()))
    }
}

/// A block as builds before this format wrote it (tests of the upgrade path).
#[cfg(test)]
pub(crate) fn legacy_block(readings: &[(SourceIndex, Reading)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (source, reading) in readings {
        block.extend_from_slice(&(*source as u16).to_be_bytes());
        block.extend_from_slice(&reading.series.to_be_bytes());
        block.extend_from_slice(&reading.time_ms.to_be_bytes());
        block.extend_from_slice(&reading.value.to_bits().to_be_bytes());
        block.push(reading.flags);
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reading(series: u32, time_ms: i64, value: f64, flags: u8) -> Reading {
        Reading {
            series,
            time_ms,
            value,
            flags,
        }
    }

    fn same(left: &[(SourceIndex, Reading)], right: &[(SourceIndex, Reading)]) -> bool {
        left.len() == right.len()
            && left.iter().zip(right).all(|((ls, l), (rs, r))| {
                ls == rs
                    && l.series == r.series
                    && l.time_ms == r.time_ms
                    && l.flags == r.flags
                    && l.value.to_bits() == r.value.to_bits()
            })
    }

    #[test]
    fn a_device_message_costs_nine_bytes_a_reading() {
        let mut writer = BlockWriter::new();
        let time_ms = 1_764_284_000_000;
        writer.push(0, &reading(0, time_ms, 1.5, 0));
        let after_first = writer.len_bytes();
        for series in 1..=9 {
            writer.push(0, &reading(series, time_ms, 20.0 + f64::from(series), 0));
        }
        assert_eq!(writer.len_bytes() - after_first, 9 * 9);
        let block = writer.take();
        assert_eq!(reading_count(&block), Some(10));
        assert!(writer.is_empty());
        let mut decoded = Vec::new();
        decode(&block, &mut decoded).expect("decodes");
        assert_eq!(decoded.len(), 10);
        assert_eq!(decoded[9].1.series, 9);
        assert_eq!(decoded[9].1.time_ms, time_ms);
    }

    #[test]
    fn blocks_of_the_first_format_still_decode() {
        let readings = vec![
            (0, reading(7, 1_000, 1.0, 0)),
            (2, reading(3, 900, -2.5, 1)),
        ];
        let block = legacy_block(&readings);
        assert_eq!(reading_count(&block), Some(2));
        let mut decoded = Vec::new();
        decode(&block, &mut decoded).expect("decodes");
        assert!(same(&decoded, &readings));
    }

    #[test]
    fn damaged_blocks_are_reported_not_panicked_on() {
        let mut writer = BlockWriter::new();
        writer.push(1, &reading(5, 10, 1.0, 1));
        writer.push(1, &reading(2, 5, 2.0, 0));
        let block = writer.take();
        let mut decoded = Vec::new();
        for cut in 0..block.len() {
            assert!(
                decode(&block[..cut], &mut decoded).is_err(),
                "{cut} bytes of {}",
                block.len()
            );
        }
        let mut longer = block.clone();
        longer.push(0);
        assert!(decode(&longer, &mut decoded).is_err());
        let mut unknown_bits = block.clone();
        unknown_bits[HEADER_BYTES] |= 0x80;
        assert!(decode(&unknown_bits, &mut decoded).is_err());
        assert!(decode(&[1, 2, 3], &mut decoded).is_err());
        assert_eq!(reading_count(&[1, 2, 3]), None);
        assert_eq!(reading_count(&[BLOCK_TAG, 0]), None);
    }

    proptest! {
        #[test]
        fn every_reading_comes_back_exactly(
            readings in proptest::collection::vec(
                (0usize..70_000, any::<u32>(), any::<i64>(), any::<u64>(), any::<u8>()),
                1..200,
            )
        ) {
            let readings: Vec<(SourceIndex, Reading)> = readings
                .into_iter()
                .map(|(source, series, time_ms, bits, flags)| {
                    (source, reading(series, time_ms, f64::from_bits(bits), flags))
                })
                .collect();
            let mut writer = BlockWriter::new();
            for (source, reading) in &readings {
                writer.push(*source, reading);
            }
            let block = writer.take();
            prop_assert_eq!(reading_count(&block), Some(readings.len() as u64));
            let mut decoded = Vec::new();
            prop_assert!(decode(&block, &mut decoded).is_ok());
            prop_assert!(same(&decoded, &readings));
        }
    }
}
