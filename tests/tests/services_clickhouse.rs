//! Smoke test: insert rows into the ClickHouse server that `deploy/dev/services.sh up` starts
//! and read an aggregate back, with the `clickhouse` crate the collector's store uses.
//!
//! Why: the Debian server is ClickHouse 18.16, which lacks `RowBinaryWithNamesAndTypes`, so the
//! client must run with validation off and plain `RowBinary`; this proves that path end to end,
//! and that the version is detected with `SELECT version()` as the store will do.

use std::collections::BTreeMap;

use clickhouse::{Client, Row};
use serde::Serialize;
use tributary_tests::services::{service_env, unique_suffix, CLICKHOUSE_URL};

const ROW_COUNT: u32 = 10_000;
const DEVICE_COUNT: u32 = 100;
const METRICS: [&str; 2] = ["temperature_c", "humidity_pct"];
/// 2026-01-01T00:00:00Z, so every row lands in a real daily partition.
const START_UNIX_S: u32 = 1_767_225_600;

#[derive(Row, Serialize)]
struct ReadingRow {
    device_id: String,
    metric: String,
    /// DateTime is seconds since the epoch in RowBinary.
    event_time: u32,
    value: f64,
}

fn reading(index: u32) -> ReadingRow {
    ReadingRow {
        device_id: format!("device-{}", index % DEVICE_COUNT),
        metric: METRICS[(index % 2) as usize].to_string(),
        event_time: START_UNIX_S + index * 10,
        // Multiples of 0.25 below 2^53 add up exactly in f64, so sums compare with ==.
        value: f64::from(index % 400) * 0.25,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_insert_then_aggregate() {
    let Some(url) = service_env(CLICKHOUSE_URL) else {
        return;
    };
    let client = Client::default().with_url(&url).with_validation(false);
    let version: String = client
        .query("SELECT version()")
        .fetch_one()
        .await
        .unwrap_or_else(|error| panic!("clickhouse at {url}: SELECT version(): {error}"));

    let table = format!("tributary_smoke_{}", unique_suffix());
    client
        .query(&format!(
            "CREATE TABLE {table} (device_id String, metric String, event_time DateTime, value Float64) \
             ENGINE = MergeTree() PARTITION BY toYYYYMMDD(event_time) ORDER BY (device_id, metric, event_time)"
        ))
        .execute()
        .await
        .unwrap_or_else(|error| panic!("clickhouse {version} at {url}: create {table}: {error}"));

    let mut insert = client
        .insert::<ReadingRow>(&table)
        .await
        .unwrap_or_else(|error| panic!("clickhouse at {url}: begin insert into {table}: {error}"));
    for index in 0..ROW_COUNT {
        insert
            .write(&reading(index))
            .await
            .unwrap_or_else(|error| panic!("clickhouse at {url}: write row {index}: {error}"));
    }
    insert
        .end()
        .await
        .unwrap_or_else(|error| panic!("clickhouse at {url}: finish insert into {table}: {error}"));

    let expected_rows: Vec<ReadingRow> = (0..ROW_COUNT).map(reading).collect();
    let expected_sum: f64 = expected_rows.iter().map(|row| row.value).sum();
    let expected_max = expected_rows
        .iter()
        .map(|row| row.value)
        .fold(f64::MIN, f64::max);
    let (count, sum, min, max, devices): (u64, f64, f64, f64, u64) = client
        .query(&format!(
            "SELECT count(), sum(value), min(value), max(value), uniqExact(device_id) FROM {table}"
        ))
        .fetch_one()
        .await
        .unwrap_or_else(|error| panic!("clickhouse at {url}: aggregate {table}: {error}"));
    assert_eq!(count, u64::from(ROW_COUNT));
    assert_eq!(sum, expected_sum);
    assert_eq!(min, 0.0);
    assert_eq!(max, expected_max);
    assert_eq!(devices, u64::from(DEVICE_COUNT));

    let per_metric: Vec<(String, u64, f64)> = client
        .query(&format!(
            "SELECT metric, count(), sum(value) FROM {table} GROUP BY metric ORDER BY metric"
        ))
        .fetch_all()
        .await
        .unwrap_or_else(|error| panic!("clickhouse at {url}: group by metric on {table}: {error}"));
    let mut expected_per_metric: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for row in &expected_rows {
        let entry = expected_per_metric.entry(row.metric.clone()).or_default();
        entry.0 += 1;
        entry.1 += row.value;
    }
    let expected_per_metric: Vec<(String, u64, f64)> = expected_per_metric
        .into_iter()
        .map(|(metric, (rows, sum))| (metric, rows, sum))
        .collect();
    assert_eq!(per_metric, expected_per_metric);

    client
        .query(&format!("DROP TABLE {table}"))
        .execute()
        .await
        .unwrap_or_else(|error| panic!("clickhouse at {url}: drop {table}: {error}"));
    eprintln!(
        "clickhouse {version} at {url}: inserted {ROW_COUNT} rows (RowBinary, lz4) and read back count/sum/min/max/uniqExact and a per-metric GROUP BY"
    );
}
