//! The embedded durable log through its public API: round trips, reopen, consumer
//! positions, retention by size and age with an injected clock, replay from an offset
//! and from a time, recovery of a torn tail, and group commit.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tributary_collector::log::{
    AppendRecord, DurableLog, EmbeddedLog, EmbeddedLogConfig, LogError, LogRecord, ManualClock,
    RecordHeaders,
};

fn record(agent_id: &str, batch_seq: u64, value_bytes: usize) -> AppendRecord {
    let value: Vec<u8> = (0..value_bytes)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(batch_seq) as u8)
        .collect();
    AppendRecord {
        headers: RecordHeaders {
            agent_id: agent_id.to_owned(),
            batch_seq,
            protocol_version: 1,
        },
        value: Bytes::from(value),
    }
}

fn open(config: EmbeddedLogConfig, clock: &Arc<ManualClock>) -> EmbeddedLog {
    match EmbeddedLog::open(config, clock.clone()) {
        Ok(log) => log,
        Err(error) => panic!("open failed: {error}"),
    }
}

/// Reads a whole partition through the trait, in small reads, as a consumer would.
async fn read_all<L: DurableLog>(log: &L, partition: u32, from_offset: u64) -> Vec<LogRecord> {
    let mut records = Vec::new();
    let mut next = from_offset;
    loop {
        let batch = log.read(partition, next, 3_000).await.expect("read");
        let Some(last) = batch.last() else { break };
        next = last.offset + 1;
        records.extend(batch);
    }
    records
}

fn segment_files(directory: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(directory.join("partition-0000"))
        .expect("list partition")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn append_then_read_round_trips_every_field() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(1_000));
    let log = Arc::new(open(EmbeddedLogConfig::new(directory.path()), &clock));
    let mut tasks = Vec::new();
    for seq in 0..40u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(record("gw-a", seq, 100 + seq as usize * 37))
                .await
        }));
    }
    let mut offsets = Vec::new();
    for task in tasks {
        let receipt = task.await.expect("join").expect("append");
        assert_eq!(receipt.partition, 0);
        assert_eq!(receipt.timestamp_ms, 1_000);
        offsets.push(receipt.offset);
    }
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (0..40).collect::<Vec<_>>(),
        "offsets are dense and unique"
    );

    let records = read_all(log.as_ref(), 0, 0).await;
    assert_eq!(records.len(), 40);
    for (index, read) in records.iter().enumerate() {
        assert_eq!(read.offset, index as u64);
        let expected = record(
            "gw-a",
            read.headers.batch_seq,
            100 + read.headers.batch_seq as usize * 37,
        );
        assert_eq!(read.headers, expected.headers);
        assert_eq!(read.value, expected.value);
    }
    let range = log.offset_range(0).await.expect("range");
    assert_eq!((range.earliest, range.next), (0, 40));
    assert!(
        log.read(0, 40, 1024).await.expect("read at end").is_empty(),
        "caught up reads are empty"
    );
    assert!(matches!(
        log.read(0, 41, 1024).await,
        Err(LogError::OffsetOutOfRange { .. })
    ));
    assert!(matches!(
        log.read(3, 0, 1024).await,
        Err(LogError::UnknownPartition { .. })
    ));
}

#[tokio::test]
async fn read_from_the_middle_uses_the_sparse_index() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let mut config = EmbeddedLogConfig::new(directory.path());
    config.index_interval_bytes = 1_000;
    config.segment_max_bytes = 20_000;
    let log = open(config, &clock);
    for seq in 0..100 {
        log.append(record("gw", seq, 450)).await.expect("append");
    }
    for start in [0u64, 1, 2, 37, 38, 50, 99] {
        let records = read_all(&log, 0, start).await;
        let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(
            offsets,
            (start..100).collect::<Vec<_>>(),
            "replay from {start}"
        );
        assert!(records
            .iter()
            .all(|r| r.value == record("gw", r.headers.batch_seq, 450).value));
    }
    let one = log.read(0, 10, 1).await.expect("read");
    assert_eq!(
        one.len(),
        1,
        "a read returns at least one record even if it is larger than max_bytes"
    );
}

#[tokio::test]
async fn reopen_keeps_records_offsets_and_positions() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(5_000));
    {
        let log = open(EmbeddedLogConfig::new(directory.path()), &clock);
        for seq in 0..10 {
            log.append(record("gw-b", seq, 64)).await.expect("append");
        }
        log.commit_position("processor", 0, 7)
            .await
            .expect("commit");
        log.commit_position("processor", 0, 8)
            .await
            .expect("commit again");
        log.commit_position("archiver", 0, 2)
            .await
            .expect("commit other group");
        assert!(matches!(
            log.commit_position("bad/name", 0, 1).await,
            Err(LogError::InvalidGroupName { .. })
        ));
        assert!(matches!(
            EmbeddedLog::open(EmbeddedLogConfig::new(directory.path()), clock.clone()),
            Err(LogError::Locked { .. })
        ));
    }
    clock.set_ms(4_000); // the wall clock stepped back: timestamps must not
    let log = open(EmbeddedLogConfig::new(directory.path()), &clock);
    assert_eq!(
        log.load_position("processor", 0).await.expect("load"),
        Some(8)
    );
    assert_eq!(
        log.load_position("archiver", 0).await.expect("load"),
        Some(2)
    );
    assert_eq!(log.load_position("nobody", 0).await.expect("load"), None);
    let receipt = log
        .append(record("gw-b", 10, 64))
        .await
        .expect("append after reopen");
    assert_eq!(receipt.offset, 10, "offsets continue after reopen");
    assert_eq!(
        receipt.timestamp_ms, 5_000,
        "append time never goes backwards"
    );
    let records = read_all(&log, 0, 0).await;
    let seqs: Vec<u64> = records.iter().map(|r| r.headers.batch_seq).collect();
    assert_eq!(seqs, (0..11).collect::<Vec<_>>());
}

#[tokio::test]
async fn torn_tail_is_truncated_and_offsets_continue() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    {
        let log = open(EmbeddedLogConfig::new(directory.path()), &clock);
        for seq in 0..5 {
            log.append(record("gw", seq, 200)).await.expect("append");
        }
    }
    // A write that was cut short: a plausible length prefix and part of a body.
    let segment = segment_files(directory.path()).pop().expect("a segment");
    let length_before = std::fs::metadata(&segment).expect("stat").len();
    let mut file = OpenOptions::new()
        .append(true)
        .open(&segment)
        .expect("open segment");
    file.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
        .expect("write torn tail");
    drop(file);
    let log = open(EmbeddedLogConfig::new(directory.path()), &clock);
    assert_eq!(
        std::fs::metadata(&segment).expect("stat").len(),
        length_before,
        "torn tail truncated"
    );
    assert_eq!(read_all(&log, 0, 0).await.len(), 5);
    assert_eq!(
        log.append(record("gw", 5, 10))
            .await
            .expect("append")
            .offset,
        5
    );
    drop(log);

    // A crash while rolling to a new segment can leave it empty, without its magic.
    let empty_segment = directory
        .path()
        .join("partition-0000")
        .join(format!("{:020}.log", 6));
    std::fs::write(&empty_segment, b"").expect("create empty segment");
    let log = open(EmbeddedLogConfig::new(directory.path()), &clock);
    assert_eq!(
        log.append(record("gw", 6, 10))
            .await
            .expect("append")
            .offset,
        6
    );
    drop(log);
    let log = open(EmbeddedLogConfig::new(directory.path()), &clock);
    let seqs: Vec<u64> = read_all(&log, 0, 0)
        .await
        .iter()
        .map(|r| r.headers.batch_seq)
        .collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
}

#[tokio::test]
async fn damage_in_a_sealed_segment_is_reported_not_repaired() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let mut config = EmbeddedLogConfig::new(directory.path());
    config.segment_max_bytes = 4_096;
    {
        let log = open(config.clone(), &clock);
        for seq in 0..20 {
            log.append(record("gw", seq, 1_000)).await.expect("append");
        }
    }
    let first = segment_files(directory.path())
        .into_iter()
        .next()
        .expect("a segment");
    let mut bytes = std::fs::read(&first).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&first, bytes).expect("write");
    match EmbeddedLog::open(config, clock.clone()) {
        Err(LogError::CorruptSegment { path, .. }) => assert_eq!(path, first),
        other => panic!("expected CorruptSegment, got {other:?}"),
    }
}

#[tokio::test]
async fn retention_by_size_deletes_whole_old_segments() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let mut config = EmbeddedLogConfig::new(directory.path());
    config.segment_max_bytes = 4_096;
    config.retention_max_bytes = Some(12_000);
    let log = open(config, &clock);
    for seq in 0..40 {
        log.append(record("gw", seq, 1_000)).await.expect("append");
    }
    let (bytes_before, segments_before) = log.disk_usage(0).expect("usage");
    assert!(
        bytes_before > 30_000 && segments_before >= 10,
        "{bytes_before} bytes in {segments_before} segments"
    );
    let report = log.enforce_retention(0).expect("retention");
    let (bytes_after, segments_after) = log.disk_usage(0).expect("usage");
    assert!(bytes_after <= 12_000, "{bytes_after} bytes remain");
    assert_eq!(segments_before - segments_after, report.segments_deleted);
    assert_eq!(bytes_before - bytes_after, report.bytes_deleted);
    assert_eq!(
        segment_files(directory.path()).len(),
        segments_after,
        "files deleted on disk"
    );
    let earliest = report.earliest_offsets[0];
    assert!(earliest > 0);
    assert!(
        matches!(log.read(0, 0, 1024).await, Err(LogError::OffsetOutOfRange { earliest: e, .. }) if e == earliest)
    );
    let remaining = read_all(&log, 0, earliest).await;
    assert_eq!(remaining.first().map(|r| r.offset), Some(earliest));
    assert_eq!(remaining.last().map(|r| r.offset), Some(39));
    assert_eq!(
        log.append(record("gw", 40, 10))
            .await
            .expect("append")
            .offset,
        40
    );
}

#[tokio::test]
async fn retention_by_age_uses_the_injected_clock() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let mut config = EmbeddedLogConfig::new(directory.path());
    config.segment_max_age_ms = 60_000;
    config.retention_max_age_ms = Some(3_600_000);
    let log = open(config.clone(), &clock);
    // One record a minute for three hours: one segment per minute of data.
    for minute in 0..180 {
        clock.set_ms(minute * 60_000);
        log.append(record("gw", minute as u64, 100))
            .await
            .expect("append");
    }
    let now_ms = 180 * 60_000;
    let report = log.enforce_retention(now_ms).expect("retention");
    assert!(report.segments_deleted > 100, "{report:?}");
    let records = read_all(&log, 0, report.earliest_offsets[0]).await;
    let oldest = records.first().expect("something retained");
    assert!(
        oldest.timestamp_ms >= now_ms - 3_600_000 - 60_000,
        "oldest retained is {} ms",
        oldest.timestamp_ms
    );
    assert!(records
        .iter()
        .all(|r| r.timestamp_ms >= now_ms - 3_600_000 - 60_000));
    assert_eq!(records.last().map(|r| r.offset), Some(179));
    // Retention survives reopen: the deleted segments stay deleted.
    drop(log);
    let log = open(config, &clock);
    assert_eq!(
        log.offset_range(0).await.expect("range").earliest,
        report.earliest_offsets[0]
    );
}

#[tokio::test]
async fn replay_from_a_time() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let mut config = EmbeddedLogConfig::new(directory.path());
    config.segment_max_bytes = 8_192;
    config.index_interval_bytes = 2_000;
    let log = open(config, &clock);
    for seq in 0..60u64 {
        clock.set_ms(10_000 + (seq as i64) * 1_000);
        log.append(record("gw", seq, 700)).await.expect("append");
    }
    assert_eq!(log.offset_for_time(0, 0).await.expect("time"), 0);
    assert_eq!(log.offset_for_time(0, 10_000).await.expect("time"), 0);
    assert_eq!(log.offset_for_time(0, 10_001).await.expect("time"), 1);
    assert_eq!(log.offset_for_time(0, 35_500).await.expect("time"), 26);
    assert_eq!(log.offset_for_time(0, 69_000).await.expect("time"), 59);
    assert_eq!(
        log.offset_for_time(0, 69_001).await.expect("time"),
        60,
        "after the last record: the end"
    );
    let start = log.offset_for_time(0, 50_000).await.expect("time");
    let replayed = read_all(&log, 0, start).await;
    assert_eq!(replayed.len(), 20);
    assert!(replayed.iter().all(|r| r.timestamp_ms >= 50_000));
}

#[tokio::test]
async fn a_caught_up_consumer_is_woken_by_new_durable_records() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let log = Arc::new(open(EmbeddedLogConfig::new(directory.path()), &clock));
    let mut durable = log.watch_durable_offset(0).expect("watch");
    assert_eq!(*durable.borrow_and_update(), 0);
    let writer = log.clone();
    let append = tokio::spawn(async move { writer.append(record("gw", 0, 10)).await });
    tokio::time::timeout(std::time::Duration::from_secs(10), durable.changed())
        .await
        .expect("woken before the deadline")
        .expect("sender alive");
    assert_eq!(*durable.borrow(), 1);
    assert_eq!(
        log.read(0, 0, 1024).await.expect("read").len(),
        1,
        "visible once the watch says so"
    );
    append.await.expect("join").expect("append");
}

#[tokio::test]
async fn concurrent_appends_share_fsyncs() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let log = Arc::new(open(EmbeddedLogConfig::new(directory.path()), &clock));
    let appenders = 200u64;
    let mut tasks = Vec::new();
    for seq in 0..appenders {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(record(&format!("gw-{}", seq % 7), seq, 2_000))
                .await
        }));
    }
    for task in tasks {
        task.await.expect("join").expect("append");
    }
    let stats = log.stats();
    assert_eq!(stats.records_flushed, appenders);
    assert!(
        stats.group_commits * 4 <= appenders,
        "{} fsyncs for {appenders} appends: group commit is not grouping",
        stats.group_commits
    );
}

#[tokio::test]
async fn keys_pick_partitions_and_keep_each_agent_in_order() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let mut config = EmbeddedLogConfig::new(directory.path());
    config.partitions = 3;
    {
        let log = open(config.clone(), &clock);
        for seq in 0..30 {
            for agent in ["north", "south", "east", "west"] {
                let receipt = log.append(record(agent, seq, 50)).await.expect("append");
                assert_eq!(receipt.partition, log.partition_for_key(agent));
            }
        }
        for partition in 0..3 {
            let records = read_all(&log, partition, 0).await;
            for agent in ["north", "south", "east", "west"] {
                let seqs: Vec<u64> = records
                    .iter()
                    .filter(|r| r.headers.agent_id == agent)
                    .map(|r| r.headers.batch_seq)
                    .collect();
                if !seqs.is_empty() {
                    assert_eq!(
                        seqs,
                        (0..30).collect::<Vec<_>>(),
                        "{agent} in partition {partition}"
                    );
                }
            }
        }
    }
    config.partitions = 2;
    assert!(matches!(
        EmbeddedLog::open(config, clock.clone()),
        Err(LogError::InvalidConfig(_))
    ));
}

#[tokio::test]
async fn oversized_records_are_refused_with_a_reason() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let mut config = EmbeddedLogConfig::new(directory.path());
    config.max_record_bytes = 10_000;
    config.max_unflushed_bytes = 20_000;
    let log = open(config, &clock);
    let error = log
        .append(record("gw", 9, 20_000))
        .await
        .expect_err("too large");
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("batch 9"), "{error}");
    // Backpressure: many appends against a small in-flight budget all complete.
    let log = Arc::new(log);
    let mut tasks = Vec::new();
    for seq in 0..50 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(record("gw", seq, 9_000)).await
        }));
    }
    for task in tasks {
        task.await
            .expect("join")
            .expect("append under backpressure");
    }
}

#[test]
fn config_parses_with_defaults_and_rejects_unknown_fields() {
    let config: EmbeddedLogConfig = serde_json_like("directory", "/var/lib/tributary/log");
    assert_eq!(config, EmbeddedLogConfig::new("/var/lib/tributary/log"));
    assert!(config.validate().is_ok());
    let mut bad = config.clone();
    bad.max_unflushed_bytes = 10;
    assert!(bad.validate().is_err());
    use serde::de::value::{Error, MapDeserializer};
    use serde::Deserialize;
    let unknown =
        MapDeserializer::<_, Error>::new([("directory", "/x"), ("segment_bytes", "1")].into_iter());
    assert!(
        EmbeddedLogConfig::deserialize(unknown).is_err(),
        "a misspelt setting must not be ignored"
    );
}

/// Builds a config through serde (the path real config files take) without pulling a
/// format crate into the collector's dev-dependencies: a one-field map deserializer.
fn serde_json_like(field: &str, value: &str) -> EmbeddedLogConfig {
    use serde::de::value::{Error, MapDeserializer};
    use serde::Deserialize;
    let map = MapDeserializer::<_, Error>::new(std::iter::once((field, value)));
    match EmbeddedLogConfig::deserialize(map) {
        Ok(config) => config,
        Err(error) => panic!("config did not parse: {error}"),
    }
}

/// A power cut can leave the active segment cut at any byte. For cuts at, around and
/// between record boundaries, reopening recovers exactly the whole records before the
/// cut and gives the next append the offset after them.
#[tokio::test]
async fn reopen_after_a_cut_at_any_point_recovers_the_whole_records() {
    let directory = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(0));
    let sizes: Vec<usize> = (0..12).map(|i| 1 + (i * 373) % 900).collect();
    {
        let log = open(EmbeddedLogConfig::new(directory.path()), &clock);
        for (seq, size) in sizes.iter().enumerate() {
            log.append(record("gw-cut", seq as u64, *size))
                .await
                .expect("append");
        }
    }
    let segment = segment_files(directory.path()).pop().expect("a segment");
    let original = std::fs::read(&segment).expect("read segment");
    let header_bytes = 36 + "gw-cut".len();
    let mut ends = vec![8usize];
    for size in &sizes {
        ends.push(ends.last().copied().unwrap_or(8) + header_bytes + size);
    }
    assert_eq!(ends.last().copied(), Some(original.len()));
    let mut cuts: Vec<usize> = vec![0, 3];
    for pair in ends.windows(2) {
        cuts.extend([
            pair[0],
            pair[0] + 1,
            pair[0] + 7,
            pair[0] + 20,
            (pair[0] + pair[1]) / 2,
            pair[1] - 1,
        ]);
    }
    cuts.push(original.len());
    for cut in cuts {
        std::fs::write(&segment, &original[..cut]).expect("cut segment");
        let complete = ends.iter().skip(1).filter(|end| **end <= cut).count();
        let log = open(EmbeddedLogConfig::new(directory.path()), &clock);
        let records = read_all(&log, 0, 0).await;
        assert_eq!(records.len(), complete, "cut at byte {cut}");
        assert!(records
            .iter()
            .enumerate()
            .all(|(i, r)| r.offset == i as u64
                && r.value == record("gw-cut", i as u64, sizes[i]).value));
        let receipt = log
            .append(record("gw-cut", 99, 5))
            .await
            .expect("append after recovery");
        assert_eq!(receipt.offset, complete as u64, "cut at byte {cut}");
    }
}
