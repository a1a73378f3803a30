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
//! close together (they are aligned to the epoch), and a summary in memory is 152 bytes
//! plus its sketch, six times a raw reading; 10k series closing at once would otherwise
//! grow one vector to room for 16,384 (2.4 MiB, and 3.6 MiB while it doubles).

use tributary_protocol::model::{Reading, WindowSummary};

use super::window::{ClosedWindow, ForwardedReading, NOT_JOURNALED};
use crate::buffer::BatchClass;

/// Default cap on readings (or summaries) per batch.
pub const DEFAULT_MAX_ITEMS_PER_BATCH: usize = 50_000;
/// Default age at which a non-empty batch is cut.
pub const DEFAULT_MAX_BATCH_AGE_MS: i64 = 1_000;
/// Cap on summaries per batch, whatever `max_items` says (see the module docs): about
/// 0.6 MiB of summaries, and still thousands per batch for compression to work on.
pub const MAX_SUMMARIES_PER_BATCH: usize = 4_096;

/// The content of one batch, before it gets a sequence number and is encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct CutBatch {
    pub class: BatchClass,
    pub readings: Vec<Reading>,
    pub summaries: Vec<WindowSummary>,
    /// Smallest journal sequence number of what the batch holds ([`NOT_JOURNALED`] if none).
    pub min_journal_seq: u64,
}

impl CutBatch {
    /// Event time of the oldest reading or window start in the batch.
    pub fn oldest_event_ms(&self) -> i64 {
        let readings = self.readings.iter().map(|reading| reading.time_ms);
        let summaries = self.summaries.iter().map(|summary| summary.window_start_ms);
        readings.chain(summaries).min().unwrap_or(0)
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
                summaries: Vec::new(),
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
                summaries: Vec::new(),
                min_journal_seq: NOT_JOURNALED,
            },
        );
        // A cut batch waits for the next commit: give back the spare room its vectors'
        // doubling left (the 10k summaries of a window-closing burst sit in room for
        // 16,384: 0.9 MiB more). glibc shrinks a block in place; nothing is copied.
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
        pending.batch.summaries.push(closed.summary);
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
    }
}
