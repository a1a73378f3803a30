//! The consumer loop: runs the window engine over the durable log into a store.
//!
//! Why it is shaped this way: the log is the source of truth and the store holds what the
//! engine made of it, so exactly-once is a matter of *what is made durable when*. Per log
//! partition there is one [`WindowEngine`](crate::process::WindowEngine) (agents map to
//! partitions by key, so engine state splits along partitions). Everything a range of
//! records produced is written to the store first; then the engine's checkpoint, together
//! with the next offset to read, goes into the same store (after the rows), and only after
//! the store's flush succeeded is the log's consumer-group position committed (a hint for
//! lag and tooling: the checkpoint in the store is the truth). A crash anywhere replays
//! records after the last durable checkpoint into an engine restored from it, which
//! re-emits identical results, and the store replaces them on their keys.
//!
//! - [`consumer`]: the loop ([`run_consumer`]), generic over the log, the store and the clock.
//! - [`assignment`]: which partitions this processor owns (`--partitions 0,2`, `1/3`, or
//!   `group`: Kafka consumer-group membership).
//! - [`source`]: one reader over every owned partition (one wait per round, however many
//!   partitions are idle).
//! - [`metrics`]: Prometheus counters and gauges, rendered into the collector's `/metrics`.
//! - [`publish`]: what the loop pushes to the [`LiveFeed`](crate::live::LiveFeed).
//!
//! Operator's guide: `docs/pipeline.md`.

pub mod assignment;
pub mod consumer;
pub mod metrics;
pub mod publish;
pub mod replay;
pub mod retention;
pub mod source;

use thiserror::Error;

pub use assignment::PartitionAssignment;
pub use consumer::{run_consumer, ConsumerConfig, ConsumerReport, RunUntil, StartFrom};
pub use metrics::PipelineMetrics;
pub use replay::{parse_replay_start, validate_suffix};
pub use retention::{Retain, RetainingStore};
pub use source::{Fetched, RecordSource, SourceReader};

use crate::log::LogError;
use crate::process::ProcessError;
use crate::store::StoreError;

/// Why the consumer loop stopped. Transient store and log errors never end the loop (it
/// retries with backoff); these are the ones retrying cannot fix.
#[derive(Debug, Error)]
pub enum PipelineError {
    #[error("partition assignment {spec:?} is not usable: {reason}")]
    BadAssignment { spec: String, reason: String },
    #[error("the window engine cannot start: {0}")]
    Engine(#[from] ProcessError),
    #[error(
        "the checkpoint of group {group:?} partition {partition} cannot be restored: {source}; \
         replay the log into new tables (`tributary-collector replay`) or use another group name"
    )]
    Restore {
        group: String,
        partition: u32,
        #[source]
        source: ProcessError,
    },
    #[error("cannot read the checkpoint of group {group:?} partition {partition}: {source}")]
    LoadCheckpoint {
        group: String,
        partition: u32,
        #[source]
        source: StoreError,
    },
    #[error("the store refused the processor's output: {0}; the engine's resolutions and the store's tables must match")]
    Store(#[source] StoreError),
    #[error("the durable log failed: {0}")]
    Log(#[from] LogError),
    #[error(
        "shutting down with results the store did not take ({buffered_rows} rows, last error: \
         {last_error}); nothing is lost: the log still holds the records, and the next start \
         resumes from the last durable checkpoint"
    )]
    UnflushedAtShutdown {
        buffered_rows: usize,
        last_error: String,
    },
}
