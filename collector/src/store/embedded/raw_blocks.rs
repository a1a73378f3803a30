//! Raw readings in blocks: one sled entry per (series, time bucket, agent) per flush,
//! holding every reading of that group, instead of one entry per reading.
//!
//! Why: a sled insert costs about 15,000 instructions whatever the value's size, and the
//! store used to pay one per raw reading (callgrind: 23,000 instructions per reading per
//! flush, two thirds of it in `Tree::insert`), which capped the embedded pipeline at about
//! 11,000 readings/s in `bench e2e`. A flush now pays one insert per series and bucket it
//! touches, however many readings each holds (the write amplification the design warns
//! about: batch, never one index entry per event).
//!
//! Identity is unchanged: a reading is still `(series, time, agent, batch_seq, position)`,
//! and the store's answers are exactly those of the one-entry-per-reading layout:
//! - a block's key is its series, the start of its [`RAW_BLOCK_MS`] bucket, its agent, and
//!   the identity `(batch_seq, position)` of its first reading;
//! - writing a block whose key exists merges the two (union by identity, the new value wins),
//!   so a replay that cuts flushes differently can never drop a reading an earlier block held;
//! - readers merge every block of the buckets they read, deduplicated by identity and
//!   sorted like the old keys (time, agent, batch_seq, position).
//!
//! Readings wait for their flush already grouped ([`PendingRaw`], about 40 bytes a reading
//! instead of a row with four strings), so a flush can cover a whole second of a flood: its
//! cost is one entry per block, not per reading.
//!
//! Pure code: grouping, merging, encoding. The store does the IO.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::store::RawReadingRow;

/// Width of a block's time bucket. A query reads the blocks of the buckets its range
/// touches; a block never holds readings of two buckets. One minute: a 1 Hz series fills
/// at most 60 readings per bucket, a flood a few thousand.
pub const RAW_BLOCK_MS: i64 = 60_000;

/// The bucket start of a reading time (floor, also for negative times).
pub fn bucket_start_ms(time_ms: i64) -> i64 {
    time_ms
        .div_euclid(RAW_BLOCK_MS)
        .saturating_mul(RAW_BLOCK_MS)
}

/// One reading in a block; series, bucket and agent are in the block's key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlockReading {
    /// Milliseconds after the bucket start, in `[0, RAW_BLOCK_MS)`.
    pub offset_ms: u32,
    pub batch_seq: u64,
    pub position: u32,
    pub value: f64,
    pub flags: u8,
}

impl BlockReading {
    /// The reading's identity within its series, bucket and agent, in read order.
    pub fn identity(&self) -> (u32, u64, u32) {
        (self.offset_ms, self.batch_seq, self.position)
    }
}

/// The stored value of a block: readings sorted by identity, no identity twice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawBlock {
    pub readings: Vec<BlockReading>,
}

impl RawBlock {
    /// Union with `newer`; on an identity present in both, `newer`'s value is kept (as a
    /// rewritten row replaced itself in the one-entry-per-reading layout).
    pub fn merge(self, newer: &RawBlock) -> RawBlock {
        let mut by_identity: BTreeMap<(u32, u64, u32), BlockReading> = self
            .readings
            .into_iter()
            .map(|reading| (reading.identity(), reading))
            .collect();
        for reading in &newer.readings {
            by_identity.insert(reading.identity(), *reading);
        }
        RawBlock {
            readings: by_identity.into_values().collect(),
        }
    }

    /// Keeps the readings at or after `cutoff_ms` (absolute); returns how many it dropped.
    pub fn retain_from(&mut self, bucket_start_ms: i64, cutoff_ms: i64) -> usize {
        let before = self.readings.len();
        self.readings.retain(|reading| {
            bucket_start_ms.saturating_add(i64::from(reading.offset_ms)) >= cutoff_ms
        });
        before - self.readings.len()
    }
}

/// What identifies a block's group: series (device, metric, tags), bucket start, agent.
pub type GroupKey<'a> = (&'a str, &'a str, &'a str, i64, &'a str);

/// [`GroupKey`], owned: (device, metric, tags, bucket start, agent).
pub type OwnedGroupKey = (String, String, String, i64, String);

/// Raw readings waiting for the next flush, grouped by block as they arrive.
#[derive(Debug, Default)]
pub struct PendingRaw {
    groups: HashMap<OwnedGroupKey, Vec<BlockReading>>,
    readings: usize,
    oldest_buffered_ms: Option<i64>,
}

impl PendingRaw {
    /// Buffers rows (their strings move into the group key of a new block).
    pub fn push(&mut self, rows: Vec<RawReadingRow>, now_ms: i64) {
        for row in rows {
            let bucket = bucket_start_ms(row.time_ms);
            // In [0, RAW_BLOCK_MS) by construction of the bucket.
            let offset_ms = u32::try_from(row.time_ms.saturating_sub(bucket)).unwrap_or(0);
            let reading = BlockReading {
                offset_ms,
                batch_seq: row.batch_seq,
                position: row.position,
                value: row.value,
                flags: row.flags,
            };
            let key = (row.device_id, row.metric, row.tags, bucket, row.agent_id);
            self.groups.entry(key).or_default().push(reading);
            self.readings += 1;
        }
        if self.oldest_buffered_ms.is_none() && self.readings > 0 {
            self.oldest_buffered_ms = Some(now_ms);
        }
    }

    /// Readings buffered (a reading written twice counts twice).
    pub fn readings(&self) -> usize {
        self.readings
    }

    /// Blocks the next flush writes.
    pub fn blocks(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.readings == 0
    }

    pub fn oldest_buffered_ms(&self) -> Option<i64> {
        self.oldest_buffered_ms
    }

    /// Sorts every group by identity, keeping the later of a reading written twice (as a
    /// rewritten row replaced itself), and hands out the blocks. Idempotent, so a flush
    /// that failed can keep its `PendingRaw` for the retry.
    pub fn sorted_blocks(&mut self) -> impl Iterator<Item = (GroupKey<'_>, &[BlockReading])> {
        for readings in self.groups.values_mut() {
            // Stable: a later write of a reading stays after the earlier one, whose place
            // it takes.
            readings.sort_by_key(BlockReading::identity);
            readings.dedup_by(|later, kept| {
                let same = later.identity() == kept.identity();
                if same {
                    *kept = *later;
                }
                same
            });
        }
        self.groups
            .iter()
            .map(|((device, metric, tags, bucket, agent), readings)| {
                (
                    (
                        device.as_str(),
                        metric.as_str(),
                        tags.as_str(),
                        *bucket,
                        agent.as_str(),
                    ),
                    readings.as_slice(),
                )
            })
    }
}

/// A block to write, borrowed from [`PendingRaw`]: encodes exactly as [`RawBlock`].
#[derive(Debug, Serialize)]
pub struct RawBlockRef<'a> {
    pub readings: &'a [BlockReading],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        device: &str,
        agent: &str,
        time_ms: i64,
        batch_seq: u64,
        position: u32,
    ) -> RawReadingRow {
        RawReadingRow {
            agent_id: agent.into(),
            batch_seq,
            position,
            device_id: device.into(),
            metric: "t".into(),
            tags: String::new(),
            time_ms,
            value: time_ms as f64,
            flags: 0,
        }
    }

    /// The pending blocks, as owned values by group.
    fn group_rows(rows: Vec<RawReadingRow>) -> BTreeMap<OwnedGroupKey, Vec<BlockReading>> {
        let mut pending = PendingRaw::default();
        pending.push(rows, 7);
        assert_eq!(pending.oldest_buffered_ms(), Some(7));
        pending
            .sorted_blocks()
            .map(|((device, metric, tags, bucket, agent), readings)| {
                (
                    (
                        device.into(),
                        metric.into(),
                        tags.into(),
                        bucket,
                        agent.into(),
                    ),
                    readings.to_vec(),
                )
            })
            .collect()
    }

    fn key(device: &str, bucket: i64, agent: &str) -> OwnedGroupKey {
        (
            device.into(),
            "t".into(),
            String::new(),
            bucket,
            agent.into(),
        )
    }

    #[test]
    fn rows_group_by_series_bucket_and_agent_sorted_by_identity() {
        let rows = vec![
            row("d1", "a", RAW_BLOCK_MS + 5, 2, 0),
            row("d1", "a", RAW_BLOCK_MS + 1, 3, 0),
            row("d1", "a", 7, 1, 0),
            row("d1", "b", RAW_BLOCK_MS + 1, 1, 0),
            row("d2", "a", RAW_BLOCK_MS + 1, 1, 1),
            RawReadingRow {
                value: -1.0,
                ..row("d1", "a", RAW_BLOCK_MS + 5, 2, 0)
            },
        ];
        let groups = group_rows(rows);
        assert_eq!(groups.len(), 4);
        let block = &groups[&key("d1", RAW_BLOCK_MS, "a")];
        let identities: Vec<_> = block.iter().map(BlockReading::identity).collect();
        assert_eq!(
            identities,
            vec![(1, 3, 0), (5, 2, 0)],
            "sorted, the repeat kept once"
        );
        assert_eq!(block[1].value, -1.0, "the later write of a reading wins");
        assert_eq!(groups[&key("d1", 0, "a")].len(), 1);
    }

    #[test]
    fn negative_times_fall_in_the_bucket_below() {
        assert_eq!(bucket_start_ms(-1), -RAW_BLOCK_MS);
        assert_eq!(bucket_start_ms(0), 0);
        assert_eq!(bucket_start_ms(RAW_BLOCK_MS - 1), 0);
        let groups = group_rows(vec![row("d", "a", -1, 1, 0)]);
        let block = &groups[&key("d", -RAW_BLOCK_MS, "a")];
        assert_eq!(block[0].offset_ms, (RAW_BLOCK_MS - 1) as u32);
    }

    #[test]
    fn merging_is_a_union_by_identity_and_the_newer_value_wins() {
        let reading = |offset_ms, batch_seq, value| BlockReading {
            offset_ms,
            batch_seq,
            position: 0,
            value,
            flags: 0,
        };
        let stored = RawBlock {
            readings: vec![reading(1, 1, 1.0), reading(3, 1, 3.0)],
        };
        let newer = RawBlock {
            readings: vec![reading(2, 2, 2.0), reading(3, 1, 30.0)],
        };
        let merged = stored.merge(&newer);
        assert_eq!(
            merged.readings,
            vec![reading(1, 1, 1.0), reading(2, 2, 2.0), reading(3, 1, 30.0)]
        );
        let mut kept = merged;
        assert_eq!(kept.retain_from(1_000, 1_002), 1);
        assert_eq!(kept.readings.len(), 2);
    }
}
