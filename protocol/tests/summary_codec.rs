//! The compact summary encoding of batch format 2: bit-exact round trips for any summary
//! (realistic, raw-valued, or breaking every invariant), size against format 1, and the
//! old format still decoding (a format 1 fixture written by the previous build).

use proptest::prelude::*;
use tributary_protocol::batch::{
    batch_format_version, decode_batch, encode_batch, encode_batch_as, transcode_batch, Batch,
    BatchEncoder, BatchLimits, FORMAT_VERSION, OLDEST_FORMAT_VERSION,
};
use tributary_protocol::sketch::Sketch;
use tributary_protocol::{Summary, WindowSummary};

/// Every field as bits, so NaN payloads and negative zero count.
fn summary_bits(window: &WindowSummary) -> impl PartialEq + std::fmt::Debug + '_ {
    let summary = &window.summary;
    (
        (window.series, window.window_start_ms, window.window_ms),
        (summary.count, summary.first_time_ms, summary.last_time_ms),
        [
            summary.sum,
            summary.min,
            summary.max,
            summary.first_value,
            summary.last_value,
        ]
        .map(f64::to_bits),
        &summary.sketch,
    )
}

fn assert_same_summaries(decoded: &[WindowSummary], expected: &[WindowSummary]) {
    assert_eq!(decoded.len(), expected.len());
    for (decoded, expected) in decoded.iter().zip(expected) {
        assert_eq!(summary_bits(decoded), summary_bits(expected));
    }
}

fn batch_of(summaries: Vec<WindowSummary>, created_ms: i64) -> Batch {
    Batch {
        agent_id: "gw-0001".into(),
        batch_seq: 7,
        created_ms,
        series: Vec::new(),
        readings: Vec::new(),
        summaries,
    }
}

/// A sensor-like value: a decimal at 0 to 3 places, sometimes negative or zero.
fn decimal_value() -> impl Strategy<Value = f64> {
    (-100_000i64..100_000, 0u32..4)
        .prop_map(|(integer, scale)| integer as f64 / 10f64.powi(scale as i32))
}

fn any_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => decimal_value(),
        1 => any::<f64>().prop_filter("finite", |value| value.is_finite()),
        1 => Just(-0.0),
        1 => (1e-310f64..1e-300).prop_map(|value| value),
    ]
}

/// Summaries the agent builds: observe readings of one window.
fn observed_summary() -> impl Strategy<Value = WindowSummary> {
    (
        0u32..5_000,
        -5i64..5,
        prop::collection::vec((0i64..10_000, any_value()), 1..40),
    )
        .prop_map(|(series, window, points)| {
            let window_start_ms = 1_700_000_000_000 + window * 10_000;
            let mut summary = Summary::empty();
            for (offset_ms, value) in points {
                summary.observe(window_start_ms + offset_ms, value);
            }
            WindowSummary {
                series,
                window_start_ms,
                window_ms: 10_000,
                summary,
            }
        })
}

/// Anything the struct can hold: arbitrary bits in every field, a sketch unrelated to
/// them, the empty summary.
fn arbitrary_summary() -> impl Strategy<Value = WindowSummary> {
    (
        any::<u32>(),
        any::<i64>(),
        any::<u32>(),
        any::<u64>(),
        any::<[u64; 5]>(),
        any::<(i64, i64)>(),
        prop::collection::vec(any::<f64>(), 0..20),
        any::<bool>(),
    )
        .prop_map(
            |(series, window_start_ms, window_ms, count, bits, times, sketch_values, empty)| {
                let summary = if empty {
                    Summary::empty()
                } else {
                    let mut sketch = Sketch::new();
                    for value in sketch_values {
                        sketch.add(value);
                    }
                    let [sum, min, max, first_value, last_value] = bits.map(f64::from_bits);
                    Summary {
                        count,
                        sum,
                        min,
                        max,
                        first_time_ms: times.0,
                        first_value,
                        last_time_ms: times.1,
                        last_value,
                        sketch,
                    }
                };
                WindowSummary {
                    series,
                    window_start_ms,
                    window_ms,
                    summary,
                }
            },
        )
}

proptest! {
    #[test]
    fn observed_summaries_round_trip_bit_exact_in_both_formats(
        summaries in prop::collection::vec(observed_summary(), 0..30),
        created_ms in any::<i64>(),
    ) {
        let batch = batch_of(summaries, created_ms);
        for format_version in [OLDEST_FORMAT_VERSION, FORMAT_VERSION] {
            let encoded = encode_batch_as(&batch, format_version).expect("a supported format");
            prop_assert_eq!(batch_format_version(&encoded).unwrap(), format_version);
            let decoded = decode_batch(&encoded, &BatchLimits::default()).unwrap();
            assert_same_summaries(&decoded.summaries, &batch.summaries);
        }
    }

    #[test]
    fn arbitrary_summaries_round_trip_bit_exact(
        summaries in prop::collection::vec(arbitrary_summary(), 0..10),
        created_ms in any::<i64>(),
    ) {
        let batch = batch_of(summaries, created_ms);
        let decoded = decode_batch(&encode_batch(&batch), &BatchLimits::default()).unwrap();
        assert_same_summaries(&decoded.summaries, &batch.summaries);
    }

    #[test]
    fn transcoding_keeps_the_content(summaries in prop::collection::vec(observed_summary(), 0..10)) {
        let batch = batch_of(summaries, 1_700_000_000_000);
        let limits = BatchLimits::default();
        let old = transcode_batch(&encode_batch(&batch), OLDEST_FORMAT_VERSION, &limits).unwrap();
        prop_assert_eq!(batch_format_version(&old).unwrap(), OLDEST_FORMAT_VERSION);
        prop_assert_eq!(&old, &encode_batch_as(&batch, OLDEST_FORMAT_VERSION).expect("a supported format"));
        let new = transcode_batch(&old, FORMAT_VERSION, &limits).unwrap();
        prop_assert_eq!(new, encode_batch(&batch));
    }
}

/// A thousand 10 s windows of 1 Hz sensor data, like a gateway's summary batch.
fn realistic_summaries() -> Vec<WindowSummary> {
    let window_start_ms = 1_700_000_000_000;
    (0..1_000u32)
        .map(|series| {
            let level = 2_000 + i64::from(series) * 37 % 900;
            let mut summary = Summary::empty();
            for second in 0..10i64 {
                let noise = (i64::from(series) * 7 + second * 13) % 5 - 2;
                summary.observe(
                    window_start_ms + second * 1_000 + i64::from(series % 50),
                    (level + noise) as f64 / 100.0,
                );
            }
            WindowSummary {
                series,
                window_start_ms,
                window_ms: 10_000,
                summary,
            }
        })
        .collect()
}

#[test]
fn realistic_summaries_are_three_times_smaller_than_format_1_or_better() {
    let batch = batch_of(realistic_summaries(), 1_700_000_010_500);
    let compact = encode_batch(&batch).len();
    let postcard = encode_batch_as(&batch, OLDEST_FORMAT_VERSION)
        .expect("a supported format")
        .len();
    assert!(
        compact * 3 < postcard,
        "format 2: {compact} bytes, format 1: {postcard} bytes for 1,000 summaries"
    );
    assert!(compact < 6_000, "{compact} bytes for 1,000 summaries");
    let decoded = decode_batch(&encode_batch(&batch), &BatchLimits::default()).unwrap();
    assert_same_summaries(&decoded.summaries, &batch.summaries);
}

/// `fixtures/batch_format1_three_series.bin` is the fuzz seed `three_series.bin` as the
/// format 1 encoder wrote it (before format 2): 3 series, 30 readings, one summary.
#[test]
fn a_format_1_batch_from_an_older_build_still_decodes() {
    let fixture = include_bytes!("fixtures/batch_format1_three_series.bin");
    assert_eq!(batch_format_version(fixture).unwrap(), 1);
    let batch = decode_batch(fixture, &BatchLimits::default()).expect("format 1 decodes");
    assert_eq!(batch.agent_id, "gw-0017");
    assert_eq!((batch.series.len(), batch.readings.len()), (3, 30));
    let [window] = batch.summaries.as_slice() else {
        panic!("expected one summary, got {}", batch.summaries.len());
    };
    let summary = &window.summary;
    assert_eq!((window.window_ms, summary.count), (10_000, 10));
    assert_eq!((summary.min, summary.max), (21.5, 21.52));
    assert_eq!(summary.sketch.count(), 10);
    // The format 1 writer still produces exactly these bytes, and a round trip through
    // format 2 keeps every bit.
    assert_eq!(
        encode_batch_as(&batch, 1).expect("a supported format"),
        fixture.to_vec()
    );
    let upgraded =
        transcode_batch(fixture, FORMAT_VERSION, &BatchLimits::default()).expect("transcodes");
    assert_eq!(batch_format_version(&upgraded).unwrap(), FORMAT_VERSION);
    let again = decode_batch(&upgraded, &BatchLimits::default()).unwrap();
    assert_same_summaries(&again.summaries, &batch.summaries);
    assert_eq!(again.readings, batch.readings);
}

#[test]
fn an_unknown_format_is_refused_with_the_supported_range() {
    let mut encoded = encode_batch(&batch_of(realistic_summaries(), 0));
    encoded[1] = FORMAT_VERSION + 1;
    let error = decode_batch(&encoded, &BatchLimits::default()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&format!("versions 1 to {FORMAT_VERSION}")),
        "{error}"
    );
    assert!(BatchEncoder::default().set_format_version(0).is_err());
}
