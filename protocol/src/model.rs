//! The data model: a series is (device id, metric name, tags); a reading is a value
//! of one series at one event time.

use serde::{Deserialize, Serialize};

use crate::summary::Summary;

/// Agent-assigned, compact identifier of a series within one agent. Stable for the
/// lifetime of the agent's state so that batches can refer to series by number and
/// carry the full [`SeriesKey`] only when the receiver does not know it yet.
pub type SeriesId = u32;

/// What a series is: one metric of one device, optionally qualified by tags.
///
/// Tags are kept sorted by name so that two keys with the same tags compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeriesKey {
    pub device_id: String,
    pub metric: String,
    pub tags: Vec<(String, String)>,
}

impl SeriesKey {
    pub fn new(device_id: impl Into<String>, metric: impl Into<String>) -> Self {
        Self {
            device_id: device_id.into(),
            metric: metric.into(),
            tags: Vec::new(),
        }
    }

    /// Adds tags, keeping them sorted by name (the last value wins on a repeated name).
    pub fn with_tags<I, K, V>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        for (name, value) in tags {
            let name = name.into();
            let value = value.into();
            match self.tags.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
                Ok(i) => self.tags[i].1 = value,
                Err(i) => self.tags.insert(i, (name, value)),
            }
        }
        self
    }
}

/// A dictionary entry: the number a batch uses for a series, and what it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesDef {
    pub id: SeriesId,
    pub key: SeriesKey,
}

/// Reading flag: the device's timestamp was implausible (clock unset, far future)
/// and the agent substituted its receive time.
pub const FLAG_TIME_SUBSTITUTED: u8 = 0b0000_0001;

/// One value of one series at one event time (milliseconds since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub series: SeriesId,
    pub time_ms: i64,
    pub value: f64,
    pub flags: u8,
}

/// The summary of one series over one event-time tumbling window
/// `[window_start_ms, window_start_ms + window_ms)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSummary {
    pub series: SeriesId,
    pub window_start_ms: i64,
    pub window_ms: u32,
    pub summary: Summary,
}
