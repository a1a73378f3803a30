//! Property tests of the batch codec: exact round trips, and untrusted bytes
//! (arbitrary, truncated, corrupted) that return errors instead of panicking.

use proptest::prelude::*;
use tributary_protocol::batch::dictionary::{series_ids_used, DictionaryError};
use tributary_protocol::batch::{
    decode_batch, decode_batch_header, encode_batch, replace_series_definitions, Batch, BatchError,
    BatchLimits, ReceiverSessionDictionary, SenderSessionDictionary,
};
use tributary_protocol::{Reading, SeriesDef, SeriesKey, Summary, WindowSummary};

fn any_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        // Quantised sensor values, the common case.
        (-100_000i64..100_000, 0u32..4)
            .prop_map(|(integer, scale)| integer as f64 / 10f64.powi(scale as i32)),
        // Anything at all, bit patterns included: NaN payloads, infinities, -0.0.
        any::<u64>().prop_map(f64::from_bits),
        Just(-0.0),
        Just(f64::NAN),
    ]
}

fn any_reading(series_count: u32) -> impl Strategy<Value = Reading> {
    (
        0..series_count,
        prop_oneof![1_700_000_000_000i64..1_700_000_100_000, any::<i64>()],
        any_value(),
        prop_oneof![3 => Just(0u8), 1 => any::<u8>()],
    )
        .prop_map(|(series, time_ms, value, flags)| Reading {
            series,
            time_ms,
            value,
            flags,
        })
}

fn any_summary() -> impl Strategy<Value = WindowSummary> {
    (
        0u32..20,
        any::<i64>(),
        1u32..3_600_000,
        prop::collection::vec((0i64..60_000, -1e6f64..1e6), 1..5),
    )
        .prop_map(|(series, window_start_ms, window_ms, points)| {
            let mut summary = Summary::from_reading(points[0].0, points[0].1);
            for (time_ms, value) in &points[1..] {
                summary.observe(*time_ms, *value);
            }
            WindowSummary {
                series,
                window_start_ms,
                window_ms,
                summary,
            }
        })
}

fn any_batch() -> impl Strategy<Value = Batch> {
    (
        "[a-z0-9-]{0,24}",
        any::<u64>(),
        any::<i64>(),
        prop::collection::vec((0u32..20, "[a-z]{1,8}", "[a-z_]{1,12}"), 0..4),
        prop::collection::vec(any_reading(20), 0..300),
        prop::collection::vec(any_summary(), 0..4),
    )
        .prop_map(
            |(agent_id, batch_seq, created_ms, defs, readings, summaries)| Batch {
                agent_id,
                batch_seq,
                created_ms,
                series: defs
                    .into_iter()
                    .map(|(id, device, metric)| SeriesDef {
                        id,
                        key: SeriesKey::new(device, metric).with_tags([("site", "north")]),
                    })
                    .collect(),
                readings,
                summaries,
            },
        )
}

/// Readings compare by bit pattern so that NaN and -0.0 count as round-tripping
/// only if they come back exactly.
fn reading_bits(readings: &[Reading]) -> Vec<(u32, i64, u64, u8)> {
    readings
        .iter()
        .map(|r| (r.series, r.time_ms, r.value.to_bits(), r.flags))
        .collect()
}

fn assert_same_batch(decoded: &Batch, expected: &Batch) {
    assert_eq!(decoded.agent_id, expected.agent_id);
    assert_eq!(decoded.batch_seq, expected.batch_seq);
    assert_eq!(decoded.created_ms, expected.created_ms);
    assert_eq!(decoded.series, expected.series);
    assert_eq!(
        reading_bits(&decoded.readings),
        reading_bits(&expected.readings)
    );
    assert_eq!(decoded.summaries, expected.summaries);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn round_trip_is_exact_in_canonical_order(batch in any_batch()) {
        let encoded = encode_batch(&batch);
        let decoded = decode_batch(&encoded, &BatchLimits::default()).expect("valid encoding decodes");
        let mut expected = batch.clone();
        expected.sort_readings();
        assert_same_batch(&decoded, &expected);
        // Canonical order is a fixed point: re-encoding gives the same bytes.
        prop_assert_eq!(encode_batch(&decoded), encoded);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_batch(&bytes, &BatchLimits::default());
        let _ = decode_batch_header(&bytes, &BatchLimits::default());
    }

    #[test]
    fn corrupted_encodings_never_panic(batch in any_batch(), position in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut encoded = encode_batch(&batch);
        let index = position.index(encoded.len());
        encoded[index] = byte;
        let _ = decode_batch(&encoded, &BatchLimits::default());
    }

    #[test]
    fn every_truncation_is_an_error(batch in any_batch()) {
        let encoded = encode_batch(&batch);
        for length in 0..encoded.len() {
            prop_assert!(decode_batch(&encoded[..length], &BatchLimits::default()).is_err(), "prefix of {} bytes decoded", length);
        }
    }

    #[test]
    fn replacing_definitions_keeps_everything_else(batch in any_batch()) {
        let encoded = encode_batch(&batch);
        let definitions = vec![SeriesDef { id: 7, key: SeriesKey::new("dev-0007", "humidity") }];
        let replaced = replace_series_definitions(&encoded, &definitions, &BatchLimits::default()).expect("valid encoding");
        let decoded = decode_batch(&replaced, &BatchLimits::default()).expect("replaced encoding decodes");
        let mut expected = batch.clone();
        expected.sort_readings();
        expected.series = definitions;
        assert_same_batch(&decoded, &expected);
    }
}

fn sample_batch(readings: usize) -> Batch {
    Batch {
        agent_id: "gateway-01".into(),
        batch_seq: 42,
        created_ms: 1_700_000_000_000,
        series: vec![SeriesDef {
            id: 1,
            key: SeriesKey::new("dev-0001", "temperature"),
        }],
        readings: (0..readings)
            .map(|index| Reading {
                series: 1,
                time_ms: 1_700_000_000_000 + index as i64 * 1000,
                value: 21.5 + (index % 7) as f64 * 0.01,
                flags: 0,
            })
            .collect(),
        summaries: Vec::new(),
    }
}

#[test]
fn declared_counts_over_limit_are_refused_before_allocating() {
    let encoded = encode_batch(&sample_batch(1000));
    let limits = BatchLimits {
        max_readings: 999,
        ..BatchLimits::default()
    };
    let error = decode_batch(&encoded, &limits).expect_err("over the reading limit");
    assert!(
        matches!(
            error,
            BatchError::OverLimit {
                what: "readings",
                declared: 1000,
                limit: 999
            }
        ),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        "batch declares 1000 readings, limit is 999"
    );

    let limits = BatchLimits {
        max_body_bytes: 10,
        ..BatchLimits::default()
    };
    assert!(matches!(
        decode_batch(&encoded, &limits),
        Err(BatchError::OverLimit {
            what: "body bytes",
            ..
        })
    ));
    let limits = BatchLimits {
        max_encoded_bytes: 10,
        ..BatchLimits::default()
    };
    assert!(matches!(
        decode_batch(&encoded, &limits),
        Err(BatchError::OverLimit {
            what: "encoded bytes",
            ..
        })
    ));
}

#[test]
fn decimal_values_compress_to_about_a_byte_or_less() {
    let batch = sample_batch(600);
    let encoded = encode_batch(&batch);
    assert!(
        encoded.len() < 600,
        "600 quantised readings took {} bytes",
        encoded.len()
    );
}

#[test]
fn header_reads_without_the_body() {
    let header = decode_batch_header(&encode_batch(&sample_batch(10)), &BatchLimits::default())
        .expect("valid");
    assert_eq!(
        (
            header.agent_id.as_str(),
            header.batch_seq,
            header.reading_count
        ),
        ("gateway-01", 42, 10)
    );
}

#[test]
fn session_dictionaries_resolve_and_name_unknown_ids() {
    let mut batch = sample_batch(3);
    let mut sender = SenderSessionDictionary::new();
    let mut receiver = ReceiverSessionDictionary::new(10);
    assert_eq!(sender.definitions_needed(&series_ids_used(&batch)), vec![1]);

    receiver.accept(&batch).expect("batch defines what it uses");
    sender.confirm(batch.series.iter().map(|def| def.id));
    assert!(sender
        .definitions_needed(&series_ids_used(&batch))
        .is_empty());

    batch.series.clear();
    receiver
        .accept(&batch)
        .expect("id 1 known from earlier in the session");
    assert_eq!(
        receiver.key(1).map(|key| key.metric.as_str()),
        Some("temperature")
    );

    batch.readings[0].series = 9;
    let error = receiver.accept(&batch).expect_err("id 9 never defined");
    assert_eq!(error, DictionaryError::UnknownSeries { id: 9 });
    assert!(error.to_string().contains("series id 9"));

    batch.series = vec![SeriesDef {
        id: 1,
        key: SeriesKey::new("dev-0001", "pressure"),
    }];
    assert!(matches!(
        receiver.accept(&batch),
        Err(DictionaryError::ConflictingDefinition { id: 1, .. })
    ));

    receiver.reset();
    batch.series.clear();
    batch.readings[0].series = 1;
    assert_eq!(
        receiver.accept(&batch),
        Err(DictionaryError::UnknownSeries { id: 1 })
    );
}

#[test]
fn receiver_dictionary_is_bounded() {
    let mut receiver = ReceiverSessionDictionary::new(1);
    let mut batch = sample_batch(0);
    batch.series.push(SeriesDef {
        id: 2,
        key: SeriesKey::new("dev-0002", "temperature"),
    });
    assert!(matches!(
        receiver.accept(&batch),
        Err(DictionaryError::TooManySeries {
            would_know: 2,
            limit: 1
        })
    ));
    assert!(receiver.is_empty());
}

#[test]
fn a_reused_decoder_decodes_each_batch_independently() {
    let mut decoder = tributary_protocol::batch::BatchDecoder::new();
    let limits = BatchLimits::default();
    let large = encode_batch(&sample_batch(5000));
    let small = encode_batch(&sample_batch(3));
    assert_eq!(
        decoder
            .decode(&large, &limits)
            .expect("valid")
            .readings
            .len(),
        5000
    );
    assert!(decoder.decode(&large[..large.len() / 2], &limits).is_err());
    assert_eq!(
        decoder
            .decode(&small, &limits)
            .expect("valid")
            .readings
            .len(),
        3
    );
    assert_eq!(
        decoder.decode(&large, &limits).expect("valid"),
        decode_batch(&large, &limits).expect("valid")
    );
}
