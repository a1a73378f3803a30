//! Behaviour of the disk buffer against a real sled database in a temporary directory.

use tributary_agent::buffer::{
    accounted_bytes, AckOutcome, BatchClass, BatchInfo, BufferConfig, BufferError, DiskBuffer,
    Durability, EntryDefect, FaultInjector, FsyncPolicy, ReplayOrder, Tier,
};

fn info(class: BatchClass, created_ms: i64, reading_count: u32) -> BatchInfo {
    BatchInfo {
        class,
        created_ms,
        oldest_event_ms: created_ms - 1_000,
        reading_count,
    }
}

fn payload_for(batch_seq: u64, bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|index| (batch_seq as usize * 31 + index) as u8)
        .collect()
}

/// Allocates, appends and returns the sequence number.
fn append(buffer: &DiskBuffer, class: BatchClass, created_ms: i64, payload_bytes: usize) -> u64 {
    let batch_seq = buffer.allocate_seq().unwrap();
    buffer
        .append(
            batch_seq,
            info(class, created_ms, 10),
            &payload_for(batch_seq, payload_bytes),
        )
        .unwrap();
    batch_seq
}

fn seqs(buffer: &DiskBuffer, order: ReplayOrder) -> Vec<u64> {
    buffer
        .replay(order)
        .map(|item| item.unwrap().batch_seq)
        .collect()
}

#[test]
fn ack_removes_only_the_acked_batch() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = DiskBuffer::open(BufferConfig::at(dir.path())).unwrap();
    let first = append(&buffer, BatchClass::Raw, 1_000, 100);
    let second = append(&buffer, BatchClass::Summary, 1_001, 50);
    let third = append(&buffer, BatchClass::Raw, 1_002, 100);
    assert_eq!(buffer.flush().unwrap(), Durability::Durable);

    assert_eq!(buffer.ack(second).unwrap(), AckOutcome::Removed);
    assert_eq!(buffer.ack(second).unwrap(), AckOutcome::Unknown);
    assert_eq!(seqs(&buffer, ReplayOrder::OldestFirst), vec![first, third]);
    let stats = buffer.stats(1_002);
    assert_eq!(stats.batches_buffered, 2);
    assert_eq!(stats.bytes_used, 2 * accounted_bytes(100));
    assert_eq!(stats.acked_batches, 1);

    let stored = buffer
        .replay(ReplayOrder::OldestFirst)
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(stored.payload, payload_for(first, 100));
    assert_eq!(stored.header.info(), info(BatchClass::Raw, 1_000, 10));
}

#[test]
fn overflow_drops_oldest_raw_then_oldest_summary_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let entry_bytes = accounted_bytes(100);
    let config = BufferConfig {
        max_buffer_bytes: 4 * entry_bytes,
        ..BufferConfig::at(dir.path())
    };
    let buffer = DiskBuffer::open(config).unwrap();
    let summary_a = append(&buffer, BatchClass::Summary, 1, 100);
    let raw_a = append(&buffer, BatchClass::Raw, 2, 100);
    let summary_b = append(&buffer, BatchClass::Summary, 3, 100);
    let raw_b = append(&buffer, BatchClass::Raw, 4, 100);
    assert_eq!(buffer.stats(4).bytes_used, 4 * entry_bytes);

    // Full: the next batch (a summary) pushes out the oldest raw batch, not the older summary.
    let summary_c = append(&buffer, BatchClass::Summary, 5, 100);
    assert_eq!(
        seqs(&buffer, ReplayOrder::OldestFirst),
        vec![summary_a, summary_b, raw_b, summary_c]
    );
    let summary_d = append(&buffer, BatchClass::Summary, 6, 100);
    assert_eq!(
        seqs(&buffer, ReplayOrder::OldestFirst),
        vec![summary_a, summary_b, summary_c, summary_d]
    );
    let stats = buffer.stats(6);
    assert_eq!(
        (stats.dropped_batches_raw, stats.dropped_readings_raw),
        (2, 20)
    );
    assert_eq!(stats.dropped_batches_summary, 0);

    // Only summaries left: a raw batch never evicts one. The incoming raw batch itself
    // is dropped, counted as raw, and its receipt says it is not buffered.
    let raw_c = buffer.allocate_seq().unwrap();
    let receipt = buffer
        .append(
            raw_c,
            info(BatchClass::Raw, 7, 10),
            &payload_for(raw_c, 100),
        )
        .unwrap();
    assert!(!receipt.stored, "{receipt:?}");
    assert_eq!(receipt.dropped_batches, 0);
    assert_eq!(
        seqs(&buffer, ReplayOrder::OldestFirst),
        vec![summary_a, summary_b, summary_c, summary_d]
    );
    let stats = buffer.stats(7);
    assert_eq!(
        (stats.dropped_batches_raw, stats.dropped_readings_raw),
        (3, 30)
    );
    assert_eq!(stats.dropped_batches_summary, 0);
    assert_eq!(buffer.ack(raw_c).unwrap(), AckOutcome::Unknown);

    // A summary still makes room, by dropping the oldest summary.
    let summary_e = append(&buffer, BatchClass::Summary, 8, 100);
    assert_eq!(
        seqs(&buffer, ReplayOrder::OldestFirst),
        vec![summary_b, summary_c, summary_d, summary_e]
    );
    let stats = buffer.stats(8);
    assert_eq!(
        (
            stats.dropped_batches_summary,
            stats.dropped_readings_summary
        ),
        (1, 10)
    );
    assert!(stats.bytes_used <= 4 * entry_bytes);
    assert_eq!(stats.batches_buffered, 4);
    let _ = raw_a;

    // A batch larger than the whole cap is refused, with nothing dropped for it.
    let batch_seq = buffer.allocate_seq().unwrap();
    let error = buffer
        .append(
            batch_seq,
            info(BatchClass::Raw, 9, 1),
            &vec![0; 4 * entry_bytes as usize],
        )
        .unwrap_err();
    assert!(
        matches!(error, BufferError::BatchTooLarge { .. }),
        "{error}"
    );
    assert_eq!(buffer.stats(9).rejected_too_large, 1);
    assert_eq!(buffer.stats(9).batches_buffered, 4);
}

#[test]
fn a_raw_batch_never_evicts_a_summary_on_disk_or_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultInjector::default();
    let entry_bytes = accounted_bytes(100);
    let config = BufferConfig {
        max_buffer_bytes: 4 * entry_bytes,
        memory_only_max_bytes: 3 * entry_bytes,
        storage_retry_interval_ms: 1_000,
        ..BufferConfig::at(dir.path())
    };
    let buffer = DiskBuffer::open_with_faults(config, faults.clone()).unwrap();
    let summaries: Vec<u64> = (0..3)
        .map(|index| append(&buffer, BatchClass::Summary, index, 100))
        .collect();
    let older_raw = append(&buffer, BatchClass::Raw, 3, 100);

    // A larger raw batch would need a summary's room too: it is refused before the
    // older raw batch is sacrificed for nothing.
    let large_raw = buffer.allocate_seq().unwrap();
    let receipt = buffer
        .append(
            large_raw,
            info(BatchClass::Raw, 4, 25),
            &payload_for(large_raw, 150),
        )
        .unwrap();
    assert_eq!((receipt.stored, receipt.tier), (false, Tier::Disk));
    assert_eq!(receipt.dropped_batches, 0);
    let mut expected = summaries.clone();
    expected.push(older_raw);
    assert_eq!(seqs(&buffer, ReplayOrder::OldestFirst), expected);
    let stats = buffer.stats(4);
    assert_eq!(
        (stats.dropped_batches_raw, stats.dropped_readings_raw),
        (1, 25)
    );
    assert_eq!(stats.dropped_batches_summary, 0);
    assert_eq!(stats.appended_batches, 5);

    // The same rule in the memory-only tier.
    faults.fail_storage(true);
    let memory_summaries: Vec<u64> = (10..13)
        .map(|created_ms| append(&buffer, BatchClass::Summary, created_ms, 100))
        .collect();
    assert!(buffer.is_memory_only());
    let memory_raw = buffer.allocate_seq().unwrap();
    let receipt = buffer
        .append(
            memory_raw,
            info(BatchClass::Raw, 13, 7),
            &payload_for(memory_raw, 100),
        )
        .unwrap();
    assert_eq!((receipt.stored, receipt.tier), (false, Tier::Memory));
    assert_eq!(
        seqs(&buffer, ReplayOrder::OldestFirst),
        memory_summaries,
        "memory replay lost a summary or kept the refused raw batch"
    );
    let stats = buffer.stats(13);
    assert_eq!(
        (stats.dropped_batches_raw, stats.dropped_readings_raw),
        (2, 32)
    );
    assert_eq!(stats.dropped_batches_summary, 0);

    // Back on disk, the memory summaries push out the raw batch, then the oldest summaries.
    faults.fail_storage(false);
    assert!(buffer.retry_storage(5_000));
    let stats = buffer.stats(5_000);
    assert_eq!(stats.dropped_batches_raw, 3);
    assert_eq!(stats.dropped_batches_summary, 2);
    let mut expected = summaries[2..].to_vec();
    expected.extend_from_slice(&memory_summaries);
    assert_eq!(seqs(&buffer, ReplayOrder::OldestFirst), expected);
}

#[test]
fn sequences_stay_monotonic_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        seq_block_size: 4,
        ..BufferConfig::at(dir.path())
    };
    let mut allocated = Vec::new();
    for _ in 0..3 {
        let buffer = DiskBuffer::open(config.clone()).unwrap();
        for _ in 0..6 {
            allocated.push(buffer.allocate_seq().unwrap());
        }
        // Allocated but never appended numbers must not come back either.
        append(&buffer, BatchClass::Raw, 1, 10);
        buffer.flush().unwrap();
    }
    let buffer = DiskBuffer::open(config).unwrap();
    let stored = seqs(&buffer, ReplayOrder::OldestFirst);
    assert_eq!(stored.len(), 3);
    allocated.extend(stored);
    allocated.sort_unstable();
    let before = allocated.len();
    allocated.dedup();
    assert_eq!(
        allocated.len(),
        before,
        "a sequence number was handed out twice"
    );
    assert!(buffer.allocate_seq().unwrap() > *allocated.last().unwrap());
}

#[test]
fn appending_an_unallocated_sequence_number_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = DiskBuffer::open(BufferConfig::at(dir.path())).unwrap();
    let error = buffer
        .append(5, info(BatchClass::Raw, 1, 1), b"x")
        .unwrap_err();
    assert!(
        matches!(
            error,
            BufferError::UnallocatedSeq {
                batch_seq: 5,
                next_seq: 0
            }
        ),
        "{error}"
    );
}

#[test]
fn replay_orders_and_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = DiskBuffer::open(BufferConfig::at(dir.path())).unwrap();
    let all: Vec<u64> = (0..10)
        .map(|index| {
            let class = if index % 3 == 0 {
                BatchClass::Summary
            } else {
                BatchClass::Raw
            };
            append(&buffer, class, index, 20)
        })
        .collect();
    assert_eq!(seqs(&buffer, ReplayOrder::OldestFirst), all);
    let mut newest_first = all.clone();
    newest_first.reverse();
    assert_eq!(seqs(&buffer, ReplayOrder::NewestFirst), newest_first);

    // Live first: newest-first down to the backlog boundary, backlog oldest-first up to it.
    let boundary = all[6];
    let live: Vec<u64> = buffer
        .replay_range(ReplayOrder::NewestFirst, Some(boundary - 1), None)
        .map(|item| item.unwrap().batch_seq)
        .collect();
    assert_eq!(live, vec![all[9], all[8], all[7], all[6]]);
    let backlog: Vec<u64> = buffer
        .replay_range(ReplayOrder::OldestFirst, None, Some(boundary))
        .map(|item| item.unwrap().batch_seq)
        .collect();
    assert_eq!(backlog, all[..6].to_vec());

    // Acks made while a cursor is open are not seen again; the cursor keeps its place.
    let mut cursor = buffer.replay(ReplayOrder::OldestFirst);
    assert_eq!(cursor.next().unwrap().unwrap().batch_seq, all[0]);
    buffer.ack(all[1]).unwrap();
    buffer.ack(all[0]).unwrap();
    assert_eq!(cursor.next().unwrap().unwrap().batch_seq, all[2]);
    let fresh = append(&buffer, BatchClass::Raw, 100, 20);
    let rest: Vec<u64> = cursor.map(|item| item.unwrap().batch_seq).collect();
    assert_eq!(rest.last(), Some(&fresh));
}

#[test]
fn verify_and_replay_report_a_corrupted_entry() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = DiskBuffer::open(BufferConfig::at(dir.path())).unwrap();
    let good = append(&buffer, BatchClass::Raw, 1, 50);
    let damaged = append(&buffer, BatchClass::Raw, 2, 50);
    let after = append(&buffer, BatchClass::Summary, 3, 50);
    assert!(buffer.verify().unwrap().is_clean());

    // Overwrite the middle entry with garbage directly in the sled tree.
    let mut garbage = buffer
        .replay(ReplayOrder::OldestFirst)
        .nth(1)
        .unwrap()
        .unwrap()
        .payload;
    garbage.insert(0, 1);
    buffer
        .write_raw_entry_for_test(BatchClass::Raw, &damaged.to_be_bytes(), &garbage)
        .unwrap();
    buffer
        .write_raw_entry_for_test(BatchClass::Summary, b"bad", b"\x01\x02")
        .unwrap();

    let report = buffer.verify().unwrap();
    assert_eq!(report.entries_checked, 4);
    assert_eq!(report.bad_entries.len(), 2, "{report:?}");
    let damaged_report = report
        .bad_entries
        .iter()
        .find(|bad| bad.batch_seq == Some(damaged))
        .unwrap();
    assert_eq!(damaged_report.stored_in, BatchClass::Raw);
    assert!(report
        .bad_entries
        .iter()
        .any(|bad| bad.defect == EntryDefect::BadKey { key_bytes: 3 }));

    // Replay hands the damaged entry back as an error and carries on.
    let items: Vec<_> = buffer.replay(ReplayOrder::OldestFirst).collect();
    assert_eq!(items[0].as_ref().unwrap().batch_seq, good);
    assert_eq!(items[1].as_ref().unwrap_err().batch_seq, Some(damaged));
    assert_eq!(items[2].as_ref().unwrap().batch_seq, after);

    let inspection = buffer.inspect().unwrap();
    assert_eq!(inspection.raw.batches, 2);
    assert_eq!(inspection.raw.undecodable, 1);
}

#[test]
fn inspect_summarises_by_class() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = DiskBuffer::open(BufferConfig::at(dir.path())).unwrap();
    let first = append(&buffer, BatchClass::Raw, 5_000, 40);
    append(&buffer, BatchClass::Summary, 6_000, 40);
    let last = append(&buffer, BatchClass::Raw, 7_000, 40);
    let inspection = buffer.inspect().unwrap();
    assert_eq!(inspection.batches(), 3);
    assert_eq!(inspection.bytes(), 3 * accounted_bytes(40));
    assert_eq!(inspection.raw.readings, 20);
    assert_eq!(
        (inspection.oldest_seq(), inspection.newest_seq()),
        (Some(first), Some(last))
    );
    assert_eq!(inspection.raw.oldest_created_ms, Some(5_000));
    assert_eq!(inspection.raw.newest_created_ms, Some(7_000));
    assert_eq!(inspection.raw.oldest_event_ms, Some(4_000));
    assert_eq!(buffer.stats(9_000).oldest_unacked_age_ms, Some(4_000));
}

#[test]
fn degrades_to_memory_on_storage_failure_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultInjector::default();
    let entry_bytes = accounted_bytes(100);
    let config = BufferConfig {
        memory_only_max_bytes: 3 * entry_bytes,
        storage_retry_interval_ms: 1_000,
        ..BufferConfig::at(dir.path())
    };
    let buffer = DiskBuffer::open_with_faults(config.clone(), faults.clone()).unwrap();
    let on_disk = append(&buffer, BatchClass::Raw, 0, 100);
    let acked_while_down = append(&buffer, BatchClass::Summary, 0, 100);
    assert_eq!(buffer.flush().unwrap(), Durability::Durable);

    faults.fail_storage(true);
    let seq = buffer.allocate_seq().unwrap();
    let receipt = buffer
        .append(seq, info(BatchClass::Raw, 10, 10), &payload_for(seq, 100))
        .unwrap();
    assert_eq!(receipt.tier, Tier::Memory);
    assert!(buffer.is_memory_only());
    assert_eq!(buffer.flush().unwrap(), Durability::MemoryOnly);
    let mut in_memory = vec![seq];
    // More than the memory cap: the oldest memory batches are dropped, raw first.
    for created_ms in [20, 30, 40] {
        let class = if created_ms == 20 {
            BatchClass::Summary
        } else {
            BatchClass::Raw
        };
        let seq = buffer.allocate_seq().unwrap();
        assert_eq!(
            buffer
                .append(seq, info(class, created_ms, 10), &payload_for(seq, 100))
                .unwrap()
                .tier,
            Tier::Memory
        );
        in_memory.push(seq);
    }
    assert_eq!(buffer.ack(acked_while_down).unwrap(), AckOutcome::Deferred);
    let stats = buffer.stats(40);
    assert!(stats.memory_only);
    assert_eq!(stats.storage_errors, 1);
    assert_eq!(stats.memory_batches, 3);
    assert_eq!(stats.dropped_batches_raw, 1);
    // While down, replay serves memory (the disk backlog waits for recovery).
    assert_eq!(
        seqs(&buffer, ReplayOrder::OldestFirst),
        in_memory[1..].to_vec()
    );

    // Retry before the interval does nothing; still failing stays memory-only.
    assert!(!buffer.retry_storage(500));
    assert!(!buffer.retry_storage(1_500));
    faults.fail_storage(false);
    assert!(
        !buffer.retry_storage(2_000),
        "retried before storage_retry_interval_ms passed"
    );
    assert!(buffer.retry_storage(2_500));

    let stats = buffer.stats(2_500);
    assert!(!stats.memory_only);
    assert_eq!(stats.storage_recoveries, 1);
    assert_eq!(stats.memory_batches, 0);
    let mut expected = vec![on_disk];
    expected.extend_from_slice(&in_memory[1..]);
    assert_eq!(seqs(&buffer, ReplayOrder::OldestFirst), expected);
    assert_eq!(stats.batches_buffered, 4);

    // Recovered entries are on disk for real: they survive a reopen.
    drop(buffer);
    let reopened = DiskBuffer::open(config).unwrap();
    assert_eq!(seqs(&reopened, ReplayOrder::OldestFirst), expected);
    assert!(reopened.verify().unwrap().is_clean());
}

#[test]
fn every_batch_policy_flushes_on_append_and_os_policy_defers() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        fsync: FsyncPolicy::EveryBatch,
        ..BufferConfig::at(dir.path().join("every"))
    };
    let buffer = DiskBuffer::open(config).unwrap();
    append(&buffer, BatchClass::Raw, 1, 10);
    assert_eq!(buffer.flush().unwrap(), Durability::Durable);

    let config = BufferConfig {
        fsync: FsyncPolicy::Os { interval_ms: 1_000 },
        ..BufferConfig::at(dir.path().join("os"))
    };
    let buffer = DiskBuffer::open(config).unwrap();
    append(&buffer, BatchClass::Raw, 1, 10);
    assert_eq!(buffer.flush().unwrap(), Durability::Deferred);
}

#[test]
fn a_second_open_of_the_same_directory_fails_with_a_useful_message() {
    let dir = tempfile::tempdir().unwrap();
    let _buffer = DiskBuffer::open(BufferConfig::at(dir.path())).unwrap();
    let error = DiskBuffer::open(BufferConfig::at(dir.path())).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("cannot open the disk buffer"), "{message}");
    assert!(message.contains("another agent process"), "{message}");
}
