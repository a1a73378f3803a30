//! Replay: cursors over unacked batches that read one entry per step.
//!
//! A cursor remembers only the last sequence number it yielded and looks up the next
//! one on each step, so a backlog of any size drains in constant memory, acks and
//! overflow drops made meanwhile are simply not seen again, and a cursor survives the
//! buffer swapping its storage (memory-only fallback and recovery).
//!
//! Two orders serve "live data first": the shipper sends the newest batches
//! newest-first while a second cursor drains the backlog oldest-first below them.

use super::entry::{decode_key, decode_value, encode_key, BatchClass, BatchHeader};
use super::error::EntryDefect;
use super::{DiskBuffer, State};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOrder {
    OldestFirst,
    NewestFirst,
}

/// One unacked batch as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub batch_seq: u64,
    pub header: BatchHeader,
    pub payload: Vec<u8>,
}

/// An entry that failed to decode: replay yields it as an error and moves on; `verify` lists it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("buffered {stored_in} batch {batch_seq:?} is unreadable: {defect}")]
pub struct BadEntry {
    /// `None` when the key itself is not a sequence number.
    pub batch_seq: Option<u64>,
    pub stored_in: BatchClass,
    pub defect: EntryDefect,
}

/// A lazy cursor over unacked batches; see [`DiskBuffer::replay`].
pub struct Replay {
    buffer: DiskBuffer,
    order: ReplayOrder,
    /// Exclusive: the next entry is strictly after (oldest-first) or before (newest-first) this.
    position: Option<u64>,
    /// Exclusive far end of the range.
    stop: Option<u64>,
    finished: bool,
}

impl Replay {
    pub(super) fn new(
        buffer: DiskBuffer,
        order: ReplayOrder,
        after: Option<u64>,
        before: Option<u64>,
    ) -> Self {
        let (position, stop) = match order {
            ReplayOrder::OldestFirst => (after, before),
            ReplayOrder::NewestFirst => (before, after),
        };
        Replay {
            buffer,
            order,
            position,
            stop,
            finished: false,
        }
    }

    /// The last sequence number this cursor yielded (or its starting bound).
    pub fn position(&self) -> Option<u64> {
        self.position
    }
}

impl Iterator for Replay {
    type Item = Result<StoredBatch, BadEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let found = {
            let mut state = self.buffer.lock();
            next_entry(&self.buffer, &mut state, self.order, self.position)
        };
        let Some((batch_seq, class, value)) = found else {
            self.finished = true;
            return None;
        };
        let beyond_stop = match (self.order, self.stop) {
            (ReplayOrder::OldestFirst, Some(stop)) => batch_seq >= stop,
            (ReplayOrder::NewestFirst, Some(stop)) => batch_seq <= stop,
            (_, None) => false,
        };
        if beyond_stop {
            self.finished = true;
            return None;
        }
        self.position = Some(batch_seq);
        Some(match decode_value(&value) {
            Ok((header, payload)) => Ok(StoredBatch {
                batch_seq,
                header,
                payload: payload.to_vec(),
            }),
            Err(defect) => Err(BadEntry {
                batch_seq: Some(batch_seq),
                stored_in: class,
                defect,
            }),
        })
    }
}

/// The entry after (or before) `position` in `order`, across disk and memory,
/// skipping acks not yet applied to disk. A disk read error makes the buffer
/// memory-only and the search continues in memory.
pub(super) fn next_entry(
    buffer: &DiskBuffer,
    state: &mut State,
    order: ReplayOrder,
    mut position: Option<u64>,
) -> Option<(u64, BatchClass, Vec<u8>)> {
    loop {
        let mut best: Option<(u64, BatchClass, Vec<u8>)> = None;
        let mut consider = |batch_seq: u64, class: BatchClass, value: &[u8]| {
            let better = match (&best, order) {
                (None, _) => true,
                (Some((best_seq, _, _)), ReplayOrder::OldestFirst) => batch_seq < *best_seq,
                (Some((best_seq, _, _)), ReplayOrder::NewestFirst) => batch_seq > *best_seq,
            };
            if better {
                best = Some((batch_seq, class, value.to_vec()));
            }
        };
        let mut read_failure = None;
        if let Some(storage) = &state.storage {
            for class in BatchClass::ALL {
                let tree = storage.tree(class);
                let found = match (order, position) {
                    (ReplayOrder::OldestFirst, None) => tree.first(),
                    (ReplayOrder::OldestFirst, Some(seq)) => tree.get_gt(encode_key(seq)),
                    (ReplayOrder::NewestFirst, None) => tree.last(),
                    (ReplayOrder::NewestFirst, Some(seq)) => tree.get_lt(encode_key(seq)),
                };
                match found {
                    Ok(Some((key, value))) => match decode_key(&key) {
                        Some(batch_seq) => consider(batch_seq, class, &value),
                        // A key that is not a sequence number sorts outside the real
                        // ones only by accident; `verify` reports it. Replay cannot
                        // step past it by number, so it ends this class's walk.
                        None => {
                            tracing::warn!(class = %class, key_bytes = key.len(), "skipping malformed buffer key")
                        }
                    },
                    Ok(None) => {}
                    Err(error) => {
                        read_failure = Some(error.to_string());
                        break;
                    }
                }
            }
        }
        if let Some(reason) = read_failure {
            let now_ms = state.last_now_ms;
            buffer.degrade(state, now_ms, &reason);
            continue;
        }
        let memory_entry = match (order, position) {
            (ReplayOrder::OldestFirst, None) => state.memory.iter().next(),
            (ReplayOrder::OldestFirst, Some(seq)) => state
                .memory
                .range((std::ops::Bound::Excluded(seq), std::ops::Bound::Unbounded))
                .next(),
            (ReplayOrder::NewestFirst, None) => state.memory.iter().next_back(),
            (ReplayOrder::NewestFirst, Some(seq)) => state.memory.range(..seq).next_back(),
        };
        if let Some((batch_seq, entry)) = memory_entry {
            consider(*batch_seq, entry.class, &entry.value);
        }
        let (batch_seq, class, value) = best?;
        if state.pending_disk_acks.contains(&batch_seq) {
            position = Some(batch_seq);
            continue;
        }
        return Some((batch_seq, class, value));
    }
}
