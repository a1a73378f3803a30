//! Shared helpers for the tests of the Kafka durable log against the real broker that
//! `deploy/dev/services.sh up` starts: each test creates its own uniquely named topic
//! (log-append-time timestamps, a few partitions), so reruns never see old data.

#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tributary_collector::log::kafka::{KafkaLog, KafkaLogConfig};
use tributary_collector::log::{AppendRecord, RecordHeaders};
use tributary_tests::services::{service_env, unique_suffix, KAFKA_BROKERS};

/// Brokers and a fresh topic, or `None` (after a `SKIPPED:` line) without services.
pub async fn fresh_topic(purpose: &str, partitions: i32) -> Option<(String, String)> {
    let brokers = service_env(KAFKA_BROKERS)?;
    let topic = format!("tributary.test.{purpose}.{}", unique_suffix());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap_or_else(|error| panic!("kafka at {brokers}: create admin client: {error}"));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new_topic = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))
        .set("message.timestamp.type", "LogAppendTime");
    let results = admin
        .create_topics(&[new_topic], &options)
        .await
        .unwrap_or_else(|error| panic!("kafka at {brokers}: create topic {topic}: {error}"));
    for result in results {
        result.unwrap_or_else(|(name, code)| {
            panic!("kafka at {brokers}: create topic {name}: {code}")
        });
    }
    Some((brokers, topic))
}

/// Connects a log, retrying while the new topic's metadata propagates (bounded).
pub async fn connect(config: KafkaLogConfig) -> KafkaLog {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match KafkaLog::connect(config.clone()).await {
            Ok(log) => return log,
            Err(error) if tokio::time::Instant::now() < deadline => {
                eprintln!("connect to {} not ready yet: {error}", config.topic);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!(
                "connect to topic {} at {}: {error}",
                config.topic, config.brokers
            ),
        }
    }
}

pub fn record(agent_id: &str, batch_seq: u64, value: impl Into<Bytes>) -> AppendRecord {
    AppendRecord {
        headers: RecordHeaders {
            agent_id: agent_id.to_owned(),
            batch_seq,
            protocol_version: 1,
        },
        value: value.into(),
    }
}
