//! The ClickHouse store against the real server from `deploy/dev/services.sh up` (Debian's
//! ClickHouse 18.16, the legacy dialect): schema creation (twice: idempotent), replaced window
//! versions, a retried raw insert, every query with exact values, retention by dropping
//! partitions, and writes that survive the server being stopped and started again.
//!
//! Each test uses its own database, so runs never see each other's rows.

mod store_support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tributary_collector::process::{
    LateItem, LateReading, LateReason, WindowResult, FINAL_VERSION_BIT,
};
use tributary_collector::store::schema::{Dialect, RollupSpec, SchemaConfig, SeriesSelector};
use tributary_collector::store::{
    ClickHouseStore, ClickHouseStoreConfig, LastSeenRow, RawReadingRow, Store,
};
use tributary_protocol::SeriesKey;
use tributary_tests::services::{
    drop_clickhouse_database, service_env, CLICKHOUSE_URL, SERVICES_SCRIPT,
};

use store_support::{clickhouse_config, window_result, DAY_MS, HOUR_MS, MINUTE_MS, T0};

/// Two resolutions with their own retentions, raw kept 7 days and late rows 30: the
/// retention test counts on these.
fn config(url: &str, name: &str) -> ClickHouseStoreConfig {
    let mut config = clickhouse_config(url, name);
    config.schema = SchemaConfig {
        database: config.schema.database,
        raw_retention_days: 7,
        late_retention_days: 30,
        rollups: vec![
            RollupSpec {
                resolution_ms: MINUTE_MS,
                retention_days: 90,
            },
            RollupSpec {
                resolution_ms: HOUR_MS,
                retention_days: 730,
            },
        ],
    };
    config.request_timeout_ms = 10_000;
    config
}

fn raw(
    agent: &str,
    batch_seq: u64,
    position: u32,
    device: &str,
    time_ms: i64,
    value: f64,
) -> RawReadingRow {
    RawReadingRow {
        agent_id: agent.to_string(),
        batch_seq,
        position,
        device_id: device.to_string(),
        metric: "temperature_c".to_string(),
        tags: String::new(),
        time_ms,
        value,
        flags: 0,
    }
}

fn window(
    device: &str,
    window_start_ms: i64,
    readings: &[(i64, f64)],
    is_final: bool,
) -> WindowResult {
    window_result(
        "agent-1",
        &SeriesKey::new(device, "temperature_c"),
        MINUTE_MS,
        window_start_ms,
        readings,
        is_final,
    )
}

fn selector(device: &str) -> SeriesSelector {
    SeriesSelector {
        device_id: device.to_string(),
        metric: "temperature_c".to_string(),
        tags: String::new(),
    }
}

/// One test at a time in this binary: one of them stops the shared ClickHouse, which would cut
/// the other tests' requests short.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replace_dedup_and_read_back_exactly_on_the_server() {
    let _turn = TURN.lock().await;
    let Some(url) = service_env(CLICKHOUSE_URL) else {
        return;
    };
    let config = config(&url, "rw");
    let database = config.schema.database.clone();
    let mut store = ClickHouseStore::connect(config.clone(), T0)
        .await
        .expect("connect and create the schema");
    assert_eq!(
        store.dialect(),
        Dialect::Legacy,
        "the dev server is 18.16 ({})",
        store.server_version()
    );
    // A second start on the same database is a no-op.
    drop(
        ClickHouseStore::connect(config.clone(), T0)
            .await
            .expect("schema creation is idempotent"),
    );

    // Raw readings, then the same batch again (a retried insert whose first ack was lost).
    let batch = vec![
        raw("agent-1", 7, 0, "d1", T0 + 1_000, 20.5),
        raw("agent-1", 7, 1, "d1", T0 + 2_000, 21.0),
    ];
    store.write_raw_readings(batch.clone(), T0);
    // A window emitted running at 2 readings, then final at 3 (a late reading within lateness).
    store
        .write_window_results(
            &[window(
                "d1",
                T0,
                &[(T0 + 1_000, 20.5), (T0 + 2_000, 21.0)],
                false,
            )],
            T0,
        )
        .expect("known resolution");
    store.write_last_seen(
        vec![LastSeenRow {
            kind: "device".into(),
            agent_id: "agent-1".into(),
            device_id: "d1".into(),
            metric: String::new(),
            tags: String::new(),
            last_seen_ms: 5,
        }],
        T0,
    );
    let report = store.flush().await.expect("flush");
    assert_eq!(report.retries, 0);
    assert_eq!(store.buffered_rows(), 0);

    store.write_raw_readings(batch.clone(), T0);
    store.write_raw_readings(vec![raw("agent-1", 8, 0, "d1", T0 + 500, 19.0)], T0);
    let final_window = window(
        "d1",
        T0,
        &[(T0 + 500, 19.0), (T0 + 1_000, 20.5), (T0 + 2_000, 21.0)],
        true,
    );
    store
        .write_window_results(
            &[
                final_window.clone(),
                window("d2", T0, &[(T0 + 3_000, 5.0)], false),
            ],
            T0,
        )
        .expect("known resolution");
    let late = LateReading {
        agent_id: Arc::from("agent-1"),
        batch_seq: 9,
        series: Arc::new(SeriesKey::new("d1", "temperature_c")),
        resolution_ms: Some(60_000),
        window_start_ms: Some(T0),
        item: LateItem::Reading {
            time_ms: T0 + 100,
            value: 1.0,
        },
        reason: LateReason::WindowClosed,
    };
    store.write_late_readings(&[late.clone(), late], T0);
    store.write_last_seen(
        vec![LastSeenRow {
            kind: "device".into(),
            agent_id: "agent-1".into(),
            device_id: "d1".into(),
            metric: String::new(),
            tags: String::new(),
            last_seen_ms: 9,
        }],
        T0,
    );
    assert!(store.flush_due(T0 + 1_000), "age-based flush after 1 s");
    store.flush().await.expect("flush");

    let raw_rows = store
        .raw_range(&[selector("d1")], T0, T0 + DAY_MS)
        .await
        .expect("raw range");
    let times: Vec<(i64, f64)> = raw_rows
        .iter()
        .map(|row| (row.time_ms, row.value))
        .collect();
    assert_eq!(
        times,
        vec![(T0 + 500, 19.0), (T0 + 1_000, 20.5), (T0 + 2_000, 21.0)],
        "each reading once"
    );

    let windows = store
        .rollup_range(60_000, &[selector("d1"), selector("d2")], T0, T0 + 60_000)
        .await
        .expect("rollups");
    assert_eq!(windows.len(), 2, "{windows:?}");
    let d1 = &windows[0];
    assert_eq!(
        (d1.device_id.as_str(), d1.version, d1.is_final, d1.count),
        ("d1", 3 | FINAL_VERSION_BIT, 1, 3)
    );
    assert_eq!((d1.sum, d1.min, d1.max), (60.5, 19.0, 21.0));
    assert_eq!(
        (
            d1.first_time_ms,
            d1.first_value,
            d1.last_time_ms,
            d1.last_value
        ),
        (T0 + 500, 19.0, T0 + 2_000, 21.0)
    );
    assert_eq!(
        d1.decode_sketch(),
        Some(final_window.summary.sketch.clone()),
        "the sketch round-trips"
    );
    assert_eq!(windows[1].device_id, "d2");

    let latest = store.latest_values(&[]).await.expect("latest");
    let latest: Vec<(String, i64, f64)> = latest
        .into_iter()
        .map(|row| (row.device_id, row.time_ms, row.value))
        .collect();
    assert_eq!(
        latest,
        vec![
            ("d1".to_string(), T0 + 2_000, 21.0),
            ("d2".to_string(), T0 + 3_000, 5.0)
        ]
    );

    let devices = store.list_devices().await.expect("devices");
    assert_eq!(devices.len(), 1);
    assert_eq!(
        (devices[0].device_id.as_str(), devices[0].last_seen_ms),
        ("d1", 9)
    );
    assert!(
        store.list_series().await.expect("series").is_empty(),
        "no series sightings were written"
    );

    let late_counts = store
        .late_counts(T0, T0 + DAY_MS)
        .await
        .expect("late counts");
    assert_eq!(late_counts.len(), 1);
    assert_eq!(
        (late_counts[0].late_rows, late_counts[0].late_readings),
        (1, 1),
        "the repeated late row collapses"
    );

    drop_clickhouse_database(&url, &database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_partitions_older_than_the_retention() {
    let _turn = TURN.lock().await;
    let Some(url) = service_env(CLICKHOUSE_URL) else {
        return;
    };
    let config = config(&url, "retention");
    let database = config.schema.database.clone();
    let mut store = ClickHouseStore::connect(config, T0).await.expect("connect");
    let rows: Vec<RawReadingRow> = (0..10)
        .map(|day| {
            raw(
                "agent-1",
                day as u64,
                0,
                "d1",
                T0 + day * DAY_MS + 1_000,
                day as f64,
            )
        })
        .collect();
    store.write_raw_readings(rows, T0);
    store.flush().await.expect("flush");

    // At 2026-01-10 12:00 with 7 days of raw retention, 2026-01-01 and -02 are past it.
    let now_ms = T0 + 9 * DAY_MS + 12 * 3_600_000;
    let dropped = store
        .drop_expired_partitions(now_ms)
        .await
        .expect("retention");
    assert_eq!(
        dropped,
        vec![
            ("raw_readings".to_string(), 20_260_101),
            ("raw_readings".to_string(), 20_260_102)
        ]
    );
    let left = store
        .raw_range(&[selector("d1")], 0, i64::MAX)
        .await
        .expect("raw range");
    let days: Vec<f64> = left.iter().map(|row| row.value).collect();
    assert_eq!(days, vec![2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    assert!(
        store
            .drop_expired_partitions(now_ms)
            .await
            .expect("retention again")
            .is_empty(),
        "idempotent"
    );

    drop_clickhouse_database(&url, &database).await;
}

fn run_services_script(script: &str, action: &str) {
    let status = Command::new(script)
        .args([action, "clickhouse"])
        .status()
        .unwrap_or_else(|error| panic!("{script} {action} clickhouse: {error}"));
    assert!(
        status.success(),
        "{script} {action} clickhouse exited with {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_retry_while_clickhouse_is_stopped_and_land_exactly_once() {
    let _turn = TURN.lock().await;
    let Some(url) = service_env(CLICKHOUSE_URL) else {
        return;
    };
    let Some(script) = service_env(SERVICES_SCRIPT) else {
        return;
    };
    let mut config = config(&url, "outage");
    config.retry.give_up_after_ms = 240_000;
    let database = config.schema.database.clone();
    let mut store = ClickHouseStore::connect(config, T0).await.expect("connect");

    let rows: Vec<RawReadingRow> = (0..1_000)
        .map(|index| raw("agent-1", 1, index, "d1", T0 + i64::from(index), 1.0))
        .collect();
    store.write_raw_readings(rows.clone(), T0);
    store
        .write_window_results(&[window("d1", T0, &[(T0, 1.0)], false)], T0)
        .expect("known resolution");

    run_services_script(&script, "stop");
    let outage_started = Instant::now();
    let flush = tokio::spawn(async move {
        let result = store.flush().await;
        (store, result)
    });
    // The flush keeps failing while the server is down; `start` waits until it answers.
    run_services_script(&script, "start");
    let outage = outage_started.elapsed();
    let (mut store, result) = tokio::time::timeout(Duration::from_secs(240), flush)
        .await
        .expect("the flush finishes within 240 s of the restart")
        .expect("flush task");
    let report = result.expect("the flush succeeds once ClickHouse is back");
    assert!(
        report.retries >= 1,
        "the flush saw the outage ({outage:?}) and retried: {report:?}"
    );
    assert_eq!(store.buffered_rows(), 0);

    // The same rows again (as a replay after a crash would write them): still exactly once.
    store.write_raw_readings(rows, T0);
    store.flush().await.expect("flush");
    let stored = store
        .raw_range(&[selector("d1")], T0, T0 + DAY_MS)
        .await
        .expect("raw range");
    assert_eq!(stored.len(), 1_000, "every row exactly once");
    assert!(stored
        .iter()
        .enumerate()
        .all(|(index, row)| row.position as usize == index));
    let windows = store
        .rollup_range(60_000, &[selector("d1")], T0, T0 + 60_000)
        .await
        .expect("rollups");
    assert_eq!(windows.len(), 1);
    eprintln!(
        "ClickHouse was down for {outage:?}; the flush retried {} times and wrote {} rows",
        report.retries, report.rows_written
    );

    drop_clickhouse_database(&url, &database).await;
}
