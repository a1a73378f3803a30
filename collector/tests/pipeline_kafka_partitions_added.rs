//! Partitions added to the Kafka topic while the processor runs are consumed, from their
//! start, exactly once: with a fixed `all` assignment (the loop asks the topic for its
//! partition count every `metadata_refresh_interval_ms`) and as a consumer-group member
//! (the group rebalances to hand the new partition out). Against the real Kafka of
//! `deploy/dev/services.sh up`; the store is the embedded one.
//!
//! The topic starts with one partition; agents of the first half write to it; then a
//! partition is added with the admin API and agents that a two-partition log routes to
//! partition 1 write there (an agent's batches stay in one partition, as in production
//! where a collector keeps routing over the partitions it connected with).

mod log_kafka_support;
mod pipeline_support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline_support::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;
use tributary_collector::live::LiveFeed;
use tributary_collector::log::kafka::{KafkaLog, KafkaLogConfig};
use tributary_collector::log::{partition_for_key, Clock, DurableLog, SystemClock};
use tributary_collector::pipeline::{
    run_consumer, ConsumerConfig, PartitionAssignment, PipelineMetrics,
};
use tributary_collector::process::EngineConfig;
use tributary_collector::store::{EmbeddedStore, EmbeddedStoreConfig, Queries};
use tributary_protocol::Batch;

/// No gap or idle timeouts while the test runs: the wall clock must not matter.
fn test_engine_config() -> EngineConfig {
    EngineConfig {
        sequence_gap_timeout_ms: 3_600_000,
        idle_timeout_ms: 7_200_000,
        ..engine_config()
    }
}

async fn add_partition(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap_or_else(|error| panic!("kafka at {brokers}: create admin client: {error}"));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_partitions(&[NewPartitions::new(topic, 2)], &options)
        .await
        .unwrap_or_else(|error| panic!("kafka at {brokers}: add a partition to {topic}: {error}"));
    for result in results {
        result.unwrap_or_else(|(name, code)| panic!("add a partition to {name}: {code}"));
    }
}

async fn append_all(log: &KafkaLog, batches: &[&Batch], partition: u32) -> u64 {
    let mut end = 0;
    for batch in batches {
        let receipt = log.append(record(batch)).await.unwrap();
        assert_eq!(
            receipt.partition, partition,
            "agent {} routed to partition {}",
            batch.agent_id, receipt.partition
        );
        end = end.max(receipt.offset + 1);
    }
    end
}

async fn wait_for_checkpoints(metrics: &PipelineMetrics, ends: &BTreeMap<u32, u64>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let progress = metrics.progress();
        let reached = ends.iter().all(|(partition, end)| {
            progress
                .get(partition)
                .is_some_and(|progress| progress.checkpointed_offset >= *end)
        });
        if reached {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after 90 s waiting for {what}: wanted checkpoints at {ends:?}, have {progress:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn partitions_added_while_running_are_consumed(
    purpose: &str,
    partitions: PartitionAssignment,
) {
    let Some((brokers, topic)) = log_kafka_support::fresh_topic(purpose, 1).await else {
        return;
    };
    let log_config = KafkaLogConfig {
        metadata_refresh_interval_ms: 1_000,
        read_wait_ms: 100,
        ..KafkaLogConfig::new(&brokers, &topic)
    };
    let log = Arc::new(log_kafka_support::connect(log_config.clone()).await);
    let start_ms = (SystemClock.now_ms() - 7_200_000) / 600_000 * 600_000;
    let data = dataset(8, 12, start_ms);
    let moves_to_second = |batch: &&Batch| partition_for_key(&batch.agent_id, 2) == 1;
    let (later, first): (Vec<&Batch>, Vec<&Batch>) = data.batches.iter().partition(moves_to_second);
    assert!(
        !first.is_empty() && !later.is_empty(),
        "the dataset's agents fall on both sides"
    );
    let mut ends = BTreeMap::new();
    ends.insert(0, append_all(&log, &first, 0).await);

    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(EmbeddedStoreConfig::new(
        dir.path().join("store"),
        test_engine_config().resolutions_ms,
    ))
    .unwrap();
    let queries = Queries::Embedded(store.reader());
    let metrics = Arc::new(PipelineMetrics::default());
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(run_consumer(
        log.clone(),
        store,
        SystemClock,
        ConsumerConfig {
            engine: test_engine_config(),
            group: format!("grow-{purpose}"),
            partitions,
            ..ConsumerConfig::default()
        },
        LiveFeed::new(1_000),
        metrics.clone(),
        shutdown.clone(),
    ));
    wait_for_checkpoints(&metrics, &ends, "partition 0 processed").await;
    assert!(
        !metrics.progress().contains_key(&1),
        "no partition 1 before it exists"
    );

    add_partition(&brokers, &topic).await;
    // A collector started now routes over two partitions.
    let grown = log_kafka_support::connect(log_config).await;
    assert_eq!(grown.partition_count(), 2);
    ends.insert(1, append_all(&grown, &later, 1).await);
    wait_for_checkpoints(&metrics, &ends, "the added partition processed").await;

    shutdown.cancel();
    let report = consumer.await.unwrap().unwrap();
    assert_eq!(
        report.next_offsets, ends,
        "every record up to each end, checkpointed"
    );
    assert_eq!(
        metrics.records_processed.load(Ordering::Relaxed),
        data.batches.len() as u64,
        "every record was processed once (none twice, none skipped)"
    );
    assert_eq!(
        metrics.duplicate_batches.load(Ordering::Relaxed),
        data.duplicates as u64
    );
    assert_eq!(raw_rows_once(&queries, &data).await, data.unique_readings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_added_while_running_is_read_from_its_start_with_all_partitions() {
    partitions_added_while_running_are_consumed("grow-all", PartitionAssignment::All).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_added_while_running_is_assigned_to_a_group_member() {
    partitions_added_while_running_are_consumed("grow-group", PartitionAssignment::Group).await;
}
