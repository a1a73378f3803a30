//! Where a live reading's time goes: the collector's stage histograms, read before and after
//! the marker phase, so a freshness figure comes with its breakdown (issue 6: "measure
//! where the time goes" before changing settings).
//!
//! The stages, in the order a reading passes them (each from the collector's `/metrics`):
//! - `reading_age_at_receipt`: sensor time of a batch's newest reading to the batch's
//!   arrival at ingest (the agent's batching and the uplink);
//! - `log_write`: ingest's append until the log acknowledged it durable;
//! - `log_to_read`: the record's log time to the processor reading it;
//! - `log_to_stored`: the record's log time to the end of the store flush that made it
//!   queryable.
//!
//! Quantiles come from the histogram buckets: each is the upper bound of the bucket that
//! holds it (a ceiling, coarse between bounds); the mean is exact.

use serde_json::{json, Map, Value};

/// (name in the bench's JSON, collector histogram).
const STAGES: [(&str, &str); 4] = [
    (
        "reading_age_at_receipt",
        "tributary_ingest_reading_age_at_receipt_seconds",
    ),
    ("log_write", "tributary_ingest_log_write_seconds"),
    ("log_to_read", "tributary_processor_log_to_read_seconds"),
    ("log_to_stored", "tributary_processor_log_to_stored_seconds"),
];

/// One histogram as read from the text format: cumulative buckets, sum and count.
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// (upper bound in seconds, cumulative count), in the order rendered; `+Inf` last.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

/// Every stage histogram at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(Vec<Histogram>);

fn parse(metrics_text: &str, name: &str) -> Histogram {
    let mut histogram = Histogram::default();
    let bucket_prefix = format!("{name}_bucket{{le=\"");
    for line in metrics_text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if let Some(bound) = series.strip_prefix(&bucket_prefix) {
            let bound = bound.trim_end_matches("\"}");
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                match bound.parse::<f64>() {
                    Ok(bound) => bound,
                    Err(_) => continue,
                }
            };
            histogram.buckets.push((bound, value));
        } else if series == format!("{name}_sum") {
            histogram.sum = value;
        } else if series == format!("{name}_count") {
            histogram.count = value;
        }
    }
    histogram
}

/// Reads every stage histogram from a `/metrics` page (missing ones read as empty).
pub fn snapshot(metrics_text: &str) -> Snapshot {
    Snapshot(
        STAGES
            .iter()
            .map(|(_, metric)| parse(metrics_text, metric))
            .collect(),
    )
}

/// The upper bound (ms) of the bucket holding quantile `q` of the observations between the
/// two snapshots.
fn quantile_ms(before: &Histogram, after: &Histogram, count: f64, q: f64) -> Option<f64> {
    let rank = (q * count).ceil().max(1.0);
    after.buckets.iter().find_map(|(bound, cumulative)| {
        let earlier = before
            .buckets
            .iter()
            .find(|(other, _)| other == bound)
            .map_or(0.0, |(_, value)| *value);
        (cumulative - earlier >= rank).then_some(bound * 1e3)
    })
}

/// Per stage: observations, mean, and bucket-ceiling p50 and p99 (ms) between two snapshots.
pub fn breakdown(before: &Snapshot, after: &Snapshot) -> Value {
    let mut stages = Map::new();
    for (index, (name, _)) in STAGES.iter().enumerate() {
        let (Some(start), Some(end)) = (before.0.get(index), after.0.get(index)) else {
            continue;
        };
        let count = end.count - start.count;
        if count <= 0.0 {
            stages.insert((*name).to_string(), json!({ "count": 0 }));
            continue;
        }
        let mean_ms = (end.sum - start.sum) / count * 1e3;
        let ceiling = |q: f64| {
            quantile_ms(start, end, count, q).map_or(Value::Null, |ms| {
                if ms.is_finite() {
                    json!((ms * 10.0).round() / 10.0)
                } else {
                    json!("+Inf")
                }
            })
        };
        stages.insert(
            (*name).to_string(),
            json!({
                "count": count,
                "mean_ms": (mean_ms * 10.0).round() / 10.0,
                "p50_ms_at_most": ceiling(0.5),
                "p99_ms_at_most": ceiling(0.99),
            }),
        );
    }
    Value::Object(stages)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "tributary_processor_log_to_read_seconds_bucket{le=\"0.1\"} 1\n\
        tributary_processor_log_to_read_seconds_bucket{le=\"0.2\"} 1\n\
        tributary_processor_log_to_read_seconds_bucket{le=\"+Inf\"} 1\n\
        tributary_processor_log_to_read_seconds_sum 0.05\n\
        tributary_processor_log_to_read_seconds_count 1\n";
    const AFTER: &str = "tributary_processor_log_to_read_seconds_bucket{le=\"0.1\"} 10\n\
        tributary_processor_log_to_read_seconds_bucket{le=\"0.2\"} 11\n\
        tributary_processor_log_to_read_seconds_bucket{le=\"+Inf\"} 11\n\
        tributary_processor_log_to_read_seconds_sum 0.75\n\
        tributary_processor_log_to_read_seconds_count 11\n";

    #[test]
    fn breakdown_is_the_difference_of_two_snapshots() {
        let stages = breakdown(&snapshot(BEFORE), &snapshot(AFTER));
        let read = &stages["log_to_read"];
        assert_eq!(read["count"], json!(10.0));
        assert_eq!(read["mean_ms"], json!(70.0));
        assert_eq!(read["p50_ms_at_most"], json!(100.0));
        assert_eq!(read["p99_ms_at_most"], json!(200.0));
        assert_eq!(stages["log_write"]["count"], json!(0));
    }
}
