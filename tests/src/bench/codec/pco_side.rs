//! Side measurement for issue 2: would the `pco` crate beat our column transforms +
//! zstd on the timestamp and value columns?
//!
//! It does not change the wire format. For every batch it rebuilds the columns the
//! way `protocol/src/batch/readings.rs` does (readings sorted by (series, time), one
//! run per series, values as integers at the run's smallest exact decimal scale, raw
//! f64 where no scale up to 9 reproduces them bit for bit), then sizes:
//!
//! - `pco`: one pco chunk per batch for the timestamps (i64, all runs concatenated)
//!   and one for the scaled integers (i64, all decimal runs concatenated), plus one
//!   f64 chunk for raw runs if there are any; default `ChunkConfig` (level 8, delta
//!   order chosen by pco);
//! - ours: the same columns as our codec writes them (times as first-time delta then
//!   delta-of-delta, values as zigzag varint deltas or offsets, whichever is
//!   cheaper), each compressed alone with zstd at the bench's level.
//!
//! Both exclude the same things: the runs column (series id delta, run length, mode
//! byte per run: on the wire the scale travels there), flags, dictionary and
//! envelope. Compressing a column alone is not exactly its share of our single
//! zstd frame over all columns, but it is the figure pco would replace.

use anyhow::ensure;
use tributary_protocol::{Batch, Reading};

use crate::bench::timed;

const MAX_DECIMAL_SCALE: u8 = 9;
const POWERS_OF_TEN: [f64; MAX_DECIMAL_SCALE as usize + 1] =
    [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Compressed column bytes over all batches, and the time spent compressing them.
#[derive(Debug, Default)]
pub(super) struct ColumnSizes {
    pub(super) pco_times_bytes: u64,
    pub(super) pco_values_bytes: u64,
    pub(super) ours_times_bytes: u64,
    pub(super) ours_values_bytes: u64,
    /// Runs whose values had no exact decimal scale (raw f64).
    pub(super) raw_runs: u64,
    pub(super) pco_compress_seconds: f64,
    pub(super) ours_compress_seconds: f64,
}

/// The integer for `value` at `scale` if `integer / 10^scale` gives `value` back
/// bit for bit (the protocol's rule, reimplemented: it is crate-private there).
fn decimal_integer(value: f64, scale: u8) -> Option<i64> {
    let power = POWERS_OF_TEN[usize::from(scale)];
    let rounded = (value * power).round();
    if rounded.is_nan() || rounded.abs() > MAX_EXACT_INTEGER {
        return None;
    }
    let integer = rounded as i64;
    ((integer as f64 / power).to_bits() == value.to_bits()).then_some(integer)
}

/// The run's values as integers at its smallest exact decimal scale, if any.
fn scaled_integers(run: &[Reading]) -> Option<Vec<i64>> {
    let mut scale = 0u8;
    for reading in run {
        while decimal_integer(reading.value, scale).is_none() {
            scale += 1;
            if scale > MAX_DECIMAL_SCALE {
                return None;
            }
        }
    }
    run.iter()
        .map(|reading| decimal_integer(reading.value, scale))
        .collect()
}

fn write_varint_i64(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

fn zigzag_bits(value: i64) -> u64 {
    u64::from(64 - (((value << 1) ^ (value >> 63)) as u64).leading_zeros())
}

/// The plain columns of one batch: what pco gets and what our codec writes
/// before zstd.
#[derive(Default)]
struct Columns {
    times: Vec<i64>,
    integers: Vec<i64>,
    raw_values: Vec<f64>,
    ours_times: Vec<u8>,
    ours_values: Vec<u8>,
    raw_runs: u64,
}

fn columns(batch: &Batch) -> Columns {
    let mut sorted = batch.readings.clone();
    sorted.sort_by_key(|reading| (reading.series, reading.time_ms));
    let mut columns = Columns::default();
    let mut previous_first_time_ms = batch.created_ms;
    for run in sorted.chunk_by(|a, b| a.series == b.series) {
        columns
            .times
            .extend(run.iter().map(|reading| reading.time_ms));
        let first_time_ms = run[0].time_ms;
        write_varint_i64(
            &mut columns.ours_times,
            first_time_ms.wrapping_sub(previous_first_time_ms),
        );
        let mut previous_time_ms = first_time_ms;
        let mut previous_delta_ms = 0i64;
        for reading in &run[1..] {
            let delta_ms = reading.time_ms.wrapping_sub(previous_time_ms);
            write_varint_i64(
                &mut columns.ours_times,
                delta_ms.wrapping_sub(previous_delta_ms),
            );
            previous_delta_ms = delta_ms;
            previous_time_ms = reading.time_ms;
        }
        previous_first_time_ms = first_time_ms;

        match scaled_integers(run) {
            Some(integers) => {
                let first = integers[0];
                let (mut delta_cost, mut offset_cost) = (0u64, 0u64);
                for pair in integers.windows(2) {
                    delta_cost += zigzag_bits(pair[1].wrapping_sub(pair[0]));
                    offset_cost += zigzag_bits(pair[1].wrapping_sub(first));
                }
                write_varint_i64(&mut columns.ours_values, first);
                let mut previous = first;
                for &integer in &integers[1..] {
                    let reference = if offset_cost < delta_cost {
                        first
                    } else {
                        previous
                    };
                    write_varint_i64(&mut columns.ours_values, integer.wrapping_sub(reference));
                    previous = integer;
                }
                columns.integers.extend_from_slice(&integers);
            }
            None => {
                let mut previous_bits = 0u64;
                for reading in run {
                    let bits = reading.value.to_bits();
                    columns
                        .ours_values
                        .extend_from_slice(&(bits ^ previous_bits).to_be_bytes());
                    previous_bits = bits;
                }
                columns
                    .raw_values
                    .extend(run.iter().map(|reading| reading.value));
                columns.raw_runs += 1;
            }
        }
    }
    columns
}

fn pco_compress<T: pco::data_types::Number>(numbers: &[T]) -> anyhow::Result<Vec<u8>> {
    if numbers.is_empty() {
        return Ok(Vec::new());
    }
    Ok(pco::standalone::simple_compress(
        numbers,
        &pco::ChunkConfig::default(),
    )?)
}

/// Checks, outside the timed section, that pco gives the column back.
fn check_pco<T: pco::data_types::Number + PartialEq>(
    compressed: &[u8],
    numbers: &[T],
) -> anyhow::Result<()> {
    if numbers.is_empty() {
        return Ok(());
    }
    ensure!(
        pco::standalone::simple_decompress::<T>(compressed)? == numbers,
        "pco did not round-trip a column of {} numbers",
        numbers.len()
    );
    Ok(())
}

/// Sizes the timestamp and value columns of every batch under pco and under ours.
pub(super) fn measure(batches: &[Batch], zstd_level: i32) -> anyhow::Result<ColumnSizes> {
    let mut sizes = ColumnSizes::default();
    let mut compressor = zstd::bulk::Compressor::new(zstd_level)?;
    for batch in batches {
        let columns = columns(batch);
        sizes.raw_runs += columns.raw_runs;
        let (compressed, pco_seconds) = timed(|| -> anyhow::Result<_> {
            Ok((
                pco_compress(&columns.times)?,
                pco_compress(&columns.integers)?,
                pco_compress(&columns.raw_values)?,
            ))
        });
        let (times, integers, raw_values) = compressed?;
        check_pco(&times, &columns.times)?;
        check_pco(&integers, &columns.integers)?;
        check_pco(&raw_values, &columns.raw_values)?;
        sizes.pco_times_bytes += times.len() as u64;
        sizes.pco_values_bytes += (integers.len() + raw_values.len()) as u64;
        sizes.pco_compress_seconds += pco_seconds;
        let (ours_sizes, ours_seconds) = timed(|| -> anyhow::Result<(u64, u64)> {
            Ok((
                compressor.compress(&columns.ours_times)?.len() as u64,
                compressor.compress(&columns.ours_values)?.len() as u64,
            ))
        });
        let (ours_times, ours_values) = ours_sizes?;
        sizes.ours_times_bytes += ours_times;
        sizes.ours_values_bytes += ours_values;
        sizes.ours_compress_seconds += ours_seconds;
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_integers_find_the_smallest_exact_scale_or_none() {
        let reading = |value: f64| Reading {
            series: 0,
            time_ms: 0,
            value,
            flags: 0,
        };
        assert_eq!(
            scaled_integers(&[reading(21.5), reading(21.25)]),
            Some(vec![2150, 2125])
        );
        assert_eq!(scaled_integers(&[reading(3.0)]), Some(vec![3]));
        assert_eq!(scaled_integers(&[reading(std::f64::consts::PI)]), None);
        assert_eq!(scaled_integers(&[reading(-0.0)]), None);
    }

    #[test]
    fn pco_round_trips_a_column() {
        let numbers: Vec<i64> = (0..1000).map(|index| 2000 + index % 7).collect();
        let compressed = pco_compress(&numbers).expect("pco compresses i64");
        assert!(!compressed.is_empty() && compressed.len() < numbers.len());
        check_pco(&compressed, &numbers).expect("pco gives the column back");
    }
}
