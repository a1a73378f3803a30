//! Comparing the ledger with what the store holds (sans-IO): missing, duplicated, short and
//! mismatched windows, plus windows nobody sent.
//!
//! Receive-timed readings (see `ledger`) land in some window the sim cannot predict, so for a
//! series that has them the per-window check allows a surplus and the surplus across the
//! series' windows must equal the receive-timed count and sum; min/max/first/last of those
//! windows are not compared (a receive-timed value may legitimately be the window's extreme).
//! Sums compare with a relative tolerance: the store may add in a different order.

use std::collections::{BTreeMap, BTreeSet};

use crate::ledger::{LedgerRecord, ReceiveTimedStats, WindowStats};

/// (device, metric, window_start_ms)
pub type WindowKey = (String, String, i64);

#[derive(Debug, Clone, PartialEq, Default)]
pub struct VerifyReport {
    pub windows_checked: usize,
    /// In the ledger, absent from the store.
    pub missing: Vec<WindowKey>,
    /// More readings in the store than sent (count too high): something was stored twice.
    pub duplicated: Vec<(WindowKey, u64, u64)>,
    /// Fewer readings than sent.
    pub short: Vec<(WindowKey, u64, u64)>,
    /// Count right, but sum/min/max/first/last differ; the text says which.
    pub mismatched: Vec<(WindowKey, String)>,
    /// In the store, never sent (for series without receive-timed readings).
    pub unexpected: Vec<WindowKey>,
    /// Series whose receive-timed surplus does not add up: (device, metric, what differs).
    pub receive_timed_mismatches: Vec<(String, String, String)>,
}

impl VerifyReport {
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.short.is_empty()
            && self.mismatched.is_empty()
            && self.unexpected.is_empty()
            && self.receive_timed_mismatches.is_empty()
    }

    /// A human-readable report, at most `max_items` lines per category.
    pub fn render(&self, max_items: usize) -> String {
        let mut text = format!(
            "{} windows checked: {} missing, {} duplicated, {} short, {} mismatched, {} unexpected, {} receive-timed mismatches\n",
            self.windows_checked,
            self.missing.len(),
            self.duplicated.len(),
            self.short.len(),
            self.mismatched.len(),
            self.unexpected.len(),
            self.receive_timed_mismatches.len()
        );
        for key in self.missing.iter().take(max_items) {
            text.push_str(&format!("missing    {}/{} @ {}\n", key.0, key.1, key.2));
        }
        for (key, expected, observed) in self.duplicated.iter().take(max_items) {
            text.push_str(&format!(
                "duplicated {}/{} @ {}: sent {expected}, stored {observed}\n",
                key.0, key.1, key.2
            ));
        }
        for (key, expected, observed) in self.short.iter().take(max_items) {
            text.push_str(&format!(
                "short      {}/{} @ {}: sent {expected}, stored {observed}\n",
                key.0, key.1, key.2
            ));
        }
        for (key, detail) in self.mismatched.iter().take(max_items) {
            text.push_str(&format!(
                "mismatched {}/{} @ {}: {detail}\n",
                key.0, key.1, key.2
            ));
        }
        for key in self.unexpected.iter().take(max_items) {
            text.push_str(&format!("unexpected {}/{} @ {}\n", key.0, key.1, key.2));
        }
        for (device, metric, detail) in self.receive_timed_mismatches.iter().take(max_items) {
            text.push_str(&format!("receive-timed {device}/{metric}: {detail}\n"));
        }
        text
    }
}

fn close(expected: f64, observed: f64, relative_tolerance: f64) -> bool {
    (expected - observed).abs() <= relative_tolerance * expected.abs().max(observed.abs()).max(1.0)
}

/// Compares the ledger's windows and receive-timed series with the windows observed in the store.
pub fn compare(
    ledger_windows: &[WindowStats],
    receive_timed: &[ReceiveTimedStats],
    observed_windows: &[WindowStats],
    relative_tolerance: f64,
) -> VerifyReport {
    let key = |window: &WindowStats| {
        (
            window.device.clone(),
            window.metric.clone(),
            window.window_start_ms,
        )
    };
    let expected: BTreeMap<WindowKey, &WindowStats> =
        ledger_windows.iter().map(|w| (key(w), w)).collect();
    let mut observed: BTreeMap<WindowKey, WindowStats> = BTreeMap::new();
    // An observer may report a window in parts (several rows); merge them.
    for window in observed_windows {
        observed
            .entry(key(window))
            .and_modify(|merged| {
                merged.count += window.count;
                merged.sum += window.sum;
                merged.min = merged.min.min(window.min);
                merged.max = merged.max.max(window.max);
            })
            .or_insert_with(|| window.clone());
    }
    let relaxed: BTreeMap<(String, String), &ReceiveTimedStats> = receive_timed
        .iter()
        .map(|r| ((r.device.clone(), r.metric.clone()), r))
        .collect();
    let mut surplus: BTreeMap<(String, String), (u64, f64)> = BTreeMap::new();
    let mut report = VerifyReport {
        windows_checked: expected.len(),
        ..VerifyReport::default()
    };

    for (window_key, sent) in &expected {
        let series = (window_key.0.clone(), window_key.1.clone());
        let is_relaxed = relaxed.contains_key(&series);
        let Some(stored) = observed.get(window_key) else {
            report.missing.push(window_key.clone());
            continue;
        };
        if stored.count < sent.count {
            report
                .short
                .push((window_key.clone(), sent.count, stored.count));
            continue;
        }
        if is_relaxed {
            let entry = surplus.entry(series).or_insert((0, 0.0));
            entry.0 += stored.count - sent.count;
            entry.1 += stored.sum - sent.sum;
            continue;
        }
        if stored.count > sent.count {
            report
                .duplicated
                .push((window_key.clone(), sent.count, stored.count));
            continue;
        }
        let mut differences = Vec::new();
        for (name, sent_value, stored_value) in [
            ("sum", sent.sum, stored.sum),
            ("min", sent.min, stored.min),
            ("max", sent.max, stored.max),
            ("first", sent.first, stored.first),
            ("last", sent.last, stored.last),
        ] {
            if !close(sent_value, stored_value, relative_tolerance) {
                differences.push(format!("{name} sent {sent_value}, stored {stored_value}"));
            }
        }
        if !differences.is_empty() {
            report
                .mismatched
                .push((window_key.clone(), differences.join("; ")));
        }
    }
    for (window_key, stored) in &observed {
        if expected.contains_key(window_key) {
            continue;
        }
        let series = (window_key.0.clone(), window_key.1.clone());
        if relaxed.contains_key(&series) {
            let entry = surplus.entry(series).or_insert((0, 0.0));
            entry.0 += stored.count;
            entry.1 += stored.sum;
        } else {
            report.unexpected.push(window_key.clone());
        }
    }
    let relaxed_series: BTreeSet<&(String, String)> = relaxed.keys().collect();
    for series in relaxed_series {
        let Some(sent) = relaxed.get(series) else {
            continue;
        };
        let (count, sum) = surplus.get(series).copied().unwrap_or((0, 0.0));
        if count != sent.count || !close(sent.sum, sum, relative_tolerance) {
            report.receive_timed_mismatches.push((
                series.0.clone(),
                series.1.clone(),
                format!(
                    "sent {} readings summing to {}, the store has {count} extra summing to {sum}",
                    sent.count, sent.sum
                ),
            ));
        }
    }
    report
}

/// Splits ledger records into windows and receive-timed series.
pub fn split_records(records: Vec<LedgerRecord>) -> (Vec<WindowStats>, Vec<ReceiveTimedStats>) {
    let mut windows = Vec::new();
    let mut receive_timed = Vec::new();
    for record in records {
        match record {
            LedgerRecord::Window(window) => windows.push(window),
            LedgerRecord::ReceiveTimed(series) => receive_timed.push(series),
            LedgerRecord::Rejected(_) => {}
        }
    }
    (windows, receive_timed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Ledger, SeriesName};
    use proptest::prelude::*;

    fn ledger_of(readings: &[(&str, i64, f64)]) -> Ledger {
        let mut ledger = Ledger::new(1000).unwrap();
        for (metric, time_ms, value) in readings {
            ledger.record(
                &SeriesName::new("dev-0001", *metric),
                *time_ms,
                *value,
                false,
            );
        }
        ledger
    }

    #[test]
    fn an_exact_copy_verifies_and_each_defect_is_named() {
        let ledger = ledger_of(&[
            ("a", 10, 1.0),
            ("a", 20, 2.0),
            ("a", 1500, 3.0),
            ("b", 10, 4.0),
        ]);
        let windows = ledger.windows();
        assert!(compare(&windows, &[], &windows, 1e-9).is_exact());

        let mut observed = windows.clone();
        observed.remove(2); // b@0 missing
        observed[0].count += 1; // a@0 duplicated
        observed[0].sum += 2.0;
        observed[1].last = 99.0; // a@1000 mismatched
        observed.push(WindowStats {
            window_start_ms: 9000,
            ..windows[0].clone()
        });
        let report = compare(&windows, &[], &observed, 1e-9);
        assert_eq!(
            report.missing,
            vec![("dev-0001".to_string(), "b".to_string(), 0)]
        );
        assert_eq!(report.duplicated.len(), 1);
        assert_eq!(report.mismatched.len(), 1);
        assert!(report.mismatched[0].1.contains("last"));
        assert_eq!(report.unexpected.len(), 1);
        assert!(!report.is_exact());
        assert!(report.render(10).contains("1 missing, 1 duplicated"));
    }

    #[test]
    fn receive_timed_readings_may_land_anywhere_but_must_add_up() {
        let ledger = ledger_of(&[("a", 10, 1.0)]);
        let mut with_receive_timed = ledger.clone();
        with_receive_timed.record_receive_timed(&SeriesName::new("dev-0001", "a"), 5.0);
        let mut observed = ledger.windows();
        observed.push(WindowStats {
            window_start_ms: 7000,
            count: 1,
            sum: 5.0,
            min: 5.0,
            max: 5.0,
            first: 5.0,
            last: 5.0,
            ..observed[0].clone()
        });
        let report = compare(
            &ledger.windows(),
            &with_receive_timed.receive_timed(),
            &observed,
            1e-9,
        );
        assert!(report.is_exact(), "{}", report.render(5));
        let report = compare(
            &ledger.windows(),
            &with_receive_timed.receive_timed(),
            &ledger.windows(),
            1e-9,
        );
        assert_eq!(report.receive_timed_mismatches.len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn dropping_or_doubling_a_reading_is_always_reported(
            readings in proptest::collection::vec((0i64..5000, -50i32..50), 1..60),
            victim in any::<prop::sample::Index>(),
            double in any::<bool>(),
        ) {
            let values: Vec<(&str, i64, f64)> = readings.iter().map(|(t, v)| ("a", *t, f64::from(*v))).collect();
            let sent = ledger_of(&values);
            let chosen = victim.index(values.len());
            let mut stored_readings = values.clone();
            if double {
                stored_readings.push(values[chosen]);
            } else {
                stored_readings.remove(chosen);
            }
            let stored = ledger_of(&stored_readings);
            let report = compare(&sent.windows(), &[], &stored.windows(), 1e-9);
            prop_assert!(!report.is_exact());
            if double {
                prop_assert_eq!(report.duplicated.len(), 1);
            } else {
                prop_assert_eq!(report.short.len() + report.missing.len(), 1);
            }
        }
    }
}
