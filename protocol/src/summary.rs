//! Mergeable window summaries. (Stub: the protocol work fills this in.)

use serde::{Deserialize, Serialize};

/// count/sum/min/max/first/last and a quantile sketch of the values in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first_time_ms: i64,
    pub first_value: f64,
    pub last_time_ms: i64,
    pub last_value: f64,
}
