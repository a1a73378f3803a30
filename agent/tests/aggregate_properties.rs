//! Property tests of the aggregation stage: arrival order within the allowed disorder does
//! not change the summaries, later arrivals only split windows into mergeable partials,
//! and encoded batches are self-contained.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tributary_agent::aggregate::{
    AggregateOutput, AggregationStage, BatchCutter, SeriesRegistry, WindowAggregator, WindowConfig,
    NOT_JOURNALED,
};
use tributary_agent::buffer::BatchClass;
use tributary_agent::config::RawPolicy;
use tributary_protocol::batch::{decode_batch, BatchLimits};
use tributary_protocol::model::{Reading, SeriesKey};
use tributary_protocol::Summary;

const WINDOW_MS: u64 = 1_000;
const DISORDER_MS: i64 = 500;

fn config() -> WindowConfig {
    WindowConfig {
        window_ms: WINDOW_MS,
        allowed_disorder_ms: DISORDER_MS,
        idle_timeout_ms: i64::MAX,
        series_evict_after_ms: i64::MAX,
        raw: RawPolicy::None,
    }
}

/// Readings (series, time, integer value: sums stay exact in any order) with an arrival jitter.
fn readings_with_jitter() -> impl Strategy<Value = Vec<(Reading, i64)>> {
    prop::collection::vec(
        (0u32..3, -3_000i64..20_000, -50i32..50, 0..=DISORDER_MS),
        1..200,
    )
    .prop_map(|items| {
        items
            .into_iter()
            .map(|(series, time_ms, value, jitter)| {
                (
                    Reading {
                        series,
                        time_ms,
                        value: f64::from(value),
                        flags: 0,
                    },
                    jitter,
                )
            })
            .collect()
    })
}

/// The reference: summarise each window's readings in event-time order.
fn reference(readings: &[Reading]) -> BTreeMap<(u32, i64), Summary> {
    let mut sorted = readings.to_vec();
    sorted.sort_by_key(|reading| (reading.series, reading.time_ms));
    let mut windows: BTreeMap<(u32, i64), Summary> = BTreeMap::new();
    for reading in sorted {
        let start = config().window_start_ms(reading.time_ms);
        windows
            .entry((reading.series, start))
            .or_insert_with(Summary::empty)
            .observe(reading.time_ms, reading.value);
    }
    windows
}

fn run(arrivals: &[Reading]) -> (AggregateOutput, u64) {
    let mut aggregator = WindowAggregator::new(config());
    let mut out = AggregateOutput::default();
    for (index, reading) in arrivals.iter().enumerate() {
        aggregator.observe(*reading, index as u64, 0, &mut out);
    }
    aggregator.close_all(&mut out);
    assert_eq!(aggregator.open_windows(), 0);
    (out, aggregator.counters().late_readings)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn disorder_within_allowance_gives_reference_summaries(items in readings_with_jitter()) {
        let readings: Vec<Reading> = items.iter().map(|(reading, _)| *reading).collect();
        let mut arrivals = items.clone();
        // Arrival order by time + jitter: every reading arrives no more than DISORDER_MS
        // behind the newest event time already seen.
        arrivals.sort_by_key(|(reading, jitter)| reading.time_ms + jitter);
        let arrivals: Vec<Reading> = arrivals.into_iter().map(|(reading, _)| reading).collect();
        let (out, late) = run(&arrivals);
        prop_assert_eq!(late, 0);
        let mut emitted: BTreeMap<(u32, i64), Summary> = BTreeMap::new();
        for closed in &out.closed {
            let previous = emitted.insert((closed.summary.series, closed.summary.window_start_ms), closed.summary.summary.clone());
            prop_assert!(previous.is_none(), "window {:?} emitted twice", closed.summary);
            prop_assert_eq!(closed.summary.window_ms as u64, WINDOW_MS);
        }
        prop_assert_eq!(emitted, reference(&readings));
    }

    #[test]
    fn any_arrival_order_merges_to_reference(items in readings_with_jitter(), order in prop::collection::vec(any::<u32>(), 200)) {
        let readings: Vec<Reading> = items.iter().map(|(reading, _)| *reading).collect();
        let mut arrivals: Vec<(u32, Reading)> = readings.iter().enumerate().map(|(index, reading)| (order[index], *reading)).collect();
        arrivals.sort_by_key(|(key, _)| *key);
        let arrivals: Vec<Reading> = arrivals.into_iter().map(|(_, reading)| reading).collect();
        let (out, _) = run(&arrivals);
        let mut merged: BTreeMap<(u32, i64), Summary> = BTreeMap::new();
        for closed in &out.closed {
            merged.entry((closed.summary.series, closed.summary.window_start_ms)).or_insert_with(Summary::empty).merge(&closed.summary.summary);
        }
        let expected = reference(&readings);
        prop_assert_eq!(merged.len(), expected.len());
        for (window, summary) in &expected {
            let got = &merged[window];
            prop_assert_eq!((got.count, got.sum, got.min, got.max), (summary.count, summary.sum, summary.min, summary.max));
            prop_assert_eq!((got.first_time_ms, got.last_time_ms), (summary.first_time_ms, summary.last_time_ms));
        }
    }
}

#[test]
fn stage_cuts_separate_self_contained_batches() {
    let mut stage =
        AggregationStage::new(SeriesRegistry::in_memory(), BatchCutter::new(1_000, 1_000));
    let source = stage.add_source(WindowConfig::new(1_000, RawPolicy::All));
    let mut cut = Vec::new();
    let keys = [
        SeriesKey::new("dev-1", "temp"),
        SeriesKey::new("dev-2", "temp").with_tags([("site", "a")]),
    ];
    for time_ms in 0..50i64 {
        for key in &keys {
            stage
                .observe(
                    source,
                    key,
                    1_700_000_000_000 + time_ms * 100,
                    time_ms as f64,
                    0,
                    NOT_JOURNALED,
                    time_ms,
                    &mut cut,
                )
                .expect("observe");
        }
    }
    stage.close_all(100, &mut cut);
    let raw: Vec<_> = cut
        .iter()
        .filter(|batch| batch.class == BatchClass::Raw)
        .collect();
    let summaries: Vec<_> = cut
        .iter()
        .filter(|batch| batch.class == BatchClass::Summary)
        .collect();
    assert_eq!(
        raw.iter().map(|batch| batch.readings.len()).sum::<usize>(),
        100
    );
    assert!(raw.iter().all(|batch| batch.summaries.is_empty()));
    assert!(summaries.iter().all(|batch| batch.readings.is_empty()));
    assert_eq!(
        summaries
            .iter()
            .flat_map(|batch| &batch.summaries)
            .map(|summary| summary.summary.count)
            .sum::<u64>(),
        100
    );
    for (index, batch) in cut.into_iter().enumerate() {
        let (bytes, info) = stage.encode(batch, "gw-1", index as u64, 5, true);
        let decoded = decode_batch(&bytes, &BatchLimits::default()).expect("decode");
        assert_eq!(decoded.batch_seq, index as u64);
        assert_eq!(
            info.reading_count as usize,
            decoded.readings.len() + decoded.summaries.len()
        );
        for id in tributary_protocol::batch::series_ids_used(&decoded) {
            assert!(
                decoded.series.iter().any(|def| def.id == id),
                "batch uses series {id} without defining it"
            );
        }
    }
}
