//! What the consumer loop pushes to the live feed after each record and each tick.
//!
//! Why built here and only when someone listens: the dashboard wants window results and
//! the newest raw value per series within milliseconds, without waiting for the store's
//! flush; building the rows costs string copies, so the loop skips it when the feed has
//! no listener.

use std::collections::BTreeMap;

use tributary_protocol::Batch;

use crate::live::{LiveBatch, LiveReading, LiveWindow};
use crate::process::WindowResult;
use crate::store::render_tags;

pub fn live_window(result: &WindowResult) -> LiveWindow {
    let summary = &result.summary;
    LiveWindow {
        agent_id: result.agent_id.to_string(),
        device_id: result.series.device_id.clone(),
        metric: result.series.metric.clone(),
        tags: render_tags(&result.series.tags),
        resolution_ms: result.resolution_ms,
        window_start_ms: result.window_start_ms,
        count: summary.count,
        sum: summary.sum,
        min: summary.min,
        max: summary.max,
        last_time_ms: summary.last_time_ms,
        last_value: summary.last_value,
        is_final: result.is_final,
    }
}

/// The newest raw reading of each series in `batch` (by event time; the later position
/// wins a tie). Readings of series the batch does not define are left out.
pub fn newest_readings(batch: &Batch) -> Vec<LiveReading> {
    let mut newest: BTreeMap<u32, (i64, f64)> = BTreeMap::new();
    for reading in &batch.readings {
        let entry = newest
            .entry(reading.series)
            .or_insert((reading.time_ms, reading.value));
        if reading.time_ms >= entry.0 {
            *entry = (reading.time_ms, reading.value);
        }
    }
    newest
        .into_iter()
        .filter_map(|(series_id, (time_ms, value))| {
            let definition = batch.series.iter().find(|def| def.id == series_id)?;
            Some(LiveReading {
                agent_id: batch.agent_id.clone(),
                device_id: definition.key.device_id.clone(),
                metric: definition.key.metric.clone(),
                tags: render_tags(&definition.key.tags),
                time_ms,
                value,
            })
        })
        .collect()
}

/// One live batch from a record (or tick) at `produced_ms`.
pub fn live_batch(produced_ms: i64, results: &[WindowResult], batch: Option<&Batch>) -> LiveBatch {
    LiveBatch {
        produced_ms,
        windows: results.iter().map(live_window).collect(),
        readings: batch.map(newest_readings).unwrap_or_default(),
    }
}
