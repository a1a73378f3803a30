//! Where the consumer loop gets its records: one reader over every partition the
//! processor owns, so a round costs one wait however many partitions are idle.
//!
//! Why a trait of its own rather than [`DurableLog::read`]: a per-partition read that waits
//! when the partition is empty makes a caught-up processor wait once per partition per
//! round (docs/pipeline.md), and Kafka group membership needs partitions to arrive and
//! leave while the loop runs. The embedded log's reads never wait (they are `pread`s), so
//! its reader just reads each owned partition in turn and the loop pauses when all were
//! empty; Kafka's reader is [`KafkaReader`], one consumer polled once per round.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::log::kafka::KafkaLog;
use crate::log::kafka_group::{KafkaReader, Membership, ReaderEvent};
use crate::log::{DurableLog, EmbeddedLog, LogError, LogRecord};

/// What one fetch produced.
#[derive(Debug)]
pub enum Fetched {
    /// Records of any owned partitions, in offset order within each partition, and the
    /// error that cut the fetch short (records before it are valid).
    Records {
        records: Vec<LogRecord>,
        error: Option<LogError>,
    },
    /// Group membership changed; the rebalance waits for the answer.
    Membership(Membership),
}

/// A reader over the partitions one processor owns.
pub trait SourceReader: Send + Sync + 'static {
    /// Whether `fetch` itself waits for records (then the loop does not pause after an
    /// empty fetch).
    fn waits_for_records(&self) -> bool;

    /// Reads exactly these partitions, from these offsets, from now on (fixed
    /// assignments; a group member's partitions come from [`Fetched::Membership`]).
    fn assign(&mut self, positions: &BTreeMap<u32, u64>) -> Result<(), LogError>;

    /// Continues `partition` at `offset`.
    fn seek(&mut self, partition: u32, offset: u64) -> Result<(), LogError>;

    /// Records from the owned partitions: waits at most `max_wait` for a first one when the
    /// reader waits at all, reads about `max_bytes` per partition at most.
    fn fetch(
        &mut self,
        max_bytes: usize,
        max_wait: Duration,
    ) -> impl Future<Output = Fetched> + Send;

    /// Records consumer positions (a hint for lag tooling; the store's checkpoint is the
    /// truth).
    fn commit(
        &mut self,
        group: &str,
        positions: &[(u32, u64)],
    ) -> impl Future<Output = Result<(), LogError>> + Send;

    /// Stops reading (a group member leaves its group).
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// A log the consumer loop can read: the embedded log and Kafka.
pub trait RecordSource: DurableLog + Sized {
    type Reader: SourceReader;

    /// A reader of fixed partitions (`group_member: None`), or a member of that consumer
    /// group (Kafka only).
    fn open_reader(log: &Arc<Self>, group_member: Option<&str>) -> Result<Self::Reader, LogError>;

    /// How often to ask whether partitions were added, for a log whose partitions can grow
    /// while the processor runs (a Kafka topic); `None` when they are fixed.
    fn partition_refresh_interval(log: &Arc<Self>) -> Option<Duration>;

    /// The number of partitions the log has now (and can be read), asked of the log itself.
    fn current_partition_count(
        log: &Arc<Self>,
    ) -> impl Future<Output = Result<u32, LogError>> + Send;
}

/// Reads each owned partition of the embedded log in turn; never waits.
pub struct EmbeddedReader {
    log: Arc<EmbeddedLog>,
    positions: BTreeMap<u32, u64>,
}

impl RecordSource for EmbeddedLog {
    type Reader = EmbeddedReader;

    fn open_reader(
        log: &Arc<Self>,
        group_member: Option<&str>,
    ) -> Result<EmbeddedReader, LogError> {
        if group_member.is_some() {
            return Err(LogError::InvalidConfig(
                "consumer group membership (partitions = \"group\") needs the Kafka log; the embedded log has one reader: use partitions = \"all\"".to_owned(),
            ));
        }
        Ok(EmbeddedReader {
            log: Arc::clone(log),
            positions: BTreeMap::new(),
        })
    }

    /// The embedded log's partitions are set when it is created.
    fn partition_refresh_interval(_log: &Arc<Self>) -> Option<Duration> {
        None
    }

    async fn current_partition_count(log: &Arc<Self>) -> Result<u32, LogError> {
        Ok(log.partition_count())
    }
}

impl SourceReader for EmbeddedReader {
    fn waits_for_records(&self) -> bool {
        false
    }

    fn assign(&mut self, positions: &BTreeMap<u32, u64>) -> Result<(), LogError> {
        self.positions = positions.clone();
        Ok(())
    }

    fn seek(&mut self, partition: u32, offset: u64) -> Result<(), LogError> {
        if let Some(position) = self.positions.get_mut(&partition) {
            *position = offset;
        }
        Ok(())
    }

    async fn fetch(&mut self, max_bytes: usize, _max_wait: Duration) -> Fetched {
        let mut records = Vec::new();
        let partitions: Vec<(u32, u64)> = self.positions.iter().map(|(p, o)| (*p, *o)).collect();
        for (partition, from_offset) in partitions {
            match self.log.read(partition, from_offset, max_bytes).await {
                Ok(read) => {
                    if let Some(last) = read.last() {
                        self.positions
                            .insert(partition, last.offset.saturating_add(1));
                    }
                    records.extend(read);
                }
                Err(error) => {
                    return Fetched::Records {
                        records,
                        error: Some(error),
                    }
                }
            }
        }
        Fetched::Records {
            records,
            error: None,
        }
    }

    async fn commit(&mut self, group: &str, positions: &[(u32, u64)]) -> Result<(), LogError> {
        for (partition, next_offset) in positions {
            self.log
                .commit_position(group, *partition, *next_offset)
                .await?;
        }
        Ok(())
    }

    async fn close(self) {}
}

/// Kafka: one consumer for every owned partition (fixed, or a group member).
pub struct KafkaSourceReader {
    log: Arc<KafkaLog>,
    reader: KafkaReader,
}

impl RecordSource for KafkaLog {
    type Reader = KafkaSourceReader;

    fn open_reader(
        log: &Arc<Self>,
        group_member: Option<&str>,
    ) -> Result<KafkaSourceReader, LogError> {
        let reader = match group_member {
            Some(group) => log.group_member(group)?,
            None => log.partition_reader()?,
        };
        Ok(KafkaSourceReader {
            log: Arc::clone(log),
            reader,
        })
    }

    /// Partitions can be added to a topic at any time: asked as often as the reader
    /// refreshes its metadata (`metadata_refresh_interval_ms`, also what makes a consumer
    /// group rebalance to hand them out).
    fn partition_refresh_interval(log: &Arc<Self>) -> Option<Duration> {
        Some(Duration::from_millis(
            log.config().metadata_refresh_interval_ms.max(1_000),
        ))
    }

    async fn current_partition_count(log: &Arc<Self>) -> Result<u32, LogError> {
        log.refresh_partition_count().await
    }
}

impl KafkaSourceReader {
    pub fn reader(&self) -> &KafkaReader {
        &self.reader
    }
}

impl SourceReader for KafkaSourceReader {
    fn waits_for_records(&self) -> bool {
        true
    }

    fn assign(&mut self, positions: &BTreeMap<u32, u64>) -> Result<(), LogError> {
        self.reader.assign(positions)
    }

    fn seek(&mut self, partition: u32, offset: u64) -> Result<(), LogError> {
        self.reader.seek(partition, offset)
    }

    async fn fetch(&mut self, max_bytes: usize, max_wait: Duration) -> Fetched {
        match self.reader.fetch(max_bytes, max_wait).await {
            ReaderEvent::Records { records, error } => Fetched::Records { records, error },
            ReaderEvent::Membership(membership) => Fetched::Membership(membership),
        }
    }

    async fn commit(&mut self, group: &str, positions: &[(u32, u64)]) -> Result<(), LogError> {
        if self.reader.is_member() {
            // Outside the group's generation Kafka refuses commits while it has members.
            return self.reader.commit(positions);
        }
        for (partition, next_offset) in positions {
            self.log
                .commit_position(group, *partition, *next_offset)
                .await?;
        }
        Ok(())
    }

    async fn close(self) {
        self.reader.close().await;
    }
}
