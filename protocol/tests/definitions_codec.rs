//! The compact series definitions of batch format 3: exact round trips for any definition
//! list (through encoding, `replace_series_definitions` and `transcode_batch` between
//! formats 2 and 3), the size a real fleet's dictionary takes against format 2, and format 2
//! still decoding (a fixture written by the previous build).

use proptest::prelude::*;
use tributary_protocol::batch::{
    batch_format_version, decode_batch, encode_batch, encode_batch_as, replace_series_definitions,
    series_definitions_bytes, transcode_batch, Batch, BatchLimits, FORMAT_VERSION,
};
use tributary_protocol::{Reading, SeriesDef, SeriesId, SeriesKey};

fn batch_with(series: Vec<SeriesDef>) -> Batch {
    let readings = series
        .iter()
        .map(|definition| Reading {
            series: definition.id,
            time_ms: 1_700_000_000_000,
            value: 21.5,
            flags: 0,
        })
        .collect();
    let mut batch = Batch {
        agent_id: "gw-0017".into(),
        batch_seq: 11,
        created_ms: 1_700_000_000_250,
        series,
        readings,
        summaries: Vec::new(),
    };
    batch.sort_readings();
    batch
}

/// What the `bench e2e` fleet announces: 100 devices x 10 metrics, a site tag, ids in the
/// order the agent met them.
fn fleet_definitions(devices: usize) -> Vec<SeriesDef> {
    const METRICS: [&str; 10] = [
        "temperature",
        "humidity",
        "pressure",
        "co2",
        "vibration",
        "power",
        "voltage",
        "current",
        "energy",
        "signal_strength",
    ];
    const SITES: [&str; 3] = ["plant-north", "plant-south", "warehouse"];
    let mut series = Vec::new();
    for device in 0..devices {
        for metric in METRICS {
            series.push(SeriesDef {
                id: series.len() as SeriesId,
                key: SeriesKey::new(format!("dev-{device:04}"), metric)
                    .with_tags([("site", SITES[device % SITES.len()])]),
            });
        }
    }
    series
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        // Few distinct values, so strings repeat as in a real fleet.
        3 => prop::sample::select(vec!["dev-1", "dev-2", "temperature", "site", "plant-a", ""])
            .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn definition() -> impl Strategy<Value = SeriesDef> {
    (
        any::<SeriesId>(),
        text(),
        text(),
        prop::collection::vec((text(), text()), 0..4),
    )
        .prop_map(|(id, device_id, metric, tags)| SeriesDef {
            id,
            // Tags as given (unsorted, repeated names): the codec must not care.
            key: SeriesKey {
                device_id,
                metric,
                tags,
            },
        })
}

proptest! {
    #[test]
    fn any_definitions_round_trip_in_format_3(series in prop::collection::vec(definition(), 0..60)) {
        let batch = Batch { readings: Vec::new(), ..batch_with(series) };
        let encoded = encode_batch(&batch);
        prop_assert_eq!(batch_format_version(&encoded).unwrap(), 3);
        let decoded = decode_batch(&encoded, &BatchLimits::default()).unwrap();
        prop_assert_eq!(&decoded, &batch);
    }

    #[test]
    fn formats_2_and_3_transcode_both_ways_keeping_the_body(
        series in prop::collection::vec(definition(), 0..30),
    ) {
        let limits = BatchLimits::default();
        let batch = Batch { readings: Vec::new(), ..batch_with(series.clone()) };
        let format_2 = encode_batch_as(&batch, 2).expect("a supported format");
        let format_3 = encode_batch(&batch);
        prop_assert_eq!(&transcode_batch(&format_2, 3, &limits).unwrap(), &format_3);
        prop_assert_eq!(&transcode_batch(&format_3, 2, &limits).unwrap(), &format_2);
        // Definitions attached at send time go in the batch's own format.
        let bare = encode_batch(&Batch { series: Vec::new(), ..batch.clone() });
        let attached = replace_series_definitions(&bare, &series, &limits).unwrap();
        prop_assert_eq!(&attached, &format_3);
    }

    #[test]
    fn corrupt_definitions_are_errors_not_panics(
        series in prop::collection::vec(definition(), 1..20),
        position in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut encoded = encode_batch(&batch_with(series));
        let index = position.index(encoded.len());
        encoded[index] = byte;
        let _ = decode_batch(&encoded, &BatchLimits::default());
    }
}

#[test]
fn a_fleet_dictionary_is_thirty_times_smaller_than_in_format_2() {
    let series = fleet_definitions(100);
    let batch = batch_with(series.clone());
    let limits = BatchLimits::default();
    let format_3 = series_definitions_bytes(&encode_batch(&batch), &limits).unwrap();
    let format_2 = series_definitions_bytes(
        &encode_batch_as(&batch, 2).expect("a supported format"),
        &limits,
    )
    .unwrap();
    // Measured: format 2 37,112 bytes, format 3 a few hundred.
    assert!(
        format_3 * 30 < format_2,
        "1,000 definitions: format 3 {format_3} bytes, format 2 {format_2} bytes"
    );
    assert!(format_3 < 1_200, "1,000 definitions: {format_3} bytes");
    let decoded = decode_batch(&encode_batch(&batch), &limits).unwrap();
    assert_eq!(decoded.series, series);
}

#[test]
fn one_new_series_mid_session_costs_a_few_bytes_more_than_postcard_at_most() {
    let series = vec![SeriesDef {
        id: 1_000,
        key: SeriesKey::new("bench-marker", "freshness").with_tags([("site", "bench")]),
    }];
    let batch = batch_with(series);
    let limits = BatchLimits::default();
    let format_3 = series_definitions_bytes(&encode_batch(&batch), &limits).unwrap();
    let format_2 = series_definitions_bytes(
        &encode_batch_as(&batch, 2).expect("a supported format"),
        &limits,
    )
    .unwrap();
    // No zstd frame for so little, but the section header (compression, size), the
    // string count and four column lengths: 48 bytes against postcard's 37.
    assert!(
        format_3 <= format_2 + 12,
        "format 3 {format_3}, format 2 {format_2}"
    );
}

/// `fixtures/batch_format2_three_series.bin` is the fuzz seed `three_series.bin` as the
/// format 2 encoder wrote it (before format 3): 3 series, 30 readings, one summary.
#[test]
fn a_format_2_batch_from_an_older_build_still_decodes_and_upgrades() {
    let fixture = include_bytes!("fixtures/batch_format2_three_series.bin");
    let limits = BatchLimits::default();
    assert_eq!(batch_format_version(fixture).unwrap(), 2);
    let batch = decode_batch(fixture, &limits).expect("format 2 decodes");
    assert_eq!(batch.agent_id, "gw-0017");
    assert_eq!(
        (
            batch.series.len(),
            batch.readings.len(),
            batch.summaries.len()
        ),
        (3, 30, 1)
    );
    assert_eq!(batch.series[2].key.device_id, "dev-2");
    assert_eq!(
        encode_batch_as(&batch, 2).expect("a supported format"),
        fixture.to_vec()
    );
    let upgraded = transcode_batch(fixture, FORMAT_VERSION, &limits).expect("transcodes");
    assert_eq!(batch_format_version(&upgraded).unwrap(), FORMAT_VERSION);
    assert_eq!(decode_batch(&upgraded, &limits).unwrap(), batch);
    assert_eq!(
        transcode_batch(&upgraded, 2, &limits).unwrap(),
        fixture.to_vec()
    );
}
