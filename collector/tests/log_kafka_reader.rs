//! The processor's Kafka reader (`KafkaLog::partition_reader`) against the real broker:
//! one consumer for every owned partition, so a caught-up processor waits once per round
//! (not once per idle partition), and a record appended while every partition is idle is
//! returned by the poll that is waiting, not after the wait ran out; once a partition's last
//! record was delivered, the next poll returns at its end (`enable.partition.eof`) instead of
//! waiting, so the processor knows at once that it is caught up and flushes.

mod log_kafka_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use log_kafka_support::{connect, fresh_topic, record};
use tributary_collector::log::kafka::KafkaLogConfig;
use tributary_collector::log::kafka_group::ReaderEvent;
use tributary_collector::log::{partition_for_key, DurableLog, LogRecord};

const PARTITIONS: u32 = 4;

fn records_of(event: ReaderEvent) -> Vec<LogRecord> {
    match event {
        ReaderEvent::Records { records, error } => {
            assert!(error.is_none(), "fetch failed: {error:?}");
            records
        }
        ReaderEvent::Membership(membership) => {
            panic!("an assign-only reader got a membership change: {membership:?}")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_wait_covers_every_idle_partition_and_a_new_record_ends_it() {
    let Some((brokers, topic)) = fresh_topic("reader", PARTITIONS as i32).await else {
        return;
    };
    let wait = Duration::from_secs(20);
    let log = connect(KafkaLogConfig {
        read_wait_ms: wait.as_millis() as u64,
        ..KafkaLogConfig::new(&brokers, &topic)
    })
    .await;
    // Something in every partition, so the reader is connected and positioned when the
    // partitions go idle.
    let agent_in = |partition: u32| {
        (0..)
            .map(|n| format!("agent-{n}"))
            .find(|agent| partition_for_key(agent, PARTITIONS) == partition)
            .unwrap_or_default()
    };
    for partition in 0..PARTITIONS {
        log.append(record(&agent_in(partition), 0, vec![partition as u8; 8]))
            .await
            .unwrap();
    }
    let mut reader = log.partition_reader().unwrap();
    reader
        .assign(&(0..PARTITIONS).map(|partition| (partition, 0)).collect())
        .unwrap();
    let mut seen: BTreeMap<u32, u64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < PARTITIONS as usize {
        assert!(
            Instant::now() < deadline,
            "first records not read: {seen:?}"
        );
        for record in records_of(reader.fetch(1 << 20, Duration::from_millis(500)).await) {
            seen.insert(record.partition, record.offset);
        }
    }

    // Each partition that delivered a record reports its end once: those fetches return
    // early, empty, and count no empty wait.
    let mut early_returns = 0;
    loop {
        let before = reader.stats();
        let records = records_of(reader.fetch(1 << 20, Duration::from_millis(300)).await);
        assert!(records.is_empty(), "nothing new was appended: {records:?}");
        if reader.stats().empty_waits > before.empty_waits {
            break;
        }
        early_returns += 1;
        assert!(
            early_returns <= PARTITIONS,
            "more early returns than partitions that reached their end"
        );
    }

    // Every partition idle: one fetch waits once, whatever the number of partitions.
    let before = reader.stats();
    let idle = records_of(reader.fetch(1 << 20, Duration::from_millis(300)).await);
    assert!(idle.is_empty(), "nothing new was appended: {idle:?}");
    let after = reader.stats();
    assert_eq!(after.fetches - before.fetches, 1);
    assert_eq!(
        after.empty_waits - before.empty_waits,
        1,
        "one wait for {PARTITIONS} idle partitions"
    );

    // A record for the last partition while a fetch waits (up to 20 s) on all four: the
    // fetch returns it, long before its wait would have run out.
    let mut reader = {
        let fetch = tokio::spawn(async move {
            let event = reader.fetch(1 << 20, wait).await;
            (reader, event, Instant::now())
        });
        let receipt = log
            .append(record(&agent_in(PARTITIONS - 1), 1, vec![9_u8; 8]))
            .await
            .unwrap();
        assert_eq!(receipt.partition, PARTITIONS - 1);
        let acked_at = Instant::now();
        let (reader, event, fetched_at) = fetch.await.unwrap();
        let records = records_of(event);
        assert_eq!(
            records.len(),
            1,
            "the waiting fetch returned the new record"
        );
        assert_eq!(
            (records[0].partition, records[0].offset),
            (receipt.partition, receipt.offset)
        );
        let latency = fetched_at.saturating_duration_since(acked_at);
        assert!(
            latency < wait / 4,
            "the record was returned {latency:?} after its ack; the wait was {wait:?}"
        );
        reader
    };
    let stats = reader.stats();
    assert_eq!(
        stats.empty_waits, after.empty_waits,
        "no empty wait before the new record was returned"
    );

    // That partition is at its end again: the next fetch says so by returning at once,
    // without waiting out its 20 s (the processor flushes instead of waiting).
    let started = Instant::now();
    let records = records_of(reader.fetch(1 << 20, wait).await);
    let returned_after = started.elapsed();
    assert!(records.is_empty(), "nothing new was appended: {records:?}");
    assert!(
        returned_after < wait / 4,
        "the fetch after the partition's last record waited {returned_after:?} (wait {wait:?})"
    );
    assert_eq!(
        reader.stats().empty_waits,
        stats.empty_waits,
        "returning at a partition's end is not an empty wait"
    );
    reader.close().await;
}
