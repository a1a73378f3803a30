//! The compact column codec for window summaries (batch format 2).
//!
//! Why: a live gateway ships one summary per series per 10 s window next to the raw
//! readings. In format 1 each went as postcard (five f64 at 8 bytes, two i64 times, the
//! sketch with absolute bucket indices): about 60 bytes per summary after zstd, which
//! for 1 Hz series was more than the raw readings they summarise. Everything in a
//! summary is predictable from a few numbers, so this codec stores the predictions'
//! misses, bit-exact:
//!
//! - min, max, first and last are exact decimals at some scale for real sensor data
//!   (the same test the readings codec uses): they go as integers, min absolute and the
//!   other three as offsets from it;
//! - the sum of decimals is a decimal too, up to floating-point rounding: it goes as the
//!   integer `round(sum * 10^scale)` (as an offset from `count * min`) plus the distance
//!   in ulps between the float that integer gives back and the actual sum (usually 0 or
//!   a few ulps);
//! - times go as offsets: first time from the window start, last from the first;
//! - the sketch's highest bucket in each store is the bucket of max (or of -min for the
//!   negative store), so it goes as the difference from that prediction (usually 0),
//!   then counts and gaps downwards, each minus one (small, mostly zero bytes).
//!
//! Values that are not decimals up to nine places (or a summary that breaks the usual
//! invariants, like the empty summary's infinities) take the raw mode: the five floats'
//! bits, eight bytes each. Nothing is assumed that the encoder does not check, so any
//! `WindowSummary` round-trips bit-exact.
//!
//! Three columns, compressed with the rest of the batch body: heads (mode, series, window,
//! count, times), values and sketches; the same kinds of numbers sit together.

use super::readings::{decimal_integer, MAX_DECIMAL_SCALE, POWERS_OF_TEN};
use super::varint::{self, Reader};
use super::BatchError;
use crate::model::WindowSummary;
use crate::sketch::{bucket_index, BucketStore, Sketch, SketchError, MAX_BUCKETS_PER_STORE};
use crate::summary::Summary;

/// Mode byte: values at decimal scale 0..=9, or raw bits.
const MODE_RAW: u8 = 0x0f;

/// Reusable output buffers of the summary columns.
#[derive(Debug, Default)]
pub(crate) struct SummaryColumns {
    pub(crate) heads: Vec<u8>,
    pub(crate) values: Vec<u8>,
    pub(crate) sketches: Vec<u8>,
}

impl SummaryColumns {
    fn clear(&mut self) {
        self.heads.clear();
        self.values.clear();
        self.sketches.clear();
    }
}

/// The undecoded summary columns of a batch body.
pub(crate) struct EncodedSummaryColumns<'a> {
    pub(crate) heads: &'a [u8],
    pub(crate) values: &'a [u8],
    pub(crate) sketches: &'a [u8],
}

/// The decimal integers of a summary's values at one scale.
struct DecimalValues {
    scale: u8,
    min: i64,
    max: i64,
    first: i64,
    last: i64,
    /// `round(sum * 10^scale) - count * min`.
    sum_offset: i64,
    /// Ulps from `(count * min + sum_offset) / 10^scale` to the actual sum.
    sum_ulps: i64,
}

/// What the decoder computes from a sum's integer: the same expression on both sides.
#[inline]
fn sum_prediction(integer: i64, power: f64) -> f64 {
    integer as f64 / power
}

fn decimal_values(summary: &Summary) -> Option<DecimalValues> {
    let mut scale = 0u8;
    loop {
        let integers = (
            decimal_integer(summary.min, scale),
            decimal_integer(summary.max, scale),
            decimal_integer(summary.first_value, scale),
            decimal_integer(summary.last_value, scale),
        );
        if let (Some(min), Some(max), Some(first), Some(last)) = integers {
            let power = POWERS_OF_TEN[usize::from(scale)];
            let scaled_sum = (summary.sum * power).round();
            // Only sums whose integer fits comfortably in i64 (2^62) are predicted.
            if !scaled_sum.is_finite() || scaled_sum.abs() >= 4.6e18 {
                return None;
            }
            let sum_integer = scaled_sum as i64;
            let base = i128::from(summary.count) * i128::from(min);
            let sum_offset = i64::try_from(i128::from(sum_integer) - base).ok()?;
            let predicted = sum_prediction(sum_integer, power);
            let sum_ulps = summary.sum.to_bits().wrapping_sub(predicted.to_bits()) as i64;
            return Some(DecimalValues {
                scale,
                min,
                max,
                first,
                last,
                sum_offset,
                sum_ulps,
            });
        }
        scale += 1;
        if scale > MAX_DECIMAL_SCALE {
            return None;
        }
    }
}

/// The bucket the sketch's highest positive and highest negative-magnitude buckets are
/// predicted at: those of max and of -min.
fn predicted_highest(min: f64, max: f64) -> (i64, i64) {
    let predict = |magnitude: f64| {
        if magnitude.is_finite() && magnitude >= f64::MIN_POSITIVE {
            i64::from(bucket_index(magnitude))
        } else {
            0
        }
    };
    (predict(-min), predict(max))
}

fn encode_store(out: &mut Vec<u8>, store: &BucketStore, predicted: i64) {
    let count = store.buckets().count();
    varint::write_u64(out, count as u64);
    let mut previous: Option<i64> = None;
    for (index, bucket_count) in store.buckets().rev() {
        let index = i64::from(index);
        match previous {
            None => varint::write_i64(out, index.wrapping_sub(predicted)),
            Some(previous) => varint::write_u64(out, (previous - index - 1) as u64),
        }
        varint::write_u64(out, bucket_count.wrapping_sub(1));
        previous = Some(index);
    }
}

/// Appends the summaries to the three columns (cleared first).
pub(crate) fn encode(summaries: &[WindowSummary], created_ms: i64, columns: &mut SummaryColumns) {
    columns.clear();
    let mut previous_series = 0i64;
    let mut previous_window_start_ms = created_ms;
    for window in summaries {
        let summary = &window.summary;
        let decimal = decimal_values(summary);
        let heads = &mut columns.heads;
        heads.push(decimal.as_ref().map_or(MODE_RAW, |values| values.scale));
        let series = i64::from(window.series);
        varint::write_i64(heads, series - previous_series);
        varint::write_i64(
            heads,
            window
                .window_start_ms
                .wrapping_sub(previous_window_start_ms),
        );
        varint::write_u64(heads, u64::from(window.window_ms));
        varint::write_u64(heads, summary.count);
        varint::write_i64(
            heads,
            summary.first_time_ms.wrapping_sub(window.window_start_ms),
        );
        varint::write_i64(
            heads,
            summary.last_time_ms.wrapping_sub(summary.first_time_ms),
        );
        previous_series = series;
        previous_window_start_ms = window.window_start_ms;

        let values = &mut columns.values;
        match decimal {
            Some(decimal) => {
                varint::write_i64(values, decimal.min);
                for integer in [decimal.max, decimal.first, decimal.last] {
                    varint::write_i64(values, integer.wrapping_sub(decimal.min));
                }
                varint::write_i64(values, decimal.sum_offset);
                varint::write_i64(values, decimal.sum_ulps);
            }
            None => {
                for value in [
                    summary.min,
                    summary.max,
                    summary.first_value,
                    summary.last_value,
                    summary.sum,
                ] {
                    values.extend_from_slice(&value.to_bits().to_be_bytes());
                }
            }
        }

        let sketches = &mut columns.sketches;
        let (negative, positive) = summary.sketch.stores();
        let (predicted_negative, predicted_positive) = predicted_highest(summary.min, summary.max);
        varint::write_u64(sketches, summary.sketch.zero_count());
        encode_store(sketches, negative, predicted_negative);
        encode_store(sketches, positive, predicted_positive);
    }
}

fn sketch_error(index: usize, source: SketchError) -> BatchError {
    BatchError::SummarySketch {
        index: index as u64,
        source,
    }
}

fn decode_store(
    reader: &mut Reader<'_>,
    predicted: i64,
    index: usize,
    pairs: &mut Vec<(u32, u64)>,
) -> Result<BucketStore, BatchError> {
    let bucket_count = reader.read_usize()?;
    if bucket_count == 0 {
        return Ok(BucketStore::default());
    }
    if bucket_count > MAX_BUCKETS_PER_STORE {
        return Err(sketch_error(
            index,
            SketchError::TooManyBuckets {
                span_buckets: bucket_count as u64,
                max_buckets: MAX_BUCKETS_PER_STORE,
            },
        ));
    }
    // Read from the highest bucket down; `pairs` collects (gap below, count) in that order.
    pairs.clear();
    let highest = predicted.wrapping_add(reader.read_i64()?);
    if highest < i64::from(i32::MIN) || highest > i64::from(i32::MAX) {
        return Err(sketch_error(
            index,
            SketchError::IndexOverflow { position: 0 },
        ));
    }
    // At most 2048 gaps below 2048 each: no overflow of i64 from here.
    let mut lowest = highest;
    for position in 0..bucket_count {
        if position > 0 {
            let gap = reader.read_u64()?.saturating_add(1);
            if gap >= MAX_BUCKETS_PER_STORE as u64 {
                return Err(sketch_error(
                    index,
                    SketchError::TooManyBuckets {
                        span_buckets: gap.saturating_add(1),
                        max_buckets: MAX_BUCKETS_PER_STORE,
                    },
                ));
            }
            lowest -= gap as i64;
            if let Some(last) = pairs.last_mut() {
                last.0 = gap as u32;
            }
        }
        let count = reader.read_u64()?.wrapping_add(1);
        pairs.push((0, count));
    }
    if lowest < i64::from(i32::MIN) {
        return Err(sketch_error(
            index,
            SketchError::IndexOverflow {
                position: bucket_count - 1,
            },
        ));
    }
    // Each pair holds the gap down to the next lower bucket (0 for the lowest): reversed,
    // that is the ascending `(gap from the one below, count)` form the store is built from.
    pairs.reverse();
    BucketStore::from_sparse(lowest as i32, pairs).map_err(|source| sketch_error(index, source))
}

/// Decodes `summary_count` summaries from their columns into `out`.
pub(crate) fn decode(
    columns: EncodedSummaryColumns<'_>,
    summary_count: usize,
    created_ms: i64,
    out: &mut Vec<WindowSummary>,
) -> Result<(), BatchError> {
    // Every summary takes at least seven bytes of the heads column: a bound on the
    // allocation that only the input actually present can raise.
    if columns.heads.len() / 7 < summary_count {
        return Err(BatchError::Truncated {
            section: "summary heads",
        });
    }
    out.reserve(summary_count);
    let mut heads = Reader::new(columns.heads, "summary heads");
    let mut values = Reader::new(columns.values, "summary values");
    let mut sketches = Reader::new(columns.sketches, "summary sketches");
    let mut pairs = Vec::new();
    let mut previous_series = 0i64;
    let mut previous_window_start_ms = created_ms;
    for index in 0..summary_count {
        let mode = heads.read_u8()?;
        let series = previous_series.wrapping_add(heads.read_i64()?);
        let series_id = u32::try_from(series).map_err(|_| BatchError::SeriesIdOutOfRange {
            value: series as u64,
        })?;
        let window_start_ms = previous_window_start_ms.wrapping_add(heads.read_i64()?);
        let window_ms = heads.read_u64()?;
        let window_ms = u32::try_from(window_ms).map_err(|_| BatchError::SummaryOutOfRange {
            index: index as u64,
            field: "window_ms",
        })?;
        let count = heads.read_u64()?;
        let first_time_ms = window_start_ms.wrapping_add(heads.read_i64()?);
        let last_time_ms = first_time_ms.wrapping_add(heads.read_i64()?);
        previous_series = series;
        previous_window_start_ms = window_start_ms;

        let (min, max, first_value, last_value, sum) = if mode == MODE_RAW {
            let mut next = || values.read_u64_be().map(f64::from_bits);
            (next()?, next()?, next()?, next()?, next()?)
        } else {
            let power = *POWERS_OF_TEN
                .get(usize::from(mode))
                .ok_or(BatchError::UnknownSummaryMode { mode })?;
            let min = values.read_i64()?;
            let max = min.wrapping_add(values.read_i64()?);
            let first = min.wrapping_add(values.read_i64()?);
            let last = min.wrapping_add(values.read_i64()?);
            let sum_offset = values.read_i64()?;
            let sum_ulps = values.read_i64()?;
            let sum_integer =
                i64::try_from(i128::from(count) * i128::from(min) + i128::from(sum_offset))
                    .map_err(|_| BatchError::SummaryOutOfRange {
                        index: index as u64,
                        field: "sum",
                    })?;
            let predicted = sum_prediction(sum_integer, power);
            let sum = f64::from_bits(predicted.to_bits().wrapping_add(sum_ulps as u64));
            (
                min as f64 / power,
                max as f64 / power,
                first as f64 / power,
                last as f64 / power,
                sum,
            )
        };

        let zero_count = sketches.read_u64()?;
        let (predicted_negative, predicted_positive) = predicted_highest(min, max);
        let negative = decode_store(&mut sketches, predicted_negative, index, &mut pairs)?;
        let positive = decode_store(&mut sketches, predicted_positive, index, &mut pairs)?;
        out.push(WindowSummary {
            series: series_id,
            window_start_ms,
            window_ms,
            summary: Summary {
                count,
                sum,
                min,
                max,
                first_time_ms,
                first_value,
                last_time_ms,
                last_value,
                sketch: Sketch::from_parts(zero_count, negative, positive),
            },
        });
    }
    for reader in [&heads, &values, &sketches] {
        if !reader.is_empty() {
            return Err(BatchError::TrailingBytes {
                section: reader.column(),
                count: reader.remaining().len() as u64,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn summaries(values: &[Vec<f64>]) -> Vec<WindowSummary> {
        values
            .iter()
            .enumerate()
            .map(|(series, points)| {
                let mut summary = Summary::empty();
                for (second, value) in points.iter().enumerate() {
                    summary.observe(1_700_000_000_000 + second as i64 * 1_000, *value);
                }
                WindowSummary {
                    series: series as u32 * 3,
                    window_start_ms: 1_700_000_000_000,
                    window_ms: 10_000,
                    summary,
                }
            })
            .collect()
    }

    fn decode_columns(
        columns: &SummaryColumns,
        count: usize,
    ) -> Result<Vec<WindowSummary>, BatchError> {
        let mut out = Vec::new();
        decode(
            EncodedSummaryColumns {
                heads: &columns.heads,
                values: &columns.values,
                sketches: &columns.sketches,
            },
            count,
            1_700_000_005_000,
            &mut out,
        )?;
        Ok(out)
    }

    #[test]
    fn a_sensor_window_costs_a_few_bytes_before_compression() {
        let windows = summaries(&[vec![21.53, 21.55, 21.54, 21.58, 21.52, 21.5, 21.51]]);
        let mut columns = SummaryColumns::default();
        encode(&windows, 1_700_000_005_000, &mut columns);
        let bytes = columns.heads.len() + columns.values.len() + columns.sketches.len();
        assert!(bytes <= 30, "{bytes} bytes");
        assert_eq!(decode_columns(&columns, 1).unwrap(), windows);
    }

    proptest! {
        #[test]
        fn corrupted_columns_never_panic(
            values in prop::collection::vec(prop::collection::vec(-1e4f64..1e4, 1..12), 1..6),
            column in 0usize..3,
            position in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            extra_count in 0usize..3,
        ) {
            let windows = summaries(&values);
            let mut columns = SummaryColumns::default();
            encode(&windows, 1_700_000_005_000, &mut columns);
            let target = match column {
                0 => &mut columns.heads,
                1 => &mut columns.values,
                _ => &mut columns.sketches,
            };
            if !target.is_empty() {
                let index = position.index(target.len());
                target[index] = byte;
            }
            let _ = decode_columns(&columns, windows.len() + extra_count);
        }
    }
}
