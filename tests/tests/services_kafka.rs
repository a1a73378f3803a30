//! Smoke test: produce then consume through the Kafka broker that `deploy/dev/services.sh up`
//! starts, with rdkafka (the client the collector's durable log uses).
//!
//! Why: proves the broker is a working KRaft node (topic creation, idempotent zstd producer,
//! consumer groups) and that the topics the pipeline needs were created by the script.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message};
use tokio::time::{timeout_at, Instant};
use tributary_tests::services::{
    lookup_service_env, service_env, unique_suffix, KAFKA_BROKERS, KAFKA_VERSION,
};

const MESSAGE_COUNT: usize = 1000;
const PARTITION_COUNT: i32 = 3;
/// Created by `services.sh up`; the collector writes batches here.
const BATCHES_TOPIC: &str = "tributary.batches";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_produce_then_consume_round_trip() {
    let Some(brokers) = service_env(KAFKA_BROKERS) else {
        return;
    };
    let suffix = unique_suffix();
    let topic = format!("tributary.smoke.{suffix}");
    let deadline = Instant::now() + Duration::from_secs(60);

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("create admin client");
    let admin_options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let created = admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                PARTITION_COUNT,
                TopicReplication::Fixed(1),
            )],
            &admin_options,
        )
        .await
        .unwrap_or_else(|error| panic!("kafka at {brokers}: create topic {topic}: {error}"));
    for result in created {
        result.unwrap_or_else(|(name, code)| {
            panic!("kafka at {brokers}: create topic {name}: {code}")
        });
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("compression.type", "zstd")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("create producer");
    let metadata = producer
        .client()
        .fetch_metadata(Some(BATCHES_TOPIC), Duration::from_secs(10))
        .unwrap_or_else(|error| {
            panic!("kafka at {brokers}: metadata for {BATCHES_TOPIC}: {error}")
        });
    let batches_partitions = metadata
        .topics()
        .iter()
        .find(|candidate| candidate.name() == BATCHES_TOPIC && candidate.error().is_none())
        .map(|found| found.partitions().len())
        .unwrap_or_else(|| {
            panic!("topic {BATCHES_TOPIC} is missing on {brokers}; services.sh up creates it")
        });
    assert!(batches_partitions > 0);

    let mut sent = BTreeMap::new();
    let mut deliveries = Vec::with_capacity(MESSAGE_COUNT);
    for index in 0..MESSAGE_COUNT {
        let key = format!("device-{}", index % 50);
        let payload = format!("reading {index} from {key}");
        let delivery = producer
            .send_result(FutureRecord::to(&topic).key(&key).payload(&payload))
            .map_err(|(error, _)| error)
            .unwrap_or_else(|error| panic!("kafka at {brokers}: enqueue message {index}: {error}"));
        deliveries.push(delivery);
        sent.insert(payload, key);
    }
    let mut partitions_written = BTreeSet::new();
    for (index, delivery) in deliveries.into_iter().enumerate() {
        let delivered = timeout_at(deadline, delivery)
            .await
            .unwrap_or_else(|_| {
                panic!("kafka at {brokers}: message {index} not acknowledged within 60 s")
            })
            .expect("producer dropped the delivery")
            .unwrap_or_else(|(error, _)| {
                panic!("kafka at {brokers}: deliver message {index}: {error}")
            });
        partitions_written.insert(delivered.partition);
    }

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("tributary-smoke-{suffix}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("create consumer");
    consumer
        .subscribe(&[&topic])
        .unwrap_or_else(|error| panic!("kafka at {brokers}: subscribe {topic}: {error}"));
    let mut received = BTreeMap::new();
    let mut partitions_read = BTreeSet::new();
    while received.len() < MESSAGE_COUNT {
        let message = timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "kafka at {brokers}: consumed {} of {MESSAGE_COUNT} messages within 60 s",
                    received.len()
                )
            })
            .unwrap_or_else(|error| panic!("kafka at {brokers}: consume from {topic}: {error}"));
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        partitions_read.insert(message.partition());
        received.insert(payload, key);
    }
    assert_eq!(
        received, sent,
        "every produced message is consumed once with its key"
    );
    assert_eq!(partitions_read, partitions_written);
    assert!(
        partitions_written.len() > 1,
        "50 keys should spread over {PARTITION_COUNT} partitions, got {partitions_written:?}"
    );

    drop(consumer);
    let _ = admin.delete_topics(&[&topic], &admin_options).await;
    let broker_version =
        lookup_service_env(KAFKA_VERSION).unwrap_or_else(|| "(version unknown)".into());
    let (_, librdkafka_version) = rdkafka::util::get_rdkafka_version();
    eprintln!(
        "kafka {broker_version} at {brokers}: produced and consumed {MESSAGE_COUNT} messages over {} partitions (zstd, idempotent producer, librdkafka {librdkafka_version}); {BATCHES_TOPIC} has {batches_partitions} partitions",
        partitions_written.len()
    );
}
