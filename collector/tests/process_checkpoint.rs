//! The window engine's checkpoint and its bounded state.
//!
//! Exactly-once rests on this: a processor that checkpoints the engine together with the
//! log position, crashes, restores and replays from that position must emit exactly what
//! an uninterrupted run would have. Also: damaged checkpoints are refused (never a
//! panic), and the memory per active series is measured for 10k series.

use proptest::prelude::*;
use tributary_collector::process::{
    EngineConfig, EngineOutput, IngestOutcome, ProcessError, RollupSource, WindowEngine,
};
use tributary_protocol::{Batch, Reading, SeriesDef, SeriesKey, Summary, WindowSummary};

const BASE_MS: i64 = 1_700_000_000_000;

fn config(source: RollupSource) -> EngineConfig {
    EngineConfig {
        resolutions_ms: vec![20_000, 60_000],
        rollup_source: source,
        out_of_orderness_ms: 2_000,
        allowed_lateness_ms: 10_000,
        emit_interval_ms: 1_000,
        idle_timeout_ms: 120_000,
        sequence_gap_timeout_ms: 15_000,
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

/// A log-ordered stream `(log time, batch)` from three agents with jitter, late data,
/// reordered and duplicated deliveries.
fn stream(seed: u64, source: RollupSource) -> Vec<(i64, Batch)> {
    let mut rng = SplitMix(seed);
    let mut deliveries = Vec::new();
    for agent in 0..3u32 {
        let mut clock_ms = BASE_MS + i64::from(agent) * 7_000;
        for seq in 1..=40u64 {
            clock_ms += 500 + rng.below(5_000) as i64;
            let readings: Vec<Reading> = (0..rng.below(6))
                .map(|_| {
                    let back_ms = if rng.below(10) == 0 {
                        rng.below(120_000)
                    } else {
                        rng.below(3_000)
                    };
                    Reading {
                        series: rng.below(3) as u32,
                        time_ms: clock_ms - back_ms as i64,
                        value: rng.below(200) as f64 * 0.5 - 30.0,
                        flags: 0,
                    }
                })
                .collect();
            let summaries = match source {
                RollupSource::RawReadings => Vec::new(),
                RollupSource::EdgeSummaries => readings
                    .iter()
                    .map(|reading| WindowSummary {
                        series: reading.series,
                        window_start_ms: reading.time_ms - reading.time_ms.rem_euclid(10_000),
                        window_ms: 10_000,
                        summary: Summary::from_reading(reading.time_ms, reading.value),
                    })
                    .collect(),
            };
            let batch = Batch {
                agent_id: format!("gateway-{agent}"),
                batch_seq: seq,
                created_ms: clock_ms,
                series: (0..3)
                    .map(|id| SeriesDef {
                        id,
                        key: SeriesKey::new(format!("g{agent}-sensor{id}"), "pressure"),
                    })
                    .collect(),
                readings: if source == RollupSource::RawReadings {
                    readings
                } else {
                    Vec::new()
                },
                summaries,
            };
            let delay_ms = if rng.below(8) == 0 {
                rng.below(40_000)
            } else {
                rng.below(1_500)
            } as i64;
            if rng.below(8) == 0 {
                deliveries.push((
                    clock_ms + delay_ms + rng.below(30_000) as i64,
                    batch.clone(),
                ));
            }
            deliveries.push((clock_ms + delay_ms, batch));
        }
    }
    deliveries.sort_by_key(|(log_ms, batch)| (*log_ms, batch.agent_id.clone(), batch.batch_seq));
    deliveries
}

fn feed(engine: &mut WindowEngine, deliveries: &[(i64, Batch)], output: &mut EngineOutput) {
    for (log_ms, batch) in deliveries {
        engine
            .ingest_batch(batch, *log_ms, output)
            .expect("generated batches are valid");
    }
}

fn finish(engine: &mut WindowEngine, deliveries: &[(i64, Batch)], output: &mut EngineOutput) {
    let last_ms = deliveries.last().map_or(BASE_MS, |(log_ms, _)| *log_ms);
    engine.advance_time(last_ms + 60_000, output);
    engine.advance_time(last_ms + 600_000, output);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn restoring_a_mid_stream_checkpoint_and_replaying_gives_identical_output(
        seed in any::<u64>(),
        split_permille in 0usize..=1000,
        summaries in any::<bool>(),
    ) {
        let source = if summaries { RollupSource::EdgeSummaries } else { RollupSource::RawReadings };
        let deliveries = stream(seed, source);
        let split = deliveries.len() * split_permille / 1000;
        let (before, after) = deliveries.split_at(split);

        let mut uninterrupted = WindowEngine::new(config(source)).unwrap();
        let mut discarded = EngineOutput::default();
        feed(&mut uninterrupted, before, &mut discarded);
        let checkpoint = uninterrupted.checkpoint();
        let mut expected = EngineOutput::default();
        feed(&mut uninterrupted, after, &mut expected);
        finish(&mut uninterrupted, &deliveries, &mut expected);

        let mut restored = WindowEngine::restore(config(source), &checkpoint).unwrap();
        prop_assert_eq!(&restored.checkpoint(), &checkpoint, "checkpoint does not round-trip");
        let mut replayed = EngineOutput::default();
        feed(&mut restored, after, &mut replayed);
        finish(&mut restored, &deliveries, &mut replayed);

        prop_assert_eq!(&replayed, &expected);
        prop_assert_eq!(restored.counters(), uninterrupted.counters());
        prop_assert_eq!(restored.checkpoint(), uninterrupted.checkpoint());
        prop_assert_eq!(restored.open_windows(), 0);
        // Batches before the checkpoint stay deduplicated after the restore.
        if let Some((log_ms, batch)) = before.first() {
            let mut ignored = EngineOutput::default();
            prop_assert_eq!(restored.ingest_batch(batch, *log_ms, &mut ignored).unwrap(), IngestOutcome::Duplicate);
            prop_assert_eq!(ignored, EngineOutput::default());
        }
    }

    #[test]
    fn damaged_checkpoints_are_refused_or_restore_a_usable_engine(
        seed in any::<u64>(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        noise in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let deliveries = stream(seed, RollupSource::RawReadings);
        let mut engine = WindowEngine::new(config(RollupSource::RawReadings)).unwrap();
        let mut output = EngineOutput::default();
        feed(&mut engine, &deliveries[..deliveries.len() / 2], &mut output);
        let checkpoint = engine.checkpoint();
        let truncated = &checkpoint[..cut.index(checkpoint.len())];
        prop_assert!(WindowEngine::restore(config(RollupSource::RawReadings), truncated).is_err());
        let mut flipped = checkpoint.clone();
        let position = flip.index(flipped.len());
        flipped[position] ^= 1 << bit;
        for candidate in [flipped, noise] {
            if let Ok(mut restored) = WindowEngine::restore(config(RollupSource::RawReadings), &candidate) {
                // Whatever was accepted must keep working.
                feed(&mut restored, &deliveries[deliveries.len() / 2..], &mut output);
                finish(&mut restored, &deliveries, &mut output);
            }
        }
    }
}

#[test]
fn a_checkpoint_is_refused_under_another_configuration() {
    let engine = WindowEngine::new(config(RollupSource::RawReadings)).unwrap();
    let checkpoint = engine.checkpoint();
    let mut other = config(RollupSource::RawReadings);
    other.allowed_lateness_ms += 1;
    let error = WindowEngine::restore(other, &checkpoint).unwrap_err();
    assert_eq!(error, ProcessError::CheckpointConfigMismatch);
    assert!(error.to_string().contains("replay"), "{error}");
    let error =
        WindowEngine::restore(config(RollupSource::RawReadings), b"not a checkpoint").unwrap_err();
    assert!(
        matches!(error, ProcessError::CorruptCheckpoint { .. }),
        "{error}"
    );
}

#[test]
fn invalid_configurations_name_the_field() {
    let bad = EngineConfig {
        resolutions_ms: vec![60_000, 0],
        ..EngineConfig::default()
    };
    let error = WindowEngine::new(bad).unwrap_err();
    assert!(error.to_string().contains("resolutions_ms"), "{error}");
    let bad = EngineConfig {
        emit_interval_ms: 0,
        ..EngineConfig::default()
    };
    assert!(WindowEngine::new(bad)
        .unwrap_err()
        .to_string()
        .contains("emit_interval_ms"));
}

/// Documents the memory per active series (docs/processor.md): 10k series of one
/// agent, each with a minute of 1 Hz readings open at 60 s and 1 h resolution.
#[test]
fn state_per_active_series_is_bounded_and_measured() {
    const SERIES: u32 = 10_000;
    let config = EngineConfig {
        resolutions_ms: vec![60_000, 3_600_000],
        rollup_source: RollupSource::RawReadings,
        ..EngineConfig::default()
    };
    let mut engine = WindowEngine::new(config).unwrap();
    let mut output = EngineOutput::default();
    let start_ms = 1_700_000_040_000; // 40 s into an hour window and at a minute boundary
    for (seq, chunk) in (0..SERIES).collect::<Vec<_>>().chunks(500).enumerate() {
        let mut batch = Batch {
            agent_id: "gateway".into(),
            batch_seq: seq as u64,
            created_ms: start_ms,
            series: chunk
                .iter()
                .map(|id| SeriesDef {
                    id: *id,
                    key: SeriesKey::new(
                        format!("device-{:05}", id / 10),
                        format!("metric_{}", id % 10),
                    ),
                })
                .collect(),
            readings: Vec::new(),
            summaries: Vec::new(),
        };
        for id in chunk {
            for second in 0..59 {
                // A realistic signal: 21 degC +- drift, quantised to 0.01.
                let value = ((2100 + (*id as i64 % 50) + (second % 7)) as f64) / 100.0;
                batch.readings.push(Reading {
                    series: *id,
                    time_ms: start_ms + second * 1_000,
                    value,
                    flags: 0,
                });
            }
        }
        engine
            .ingest_batch(&batch, start_ms + 59_000, &mut output)
            .unwrap();
    }
    assert_eq!(engine.open_windows(), 2 * SERIES as usize);
    let bytes_per_series = engine.state_bytes() / SERIES as usize;
    println!(
        "window engine state: {bytes_per_series} bytes per active series (2 open windows each)"
    );
    assert!(
        bytes_per_series < 1_536,
        "{bytes_per_series} bytes per series"
    );
    // Closing the windows evicts their state.
    engine.flush_all(start_ms + 60_000, &mut output);
    assert_eq!(engine.open_windows(), 0);
    let after_flush = engine.state_bytes() / SERIES as usize;
    assert!(
        after_flush < bytes_per_series,
        "{after_flush} vs {bytes_per_series}"
    );
}
