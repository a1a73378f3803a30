//! The window processor's core: turns the batches read from the durable log into
//! event-time rollups, late-data rows and a checkpoint.
//!
//! Why a sans-IO core: this is where readings become answers, and the answers must be
//! exact and identical after any restart. So [`WindowEngine`] is plain deterministic
//! code: it is fed decoded batches and the log time, never reads a clock, never touches
//! Kafka, ClickHouse or a file. The consumer loop and the stores are thin shells around
//! it (a later step). Design, guarantees and what to checkpoint: `docs/processor.md`.
//!
//! - [`config`]: resolutions, lateness, emission interval, timeouts and state bounds.
//! - [`engine`]: the [`WindowEngine`] and what it emits ([`WindowResult`], [`LateReading`]).
//! - [`sequence`]: per-agent dedup on batch sequence numbers and the watermark prefix.
//! - [`coarsen`](mod@coarsen): re-deriving coarse rollups from finer ones.

pub mod coarsen;
pub mod config;
pub mod engine;
mod hash;
pub mod sequence;

use thiserror::Error;

pub use coarsen::coarsen;
pub use config::{EngineConfig, RollupSource};
pub use engine::{
    EngineCounters, EngineOutput, IngestOutcome, LateItem, LateReading, LateReason, WindowEngine,
    WindowResult, FINAL_VERSION_BIT,
};

/// What the window processor's core refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProcessError {
    #[error("window engine config field `{field}` is invalid: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error(
        "batch {batch_seq} of agent {agent_id:?} uses series id {series_id} without defining it; \
         log records must carry the definitions of every series they use (is the ingest \
         resolving the session dictionary?); the record was not processed"
    )]
    UndefinedSeries {
        agent_id: String,
        batch_seq: u64,
        series_id: u32,
    },
    #[error(
        "batch {batch_seq} of agent {agent_id:?} defines series id {series_id} twice with different \
         keys; the record was not processed"
    )]
    ConflictingSeriesDefinition {
        agent_id: String,
        batch_seq: u64,
        series_id: u32,
    },
    #[error(
        "batch {batch_seq} of agent {agent_id:?} would take the engine past max_series = {max_series}; \
         raise max_series or find the agent minting series (tags with unbounded values?)"
    )]
    TooManySeries {
        agent_id: String,
        batch_seq: u64,
        max_series: usize,
    },
    #[error(
        "agent {agent_id:?} would take the engine past max_agents = {max_agents}; raise max_agents"
    )]
    TooManyAgents { agent_id: String, max_agents: usize },
    #[error(
        "cannot coarsen {fine_resolution_ms} ms windows into {coarse_resolution_ms} ms windows: the \
         coarse width must be a positive multiple of the fine one"
    )]
    ResolutionsNotNested {
        fine_resolution_ms: i64,
        coarse_resolution_ms: i64,
    },
    #[error("window starting at {window_start_ms} ms is not aligned to its {resolution_ms} ms resolution")]
    MisalignedWindow {
        window_start_ms: i64,
        resolution_ms: i64,
    },
    #[error(
        "window engine checkpoint is unreadable: {reason}; restore the previous checkpoint with its \
         offsets, or replay the partition from its start into an empty engine"
    )]
    CorruptCheckpoint { reason: String },
    #[error(
        "window engine checkpoint was taken with a different configuration (resolutions, lateness \
         or limits); restore it with the old configuration, or replay from the log into new tables"
    )]
    CheckpointConfigMismatch,
}
