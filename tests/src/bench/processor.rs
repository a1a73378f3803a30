//! `bench processor`: the window engine's throughput on one core, ClickHouse insert
//! rows/s through the store, and freshness through the real consumer loop.
//!
//! Why these figures: the processor is where readings become answers, and issue 5 sets
//! its goals on one core (2 M raw readings/s; 20 M readings' worth/s when merging the
//! agents' edge summaries) and on ClickHouse ingestion. The workload is the simulated
//! fleet of `bench codec` (100 devices x 10 metrics at 1 Hz), cut into 10 s batches from
//! one agent, each carrying the definitions of every series it uses, as log records do.
//! Edge summaries are 10 s windows of the same readings (10 readings each).
//!
//! Baseline, same run and data: bare aggregation of the same items into a std `HashMap`
//! keyed by (series id, resolution, window start), with no watermarks, dedup, running
//! emission or late handling: what the engine's guarantees cost over the obvious loop.
//! For ClickHouse, the baseline is the same store with 1,000-row inserts instead of the
//! default batch policy: why the store batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tributary_collector::live::LiveFeed;
use tributary_collector::log::{
    AppendRecord, DurableLog, EmbeddedLog, EmbeddedLogConfig, RecordHeaders, SystemClock,
};
use tributary_collector::pipeline::{run_consumer, ConsumerConfig, PipelineMetrics};
use tributary_collector::process::{EngineConfig, EngineOutput, RollupSource, WindowEngine};
use tributary_collector::store::schema::{rollup_table_name, RAW_TABLE};
use tributary_collector::store::{
    last_seen_from_batch, raw_rows_from_batch, BatchPolicy, ClickHouseStore, ClickHouseStoreConfig,
    RetryPolicy, RollupSpec, SchemaConfig, Store,
};
use tributary_firmware_sim::fleet::{Fleet, Metric};
use tributary_protocol::{
    encode_batch, Batch, Reading, SeriesDef, SeriesKey, Summary, WindowSummary,
};

use super::{percentile, round3, BenchOptions};
use crate::services::{
    drop_clickhouse_database, lookup_service_env, running_in_ci, unique_suffix, CLICKHOUSE_URL,
};

const DEVICES: usize = 100;
const SEED: u64 = 2024;
const START_MS: i64 = 1_700_000_000_000;
const BATCH_SECONDS: usize = 10;
const EDGE_WINDOW_MS: u32 = 10_000;
const FULL_PERIODS: usize = 3600;
const QUICK_PERIODS: usize = 300;
const AGENT_ID: &str = "gateway-0001";
/// Rows handed to the store per write call (no more than the smallest batch policy measured).
const WRITE_CHUNK_ROWS: usize = 1_000;
/// Freshness: a live batch every 100 ms, of one reading for each of 200 series.
const FRESHNESS_INTERVAL_MS: u64 = 100;
const FRESHNESS_SERIES: u32 = 200;
/// How often the freshness poller asks ClickHouse what it shows.
const FRESHNESS_POLL_MS: u64 = 20;

/// Raw and summary batches of the same readings.
pub struct Workload {
    pub raw_batches: Vec<Batch>,
    pub summary_batches: Vec<Batch>,
    pub readings: u64,
}

fn summaries_of(readings: &[Reading]) -> Vec<WindowSummary> {
    let mut by_window: HashMap<(u32, i64), Summary> = HashMap::new();
    for reading in readings {
        let window_start_ms =
            reading.time_ms - reading.time_ms.rem_euclid(i64::from(EDGE_WINDOW_MS));
        by_window
            .entry((reading.series, window_start_ms))
            .or_default()
            .observe(reading.time_ms, reading.value);
    }
    let mut summaries: Vec<WindowSummary> = by_window
        .into_iter()
        .map(|((series, window_start_ms), summary)| WindowSummary {
            series,
            window_start_ms,
            window_ms: EDGE_WINDOW_MS,
            summary,
        })
        .collect();
    summaries.sort_by_key(|summary| (summary.series, summary.window_start_ms));
    summaries
}

/// The fleet's readings for `periods` seconds, as 10 s batches.
pub fn workload(periods: usize) -> Workload {
    let mut fleet = Fleet::new(DEVICES, SEED);
    let series: Vec<SeriesDef> = fleet.series();
    let mut raw_batches = Vec::new();
    let mut summary_batches = Vec::new();
    let mut readings_total = 0;
    for (index, first_period) in (0..periods).step_by(BATCH_SECONDS).enumerate() {
        let mut readings = Vec::with_capacity(BATCH_SECONDS * DEVICES * Metric::ALL.len());
        let last_period = (first_period + BATCH_SECONDS).min(periods);
        for period in first_period..last_period {
            fleet.sample_period(START_MS + period as i64 * 1000, &mut readings);
        }
        readings_total += readings.len() as u64;
        let created_ms = START_MS + last_period as i64 * 1000 + 200;
        let summaries = summaries_of(&readings);
        let mut raw = Batch {
            agent_id: AGENT_ID.into(),
            batch_seq: 2 * index as u64,
            created_ms,
            series: series.clone(),
            readings,
            summaries: Vec::new(),
        };
        raw.sort_readings();
        summary_batches.push(Batch {
            agent_id: AGENT_ID.into(),
            batch_seq: 2 * index as u64 + 1,
            created_ms,
            series: series.clone(),
            readings: Vec::new(),
            summaries,
        });
        raw_batches.push(raw);
    }
    Workload {
        raw_batches,
        summary_batches,
        readings: readings_total,
    }
}

fn engine_config(source: RollupSource) -> EngineConfig {
    EngineConfig {
        resolutions_ms: vec![60_000, 3_600_000],
        rollup_source: source,
        ..EngineConfig::default()
    }
}

/// Runs the engine over `batches` (log time = the batch's creation + 200 ms), returning
/// readings' worth windowed and seconds.
fn run_engine(batches: &[Batch], source: RollupSource) -> anyhow::Result<(u64, f64, usize)> {
    let mut engine = WindowEngine::new(engine_config(source))?;
    let mut out = EngineOutput::default();
    let mut emitted = 0;
    let started = Instant::now();
    for batch in batches {
        engine.ingest_batch(batch, batch.created_ms, &mut out)?;
        emitted += out.results.len();
        out.clear();
    }
    if let Some(last) = batches.last() {
        engine.flush_all(last.created_ms, &mut out);
        emitted += out.results.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    let resolutions = engine.config().resolutions_ms.len() as u64;
    Ok((
        engine.counters().readings_windowed / resolutions.max(1),
        seconds,
        emitted,
    ))
}

/// The baseline: the same items into a std `HashMap`, nothing else.
fn run_bare_aggregation(batches: &[Batch], source: RollupSource) -> (u64, f64) {
    let resolutions = [60_000_i64, 3_600_000];
    let mut windows: HashMap<(u32, i64, i64), Summary> = HashMap::new();
    let mut worth = 0;
    let started = Instant::now();
    for batch in batches {
        match source {
            RollupSource::RawReadings => {
                for reading in &batch.readings {
                    for resolution in resolutions {
                        let start = reading.time_ms - reading.time_ms.rem_euclid(resolution);
                        windows
                            .entry((reading.series, resolution, start))
                            .or_default()
                            .observe(reading.time_ms, reading.value);
                    }
                    worth += 1;
                }
            }
            RollupSource::EdgeSummaries => {
                for item in &batch.summaries {
                    for resolution in resolutions {
                        let start =
                            item.window_start_ms - item.window_start_ms.rem_euclid(resolution);
                        windows
                            .entry((item.series, resolution, start))
                            .or_default()
                            .merge(&item.summary);
                    }
                    worth += item.summary.count;
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    std::hint::black_box(&windows);
    (worth, seconds)
}

/// Best (fastest) of `repetitions` runs, as readings' worth per second.
fn best_rate(
    repetitions: usize,
    mut run: impl FnMut() -> anyhow::Result<(u64, f64)>,
) -> anyhow::Result<(u64, f64)> {
    let mut best: Option<(u64, f64)> = None;
    for _ in 0..repetitions.max(1) {
        let (worth, seconds) = run()?;
        let rate = worth as f64 / seconds.max(1e-9);
        if best.is_none_or(|(_, best_rate)| rate > best_rate) {
            best = Some((worth, rate));
        }
    }
    best.context("no repetition ran")
}

/// Runs the bench: one line for the engine, one for ClickHouse, one for freshness.
pub fn run(options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    let periods = if options.quick {
        QUICK_PERIODS
    } else {
        FULL_PERIODS
    };
    let repetitions = if options.quick { 1 } else { 5 };
    let parts = selected_parts()?;
    let workload = workload(periods);
    let mut lines = Vec::new();
    if parts.contains(&"engine") {
        lines.push(engine_line(&workload, repetitions)?);
    }
    if parts.contains(&"summary_engine") {
        lines.push(summary_engine_line(&workload, repetitions)?);
    }
    if parts.contains(&"clickhouse") {
        lines.push(clickhouse_line(&workload, options)?);
    }
    if parts.contains(&"freshness") {
        lines.extend(freshness_lines(options)?);
    }
    Ok(lines)
}

/// The parts of this bench, in the order they run. `summary_engine` (not run by default)
/// is the engine's edge-summary path alone, for profiling it.
const PARTS: [&str; 4] = ["engine", "summary_engine", "clickhouse", "freshness"];
const DEFAULT_PARTS: [&str; 3] = ["engine", "clickhouse", "freshness"];

/// `TRIBUTARY_BENCH_PROCESSOR_PARTS` (comma-separated names of [`PARTS`]) runs only some
/// parts, e.g. the engine alone under a profiler; every part when unset.
fn selected_parts() -> anyhow::Result<Vec<&'static str>> {
    let Ok(list) = std::env::var("TRIBUTARY_BENCH_PROCESSOR_PARTS") else {
        return Ok(DEFAULT_PARTS.to_vec());
    };
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            PARTS
                .iter()
                .copied()
                .find(|part| *part == name)
                .with_context(|| {
                    format!(
                        "TRIBUTARY_BENCH_PROCESSOR_PARTS names {name:?}; the parts are {}",
                        PARTS.join(", ")
                    )
                })
        })
        .collect()
}

fn summary_engine_line(workload: &Workload, repetitions: usize) -> anyhow::Result<Value> {
    let (summary_worth, summary_readings_per_s) = best_rate(repetitions, || {
        let (worth, seconds, _) =
            run_engine(&workload.summary_batches, RollupSource::EdgeSummaries)?;
        Ok((worth, seconds))
    })?;
    anyhow::ensure!(
        summary_worth == workload.readings,
        "the engine windowed {summary_worth} readings' worth of summaries of {} readings",
        workload.readings
    );
    Ok(json!({
        "bench": "processor",
        "part": "summary_engine",
        "readings": workload.readings,
        "summary_readings_per_s": summary_readings_per_s.round(),
        "repetitions": repetitions,
    }))
}

fn engine_line(workload: &Workload, repetitions: usize) -> anyhow::Result<Value> {
    let mut results_emitted = 0;
    let (raw_worth, readings_per_s) = best_rate(repetitions, || {
        let (worth, seconds, emitted) =
            run_engine(&workload.raw_batches, RollupSource::RawReadings)?;
        results_emitted = emitted;
        Ok((worth, seconds))
    })?;
    anyhow::ensure!(
        raw_worth == workload.readings,
        "the engine windowed {raw_worth} raw readings of {} sent: it lost or refused some",
        workload.readings
    );
    let (summary_worth, summary_readings_per_s) = best_rate(repetitions, || {
        let (worth, seconds, _) =
            run_engine(&workload.summary_batches, RollupSource::EdgeSummaries)?;
        Ok((worth, seconds))
    })?;
    anyhow::ensure!(
        summary_worth == workload.readings,
        "the engine windowed {summary_worth} readings' worth of summaries of {} readings",
        workload.readings
    );
    let (_, baseline_raw) = best_rate(repetitions, || {
        Ok(run_bare_aggregation(
            &workload.raw_batches,
            RollupSource::RawReadings,
        ))
    })?;
    let (_, baseline_summary) = best_rate(repetitions, || {
        Ok(run_bare_aggregation(
            &workload.summary_batches,
            RollupSource::EdgeSummaries,
        ))
    })?;

    Ok(json!({
        "bench": "processor",
        "part": "engine",
        "readings": workload.readings,
        "series": DEVICES * Metric::ALL.len(),
        "batches": workload.raw_batches.len(),
        "resolutions_ms": [60_000, 3_600_000],
        "edge_window_ms": EDGE_WINDOW_MS,
        "results_emitted_raw": results_emitted,
        "readings_per_s": readings_per_s.round(),
        "summary_readings_per_s": summary_readings_per_s.round(),
        "baseline_bare_hashmap_readings_per_s": baseline_raw.round(),
        "baseline_bare_hashmap_summary_readings_per_s": baseline_summary.round(),
        "repetitions": repetitions,
    }))
}

fn store_config(url: &str, database: &str, max_batch_rows: usize) -> ClickHouseStoreConfig {
    ClickHouseStoreConfig {
        url: url.to_string(),
        schema: SchemaConfig {
            database: database.to_string(),
            raw_retention_days: 36_500,
            late_retention_days: 36_500,
            rollups: vec![
                RollupSpec {
                    resolution_ms: 60_000,
                    retention_days: 36_500,
                },
                RollupSpec {
                    resolution_ms: 3_600_000,
                    retention_days: 36_500,
                },
            ],
        },
        batch: BatchPolicy {
            max_batch_rows,
            max_batch_age_ms: 1_000,
        },
        retry: RetryPolicy {
            initial_delay_ms: 100,
            max_delay_ms: 2_000,
            give_up_after_ms: 30_000,
        },
        request_timeout_ms: 60_000,
        ..ClickHouseStoreConfig::default()
    }
}

/// Feeds raw batches through the engine and writes everything the processor writes (raw
/// rows, window results, late rows, last-seen) to ClickHouse; returns rows, seconds, inserts.
async fn insert_through_store(
    url: &str,
    batches: &[Batch],
    max_batch_rows: usize,
) -> anyhow::Result<(usize, f64, usize)> {
    let database = format!("tributary_bench_{}", unique_suffix());
    let now_ms = START_MS;
    let mut store = ClickHouseStore::connect(store_config(url, &database, max_batch_rows), now_ms)
        .await
        .with_context(|| format!("connecting the ClickHouse store at {url}"))?;
    let result = async {
        let mut engine = WindowEngine::new(engine_config(RollupSource::RawReadings))?;
        let mut out = EngineOutput::default();
        let mut rows_written = 0;
        let mut flushes = 0;
        let started = Instant::now();
        for batch in batches {
            engine.ingest_batch(batch, batch.created_ms, &mut out)?;
            let now_ms = batch.created_ms;
            let (mut rows, _) = raw_rows_from_batch(batch);
            store.write_last_seen(last_seen_from_batch(batch, now_ms), now_ms);
            store.write_late_readings(&out.late, now_ms);
            // Rows reach the store in chunks of at most WRITE_CHUNK_ROWS, so the batch
            // policy (not the size of a log record) decides how big each insert is. The
            // bench feeds faster than real time, so the row count decides, never the age.
            let mut results = out.results.as_slice();
            while !rows.is_empty() || !results.is_empty() {
                let raw_chunk: Vec<_> = rows.drain(..rows.len().min(WRITE_CHUNK_ROWS)).collect();
                let result_count = results
                    .len()
                    .min(WRITE_CHUNK_ROWS.saturating_sub(raw_chunk.len()));
                let (result_chunk, rest) = results.split_at(result_count);
                results = rest;
                store.write_raw_readings(raw_chunk, now_ms);
                store.write_window_results(result_chunk, now_ms)?;
                if store.buffered_rows() >= max_batch_rows {
                    rows_written += store.flush().await?.rows_written;
                    flushes += 1;
                }
            }
            out.clear();
        }
        rows_written += store.flush().await?.rows_written;
        flushes += 1;
        anyhow::Ok((rows_written, started.elapsed().as_secs_f64(), flushes))
    }
    .await;
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        drop_clickhouse_database(url, &database),
    )
    .await;
    result
}

fn clickhouse_line(workload: &Workload, options: &BenchOptions) -> anyhow::Result<Value> {
    let Some(url) = lookup_service_env(CLICKHOUSE_URL) else {
        anyhow::ensure!(
            !running_in_ci(),
            "CI=true and {CLICKHOUSE_URL} is not set; start the services with `deploy/dev/services.sh up`"
        );
        return Ok(json!({
            "bench": "processor",
            "part": "clickhouse",
            "clickhouse_rows_per_s": Value::Null,
            "note": format!("skipped: {CLICKHOUSE_URL} not set; run deploy/dev/services.sh up"),
        }));
    };
    let batch_count = if options.quick { 6 } else { 60 };
    let baseline_batch_count = if options.quick { 2 } else { 10 };
    let batches = workload
        .raw_batches
        .get(..batch_count.min(workload.raw_batches.len()))
        .unwrap_or(&workload.raw_batches);
    let baseline_batches = batches
        .get(..baseline_batch_count.min(batches.len()))
        .unwrap_or(batches);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let default_rows = BatchPolicy::default().max_batch_rows;
    let (rows, seconds, inserts) =
        runtime.block_on(insert_through_store(&url, batches, default_rows))?;
    let (baseline_rows, baseline_seconds, baseline_inserts) =
        runtime.block_on(insert_through_store(&url, baseline_batches, 1_000))?;
    Ok(json!({
        "bench": "processor",
        "part": "clickhouse",
        "server": "ClickHouse at TRIBUTARY_CLICKHOUSE_URL",
        "rows": rows,
        "seconds": round3(seconds),
        "flushes": inserts,
        "max_batch_rows": default_rows,
        "clickhouse_rows_per_s": (rows as f64 / seconds.max(1e-9)).round(),
        "baseline_1000_row_inserts_rows": baseline_rows,
        "baseline_1000_row_inserts_rows_per_s": (baseline_rows as f64 / baseline_seconds.max(1e-9)).round(),
        "baseline_flushes": baseline_inserts,
    }))
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct MaxRow {
    value: i64,
}

/// Newest raw reading time and newest rollup `last_time_ms` of `agent_id` visible now.
async fn visible_times(
    client: &clickhouse::Client,
    database: &str,
    agent_id: &str,
) -> anyhow::Result<(i64, i64)> {
    let raw: MaxRow = client
        .query(&format!(
            "SELECT max(time_ms) AS value FROM {database}.{RAW_TABLE} WHERE agent_id = ?"
        ))
        .bind(agent_id)
        .fetch_one()
        .await?;
    let rollup: MaxRow = client
        .query(&format!(
            "SELECT max(last_time_ms) AS value FROM {database}.{} WHERE agent_id = ?",
            rollup_table_name(60_000)
        ))
        .bind(agent_id)
        .fetch_one()
        .await?;
    Ok((raw.value, rollup.value))
}

/// Freshness through the real consumer loop: a live agent's batches appended to the
/// embedded log every FRESHNESS_INTERVAL_MS; a poller asks ClickHouse every
/// FRESHNESS_POLL_MS for the newest raw row and the newest running 1 min rollup. A
/// batch's freshness is from its append returning to the first poll (completion time)
/// that shows it, so the figures include up to one poll interval plus a query.
async fn measure_freshness(
    url: &str,
    quick: bool,
    policy: Option<FlushPolicy>,
) -> anyhow::Result<Value> {
    let database = format!("tributary_bench_fresh_{}", unique_suffix());
    let agent_id = format!("fresh-{}", unique_suffix());
    let state = tempfile::tempdir()?;
    let log = Arc::new(EmbeddedLog::open(
        EmbeddedLogConfig::new(state.path().join("log")),
        SystemClock,
    )?);
    let store = ClickHouseStore::connect(
        store_config(url, &database, BatchPolicy::default().max_batch_rows),
        system_now_ms(),
    )
    .await
    .with_context(|| format!("connecting the ClickHouse store at {url}"))?;
    let mut consumer_config = ConsumerConfig {
        engine: engine_config(RollupSource::RawReadings),
        ..ConsumerConfig::default()
    };
    if let Some(policy) = policy {
        consumer_config.engine.emit_interval_ms = policy.emit_interval_ms;
        consumer_config.caught_up_flush_interval_ms = policy.caught_up_flush_interval_ms;
    }
    let caught_up_flush_interval_ms = consumer_config.caught_up_flush_interval_ms;
    let emit_interval_ms = consumer_config.engine.emit_interval_ms;
    let stop = tokio_util::sync::CancellationToken::new();
    let metrics = Arc::new(PipelineMetrics::default());
    let consumer_started = Instant::now();
    let consumer = tokio::spawn(run_consumer(
        log.clone(),
        store,
        SystemClock,
        consumer_config,
        LiveFeed::default(),
        metrics.clone(),
        stop.clone(),
    ));
    let client = clickhouse::Client::default()
        .with_url(url)
        .with_validation(false);
    let polls: Arc<std::sync::Mutex<Vec<(Instant, i64, i64)>>> = Arc::default();
    let last_poll_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let poller = {
        let client = client.clone();
        let database = database.clone();
        let agent_id = agent_id.clone();
        let polls = polls.clone();
        let last_poll_error = last_poll_error.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(FRESHNESS_POLL_MS));
            while !stop.is_cancelled() {
                ticker.tick().await;
                match visible_times(&client, &database, &agent_id).await {
                    Ok((raw, rollup)) => {
                        if let Ok(mut polls) = polls.lock() {
                            polls.push((Instant::now(), raw, rollup));
                        }
                    }
                    Err(error) => {
                        if let Ok(mut last_error) = last_poll_error.lock() {
                            *last_error = Some(error.to_string());
                        }
                    }
                }
            }
        })
    };

    let batches = if quick { 30 } else { 300 };
    let series: Vec<SeriesDef> = (0..FRESHNESS_SERIES)
        .map(|index| SeriesDef {
            id: index,
            key: SeriesKey::new(
                format!("fresh-device-{}", index / 10),
                format!("metric-{}", index % 10),
            ),
        })
        .collect();
    let mut appended: Vec<(Instant, i64)> = Vec::with_capacity(batches);
    let produced = async {
        let started = tokio::time::Instant::now();
        for batch_seq in 0..batches {
            tokio::time::sleep_until(
                started + Duration::from_millis(FRESHNESS_INTERVAL_MS * batch_seq as u64),
            )
            .await;
            let newest_ms = system_now_ms();
            let batch = Batch {
                agent_id: agent_id.clone(),
                batch_seq: batch_seq as u64,
                created_ms: newest_ms,
                series: series.clone(),
                readings: series
                    .iter()
                    .map(|definition| Reading {
                        series: definition.id,
                        time_ms: newest_ms,
                        value: f64::from(definition.id) + batch_seq as f64 * 0.01,
                        flags: 0,
                    })
                    .collect(),
                summaries: Vec::new(),
            };
            log.append(AppendRecord {
                headers: RecordHeaders {
                    agent_id: agent_id.clone(),
                    batch_seq: batch_seq as u64,
                    protocol_version: tributary_protocol::session::PROTOCOL_VERSION,
                },
                value: encode_batch(&batch).into(),
            })
            .await?;
            appended.push((Instant::now(), newest_ms));
        }
        let newest_ms = appended.last().map_or(0, |(_, time_ms)| *time_ms);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = polls
                .lock()
                .ok()
                .and_then(|polls| polls.last().copied())
                .is_some_and(|(_, raw, rollup)| raw >= newest_ms && rollup >= newest_ms);
            if seen {
                break;
            }
            if Instant::now() > deadline {
                let last = polls.lock().ok().and_then(|polls| polls.last().copied());
                anyhow::bail!(
                    "the last batch (newest reading {newest_ms}) did not become queryable in \
                     ClickHouse within 60 s; last poll (raw, rollup): {:?}; last poll error: {:?}",
                    last.map(|(_, raw, rollup)| (raw, rollup)),
                    last_poll_error.lock().ok().and_then(|error| error.clone())
                );
            }
            tokio::time::sleep(Duration::from_millis(FRESHNESS_POLL_MS)).await;
        }
        anyhow::Ok(())
    }
    .await;
    let consumer_seconds = consumer_started.elapsed().as_secs_f64();
    let flushes = metrics.flushes.load(std::sync::atomic::Ordering::Relaxed);
    let results_written = metrics
        .results_written
        .load(std::sync::atomic::Ordering::Relaxed);
    stop.cancel();
    let _ = poller.await;
    let consumer_outcome = tokio::time::timeout(Duration::from_secs(60), consumer).await;
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        drop_clickhouse_database(url, &database),
    )
    .await;
    produced?;
    match consumer_outcome {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(error))) => return Err(error).context("the consumer loop failed"),
        Ok(Err(error)) => return Err(error).context("the consumer task panicked"),
        Err(_) => anyhow::bail!("the consumer loop did not stop within 60 s"),
    }

    let polls = polls.lock().map(|polls| polls.clone()).unwrap_or_default();
    let freshness = |pick: fn(&(Instant, i64, i64)) -> i64| -> Vec<f64> {
        let mut delays: Vec<f64> = appended
            .iter()
            .filter_map(|(appended_at, newest_ms)| {
                polls
                    .iter()
                    .find(|poll| poll.0 >= *appended_at && pick(poll) >= *newest_ms)
                    .map(|poll| (poll.0 - *appended_at).as_secs_f64() * 1e3)
            })
            .collect();
        delays.sort_by(f64::total_cmp);
        delays
    };
    let raw = freshness(|poll| poll.1);
    let rollup = freshness(|poll| poll.2);
    Ok(json!({
        "bench": "processor",
        "part": "freshness",
        "batches": batches,
        "batch_interval_ms": FRESHNESS_INTERVAL_MS,
        "readings_per_batch": FRESHNESS_SERIES,
        "poll_interval_ms": FRESHNESS_POLL_MS,
        "caught_up_flush_interval_ms": caught_up_flush_interval_ms,
        "emit_interval_ms": emit_interval_ms,
        "flushes": flushes,
        "flushes_per_s": round3(flushes as f64 / consumer_seconds.max(1e-9)),
        "window_results_written": results_written,
        "readings_appended": batches as u64 * u64::from(FRESHNESS_SERIES),
        "raw_measured": raw.len(),
        "p50_ms": round3(percentile(&raw, 0.5)),
        "p99_ms": round3(percentile(&raw, 0.99)),
        "rollup_measured": rollup.len(),
        "rollup_p50_ms": round3(percentile(&rollup, 0.5)),
        "rollup_p99_ms": round3(percentile(&rollup, 0.99)),
    }))
}

fn system_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

/// A flush policy the freshness part can try instead of the defaults.
#[derive(Debug, Clone, Copy)]
struct FlushPolicy {
    emit_interval_ms: i64,
    caught_up_flush_interval_ms: i64,
}

/// `TRIBUTARY_BENCH_FRESHNESS_POLICIES`: comma-separated `EMIT_MS/FLUSH_MS` pairs (engine
/// emission interval / caught-up flush interval) to measure one after the other; the
/// defaults alone when unset.
fn freshness_policies() -> anyhow::Result<Vec<Option<FlushPolicy>>> {
    let Ok(list) = std::env::var("TRIBUTARY_BENCH_FRESHNESS_POLICIES") else {
        return Ok(vec![None]);
    };
    list.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let parsed = pair.split_once('/').and_then(|(emit, flush)| {
                Some(FlushPolicy {
                    emit_interval_ms: emit.trim().parse().ok().filter(|ms| *ms > 0)?,
                    caught_up_flush_interval_ms: flush.trim().parse().ok().filter(|ms| *ms >= 0)?,
                })
            });
            parsed.map(Some).with_context(|| {
                format!(
                    "TRIBUTARY_BENCH_FRESHNESS_POLICIES: {pair:?} is not EMIT_MS/FLUSH_MS \
                     (e.g. 200/200)"
                )
            })
        })
        .collect()
}

fn freshness_lines(options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    freshness_policies()?
        .into_iter()
        .map(|policy| freshness_line(options, policy))
        .collect()
}

fn freshness_line(options: &BenchOptions, policy: Option<FlushPolicy>) -> anyhow::Result<Value> {
    let Some(url) = lookup_service_env(CLICKHOUSE_URL) else {
        anyhow::ensure!(
            !running_in_ci(),
            "CI=true and {CLICKHOUSE_URL} is not set; start the services with `deploy/dev/services.sh up`"
        );
        return Ok(json!({
            "bench": "processor",
            "part": "freshness",
            "p50_ms": Value::Null,
            "p99_ms": Value::Null,
            "note": format!("skipped: {CLICKHOUSE_URL} not set; run deploy/dev/services.sh up"),
        }));
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(measure_freshness(&url, options.quick, policy))
}
