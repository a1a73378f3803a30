//! Cutting the aggregator's output into batches.
//!
//! Raw readings and window summaries go into *separate* batches: the buffer's overflow
//! policy drops whole raw batches first and keeps summaries, which only works if a batch
//! is one or the other. A batch is cut when it holds `max_items` readings (or summaries)
//! or its oldest item has waited `max_age_ms` of processing time; the defaults give about
//! one second of live data per batch, which keeps the collector's dashboards fresh while
//! amortising compression and per-batch overhead.
//!
//! Summary batches are also cut at [`MAX_SUMMARIES_PER_BATCH`]: windows of every series
//! close together (they are aligned to the epoch), so 10k series closing at once would
//! otherwise grow one batch to room for 16,384.
//!
//! The closing burst is also why a batch holds its summaries *packed* ([`PackedSummaries`]:
//! ~75 bytes a sensor window) rather than as `WindowSummary` structs (152
//! bytes plus a sketch allocation, ~230 bytes with the allocator's overhead): every
//! series' window closes within the same second, and the batches wait for the next commit
//! before they are encoded, so a 10k-series fleet held 2.3 MiB of summaries at the moment
//! the windows of the next period are being filled. They are unpacked one batch at a time
//! by the encoder, bit for bit as they were.

use tributary_protocol::model::{Reading, WindowSummary};
use tributary_protocol::sketch::{Sketch, SketchError, MAX_BUCKETS_PER_STORE};
use tributary_protocol::Summary;

use super::window::{ClosedWindow, ForwardedReading, NOT_JOURNALED};
use crate::buffer::BatchClass;

/// Default cap on readings (or summaries) per batch.
pub const DEFAULT_MAX_ITEMS_PER_BATCH: usize = 50_000;
/// Default age at which a non-empty batch is cut.
pub const DEFAULT_MAX_BATCH_AGE_MS: i64 = 1_000;
/// Cap on summaries per batch, whatever `max_items` says (see the module docs): about
/// 0.6 MiB of summaries, and still thousands per batch for compression to work on.
pub const MAX_SUMMARIES_PER_BATCH: usize = 4_096;

/// Window summaries packed back to back (see the module docs: why).
///
/// Layout of one summary, little-endian, varints LEB128, signed ones zigzag: series (4
/// bytes), window start (8), window width, count, sum, min, max, first and last value
/// (8 bytes each, the floats' bits), first time minus window start, last time minus first
/// time (wrapping), the sketch's zero count, then per store (negative, positive) its first
/// index, the number of counts and the counts of its occupied range. Every bit of a
/// `WindowSummary` comes back; written and read by this module only, within one process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackedSummaries {
    bytes: Vec<u8>,
    count: usize,
    oldest_window_start_ms: Option<i64>,
}

/// Packed summaries that do not unpack: a bug in this module, never input from outside.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(
        "packed window summary {index} of {count} is cut short; the batch cutter wrote it \
         itself, so this is a bug in the agent: please report it"
    )]
    Truncated { index: usize, count: usize },
    #[error(
        "packed window summary {index} of {count} holds a sketch no sketch holds ({source}); \
         the batch cutter wrote it itself, so this is a bug in the agent: please report it"
    )]
    Sketch {
        index: usize,
        count: usize,
        #[source]
        source: SketchError,
    },
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// Reads packed fields; `None` when the bytes end too early.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*head)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (byte, rest) = self.rest.split_first()?;
            self.rest = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn float(&mut self) -> Option<f64> {
        self.bytes::<8>()
            .map(|bytes| f64::from_bits(u64::from_le_bytes(bytes)))
    }
}

impl PackedSummaries {
    pub fn push(&mut self, window: &WindowSummary) {
        let out = &mut self.bytes;
        let summary = &window.summary;
        out.extend_from_slice(&window.series.to_le_bytes());
        out.extend_from_slice(&window.window_start_ms.to_le_bytes());
        write_varint(out, u64::from(window.window_ms));
        write_varint(out, summary.count);
        for value in [
            summary.sum,
            summary.min,
            summary.max,
            summary.first_value,
            summary.last_value,
        ] {
            out.extend_from_slice(&value.to_bits().to_le_bytes());
        }
        write_varint(
            out,
            zigzag(summary.first_time_ms.wrapping_sub(window.window_start_ms)),
        );
        write_varint(
            out,
            zigzag(summary.last_time_ms.wrapping_sub(summary.first_time_ms)),
        );
        write_varint(out, summary.sketch.zero_count());
        let (negative, positive) = summary.sketch.dense_stores();
        for (first_index, counts) in [negative, positive] {
            write_varint(out, zigzag(i64::from(first_index)));
            write_varint(out, counts.len() as u64);
            for count in counts {
                write_varint(out, *count);
            }
        }
        self.count += 1;
        self.oldest_window_start_ms = Some(
            self.oldest_window_start_ms
                .map_or(window.window_start_ms, |oldest| {
                    oldest.min(window.window_start_ms)
                }),
        );
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the packed summaries take.
    pub fn packed_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Window start of the oldest summary, if any.
    pub fn oldest_window_start_ms(&self) -> Option<i64> {
        self.oldest_window_start_ms
    }

    /// The summaries, in the order they were pushed, exactly as they were.
    pub fn unpack(&self) -> Result<Vec<WindowSummary>, UnpackError> {
        let mut summaries = Vec::with_capacity(self.count);
        let mut reader = Reader { rest: &self.bytes };
        // Both stores' counts, reused from summary to summary.
        let mut counts: Vec<u64> = Vec::new();
        while !reader.rest.is_empty() {
            let index = summaries.len();
            let truncated = UnpackError::Truncated {
                index,
                count: self.count,
            };
            let summary = unpack_one(&mut reader, &mut counts).map_err(|source| match source {
                Some(source) => UnpackError::Sketch {
                    index,
                    count: self.count,
                    source,
                },
                None => truncated,
            })?;
            summaries.push(summary);
        }
        Ok(summaries)
    }

    fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
    }
}

/// One summary; `Err(None)` when the bytes end too early.
fn unpack_one(
    reader: &mut Reader<'_>,
    counts: &mut Vec<u64>,
) -> Result<WindowSummary, Option<SketchError>> {
    let series = u32::from_le_bytes(reader.bytes::<4>().ok_or(None)?);
    let window_start_ms = i64::from_le_bytes(reader.bytes::<8>().ok_or(None)?);
    let window_ms = reader.varint().ok_or(None)?;
    let count = reader.varint().ok_or(None)?;
    let sum = reader.float().ok_or(None)?;
    let min = reader.float().ok_or(None)?;
    let max = reader.float().ok_or(None)?;
    let first_value = reader.float().ok_or(None)?;
    let last_value = reader.float().ok_or(None)?;
    let first_time_ms = window_start_ms.wrapping_add(unzigzag(reader.varint().ok_or(None)?));
    let last_time_ms = first_time_ms.wrapping_add(unzigzag(reader.varint().ok_or(None)?));
    let zero_count = reader.varint().ok_or(None)?;
    counts.clear();
    let mut stores = [(0i32, 0usize); 2];
    for store in &mut stores {
        let first_index = unzigzag(reader.varint().ok_or(None)?);
        let length = reader.varint().ok_or(None)?;
        if length > MAX_BUCKETS_PER_STORE as u64 {
            return Err(Some(SketchError::TooManyBuckets {
                span_buckets: length,
                max_buckets: MAX_BUCKETS_PER_STORE,
            }));
        }
        for _ in 0..length {
            counts.push(reader.varint().ok_or(None)?);
        }
        *store = (
            i32::try_from(first_index)
                .map_err(|_| Some(SketchError::IndexOverflow { position: 0 }))?,
            length as usize,
        );
    }
    let [(negative_index, negative_length), (positive_index, _)] = stores;
    let (negative, positive) = counts.split_at(negative_length.min(counts.len()));
    let sketch = Sketch::from_dense_stores(
        zero_count,
        (negative_index, negative),
        (positive_index, positive),
    )
    .map_err(Some)?;
    Ok(WindowSummary {
        series,
        window_start_ms,
        window_ms: u32::try_from(window_ms).unwrap_or(u32::MAX),
        summary: Summary {
            count,
            sum,
            min,
            max,
            first_time_ms,
            first_value,
            last_time_ms,
            last_value,
            sketch,
        },
    })
}

/// The content of one batch, before it gets a sequence number and is encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct CutBatch {
    pub class: BatchClass,
    pub readings: Vec<Reading>,
    pub summaries: PackedSummaries,
    /// Smallest journal sequence number of what the batch holds ([`NOT_JOURNALED`] if none).
    pub min_journal_seq: u64,
}

impl CutBatch {
    /// Event time of the oldest reading or window start in the batch.
    pub fn oldest_event_ms(&self) -> i64 {
        let readings = self.readings.iter().map(|reading| reading.time_ms);
        readings
            .chain(self.summaries.oldest_window_start_ms())
            .min()
            .unwrap_or(0)
    }

    pub fn item_count(&self) -> usize {
        self.readings.len() + self.summaries.len()
    }
}

#[derive(Debug)]
struct Pending {
    batch: CutBatch,
    started_ms: Option<i64>,
}

impl Pending {
    fn new(class: BatchClass) -> Self {
        Self {
            batch: CutBatch {
                class,
                readings: Vec::new(),
                summaries: PackedSummaries::default(),
                min_journal_seq: NOT_JOURNALED,
            },
            started_ms: None,
        }
    }

    fn take(&mut self) -> CutBatch {
        let class = self.batch.class;
        self.started_ms = None;
        let mut batch = std::mem::replace(
            &mut self.batch,
            CutBatch {
                class,
                readings: Vec::new(),
                summaries: PackedSummaries::default(),
                min_journal_seq: NOT_JOURNALED,
            },
        );
        // A cut batch waits for the next commit: give back the spare room its vectors'
        // doubling left. glibc shrinks a block in place; nothing is copied.
        batch.readings.shrink_to_fit();
        batch.summaries.shrink_to_fit();
        batch
    }
}

/// Collects raw readings and summaries and cuts them into batches by size and age.
#[derive(Debug)]
pub struct BatchCutter {
    max_items: usize,
    max_summaries: usize,
    max_age_ms: i64,
    raw: Pending,
    summary: Pending,
}

impl Default for BatchCutter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ITEMS_PER_BATCH, DEFAULT_MAX_BATCH_AGE_MS)
    }
}

impl BatchCutter {
    pub fn new(max_items: usize, max_age_ms: i64) -> Self {
        Self {
            max_items: max_items.max(1),
            max_summaries: max_items.clamp(1, MAX_SUMMARIES_PER_BATCH),
            max_age_ms,
            raw: Pending::new(BatchClass::Raw),
            summary: Pending::new(BatchClass::Summary),
        }
    }

    pub fn push_raw(&mut self, forwarded: ForwardedReading, now_ms: i64, cut: &mut Vec<CutBatch>) {
        let pending = &mut self.raw;
        pending.started_ms.get_or_insert(now_ms);
        pending.batch.readings.push(forwarded.reading);
        pending.batch.min_journal_seq = pending.batch.min_journal_seq.min(forwarded.journal_seq);
        if pending.batch.item_count() >= self.max_items {
            cut.push(pending.take());
        }
    }

    pub fn push_summary(&mut self, closed: ClosedWindow, now_ms: i64, cut: &mut Vec<CutBatch>) {
        let pending = &mut self.summary;
        pending.started_ms.get_or_insert(now_ms);
        pending.batch.summaries.push(&closed.summary);
        pending.batch.min_journal_seq = pending.batch.min_journal_seq.min(closed.min_journal_seq);
        if pending.batch.item_count() >= self.max_summaries {
            cut.push(pending.take());
        }
    }

    /// Cuts the pending batches that are old enough, or all non-empty ones with `force`.
    pub fn cut_due(&mut self, now_ms: i64, force: bool, cut: &mut Vec<CutBatch>) {
        for pending in [&mut self.raw, &mut self.summary] {
            if let Some(started_ms) = pending.started_ms {
                if force || now_ms.saturating_sub(started_ms) >= self.max_age_ms {
                    cut.push(pending.take());
                }
            }
        }
    }

    /// Smallest journal sequence number not yet in a cut batch.
    pub fn min_pending_journal_seq(&self) -> u64 {
        self.raw
            .batch
            .min_journal_seq
            .min(self.summary.batch.min_journal_seq)
    }

    /// Smallest journal sequence number among raw readings not yet in a cut batch.
    pub fn min_pending_raw_journal_seq(&self) -> u64 {
        self.raw.batch.min_journal_seq
    }

    /// When the next batch becomes due by age, if any is pending.
    pub fn next_due_ms(&self) -> Option<i64> {
        [self.raw.started_ms, self.summary.started_ms]
            .into_iter()
            .flatten()
            .min()
            .map(|started| started.saturating_add(self.max_age_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(time_ms: i64, journal_seq: u64) -> ForwardedReading {
        ForwardedReading {
            reading: Reading {
                series: 0,
                time_ms,
                value: 1.0,
                flags: 0,
            },
            journal_seq,
        }
    }

    #[test]
    fn cuts_by_size_and_age_and_keeps_classes_apart() {
        let mut cutter = BatchCutter::new(3, 1_000);
        let mut cut = Vec::new();
        cutter.push_raw(forwarded(1, 10), 0, &mut cut);
        cutter.push_raw(forwarded(2, 11), 10, &mut cut);
        assert!(cut.is_empty());
        assert_eq!(cutter.min_pending_journal_seq(), 10);
        cutter.push_raw(forwarded(3, 12), 20, &mut cut);
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].readings.len(), 3);
        assert_eq!(
            cut[0].readings.capacity(),
            3,
            "a cut batch keeps no spare room"
        );
        assert_eq!(cut[0].min_journal_seq, 10);
        assert_eq!(cutter.min_pending_journal_seq(), NOT_JOURNALED);
        cutter.push_raw(forwarded(4, 13), 100, &mut cut);
        cutter.cut_due(1_099, false, &mut cut);
        assert_eq!(cut.len(), 1);
        assert_eq!(cutter.next_due_ms(), Some(1_100));
        cutter.cut_due(1_100, false, &mut cut);
        assert_eq!(cut.len(), 2);
        assert_eq!(cut[1].class, BatchClass::Raw);
        assert!(cut.iter().all(|batch| batch.summaries.is_empty()));
    }

    #[test]
    fn a_sensor_window_packs_small() {
        let mut summary = tributary_protocol::Summary::empty();
        for second in 0..10 {
            let value = 21.25 + f64::from(second % 4) * 0.15;
            summary.observe(1_700_000_000_000 + i64::from(second) * 1_000 + 37, value);
        }
        let mut packed = PackedSummaries::default();
        packed.push(&WindowSummary {
            series: 9_876,
            window_start_ms: 1_700_000_000_000,
            window_ms: 10_000,
            summary,
        });
        // 152 bytes of struct plus a sketch allocation unpacked.
        assert!(
            packed.packed_bytes() <= 80,
            "{} bytes",
            packed.packed_bytes()
        );
    }

    #[test]
    fn packed_summaries_unpack_bit_for_bit() {
        let mut wide = tributary_protocol::Summary::empty();
        for (time_ms, value) in [
            (5, 21.25),
            (1, -0.0),
            (9, 0.0),
            (3, -7.5e-300),
            (2, 1e300),
            (4, f64::MIN_POSITIVE / 2.0),
            (7, 21.25),
        ] {
            wide.observe(time_ms, value);
        }
        let summaries = vec![
            WindowSummary {
                series: 7,
                window_start_ms: -10_000,
                window_ms: 10_000,
                summary: wide,
            },
            WindowSummary {
                series: u32::MAX,
                window_start_ms: i64::MAX - 5,
                window_ms: u32::MAX,
                summary: tributary_protocol::Summary::empty(),
            },
            WindowSummary {
                series: 0,
                window_start_ms: 1_700_000_000_000,
                window_ms: 1_000,
                summary: tributary_protocol::Summary::from_reading(1_700_000_000_500, 3.25),
            },
        ];
        let mut packed = PackedSummaries::default();
        for summary in &summaries {
            packed.push(summary);
        }
        assert_eq!(packed.len(), 3);
        assert_eq!(packed.oldest_window_start_ms(), Some(-10_000));
        // Cut short anywhere, the bytes give an error or the whole summaries before the
        // cut, never a panic or an invented summary.
        for length in 0..packed.bytes.len() {
            let prefix = PackedSummaries {
                bytes: packed.bytes.get(..length).unwrap_or_default().to_vec(),
                count: 3,
                oldest_window_start_ms: None,
            };
            if let Ok(partial) = prefix.unpack() {
                assert!(summaries.starts_with(&partial), "cut at {length}");
            }
        }
        let unpacked = packed.unpack().expect("unpacks");
        assert_eq!(unpacked, summaries);
        // Equality compares floats by value; the encoder sees bits.
        for (got, want) in unpacked.iter().zip(&summaries) {
            let bits = |summary: &tributary_protocol::Summary| {
                [
                    summary.sum,
                    summary.min,
                    summary.max,
                    summary.first_value,
                    summary.last_value,
                ]
                .map(f64::to_bits)
            };
            assert_eq!(bits(&got.summary), bits(&want.summary));
            assert_eq!(format!("{got:?}"), format!("{want:?}"));
        }
    }

    #[test]
    fn summary_batches_are_capped_below_a_large_max_items() {
        let mut cutter = BatchCutter::new(50_000, 1_000);
        let mut cut = Vec::new();
        let closed = |series: u32| ClosedWindow {
            summary: WindowSummary {
                series,
                window_start_ms: 0,
                window_ms: 10_000,
                summary: tributary_protocol::Summary::empty(),
            },
            min_journal_seq: NOT_JOURNALED,
        };
        for series in 0..10_000 {
            cutter.push_summary(closed(series), 0, &mut cut);
        }
        let sizes: Vec<usize> = cut.iter().map(CutBatch::item_count).collect();
        assert_eq!(sizes, vec![MAX_SUMMARIES_PER_BATCH; 2]);
        cutter.cut_due(0, true, &mut cut);
        assert_eq!(cut.len(), 3);
        assert_eq!(cut[2].item_count(), 10_000 - 2 * MAX_SUMMARIES_PER_BATCH);
        assert!(cut
            .iter()
            .all(|batch| batch.class == BatchClass::Summary && batch.readings.is_empty()));
        let series: Vec<u32> = cut
            .iter()
            .flat_map(|batch| batch.summaries.unpack().expect("unpacks"))
            .map(|summary| summary.series)
            .collect();
        assert_eq!(series, (0..10_000).collect::<Vec<u32>>());
    }
}
