//! The ground-truth ledger: what the pipeline must end up holding, given what the sim sent.
//!
//! The end-to-end tests compare the store against this, so its accounting rules are the contract
//! (also in `docs/simulator.md`):
//! - Every reading handed to the broker or written to the serial line with a device time the
//!   agent will keep is counted in its series' window (`window_start_ms = floor(time / window_ms)
//!   * window_ms`): count, sum, min, max, and first/last by event time (ties: send order).
//! - Duplicates (the same message sent twice) are counted twice: the agent does not deduplicate
//!   device repeats (two equal readings are legitimate data), so the store must hold both copies.
//!   The number of extra copies is also kept per window (`duplicate_copies`) for reports.
//! - Readings whose stored time will be the agent's receive time (no device time, as with plain
//!   payloads, or a clock that was never set) cannot be placed in a window by the sim; they are
//!   kept per series as "receive-timed" with count and sum only.
//! - Messages and serial lines built to be rejected are counted by reason (the agent's reason
//!   label) and contribute nothing to any window.
//!
//! The ledger is sans-IO: it only does arithmetic on what it is told; [`Ledger::to_json_lines`]
//! renders it and [`parse_json_lines`] reads it back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A series as the agent names it: device id and metric name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeriesName {
    pub device: String,
    pub metric: String,
}

impl SeriesName {
    pub fn new(device: impl Into<String>, metric: impl Into<String>) -> Self {
        Self {
            device: device.into(),
            metric: metric.into(),
        }
    }
}

/// One series' readings in one window, as the ledger and an observer of the store report them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    pub device: String,
    pub metric: String,
    pub window_start_ms: i64,
    pub window_ms: i64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: f64,
    pub last: f64,
    /// Extra copies sent by the duplicate fault (already included in `count`).
    #[serde(default)]
    pub duplicate_copies: u64,
}

/// Readings of one series whose time the agent assigns (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiveTimedStats {
    pub device: String,
    pub metric: String,
    pub count: u64,
    pub sum: f64,
}

/// Messages or lines the agent must reject, by its reason label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedStats {
    pub reason: String,
    pub count: u64,
}

/// One line of the ledger file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LedgerRecord {
    Window(WindowStats),
    ReceiveTimed(ReceiveTimedStats),
    Rejected(RejectedStats),
}

#[derive(Debug, Error)]
pub enum LedgerError {
    #[error("window_ms must be positive, got {window_ms}: pass a window width like 60000")]
    BadWindow { window_ms: i64 },
    #[error("ledger line {line_number} is not a ledger record ({detail}); was the file written by `tributary-sim run --ledger`?")]
    BadLine { line_number: usize, detail: String },
}

#[derive(Debug, Clone)]
struct WindowAccumulator {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first: (i64, u64, f64),
    last: (i64, u64, f64),
    duplicate_copies: u64,
}

/// Accumulates what was sent. See the module docs for the rules.
#[derive(Debug, Clone)]
pub struct Ledger {
    window_ms: i64,
    /// Send order, to break event-time ties in first/last.
    sequence: u64,
    windows: BTreeMap<(SeriesName, i64), WindowAccumulator>,
    receive_timed: BTreeMap<SeriesName, (u64, f64)>,
    rejected: BTreeMap<String, u64>,
}

impl Ledger {
    pub fn new(window_ms: i64) -> Result<Self, LedgerError> {
        if window_ms <= 0 {
            return Err(LedgerError::BadWindow { window_ms });
        }
        Ok(Self {
            window_ms,
            sequence: 0,
            windows: BTreeMap::new(),
            receive_timed: BTreeMap::new(),
            rejected: BTreeMap::new(),
        })
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// A reading the agent will store at `time_ms`. `duplicate` marks the extra copy of a
    /// duplicated message.
    pub fn record(&mut self, series: &SeriesName, time_ms: i64, value: f64, duplicate: bool) {
        self.sequence += 1;
        let order = (time_ms, self.sequence, value);
        let window_start_ms = time_ms.div_euclid(self.window_ms) * self.window_ms;
        let accumulator = self
            .windows
            .entry((series.clone(), window_start_ms))
            .or_insert(WindowAccumulator {
                count: 0,
                sum: 0.0,
                min: value,
                max: value,
                first: order,
                last: order,
                duplicate_copies: 0,
            });
        accumulator.count += 1;
        accumulator.sum += value;
        accumulator.min = accumulator.min.min(value);
        accumulator.max = accumulator.max.max(value);
        if (order.0, order.1) < (accumulator.first.0, accumulator.first.1) {
            accumulator.first = order;
        }
        if (order.0, order.1) >= (accumulator.last.0, accumulator.last.1) {
            accumulator.last = order;
        }
        if duplicate {
            accumulator.duplicate_copies += 1;
        }
    }

    /// A reading the agent will store at its own receive time.
    pub fn record_receive_timed(&mut self, series: &SeriesName, value: f64) {
        let entry = self.receive_timed.entry(series.clone()).or_insert((0, 0.0));
        entry.0 += 1;
        entry.1 += value;
    }

    /// A message or serial line the agent must reject with `reason`.
    pub fn record_rejected(&mut self, reason: &str) {
        *self.rejected.entry(reason.to_owned()).or_insert(0) += 1;
    }

    pub fn windows(&self) -> Vec<WindowStats> {
        self.windows
            .iter()
            .map(|((series, window_start_ms), accumulator)| WindowStats {
                device: series.device.clone(),
                metric: series.metric.clone(),
                window_start_ms: *window_start_ms,
                window_ms: self.window_ms,
                count: accumulator.count,
                sum: accumulator.sum,
                min: accumulator.min,
                max: accumulator.max,
                first: accumulator.first.2,
                last: accumulator.last.2,
                duplicate_copies: accumulator.duplicate_copies,
            })
            .collect()
    }

    pub fn receive_timed(&self) -> Vec<ReceiveTimedStats> {
        self.receive_timed
            .iter()
            .map(|(series, (count, sum))| ReceiveTimedStats {
                device: series.device.clone(),
                metric: series.metric.clone(),
                count: *count,
                sum: *sum,
            })
            .collect()
    }

    pub fn rejected(&self) -> Vec<RejectedStats> {
        self.rejected
            .iter()
            .map(|(reason, count)| RejectedStats {
                reason: reason.clone(),
                count: *count,
            })
            .collect()
    }

    /// Readings that went into windows (duplicates included).
    pub fn windowed_reading_count(&self) -> u64 {
        self.windows
            .values()
            .map(|accumulator| accumulator.count)
            .sum()
    }

    pub fn records(&self) -> Vec<LedgerRecord> {
        let mut records: Vec<LedgerRecord> = self
            .windows()
            .into_iter()
            .map(LedgerRecord::Window)
            .collect();
        records.extend(
            self.receive_timed()
                .into_iter()
                .map(LedgerRecord::ReceiveTimed),
        );
        records.extend(self.rejected().into_iter().map(LedgerRecord::Rejected));
        records
    }

    /// The ledger file: one JSON object per line, `"kind"` one of window, receive_timed, rejected.
    pub fn to_json_lines(&self) -> String {
        let mut text = String::new();
        for record in self.records() {
            // Serializing these plain structs of finite numbers and strings cannot fail.
            if let Ok(line) = serde_json::to_string(&record) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        text
    }
}

/// Reads a ledger file (or observed windows in the same format). Blank lines are skipped.
pub fn parse_json_lines(text: &str) -> Result<Vec<LedgerRecord>, LedgerError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line).map_err(|error| LedgerError::BadLine {
                line_number: index + 1,
                detail: error.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn series() -> SeriesName {
        SeriesName::new("dev-0001", "temperature")
    }

    #[test]
    fn windows_split_at_boundaries_and_first_last_follow_event_time() {
        let mut ledger = Ledger::new(60_000).unwrap();
        ledger.record(&series(), 120_500, 3.0, false);
        ledger.record(&series(), 60_000, 2.0, false);
        ledger.record(&series(), 119_999, 5.0, false);
        ledger.record(&series(), 60_000, 7.0, true);
        let windows = ledger.windows();
        assert_eq!(windows.len(), 2);
        let first_window = &windows[0];
        assert_eq!(first_window.window_start_ms, 60_000);
        assert_eq!(first_window.count, 3);
        assert_eq!(first_window.sum, 14.0);
        assert_eq!((first_window.min, first_window.max), (2.0, 7.0));
        assert_eq!(
            first_window.first, 2.0,
            "tie at 60000: the earlier send is first"
        );
        assert_eq!(first_window.last, 5.0);
        assert_eq!(first_window.duplicate_copies, 1);
        assert_eq!(windows[1].window_start_ms, 120_000);
    }

    #[test]
    fn negative_times_floor_into_the_window_before_zero() {
        let mut ledger = Ledger::new(1000).unwrap();
        ledger.record(&series(), -1, 1.0, false);
        assert_eq!(ledger.windows()[0].window_start_ms, -1000);
    }

    #[test]
    fn receive_timed_and_rejected_stay_out_of_windows_and_round_trip() {
        let mut ledger = Ledger::new(60_000).unwrap();
        ledger.record(&series(), 1, 1.5, false);
        ledger.record_receive_timed(&series(), 2.5);
        ledger.record_rejected("json_syntax");
        ledger.record_rejected("json_syntax");
        assert_eq!(ledger.windowed_reading_count(), 1);
        let text = ledger.to_json_lines();
        let records = parse_json_lines(&text).unwrap();
        assert_eq!(records, ledger.records());
        assert!(records.contains(&LedgerRecord::Rejected(RejectedStats {
            reason: "json_syntax".into(),
            count: 2
        })));
        assert!(matches!(
            parse_json_lines("{\"kind\":\"nope\"}"),
            Err(LedgerError::BadLine { line_number: 1, .. })
        ));
        assert!(Ledger::new(0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn windows_partition_the_readings(readings in proptest::collection::vec((-10_000i64..10_000, -100i32..100), 1..200), window_ms in 1i64..5000) {
            let mut ledger = Ledger::new(window_ms).unwrap();
            for (time_ms, value) in &readings {
                ledger.record(&series(), *time_ms, f64::from(*value), false);
            }
            let windows = ledger.windows();
            prop_assert_eq!(windows.iter().map(|w| w.count).sum::<u64>(), readings.len() as u64);
            let total: f64 = windows.iter().map(|w| w.sum).sum();
            prop_assert_eq!(total, readings.iter().map(|(_, v)| f64::from(*v)).sum::<f64>());
            for window in &windows {
                let inside: Vec<&(i64, i32)> = readings.iter()
                    .filter(|(t, _)| *t >= window.window_start_ms && *t < window.window_start_ms + window_ms)
                    .collect();
                prop_assert_eq!(inside.len() as u64, window.count);
                let earliest = inside.iter().map(|(t, _)| *t).min().unwrap();
                let latest = inside.iter().map(|(t, _)| *t).max().unwrap();
                // first: the first sent of the earliest time; last: the last sent of the latest.
                let first = inside.iter().find(|(t, _)| *t == earliest).unwrap().1;
                let last = inside.iter().rev().find(|(t, _)| *t == latest).unwrap().1;
                prop_assert_eq!(window.first, f64::from(first));
                prop_assert_eq!(window.last, f64::from(last));
                prop_assert_eq!(window.min, f64::from(inside.iter().map(|(_, v)| *v).min().unwrap()));
                prop_assert_eq!(window.max, f64::from(inside.iter().map(|(_, v)| *v).max().unwrap()));
            }
        }
    }
}
