//! The Kafka durable log against the real broker: append and read back in per-agent
//! order with headers, ack semantics (acknowledged means readable), replay from a time,
//! consumer-group positions, and the errors a reader can meet.

mod log_kafka_support;

use std::collections::BTreeMap;
use std::time::Duration;

use log_kafka_support::{connect, fresh_topic, record};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::time::Instant;
use tributary_collector::log::kafka::{KafkaLog, KafkaLogConfig};
use tributary_collector::log::{DurableLog, LogError, LogRecord};

/// Reads `partition` from `from` until `want` records arrived or the deadline passed.
async fn read_until(
    log: &KafkaLog,
    partition: u32,
    from: u64,
    want: usize,
    deadline: Instant,
) -> Vec<LogRecord> {
    let mut records = Vec::new();
    let mut next = from;
    while records.len() < want {
        assert!(
            Instant::now() < deadline,
            "partition {partition}: read {} of {want} records before the deadline",
            records.len()
        );
        let batch = log
            .read(partition, next, 64 * 1024)
            .await
            .unwrap_or_else(|error| panic!("read partition {partition} at {next}: {error}"));
        if let Some(last) = batch.last() {
            next = last.offset + 1;
        }
        records.extend(batch);
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_records_read_back_in_per_agent_order_with_headers() {
    let Some((brokers, topic)) = fresh_topic("order", 3).await else {
        return;
    };
    let log = connect(KafkaLogConfig::new(&brokers, &topic)).await;
    assert_eq!(log.partition_count(), 3);
    const AGENTS: usize = 7;
    const BATCHES_PER_AGENT: u64 = 40;

    // Agents append concurrently; each agent pipelines its batches (enqueued in sequence
    // order, acknowledgements awaited together), as an ingest connection does.
    let mut agents = tokio::task::JoinSet::new();
    for agent in 0..AGENTS {
        let log = log.clone();
        agents.spawn(async move {
            let agent_id = format!("agent-{agent}");
            let mut pending = Vec::new();
            for batch_seq in 0..BATCHES_PER_AGENT {
                let value = format!("{agent_id}/{batch_seq}/").repeat(20);
                let acknowledgement = log
                    .enqueue(record(&agent_id, batch_seq, value))
                    .await
                    .unwrap_or_else(|error| panic!("enqueue {agent_id}/{batch_seq}: {error}"));
                pending.push((batch_seq, acknowledgement));
            }
            let mut receipts = Vec::new();
            for (batch_seq, acknowledgement) in pending {
                receipts.push((agent_id.clone(), batch_seq, acknowledgement.await));
            }
            receipts
        });
    }
    let mut receipts = BTreeMap::new();
    while let Some(joined) = agents.join_next().await {
        for (agent_id, batch_seq, result) in
            joined.unwrap_or_else(|error| panic!("agent task: {error}"))
        {
            let receipt =
                result.unwrap_or_else(|error| panic!("append {agent_id}/{batch_seq}: {error}"));
            assert_eq!(
                receipt.partition,
                log.partition_for_key(&agent_id),
                "{agent_id} lands in its key's partition"
            );
            assert!(
                receipt.timestamp_ms > 1_600_000_000_000,
                "log append time is stamped: {}",
                receipt.timestamp_ms
            );
            receipts.insert((agent_id, batch_seq), receipt);
        }
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for partition in 0..log.partition_count() {
        let range = log.offset_range(partition).await.expect("offset range");
        let expected = receipts
            .values()
            .filter(|receipt| receipt.partition == partition)
            .count();
        assert_eq!(
            range.next - range.earliest,
            expected as u64,
            "partition {partition} holds exactly what was appended"
        );
        for record in read_until(&log, partition, range.earliest, expected, deadline).await {
            let headers = &record.headers;
            assert_eq!(headers.protocol_version, 1);
            assert_eq!(
                record.value,
                format!("{}/{}/", headers.agent_id, headers.batch_seq)
                    .repeat(20)
                    .into_bytes()
            );
            let receipt = receipts[&(headers.agent_id.clone(), headers.batch_seq)];
            assert_eq!(
                (record.partition, record.offset, record.timestamp_ms),
                (receipt.partition, receipt.offset, receipt.timestamp_ms)
            );
            seen.entry(headers.agent_id.clone())
                .or_default()
                .push(headers.batch_seq);
        }
    }
    assert_eq!(seen.len(), AGENTS);
    for (agent_id, sequence) in seen {
        assert_eq!(
            sequence,
            (0..BATCHES_PER_AGENT).collect::<Vec<_>>(),
            "{agent_id}: every batch once, in order"
        );
    }
    assert_eq!(
        log.stats().appended_records,
        AGENTS as u64 * BATCHES_PER_AGENT
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_append_is_readable_at_its_offset() {
    let Some((brokers, topic)) = fresh_topic("ack", 2).await else {
        return;
    };
    let log = connect(KafkaLogConfig::new(&brokers, &topic)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    for batch_seq in 0..25u64 {
        let agent_id = format!("ack-agent-{}", batch_seq % 3);
        let value = vec![batch_seq as u8; 5 * 1024];
        let receipt = log
            .append(record(&agent_id, batch_seq, value.clone()))
            .await
            .expect("append");
        // Acknowledged means committed on the broker: below the high watermark, and readable.
        let range = log
            .offset_range(receipt.partition)
            .await
            .expect("offset range");
        assert!(
            receipt.offset < range.next,
            "acked offset {} is below the high watermark {}",
            receipt.offset,
            range.next
        );
        let read = read_until(&log, receipt.partition, receipt.offset, 1, deadline).await;
        assert_eq!(read[0].offset, receipt.offset);
        assert_eq!(
            (read[0].headers.agent_id.as_str(), read[0].headers.batch_seq),
            (agent_id.as_str(), batch_seq)
        );
        assert_eq!(read[0].value, value);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_for_time_finds_the_first_record_at_or_after_a_time() {
    let Some((brokers, topic)) = fresh_topic("time", 1).await else {
        return;
    };
    let log = connect(KafkaLogConfig::new(&brokers, &topic)).await;
    let mut receipts = Vec::new();
    for batch_seq in 0..30u64 {
        receipts.push(
            log.append(record("time-agent", batch_seq, vec![7u8; 100]))
                .await
                .expect("append"),
        );
    }
    assert!(
        receipts
            .windows(2)
            .all(|pair| pair[0].timestamp_ms <= pair[1].timestamp_ms),
        "log append time never goes back"
    );
    for receipt in &receipts {
        let offset = log
            .offset_for_time(0, receipt.timestamp_ms)
            .await
            .expect("offset for time");
        // The first record stamped at or after this time; earlier records with the same
        // millisecond may precede this one.
        let first_with_time = receipts
            .iter()
            .find(|other| other.timestamp_ms >= receipt.timestamp_ms)
            .map(|other| other.offset);
        assert_eq!(Some(offset), first_with_time);
    }
    assert_eq!(
        log.offset_for_time(0, 0).await.expect("time 0"),
        0,
        "a time before everything replays from the start"
    );
    let last = receipts
        .last()
        .map(|receipt| receipt.timestamp_ms)
        .unwrap_or_default();
    assert_eq!(
        log.offset_for_time(0, last + 60_000)
            .await
            .expect("future time"),
        30,
        "a time after everything starts at the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_are_committed_per_group_and_partition_and_survive_a_new_client() {
    let Some((brokers, topic)) = fresh_topic("positions", 3).await else {
        return;
    };
    let config = KafkaLogConfig::new(&brokers, &topic);
    let log = connect(config.clone()).await;
    for batch_seq in 0..10u64 {
        log.append(record("position-agent", batch_seq, vec![1u8; 10]))
            .await
            .expect("append");
    }
    let partition = log.partition_for_key("position-agent");
    let group = format!("processor-{topic}");
    assert_eq!(
        log.load_position(&group, partition).await.expect("load"),
        None,
        "a new group has no position"
    );
    log.commit_position(&group, partition, 4)
        .await
        .expect("commit 4");
    assert_eq!(
        log.load_position(&group, partition).await.expect("load"),
        Some(4)
    );
    log.commit_position(&group, partition, 9)
        .await
        .expect("commit 9");
    let other_partition = (partition + 1) % 3;
    log.commit_position(&group, other_partition, 0)
        .await
        .expect("commit other partition");
    let other_group = format!("{group}-other");
    log.commit_position(&other_group, partition, 2)
        .await
        .expect("commit other group");

    let reopened = connect(config).await;
    assert_eq!(
        reopened
            .load_position(&group, partition)
            .await
            .expect("load"),
        Some(9)
    );
    assert_eq!(
        reopened
            .load_position(&group, other_partition)
            .await
            .expect("load"),
        Some(0)
    );
    assert_eq!(
        reopened
            .load_position(&other_group, partition)
            .await
            .expect("load"),
        Some(2)
    );
    assert_eq!(
        reopened
            .load_position(&other_group, other_partition)
            .await
            .expect("load"),
        None
    );
    assert!(matches!(
        reopened.load_position("", partition).await,
        Err(LogError::InvalidGroupName { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_get_typed_errors_for_bad_offsets_partitions_and_foreign_records() {
    let Some((brokers, topic)) = fresh_topic("errors", 1).await else {
        return;
    };
    let log = connect(KafkaLogConfig::new(&brokers, &topic)).await;
    log.append(record("error-agent", 0, vec![1u8; 10]))
        .await
        .expect("append");

    match log.read(0, 50, 1024).await {
        Err(LogError::OffsetOutOfRange {
            partition: 0,
            requested: 50,
            earliest: 0,
            next: 1,
        }) => {}
        other => panic!("reading past the end: expected OffsetOutOfRange, got {other:?}"),
    }
    assert!(matches!(
        log.read(5, 0, 1024).await,
        Err(LogError::UnknownPartition {
            partition: 5,
            partition_count: 1
        })
    ));
    assert!(matches!(
        log.offset_range(1).await,
        Err(LogError::UnknownPartition { .. })
    ));

    // A record some other producer wrote, without our headers.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    let headers = OwnedHeaders::new().insert(Header {
        key: "batch_seq",
        value: Some("not-a-number"),
    });
    producer
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key("intruder")
                .payload("x")
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(error, _)| panic!("produce foreign record: {error}"));
    log.append(record("error-agent", 1, vec![2u8; 10]))
        .await
        .expect("append after the foreign record");

    let deadline = Instant::now() + Duration::from_secs(30);
    let first = read_until(&log, 0, 0, 1, deadline).await;
    assert_eq!(
        first[0].headers.batch_seq, 0,
        "records before the foreign one are delivered"
    );
    let error = loop {
        assert!(
            Instant::now() < deadline,
            "the foreign record was not reported before the deadline"
        );
        match log.read(0, 1, 1024).await {
            Ok(records) if records.is_empty() => continue,
            Ok(records) => panic!("the foreign record was returned as {records:?}"),
            Err(error) => break error,
        }
    };
    assert!(
        matches!(
            error,
            LogError::ForeignRecord {
                partition: 0,
                offset: 1,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("batch_seq"),
        "the reason names the bad header: {error}"
    );
    let after = read_until(&log, 0, 2, 1, deadline).await;
    assert_eq!(
        after[0].headers.batch_seq, 1,
        "skipping past the foreign record continues"
    );
}

#[tokio::test]
async fn invalid_configs_are_rejected_before_connecting() {
    let bad = [
        KafkaLogConfig {
            brokers: " ".into(),
            ..KafkaLogConfig::default()
        },
        KafkaLogConfig {
            topic: "has space".into(),
            ..KafkaLogConfig::default()
        },
        KafkaLogConfig {
            max_record_bytes: 0,
            ..KafkaLogConfig::default()
        },
        KafkaLogConfig {
            max_queue_kbytes: 1,
            ..KafkaLogConfig::default()
        },
    ];
    for config in bad {
        let error = KafkaLog::connect(config.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{config:?} should be rejected"));
        assert!(matches!(error, LogError::InvalidConfig(_)), "{error}");
    }
    let parsed: Result<KafkaLogConfig, _> =
        toml::from_str("brokers = \"k:9092\"\nlinger_msec = 3\n");
    assert!(parsed.is_err(), "unknown fields are rejected");
}
