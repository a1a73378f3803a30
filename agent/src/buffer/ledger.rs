//! Byte and batch accounting, the overflow decision, and the counters the metrics
//! layer reads.
//!
//! This is the buffer's bookkeeping with no storage behind it, so the rules that
//! decide what gets dropped can be tested exhaustively: the cap is never exceeded
//! after an append, raw batches go before summary batches, oldest before newest
//! within a class (the storage layer supplies "oldest"), and a raw batch never evicts
//! a summary: when only that would make room, the raw batch itself is dropped.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::entry::BatchClass;

/// Batches and bytes held by one tier (disk or memory), per class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ledger {
    batches: [u64; 2],
    bytes: [u64; 2],
}

impl Ledger {
    pub fn add(&mut self, class: BatchClass, bytes: u64) {
        self.batches[class.index()] += 1;
        self.bytes[class.index()] += bytes;
    }

    /// Saturating, so that a miscount (say, an entry damaged after it was counted)
    /// can never wrap around and make the buffer believe it is full forever.
    pub fn remove(&mut self, class: BatchClass, bytes: u64) {
        let index = class.index();
        self.batches[index] = self.batches[index].saturating_sub(1);
        self.bytes[index] = self.bytes[index].saturating_sub(bytes);
    }

    /// Forgets a class's counts: used when storage proves to hold none of it.
    pub fn forget_class(&mut self, class: BatchClass) {
        self.batches[class.index()] = 0;
        self.bytes[class.index()] = 0;
    }

    pub fn batches(&self, class: BatchClass) -> u64 {
        self.batches[class.index()]
    }

    pub fn total_batches(&self) -> u64 {
        self.batches.iter().sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    /// The next step in making room for an incoming batch of `incoming_class` and
    /// `incoming_bytes` under `cap_bytes`.
    ///
    /// A batch may only evict batches of its own class or a lower one
    /// ([`BatchClass::may_evict`]): a summary evicts the oldest raw batch, then the
    /// oldest summary; a raw batch evicts only older raw batches, never a summary. When
    /// even dropping every evictable batch would not make room, the incoming batch is
    /// dropped *before* anything else is, so older raw data is not thrown away for a
    /// batch that cannot be kept anyway. The caller has already rejected batches larger
    /// than the cap, so `Store` over the cap only happens with a miscounted ledger
    /// (bytes counted but no batch left to drop).
    pub fn make_room(
        &self,
        incoming_class: BatchClass,
        incoming_bytes: u64,
        cap_bytes: u64,
    ) -> RoomDecision {
        if self.total_bytes().saturating_add(incoming_bytes) <= cap_bytes {
            return RoomDecision::Store;
        }
        let evictable = |class: &BatchClass| incoming_class.may_evict(*class);
        let reclaimable_bytes: u64 = BatchClass::ALL
            .into_iter()
            .filter(evictable)
            .map(|class| self.bytes[class.index()])
            .sum();
        let kept_bytes = self.total_bytes().saturating_sub(reclaimable_bytes);
        if kept_bytes.saturating_add(incoming_bytes) > cap_bytes {
            return RoomDecision::DropIncoming;
        }
        BatchClass::ALL
            .into_iter()
            .filter(evictable)
            .find(|class| self.batches(*class) > 0)
            .map_or(RoomDecision::Store, RoomDecision::DropOldest)
    }
}

/// One step of the overflow policy, decided by [`Ledger::make_room`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomDecision {
    /// Store the incoming batch now.
    Store,
    /// Drop the oldest buffered batch of this class, then decide again.
    DropOldest(BatchClass),
    /// Drop the incoming batch itself (counted like any drop): only evicting batches
    /// its class may not evict (summaries, for a raw batch) would make room.
    DropIncoming,
}

/// Counters for the metrics layer. Cheap to read from any thread; updated by the
/// buffer under its lock.
#[derive(Debug, Default)]
pub struct BufferStats {
    pub batches_buffered: AtomicU64,
    pub bytes_used: AtomicU64,
    pub memory_batches: AtomicU64,
    pub memory_bytes: AtomicU64,
    pub dropped_batches_raw: AtomicU64,
    pub dropped_readings_raw: AtomicU64,
    pub dropped_batches_summary: AtomicU64,
    pub dropped_readings_summary: AtomicU64,
    /// Batches refused because one alone exceeds the cap.
    pub rejected_too_large: AtomicU64,
    /// 1 while the disk is unavailable and batches are held in memory only. Loud on purpose.
    pub memory_only: AtomicU64,
    pub storage_errors: AtomicU64,
    pub storage_recoveries: AtomicU64,
    pub appended_batches: AtomicU64,
    pub acked_batches: AtomicU64,
    /// Creation time of the oldest unacked batch, or `i64::MIN` when empty.
    pub oldest_unacked_created_ms: AtomicI64,
}

impl BufferStats {
    pub(crate) fn new() -> Self {
        let stats = BufferStats::default();
        stats
            .oldest_unacked_created_ms
            .store(i64::MIN, Ordering::Relaxed);
        stats
    }

    pub(crate) fn count_drop(&self, class: BatchClass, readings: u32) {
        let (batches, readings_counter) = match class {
            BatchClass::Raw => (&self.dropped_batches_raw, &self.dropped_readings_raw),
            BatchClass::Summary => (
                &self.dropped_batches_summary,
                &self.dropped_readings_summary,
            ),
        };
        batches.fetch_add(1, Ordering::Relaxed);
        readings_counter.fetch_add(u64::from(readings), Ordering::Relaxed);
    }

    pub fn snapshot(&self, now_ms: i64) -> BufferStatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let oldest = self.oldest_unacked_created_ms.load(Ordering::Relaxed);
        BufferStatsSnapshot {
            batches_buffered: load(&self.batches_buffered),
            bytes_used: load(&self.bytes_used),
            memory_batches: load(&self.memory_batches),
            memory_bytes: load(&self.memory_bytes),
            dropped_batches_raw: load(&self.dropped_batches_raw),
            dropped_readings_raw: load(&self.dropped_readings_raw),
            dropped_batches_summary: load(&self.dropped_batches_summary),
            dropped_readings_summary: load(&self.dropped_readings_summary),
            rejected_too_large: load(&self.rejected_too_large),
            memory_only: load(&self.memory_only) != 0,
            storage_errors: load(&self.storage_errors),
            storage_recoveries: load(&self.storage_recoveries),
            appended_batches: load(&self.appended_batches),
            acked_batches: load(&self.acked_batches),
            oldest_unacked_age_ms: (oldest != i64::MIN)
                .then(|| now_ms.saturating_sub(oldest).max(0)),
        }
    }
}

/// A consistent-enough copy of [`BufferStats`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferStatsSnapshot {
    /// Unacked batches, on disk and in memory.
    pub batches_buffered: u64,
    /// Bytes of unacked batches, on disk and in memory.
    pub bytes_used: u64,
    pub memory_batches: u64,
    pub memory_bytes: u64,
    pub dropped_batches_raw: u64,
    pub dropped_readings_raw: u64,
    pub dropped_batches_summary: u64,
    pub dropped_readings_summary: u64,
    pub rejected_too_large: u64,
    pub memory_only: bool,
    pub storage_errors: u64,
    pub storage_recoveries: u64,
    pub appended_batches: u64,
    pub acked_batches: u64,
    pub oldest_unacked_age_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn class_of(is_raw: bool) -> BatchClass {
        if is_raw {
            BatchClass::Raw
        } else {
            BatchClass::Summary
        }
    }

    /// A model of the overflow loop over queues of (class, bytes). After every append
    /// the cap holds; no summary is dropped while a raw batch is buffered, nor ever to
    /// make room for a raw batch; a raw batch is refused only when the summaries alone
    /// leave no room for it, and then nothing else is dropped for it; a summary is
    /// never refused.
    fn run_model(appends: &[(bool, u64)], cap_bytes: u64) -> Result<(), TestCaseError> {
        let mut ledger = Ledger::default();
        let mut queues: [VecDeque<u64>; 2] = [VecDeque::new(), VecDeque::new()];
        for &(is_raw, bytes) in appends {
            let class = class_of(is_raw);
            if bytes > cap_bytes {
                continue;
            }
            let before = ledger;
            let summary_bytes: u64 = queues[1].iter().sum();
            let stored = loop {
                match ledger.make_room(class, bytes, cap_bytes) {
                    RoomDecision::Store => break true,
                    RoomDecision::DropIncoming => break false,
                    RoomDecision::DropOldest(victim) => {
                        prop_assert!(class.may_evict(victim), "{class} batch evicted a {victim}");
                        if victim == BatchClass::Summary {
                            prop_assert!(
                                queues[0].is_empty(),
                                "summary dropped while raw batches remain"
                            );
                        }
                        let victim_bytes = queues[victim.index()].pop_front();
                        prop_assert!(victim_bytes.is_some(), "ledger and queues disagree");
                        ledger.remove(victim, victim_bytes.unwrap_or_default());
                    }
                }
            };
            if stored {
                ledger.add(class, bytes);
                queues[class.index()].push_back(bytes);
            } else {
                prop_assert_eq!(class, BatchClass::Raw, "a summary was refused");
                prop_assert!(
                    summary_bytes + bytes > cap_bytes,
                    "refused a raw batch that fits"
                );
                prop_assert_eq!(ledger, before, "dropped batches for a refused raw batch");
            }
            if is_raw {
                prop_assert_eq!(
                    queues[1].iter().sum::<u64>(),
                    summary_bytes,
                    "a raw batch changed the summaries"
                );
            }
            prop_assert!(ledger.total_bytes() <= cap_bytes);
            prop_assert_eq!(ledger.total_bytes(), queues.iter().flatten().sum::<u64>());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn cap_holds_raw_goes_first_and_raw_never_evicts_a_summary(
            appends in proptest::collection::vec((any::<bool>(), 1u64..400), 0..200),
            cap_bytes in 1u64..2_000,
        ) {
            run_model(&appends, cap_bytes)?;
        }
    }

    #[test]
    fn fitting_batch_needs_no_victim() {
        let mut ledger = Ledger::default();
        ledger.add(BatchClass::Summary, 10);
        assert_eq!(
            ledger.make_room(BatchClass::Summary, 90, 100),
            RoomDecision::Store
        );
        assert_eq!(
            ledger.make_room(BatchClass::Summary, 91, 100),
            RoomDecision::DropOldest(BatchClass::Summary)
        );
        ledger.add(BatchClass::Raw, 10);
        assert_eq!(
            ledger.make_room(BatchClass::Summary, 81, 100),
            RoomDecision::DropOldest(BatchClass::Raw)
        );
        assert_eq!(
            ledger.make_room(BatchClass::Raw, 81, 100),
            RoomDecision::DropOldest(BatchClass::Raw)
        );
    }

    #[test]
    fn raw_batch_that_only_summary_eviction_could_fit_is_refused_first() {
        let mut ledger = Ledger::default();
        ledger.add(BatchClass::Summary, 60);
        ledger.add(BatchClass::Raw, 30);
        // 60 summary + 41 raw > 100: dropping the older raw batch would not be enough,
        // so the incoming raw batch is refused before anything is dropped.
        assert_eq!(
            ledger.make_room(BatchClass::Raw, 41, 100),
            RoomDecision::DropIncoming
        );
        assert_eq!(
            ledger.make_room(BatchClass::Raw, 40, 100),
            RoomDecision::DropOldest(BatchClass::Raw)
        );
        // A summary of the same size makes room, raw first.
        assert_eq!(
            ledger.make_room(BatchClass::Summary, 41, 100),
            RoomDecision::DropOldest(BatchClass::Raw)
        );
        ledger.remove(BatchClass::Raw, 30);
        assert_eq!(
            ledger.make_room(BatchClass::Raw, 41, 100),
            RoomDecision::DropIncoming
        );
        assert_eq!(
            ledger.make_room(BatchClass::Summary, 41, 100),
            RoomDecision::DropOldest(BatchClass::Summary)
        );
    }
}
