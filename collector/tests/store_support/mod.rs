//! Shared by the store tests: a generated write sequence with retries, replays, out-of-order
//! window versions and late rows, applied identically to any [`Store`], and a snapshot of
//! every query's answer through [`Queries`]; and the ClickHouse store's test setup (a
//! database of its own per test, dropped at the end).
#![allow(dead_code)]

use std::sync::Arc;

use tributary_collector::process::{
    LateItem, LateReading, LateReason, WindowResult, FINAL_VERSION_BIT,
};
use tributary_collector::store::schema::{RollupSpec, SchemaConfig, SeriesSelector};
use tributary_collector::store::{
    render_tags, Checkpoint, ClickHouseStoreConfig, DeviceRow, LastSeenRow, LateCountRow,
    LatestValueRow, Queries, RawReadingRow, RetryPolicy, RollupRow, SeriesRow, Store,
};
use tributary_protocol::{SeriesKey, Summary};
use tributary_tests::services::unique_suffix;

/// 2026-01-01T00:00:00Z
pub const T0: i64 = 1_767_225_600_000;
pub const DAY_MS: i64 = 86_400_000;
pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const RESOLUTIONS_MS: [i64; 2] = [MINUTE_MS, HOUR_MS];

/// Deterministic xorshift64*, so a failing sequence can be rerun.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for index in (1..items.len()).rev() {
            let other = self.below(index as u64 + 1) as usize;
            items.swap(index, other);
        }
    }
}

/// One call on the store.
#[derive(Clone)]
pub enum Op {
    Raw(Vec<RawReadingRow>),
    Windows(Vec<WindowResult>),
    Late(Vec<LateReading>),
    Seen(Vec<LastSeenRow>),
    Checkpoint(Checkpoint),
    Flush,
}

pub fn series_keys() -> Vec<SeriesKey> {
    vec![
        SeriesKey::new("d1", "temperature_c"),
        SeriesKey::new("d1", "humidity_pct"),
        SeriesKey::new("d2", "temperature_c").with_tags([("zone", "a,b"), ("line", "x=1%")]),
        SeriesKey::new("d'3", "pressure \\ hpa").with_tags([("site", "Zürich")]),
        SeriesKey::new("d4", "temperature_c"),
    ]
}

pub fn selector(key: &SeriesKey) -> SeriesSelector {
    SeriesSelector::for_key(key)
}

pub fn summary_of(readings: &[(i64, f64)]) -> Summary {
    let mut summary = Summary::empty();
    for (time_ms, value) in readings {
        summary.observe(*time_ms, *value);
    }
    summary
}

/// A window result over `readings`, its version the reading count (plus the final bit).
pub fn window_result(
    agent: &str,
    key: &SeriesKey,
    resolution_ms: i64,
    window_start_ms: i64,
    readings: &[(i64, f64)],
    is_final: bool,
) -> WindowResult {
    let summary = summary_of(readings);
    WindowResult {
        agent_id: Arc::from(agent),
        series: Arc::new(key.clone()),
        resolution_ms,
        window_start_ms,
        version: summary.count | if is_final { FINAL_VERSION_BIT } else { 0 },
        summary: Arc::new(summary),
        is_final,
    }
}

fn seen(
    kind: &str,
    agent: &str,
    key: Option<&SeriesKey>,
    device_only: bool,
    ms: u64,
) -> LastSeenRow {
    LastSeenRow {
        kind: kind.to_string(),
        agent_id: agent.to_string(),
        device_id: key.map(|key| key.device_id.clone()).unwrap_or_default(),
        metric: if device_only {
            String::new()
        } else {
            key.map(|key| key.metric.clone()).unwrap_or_default()
        },
        tags: if device_only {
            String::new()
        } else {
            key.map(|key| render_tags(&key.tags)).unwrap_or_default()
        },
        last_seen_ms: ms,
    }
}

/// The write sequence: three agents over five series (d1's temperature from two agents),
/// minute windows across two days, every window's running versions emitted in shuffled
/// order with repeats, raw batches retried, late rows replayed, last-seen out of order.
/// Ends with a flush.
pub fn generate(seed: u64) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let agents = ["gw-a", "gw-b", "gw-c"];
    let keys = series_keys();
    // (agent index, series index)
    let assignments = [(0, 0), (1, 0), (0, 1), (1, 2), (2, 3), (2, 4)];
    let mut ops: Vec<Op> = Vec::new();
    let mut batch_seq = [0u64; 3];
    // Minute windows: a few the day before T0 and a few spread over T0's first hours.
    let minute_windows: Vec<i64> = [
        -DAY_MS + 5 * MINUTE_MS,
        -2 * MINUTE_MS,
        0,
        MINUTE_MS,
        7 * MINUTE_MS,
        HOUR_MS + 3 * MINUTE_MS,
        2 * HOUR_MS,
    ]
    .iter()
    .map(|offset| T0 + offset)
    .collect();
    for (agent_index, series_index) in assignments {
        let agent = agents[agent_index];
        let key = &keys[series_index];
        let mut hour_readings: std::collections::BTreeMap<i64, Vec<(i64, f64)>> =
            Default::default();
        for window_start_ms in &minute_windows {
            let count = 1 + rng.below(5) as i64;
            // Distinct times per agent (agent index in the milliseconds), so no two agents
            // tie on a series' latest time.
            let readings: Vec<(i64, f64)> = (0..count)
                .map(|index| {
                    (
                        window_start_ms + index * 7_000 + agent_index as i64,
                        (rng.below(20_000) as f64 - 5_000.0) / 100.0,
                    )
                })
                .collect();
            // Raw: one batch per window; some batches written again later (a retry).
            batch_seq[agent_index] += 1;
            let rows: Vec<RawReadingRow> = readings
                .iter()
                .enumerate()
                .map(|(position, (time_ms, value))| RawReadingRow {
                    agent_id: agent.to_string(),
                    batch_seq: batch_seq[agent_index],
                    position: position as u32,
                    device_id: key.device_id.clone(),
                    metric: key.metric.clone(),
                    tags: render_tags(&key.tags),
                    time_ms: *time_ms,
                    value: *value,
                    flags: (position % 3) as u8,
                })
                .collect();
            ops.push(Op::Raw(rows.clone()));
            if rng.below(3) == 0 {
                ops.push(Op::Raw(rows));
            }
            // Running versions 1..count, then final; shuffled later, some repeated.
            for prefix in 1..=readings.len() {
                ops.push(Op::Windows(vec![window_result(
                    agent,
                    key,
                    MINUTE_MS,
                    *window_start_ms,
                    &readings[..prefix],
                    false,
                )]));
            }
            ops.push(Op::Windows(vec![window_result(
                agent,
                key,
                MINUTE_MS,
                *window_start_ms,
                &readings,
                true,
            )]));
            if rng.below(2) == 0 {
                ops.push(Op::Windows(vec![window_result(
                    agent,
                    key,
                    MINUTE_MS,
                    *window_start_ms,
                    &readings[..1],
                    false,
                )]));
            }
            hour_readings
                .entry(window_start_ms.div_euclid(HOUR_MS) * HOUR_MS)
                .or_default()
                .extend(readings.iter().copied());
            // Sightings at a receive time near the window, some older than earlier ones.
            let seen_ms =
                (window_start_ms + 30_000) as u64 + rng.below(1_000) * 3 + agent_index as u64;
            ops.push(Op::Seen(vec![
                seen("agent", agent, None, false, seen_ms),
                seen("device", agent, Some(key), true, seen_ms),
                seen("series", agent, Some(key), false, seen_ms),
            ]));
            // Now and then a late reading, sometimes replayed.
            if rng.below(3) == 0 {
                let late = LateReading {
                    agent_id: Arc::from(agent),
                    batch_seq: batch_seq[agent_index],
                    series: Arc::new(key.clone()),
                    resolution_ms: if rng.below(4) == 0 {
                        None
                    } else {
                        Some(MINUTE_MS)
                    },
                    window_start_ms: Some(*window_start_ms),
                    item: if rng.below(2) == 0 {
                        LateItem::Reading {
                            time_ms: window_start_ms + 1_000 + agent_index as i64,
                            value: rng.below(100) as f64,
                        }
                    } else {
                        LateItem::Summary {
                            window_start_ms: *window_start_ms,
                            window_ms: 10_000,
                            summary: summary_of(&readings),
                        }
                    },
                    reason: if rng.below(5) == 0 {
                        LateReason::TooFarAhead
                    } else {
                        LateReason::WindowClosed
                    },
                };
                ops.push(Op::Late(vec![late.clone()]));
                if rng.below(2) == 0 {
                    ops.push(Op::Late(vec![late]));
                }
            }
        }
        for (hour_start_ms, readings) in hour_readings {
            let half = readings.len().div_ceil(2);
            ops.push(Op::Windows(vec![
                window_result(agent, key, HOUR_MS, hour_start_ms, &readings, true),
                window_result(agent, key, HOUR_MS, hour_start_ms, &readings[..half], false),
            ]));
        }
    }
    rng.shuffle(&mut ops);
    // Flush every few operations, and a checkpoint now and then just before a flush.
    let mut sequenced = Vec::with_capacity(ops.len() * 2);
    let mut next_offset = 0;
    for op in ops {
        sequenced.push(op);
        if rng.below(6) == 0 {
            next_offset += 1 + rng.below(10);
            sequenced.push(Op::Checkpoint(Checkpoint {
                group: "processor".to_string(),
                partition: (next_offset % 2) as u32,
                next_offset,
                engine_state: next_offset
                    .to_be_bytes()
                    .repeat(1 + (next_offset % 5) as usize),
            }));
            sequenced.push(Op::Flush);
        }
    }
    sequenced.push(Op::Flush);
    sequenced
}

/// Applies `ops` to `store`, flushing where they say.
pub async fn apply<S: Store>(store: &mut S, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Raw(rows) => store.write_raw_readings(rows.clone(), T0),
            Op::Windows(results) => store
                .write_window_results(results, T0)
                .expect("every resolution is configured"),
            Op::Late(late) => store.write_late_readings(late, T0),
            Op::Seen(rows) => store.write_last_seen(rows.clone(), T0),
            Op::Checkpoint(checkpoint) => store.write_checkpoint(checkpoint.clone()),
            Op::Flush => {
                store.flush().await.expect("flush");
                assert_eq!(store.buffered_rows(), 0, "a flush empties the buffer");
            }
        }
    }
}

/// Every query's answer, for comparing stores.
#[derive(Debug, PartialEq)]
pub struct Answers {
    pub devices: Vec<DeviceRow>,
    pub series: Vec<SeriesRow>,
    pub latest_all: Vec<LatestValueRow>,
    pub latest_some: Vec<LatestValueRow>,
    pub rollups: Vec<(i64, usize, Vec<RollupRow>)>,
    pub raw: Vec<(usize, Vec<RawReadingRow>)>,
    pub late: Vec<(i64, i64, Vec<LateCountRow>)>,
    pub unknown_resolution_refused: bool,
}

pub async fn answers(queries: &Queries) -> Answers {
    let keys = series_keys();
    let all: Vec<SeriesSelector> = keys.iter().map(selector).collect();
    let missing = SeriesSelector {
        device_id: "nope".into(),
        metric: "temperature_c".into(),
        tags: String::new(),
    };
    // Selections: everything (listed backwards, with a repeat), one series, a missing one, none.
    let mut backwards = all.clone();
    backwards.reverse();
    backwards.push(all[0].clone());
    let selections: Vec<Vec<SeriesSelector>> = vec![
        backwards,
        vec![all[2].clone()],
        vec![missing.clone(), all[3].clone()],
        vec![],
    ];
    let ranges = [
        (0, i64::MAX),
        (T0, T0 + HOUR_MS),
        (T0 - DAY_MS, T0),
        (T0 + MINUTE_MS, T0 + MINUTE_MS + 1),
        (T0 + 10, T0),
    ];
    let mut rollups = Vec::new();
    let mut raw = Vec::new();
    for (index, selection) in selections.iter().enumerate() {
        for (from_ms, to_ms) in ranges {
            for resolution_ms in RESOLUTIONS_MS {
                rollups.push((
                    resolution_ms,
                    index,
                    queries
                        .rollup_range(resolution_ms, selection, from_ms, to_ms)
                        .await
                        .expect("rollup range"),
                ));
            }
            raw.push((
                index,
                queries
                    .raw_range(selection, from_ms, to_ms)
                    .await
                    .expect("raw range"),
            ));
        }
    }
    let mut late = Vec::new();
    for (from_ms, to_ms) in ranges {
        late.push((
            from_ms,
            to_ms,
            queries
                .late_counts(from_ms, to_ms)
                .await
                .expect("late counts"),
        ));
    }
    Answers {
        devices: queries.list_devices().await.expect("devices"),
        series: queries.list_series().await.expect("series"),
        latest_all: queries.latest_values(&[]).await.expect("latest"),
        latest_some: queries
            .latest_values(&[all[4].clone(), missing, all[0].clone()])
            .await
            .expect("latest of some"),
        rollups,
        raw,
        late,
        unknown_resolution_refused: queries
            .rollup_range(1_234, &all, 0, i64::MAX)
            .await
            .is_err(),
    }
}

/// A ClickHouse store config for a test: a database of its own (`tributary_test_{name}_...`,
/// drop it with [`drop_database`]), the stores' rollups kept ten years, quick retries that
/// give up after 20 s.
pub fn clickhouse_config(url: &str, name: &str) -> ClickHouseStoreConfig {
    ClickHouseStoreConfig {
        url: url.to_string(),
        schema: SchemaConfig {
            database: format!("tributary_test_{name}_{}", unique_suffix()),
            rollups: RESOLUTIONS_MS
                .iter()
                .map(|resolution_ms| RollupSpec {
                    resolution_ms: *resolution_ms,
                    retention_days: 3_650,
                })
                .collect(),
            ..SchemaConfig::default()
        },
        retry: RetryPolicy {
            initial_delay_ms: 50,
            max_delay_ms: 1_000,
            give_up_after_ms: 20_000,
        },
        request_timeout_ms: 20_000,
        ..ClickHouseStoreConfig::default()
    }
}
