//! Model-based property test: random appends (both classes, random sizes), acks and
//! reopens against a plain in-memory model of the overflow policy (raw first, then
//! summaries; a raw batch never evicts a summary but is dropped itself). After every step
//! the buffer's replay, byte count and drop counters match the model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tributary_agent::buffer::{
    accounted_bytes, BatchClass, BatchInfo, BufferConfig, DiskBuffer, ReplayOrder,
};

#[derive(Debug, Clone)]
enum Operation {
    Append {
        raw: bool,
        payload_bytes: usize,
    },
    /// Acks the n-th (modulo) buffered batch.
    Ack {
        index: usize,
    },
    Reopen,
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        6 => (any::<bool>(), 0usize..300).prop_map(|(raw, payload_bytes)| Operation::Append { raw, payload_bytes }),
        2 => any::<usize>().prop_map(|index| Operation::Ack { index }),
        1 => Just(Operation::Reopen),
    ]
}

struct Model {
    entries: BTreeMap<u64, (BatchClass, u64, Vec<u8>)>,
    dropped: [u64; 2],
}

impl Model {
    fn bytes(&self) -> u64 {
        self.entries.values().map(|(_, bytes, _)| bytes).sum()
    }

    fn class_bytes(&self, wanted: BatchClass) -> u64 {
        self.entries
            .values()
            .filter(|(class, _, _)| *class == wanted)
            .map(|(_, bytes, _)| bytes)
            .sum()
    }

    /// The policy as the issue states it: drop the oldest raw batches first, keep
    /// summaries, then drop the oldest summaries; raw data never evicts a summary, so a
    /// raw batch that only fits by evicting summaries is dropped itself (nothing else
    /// is dropped for it). Returns whether the batch was stored.
    fn append(
        &mut self,
        batch_seq: u64,
        class: BatchClass,
        payload: Vec<u8>,
        cap_bytes: u64,
    ) -> bool {
        let bytes = accounted_bytes(payload.len());
        if class == BatchClass::Raw && self.class_bytes(BatchClass::Summary) + bytes > cap_bytes {
            self.dropped[BatchClass::Raw.index()] += 1;
            return false;
        }
        while self.bytes() + bytes > cap_bytes {
            let victim =
                [BatchClass::Raw, BatchClass::Summary]
                    .into_iter()
                    .find_map(|victim_class| {
                        self.entries
                            .iter()
                            .find(|(_, (class, _, _))| *class == victim_class)
                            .map(|(seq, _)| *seq)
                    });
            let victim = victim.expect("something to drop");
            let (class, _, _) = self.entries.remove(&victim).expect("victim present");
            self.dropped[class.index()] += 1;
        }
        self.entries.insert(batch_seq, (class, bytes, payload));
        true
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn buffer_matches_the_overflow_model(operations in proptest::collection::vec(operation(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let cap_bytes = 1_500;
        let config = BufferConfig { max_buffer_bytes: cap_bytes, seq_block_size: 8, ..BufferConfig::at(dir.path()) };
        let mut buffer = DiskBuffer::open(config.clone()).unwrap();
        let mut model = Model { entries: BTreeMap::new(), dropped: [0, 0] };
        let mut dropped_before_reopen = [0u64; 2];
        let mut highest_seq = None;

        for operation in operations {
            match operation {
                Operation::Append { raw, payload_bytes } => {
                    let class = if raw { BatchClass::Raw } else { BatchClass::Summary };
                    let batch_seq = buffer.allocate_seq().unwrap();
                    prop_assert!(highest_seq.is_none_or(|highest| batch_seq > highest));
                    highest_seq = Some(batch_seq);
                    let payload: Vec<u8> = (0..payload_bytes).map(|index| (index as u64 ^ batch_seq) as u8).collect();
                    let info = BatchInfo { class, created_ms: batch_seq as i64, oldest_event_ms: 0, reading_count: 1 };
                    let receipt = buffer.append(batch_seq, info, &payload).unwrap();
                    let stored = model.append(batch_seq, class, payload, cap_bytes);
                    prop_assert_eq!(receipt.stored, stored);
                }
                Operation::Ack { index } => {
                    if let Some(batch_seq) = model.entries.keys().nth(index % model.entries.len().max(1)).copied() {
                        buffer.ack(batch_seq).unwrap();
                        model.entries.remove(&batch_seq);
                    }
                }
                Operation::Reopen => {
                    buffer.flush().unwrap();
                    let stats = buffer.stats(0);
                    dropped_before_reopen[0] += stats.dropped_batches_raw;
                    dropped_before_reopen[1] += stats.dropped_batches_summary;
                    drop(buffer);
                    buffer = DiskBuffer::open(config.clone()).unwrap();
                }
            }
            let replayed: Vec<(u64, BatchClass, Vec<u8>)> = buffer
                .replay(ReplayOrder::OldestFirst)
                .map(|item| item.map(|batch| (batch.batch_seq, batch.header.class, batch.payload)))
                .collect::<Result<_, _>>()
                .unwrap();
            let expected: Vec<(u64, BatchClass, Vec<u8>)> =
                model.entries.iter().map(|(seq, (class, _, payload))| (*seq, *class, payload.clone())).collect();
            prop_assert_eq!(replayed, expected);
            let stats = buffer.stats(0);
            prop_assert_eq!(stats.bytes_used, model.bytes());
            prop_assert!(stats.bytes_used <= cap_bytes);
            prop_assert_eq!(stats.batches_buffered, model.entries.len() as u64);
            prop_assert_eq!(dropped_before_reopen[0] + stats.dropped_batches_raw, model.dropped[0]);
            prop_assert_eq!(dropped_before_reopen[1] + stats.dropped_batches_summary, model.dropped[1]);
        }
    }
}
