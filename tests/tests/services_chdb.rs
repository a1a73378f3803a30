//! Smoke test: run modern ClickHouse SQL through chdb (a current ClickHouse engine in-process,
//! installed by `deploy/dev/services.sh up`) from Rust.
//!
//! Why: the server from Debian is ClickHouse 18.16; the SQL we ship must also work on current
//! ClickHouse, including the features 18.16 lacks (TTL, CODEC, DateTime64, LowCardinality
//! without a setting). This proves the helper that later SQL checks use works end to end.

use tributary_tests::services::{chdb_run, service_env, CHDB_PYTHON};

const ROW_COUNT: u64 = 10_000;
const DEVICE_COUNT: u64 = 20;

#[test]
fn chdb_runs_modern_merge_tree_sql() {
    let Some(python) = service_env(CHDB_PYTHON) else {
        return;
    };
    let create = "CREATE TABLE readings (
            device_id LowCardinality(String),
            metric LowCardinality(String),
            event_time DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
            value Float64 CODEC(Gorilla, ZSTD(1))
        ) ENGINE = MergeTree
        PARTITION BY toYYYYMMDD(event_time)
        ORDER BY (device_id, metric, event_time)
        TTL toDateTime(event_time) + INTERVAL 3650 DAY";
    // 10k readings: 20 devices, one every 250 ms from 2026-01-01, value = number mod 100.
    let insert = format!(
        "INSERT INTO readings SELECT
            concat('device-', toString(number % {DEVICE_COUNT})),
            'temperature_c',
            toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + toIntervalMillisecond(number * 250),
            toFloat64(number % 100)
         FROM numbers({ROW_COUNT})"
    );
    let aggregate = "SELECT count() AS rows, sum(value) AS total, uniqExact(device_id) AS devices,
            toString(max(event_time)) AS last_time,
            countDistinct(toStartOfInterval(event_time, INTERVAL 1 MINUTE)) AS minutes
        FROM readings";
    let version = "SELECT version() AS version";
    let results = chdb_run(&python, &[create, &insert, aggregate, version])
        .unwrap_or_else(|error| panic!("chdb via {python}: {error}"));

    assert_eq!(results.len(), 4, "one result per statement: {results:?}");
    let row = results[2]
        .first()
        .unwrap_or_else(|| panic!("aggregate returned no row: {results:?}"));
    // ClickHouse may quote 64-bit integers in JSON; accept both spellings.
    let as_u64 = |name: &str| -> u64 {
        match &row[name] {
            serde_json::Value::Number(number) => number.as_u64(),
            serde_json::Value::String(text) => text.parse().ok(),
            _ => None,
        }
        .unwrap_or_else(|| panic!("{name} is not an integer in {row}"))
    };
    assert_eq!(as_u64("rows"), ROW_COUNT);
    assert_eq!(as_u64("devices"), DEVICE_COUNT);
    // sum over 100 full cycles of 0..99
    assert_eq!(row["total"].as_f64(), Some(100.0 * 4950.0));
    // the last reading is at (10000 - 1) * 250 ms = 2499.75 s after midnight
    assert_eq!(row["last_time"], "2026-01-01 00:41:39.750");
    assert_eq!(as_u64("minutes"), 42);
    let engine_version = results[3]
        .first()
        .and_then(|row| row["version"].as_str())
        .unwrap_or("?")
        .to_string();
    eprintln!(
        "chdb (ClickHouse {engine_version}) via {python}: MergeTree with TTL, LowCardinality, CODEC, DateTime64; inserted {ROW_COUNT} rows and aggregated them"
    );
}
