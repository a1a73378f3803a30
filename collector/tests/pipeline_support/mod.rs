//! Shared helpers of the consumer-loop tests: a generated stream (out of order, with
//! duplicates), the brute-force reference (the engine run in-process over the same log
//! records), and comparisons of what a store holds against it.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use tributary_collector::log::{AppendRecord, DurableLog, LogRecord, RecordHeaders};
use tributary_collector::process::{EngineConfig, EngineOutput, WindowEngine, WindowResult};
use tributary_collector::store::{render_tags, Queries, RollupRow, SeriesSelector};
use tributary_protocol::batch::BatchDecoder;
use tributary_protocol::{
    encode_batch, Batch, BatchLimits, Reading, SeriesDef, SeriesKey, Summary, WindowSummary,
};

pub const EDGE_WINDOW_MS: i64 = 10_000;
pub const SERIES_PER_AGENT: usize = 2;
pub const READINGS_PER_SERIES: usize = 10;

pub fn engine_config() -> EngineConfig {
    EngineConfig {
        resolutions_ms: vec![60_000, 600_000],
        ..EngineConfig::default()
    }
}

/// The generated stream: batches in log append order (duplicates included).
pub struct Dataset {
    pub batches: Vec<Batch>,
    pub duplicates: usize,
    pub unique_readings: usize,
    pub series: Vec<SeriesSelector>,
    pub from_ms: i64,
    pub to_ms: i64,
}

fn series_key(agent: usize, index: usize) -> SeriesKey {
    SeriesKey::new(format!("dev-{agent}-{index}"), "temperature_c")
        .with_tags([("site", format!("site-{agent}"))])
}

fn value(agent: usize, batch_seq: u64, index: usize, reading: usize) -> f64 {
    let mixed =
        (agent as u64 * 7_919 + batch_seq * 104_729 + index as u64 * 31 + reading as u64 * 17)
            % 1_000;
    mixed as f64 / 10.0 - 20.25
}

/// `agents` agents, each sending `batches_per_agent` batches of 10 s of 1 Hz data for two
/// series (raw readings and one edge summary per series), starting at `start_ms` (aligned
/// to 10 min). Every 7th batch swaps places with the next; every 13th is sent again later.
pub fn dataset(agents: usize, batches_per_agent: u64, start_ms: i64) -> Dataset {
    let mut per_agent: Vec<Vec<Batch>> = Vec::new();
    let mut unique_readings = 0;
    for agent in 0..agents {
        let mut batches = Vec::new();
        for batch_seq in 0..batches_per_agent {
            let window_start_ms = start_ms + batch_seq as i64 * EDGE_WINDOW_MS;
            let mut batch = Batch {
                agent_id: format!("agent-{agent}"),
                batch_seq,
                created_ms: window_start_ms + EDGE_WINDOW_MS,
                series: Vec::new(),
                readings: Vec::new(),
                summaries: Vec::new(),
            };
            for index in 0..SERIES_PER_AGENT {
                let id = index as u32 + 1;
                batch.series.push(SeriesDef {
                    id,
                    key: series_key(agent, index),
                });
                let mut summary = Summary::empty();
                for reading in 0..READINGS_PER_SERIES {
                    let time_ms = window_start_ms + reading as i64 * 1_000;
                    let value = value(agent, batch_seq, index, reading);
                    summary.observe(time_ms, value);
                    batch.readings.push(Reading {
                        series: id,
                        time_ms,
                        value,
                        flags: 0,
                    });
                }
                batch.summaries.push(WindowSummary {
                    series: id,
                    window_start_ms,
                    window_ms: EDGE_WINDOW_MS as u32,
                    summary,
                });
                unique_readings += READINGS_PER_SERIES;
            }
            batches.push(batch);
        }
        let mut index = 0;
        while index + 1 < batches.len() {
            if index % 7 == 3 {
                batches.swap(index, index + 1);
            }
            index += 1;
        }
        let mut with_duplicates = Vec::new();
        for (position, batch) in batches.iter().enumerate() {
            with_duplicates.push(batch.clone());
            if position % 13 == 5 && position >= 2 {
                if let Some(earlier) = batches.get(position - 2) {
                    with_duplicates.push(earlier.clone());
                }
            }
        }
        per_agent.push(with_duplicates);
    }
    let total_unique = agents * batches_per_agent as usize;
    let mut batches = Vec::new();
    let longest = per_agent.iter().map(Vec::len).max().unwrap_or(0);
    for position in 0..longest {
        for agent_batches in &per_agent {
            if let Some(batch) = agent_batches.get(position) {
                batches.push(batch.clone());
            }
        }
    }
    let series = (0..agents)
        .flat_map(|agent| (0..SERIES_PER_AGENT).map(move |index| series_key(agent, index)))
        .map(|key| SeriesSelector::for_key(&key))
        .collect();
    Dataset {
        duplicates: batches.len() - total_unique,
        batches,
        unique_readings,
        series,
        from_ms: start_ms - 86_400_000,
        to_ms: start_ms + batches_per_agent as i64 * EDGE_WINDOW_MS + 86_400_000,
    }
}

pub fn record(batch: &Batch) -> AppendRecord {
    AppendRecord {
        headers: RecordHeaders {
            agent_id: batch.agent_id.clone(),
            batch_seq: batch.batch_seq,
            protocol_version: 1,
        },
        value: encode_batch(batch).into(),
    }
}

/// The tick a caught-up consumer ends with: at least one emission interval past each
/// partition's last record of the run.
pub fn final_ticks(
    records: &[&LogRecord],
    partitions: u32,
    wall_ms: i64,
    config: &EngineConfig,
) -> Vec<Step<'static>> {
    (0..partitions)
        .map(|partition| {
            let last = records
                .iter()
                .filter(|record| record.partition == partition)
                .map(|record| record.timestamp_ms)
                .max();
            Step::Tick {
                partition,
                now_ms: last.map_or(wall_ms, |last| wall_ms.max(last + config.emit_interval_ms)),
            }
        })
        .collect()
}

/// Every record of every partition, in offset order per partition.
pub async fn read_all<L: DurableLog>(log: &L) -> Vec<LogRecord> {
    let mut records = Vec::new();
    for partition in 0..log.partition_count() {
        let range = log.offset_range(partition).await.unwrap();
        let mut offset = range.earliest;
        while offset < range.next {
            let batch = log.read(partition, offset, 1 << 22).await.unwrap();
            let Some(last) = batch.last() else { break };
            offset = last.offset + 1;
            records.extend(batch);
        }
    }
    records
}

/// A storage key of a window: agent, device, metric, tags, resolution, start.
pub type WindowKey = (String, String, String, String, i64, i64);

/// What is compared of a window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowValue {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: (i64, f64),
    pub last: (i64, f64),
    pub is_final: bool,
}

fn result_key(result: &WindowResult) -> WindowKey {
    (
        result.agent_id.to_string(),
        result.series.device_id.clone(),
        result.series.metric.clone(),
        render_tags(&result.series.tags),
        result.resolution_ms,
        result.window_start_ms,
    )
}

/// A step of the reference run: a record, or a tick of one partition's engine.
pub enum Step<'a> {
    Record(&'a LogRecord),
    Tick { partition: u32, now_ms: i64 },
}

/// The brute-force reference: one engine per partition over the same records (and ticks);
/// the highest version per window wins, as in the store.
pub fn reference(
    steps: &[Step<'_>],
    partitions: u32,
    config: &EngineConfig,
) -> BTreeMap<WindowKey, WindowValue> {
    let mut engines: Vec<WindowEngine> = (0..partitions)
        .map(|_| WindowEngine::new(config.clone()).unwrap())
        .collect();
    let mut decoder = BatchDecoder::new();
    let mut out = EngineOutput::default();
    let mut best: BTreeMap<WindowKey, (u64, WindowValue)> = BTreeMap::new();
    for step in steps {
        out.clear();
        match step {
            Step::Record(record) => {
                let batch = decoder
                    .decode(&record.value, &BatchLimits::default())
                    .unwrap();
                engines[record.partition as usize]
                    .ingest_batch(&batch, record.timestamp_ms, &mut out)
                    .unwrap();
            }
            Step::Tick { partition, now_ms } => {
                engines[*partition as usize].advance_time(*now_ms, &mut out);
            }
        }
        for result in &out.results {
            let summary = &result.summary;
            let value = WindowValue {
                count: summary.count,
                sum: summary.sum,
                min: summary.min,
                max: summary.max,
                first: (summary.first_time_ms, summary.first_value),
                last: (summary.last_time_ms, summary.last_value),
                is_final: result.is_final,
            };
            let entry = best.entry(result_key(result)).or_insert((0, value.clone()));
            if result.version >= entry.0 {
                *entry = (result.version, value);
            }
        }
    }
    best.into_iter()
        .map(|(key, (_, value))| (key, value))
        .collect()
}

pub fn row_value(row: &RollupRow) -> WindowValue {
    WindowValue {
        count: row.count,
        sum: row.sum,
        min: row.min,
        max: row.max,
        first: (row.first_time_ms, row.first_value),
        last: (row.last_time_ms, row.last_value),
        is_final: row.is_final != 0,
    }
}

/// Every stored rollup of `series` at the engine's resolutions.
pub async fn stored_rollups(
    queries: &Queries,
    data: &Dataset,
    config: &EngineConfig,
) -> BTreeMap<WindowKey, WindowValue> {
    let mut stored = BTreeMap::new();
    for resolution_ms in &config.resolutions_ms {
        let rows = queries
            .rollup_range(*resolution_ms, &data.series, data.from_ms, data.to_ms)
            .await
            .unwrap();
        for row in rows {
            let key = (
                row.agent_id.clone(),
                row.device_id.clone(),
                row.metric.clone(),
                row.tags.clone(),
                *resolution_ms,
                row.window_start_ms,
            );
            assert!(
                stored.insert(key.clone(), row_value(&row)).is_none(),
                "window {key:?} read twice"
            );
        }
    }
    stored
}

/// Equal windows, with sums equal up to a relative 1e-9; `compare_final` also checks the
/// final flags.
pub fn assert_same_windows(
    actual: &BTreeMap<WindowKey, WindowValue>,
    expected: &BTreeMap<WindowKey, WindowValue>,
    compare_final: bool,
) {
    let actual_keys: BTreeSet<&WindowKey> = actual.keys().collect();
    let expected_keys: BTreeSet<&WindowKey> = expected.keys().collect();
    assert_eq!(
        actual_keys.len(),
        expected_keys.len(),
        "window count differs; missing: {:?}; extra: {:?}",
        expected_keys
            .difference(&actual_keys)
            .take(5)
            .collect::<Vec<_>>(),
        actual_keys
            .difference(&expected_keys)
            .take(5)
            .collect::<Vec<_>>()
    );
    for (key, want) in expected {
        let got = actual
            .get(key)
            .unwrap_or_else(|| panic!("window {key:?} is missing"));
        let tolerance = 1e-9 * want.sum.abs().max(1.0);
        assert!(
            (got.sum - want.sum).abs() <= tolerance,
            "{key:?}: sum {} != {}",
            got.sum,
            want.sum
        );
        let strip = |value: &WindowValue| WindowValue {
            sum: 0.0,
            is_final: compare_final && value.is_final,
            ..value.clone()
        };
        assert_eq!(strip(got), strip(want), "window {key:?}");
    }
}

/// Raw rows of the dataset's series: asserts each `(agent, batch, position)` appears once
/// and returns how many there are.
pub async fn raw_rows_once(queries: &Queries, data: &Dataset) -> usize {
    let rows = queries
        .raw_range(&data.series, data.from_ms, data.to_ms)
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    for row in &rows {
        assert!(
            seen.insert((row.agent_id.clone(), row.batch_seq, row.position)),
            "raw row {}/{}/{} stored twice",
            row.agent_id,
            row.batch_seq,
            row.position
        );
    }
    rows.len()
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `GET /metrics` from a child collector; `None` while it does not answer.
pub fn scrape(port: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of a metric line (`name{labels} value`) in a scrape.
pub fn metric(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name_and_labels)?;
        rest.trim().parse::<f64>().ok().map(|value| value as u64)
    })
}

/// Waits for `condition` with a deadline, polling every 50 ms.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills a child on drop (a failing test never leaves a collector running).
pub struct ChildGuard(pub Option<std::process::Child>);

impl ChildGuard {
    pub fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("child already taken")
    }

    /// Waits for the child to exit, with a deadline; returns its output.
    pub fn wait(mut self, timeout: Duration) -> std::process::Output {
        let mut child = self.0.take().expect("child already taken");
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait().unwrap().is_some() {
                return child.wait_with_output().unwrap();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!(
                    "child did not exit within {timeout:?}; stderr:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends SIGTERM (graceful shutdown).
pub fn terminate(child: &std::process::Child) {
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

pub fn collector_binary() -> &'static str {
    env!("CARGO_BIN_EXE_tributary-collector")
}
