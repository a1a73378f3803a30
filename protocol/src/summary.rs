//! Mergeable window summaries: count, sum, min, max, first, last and a quantile sketch.
//!
//! Why mergeable: the agent summarises each series per window at the edge, and the
//! cloud rolls those summaries up into longer windows, across replays and retries, in
//! whatever order they arrive. So [`Summary::merge`] is associative and commutative, and
//! merging the summaries of any split of the readings gives the summary of all of them:
//! count, min, max, first and last exactly; the sketch's buckets exactly; the sum up to
//! floating-point rounding (relative error about `n * 1e-16` of the sum of magnitudes).
//!
//! Ties are broken deterministically so merge order never shows: `first` is the smallest
//! `(time_ms, value)` and `last` the largest, values compared by IEEE total order; min
//! and max also use total order (so `-0.0 < 0.0`, and the result is bit-identical
//! whatever the order).
//!
//! Non-finite values (NaN, +-inf) are not representable: a single one would poison the
//! sum and min/max of a whole window forever after every merge. Sources reject them with
//! [`check_value`] where they parse sensor data; [`Summary::observe`] skips them as a
//! last line of defence and reports it.
//!
//! A summary with `count == 0` ([`Summary::empty`]) is the identity of merge.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::sketch::Sketch;

/// A value that cannot be summarised.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error(
    "value {value} is not a finite number; drop the reading (or fix the sensor's decoder): \
     summaries and batches only carry finite values"
)]
pub struct NonFiniteValue {
    pub value: f64,
}

/// Admits a value into the pipeline: finite values pass, NaN and infinities are refused.
#[inline]
pub fn check_value(value: f64) -> Result<f64, NonFiniteValue> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(NonFiniteValue { value })
    }
}

/// count/sum/min/max/first/last and a quantile sketch of the values in one window.
///
/// The first eight fields are the original layout; `sketch` was appended. Fields are
/// public for encoders; code that builds summaries should use the constructors so the
/// invariants (min <= max, first <= last, sketch count == count) hold.
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
    /// Quantile sketch at 1% relative accuracy over the same values.
    pub sketch: Sketch,
}

impl Default for Summary {
    fn default() -> Self {
        Self::empty()
    }
}

#[inline]
fn is_before(time_ms: i64, value: f64, other_time_ms: i64, other_value: f64) -> bool {
    match time_ms.cmp(&other_time_ms) {
        Ordering::Less => true,
        Ordering::Greater => false,
        Ordering::Equal => value.total_cmp(&other_value) == Ordering::Less,
    }
}

impl Summary {
    /// The summary of no values: the identity of [`Summary::merge`].
    pub fn empty() -> Self {
        Summary {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            first_time_ms: i64::MAX,
            first_value: 0.0,
            last_time_ms: i64::MIN,
            last_value: 0.0,
            sketch: Sketch::new(),
        }
    }

    /// The summary of one reading. A non-finite `value` gives [`Summary::empty`].
    pub fn from_reading(time_ms: i64, value: f64) -> Self {
        if !value.is_finite() {
            return Self::empty();
        }
        Summary {
            count: 1,
            sum: value,
            min: value,
            max: value,
            first_time_ms: time_ms,
            first_value: value,
            last_time_ms: time_ms,
            last_value: value,
            sketch: Sketch::from_value(value),
        }
    }

    /// Adds one reading. Returns false, and changes nothing, for a non-finite value
    /// (callers are expected to have refused it with [`check_value`]).
    #[inline]
    pub fn observe(&mut self, time_ms: i64, value: f64) -> bool {
        if !value.is_finite() {
            return false;
        }
        if self.count == 0 {
            *self = Self::from_reading(time_ms, value);
            return true;
        }
        self.count += 1;
        self.sum += value;
        if value.total_cmp(&self.min) == Ordering::Less {
            self.min = value;
        }
        if value.total_cmp(&self.max) == Ordering::Greater {
            self.max = value;
        }
        if is_before(time_ms, value, self.first_time_ms, self.first_value) {
            self.first_time_ms = time_ms;
            self.first_value = value;
        }
        if is_before(self.last_time_ms, self.last_value, time_ms, value) {
            self.last_time_ms = time_ms;
            self.last_value = value;
        }
        self.sketch.add(value);
        true
    }

    /// Folds `other` into `self`. Associative and commutative (the sum up to rounding).
    pub fn merge(&mut self, other: &Summary) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            self.clone_from(other);
            return;
        }
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        if other.min.total_cmp(&self.min) == Ordering::Less {
            self.min = other.min;
        }
        if other.max.total_cmp(&self.max) == Ordering::Greater {
            self.max = other.max;
        }
        if is_before(
            other.first_time_ms,
            other.first_value,
            self.first_time_ms,
            self.first_value,
        ) {
            self.first_time_ms = other.first_time_ms;
            self.first_value = other.first_value;
        }
        if is_before(
            self.last_time_ms,
            self.last_value,
            other.last_time_ms,
            other.last_value,
        ) {
            self.last_time_ms = other.last_time_ms;
            self.last_value = other.last_value;
        }
        self.sketch.merge(&other.sketch);
    }

    /// The arithmetic mean, or `None` for an empty summary.
    pub fn mean(&self) -> Option<f64> {
        if self.count == 0 {
            None
        } else {
            Some(self.sum / self.count as f64)
        }
    }

    /// The value at quantile `q` in `[0, 1]`: the element of 0-based rank
    /// `floor(q * (count - 1))` within 1% relative accuracy, never outside `[min, max]`
    /// (so `quantile(0.0) == min` and `quantile(1.0) == max` exactly, and a window of one
    /// value answers that value exactly). `None` when empty or `q` is not in `[0, 1]`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        if q == 0.0 {
            return Some(self.min);
        }
        if q == 1.0 {
            return Some(self.max);
        }
        let estimate = self.sketch.quantile(q)?;
        // Clamping can only move the estimate towards the true value, which lies in
        // [min, max]. Written out because `f64::clamp` panics on min > max, and a summary
        // decoded from the wire may be inconsistent.
        Some(if estimate < self.min {
            self.min
        } else if estimate > self.max {
            self.max
        } else {
            estimate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observe_tracks_extremes_and_ends() {
        let mut summary = Summary::from_reading(1_000, 20.0);
        assert!(summary.observe(3_000, 22.5));
        assert!(summary.observe(2_000, 19.0));
        assert!(!summary.observe(4_000, f64::NAN));
        assert!(!summary.observe(4_000, f64::INFINITY));
        assert_eq!(summary.count, 3);
        assert_eq!((summary.min, summary.max), (19.0, 22.5));
        assert_eq!((summary.first_time_ms, summary.first_value), (1_000, 20.0));
        assert_eq!((summary.last_time_ms, summary.last_value), (3_000, 22.5));
        assert_eq!(summary.mean(), Some(61.5 / 3.0));
        assert_eq!(summary.sketch.count(), 3);
    }

    #[test]
    fn ties_on_time_break_by_value() {
        let mut left = Summary::from_reading(5, 2.0);
        left.observe(5, 1.0);
        assert_eq!((left.first_value, left.last_value), (1.0, 2.0));
        let mut right = Summary::from_reading(5, 1.0);
        right.observe(5, 2.0);
        assert_eq!(left, right);
    }

    #[test]
    fn empty_is_the_identity_of_merge() {
        let reading = Summary::from_reading(7, -3.25);
        let mut merged = Summary::empty();
        merged.merge(&reading);
        assert_eq!(merged, reading);
        let mut unchanged = reading.clone();
        unchanged.merge(&Summary::empty());
        assert_eq!(unchanged, reading);
        assert_eq!(Summary::empty().quantile(0.5), None);
        assert_eq!(Summary::from_reading(1, f64::NAN), Summary::empty());
    }

    #[test]
    fn quantile_of_a_single_value_is_exact() {
        let summary = Summary::from_reading(1, 21.37);
        for q in [0.0, 0.01, 0.5, 0.99, 1.0] {
            assert_eq!(summary.quantile(q), Some(21.37));
        }
        assert_eq!(summary.quantile(1.5), None);
        assert_eq!(summary.quantile(f64::NAN), None);
    }

    #[test]
    fn check_value_refuses_non_finite() {
        assert_eq!(check_value(1.5), Ok(1.5));
        assert!(check_value(f64::NEG_INFINITY).is_err());
        let message = check_value(f64::NAN).unwrap_err().to_string();
        assert!(
            message.contains("NaN") && message.contains("finite"),
            "{message}"
        );
    }
}
