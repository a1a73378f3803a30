//! Property tests of `Summary::merge`: associative, commutative, and merging the
//! summaries of any split of the readings equals summarising all of them.

use proptest::prelude::*;
use tributary_protocol::Summary;

/// Readings with deliberate ties in time and in value, both signs, zeros and wide
/// magnitudes (the sketch's collapsing never kicks in below a factor of ~1e17).
fn reading() -> impl Strategy<Value = (i64, f64)> {
    let value = prop_oneof![
        3 => -1_000_000.0f64..1_000_000.0,
        2 => (-50i32..50).prop_map(|step| step as f64 * 0.25),
        1 => Just(0.0f64),
        1 => Just(-0.0f64),
        1 => (1e-6f64..1e9).prop_map(|magnitude| magnitude),
        1 => (1e-6f64..1e9).prop_map(|magnitude| -magnitude),
    ];
    (-20i64..20, value)
}

fn summarise(readings: &[(i64, f64)]) -> Summary {
    let mut summary = Summary::empty();
    for (time_ms, value) in readings {
        assert!(summary.observe(*time_ms, *value));
    }
    summary
}

fn merged(left: &Summary, right: &Summary) -> Summary {
    let mut result = left.clone();
    result.merge(right);
    result
}

/// Everything but the sum must be identical, bit for bit.
fn assert_same_except_sum(left: &Summary, right: &Summary) {
    assert_eq!(left.count, right.count);
    assert_eq!(left.min.to_bits(), right.min.to_bits());
    assert_eq!(left.max.to_bits(), right.max.to_bits());
    assert_eq!(
        (left.first_time_ms, left.first_value.to_bits()),
        (right.first_time_ms, right.first_value.to_bits())
    );
    assert_eq!(
        (left.last_time_ms, left.last_value.to_bits()),
        (right.last_time_ms, right.last_value.to_bits())
    );
    assert_eq!(left.sketch, right.sketch);
}

/// Float sums of the same values in another order differ by rounding: at most about
/// `n * eps * sum(|x|)`. 1e-9 of the sum of magnitudes is far above that and far below
/// any real bug.
fn assert_sum_close(left: f64, right: f64, magnitude_sum: f64) {
    let tolerance = 1e-9 * magnitude_sum.max(f64::MIN_POSITIVE);
    assert!(
        (left - right).abs() <= tolerance,
        "sum {left} vs {right}, tolerance {tolerance}"
    );
}

fn magnitude_sum(readings: &[(i64, f64)]) -> f64 {
    readings.iter().map(|(_, value)| value.abs()).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn merge_is_associative(
        a in prop::collection::vec(reading(), 0..40),
        b in prop::collection::vec(reading(), 0..40),
        c in prop::collection::vec(reading(), 0..40),
    ) {
        let (sa, sb, sc) = (summarise(&a), summarise(&b), summarise(&c));
        let left = merged(&merged(&sa, &sb), &sc);
        let right = merged(&sa, &merged(&sb, &sc));
        assert_same_except_sum(&left, &right);
        let all: Vec<_> = a.iter().chain(&b).chain(&c).copied().collect();
        assert_sum_close(left.sum, right.sum, magnitude_sum(&all));
    }

    #[test]
    fn merge_is_commutative(
        a in prop::collection::vec(reading(), 0..40),
        b in prop::collection::vec(reading(), 0..40),
    ) {
        let (sa, sb) = (summarise(&a), summarise(&b));
        // Float addition is commutative, so here even the sum is exact.
        prop_assert_eq!(merged(&sa, &sb), merged(&sb, &sa));
    }

    #[test]
    fn merging_a_split_equals_summarising_everything(
        readings in prop::collection::vec(reading(), 1..300),
        windows in 1usize..12,
        assignment_seed in any::<u64>(),
    ) {
        // Assign each reading to a window pseudo-randomly (not contiguous runs: readings
        // arrive out of order), summarise each window, merge the windows in reverse.
        let mut parts = vec![Vec::new(); windows];
        let mut state = assignment_seed | 1;
        for reading in &readings {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            parts[(state % windows as u64) as usize].push(*reading);
        }
        let mut rolled_up = Summary::empty();
        for part in parts.iter().rev() {
            rolled_up.merge(&summarise(part));
        }
        let direct = summarise(&readings);
        assert_same_except_sum(&rolled_up, &direct);
        assert_sum_close(rolled_up.sum, direct.sum, magnitude_sum(&readings));

        let exact_sum: f64 = readings.iter().map(|(_, value)| value).sum();
        assert_sum_close(direct.sum, exact_sum, magnitude_sum(&readings));
        let mut sorted: Vec<f64> = readings.iter().map(|(_, value)| *value).collect();
        sorted.sort_by(f64::total_cmp);
        prop_assert_eq!(rolled_up.min.to_bits(), sorted[0].to_bits());
        prop_assert_eq!(rolled_up.max.to_bits(), sorted[sorted.len() - 1].to_bits());

        // Same rank definition as the sketch: element floor(q * (n - 1)) of the sorted data.
        for q in [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0] {
            let exact = sorted[(q * (sorted.len() - 1) as f64).floor() as usize];
            let estimate = rolled_up.quantile(q).unwrap();
            let error = (estimate - exact).abs();
            prop_assert!(
                error <= 0.01 * exact.abs() + 1e-300,
                "q={} estimate {} exact {} (relative error {})", q, estimate, exact, error / exact.abs()
            );
        }
    }

    #[test]
    fn summaries_round_trip_through_postcard(readings in prop::collection::vec(reading(), 0..200)) {
        let summary = summarise(&readings);
        let bytes = postcard::to_allocvec(&summary).unwrap();
        let decoded: Summary = postcard::from_bytes(&bytes).unwrap();
        prop_assert_eq!(decoded, summary);
    }

    #[test]
    fn decoding_arbitrary_bytes_as_a_summary_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(summary) = postcard::from_bytes::<Summary>(&bytes) {
            let _ = summary.quantile(0.5);
            let _ = summary.mean();
            let mut copy = summary.clone();
            copy.merge(&summary);
        }
    }
}

#[test]
fn a_ten_second_window_of_a_sensor_encodes_in_a_few_bytes() {
    // 10 readings of a temperature at 0.01 degC resolution drifting around 21.5 degC.
    let mut summary = Summary::empty();
    for second in 0..10i64 {
        summary.observe(
            1_700_000_000_000 + second * 1000,
            21.5 + (second % 3) as f64 * 0.01,
        );
    }
    let sketch_bytes = postcard::to_allocvec(&summary.sketch).unwrap().len();
    assert!(sketch_bytes <= 12, "sketch is {sketch_bytes} bytes");
    let summary_bytes = postcard::to_allocvec(&summary).unwrap().len();
    assert!(summary_bytes <= 70, "summary is {summary_bytes} bytes");
}

/// Magnitudes spread over 600 decades, so the stores must collapse their lowest buckets.
fn extreme_value() -> impl Strategy<Value = f64> {
    (-690.0f64..690.0, any::<bool>()).prop_map(|(exponent, negative)| {
        let magnitude = exponent.exp();
        if negative {
            -magnitude
        } else {
            magnitude
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn collapsing_keeps_merge_associative_and_commutative(
        a in prop::collection::vec(extreme_value(), 0..60),
        b in prop::collection::vec(extreme_value(), 0..60),
        c in prop::collection::vec(extreme_value(), 0..60),
    ) {
        use tributary_protocol::sketch::{Sketch, MAX_BUCKETS_PER_STORE};
        let build = |values: &[f64]| {
            let mut sketch = Sketch::new();
            for value in values {
                sketch.add(*value);
            }
            sketch
        };
        let (sa, sb, sc) = (build(&a), build(&b), build(&c));
        let mut left = sa.clone();
        left.merge(&sb);
        left.merge(&sc);
        let mut right_tail = sc.clone();
        right_tail.merge(&sb);
        let mut right = right_tail;
        right.merge(&sa);
        prop_assert_eq!(&left, &right);
        // Adding every value one by one into one sketch collapses the same way.
        let all: Vec<f64> = a.iter().chain(&b).chain(&c).copied().collect();
        prop_assert_eq!(&left, &build(&all));
        prop_assert_eq!(left.count(), all.len() as u64);
        for buckets in [left.positive_buckets(), left.negative_buckets()] {
            if let (Some(first), Some(last)) = (buckets.first(), buckets.last()) {
                prop_assert!(((last.0 as i64) - (first.0 as i64)) < MAX_BUCKETS_PER_STORE as i64);
            }
        }
        let bytes = postcard::to_allocvec(&left).unwrap();
        prop_assert_eq!(postcard::from_bytes::<Sketch>(&bytes).unwrap(), left);
    }
}
