//! The Kafka backend of the durable log: a thin adapter from [`DurableLog`] to rdkafka.
//!
//! Why it looks the way it does (details and measurements in `docs/kafka.md`):
//! - An agent is acked only after the broker acknowledged the write, so `append`
//!   resolves on the delivery report of an idempotent producer with `acks=all`. The
//!   idempotent producer also means librdkafka's internal retries (broker restarts,
//!   lost connections) never write a record twice.
//! - The partition is chosen here with [`partition_for_key`] (not by librdkafka's
//!   partitioner), so the trait's `partition_for_key` and the broker agree, and one
//!   agent's batches stay in order in one partition. Enqueueing is serialised through a
//!   FIFO lock so that a batch waiting on a full local queue cannot be overtaken by a
//!   later batch of the same agent.
//! - A full local queue (`QueueFull`) is backpressure: `append` waits and retries, it
//!   never drops; the time spent waiting is counted in [`KafkaLogStats`]. Any other
//!   producer error, including a delivery timeout while the brokers are unreachable,
//!   surfaces as a retryable [`LogError::Kafka`] that ingest turns into a retryable nack.
//! - Reads use one assign-only consumer per partition (no group, nothing committed),
//!   repositioned only when the caller asks for an offset other than the one after the
//!   last record it got, so a processor that reads forward streams without seeks.
//! - Consumer positions are Kafka consumer-group offsets, committed explicitly
//!   (`enable.auto.commit=false`): the processor commits only after its results are
//!   stored.
//!
//! librdkafka's consumer calls block, so they run on tokio's blocking pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Deserialize;

use super::{
    partition_for_key, AppendReceipt, AppendRecord, DurableLog, LogError, LogRecord, OffsetRange,
    RecordHeaders,
};

/// Header names every record carries. Values are UTF-8 text (the agent id, and the
/// batch sequence and protocol version in decimal) so that any Kafka tool shows them.
pub const HEADER_AGENT_ID: &str = "agent_id";
pub const HEADER_BATCH_SEQ: &str = "batch_seq";
pub const HEADER_PROTOCOL_VERSION: &str = "protocol_version";

/// Longest agent id accepted as a record key, the same limit as the embedded log.
pub const MAX_AGENT_ID_BYTES: usize = u16::MAX as usize;

/// How to reach Kafka and how to produce. Defaults are the measured choices in
/// `docs/kafka.md`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaLogConfig {
    /// Comma-separated `host:port` bootstrap servers.
    pub brokers: String,
    /// Topic that holds the batches; must exist (the collector does not create it).
    pub topic: String,
    /// `client.id` prefix, shown in broker logs and metrics.
    pub client_id: String,
    /// `linger.ms`: how long the producer waits to fill a batch.
    pub linger_ms: u32,
    /// `batch.size`: the most bytes the producer puts in one partition batch.
    pub batch_size_bytes: u32,
    /// `queue.buffering.max.kbytes`: the local queue; when it is full, `append` waits.
    pub max_queue_kbytes: u32,
    /// `message.timeout.ms` (delivery timeout): how long one append may wait for the
    /// brokers before it fails with a retryable error. 0 waits forever.
    pub delivery_timeout_ms: u32,
    /// Largest record value accepted, below the broker's `message.max.bytes`.
    pub max_record_bytes: usize,
    /// Pause between retries while the local queue is full.
    pub queue_full_backoff_ms: u64,
    /// Timeout of metadata, offset and commit requests.
    pub request_timeout_ms: u64,
    /// How long a `read` (or a processor's poll over all its partitions) waits for the
    /// first record before returning an empty result.
    pub read_wait_ms: u64,
    /// Group membership (`[process] partitions = "group"`): a member that sends no
    /// heartbeat for this long (killed, partitioned away) loses its partitions to the others.
    pub group_session_timeout_ms: u64,
    /// Group membership: a member that does not poll for this long (a store outage pauses
    /// the processor) leaves the group; it rejoins when it polls again.
    pub group_max_poll_interval_ms: u64,
    /// How often readers refresh the topic's metadata (`topic.metadata.refresh.interval.ms`):
    /// a consumer group notices partitions added to the topic within this interval and
    /// rebalances to hand them out (librdkafka's default is 5 minutes).
    pub metadata_refresh_interval_ms: u64,
}

impl Default for KafkaLogConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            topic: "tributary.batches".to_owned(),
            client_id: "tributary-collector".to_owned(),
            linger_ms: 5,
            batch_size_bytes: 1024 * 1024,
            max_queue_kbytes: 256 * 1024,
            delivery_timeout_ms: 120_000,
            max_record_bytes: 900 * 1024,
            queue_full_backoff_ms: 5,
            request_timeout_ms: 10_000,
            read_wait_ms: 200,
            group_session_timeout_ms: 10_000,
            group_max_poll_interval_ms: 300_000,
            metadata_refresh_interval_ms: 30_000,
        }
    }
}

impl KafkaLogConfig {
    /// A config for these brokers and topic with every other setting at its default.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            ..Self::default()
        }
    }

    /// Checks the settings that librdkafka would otherwise reject with a vaguer message.
    pub fn validate(&self) -> Result<(), LogError> {
        let invalid = |message: String| Err(LogError::InvalidConfig(format!("kafka: {message}")));
        if self.brokers.trim().is_empty() {
            return invalid(
                "brokers is empty; set it to host:port of at least one broker".to_owned(),
            );
        }
        if self.topic.is_empty()
            || self.topic.len() > 249
            || !self
                .topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return invalid(format!("topic {:?} is not a valid Kafka topic name (1 to 249 characters from A-Z a-z 0-9 . _ -)", self.topic));
        }
        if self.batch_size_bytes == 0 || self.max_queue_kbytes == 0 {
            return invalid("batch_size_bytes and max_queue_kbytes must be above 0".to_owned());
        }
        if self.max_record_bytes == 0
            || self.max_record_bytes as u64 > u64::from(self.max_queue_kbytes) * 1024
        {
            return invalid(format!(
                "max_record_bytes {} must be above 0 and fit in the local queue of {} KiB",
                self.max_record_bytes, self.max_queue_kbytes
            ));
        }
        if self.group_session_timeout_ms < 1_000
            || self.group_max_poll_interval_ms < self.group_session_timeout_ms
        {
            return invalid(format!(
                "group_session_timeout_ms {} must be at least 1000 and at most group_max_poll_interval_ms {}",
                self.group_session_timeout_ms, self.group_max_poll_interval_ms
            ));
        }
        if self.linger_ms > 900_000 {
            return invalid(format!(
                "linger_ms {} is above librdkafka's limit of 900000",
                self.linger_ms
            ));
        }
        Ok(())
    }

    fn base_client_config(&self, role: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("{}-{role}", self.client_id))
            .set(
                "socket.timeout.ms",
                self.request_timeout_ms.max(10).to_string(),
            );
        config
    }

    fn producer_config(&self) -> ClientConfig {
        let mut config = self.base_client_config("producer");
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "zstd")
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.size", self.batch_size_bytes.to_string())
            .set(
                "queue.buffering.max.kbytes",
                self.max_queue_kbytes.to_string(),
            )
            .set("queue.buffering.max.messages", "1000000")
            .set(
                "message.max.bytes",
                (self.max_record_bytes + 64 * 1024)
                    .max(1_000_000)
                    .to_string(),
            )
            .set("message.timeout.ms", self.delivery_timeout_ms.to_string());
        config
    }

    fn reader_config(&self, partition: u32) -> ClientConfig {
        let mut config = self.base_client_config(&format!("reader-{partition}"));
        // An assign-only consumer: the group id is required by librdkafka but nothing is
        // ever committed under it.
        config
            .set("group.id", format!("{}-reader", self.client_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error")
            .set("fetch.wait.max.ms", "50")
            .set("isolation.level", "read_committed");
        config
    }

    /// One assign-only consumer for every partition a processor reads (see
    /// [`super::kafka_group`]): polled once per round, whatever the number of partitions.
    pub(super) fn multi_reader_config(&self) -> ClientConfig {
        let mut config = self.base_client_config("reader");
        config
            .set("group.id", format!("{}-reader", self.client_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error")
            .set("fetch.wait.max.ms", "50")
            .set("isolation.level", "read_committed")
            // An end-of-partition event once the reader has delivered a partition's last
            // record: the processor then knows it is caught up and flushes at once
            // (`kafka_group::poll_batch`) instead of waiting out the fetch.
            .set("enable.partition.eof", "true")
            .set(
                "topic.metadata.refresh.interval.ms",
                self.metadata_refresh_interval_ms
                    .clamp(1_000, 3_600_000)
                    .to_string(),
            );
        config
    }

    /// A member of consumer group `group` (subscribe, cooperative-sticky rebalancing).
    pub(super) fn member_config(&self, group: &str) -> ClientConfig {
        let mut config = self.multi_reader_config();
        let session_timeout_ms = self.group_session_timeout_ms.max(1_000);
        config
            .set("client.id", format!("{}-member", self.client_id))
            .set("group.id", group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (session_timeout_ms / 3).to_string(),
            )
            .set(
                "max.poll.interval.ms",
                self.group_max_poll_interval_ms.to_string(),
            );
        config
    }

    fn group_config(&self, group: &str) -> ClientConfig {
        let mut config = self.base_client_config("group");
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        config
    }
}

/// Counters for ingest's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KafkaLogStats {
    /// Records the brokers acknowledged.
    pub appended_records: u64,
    /// Appends that failed with an error (each one a nack).
    pub failed_appends: u64,
    /// Times an append found the local queue full and waited.
    pub queue_full_waits: u64,
    /// Total time appends spent waiting for room in the local queue.
    pub backpressure_ms: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appended_records: AtomicU64,
    failed_appends: AtomicU64,
    queue_full_waits: AtomicU64,
    backpressure_us: AtomicU64,
}

/// A partition reader and the offset it will deliver next without a seek.
struct PartitionReader {
    consumer: BaseConsumer,
    next_offset: Option<u64>,
}

struct Inner {
    config: KafkaLogConfig,
    /// Partitions at connect: appends route agents over these, so an agent's batches stay
    /// in one partition (and one engine) for the life of the process even when partitions
    /// are added to the topic.
    partition_count: u32,
    /// Partitions known to exist (at least `partition_count`; grows with
    /// [`KafkaLog::refresh_partition_count`]): what reads, offsets and commits accept.
    readable_partition_count: AtomicU32,
    /// Replaced when librdkafka reports a fatal error (an idempotent producer that can
    /// no longer guarantee order or exactly-once is unusable until recreated).
    producer: std::sync::RwLock<FutureProducer>,
    /// FIFO lock around enqueueing: keeps per-key order when appends wait on QueueFull.
    enqueue: tokio::sync::Mutex<()>,
    /// Created on first use; `None` until then.
    readers: Vec<Mutex<Option<PartitionReader>>>,
    groups: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    counters: Counters,
}

/// [`DurableLog`] over a Kafka topic. Cheap to clone.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KafkaLog")
            .field("brokers", &self.inner.config.brokers)
            .field("topic", &self.inner.config.topic)
            .field("partition_count", &self.inner.partition_count)
            .finish()
    }
}

impl KafkaLog {
    /// Connects to the brokers and learns the topic's partition count. Fails when the
    /// brokers do not answer within `request_timeout_ms` or the topic does not exist.
    pub async fn connect(config: KafkaLogConfig) -> Result<Self, LogError> {
        config.validate()?;
        let producer: FutureProducer = config
            .producer_config()
            .create()
            .map_err(|error| kafka_error("create producer", &config.topic, error))?;
        let topic = config.topic.clone();
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let (producer, partition_count) = blocking(move || {
            let count = topic_partition_count(&producer, &topic, timeout)?;
            Ok((producer, count))
        })
        .await?;
        let readers = (0..partition_count).map(|_| Mutex::new(None)).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                partition_count,
                readable_partition_count: AtomicU32::new(partition_count),
                producer: std::sync::RwLock::new(producer),
                enqueue: tokio::sync::Mutex::new(()),
                readers,
                groups: Mutex::new(HashMap::new()),
                counters: Counters::default(),
            }),
        })
    }

    pub fn config(&self) -> &KafkaLogConfig {
        &self.inner.config
    }

    pub fn stats(&self) -> KafkaLogStats {
        let counters = &self.inner.counters;
        KafkaLogStats {
            appended_records: counters.appended_records.load(Ordering::Relaxed),
            failed_appends: counters.failed_appends.load(Ordering::Relaxed),
            queue_full_waits: counters.queue_full_waits.load(Ordering::Relaxed),
            backpressure_ms: counters.backpressure_us.load(Ordering::Relaxed) / 1000,
        }
    }

    /// Waits up to `timeout` for every enqueued record to be acknowledged (graceful
    /// shutdown).
    pub async fn flush(&self, timeout: Duration) -> Result<(), LogError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            inner
                .current_producer()?
                .flush(timeout)
                .map_err(|error| kafka_error("flush", &inner.config.topic, error))
        })
        .await
    }

    /// Appends a record and resolves once the brokers acknowledged it (`acks=all`).
    pub async fn append_acknowledged(
        &self,
        record: AppendRecord,
    ) -> Result<AppendReceipt, LogError> {
        match self.enqueue(record).await {
            Ok(acknowledgement) => acknowledgement.await,
            Err(error) => {
                self.inner
                    .counters
                    .failed_appends
                    .fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// Hands a record to the producer and returns a future of its acknowledgement.
    ///
    /// For pipelining: records enqueued one after another by one caller keep that order
    /// in their partition, while their acknowledgements are awaited together. Waits
    /// (backpressure) while the local queue is full. The record is durable only when
    /// the returned future resolves `Ok`.
    pub async fn enqueue(
        &self,
        record: AppendRecord,
    ) -> Result<
        impl std::future::Future<Output = Result<AppendReceipt, LogError>> + Send + 'static,
        LogError,
    > {
        let inner = Arc::clone(&self.inner);
        let topic = inner.config.topic.as_str();
        let headers = &record.headers;
        if headers.agent_id.len() > MAX_AGENT_ID_BYTES {
            return Err(LogError::AgentIdTooLong {
                length: headers.agent_id.len(),
                max: MAX_AGENT_ID_BYTES,
            });
        }
        let record_bytes = record.value.len() + headers.agent_id.len();
        if record_bytes > inner.config.max_record_bytes {
            return Err(LogError::RecordTooLarge {
                agent_id: headers.agent_id.clone(),
                batch_seq: headers.batch_seq,
                record_bytes,
                max_record_bytes: inner.config.max_record_bytes,
            });
        }
        let partition = partition_for_key(&headers.agent_id, inner.partition_count);
        let batch_seq = headers.batch_seq.to_string();
        let protocol_version = headers.protocol_version.to_string();
        let kafka_headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: HEADER_AGENT_ID,
                value: Some(headers.agent_id.as_bytes()),
            })
            .insert(Header {
                key: HEADER_BATCH_SEQ,
                value: Some(batch_seq.as_bytes()),
            })
            .insert(Header {
                key: HEADER_PROTOCOL_VERSION,
                value: Some(protocol_version.as_bytes()),
            });
        let partition_i32 = i32::try_from(partition).map_err(|_| LogError::UnknownPartition {
            partition,
            partition_count: inner.partition_count,
        })?;

        let delivery = {
            let _enqueue_turn = inner.enqueue.lock().await;
            let producer = inner.usable_producer()?;
            let mut waiting_since: Option<Instant> = None;
            let delivery = loop {
                let kafka_record = FutureRecord::to(topic)
                    .partition(partition_i32)
                    .key(headers.agent_id.as_bytes())
                    .payload(record.value.as_ref())
                    .headers(kafka_headers.clone());
                match producer.send_result(kafka_record) {
                    Ok(delivery) => break delivery,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        if waiting_since.is_none() {
                            waiting_since = Some(Instant::now());
                            inner
                                .counters
                                .queue_full_waits
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(
                            inner.config.queue_full_backoff_ms.max(1),
                        ))
                        .await;
                    }
                    Err((error, _)) => return Err(produce_error(&record, topic, error)),
                }
            };
            if let Some(started) = waiting_since {
                inner
                    .counters
                    .backpressure_us
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            delivery
        };

        Ok(async move {
            let topic = inner.config.topic.as_str();
            let result = match delivery.await {
                Ok(Ok(delivered)) => u64::try_from(delivered.offset)
                    .map(|offset| AppendReceipt {
                        partition: u32::try_from(delivered.partition).unwrap_or(partition),
                        offset,
                        timestamp_ms: delivered.timestamp.to_millis().unwrap_or(0),
                    })
                    .map_err(|_| LogError::Kafka {
                        operation: "append",
                        topic: topic.to_owned(),
                        detail: format!(
                            "broker acknowledged with invalid offset {}",
                            delivered.offset
                        ),
                    }),
                Ok(Err((error, _))) => Err(produce_error(&record, topic, error)),
                Err(_canceled) => Err(LogError::Closed),
            };
            let counter = if result.is_ok() {
                &inner.counters.appended_records
            } else {
                &inner.counters.failed_appends
            };
            counter.fetch_add(1, Ordering::Relaxed);
            result
        })
    }

    /// Reads records of `partition` from `from_offset`; see [`DurableLog::read`].
    pub async fn read_records(
        &self,
        partition: u32,
        from_offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        self.check_partition(partition)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.read_blocking(partition, from_offset, max_bytes)).await
    }

    /// The low and high watermarks of `partition`.
    pub async fn retained_offsets(&self, partition: u32) -> Result<OffsetRange, LogError> {
        self.check_partition(partition)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.watermarks(partition)).await
    }

    /// The first offset with a timestamp at or after `time_ms` (`offsetsForTimes`), or
    /// the high watermark when there is none.
    pub async fn offset_at_time(&self, partition: u32, time_ms: i64) -> Result<u64, LogError> {
        self.check_partition(partition)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.offset_for_time_blocking(partition, time_ms)).await
    }

    /// Commits `next_offset` for `group` on `partition` as a consumer-group offset.
    pub async fn commit_group_offset(
        &self,
        group: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), LogError> {
        self.check_partition(partition)?;
        let consumer = self.inner.group_consumer(group)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let topic = inner.config.topic.as_str();
            let offset = offset_from_u64(next_offset, topic)?;
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(topic, partition as i32, offset)
                .map_err(|error| kafka_error("commit", topic, error))?;
            consumer
                .commit(&list, CommitMode::Sync)
                .map_err(|error| kafka_error("commit", topic, error))
        })
        .await
    }

    /// The offset `group` last committed for `partition`, if any.
    pub async fn committed_group_offset(
        &self,
        group: &str,
        partition: u32,
    ) -> Result<Option<u64>, LogError> {
        self.check_partition(partition)?;
        let consumer = self.inner.group_consumer(group)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let topic = inner.config.topic.as_str();
            let mut list = TopicPartitionList::new();
            list.add_partition(topic, partition as i32);
            let committed = consumer
                .committed_offsets(list, inner.request_timeout())
                .map_err(|error| kafka_error("load committed offset", topic, error))?;
            let found = committed
                .find_partition(topic, partition as i32)
                .map(|element| element.offset());
            match found {
                Some(Offset::Offset(offset)) if offset >= 0 => Ok(Some(offset as u64)),
                _ => Ok(None),
            }
        })
        .await
    }

    fn check_partition(&self, partition: u32) -> Result<(), LogError> {
        let partition_count = self.readable_partition_count();
        if partition >= partition_count {
            return Err(LogError::UnknownPartition {
                partition,
                partition_count,
            });
        }
        Ok(())
    }

    /// Partitions the topic is known to have: those at connect, and any added since that
    /// [`KafkaLog::refresh_partition_count`] saw. Appends keep routing over the partitions
    /// at connect ([`DurableLog::partition_count`]).
    pub fn readable_partition_count(&self) -> u32 {
        self.inner
            .readable_partition_count
            .load(Ordering::Relaxed)
            .max(self.inner.partition_count)
    }

    /// Asks the brokers how many partitions the topic has now (partitions can be added,
    /// never removed) and lets reads, offsets and commits use the new ones. The processor
    /// calls it periodically to pick up partitions added while it runs.
    pub async fn refresh_partition_count(&self) -> Result<u32, LogError> {
        let producer = self.inner.current_producer()?;
        let topic = self.inner.config.topic.clone();
        let timeout = self.inner.request_timeout();
        let count = blocking(move || topic_partition_count(&producer, &topic, timeout)).await?;
        let known = self
            .inner
            .readable_partition_count
            .fetch_max(count, Ordering::Relaxed);
        Ok(known.max(count))
    }
}

impl Inner {
    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    fn current_producer(&self) -> Result<FutureProducer, LogError> {
        self.producer
            .read()
            .map(|producer| producer.clone())
            .map_err(|_| LogError::Closed)
    }

    /// The producer, recreated first if librdkafka reported a fatal error. Records still
    /// queued in the old producer fail (retryably) when it is dropped; agents resend them.
    fn usable_producer(&self) -> Result<FutureProducer, LogError> {
        let current = self.current_producer()?;
        let Some((code, reason)) = current.client().fatal_error() else {
            return Ok(current);
        };
        tracing::error!(topic = %self.config.topic, ?code, %reason, "kafka producer hit a fatal error; recreating it");
        let replacement: FutureProducer =
            self.config.producer_config().create().map_err(|error| {
                kafka_error(
                    "recreate producer after a fatal error",
                    &self.config.topic,
                    error,
                )
            })?;
        let mut slot = self.producer.write().map_err(|_| LogError::Closed)?;
        *slot = replacement.clone();
        Ok(replacement)
    }

    fn watermarks(&self, partition: u32) -> Result<OffsetRange, LogError> {
        let topic = self.config.topic.as_str();
        let (low, high) = self
            .current_producer()?
            .client()
            .fetch_watermarks(topic, partition as i32, self.request_timeout())
            .map_err(|error| kafka_error("fetch watermarks", topic, error))?;
        Ok(OffsetRange {
            earliest: low.max(0) as u64,
            next: high.max(0) as u64,
        })
    }

    fn offset_for_time_blocking(&self, partition: u32, time_ms: i64) -> Result<u64, LogError> {
        let topic = self.config.topic.as_str();
        let reader_guard = self.reader(partition)?;
        let mut guard = reader_guard.lock().map_err(|_| LogError::Closed)?;
        let reader = self.ensure_reader(&mut guard, partition)?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition as i32, Offset::Offset(time_ms.max(0)))
            .map_err(|error| kafka_error("offsets for times", topic, error))?;
        let found = reader
            .consumer
            .offsets_for_times(list, self.request_timeout())
            .map_err(|error| kafka_error("offsets for times", topic, error))?;
        let element = found.find_partition(topic, partition as i32);
        if let Some(Err(error)) = element.as_ref().map(|element| element.error()) {
            return Err(kafka_error("offsets for times", topic, error));
        }
        match element.map(|element| element.offset()) {
            Some(Offset::Offset(offset)) if offset >= 0 => Ok(offset as u64),
            // No record at or after the time: replay starts at the end.
            _ => Ok(self.watermarks(partition)?.next),
        }
    }

    fn reader(&self, partition: u32) -> Result<&Mutex<Option<PartitionReader>>, LogError> {
        self.readers
            .get(partition as usize)
            .ok_or(LogError::UnknownPartition {
                partition,
                partition_count: self.partition_count,
            })
    }

    fn ensure_reader<'a>(
        &self,
        slot: &'a mut Option<PartitionReader>,
        partition: u32,
    ) -> Result<&'a mut PartitionReader, LogError> {
        if slot.is_none() {
            let consumer: BaseConsumer = self
                .config
                .reader_config(partition)
                .create()
                .map_err(|error| kafka_error("create reader", &self.config.topic, error))?;
            *slot = Some(PartitionReader {
                consumer,
                next_offset: None,
            });
        }
        slot.as_mut().ok_or(LogError::Closed)
    }

    fn read_blocking(
        &self,
        partition: u32,
        from_offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        let topic = self.config.topic.as_str();
        let slot = self.reader(partition)?;
        let mut guard = slot.lock().map_err(|_| LogError::Closed)?;
        let reader = self.ensure_reader(&mut guard, partition)?;
        if reader.next_offset != Some(from_offset) {
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(
                topic,
                partition as i32,
                offset_from_u64(from_offset, topic)?,
            )
            .map_err(|error| kafka_error("assign reader", topic, error))?;
            reader
                .consumer
                .assign(&list)
                .map_err(|error| kafka_error("assign reader", topic, error))?;
            reader.next_offset = Some(from_offset);
        }
        let mut records = Vec::new();
        let mut value_bytes = 0usize;
        let mut wait = Duration::from_millis(self.config.read_wait_ms);
        while value_bytes < max_bytes.max(1) {
            let message = match reader.consumer.poll(wait) {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
                ))) => {
                    reader.next_offset = None;
                    if !records.is_empty() {
                        break;
                    }
                    let range = self.watermarks(partition)?;
                    return Err(LogError::OffsetOutOfRange {
                        partition,
                        requested: from_offset,
                        earliest: range.earliest,
                        next: range.next,
                    });
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(error)) => {
                    reader.next_offset = None;
                    if !records.is_empty() {
                        break;
                    }
                    return Err(kafka_error("read", topic, error));
                }
            };
            // After the first record, take only what is already fetched.
            wait = Duration::ZERO;
            if message.partition() != partition as i32 || message.offset() < 0 {
                continue;
            }
            let offset = message.offset() as u64;
            match log_record(&message, partition, offset) {
                Ok(record) => {
                    value_bytes += record.value.len();
                    reader.next_offset = Some(offset + 1);
                    records.push(record);
                }
                Err(error) => {
                    // Leave the bad record for the next call to report on its own.
                    reader.next_offset = None;
                    if records.is_empty() {
                        return Err(error);
                    }
                    break;
                }
            }
        }
        Ok(records)
    }

    fn group_consumer(&self, group: &str) -> Result<Arc<BaseConsumer>, LogError> {
        if group.is_empty() || group.len() > 255 {
            return Err(LogError::InvalidGroupName {
                name: group.to_owned(),
            });
        }
        let mut groups = self.groups.lock().map_err(|_| LogError::Closed)?;
        if let Some(existing) = groups.get(group) {
            return Ok(Arc::clone(existing));
        }
        let consumer: BaseConsumer = self
            .config
            .group_config(group)
            .create()
            .map_err(|error| kafka_error("create group client", &self.config.topic, error))?;
        let consumer = Arc::new(consumer);
        groups.insert(group.to_owned(), Arc::clone(&consumer));
        Ok(consumer)
    }
}

impl DurableLog for KafkaLog {
    fn partition_count(&self) -> u32 {
        self.inner.partition_count
    }

    fn append(
        &self,
        record: AppendRecord,
    ) -> impl std::future::Future<Output = Result<AppendReceipt, LogError>> + Send {
        self.append_acknowledged(record)
    }

    fn read(
        &self,
        partition: u32,
        from_offset: u64,
        max_bytes: usize,
    ) -> impl std::future::Future<Output = Result<Vec<LogRecord>, LogError>> + Send {
        self.read_records(partition, from_offset, max_bytes)
    }

    fn offset_range(
        &self,
        partition: u32,
    ) -> impl std::future::Future<Output = Result<OffsetRange, LogError>> + Send {
        self.retained_offsets(partition)
    }

    fn offset_for_time(
        &self,
        partition: u32,
        time_ms: i64,
    ) -> impl std::future::Future<Output = Result<u64, LogError>> + Send {
        self.offset_at_time(partition, time_ms)
    }

    fn commit_position(
        &self,
        group: &str,
        partition: u32,
        next_offset: u64,
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send {
        let group = group.to_owned();
        async move {
            self.commit_group_offset(&group, partition, next_offset)
                .await
        }
    }

    fn load_position(
        &self,
        group: &str,
        partition: u32,
    ) -> impl std::future::Future<Output = Result<Option<u64>, LogError>> + Send {
        let group = group.to_owned();
        async move { self.committed_group_offset(&group, partition).await }
    }
}

/// Parses a consumed message back into a [`LogRecord`]; a message without our headers
/// is reported, never panicked on.
pub(super) fn log_record(
    message: &BorrowedMessage<'_>,
    partition: u32,
    offset: u64,
) -> Result<LogRecord, LogError> {
    let foreign = |reason: String| LogError::ForeignRecord {
        partition,
        offset,
        reason,
    };
    let headers = message
        .headers()
        .ok_or_else(|| foreign("it has no headers".to_owned()))?;
    let mut agent_id = None;
    let mut batch_seq = None;
    let mut protocol_version = None;
    for header in headers.iter() {
        let text = || -> Result<&str, LogError> {
            let bytes = header
                .value
                .ok_or_else(|| foreign(format!("header {} has no value", header.key)))?;
            std::str::from_utf8(bytes)
                .map_err(|_| foreign(format!("header {} is not UTF-8", header.key)))
        };
        match header.key {
            HEADER_AGENT_ID => agent_id = Some(text()?.to_owned()),
            HEADER_BATCH_SEQ => {
                let value = text()?;
                batch_seq =
                    Some(value.parse::<u64>().map_err(|_| {
                        foreign(format!("header batch_seq {value:?} is not a u64"))
                    })?);
            }
            HEADER_PROTOCOL_VERSION => {
                let value = text()?;
                protocol_version = Some(value.parse::<u16>().map_err(|_| {
                    foreign(format!("header protocol_version {value:?} is not a u16"))
                })?);
            }
            _ => {}
        }
    }
    let missing = |name: &str| foreign(format!("header {name} is missing"));
    Ok(LogRecord {
        partition,
        offset,
        timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
        headers: RecordHeaders {
            agent_id: agent_id.ok_or_else(|| missing(HEADER_AGENT_ID))?,
            batch_seq: batch_seq.ok_or_else(|| missing(HEADER_BATCH_SEQ))?,
            protocol_version: protocol_version.ok_or_else(|| missing(HEADER_PROTOCOL_VERSION))?,
        },
        value: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
    })
}

fn topic_partition_count(
    producer: &FutureProducer,
    topic: &str,
    timeout: Duration,
) -> Result<u32, LogError> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), timeout)
        .map_err(|error| kafka_error("fetch metadata", topic, error))?;
    let found = metadata
        .topics()
        .iter()
        .find(|candidate| candidate.name() == topic);
    match found {
        Some(found) if found.error().is_none() && !found.partitions().is_empty() => {
            u32::try_from(found.partitions().len()).map_err(|_| LogError::Kafka {
                operation: "fetch metadata",
                topic: topic.to_owned(),
                detail: "too many partitions".to_owned(),
            })
        }
        Some(found) => Err(LogError::Kafka {
            operation: "fetch metadata",
            topic: topic.to_owned(),
            detail: format!(
                "the topic is not usable ({:?}); create it before starting the collector",
                found.error()
            ),
        }),
        None => Err(LogError::Kafka {
            operation: "fetch metadata",
            topic: topic.to_owned(),
            detail: "the topic does not exist; create it before starting the collector".to_owned(),
        }),
    }
}

pub(super) fn offset_from_u64(offset: u64, topic: &str) -> Result<Offset, LogError> {
    i64::try_from(offset)
        .map(Offset::Offset)
        .map_err(|_| LogError::Kafka {
            operation: "position",
            topic: topic.to_owned(),
            detail: format!("offset {offset} is beyond Kafka's i64 offsets"),
        })
}

pub(super) fn kafka_error(operation: &'static str, topic: &str, error: KafkaError) -> LogError {
    LogError::Kafka {
        operation,
        topic: topic.to_owned(),
        detail: error.to_string(),
    }
}

fn produce_error(record: &AppendRecord, topic: &str, error: KafkaError) -> LogError {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            LogError::RecordTooLarge {
                agent_id: record.headers.agent_id.clone(),
                batch_seq: record.headers.batch_seq,
                record_bytes: record.value.len(),
                max_record_bytes: record.value.len().saturating_sub(1),
            }
        }
        _ => LogError::Kafka {
            operation: "append",
            topic: topic.to_owned(),
            detail: format!(
                "agent {} batch {}: {error}",
                record.headers.agent_id, record.headers.batch_seq
            ),
        },
    }
}

/// Runs a blocking librdkafka call on tokio's blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| LogError::Closed)?
}
