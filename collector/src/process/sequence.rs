//! Per-agent batch sequence bookkeeping: exact deduplication and the agent's watermark.
//!
//! Why one structure does both: the batch sequence number is the only order an agent
//! guarantees. Batches reach the log out of sequence order (several QUIC streams in
//! flight, retries, and after an outage live data first with the backlog in parallel),
//! so the newest event time seen says nothing about whether older data is still on its
//! way. What *is* known is the contiguous prefix of sequence numbers: once every batch up
//! to `through_seq` has arrived, nothing the agent created before them is missing. The
//! watermark is therefore the largest event time inside that prefix (minus the
//! out-of-orderness bound, applied by the engine). A gateway backfilling hours of history
//! fills the prefix from below and its windows close in order, complete.
//!
//! Sequence numbers can be missing for good: the agent drops its oldest raw batches when
//! its disk buffer overflows, and skips the rest of a reserved block of numbers when it
//! restarts. A gap that makes no progress for `sequence_gap_timeout_ms` (of log time) is
//! given up: the prefix jumps over it, and a batch from it that turns up later is still
//! processed (it is not a duplicate), judged against the watermark of that moment.
//!
//! Dedup: the set of sequence numbers seen, as disjoint inclusive intervals. Normal
//! traffic keeps one interval (plus one per outstanding gap), so the set stays tiny. It
//! is capped: beyond `max_intervals`, the two lowest intervals are joined, i.e. the oldest
//! gap is assumed seen; the numbers so assumed are counted, because a batch from that gap
//! arriving later would be reported as a duplicate.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What [`SequenceTracker::record`] and the gap skips changed, for the engine's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequenceEffects {
    /// Sequence numbers never seen that the dedup set now treats as seen (cap reached).
    pub assumed_seen: u64,
    /// Sequence numbers the watermark prefix jumped over without having seen them.
    pub skipped: u64,
}

impl SequenceEffects {
    fn add(&mut self, other: SequenceEffects) {
        self.assumed_seen = self.assumed_seen.saturating_add(other.assumed_seen);
        self.skipped = self.skipped.saturating_add(other.skipped);
    }
}

/// Dedup set and watermark prefix of one agent. Serialisable: it is part of the
/// engine checkpoint that must be stored together with the log offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceTracker {
    /// Seen sequence numbers as `start -> end` (inclusive), disjoint and not adjacent.
    seen: BTreeMap<u64, u64>,
    /// Every sequence number up to this one has been seen or given up.
    through_seq: Option<u64>,
    /// Largest event time of the batches inside the prefix.
    through_max_event_ms: Option<i64>,
    /// Batches seen above the prefix, with their largest event time (if they had any).
    pending: BTreeMap<u64, Option<i64>>,
    /// Log time of the last progress on the gap blocking the prefix.
    gap_progress_ms: i64,
}

fn max_option(left: Option<i64>, right: Option<i64>) -> Option<i64> {
    match (left, right) {
        (Some(left), Some(right)) => Some(left.max(right)),
        (left, None) => left,
        (None, right) => right,
    }
}

impl SequenceTracker {
    /// Whether batch `seq` was seen (or assumed seen) before.
    pub fn is_seen(&self, seq: u64) -> bool {
        self.seen
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, end)| *end >= seq)
    }

    /// The largest event time within the contiguous prefix of sequence numbers.
    pub fn prefix_max_event_ms(&self) -> Option<i64> {
        self.through_max_event_ms
    }

    /// Number of batches waiting above a gap in the sequence.
    pub fn pending_batches(&self) -> usize {
        self.pending.len()
    }

    /// Number of disjoint intervals in the dedup set.
    pub fn interval_count(&self) -> usize {
        self.seen.len()
    }

    /// Records batch `seq` (not seen before) carrying events up to `max_event_ms`,
    /// arriving at log time `now_ms`.
    pub fn record(
        &mut self,
        seq: u64,
        max_event_ms: Option<i64>,
        now_ms: i64,
        max_intervals: usize,
        max_pending: usize,
    ) -> SequenceEffects {
        let mut effects = SequenceEffects {
            assumed_seen: self.insert_seen(seq, max_intervals),
            skipped: 0,
        };
        match self.through_seq {
            None => {
                self.through_seq = Some(seq);
                self.through_max_event_ms = max_event_ms;
            }
            Some(through) if seq <= through => {
                self.through_max_event_ms = max_option(self.through_max_event_ms, max_event_ms);
            }
            Some(_) => {
                let fills_gap = self
                    .pending
                    .last_key_value()
                    .is_some_and(|(highest, _)| seq < *highest);
                if self.pending.is_empty() || fills_gap {
                    self.gap_progress_ms = now_ms;
                }
                self.pending.insert(seq, max_event_ms);
                self.absorb_contiguous(now_ms);
                if self.pending.len() > max_pending {
                    effects.add(self.skip_gap(now_ms));
                }
            }
        }
        effects
    }

    /// Gives up the gap blocking the prefix if it made no progress for `timeout_ms`.
    pub fn skip_stalled_gap(&mut self, now_ms: i64, timeout_ms: i64) -> SequenceEffects {
        if !self.pending.is_empty() && now_ms.saturating_sub(self.gap_progress_ms) >= timeout_ms {
            self.skip_gap(now_ms)
        } else {
            SequenceEffects::default()
        }
    }

    /// Gives up every gap (the agent went idle: nothing more is expected soon).
    pub fn skip_all_gaps(&mut self, now_ms: i64) -> SequenceEffects {
        let mut effects = SequenceEffects::default();
        while !self.pending.is_empty() {
            effects.add(self.skip_gap(now_ms));
        }
        effects
    }

    /// Moves the prefix to the lowest pending batch, counting the numbers jumped over.
    fn skip_gap(&mut self, now_ms: i64) -> SequenceEffects {
        let mut effects = SequenceEffects::default();
        if let (Some(through), Some((lowest, _))) =
            (self.through_seq, self.pending.first_key_value())
        {
            effects.skipped = lowest.saturating_sub(through).saturating_sub(1);
            self.through_seq = Some(lowest.saturating_sub(1));
        }
        self.absorb_contiguous(now_ms);
        effects
    }

    fn absorb_contiguous(&mut self, now_ms: i64) {
        let Some(mut through) = self.through_seq else {
            return;
        };
        let mut advanced = false;
        while let Some(entry) = self.pending.first_entry() {
            if through.checked_add(1) != Some(*entry.key()) {
                break;
            }
            let (seq, max_event_ms) = entry.remove_entry();
            through = seq;
            self.through_max_event_ms = max_option(self.through_max_event_ms, max_event_ms);
            advanced = true;
        }
        self.through_seq = Some(through);
        if advanced {
            self.gap_progress_ms = now_ms;
        }
    }

    /// Adds `seq` to the dedup intervals; returns how many unseen numbers the cap made
    /// it assume seen.
    fn insert_seen(&mut self, seq: u64, max_intervals: usize) -> u64 {
        let mut start = seq;
        let mut end = seq;
        if let Some((&previous_start, &previous_end)) = self.seen.range(..=seq).next_back() {
            if previous_end >= seq {
                return 0;
            }
            if previous_end.checked_add(1) == Some(seq) {
                start = previous_start;
                self.seen.remove(&previous_start);
            }
        }
        if let Some(next) = seq.checked_add(1) {
            if let Some(next_end) = self.seen.remove(&next) {
                end = next_end;
            }
        }
        self.seen.insert(start, end);
        let mut assumed = 0u64;
        while self.seen.len() > max_intervals.max(1) {
            let (Some((first_start, first_end)), Some((second_start, second_end))) =
                (self.seen.pop_first(), self.seen.pop_first())
            else {
                break;
            };
            assumed =
                assumed.saturating_add(second_start.saturating_sub(first_end).saturating_sub(1));
            self.seen.insert(first_start, second_end);
        }
        assumed
    }

    /// Checks the invariants a decoded checkpoint must hold.
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        let mut previous_end: Option<u64> = None;
        for (start, end) in &self.seen {
            if end < start {
                return Err("a dedup interval ends before it starts");
            }
            if let Some(previous_end) = previous_end {
                if previous_end.saturating_add(1) >= *start {
                    return Err("dedup intervals overlap or touch");
                }
            }
            previous_end = Some(*end);
        }
        match (self.through_seq, self.pending.first_key_value()) {
            (None, Some(_)) => Err("pending batches without a sequence prefix"),
            (Some(through), Some((lowest, _))) if *lowest <= through => {
                Err("a pending batch lies inside the sequence prefix")
            }
            _ => Ok(()),
        }
    }

    /// Heap bytes held, approximately (B-tree entries plus node overhead).
    pub fn heap_bytes(&self) -> usize {
        const NODE_OVERHEAD_PER_ENTRY: usize = 8;
        self.seen.len() * (16 + NODE_OVERHEAD_PER_ENTRY)
            + self.pending.len() * (24 + NODE_OVERHEAD_PER_ENTRY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVALS: usize = 64;
    const PENDING: usize = 1024;

    #[test]
    fn dedup_merges_intervals_and_finds_duplicates() {
        let mut tracker = SequenceTracker::default();
        for seq in [5, 7, 6, 10, 9, 1] {
            assert!(!tracker.is_seen(seq));
            tracker.record(seq, None, 0, INTERVALS, PENDING);
            assert!(tracker.is_seen(seq));
        }
        assert_eq!(tracker.interval_count(), 3); // [1] [5..7] [9..10]
        for unseen in [0, 2, 4, 8, 11] {
            assert!(!tracker.is_seen(unseen), "{unseen}");
        }
    }

    #[test]
    fn watermark_waits_for_the_backlog_below_live_data() {
        let mut tracker = SequenceTracker::default();
        tracker.record(100, Some(1_000), 0, INTERVALS, PENDING);
        // Live data first: seq 110 carries event time 60_000, the backlog 101..109 is missing.
        tracker.record(110, Some(60_000), 1, INTERVALS, PENDING);
        assert_eq!(tracker.prefix_max_event_ms(), Some(1_000));
        for seq in 101..110 {
            tracker.record(seq, Some(1_000 + seq as i64), 2, INTERVALS, PENDING);
        }
        assert_eq!(tracker.prefix_max_event_ms(), Some(60_000));
        assert_eq!(tracker.pending_batches(), 0);
    }

    #[test]
    fn a_stalled_gap_is_skipped_after_the_timeout_and_progress_resets_the_timer() {
        let mut tracker = SequenceTracker::default();
        tracker.record(1, Some(10), 0, INTERVALS, PENDING);
        tracker.record(5, Some(50), 100, INTERVALS, PENDING);
        tracker.record(3, Some(30), 900, INTERVALS, PENDING); // progress inside the gap
        assert_eq!(
            tracker.skip_stalled_gap(1_500, 1_000),
            SequenceEffects::default()
        );
        let effects = tracker.skip_stalled_gap(1_900, 1_000);
        assert_eq!(effects.skipped, 1); // seq 2 given up, then 3 absorbed; 4 given up later
        assert_eq!(tracker.prefix_max_event_ms(), Some(30));
        let effects = tracker.skip_all_gaps(2_000);
        assert_eq!(effects.skipped, 1);
        assert_eq!(tracker.prefix_max_event_ms(), Some(50));
        // A skipped batch that turns up is not a duplicate.
        assert!(!tracker.is_seen(2));
    }

    #[test]
    fn the_interval_cap_assumes_the_oldest_gap_seen() {
        let mut tracker = SequenceTracker::default();
        let mut assumed = 0;
        for seq in (0..20).map(|i| i * 10) {
            assumed += tracker.record(seq, None, 0, 4, PENDING).assumed_seen;
        }
        assert_eq!(tracker.interval_count(), 4);
        assert_eq!(assumed, 16 * 9);
        assert!(tracker.is_seen(5));
        assert!(!tracker.is_seen(185));
        tracker.validate().unwrap();
    }
}
