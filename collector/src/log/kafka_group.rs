//! How a processor reads Kafka: one consumer for all the partitions it owns, polled once
//! per round, either assigned a fixed set of partitions or a member of a consumer group.
//!
//! Why one consumer: [`DurableLog::read`](super::DurableLog::read) serves one partition and
//! waits up to `read_wait_ms` when it is empty, so a processor that read its partitions one
//! after another waited once per idle partition per round (four idle partitions, 800 ms
//! before it came back to the first). One consumer with every owned partition assigned
//! waits once for the first record of *any* of them, and returns as soon as one arrives.
//!
//! Why the rebalance callback waits for the processor: a partition's engine state and
//! position live in the store, keyed by partition. When the group moves a partition away,
//! its results and checkpoint must be durable before the next owner loads the checkpoint;
//! when a partition arrives, it must be read from its checkpoint's offset, not from the
//! group's committed offset (a hint that can lag the checkpoint). librdkafka runs the
//! rebalance callback on the thread that polls, in the middle of [`KafkaReader::fetch`]:
//! the callback hands a [`Membership`] event to the processor's task and blocks until the
//! task answers (the revoked partitions are flushed and checkpointed; the assigned
//! partitions' start offsets are known), then completes the rebalance with those offsets.
//! The processor task never polls itself while it handles the event, so nothing deadlocks.
//!
//! Cooperative (incremental) rebalancing, `cooperative-sticky`: only the partitions that
//! move are revoked and assigned, so the partitions a processor keeps keep their engines in
//! memory through a rebalance; with an eager protocol every member would flush, drop and
//! restore every engine each time a member joins or leaves.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::kafka::{blocking, kafka_error, log_record, offset_from_u64, KafkaLog};
use super::{LogError, LogRecord};

/// A change of the partitions a group member owns, handed to the processor while the
/// rebalance waits for its answer.
#[derive(Debug)]
pub enum Membership {
    Assigned(Assignment),
    Revoked(Revocation),
}

/// Partitions the group gave this member. Answer with [`Assignment::start_at`].
#[derive(Debug)]
pub struct Assignment {
    partitions: Vec<u32>,
    reply: std::sync::mpsc::SyncSender<BTreeMap<u32, u64>>,
}

impl Assignment {
    pub fn partitions(&self) -> &[u32] {
        &self.partitions
    }

    /// Completes the assignment: each partition is read from its offset here (from its
    /// checkpoint). A partition left out is not taken (it stays unread until the next
    /// rebalance), which is what a processor that is stopping wants.
    pub fn start_at(self, offsets: BTreeMap<u32, u64>) {
        // The callback is gone only if the consumer is closing: nothing to answer then.
        let _ = self.reply.send(offsets);
    }
}

/// Partitions the group takes away. Answer with [`Revocation::done`] once their results
/// and checkpoints are durable; the rebalance (and so the next owner) waits until then.
#[derive(Debug)]
pub struct Revocation {
    partitions: Vec<u32>,
    lost: bool,
    reply: std::sync::mpsc::SyncSender<()>,
}

impl Revocation {
    pub fn partitions(&self) -> &[u32] {
        &self.partitions
    }

    /// The member was out of the group (session timeout, or no poll within
    /// `group_max_poll_interval_ms`): another member may own the partitions already.
    /// Flushing them is still harmless (every write replaces on its key, and a checkpoint
    /// is a consistent state and offset), only wasted if the new owner is ahead.
    pub fn lost(&self) -> bool {
        self.lost
    }

    pub fn done(self) {
        let _ = self.reply.send(());
    }
}

/// What one [`KafkaReader::fetch`] produced.
#[derive(Debug)]
pub enum ReaderEvent {
    /// Records of any owned partitions, in offset order within each (empty when nothing
    /// arrived within the wait), and the error that cut the batch short, if any. Records
    /// before the error are valid.
    Records {
        records: Vec<LogRecord>,
        error: Option<LogError>,
    },
    Membership(Membership),
}

/// Counters that show how the reader waits (the read-latency test and `bench` read them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KafkaReaderStats {
    /// Fetches that polled the consumer.
    pub fetches: u64,
    /// Fetches that waited the whole wait and returned nothing: at most one per round of
    /// the processor, however many partitions it owns.
    pub empty_waits: u64,
}

#[derive(Debug, Default)]
struct ReaderCounters {
    fetches: AtomicU64,
    empty_waits: AtomicU64,
}

/// The consumer's context: runs the rebalance callback and tracks the next offset the
/// consumer will deliver per owned partition.
struct ReaderContext {
    topic: String,
    events: mpsc::UnboundedSender<Membership>,
    positions: Mutex<BTreeMap<u32, u64>>,
    /// Partitions that delivered records since librdkafka last said they were at their end
    /// (`enable.partition.eof`): their next end-of-partition event means "caught up".
    delivered_since_end: Mutex<BTreeSet<u32>>,
}

impl ReaderContext {
    fn positions(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, u64>> {
        self.positions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that `partition` delivered a record.
    fn delivered(&self, partition: u32) {
        self.delivered_since_end
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(partition);
    }

    /// librdkafka says `partition` is at its end: whether it delivered records since the
    /// last time (then the processor has just caught up and should not wait any longer).
    fn reached_end(&self, partition: u32) -> bool {
        self.delivered_since_end
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&partition)
    }

    fn partitions_of(&self, list: &TopicPartitionList) -> Vec<u32> {
        list.elements_for_topic(&self.topic)
            .iter()
            .filter_map(|element| u32::try_from(element.partition()).ok())
            .collect()
    }

    fn assigned(&self, consumer: &BaseConsumer<Self>, list: &mut TopicPartitionList) {
        let partitions = self.partitions_of(list);
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let event = Membership::Assigned(Assignment {
            partitions: partitions.clone(),
            reply,
        });
        let offsets = match self.events.send(event) {
            Ok(()) => answer.recv().unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        let mut taken = TopicPartitionList::new();
        for (partition, offset) in &offsets {
            let Ok(kafka_offset) = offset_from_u64(*offset, &self.topic) else {
                continue;
            };
            if taken
                .add_partition_offset(&self.topic, *partition as i32, kafka_offset)
                .is_ok()
            {
                self.positions().insert(*partition, *offset);
            }
        }
        tracing::info!(topic = %self.topic, ?partitions, start_offsets = ?offsets, "consumer group assigned partitions");
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(&taken),
            _ => consumer.assign(&taken),
        };
        if let Err(error) = result {
            tracing::error!(topic = %self.topic, %error, "cannot take the assigned partitions; the next rebalance retries");
        }
    }

    fn revoked(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let partitions = self.partitions_of(list);
        let lost = consumer.assignment_lost();
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let event = Membership::Revoked(Revocation {
            partitions: partitions.clone(),
            lost,
            reply,
        });
        if self.events.send(event).is_ok() {
            let _ = answer.recv();
        }
        {
            let mut positions = self.positions();
            for partition in &partitions {
                positions.remove(partition);
            }
        }
        tracing::info!(topic = %self.topic, ?partitions, lost, "consumer group revoked partitions (checkpointed first)");
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(list),
            _ => consumer.unassign(),
        };
        if let Err(error) = result {
            tracing::error!(topic = %self.topic, %error, "cannot release the revoked partitions");
        }
    }
}

impl ClientContext for ReaderContext {}

impl ConsumerContext for ReaderContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        error: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assigned(consumer, list),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoked(consumer, list),
            other => {
                // librdkafka asks to drop the whole assignment: checkpoint it like a revocation.
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(topic = %self.topic, %code, "consumer group rebalance failed; releasing every partition");
                let owned: Vec<u32> = self.positions().keys().copied().collect();
                let mut all = TopicPartitionList::new();
                for partition in owned {
                    all.add_partition(&self.topic, partition as i32);
                }
                self.revoked(consumer, &all);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(topic = %self.topic, %error, partitions = ?self.partitions_of(offsets), "group position commit failed (a hint only; the store's checkpoint is durable)");
        }
    }
}

/// One batch polled on the blocking pool.
struct Polled {
    records: Vec<LogRecord>,
    error: Option<PollError>,
    /// Returned early because a partition that delivered records reached its end.
    reached_end: bool,
}

enum PollError {
    /// `auto.offset.reset=error` fired; librdkafka does not say for which partition.
    OffsetOutOfRange,
    Log(LogError),
}

/// A processor's reader of a Kafka topic: one consumer for every partition it owns.
/// Create it with [`KafkaLog::partition_reader`] (a fixed set, [`KafkaReader::assign`]) or
/// [`KafkaLog::group_member`] (partitions come and go through [`Membership`] events).
pub struct KafkaReader {
    consumer: Arc<BaseConsumer<ReaderContext>>,
    topic: String,
    read_wait: Duration,
    request_timeout: Duration,
    member: bool,
    events: mpsc::UnboundedReceiver<Membership>,
    in_flight: Option<JoinHandle<Polled>>,
    counters: Arc<ReaderCounters>,
}

impl std::fmt::Debug for KafkaReader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KafkaReader")
            .field("topic", &self.topic)
            .field("member", &self.member)
            .finish()
    }
}

impl KafkaLog {
    /// A reader of a fixed set of partitions (set with [`KafkaReader::assign`]).
    pub fn partition_reader(&self) -> Result<KafkaReader, LogError> {
        KafkaReader::create(self, None)
    }

    /// A member of consumer group `group`, subscribed to the topic.
    pub fn group_member(&self, group: &str) -> Result<KafkaReader, LogError> {
        if group.is_empty() || group.len() > 255 {
            return Err(LogError::InvalidGroupName {
                name: group.to_owned(),
            });
        }
        KafkaReader::create(self, Some(group))
    }
}

impl KafkaReader {
    fn create(log: &KafkaLog, group: Option<&str>) -> Result<Self, LogError> {
        let config = log.config();
        let topic = config.topic.clone();
        let (sender, events) = mpsc::unbounded_channel();
        let context = ReaderContext {
            topic: topic.clone(),
            events: sender,
            positions: Mutex::new(BTreeMap::new()),
            delivered_since_end: Mutex::new(BTreeSet::new()),
        };
        let client_config = match group {
            Some(group) => config.member_config(group),
            None => config.multi_reader_config(),
        };
        let consumer: BaseConsumer<ReaderContext> = client_config
            .create_with_context(context)
            .map_err(|error| kafka_error("create reader", &topic, error))?;
        if group.is_some() {
            consumer
                .subscribe(&[topic.as_str()])
                .map_err(|error| kafka_error("subscribe to the topic", &topic, error))?;
        }
        Ok(Self {
            consumer: Arc::new(consumer),
            read_wait: Duration::from_millis(config.read_wait_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            topic,
            member: group.is_some(),
            events,
            in_flight: None,
            counters: Arc::default(),
        })
    }

    /// Whether partitions come from the consumer group (else from [`KafkaReader::assign`]).
    pub fn is_member(&self) -> bool {
        self.member
    }

    pub fn stats(&self) -> KafkaReaderStats {
        KafkaReaderStats {
            fetches: self.counters.fetches.load(Ordering::Relaxed),
            empty_waits: self.counters.empty_waits.load(Ordering::Relaxed),
        }
    }

    /// Reads exactly these partitions from these offsets from now on (not for a member:
    /// the group decides its partitions).
    pub fn assign(&mut self, positions: &BTreeMap<u32, u64>) -> Result<(), LogError> {
        if self.member {
            return Err(LogError::InvalidConfig(
                "a consumer group member's partitions are assigned by the group".to_owned(),
            ));
        }
        let mut list = TopicPartitionList::new();
        for (partition, offset) in positions {
            list.add_partition_offset(
                &self.topic,
                *partition as i32,
                offset_from_u64(*offset, &self.topic)?,
            )
            .map_err(|error| kafka_error("assign reader", &self.topic, error))?;
        }
        self.consumer
            .assign(&list)
            .map_err(|error| kafka_error("assign reader", &self.topic, error))?;
        *self.consumer.context().positions() = positions.clone();
        Ok(())
    }

    /// Continues `partition` at `offset` (after records were retained away, or past a
    /// record it cannot use). Nothing to do when the consumer is there already.
    pub fn seek(&mut self, partition: u32, offset: u64) -> Result<(), LogError> {
        let current = self.consumer.context().positions().get(&partition).copied();
        match current {
            Some(next) if next == offset => Ok(()),
            Some(_) if self.member => {
                self.consumer
                    .seek(
                        &self.topic,
                        partition as i32,
                        offset_from_u64(offset, &self.topic)?,
                        Duration::ZERO,
                    )
                    .map_err(|error| kafka_error("seek", &self.topic, error))?;
                self.consumer
                    .context()
                    .positions()
                    .insert(partition, offset);
                Ok(())
            }
            Some(_) => {
                let mut positions = self.consumer.context().positions().clone();
                positions.insert(partition, offset);
                self.assign(&positions)
            }
            // Not owned (any more): nothing to move.
            None => Ok(()),
        }
    }

    /// Polls once: waits up to `max_wait` (at most `read_wait_ms`) for the first record of
    /// any owned partition, then takes what is already fetched, up to about `max_bytes`.
    /// A rebalance during the poll comes back as [`ReaderEvent::Membership`]; the poll
    /// continues once it is answered, at the next call. Cancel-safe.
    pub async fn fetch(&mut self, max_bytes: usize, max_wait: Duration) -> ReaderEvent {
        if self.in_flight.is_none() {
            let consumer = Arc::clone(&self.consumer);
            let topic = self.topic.clone();
            let wait = max_wait.min(self.read_wait);
            let counters = Arc::clone(&self.counters);
            self.in_flight = Some(tokio::task::spawn_blocking(move || {
                counters.fetches.fetch_add(1, Ordering::Relaxed);
                let polled = poll_batch(&consumer, &topic, max_bytes, wait);
                if polled.records.is_empty()
                    && polled.error.is_none()
                    && !polled.reached_end
                    && !wait.is_zero()
                {
                    counters.empty_waits.fetch_add(1, Ordering::Relaxed);
                }
                polled
            }));
        }
        let events = &mut self.events;
        let Some(in_flight) = self.in_flight.as_mut() else {
            return ReaderEvent::Records {
                records: Vec::new(),
                error: None,
            };
        };
        let joined = tokio::select! {
            biased;
            Some(event) = events.recv() => return ReaderEvent::Membership(event),
            joined = in_flight => joined,
        };
        self.in_flight = None;
        let polled = match joined {
            Ok(polled) => polled,
            Err(_) => {
                return ReaderEvent::Records {
                    records: Vec::new(),
                    error: Some(LogError::Closed),
                }
            }
        };
        let error = match polled.error {
            None => None,
            Some(PollError::Log(error)) => Some(error),
            Some(PollError::OffsetOutOfRange) => Some(self.out_of_range().await),
        };
        ReaderEvent::Records {
            records: polled.records,
            error,
        }
    }

    /// Names the partition behind an offset-out-of-range error: one whose next offset is
    /// below the partition's earliest retained offset.
    async fn out_of_range(&self) -> LogError {
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        let timeout = self.request_timeout;
        let found = blocking(move || {
            let positions = consumer.context().positions().clone();
            for (partition, next_offset) in positions {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, partition as i32, timeout)
                    .map_err(|error| kafka_error("fetch watermarks", &topic, error))?;
                let (earliest, next) = (low.max(0) as u64, high.max(0) as u64);
                if next_offset < earliest || next_offset > next {
                    return Ok(Some(LogError::OffsetOutOfRange {
                        partition,
                        requested: next_offset,
                        earliest,
                        next,
                    }));
                }
            }
            Ok(None)
        })
        .await;
        match found {
            Ok(Some(error)) => error,
            Ok(None) => LogError::Kafka {
                operation: "read",
                topic: self.topic.clone(),
                detail: "an offset was out of range, but no partition is now".to_owned(),
            },
            Err(error) => error,
        }
    }

    /// Commits group positions (a member only: Kafka refuses commits from outside the
    /// generation while the group has members). Asynchronous: failures are logged.
    pub fn commit(&self, positions: &[(u32, u64)]) -> Result<(), LogError> {
        let mut list = TopicPartitionList::new();
        for (partition, next_offset) in positions {
            list.add_partition_offset(
                &self.topic,
                *partition as i32,
                offset_from_u64(*next_offset, &self.topic)?,
            )
            .map_err(|error| kafka_error("commit", &self.topic, error))?;
        }
        self.consumer
            .commit(&list, CommitMode::Async)
            .map_err(|error| kafka_error("commit", &self.topic, error))
    }

    /// Leaves the group (revoking through the callback, which no longer waits for anyone)
    /// and closes the consumer, off the async threads.
    pub async fn close(mut self) {
        self.events.close();
        while self.events.try_recv().is_ok() {}
        if let Some(in_flight) = self.in_flight.take() {
            let _ = in_flight.await;
        }
        let consumer = Arc::clone(&self.consumer);
        drop(self);
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }
}

impl Drop for KafkaReader {
    fn drop(&mut self) {
        // A rebalance callback that is waiting, or that runs while the consumer closes,
        // must find nobody to wait for.
        self.events.close();
        while self.events.try_recv().is_ok() {}
    }
}

fn poll_batch(
    consumer: &BaseConsumer<ReaderContext>,
    topic: &str,
    max_bytes: usize,
    wait: Duration,
) -> Polled {
    let mut records = Vec::new();
    let mut value_bytes = 0usize;
    let deadline = Instant::now() + wait;
    let mut first_taken = false;
    let mut reached_end = false;
    let mut error = None;
    while value_bytes < max_bytes.max(1) {
        // Until the first record, wait out what is left of `wait`; then take only what is
        // already fetched.
        let remaining = if first_taken {
            Duration::ZERO
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let message = match consumer.poll(remaining) {
            None => break,
            Some(Ok(message)) => message,
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                // A partition that delivered records has none left: the processor is
                // caught up there, so return now (it flushes at once instead of waiting
                // out the fetch). The end of a partition that delivered nothing (every
                // idle partition once after assignment) changes nothing: keep waiting.
                match u32::try_from(partition) {
                    Ok(partition) if consumer.context().reached_end(partition) => {
                        reached_end = true;
                        break;
                    }
                    _ => continue,
                }
            }
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
            ))) => {
                error = Some(PollError::OffsetOutOfRange);
                break;
            }
            Some(Err(other)) => {
                error = Some(PollError::Log(kafka_error("read", topic, other)));
                break;
            }
        };
        first_taken = true;
        let (Ok(partition), Ok(offset)) = (
            u32::try_from(message.partition()),
            u64::try_from(message.offset()),
        ) else {
            continue;
        };
        if message.topic() != topic {
            continue;
        }
        consumer
            .context()
            .positions()
            .insert(partition, offset.saturating_add(1));
        consumer.context().delivered(partition);
        match log_record(&message, partition, offset) {
            Ok(record) => {
                value_bytes += record.value.len();
                records.push(record);
            }
            Err(foreign) => {
                // The consumer is past it already; the caller skips it and counts it.
                error = Some(PollError::Log(foreign));
                break;
            }
        }
    }
    Polled {
        records,
        error,
        reached_end,
    }
}
