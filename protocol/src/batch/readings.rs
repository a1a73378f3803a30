//! The column codec for raw readings.
//!
//! Readings are sorted by (series, time) and cut into runs, one per series. Each
//! run costs a few bytes in the `runs` column (series id delta, length, value
//! mode); its timestamps go to the `times` column as a first-time delta against the
//! previous run followed by delta-of-delta (a 1 Hz sensor then costs one zero byte
//! per reading before compression, almost nothing after); its values go to the
//! `values` column through the cheapest of three codecs:
//!
//! - decimal, delta: the run's values are exact decimals at some scale (0.01 degC,
//!   0.1 hPa, whole ADC counts), so they become integers and each is stored as the
//!   zigzag delta from the previous one (good for drifting or counting signals);
//! - decimal, offset: the same integers stored as offsets from the run's first
//!   value (good for noise around a level, where deltas double the variance);
//! - raw: anything else (including NaN, infinities and negative zero) as the
//!   big-endian XOR of successive f64 bit patterns, so values round-trip bit-exact.
//!
//! Flags are almost always zero, so they are sparse: (index gap, flag) pairs.
//! The columns are concatenated and compressed together by the caller.

use super::varint::{self, Reader};
use super::BatchError;
use crate::model::{Reading, SeriesId};

/// Highest decimal scale tried: values with more than nine decimals go raw.
pub(crate) const MAX_DECIMAL_SCALE: u8 = 9;
pub(crate) const POWERS_OF_TEN: [f64; MAX_DECIMAL_SCALE as usize + 1] =
    [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
/// Integers beyond 2^53 are not all representable as f64, so the decimal codec
/// stops there.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

const MODE_DECIMAL_DELTA: u8 = 0x00;
const MODE_DECIMAL_OFFSET: u8 = 0x10;
const MODE_RAW_XOR: u8 = 0x20;

/// Reusable output buffers of the reading columns.
#[derive(Debug, Default)]
pub(crate) struct ReadingColumns {
    pub(crate) runs: Vec<u8>,
    pub(crate) times: Vec<u8>,
    pub(crate) values: Vec<u8>,
    pub(crate) flags: Vec<u8>,
    integers: Vec<i64>,
}

impl ReadingColumns {
    fn clear(&mut self) {
        self.runs.clear();
        self.times.clear();
        self.values.clear();
        self.flags.clear();
    }
}

/// True when readings are already in the canonical order the codec stores.
pub(crate) fn is_canonical(readings: &[Reading]) -> bool {
    readings
        .windows(2)
        .all(|pair| (pair[0].series, pair[0].time_ms) <= (pair[1].series, pair[1].time_ms))
}

/// Encodes readings that are in canonical order; returns the number of runs.
pub(crate) fn encode(sorted: &[Reading], created_ms: i64, columns: &mut ReadingColumns) -> usize {
    columns.clear();
    let mut run_count = 0;
    let mut previous_series: SeriesId = 0;
    let mut previous_first_time_ms = created_ms;
    let mut start = 0;
    while start < sorted.len() {
        let series = sorted[start].series;
        let length = sorted[start..]
            .iter()
            .take_while(|reading| reading.series == series)
            .count();
        let run = &sorted[start..start + length];

        varint::write_u64(
            &mut columns.runs,
            u64::from(series.wrapping_sub(previous_series)),
        );
        varint::write_u64(&mut columns.runs, length as u64);
        let mode = encode_values(run, columns);
        columns.runs.push(mode);

        let first_time_ms = run[0].time_ms;
        varint::write_i64(
            &mut columns.times,
            first_time_ms.wrapping_sub(previous_first_time_ms),
        );
        let mut previous_time_ms = first_time_ms;
        let mut previous_delta_ms = 0i64;
        for reading in &run[1..] {
            let delta_ms = reading.time_ms.wrapping_sub(previous_time_ms);
            varint::write_i64(&mut columns.times, delta_ms.wrapping_sub(previous_delta_ms));
            previous_delta_ms = delta_ms;
            previous_time_ms = reading.time_ms;
        }

        previous_series = series;
        previous_first_time_ms = first_time_ms;
        run_count += 1;
        start += length;
    }

    let mut next_index = 0usize;
    for (index, reading) in sorted.iter().enumerate() {
        if reading.flags != 0 {
            varint::write_u64(&mut columns.flags, (index - next_index) as u64);
            columns.flags.push(reading.flags);
            next_index = index + 1;
        }
    }
    run_count
}

/// The integer for `value` at `scale`, if the decoder's `integer / 10^scale`
/// reproduces `value` bit for bit.
#[inline]
pub(crate) fn decimal_integer(value: f64, scale: u8) -> Option<i64> {
    let power = POWERS_OF_TEN[usize::from(scale)];
    let rounded = (value * power).round();
    if rounded.is_nan() || rounded.abs() > MAX_EXACT_INTEGER {
        return None;
    }
    // Check what the decoder computes, from the integer (this is what turns away
    // negative zero: its integer is plain 0).
    let integer = rounded as i64;
    ((integer as f64 / power).to_bits() == value.to_bits()).then_some(integer)
}

/// The smallest scale at which every value of the run is an exact decimal.
fn run_decimal_scale(run: &[Reading]) -> Option<u8> {
    let mut scale = 0u8;
    for reading in run {
        while decimal_integer(reading.value, scale).is_none() {
            scale += 1;
            if scale > MAX_DECIMAL_SCALE {
                return None;
            }
        }
    }
    Some(scale)
}

#[inline]
fn bit_length(value: u64) -> u64 {
    u64::from(64 - value.leading_zeros())
}

/// Writes the run's values and returns the mode byte that tells the decoder how.
fn encode_values(run: &[Reading], columns: &mut ReadingColumns) -> u8 {
    let integers = &mut columns.integers;
    integers.clear();
    let scale = run_decimal_scale(run).and_then(|scale| {
        // Scales are monotone for exact decimals, but verify the chosen one for
        // every value rather than rely on it.
        for reading in run {
            integers.push(decimal_integer(reading.value, scale)?);
        }
        Some(scale)
    });
    let values = &mut columns.values;
    let Some(scale) = scale else {
        let mut previous_bits = 0u64;
        for reading in run {
            let bits = reading.value.to_bits();
            values.extend_from_slice(&(bits ^ previous_bits).to_be_bytes());
            previous_bits = bits;
        }
        return MODE_RAW_XOR;
    };

    let first = integers[0];
    let mut delta_cost = 0u64;
    let mut offset_cost = 0u64;
    for pair in integers.windows(2) {
        delta_cost += bit_length(varint::zigzag(pair[1].wrapping_sub(pair[0])));
        offset_cost += bit_length(varint::zigzag(pair[1].wrapping_sub(first)));
    }
    varint::write_i64(values, first);
    if offset_cost < delta_cost {
        for &integer in &integers[1..] {
            varint::write_i64(values, integer.wrapping_sub(first));
        }
        MODE_DECIMAL_OFFSET | scale
    } else {
        let mut previous = first;
        for &integer in &integers[1..] {
            varint::write_i64(values, integer.wrapping_sub(previous));
            previous = integer;
        }
        MODE_DECIMAL_DELTA | scale
    }
}

/// The column slices of one batch body, as found by the envelope parser.
pub(crate) struct EncodedColumns<'a> {
    pub(crate) runs: &'a [u8],
    pub(crate) times: &'a [u8],
    pub(crate) values: &'a [u8],
    pub(crate) flags: &'a [u8],
}

/// Decodes `reading_count` readings in `run_count` runs, appending to `out`, which
/// the caller has already sized after checking the counts against the limits.
pub(crate) fn decode(
    columns: EncodedColumns<'_>,
    run_count: usize,
    reading_count: usize,
    created_ms: i64,
    out: &mut Vec<Reading>,
) -> Result<(), BatchError> {
    let mut runs = Reader::new(columns.runs, "run column");
    let mut times = Reader::new(columns.times, "timestamp column");
    let mut values = Reader::new(columns.values, "value column");
    let base = out.len();
    let mut series: u64 = 0;
    let mut previous_first_time_ms = created_ms;
    for _ in 0..run_count {
        series = series.wrapping_add(runs.read_u64()?);
        let series_id = SeriesId::try_from(series)
            .map_err(|_| BatchError::SeriesIdOutOfRange { value: series })?;
        let length = runs.read_usize()?;
        let mode = runs.read_u8()?;
        let decoded = out.len() - base;
        if length == 0 || length > reading_count - decoded {
            return Err(BatchError::RunLengthsMismatch {
                declared_readings: reading_count as u64,
                run_length: length as u64,
                already_decoded: decoded as u64,
            });
        }

        let first_time_ms = previous_first_time_ms.wrapping_add(times.read_i64()?);
        previous_first_time_ms = first_time_ms;
        let mut time_ms = first_time_ms;
        let mut delta_ms = 0i64;

        match mode & 0xf0 {
            MODE_RAW_XOR if mode == MODE_RAW_XOR => {
                let mut bits = 0u64;
                for index in 0..length {
                    if index > 0 {
                        delta_ms = delta_ms.wrapping_add(times.read_i64()?);
                        time_ms = time_ms.wrapping_add(delta_ms);
                    }
                    bits ^= values.read_u64_be()?;
                    out.push(Reading {
                        series: series_id,
                        time_ms,
                        value: f64::from_bits(bits),
                        flags: 0,
                    });
                }
            }
            MODE_DECIMAL_DELTA | MODE_DECIMAL_OFFSET if (mode & 0x0f) <= MAX_DECIMAL_SCALE => {
                let power = POWERS_OF_TEN[usize::from(mode & 0x0f)];
                let is_offset = mode & 0xf0 == MODE_DECIMAL_OFFSET;
                let first = values.read_i64()?;
                let mut integer = first;
                out.push(Reading {
                    series: series_id,
                    time_ms,
                    value: integer as f64 / power,
                    flags: 0,
                });
                for _ in 1..length {
                    delta_ms = delta_ms.wrapping_add(times.read_i64()?);
                    time_ms = time_ms.wrapping_add(delta_ms);
                    let stored = values.read_i64()?;
                    integer = if is_offset {
                        first.wrapping_add(stored)
                    } else {
                        integer.wrapping_add(stored)
                    };
                    out.push(Reading {
                        series: series_id,
                        time_ms,
                        value: integer as f64 / power,
                        flags: 0,
                    });
                }
            }
            _ => return Err(BatchError::UnknownValueMode { mode }),
        }
    }
    let decoded = out.len() - base;
    if decoded != reading_count {
        return Err(BatchError::RunLengthsMismatch {
            declared_readings: reading_count as u64,
            run_length: 0,
            already_decoded: decoded as u64,
        });
    }
    for reader in [&runs, &times, &values] {
        if !reader.is_empty() {
            return Err(BatchError::TrailingBytes {
                section: reader.column(),
                count: reader.remaining().len() as u64,
            });
        }
    }

    let mut flags = Reader::new(columns.flags, "flag column");
    let mut next_index = 0usize;
    while !flags.is_empty() {
        let gap = flags.read_usize()?;
        let flag = flags.read_u8()?;
        let index = next_index
            .checked_add(gap)
            .filter(|&index| index < reading_count)
            .ok_or(BatchError::FlagIndexOutOfRange {
                gap: gap as u64,
                readings: reading_count as u64,
            })?;
        if let Some(reading) = out.get_mut(base + index) {
            reading.flags = flag;
        }
        next_index = index + 1;
    }
    Ok(())
}
