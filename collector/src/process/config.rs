//! The window engine's configuration: resolutions, lateness, emission and state bounds.
//!
//! Every duration is in milliseconds of *log time*: the engine is driven by the append
//! timestamps of the records it consumes (and by the wall clock only when the consumer is
//! caught up), so replaying the log reproduces the same decisions.

use serde::{Deserialize, Serialize};

use super::ProcessError;

/// Which input builds the rollups. Exactly one does, so nothing is counted twice.
///
/// The Tributary agent always ships a summary of every series per edge window, while raw
/// readings may be subsampled (`every_nth`, `deadband`) or dropped first when its buffer
/// overflows. So rollups come from the edge summaries by default, and raw readings only
/// feed the raw table (written by the store, outside this engine). `raw_readings` is for
/// producers that send no summaries; edge summaries are then ignored (and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RollupSource {
    #[default]
    EdgeSummaries,
    RawReadings,
}

/// Configuration of a [`super::WindowEngine`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Widths of the tumbling rollup windows, finest first (e.g. 60 s and 1 h). Edge
    /// window widths should divide each of them.
    pub resolutions_ms: Vec<i64>,
    pub rollup_source: RollupSource,
    /// How far behind an agent's newest event time its older events may still arrive
    /// in the normal course of things; the watermark trails by this much.
    pub out_of_orderness_ms: i64,
    /// How long after the watermark passes a window's end it still accepts data (and
    /// re-emits with a higher version) before it is final; later data is reported late.
    pub allowed_lateness_ms: i64,
    /// Open windows that changed are emitted as running results at most this often
    /// (200 ms by default: see "Freshness" in docs/processor.md).
    pub emit_interval_ms: i64,
    /// An agent that sent nothing for this long has its open windows finalised, so a
    /// gateway that disappears does not keep state forever.
    pub idle_timeout_ms: i64,
    /// A gap in an agent's batch sequence that makes no progress for this long is given
    /// up (see `sequence.rs`): its windows close without the missing batches.
    pub sequence_gap_timeout_ms: i64,
    /// Items whose event time lies further than this beyond the record's log time are
    /// refused (reported late): one bad clock must not push a watermark into the future.
    pub max_event_time_ahead_ms: i64,
    /// Dedup intervals kept per agent before the oldest gap is assumed seen.
    pub max_dedup_intervals_per_agent: usize,
    /// Batches held above a sequence gap per agent before the gap is given up.
    pub max_pending_batches_per_agent: usize,
    /// Distinct series the engine interns before refusing batches with new ones.
    pub max_series: usize,
    /// Distinct agents the engine tracks before refusing batches from new ones.
    pub max_agents: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            resolutions_ms: vec![60_000, 3_600_000],
            rollup_source: RollupSource::EdgeSummaries,
            out_of_orderness_ms: 5_000,
            allowed_lateness_ms: 60_000,
            emit_interval_ms: 200,
            idle_timeout_ms: 600_000,
            sequence_gap_timeout_ms: 30_000,
            max_event_time_ahead_ms: 3_600_000,
            max_dedup_intervals_per_agent: 1_024,
            max_pending_batches_per_agent: 100_000,
            max_series: 10_000_000,
            max_agents: 1_000_000,
        }
    }
}

impl EngineConfig {
    /// Checks the configuration; the error names the field and what to change.
    pub fn validate(&self) -> Result<(), ProcessError> {
        let invalid = |field: &'static str, reason: String| {
            Err(ProcessError::InvalidConfig { field, reason })
        };
        if self.resolutions_ms.is_empty() {
            return invalid(
                "resolutions_ms",
                "list at least one window width, e.g. [60000, 3600000]".into(),
            );
        }
        if self.resolutions_ms.len() > usize::from(u8::MAX) {
            return invalid(
                "resolutions_ms",
                format!("{} resolutions; at most 255", self.resolutions_ms.len()),
            );
        }
        for (position, resolution_ms) in self.resolutions_ms.iter().enumerate() {
            if *resolution_ms <= 0 {
                return invalid(
                    "resolutions_ms",
                    format!("entry {position} is {resolution_ms}; widths must be positive"),
                );
            }
            if self.resolutions_ms[..position].contains(resolution_ms) {
                return invalid("resolutions_ms", format!("{resolution_ms} is listed twice"));
            }
        }
        for (field, value) in [
            ("out_of_orderness_ms", self.out_of_orderness_ms),
            ("allowed_lateness_ms", self.allowed_lateness_ms),
            ("max_event_time_ahead_ms", self.max_event_time_ahead_ms),
        ] {
            if value < 0 {
                return invalid(field, format!("{value} is negative; use 0 or more"));
            }
        }
        for (field, value) in [
            ("emit_interval_ms", self.emit_interval_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("sequence_gap_timeout_ms", self.sequence_gap_timeout_ms),
        ] {
            if value <= 0 {
                return invalid(field, format!("{value} must be positive"));
            }
        }
        for (field, value) in [
            (
                "max_dedup_intervals_per_agent",
                self.max_dedup_intervals_per_agent,
            ),
            (
                "max_pending_batches_per_agent",
                self.max_pending_batches_per_agent,
            ),
            ("max_series", self.max_series),
            ("max_agents", self.max_agents),
        ] {
            if value == 0 {
                return invalid(field, "0 would refuse everything; use at least 1".into());
            }
        }
        if self.max_series > u32::MAX as usize || self.max_agents > u32::MAX as usize {
            return invalid(
                "max_series",
                "series and agent limits must fit in 32 bits".into(),
            );
        }
        Ok(())
    }
}
