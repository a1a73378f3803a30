//! `BatchDecoder::series_usage`: the ids-and-definitions reader a sender uses to attach
//! definitions at send time must agree with the full decoder, and must refuse damaged
//! bytes with an error, never a panic.

use proptest::prelude::*;
use tributary_protocol::batch::{series_ids_used, BatchDecoder, BatchLimits};
use tributary_protocol::{
    encode_batch, Batch, Reading, SeriesDef, SeriesKey, Summary, WindowSummary,
};

fn any_batch() -> impl Strategy<Value = Batch> {
    (
        prop::collection::vec(0u32..5_000, 0..4),
        prop::collection::vec(
            (
                prop_oneof![0u32..50, Just(u32::MAX), any::<u32>()],
                1_700_000_000_000i64..1_700_000_100_000,
                -1e3f64..1e3,
            ),
            0..300,
        ),
        prop::collection::vec((0u32..50, -1e3f64..1e3), 0..4),
    )
        .prop_map(|(defined, readings, summaries)| Batch {
            agent_id: "gw".to_owned(),
            batch_seq: 7,
            created_ms: 1_700_000_000_000,
            series: defined
                .into_iter()
                .map(|id| SeriesDef {
                    id,
                    key: SeriesKey::new(format!("dev-{id}"), "temp"),
                })
                .collect(),
            readings: readings
                .into_iter()
                .map(|(series, time_ms, value)| Reading {
                    series,
                    time_ms,
                    value,
                    flags: 0,
                })
                .collect(),
            summaries: summaries
                .into_iter()
                .map(|(series, value)| WindowSummary {
                    series,
                    window_start_ms: 1_700_000_000_000,
                    window_ms: 10_000,
                    summary: Summary::from_reading(1_700_000_000_000, value),
                })
                .collect(),
        })
}

proptest! {
    #[test]
    fn agrees_with_the_full_decoder(batch in any_batch()) {
        let encoded = encode_batch(&batch);
        let usage = BatchDecoder::new()
            .series_usage(&encoded, &BatchLimits::default())
            .expect("an encoded batch reads back");
        prop_assert_eq!(usage.defined, batch.series.clone());
        prop_assert_eq!(usage.used, series_ids_used(&batch));
    }

    #[test]
    fn damaged_bytes_never_panic(
        batch in any_batch(),
        cut in any::<prop::sample::Index>(),
        flip in any::<(prop::sample::Index, u8)>(),
    ) {
        let encoded = encode_batch(&batch);
        let mut decoder = BatchDecoder::new();
        let limits = BatchLimits::default();
        let truncated = &encoded[..cut.index(encoded.len().max(1)).min(encoded.len())];
        let _ = decoder.series_usage(truncated, &limits);
        let mut corrupted = encoded.clone();
        if !corrupted.is_empty() {
            let at = flip.0.index(corrupted.len());
            corrupted[at] ^= flip.1 | 1;
        }
        let _ = decoder.series_usage(&corrupted, &limits);
    }
}
