//! The window engine's output, pinned: a fingerprint of everything it emits for fixed,
//! generated inputs, and the same windows whatever the batching.
//!
//! Why: the engine's hot paths are tuned for speed (series-definition fast paths, shared
//! summaries, recycled allocations), and such changes must not change a single result:
//! the store replaces rows by version, so an output that differs after an upgrade would
//! silently rewrite history on replay. The fingerprint covers every result and late row
//! (all fields, through their `Debug` form, so the bits of every float), the counters and
//! the checkpoint bytes, over a stream that exercises what the fast paths skip: repeated
//! and changing series definitions, interleaved agents, a series shared by two agents,
//! duplicates, late and too-far-ahead data, refused batches, idle flushes and a restore
//! mid-stream. A deliberate change of the output updates the constants, with a reason in
//! the commit.
//!
//! The property test checks what the fingerprint cannot: that final windows do not depend
//! on how the same summaries are cut into batches or ordered inside them.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tributary_collector::process::{EngineConfig, EngineOutput, RollupSource, WindowEngine};
use tributary_protocol::{Batch, Reading, SeriesDef, SeriesKey, Summary, WindowSummary};

const BASE_MS: i64 = 1_700_000_000_000;

fn config(source: RollupSource) -> EngineConfig {
    EngineConfig {
        resolutions_ms: vec![10_000, 60_000, 600_000],
        rollup_source: source,
        out_of_orderness_ms: 2_000,
        allowed_lateness_ms: 20_000,
        emit_interval_ms: 500,
        idle_timeout_ms: 300_000,
        sequence_gap_timeout_ms: 15_000,
        max_event_time_ahead_ms: 3_600_000,
        ..EngineConfig::default()
    }
}

struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % bound.max(1)
    }
}

/// FNV-1a, 64 bits: stable across Rust releases (std's hashers promise no such thing).
struct Fingerprint(u64);

impl Fingerprint {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn add_output(&mut self, output: &EngineOutput) {
        for result in &output.results {
            self.add(format!("{result:?}").as_bytes());
        }
        for late in &output.late {
            self.add(format!("{late:?}").as_bytes());
        }
    }
}

fn key(device: &str, metric: &str, site: u64) -> SeriesKey {
    let mut key = SeriesKey::new(device, metric);
    key.tags.push(("site".to_owned(), format!("s{site}")));
    key
}

/// A log-ordered stream `(log time, batch)`: agent 0 always defines the same 40 series in
/// the same order (the fast path), agent 1 defines only the series each batch uses, agent
/// 2 alternates between two definition orders and reuses one of agent 0's keys. Batches
/// carry readings and 10 s edge summaries of the same values, some readings are far in the
/// past or too far ahead, some batches are delivered twice or out of order, and a few are
/// refused (an undefined id, a conflicting definition).
fn stream(seed: u64) -> Vec<(i64, Batch)> {
    let mut rng = SplitMix(seed);
    let mut deliveries = Vec::new();
    for agent in 0..3u64 {
        let mut clock_ms = BASE_MS + agent as i64 * 3_000;
        for seq in 1..=120u64 {
            clock_ms += 1_000 + rng.below(4_000) as i64;
            let series_used = 1 + rng.below(40);
            let mut readings = Vec::new();
            for _ in 0..rng.below(60) {
                let back_ms = match rng.below(20) {
                    0 => rng.below(400_000) as i64,
                    1 => -(rng.below(10_000_000) as i64),
                    _ => rng.below(4_000) as i64,
                };
                readings.push(Reading {
                    series: rng.below(series_used) as u32,
                    time_ms: clock_ms - back_ms,
                    value: match rng.below(50) {
                        0 => -(rng.below(1_000_000) as f64) * 0.25,
                        1 => 0.0,
                        _ => rng.below(100_000) as f64 * 0.01 + 1.0,
                    },
                    flags: 0,
                });
            }
            let mut by_window: BTreeMap<(u32, i64), Summary> = BTreeMap::new();
            for reading in &readings {
                let start_ms = reading.time_ms - reading.time_ms.rem_euclid(10_000);
                by_window
                    .entry((reading.series, start_ms))
                    .or_default()
                    .observe(reading.time_ms, reading.value);
            }
            let summaries: Vec<WindowSummary> = by_window
                .into_iter()
                .map(|((series, window_start_ms), summary)| WindowSummary {
                    series,
                    window_start_ms,
                    window_ms: 10_000,
                    summary,
                })
                .collect();
            let mut series: Vec<SeriesDef> = match agent {
                0 => (0..40)
                    .map(|id| SeriesDef {
                        id,
                        key: key(
                            &format!("a0-dev{}", id / 4),
                            "temperature",
                            u64::from(id % 4),
                        ),
                    })
                    .collect(),
                1 => {
                    let mut used: Vec<u32> =
                        readings.iter().map(|reading| reading.series).collect();
                    used.sort_unstable();
                    used.dedup();
                    used.into_iter()
                        .map(|id| SeriesDef {
                            id,
                            key: key(&format!("a1-dev{id}"), "humidity", 1),
                        })
                        .collect()
                }
                _ => (0..40)
                    .map(|id| SeriesDef {
                        id,
                        key: if id == 7 {
                            key("a0-dev1", "temperature", 3)
                        } else {
                            key(&format!("a2-dev{id}"), "power", 2)
                        },
                    })
                    .collect(),
            };
            if agent == 2 && seq % 2 == 0 {
                series.reverse();
            }
            let mut batch = Batch {
                agent_id: format!("gateway-{agent}"),
                batch_seq: seq,
                created_ms: clock_ms,
                series,
                readings,
                summaries,
            };
            batch.sort_readings();
            match rng.below(40) {
                0 => batch.series.retain(|definition| definition.id != 0),
                1 => {
                    if let Some(first) = batch.series.first().cloned() {
                        batch.series.push(SeriesDef {
                            id: first.id,
                            key: key("somewhere-else", "x", 0),
                        });
                    }
                }
                _ => {}
            }
            let delay_ms = if rng.below(10) == 0 {
                rng.below(30_000)
            } else {
                rng.below(1_000)
            } as i64;
            if rng.below(10) == 0 {
                deliveries.push((
                    clock_ms + delay_ms + rng.below(20_000) as i64,
                    batch.clone(),
                ));
            }
            deliveries.push((clock_ms + delay_ms, batch));
        }
    }
    deliveries.sort_by_key(|(log_ms, batch)| (*log_ms, batch.agent_id.clone(), batch.batch_seq));
    deliveries
}

/// Runs the stream, restoring from a checkpoint after `restore_after` deliveries, and
/// returns the fingerprint of all output, refusals, counters and final checkpoint.
fn fingerprint(source: RollupSource, seed: u64, restore_after: usize) -> u64 {
    let deliveries = stream(seed);
    let mut engine = WindowEngine::new(config(source)).expect("valid config");
    let mut output = EngineOutput::default();
    let mut print = Fingerprint::new();
    for (position, (log_ms, batch)) in deliveries.iter().enumerate() {
        if position == restore_after {
            let bytes = engine.checkpoint();
            print.add(&bytes);
            engine = WindowEngine::restore(config(source), &bytes).expect("own checkpoint");
        }
        output.clear();
        match engine.ingest_batch(batch, *log_ms, &mut output) {
            Ok(outcome) => print.add(format!("{outcome:?}").as_bytes()),
            Err(error) => print.add(error.to_string().as_bytes()),
        }
        print.add_output(&output);
        if position % 17 == 0 {
            output.clear();
            engine.advance_time(*log_ms + 250, &mut output);
            print.add_output(&output);
        }
    }
    let last_ms = deliveries.last().map_or(BASE_MS, |(log_ms, _)| *log_ms);
    for later_ms in [1_000, 60_000, 400_000] {
        output.clear();
        engine.advance_time(last_ms + later_ms, &mut output);
        print.add_output(&output);
    }
    print.add(format!("{:?}", engine.counters()).as_bytes());
    print.add(&engine.checkpoint());
    print.0
}

/// Recorded with the engine of 2026-11-28 (commit 45bd886) before the summary-path work.
const EXPECTED: [(RollupSource, u64, u64); 4] = [
    (RollupSource::EdgeSummaries, 1, 6_441_748_347_814_821_831),
    (RollupSource::EdgeSummaries, 2, 9_039_271_326_229_165_342),
    (RollupSource::RawReadings, 1, 5_053_815_420_666_215_341),
    (RollupSource::RawReadings, 2, 15_809_972_049_700_392_839),
];

#[test]
fn engine_output_is_unchanged_for_fixed_streams() {
    let mut actual = Vec::new();
    for (source, seed, _) in EXPECTED {
        actual.push((source, seed, fingerprint(source, seed, 150)));
    }
    assert_eq!(
        actual, EXPECTED,
        "the engine's output changed for a fixed input (left: now, right: recorded)"
    );
}

/// Final windows of one agent fed `summaries` cut into batches of the given sizes, each
/// batch's items shuffled by `order`: (resolution, start, device) -> count, min, max,
/// first, last and sketch, and the sums apart.
type Windows = BTreeMap<(i64, i64, String), String>;
type Sums = BTreeMap<(i64, i64, String), f64>;

fn final_windows(summaries: &[WindowSummary], cuts: &[usize], order: u64) -> (Windows, Sums) {
    // Lateness far beyond the items' spread: no batching may make anything late.
    let config = EngineConfig {
        allowed_lateness_ms: 24 * 3_600_000,
        ..config(RollupSource::EdgeSummaries)
    };
    let mut engine = WindowEngine::new(config).expect("valid config");
    let mut output = EngineOutput::default();
    let mut rng = SplitMix(order);
    let mut rest = summaries;
    let mut seq = 0;
    let mut cut = cuts.iter().cycle();
    let mut finals = Vec::new();
    while !rest.is_empty() {
        let take = cut.next().copied().unwrap_or(1).clamp(1, rest.len());
        let (now, later) = rest.split_at(take);
        rest = later;
        seq += 1;
        let mut items = now.to_vec();
        for index in (1..items.len()).rev() {
            items.swap(index, rng.below(index as u64 + 1) as usize);
        }
        let batch = Batch {
            agent_id: "gateway-order".to_owned(),
            batch_seq: seq,
            created_ms: BASE_MS,
            series: (0..4)
                .map(|id| SeriesDef {
                    id,
                    key: key(&format!("dev{id}"), "load", 0),
                })
                .collect(),
            readings: Vec::new(),
            summaries: items,
        };
        output.clear();
        engine
            .ingest_batch(&batch, BASE_MS, &mut output)
            .expect("valid batch");
        finals.extend(output.results.drain(..).filter(|result| result.is_final));
    }
    assert_eq!(
        engine.counters().readings_late,
        0,
        "nothing may be late here"
    );
    output.clear();
    engine.flush_all(BASE_MS, &mut output);
    finals.extend(output.results.drain(..).filter(|result| result.is_final));
    let mut exact = Windows::new();
    let mut sums = Sums::new();
    for result in finals {
        let summary = &result.summary;
        let id = (
            result.resolution_ms,
            result.window_start_ms,
            result.series.device_id.clone(),
        );
        let previous = exact.insert(
            id.clone(),
            format!(
                "{} {} {} {}@{} {}@{} {:?}",
                summary.count,
                summary.min,
                summary.max,
                summary.first_value,
                summary.first_time_ms,
                summary.last_value,
                summary.last_time_ms,
                summary.sketch
            ),
        );
        assert!(previous.is_none(), "window {id:?} finalised twice");
        sums.insert(id, summary.sum);
    }
    (exact, sums)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The same summaries in different batchings and orders (with a lateness that
    /// leaves nothing late) give the same final windows: exact for count, min,
    /// max, first, last and sketch; the sum up to rounding.
    #[test]
    fn final_windows_do_not_depend_on_batching_or_order(
        items in prop::collection::vec((0u32..4, 0i64..12, 0u32..3, -500i64..500), 1..80),
        cuts_a in prop::collection::vec(1usize..20, 1..5),
        cuts_b in prop::collection::vec(1usize..20, 1..5),
        order_a in any::<u64>(),
        order_b in any::<u64>(),
    ) {
        let summaries: Vec<WindowSummary> = items
            .iter()
            .map(|(series, window, readings, value)| {
                let window_start_ms = BASE_MS + window * 10_000;
                let mut summary = Summary::empty();
                for reading in 0..=*readings {
                    let time_ms = window_start_ms + i64::from(reading) * 3_000 + i64::from(*series);
                    summary.observe(time_ms, *value as f64 * 0.5 + f64::from(reading));
                }
                WindowSummary { series: *series, window_start_ms, window_ms: 10_000, summary }
            })
            .collect();
        let (exact_a, sums_a) = final_windows(&summaries, &cuts_a, order_a);
        let (exact_b, sums_b) = final_windows(&summaries, &cuts_b, order_b);
        prop_assert_eq!(exact_a, exact_b);
        prop_assert_eq!(sums_a.len(), sums_b.len());
        for (id, sum_a) in &sums_a {
            let sum_b = sums_b.get(id).copied().unwrap_or(f64::NAN);
            prop_assert!((sum_a - sum_b).abs() <= 1e-9 * sum_a.abs().max(1.0), "{id:?}: {sum_a} vs {sum_b}");
        }
    }
}
