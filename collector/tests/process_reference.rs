//! The window engine against a brute-force reference.
//!
//! Generated streams from several agents (clocks hours apart) with out-of-order, late,
//! very late, far-future, duplicated and backlogged batches go through the engine in
//! log order. The reference groups every item that was sent exactly by (agent, series,
//! resolution, window) and leaves out exactly the items the engine reported late for that
//! resolution. Then, for every window: count, min, max, first and last equal, the sum
//! within 1e-9 relative, the sketch's buckets equal and quantiles within the sketch's
//! error of the true values; and per resolution, on-time + late + refused = everything
//! sent, nothing lost and nothing counted twice. Deterministic scenarios cover backfill,
//! silent and idle agents, lateness re-emission and re-derivation of coarse windows.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use tributary_collector::process::{
    coarsen, EngineConfig, EngineOutput, IngestOutcome, LateItem, LateReason, RollupSource,
    WindowEngine, WindowResult, FINAL_VERSION_BIT,
};
use tributary_protocol::{Batch, Reading, SeriesDef, SeriesKey, Summary, WindowSummary};

const BASE_MS: i64 = 1_700_000_000_000;
const HOUR_MS: i64 = 3_600_000;
const EDGE_WINDOW_MS: i64 = 10_000;

fn config(source: RollupSource) -> EngineConfig {
    EngineConfig {
        resolutions_ms: vec![20_000, 60_000, 300_000],
        rollup_source: source,
        out_of_orderness_ms: 5_000,
        allowed_lateness_ms: 30_000,
        emit_interval_ms: 1_000,
        idle_timeout_ms: 600_000,
        sequence_gap_timeout_ms: 30_000,
        max_event_time_ahead_ms: HOUR_MS,
        ..EngineConfig::default()
    }
}

fn series_key(agent: usize, series: u32) -> SeriesKey {
    SeriesKey::new(format!("agent{agent}-device{series}"), "temperature")
        .with_tags([("site", "north")])
}

/// One generated batch before delivery: what the agent created.
#[derive(Debug, Clone)]
struct Created {
    agent: usize,
    seq: u64,
    created_ms: i64,
    readings: Vec<Reading>,
}

/// A sent item, as the reference sees it: the rolled-up input plus the raw readings it
/// stands for (one for a raw reading, many for an edge summary).
#[derive(Debug, Clone)]
struct SentItem {
    agent_id: String,
    batch_seq: u64,
    series: SeriesKey,
    /// Event time used for window assignment (reading time or summary window start).
    assign_ms: i64,
    summary: Summary,
    values: Vec<f64>,
}

fn build_batch(created: &Created, source: RollupSource, misaligned_every: u64) -> Batch {
    let mut series_ids: Vec<u32> = created
        .readings
        .iter()
        .map(|reading| reading.series)
        .collect();
    series_ids.sort_unstable();
    series_ids.dedup();
    let definitions = series_ids
        .iter()
        .map(|id| SeriesDef {
            id: *id,
            key: series_key(created.agent, *id),
        })
        .collect();
    let mut batch = Batch {
        agent_id: format!("agent-{}", created.agent),
        batch_seq: created.seq,
        created_ms: created.created_ms,
        series: definitions,
        readings: Vec::new(),
        summaries: Vec::new(),
    };
    match source {
        RollupSource::RawReadings => batch.readings = created.readings.clone(),
        RollupSource::EdgeSummaries => {
            // Edge summaries per (series, edge window); some batches use a misaligned width.
            let width_ms = if misaligned_every > 0 && created.seq % misaligned_every == 0 {
                7_000
            } else {
                EDGE_WINDOW_MS
            };
            let mut windows: BTreeMap<(u32, i64), Summary> = BTreeMap::new();
            for reading in &created.readings {
                let start = reading.time_ms - reading.time_ms.rem_euclid(width_ms);
                windows
                    .entry((reading.series, start))
                    .or_default()
                    .observe(reading.time_ms, reading.value);
            }
            batch.summaries = windows
                .into_iter()
                .map(|((series, window_start_ms), summary)| WindowSummary {
                    series,
                    window_start_ms,
                    window_ms: width_ms as u32,
                    summary,
                })
                .collect();
            // Raw readings ride along in the same stream; they must not count twice.
            batch.readings = created.readings.iter().take(2).copied().collect();
        }
    }
    batch
}

fn sent_items(batch: &Batch, source: RollupSource) -> Vec<SentItem> {
    let key_of = |id: u32| {
        batch
            .series
            .iter()
            .find(|def| def.id == id)
            .map(|def| def.key.clone())
            .unwrap()
    };
    match source {
        RollupSource::RawReadings => batch
            .readings
            .iter()
            .map(|reading| SentItem {
                agent_id: batch.agent_id.clone(),
                batch_seq: batch.batch_seq,
                series: key_of(reading.series),
                assign_ms: reading.time_ms,
                summary: Summary::from_reading(reading.time_ms, reading.value),
                values: vec![reading.value],
            })
            .collect(),
        RollupSource::EdgeSummaries => batch
            .summaries
            .iter()
            .map(|edge| SentItem {
                agent_id: batch.agent_id.clone(),
                batch_seq: batch.batch_seq,
                series: key_of(edge.series),
                assign_ms: edge.window_start_ms,
                summary: edge.summary.clone(),
                values: Vec::new(),
            })
            .collect(),
    }
}

/// Identity of a sent or late item, for multiset matching.
type ItemId = (String, u64, SeriesKey, i64, u64, u64);

fn item_id(
    agent_id: &str,
    batch_seq: u64,
    series: &SeriesKey,
    assign_ms: i64,
    summary: &Summary,
) -> ItemId {
    (
        agent_id.to_owned(),
        batch_seq,
        series.clone(),
        assign_ms,
        summary.count,
        summary.sum.to_bits(),
    )
}

fn late_item_id(late: &tributary_collector::process::LateReading) -> ItemId {
    match &late.item {
        LateItem::Reading { time_ms, value } => item_id(
            &late.agent_id,
            late.batch_seq,
            &late.series,
            *time_ms,
            &Summary::from_reading(*time_ms, *value),
        ),
        LateItem::Summary {
            window_start_ms,
            summary,
            ..
        } => item_id(
            &late.agent_id,
            late.batch_seq,
            &late.series,
            *window_start_ms,
            summary,
        ),
    }
}

type WindowId = (String, SeriesKey, i64, i64);

fn window_id(result: &WindowResult) -> WindowId {
    (
        result.agent_id.to_string(),
        SeriesKey::clone(&result.series),
        result.resolution_ms,
        result.window_start_ms,
    )
}

/// Feeds deliveries `(log time, batch)` in order; returns the concatenated output and the
/// outcome of each delivery.
fn run(
    engine: &mut WindowEngine,
    deliveries: &[(i64, Batch)],
) -> (EngineOutput, Vec<IngestOutcome>) {
    let mut output = EngineOutput::default();
    let mut outcomes = Vec::new();
    for (now_ms, batch) in deliveries {
        outcomes.push(
            engine
                .ingest_batch(batch, *now_ms, &mut output)
                .expect("generated batches are valid"),
        );
    }
    (output, outcomes)
}

fn assert_close_sum(actual: f64, expected: f64, context: &str) {
    let scale = expected.abs().max(1e-300);
    assert!(
        (actual - expected).abs() / scale <= 1e-9 || (actual - expected).abs() <= 1e-9,
        "{context}: sum {actual} vs {expected}"
    );
}

/// Checks the engine's whole output against the brute-force reference. `unique` are the
/// batches that were delivered, each once.
fn check_against_reference(
    config: &EngineConfig,
    unique_batches: &[Batch],
    output: &EngineOutput,
) -> Result<(), TestCaseError> {
    let source = config.rollup_source;
    // Late (and refused) items per resolution, as multisets.
    let mut late_by_resolution: HashMap<Option<i64>, HashMap<ItemId, u64>> = HashMap::new();
    for late in &output.late {
        *late_by_resolution
            .entry(late.resolution_ms)
            .or_default()
            .entry(late_item_id(late))
            .or_default() += 1;
    }
    let refused = late_by_resolution.remove(&None).unwrap_or_default();
    let mut sent_worth = 0u64;
    let mut refused_worth = 0u64;
    let mut reference: BTreeMap<WindowId, (Summary, Vec<f64>)> = BTreeMap::new();
    let mut late_worth: HashMap<i64, u64> = HashMap::new();
    let mut remaining_late = late_by_resolution.clone();
    let mut remaining_refused = refused.clone();
    for batch in unique_batches {
        for item in sent_items(batch, source) {
            sent_worth += item.summary.count;
            let id = item_id(
                &item.agent_id,
                item.batch_seq,
                &item.series,
                item.assign_ms,
                &item.summary,
            );
            if let Some(count) = remaining_refused.get_mut(&id).filter(|count| **count > 0) {
                *count -= 1;
                refused_worth += item.summary.count;
                continue;
            }
            for resolution_ms in &config.resolutions_ms {
                if let Some(count) = remaining_late
                    .get_mut(&Some(*resolution_ms))
                    .and_then(|late| late.get_mut(&id))
                    .filter(|count| **count > 0)
                {
                    *count -= 1;
                    *late_worth.entry(*resolution_ms).or_default() += item.summary.count;
                    continue;
                }
                let start = item.assign_ms - item.assign_ms.rem_euclid(*resolution_ms);
                let entry = reference
                    .entry((
                        item.agent_id.clone(),
                        item.series.clone(),
                        *resolution_ms,
                        start,
                    ))
                    .or_insert_with(|| (Summary::empty(), Vec::new()));
                entry.0.merge(&item.summary);
                entry.1.extend_from_slice(&item.values);
            }
        }
    }
    // Every late report matched a sent item: nothing reported late that was not sent.
    for (resolution, items) in remaining_late.iter().chain([(&None, &remaining_refused)]) {
        for (id, count) in items {
            prop_assert_eq!(
                *count,
                0,
                "late report at {:?} matches no sent item: {:?}",
                resolution,
                id
            );
        }
    }

    // Emissions: per window, versions increase, exactly one final, nothing after it.
    let mut finals: BTreeMap<WindowId, &WindowResult> = BTreeMap::new();
    let mut last_version: HashMap<WindowId, u64> = HashMap::new();
    for result in &output.results {
        let id = window_id(result);
        prop_assert!(
            !finals.contains_key(&id),
            "emission after the final result of {:?}",
            id
        );
        if let Some(previous) = last_version.get(&id) {
            prop_assert!(
                result.version > *previous,
                "version did not increase for {:?}",
                id
            );
        }
        last_version.insert(id.clone(), result.version);
        prop_assert_eq!(result.is_final, result.version & FINAL_VERSION_BIT != 0);
        prop_assert_eq!(result.version & !FINAL_VERSION_BIT, result.summary.count);
        if result.is_final {
            finals.insert(id, result);
        }
    }
    // A window reported late for was closed: no emission of it follows the report. The
    // output interleaves results and late rows per call, so check against finals only:
    // every late report names a window that is final (or was never opened).
    for late in &output.late {
        if let (Some(resolution_ms), Some(start), LateReason::WindowClosed) =
            (late.resolution_ms, late.window_start_ms, late.reason)
        {
            let id = (
                late.agent_id.to_string(),
                SeriesKey::clone(&late.series),
                resolution_ms,
                start,
            );
            if last_version.contains_key(&id) {
                prop_assert!(
                    finals.contains_key(&id),
                    "late report for a window never finalised: {:?}",
                    id
                );
            }
        }
    }

    prop_assert_eq!(
        finals.len(),
        reference.len(),
        "windows with a final result vs reference windows"
    );
    for (id, (expected, values)) in &reference {
        let Some(actual) = finals.get(id) else {
            return Err(TestCaseError::fail(format!("no final result for {id:?}")));
        };
        let actual = &actual.summary;
        prop_assert_eq!(actual.count, expected.count, "count of {:?}", id);
        prop_assert_eq!(
            actual.min.to_bits(),
            expected.min.to_bits(),
            "min of {:?}",
            id
        );
        prop_assert_eq!(
            actual.max.to_bits(),
            expected.max.to_bits(),
            "max of {:?}",
            id
        );
        prop_assert_eq!(
            (actual.first_time_ms, actual.first_value.to_bits()),
            (expected.first_time_ms, expected.first_value.to_bits())
        );
        prop_assert_eq!(
            (actual.last_time_ms, actual.last_value.to_bits()),
            (expected.last_time_ms, expected.last_value.to_bits())
        );
        assert_close_sum(actual.sum, expected.sum, &format!("{id:?}"));
        prop_assert_eq!(&actual.sketch, &expected.sketch, "sketch of {:?}", id);
        if !values.is_empty() {
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            for q in [0.1, 0.5, 0.9, 0.99] {
                let truth = sorted[(q * (sorted.len() - 1) as f64).floor() as usize];
                let estimate = actual.quantile(q).unwrap();
                prop_assert!(
                    (estimate - truth).abs() <= 0.01 * truth.abs() + 1e-12,
                    "q{} of {:?}: {} vs {}",
                    q,
                    id,
                    estimate,
                    truth
                );
            }
        }
    }

    // Accounting per resolution: on-time + late + refused = everything sent.
    for resolution_ms in &config.resolutions_ms {
        let on_time: u64 = finals
            .iter()
            .filter(|((_, _, resolution, _), _)| resolution == resolution_ms)
            .map(|(_, result)| result.summary.count)
            .sum();
        let late = late_worth.get(resolution_ms).copied().unwrap_or(0);
        prop_assert_eq!(
            on_time + late + refused_worth,
            sent_worth,
            "resolution {}",
            resolution_ms
        );
    }
    Ok(())
}

/// Generates agents' batches and a delivery schedule with delays, backlog and duplicates.
fn stream_strategy() -> impl Strategy<Value = (Vec<Created>, Vec<(usize, i64)>)> {
    let agent = (1u32..=3, 3usize..25, any::<u64>());
    (prop::collection::vec(agent, 1..=3), any::<u64>()).prop_map(|(agents, delivery_seed)| {
        let mut created = Vec::new();
        for (agent_index, (series_count, batch_count, seed)) in agents.into_iter().enumerate() {
            let mut rng = SplitMix(seed);
            let mut clock_ms =
                BASE_MS + agent_index as i64 * 3 * HOUR_MS + rng.below(60_000) as i64;
            let first_seq = 1 + rng.below(1_000);
            for index in 0..batch_count {
                clock_ms += 1_000 + rng.below(20_000) as i64;
                let reading_count = rng.below(9) as usize;
                let readings = (0..reading_count)
                    .map(|_| {
                        let roll = rng.below(100);
                        let time_ms = if roll < 8 {
                            clock_ms - rng.below(30 * 60_000) as i64 // very late
                        } else if roll < 10 {
                            clock_ms + 100 * HOUR_MS // a bad device clock
                        } else {
                            clock_ms - rng.below(5_000) as i64
                        };
                        let value = (rng.below(400) as f64 - 200.0) * 0.25;
                        Reading {
                            series: rng.below(u64::from(series_count)) as u32,
                            time_ms,
                            value,
                            flags: 0,
                        }
                    })
                    .collect();
                created.push(Created {
                    agent: agent_index,
                    seq: first_seq + index as u64,
                    created_ms: clock_ms,
                    readings,
                });
            }
        }
        // Deliveries: (index into created, log time).
        let mut rng = SplitMix(delivery_seed);
        let mut deliveries = Vec::new();
        for (index, batch) in created.iter().enumerate() {
            let roll = rng.below(100);
            let delay_ms = if roll < 80 {
                rng.below(2_000) as i64
            } else if roll < 90 {
                rng.below(120_000) as i64
            } else {
                HOUR_MS + rng.below(2 * HOUR_MS as u64) as i64
            };
            deliveries.push((index, batch.created_ms + delay_ms));
            if rng.below(10) == 0 {
                deliveries.push((
                    index,
                    batch.created_ms + delay_ms + rng.below(HOUR_MS as u64) as i64,
                ));
            }
        }
        deliveries.sort_by_key(|(index, log_ms)| (*log_ms, *index));
        (created, deliveries)
    })
}

/// A tiny deterministic generator so that one proptest seed expands into a whole stream.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

fn run_generated(
    source: RollupSource,
    created: &[Created],
    deliveries: &[(usize, i64)],
) -> Result<(), TestCaseError> {
    let config = config(source);
    let mut engine = WindowEngine::new(config.clone()).unwrap();
    let batches: Vec<Batch> = created
        .iter()
        .map(|created| build_batch(created, source, 5))
        .collect();
    let schedule: Vec<(i64, Batch)> = deliveries
        .iter()
        .map(|(index, log_ms)| (*log_ms, batches[*index].clone()))
        .collect();
    let (mut output, outcomes) = run(&mut engine, &schedule);
    // Exactly the re-deliveries are duplicates.
    let mut seen = std::collections::HashSet::new();
    let mut unique = Vec::new();
    for ((index, _), outcome) in deliveries.iter().zip(&outcomes) {
        let first = seen.insert(*index);
        prop_assert_eq!(
            *outcome == IngestOutcome::Processed,
            first,
            "batch {} delivered again",
            index
        );
        if first {
            unique.push(batches[*index].clone());
        }
    }
    let last_ms = deliveries.last().map_or(BASE_MS, |(_, log_ms)| *log_ms);
    engine.advance_time(last_ms + config.idle_timeout_ms, &mut output);
    engine.flush_all(last_ms + config.idle_timeout_ms, &mut output);
    prop_assert_eq!(engine.open_windows(), 0);
    check_against_reference(&config, &unique, &output)?;
    let counters = engine.counters();
    prop_assert_eq!(
        counters.duplicate_batches as usize,
        deliveries.len() - unique.len()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn raw_readings_match_the_reference((created, deliveries) in stream_strategy()) {
        run_generated(RollupSource::RawReadings, &created, &deliveries)?;
    }

    #[test]
    fn edge_summaries_match_the_reference((created, deliveries) in stream_strategy()) {
        run_generated(RollupSource::EdgeSummaries, &created, &deliveries)?;
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios

fn raw_batch(agent: &str, seq: u64, readings: &[(u32, i64, f64)]) -> Batch {
    let mut ids: Vec<u32> = readings.iter().map(|(series, _, _)| *series).collect();
    ids.sort_unstable();
    ids.dedup();
    Batch {
        agent_id: agent.to_owned(),
        batch_seq: seq,
        created_ms: 0,
        series: ids
            .iter()
            .map(|id| SeriesDef {
                id: *id,
                key: SeriesKey::new(format!("{agent}-device"), format!("m{id}")),
            })
            .collect(),
        readings: readings
            .iter()
            .map(|(series, time_ms, value)| Reading {
                series: *series,
                time_ms: *time_ms,
                value: *value,
                flags: 0,
            })
            .collect(),
        summaries: Vec::new(),
    }
}

fn finals(output: &EngineOutput) -> Vec<&WindowResult> {
    output
        .results
        .iter()
        .filter(|result| result.is_final)
        .collect()
}

#[test]
fn a_gateway_backfilling_hours_after_live_data_gets_complete_windows() {
    let config = config(RollupSource::RawReadings);
    let mut engine = WindowEngine::new(config.clone()).unwrap();
    let mut output = EngineOutput::default();
    let mut sent = 0u64;
    // One batch per 10 s; seqs 1..=10 arrive live, then the gateway is offline for 3 h
    // (seqs 11..=1090), comes back and ships live data (1091..=1100) *before* the backlog.
    let batch_at = |seq: u64| {
        let time_ms = BASE_MS + seq as i64 * 10_000;
        raw_batch(
            "gw",
            seq,
            &[
                (1, time_ms - 3_000, seq as f64),
                (2, time_ms - 1_000, -(seq as f64)),
            ],
        )
    };
    for seq in 1..=10 {
        engine
            .ingest_batch(&batch_at(seq), BASE_MS + seq as i64 * 10_000, &mut output)
            .unwrap();
        sent += 2;
    }
    let back_ms = BASE_MS + 1_090 * 10_000;
    for seq in 1_091..=1_100 {
        engine
            .ingest_batch(
                &batch_at(seq),
                back_ms + (seq as i64 - 1_090) * 1_000,
                &mut output,
            )
            .unwrap();
        sent += 2;
    }
    // The backlog drains oldest first, a batch every 20 ms of log time.
    for (position, seq) in (11..=1_090).enumerate() {
        engine
            .ingest_batch(
                &batch_at(seq),
                back_ms + 10_000 + position as i64 * 20,
                &mut output,
            )
            .unwrap();
        sent += 2;
    }
    assert!(
        output.late.is_empty(),
        "backfill reported late: {:?}",
        output.late.first()
    );
    // Windows closed in order while the backlog filled in, without waiting for a flush.
    let closed_before_flush = finals(&output).len();
    assert!(closed_before_flush > 500, "{closed_before_flush}");
    engine.flush_all(back_ms + 20 * 60_000, &mut output);
    for resolution_ms in &config.resolutions_ms {
        let total: u64 = finals(&output)
            .iter()
            .filter(|result| result.resolution_ms == *resolution_ms)
            .map(|result| result.summary.count)
            .sum();
        assert_eq!(total, sent, "resolution {resolution_ms}");
    }
    assert_eq!(engine.counters().sequence_numbers_skipped, 0);
}

#[test]
fn a_silent_agent_holds_back_only_its_own_windows_until_it_is_idle() {
    let config = config(RollupSource::RawReadings);
    let mut engine = WindowEngine::new(config.clone()).unwrap();
    let mut output = EngineOutput::default();
    engine
        .ingest_batch(
            &raw_batch("quiet", 1, &[(1, BASE_MS + 1_000, 1.0)]),
            BASE_MS + 2_000,
            &mut output,
        )
        .unwrap();
    for seq in 1..=60u64 {
        let time_ms = BASE_MS + seq as i64 * 10_000;
        engine
            .ingest_batch(
                &raw_batch("busy", seq, &[(1, time_ms, 2.0)]),
                time_ms,
                &mut output,
            )
            .unwrap();
    }
    let final_agents: Vec<&str> = finals(&output)
        .iter()
        .map(|result| &*result.agent_id)
        .collect();
    assert!(
        final_agents
            .iter()
            .filter(|agent| **agent == "busy")
            .count()
            > 20
    );
    assert!(
        !final_agents.contains(&"quiet"),
        "the quiet agent's windows closed without its watermark"
    );
    // After the idle timeout (in log time) the quiet agent's windows are flushed...
    output.clear();
    engine.advance_time(BASE_MS + 2_000 + config.idle_timeout_ms, &mut output);
    let flushed: Vec<&WindowResult> = finals(&output)
        .into_iter()
        .filter(|result| &*result.agent_id == "quiet")
        .collect();
    assert_eq!(flushed.len(), config.resolutions_ms.len());
    assert_eq!(engine.counters().windows_flushed_idle, 3);
    // ...and data for those windows that still arrives is reported late, not lost.
    output.clear();
    engine
        .ingest_batch(
            &raw_batch("quiet", 2, &[(1, BASE_MS + 1_500, 3.0)]),
            BASE_MS + 700_000,
            &mut output,
        )
        .unwrap();
    assert_eq!(output.late.len(), config.resolutions_ms.len());
    assert!(output
        .late
        .iter()
        .all(|late| late.reason == LateReason::WindowClosed));
}

#[test]
fn data_within_the_allowed_lateness_re_emits_with_a_higher_version_and_later_data_is_late() {
    let config = EngineConfig {
        resolutions_ms: vec![60_000],
        out_of_orderness_ms: 0,
        allowed_lateness_ms: 60_000,
        emit_interval_ms: 1_000,
        rollup_source: RollupSource::RawReadings,
        ..EngineConfig::default()
    };
    let mut engine = WindowEngine::new(config).unwrap();
    let mut output = EngineOutput::default();
    engine
        .ingest_batch(&raw_batch("a", 1, &[(1, 10_000, 1.0)]), 10_000, &mut output)
        .unwrap();
    // Watermark at 90 s: past the window end (60 s) but within lateness (end + 60 s).
    engine
        .ingest_batch(&raw_batch("a", 2, &[(1, 90_000, 2.0)]), 90_000, &mut output)
        .unwrap();
    engine
        .ingest_batch(&raw_batch("a", 3, &[(1, 20_000, 3.0)]), 91_000, &mut output)
        .unwrap();
    assert!(output.late.is_empty());
    let first_window: Vec<&WindowResult> = output
        .results
        .iter()
        .filter(|result| result.window_start_ms == 0)
        .collect();
    assert_eq!(
        first_window
            .iter()
            .map(|result| result.version)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(first_window.iter().all(|result| !result.is_final));
    // Watermark at 120 s closes [0, 60 s): final with both readings; later data is late.
    engine
        .ingest_batch(
            &raw_batch("a", 4, &[(1, 120_000, 4.0)]),
            120_000,
            &mut output,
        )
        .unwrap();
    let last = output
        .results
        .iter()
        .rfind(|result| result.window_start_ms == 0)
        .unwrap();
    assert!(last.is_final);
    assert_eq!(last.summary.count, 2);
    assert_eq!(last.version, 2 | FINAL_VERSION_BIT);
    engine
        .ingest_batch(
            &raw_batch("a", 5, &[(1, 30_000, 5.0)]),
            121_000,
            &mut output,
        )
        .unwrap();
    assert_eq!(output.late.len(), 1);
    assert_eq!(output.late[0].window_start_ms, Some(0));
    assert_eq!(engine.counters().readings_late, 1);
}

#[test]
fn running_results_are_emitted_at_most_once_per_interval_and_only_when_changed() {
    let config = EngineConfig {
        resolutions_ms: vec![3_600_000],
        emit_interval_ms: 1_000,
        rollup_source: RollupSource::RawReadings,
        ..EngineConfig::default()
    };
    let mut engine = WindowEngine::new(config).unwrap();
    let mut output = EngineOutput::default();
    for seq in 0..100u64 {
        let now_ms = BASE_MS + seq as i64 * 100;
        engine
            .ingest_batch(
                &raw_batch("a", seq, &[(1, now_ms, seq as f64)]),
                now_ms,
                &mut output,
            )
            .unwrap();
    }
    // 10 s of log time at 1 s intervals: the first batch plus one emission per second.
    assert_eq!(output.results.len(), 10);
    assert!(output
        .results
        .windows(2)
        .all(|pair| pair[1].version > pair[0].version));
    output.clear();
    engine.advance_time(BASE_MS + 20_000, &mut output);
    engine.advance_time(BASE_MS + 30_000, &mut output);
    assert_eq!(
        output.results.len(),
        1,
        "one emission for the last change, none when unchanged"
    );
    assert_eq!(output.results[0].summary.count, 100);
}

#[test]
fn coarse_windows_re_derived_from_fine_ones_equal_the_engine_s() {
    let config = EngineConfig {
        resolutions_ms: vec![60_000, 3_600_000],
        rollup_source: RollupSource::RawReadings,
        ..EngineConfig::default()
    };
    let mut engine = WindowEngine::new(config).unwrap();
    let mut output = EngineOutput::default();
    let mut rng = SplitMix(7);
    for seq in 0..600u64 {
        let now_ms = BASE_MS + seq as i64 * 20_000;
        let readings: Vec<(u32, i64, f64)> = (0..4)
            .map(|series| {
                (
                    series,
                    now_ms - rng.below(3_000) as i64,
                    rng.below(1_000) as f64 / 8.0 - 40.0,
                )
            })
            .collect();
        engine
            .ingest_batch(&raw_batch("a", seq, &readings), now_ms, &mut output)
            .unwrap();
    }
    engine.flush_all(BASE_MS + 1_000 * 60_000, &mut output);
    assert!(output.late.is_empty());
    type Windows = Vec<(i64, Summary)>;
    let mut by_series: BTreeMap<String, (Windows, Windows)> = BTreeMap::new();
    for result in finals(&output) {
        let entry = by_series.entry(result.series.metric.clone()).or_default();
        let list = if result.resolution_ms == 60_000 {
            &mut entry.0
        } else {
            &mut entry.1
        };
        list.push((result.window_start_ms, Summary::clone(&result.summary)));
    }
    assert_eq!(by_series.len(), 4);
    for (series, (minutes, mut hours)) in by_series {
        let derived = coarsen(
            minutes.iter().map(|(start, summary)| (*start, summary)),
            60_000,
            3_600_000,
        )
        .unwrap();
        hours.sort_by_key(|(start, _)| *start);
        assert_eq!(derived.len(), hours.len(), "{series}");
        for ((derived_start, derived), (start, engine_summary)) in derived.iter().zip(&hours) {
            assert_eq!(derived_start, start);
            assert_eq!(derived.count, engine_summary.count);
            assert_eq!(
                (derived.min, derived.max),
                (engine_summary.min, engine_summary.max)
            );
            assert_eq!(
                (derived.first_time_ms, derived.last_time_ms),
                (engine_summary.first_time_ms, engine_summary.last_time_ms)
            );
            assert_close_sum(derived.sum, engine_summary.sum, &series);
            assert_eq!(derived.sketch, engine_summary.sketch);
        }
    }
}

#[test]
fn a_stalled_sequence_gap_is_given_up_after_its_timeout() {
    let config = config(RollupSource::RawReadings);
    let mut engine = WindowEngine::new(config.clone()).unwrap();
    let mut output = EngineOutput::default();
    engine
        .ingest_batch(
            &raw_batch("a", 1, &[(1, BASE_MS, 1.0)]),
            BASE_MS,
            &mut output,
        )
        .unwrap();
    // Seq 2 never comes (the agent restarted and skipped its reserved block).
    engine
        .ingest_batch(
            &raw_batch("a", 3, &[(1, BASE_MS + 10 * 60_000, 2.0)]),
            BASE_MS + 10 * 60_000,
            &mut output,
        )
        .unwrap();
    assert!(finals(&output).is_empty(), "closed across a gap");
    engine.advance_time(
        BASE_MS + 10 * 60_000 + config.sequence_gap_timeout_ms,
        &mut output,
    );
    assert_eq!(engine.counters().sequence_numbers_skipped, 1);
    assert_eq!(finals(&output).len(), config.resolutions_ms.len());
}

#[test]
fn a_batch_using_an_undefined_series_is_refused_without_changing_state() {
    let mut engine = WindowEngine::new(config(RollupSource::RawReadings)).unwrap();
    let mut output = EngineOutput::default();
    let mut batch = raw_batch("a", 1, &[(1, BASE_MS, 1.0)]);
    batch.series.clear();
    let error = engine
        .ingest_batch(&batch, BASE_MS, &mut output)
        .unwrap_err();
    assert!(error.to_string().contains("series id 1"), "{error}");
    assert_eq!(engine.series_count(), 0);
    // Not recorded as seen: the fixed record is processed, not a duplicate.
    let fixed = raw_batch("a", 1, &[(1, BASE_MS, 1.0)]);
    assert_eq!(
        engine.ingest_batch(&fixed, BASE_MS, &mut output).unwrap(),
        IngestOutcome::Processed
    );
}
