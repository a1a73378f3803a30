//! Ingest metrics in the Prometheus text format, hand-written.
//!
//! Why not a metrics crate: ingest needs a dozen counters, one gauge and one
//! histogram with fixed labels; atomics and a `render` function cover that without a
//! dependency, and every update is one relaxed atomic add on the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tributary_protocol::session::NackReason;

const NACK_REASONS: [NackReason; 7] = [
    NackReason::Malformed,
    NackReason::TooLarge,
    NackReason::UnknownSeries,
    NackReason::SequenceConflict,
    NackReason::Overloaded,
    NackReason::StorageUnavailable,
    NackReason::Internal,
];

fn nack_reason_label(reason: NackReason) -> &'static str {
    match reason {
        NackReason::Malformed => "malformed",
        NackReason::TooLarge => "too_large",
        NackReason::UnknownSeries => "unknown_series",
        NackReason::SequenceConflict => "sequence_conflict",
        NackReason::Overloaded => "overloaded",
        NackReason::StorageUnavailable => "storage_unavailable",
        NackReason::Internal => "internal",
    }
}

fn nack_reason_index(reason: NackReason) -> usize {
    NACK_REASONS
        .iter()
        .position(|known| *known == reason)
        .unwrap_or(NACK_REASONS.len() - 1)
}

/// Upper bounds (seconds) of the latency histograms: fine from 0.1 s to 1 s, where the
/// stages of the one-second freshness budget are told apart.
const LATENCY_BUCKETS_S: [f64; 18] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 30.0,
];

/// A cumulative latency histogram over fixed buckets (also used by the processor's stage
/// latencies, `pipeline::metrics`).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe_seconds(&self, seconds: f64) {
        for (bound, bucket) in LATENCY_BUCKETS_S.iter().zip(self.buckets.iter()) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the histogram in the Prometheus text format.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in LATENCY_BUCKETS_S.iter().zip(self.buckets.iter()) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Everything ingest counts. Shared through an `Arc`.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    pub connected_agents: AtomicI64,
    pub connections_accepted: AtomicU64,
    pub hellos_rejected: AtomicU64,
    pub batches_in: AtomicU64,
    pub readings_in: AtomicU64,
    pub summaries_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub acks: AtomicU64,
    pub duplicates: AtomicU64,
    pub protocol_violations: AtomicU64,
    nacks: [AtomicU64; NACK_REASONS.len()],
    pub log_write_seconds: Histogram,
    /// Sensor time of a batch's newest raw reading to the batch's arrival: the agent's
    /// batching plus the uplink (the sensor's clock against the collector's).
    pub reading_age_at_receipt_seconds: Histogram,
    /// Microseconds spent waiting for an in-flight slot before accepting a stream.
    pub backpressure_micros: AtomicU64,
    pub batches_in_flight: AtomicI64,
}

impl IngestMetrics {
    pub fn count_nack(&self, reason: NackReason) {
        if let Some(counter) = self.nacks.get(nack_reason_index(reason)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn nacks(&self, reason: NackReason) -> u64 {
        self.nacks
            .get(nack_reason_index(reason))
            .map_or(0, |counter| counter.load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, value: i64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        };
        gauge(
            &mut out,
            "tributary_ingest_connected_agents",
            "Agents with a live session.",
            self.connected_agents.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "tributary_ingest_batches_in_flight",
            "Batch streams being read or written to the log.",
            self.batches_in_flight.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "tributary_ingest_connections_accepted_total",
            "QUIC connections accepted.",
            &self.connections_accepted,
        );
        counter(
            &mut out,
            "tributary_ingest_hellos_rejected_total",
            "Hellos answered with a reject.",
            &self.hellos_rejected,
        );
        counter(
            &mut out,
            "tributary_ingest_batches_total",
            "Batch frames received.",
            &self.batches_in,
        );
        counter(
            &mut out,
            "tributary_ingest_readings_total",
            "Raw readings in batches written to the log.",
            &self.readings_in,
        );
        counter(
            &mut out,
            "tributary_ingest_summaries_total",
            "Window summaries in batches written to the log.",
            &self.summaries_in,
        );
        counter(
            &mut out,
            "tributary_ingest_bytes_total",
            "Batch bytes received.",
            &self.bytes_in,
        );
        counter(
            &mut out,
            "tributary_ingest_acks_total",
            "Batches acknowledged (durable or known duplicates).",
            &self.acks,
        );
        counter(
            &mut out,
            "tributary_ingest_duplicates_total",
            "Resent batches recognised and acked without writing.",
            &self.duplicates,
        );
        counter(
            &mut out,
            "tributary_ingest_protocol_violations_total",
            "Connections closed for breaking the protocol.",
            &self.protocol_violations,
        );
        let _ = writeln!(out, "# HELP tributary_ingest_nacks_total Batches refused, by reason.\n# TYPE tributary_ingest_nacks_total counter");
        for (reason, value) in NACK_REASONS.iter().zip(self.nacks.iter()) {
            let _ = writeln!(
                out,
                "tributary_ingest_nacks_total{{reason=\"{}\"}} {}",
                nack_reason_label(*reason),
                value.load(Ordering::Relaxed)
            );
        }
        self.log_write_seconds.render(
            "tributary_ingest_log_write_seconds",
            "Time from log append to durable.",
            &mut out,
        );
        self.reading_age_at_receipt_seconds.render(
            "tributary_ingest_reading_age_at_receipt_seconds",
            "Age of a batch's newest raw reading (sensor time) when the batch arrived: the agent's batching plus the uplink; 0 when the sensor clock is ahead.",
            &mut out,
        );
        let _ = writeln!(
            out,
            "# HELP tributary_ingest_backpressure_seconds_total Time spent not accepting streams because the log was behind.\n# TYPE tributary_ingest_backpressure_seconds_total counter\ntributary_ingest_backpressure_seconds_total {}",
            self.backpressure_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_labels_and_histograms() {
        let metrics = IngestMetrics::default();
        metrics.acks.fetch_add(3, Ordering::Relaxed);
        metrics.count_nack(NackReason::UnknownSeries);
        metrics.log_write_seconds.observe_seconds(0.003);
        let text = metrics.render();
        assert!(text.contains("tributary_ingest_acks_total 3\n"), "{text}");
        assert!(
            text.contains("tributary_ingest_nacks_total{reason=\"unknown_series\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tributary_ingest_log_write_seconds_bucket{le=\"0.002\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("tributary_ingest_log_write_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tributary_ingest_log_write_seconds_count 1\n"),
            "{text}"
        );
    }
}
