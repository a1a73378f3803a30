//! What the consumer loop counts, in the Prometheus text format.
//!
//! Why hand-written like `ingest::metrics`: a dozen counters and gauges with fixed labels
//! (skip reasons, partitions) need no metrics crate; the hot path does relaxed atomic adds
//! once per record, and the per-partition gauges are set once per flush.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::ingest::metrics::Histogram;

/// Why a record was skipped (counted, sampled in the log, never retried).
pub const SKIP_REASONS: [&str; 6] = [
    "undecodable",
    "undefined_series",
    "conflicting_series",
    "too_many_series",
    "too_many_agents",
    "other",
];

/// Upper bounds (seconds) of the flush latency histogram.
const FLUSH_BUCKETS_S: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// Per-partition position, as the loop last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionProgress {
    /// Next offset the processor will read.
    pub next_offset: u64,
    /// Next offset the log will assign (its end), at the last read.
    pub log_next_offset: u64,
    /// Next offset covered by the last durable checkpoint.
    pub checkpointed_offset: u64,
}

impl PartitionProgress {
    pub fn lag_records(&self) -> u64 {
        self.log_next_offset.saturating_sub(self.next_offset)
    }
}

/// Everything the consumer loop counts. Shared through an `Arc`.
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    pub records_processed: AtomicU64,
    pub readings_processed: AtomicU64,
    pub summaries_processed: AtomicU64,
    pub duplicate_batches: AtomicU64,
    pub readings_late: AtomicU64,
    pub results_written: AtomicU64,
    pub flushes: AtomicU64,
    pub store_errors: AtomicU64,
    pub log_errors: AtomicU64,
    /// Records lost to log retention before they were processed.
    pub records_retained_away: AtomicU64,
    pub windows_open: AtomicU64,
    pub engine_state_bytes: AtomicU64,
    skipped: [AtomicU64; SKIP_REASONS.len()],
    flush_buckets: [AtomicU64; FLUSH_BUCKETS_S.len()],
    flush_count: AtomicU64,
    flush_micros: AtomicU64,
    /// A record's log append (its log timestamp) to the processor reading it.
    pub log_to_read_seconds: Histogram,
    /// A record's log append to the end of the store flush that made its rows durable
    /// (queryable): the log's delivery, the processor and the store together.
    pub log_to_stored_seconds: Histogram,
    partitions: Mutex<BTreeMap<u32, PartitionProgress>>,
}

impl PipelineMetrics {
    pub fn count_skipped(&self, reason: &str) {
        let index = SKIP_REASONS
            .iter()
            .position(|known| *known == reason)
            .unwrap_or(SKIP_REASONS.len() - 1);
        if let Some(counter) = self.skipped.get(index) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn skipped(&self, reason: &str) -> u64 {
        SKIP_REASONS
            .iter()
            .position(|known| *known == reason)
            .and_then(|index| self.skipped.get(index))
            .map_or(0, |counter| counter.load(Ordering::Relaxed))
    }

    pub fn observe_flush_seconds(&self, seconds: f64) {
        for (bound, bucket) in FLUSH_BUCKETS_S.iter().zip(self.flush_buckets.iter()) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.flush_count.fetch_add(1, Ordering::Relaxed);
        self.flush_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn set_progress(&self, partition: u32, progress: PartitionProgress) {
        let mut partitions = self
            .partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        partitions.insert(partition, progress);
    }

    /// A partition this processor no longer owns (the consumer group moved it).
    pub fn remove_progress(&self, partition: u32) {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&partition);
    }

    pub fn progress(&self) -> BTreeMap<u32, PartitionProgress> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counters: [(&str, &str, &AtomicU64); 10] = [
            (
                "tributary_processor_records_total",
                "Log records processed (decoded and handed to the engine, duplicates included).",
                &self.records_processed,
            ),
            (
                "tributary_processor_readings_total",
                "Raw readings in processed records.",
                &self.readings_processed,
            ),
            (
                "tributary_processor_summaries_total",
                "Edge summaries in processed records.",
                &self.summaries_processed,
            ),
            (
                "tributary_processor_duplicate_batches_total",
                "Batches the engine had already processed (same agent and sequence).",
                &self.duplicate_batches,
            ),
            (
                "tributary_processor_late_readings_total",
                "Readings reported to the late table (refused or for a closed window).",
                &self.readings_late,
            ),
            (
                "tributary_processor_window_results_total",
                "Window results written to the store (running and final).",
                &self.results_written,
            ),
            (
                "tributary_processor_flushes_total",
                "Store flushes that succeeded (each followed by a commit of the positions).",
                &self.flushes,
            ),
            (
                "tributary_processor_store_errors_total",
                "Store flushes that failed and were retried.",
                &self.store_errors,
            ),
            (
                "tributary_processor_log_errors_total",
                "Log reads or commits that failed and were retried.",
                &self.log_errors,
            ),
            (
                "tributary_processor_records_retained_away_total",
                "Records deleted by log retention before they were processed.",
                &self.records_retained_away,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                load(counter)
            );
        }
        let name = "tributary_processor_records_skipped_total";
        let _ = writeln!(out, "# HELP {name} Records skipped because they cannot be processed, by reason.\n# TYPE {name} counter");
        for (reason, counter) in SKIP_REASONS.iter().zip(self.skipped.iter()) {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", load(counter));
        }
        for (name, help, gauge) in [
            (
                "tributary_processor_windows_open",
                "Windows open across this processor's engines.",
                &self.windows_open,
            ),
            (
                "tributary_processor_engine_state_bytes",
                "Approximate heap bytes of the engines' state (at the last checkpoint).",
                &self.engine_state_bytes,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                load(gauge)
            );
        }
        let progress = self.progress();
        for (name, help, value) in [
            (
                "tributary_processor_lag_records",
                "Records in the log not yet processed, per partition.",
                (|p: &PartitionProgress| p.lag_records()) as fn(&PartitionProgress) -> u64,
            ),
            (
                "tributary_processor_next_offset",
                "Next offset the processor reads, per partition.",
                |p| p.next_offset,
            ),
            (
                "tributary_processor_checkpointed_offset",
                "Next offset of the last durable checkpoint, per partition.",
                |p| p.checkpointed_offset,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (partition, entry) in &progress {
                let _ = writeln!(out, "{name}{{partition=\"{partition}\"}} {}", value(entry));
            }
        }
        let name = "tributary_processor_flush_seconds";
        let _ = writeln!(out, "# HELP {name} Time to make buffered results and checkpoints durable in the store (retries included).\n# TYPE {name} histogram");
        for (bound, bucket) in FLUSH_BUCKETS_S.iter().zip(self.flush_buckets.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", load(bucket));
        }
        let count = load(&self.flush_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", load(&self.flush_micros) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
        self.log_to_read_seconds.render(
            "tributary_processor_log_to_read_seconds",
            "Time from a record's log append (its log timestamp) to the processor reading it.",
            &mut out,
        );
        self.log_to_stored_seconds.render(
            "tributary_processor_log_to_stored_seconds",
            "Time from a record's log append to the end of the store flush that made its rows durable and queryable.",
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_reasons_and_partitions() {
        let metrics = PipelineMetrics::default();
        metrics.count_skipped("undecodable");
        metrics.count_skipped("no such reason");
        metrics.set_progress(
            2,
            PartitionProgress {
                next_offset: 10,
                log_next_offset: 15,
                checkpointed_offset: 8,
            },
        );
        metrics.observe_flush_seconds(0.02);
        let text = metrics.render();
        assert!(
            text.contains("tributary_processor_records_skipped_total{reason=\"undecodable\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tributary_processor_records_skipped_total{reason=\"other\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tributary_processor_lag_records{partition=\"2\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("tributary_processor_flush_seconds_bucket{le=\"0.025\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tributary_processor_flush_seconds_bucket{le=\"0.01\"} 0"),
            "{text}"
        );
    }
}
