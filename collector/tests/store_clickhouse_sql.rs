//! The store's SQL, checked without a ClickHouse server of our own:
//! - the files in `deploy/clickhouse/` equal what the code renders (rerun with
//!   `TRIBUTARY_BLESS=1` to regenerate them after changing the schema);
//! - on chdb (a current ClickHouse, 26.9): the modern DDL, sample rows shaped like the store's
//!   inserts (a replaced window version, a retried raw insert, a deduplication token), and
//!   every query the store issues, with asserted results. The legacy DDL is run there too.

use serde_json::Value;
use tributary_collector::store::schema::{
    self, quote, render_schema, render_schema_file, Dialect, SchemaConfig, SeriesSelector,
    CHECKPOINTS_TABLE, LAST_SEEN_TABLE, LATE_TABLE, RAW_TABLE,
};
use tributary_tests::services::{chdb_run, repo_root, service_env, CHDB_PYTHON};

fn deploy_path(dialect: Dialect) -> std::path::PathBuf {
    repo_root()
        .join("deploy")
        .join("clickhouse")
        .join(format!("schema-{}.sql", dialect.name()))
}

#[test]
fn deploy_sql_files_match_the_renderer() {
    let bless = std::env::var("TRIBUTARY_BLESS").is_ok_and(|value| value == "1");
    for dialect in [Dialect::Legacy, Dialect::Modern] {
        let rendered =
            render_schema_file(&SchemaConfig::default(), dialect).expect("default config renders");
        let path = deploy_path(dialect);
        if bless {
            std::fs::create_dir_all(path.parent().expect("deploy dir"))
                .expect("create deploy/clickhouse");
            std::fs::write(&path, &rendered).expect("write deploy sql");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|error| {
            panic!(
                "{}: {error}; run with TRIBUTARY_BLESS=1 to create it",
                path.display()
            )
        });
        assert!(
            committed == rendered,
            "{} differs from what the code renders; rerun this test with TRIBUTARY_BLESS=1 and commit the file",
            path.display()
        );
    }
}

const DAY_MS: i64 = 86_400_000;
/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000;
const FINAL_BIT: u64 = 1 << 63;

fn raw_values(
    agent: &str,
    batch_seq: u64,
    position: u32,
    device: &str,
    metric: &str,
    time_ms: i64,
    value: f64,
) -> String {
    format!(
        "({}, {batch_seq}, {position}, {}, {}, '', {time_ms}, {value:?}, 0)",
        quote(agent),
        quote(device),
        quote(metric)
    )
}

fn insert_raw(rows: &[String], settings: &str) -> String {
    format!(
        "INSERT INTO tributary.{RAW_TABLE} (agent_id, batch_seq, position, device_id, metric, tags, time_ms, value, flags) {settings} VALUES {}",
        rows.join(", ")
    )
}

#[allow(clippy::too_many_arguments)]
fn rollup_values(
    agent: &str,
    device: &str,
    window_start_ms: i64,
    version: u64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    last: (i64, f64),
) -> String {
    format!(
        "({}, {}, 'temperature_c', '', {window_start_ms}, {version}, {}, {count}, {sum:?}, {min:?}, {max:?}, {window_start_ms}, {min:?}, {}, {:?}, {min:?}, {max:?}, {max:?}, unhex('0102'))",
        quote(agent),
        quote(device),
        u8::from(version & FINAL_BIT != 0),
        last.0,
        last.1
    )
}

fn insert_rollups(rows: &[String]) -> String {
    format!(
        "INSERT INTO tributary.rollup_1m (agent_id, device_id, metric, tags, window_start_ms, version, is_final, count, sum, min, max, \
         first_time_ms, first_value, last_time_ms, last_value, p50, p90, p99, sketch) VALUES {}",
        rows.join(", ")
    )
}

fn as_u64(value: &Value) -> u64 {
    match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.parse().ok(),
        _ => None,
    }
    .unwrap_or_else(|| panic!("{value} is not an unsigned integer"))
}

fn as_i64(value: &Value) -> i64 {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.parse().ok(),
        _ => None,
    }
    .unwrap_or_else(|| panic!("{value} is not an integer"))
}

#[test]
fn modern_schema_and_every_query_on_chdb() {
    let Some(python) = service_env(CHDB_PYTHON) else {
        return;
    };
    // Long retentions: the sample data is from 2026-01-01 and TTL drops expired rows on insert.
    let mut config = SchemaConfig {
        raw_retention_days: 3_650,
        late_retention_days: 3_650,
        ..SchemaConfig::default()
    };
    for rollup in &mut config.rollups {
        rollup.retention_days = 3_650;
    }
    let database = &config.database;
    let mut statements: Vec<String> = render_schema(&config, Dialect::Modern).expect("renders");
    let ddl_count = statements.len();
    statements.push(schema::sql_record_schema_version(database, T0));

    // Raw: two readings of d1, one of d2 on the previous day; the first block inserted twice
    // with the same token (a retried insert: dropped at insert time), and once more without a
    // token (a replay after a crash: collapsed by FINAL).
    let block = vec![
        raw_values("agent-1", 7, 0, "d1", "temperature_c", T0 + 1_000, 20.5),
        raw_values("agent-1", 7, 1, "d1", "temperature_c", T0 + 2_000, 21.0),
    ];
    statements.push(insert_raw(
        &block,
        "SETTINGS insert_deduplication_token = 'raw-block-1'",
    ));
    statements.push(insert_raw(
        &block,
        "SETTINGS insert_deduplication_token = 'raw-block-1'",
    ));
    statements.push(insert_raw(&block[..1], ""));
    statements.push(insert_raw(
        &[raw_values(
            "agent-2",
            1,
            0,
            "d2",
            "humidity_pct",
            T0 - DAY_MS + 5,
            40.0,
        )],
        "",
    ));

    // Rollups: window T0 of d1 at version 2, then replaced by version 3, then final (3 | bit);
    // a second window still running at version 1; d2 from agent-2.
    statements.push(insert_rollups(&[
        rollup_values(
            "agent-1",
            "d1",
            T0,
            2,
            2,
            41.5,
            20.5,
            21.0,
            (T0 + 2_000, 21.0),
        ),
        rollup_values(
            "agent-1",
            "d1",
            T0 + 60_000,
            1,
            1,
            22.0,
            22.0,
            22.0,
            (T0 + 61_000, 22.0),
        ),
    ]));
    statements.push(insert_rollups(&[rollup_values(
        "agent-1",
        "d1",
        T0,
        3,
        3,
        61.5,
        20.0,
        21.0,
        (T0 + 2_000, 21.0),
    )]));
    statements.push(insert_rollups(&[
        rollup_values(
            "agent-1",
            "d1",
            T0,
            3 | FINAL_BIT,
            3,
            61.5,
            20.0,
            21.0,
            (T0 + 2_000, 21.0),
        ),
        rollup_values(
            "agent-2",
            "d2",
            T0 - DAY_MS,
            1,
            1,
            40.0,
            40.0,
            40.0,
            (T0 - DAY_MS + 5, 40.0),
        ),
    ]));

    // Late rows: one reading twice (a replayed batch), one summary standing for 10 readings.
    let late = format!(
        "INSERT INTO {database}.{LATE_TABLE} (agent_id, batch_seq, device_id, metric, tags, resolution_ms, window_start_ms, item_kind, time_ms, window_ms, value, readings, reason) VALUES \
         ('agent-1', 9, 'd1', 'temperature_c', '', 60000, {T0}, 'reading', {}, 0, 19.0, 1, 'window_closed'), \
         ('agent-1', 10, 'd1', 'temperature_c', '', 60000, {T0}, 'summary', {T0}, 60000, 200.0, 10, 'window_closed')",
        T0 + 500
    );
    statements.push(late.clone());
    statements.push(late);

    // Last seen: agent-1 seen twice, the later sighting wins.
    for seen_ms in [T0 + 5_000, T0 + 9_000] {
        statements.push(format!(
            "INSERT INTO {database}.{LAST_SEEN_TABLE} (kind, agent_id, device_id, metric, tags, last_seen_ms) VALUES \
             ('agent', 'agent-1', '', '', '', {seen_ms}), ('device', 'agent-1', 'd1', '', '', {seen_ms}), \
             ('series', 'agent-1', 'd1', 'temperature_c', '', {seen_ms})"
        ));
    }
    statements.push(format!(
        "INSERT INTO {database}.{LAST_SEEN_TABLE} (kind, agent_id, device_id, metric, tags, last_seen_ms) VALUES \
         ('device', 'agent-2', 'd2', '', '', {T0}), ('series', 'agent-2', 'd2', 'humidity_pct', '', {T0})"
    ));

    // Checkpoints: the newer write (higher saved_version) wins although its offset is lower
    // (a replay), and arrives first; binary state; another partition.
    statements.push(format!(
        "INSERT INTO {database}.{CHECKPOINTS_TABLE} (consumer_group, log_partition, next_offset, engine_state, saved_version) VALUES \
         ('processor', 0, 10, unhex('000102'), 7), ('processor', 1, 99, 'p1', 1)"
    ));
    statements.push(format!(
        "INSERT INTO {database}.{CHECKPOINTS_TABLE} (consumer_group, log_partition, next_offset, engine_state, saved_version) VALUES \
         ('processor', 0, 500, 'older', 6)"
    ));

    let d1 = SeriesSelector {
        device_id: "d1".into(),
        metric: "temperature_c".into(),
        tags: String::new(),
    };
    let d2 = SeriesSelector {
        device_id: "d2".into(),
        metric: "humidity_pct".into(),
        tags: String::new(),
    };
    let d1_other_metric = SeriesSelector {
        device_id: "d1".into(),
        metric: "it's \\ quoted".into(),
        tags: String::new(),
    };
    let queries = vec![
        schema::sql_schema_version(database),
        format!("SELECT count() AS stored FROM {database}.{RAW_TABLE}"),
        schema::sql_list_devices(database),
        schema::sql_list_series(database),
        schema::sql_latest_values(database, 60_000, &[]),
        // the rollup sample rows are all temperature_c
        schema::sql_latest_values(
            database,
            60_000,
            &[
                SeriesSelector {
                    metric: "temperature_c".into(),
                    ..d2.clone()
                },
                d1_other_metric.clone(),
            ],
        ),
        schema::sql_rollup_range(
            database,
            60_000,
            &[d1.clone(), d1_other_metric],
            T0,
            T0 + 3_600_000,
        )
        .expect("selection"),
        schema::sql_raw_range(
            database,
            &[d1.clone(), d2.clone()],
            T0 - DAY_MS,
            T0 + DAY_MS,
        )
        .expect("selection"),
        schema::sql_late_counts(database, T0, T0 + DAY_MS),
        schema::sql_list_partitions(database, RAW_TABLE),
        schema::sql_drop_partition(database, RAW_TABLE, schema::utc_day_number(T0 - DAY_MS)),
        format!("SELECT count() AS stored FROM {database}.{RAW_TABLE} FINAL"),
        schema::sql_load_checkpoint(database, "processor", 0),
        schema::sql_max_checkpoint_version(database),
        schema::sql_load_checkpoint(database, "it's", 0),
    ];
    let first_query = statements.len();
    statements.extend(queries);

    let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
    let results =
        chdb_run(&python, &refs).unwrap_or_else(|error| panic!("chdb via {python}: {error}"));
    assert_eq!(results.len(), statements.len());
    assert!(results[..ddl_count].iter().all(Vec::is_empty));
    let result = |index: usize| &results[first_query + index];

    assert_eq!(
        as_u64(&result(0)[0]["version"]),
        u64::from(schema::SCHEMA_VERSION)
    );
    // 2 (token dropped the retry) + 1 replayed without token + 1 of d2, before FINAL
    assert_eq!(
        as_u64(&result(1)[0]["stored"]),
        4,
        "the dedup token dropped the retried block"
    );

    let devices = result(2);
    assert_eq!(devices.len(), 2, "{devices:?}");
    assert_eq!(devices[0]["device_id"], "d1");
    assert_eq!(devices[0]["last_agent_id"], "agent-1");
    assert_eq!(as_i64(&devices[0]["seen_ms"]), T0 + 9_000);
    assert_eq!(devices[1]["device_id"], "d2");

    let series = result(3);
    assert_eq!(series.len(), 2, "{series:?}");
    assert_eq!(
        (
            series[0]["device_id"].as_str(),
            series[0]["metric"].as_str()
        ),
        (Some("d1"), Some("temperature_c"))
    );
    assert_eq!(as_i64(&series[0]["seen_ms"]), T0 + 9_000);

    let latest = result(4);
    assert_eq!(latest.len(), 2, "{latest:?}");
    assert_eq!(as_i64(&latest[0]["latest_time_ms"]), T0 + 61_000);
    assert_eq!(latest[0]["latest_value"].as_f64(), Some(22.0));
    assert_eq!(latest[1]["device_id"], "d2");
    let filtered = result(5);
    assert_eq!(filtered.len(), 1, "only d2 matches: {filtered:?}");
    assert_eq!(filtered[0]["latest_value"].as_f64(), Some(40.0));

    let windows = result(6);
    assert_eq!(
        windows.len(),
        2,
        "one row per window at its highest version: {windows:?}"
    );
    assert_eq!(as_i64(&windows[0]["window_start_ms"]), T0);
    assert_eq!(as_u64(&windows[0]["version"]), 3 | FINAL_BIT);
    assert_eq!(as_u64(&windows[0]["is_final"]), 1);
    assert_eq!(as_u64(&windows[0]["count"]), 3);
    assert_eq!(windows[0]["sum"].as_f64(), Some(61.5));
    assert_eq!(windows[0]["min"].as_f64(), Some(20.0));
    assert_eq!(as_i64(&windows[1]["window_start_ms"]), T0 + 60_000);
    assert_eq!(as_u64(&windows[1]["version"]), 1);

    let raw = result(7);
    assert_eq!(raw.len(), 3, "each reading once: {raw:?}");
    assert_eq!(raw[0]["device_id"], "d1");
    assert_eq!(raw[0]["value"].as_f64(), Some(20.5));
    assert_eq!(raw[1]["value"].as_f64(), Some(21.0));
    assert_eq!(raw[2]["device_id"], "d2");

    let late = result(8);
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0]["reason"], "window_closed");
    assert_eq!(as_i64(&late[0]["resolution_ms"]), 60_000);
    assert_eq!(
        as_u64(&late[0]["late_rows"]),
        2,
        "the replayed late rows collapse"
    );
    assert_eq!(as_u64(&late[0]["late_readings"]), 11);

    let partitions: Vec<String> = result(9)
        .iter()
        .map(|row| row["partition"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        partitions,
        vec!["20251231".to_string(), "20260101".to_string()]
    );
    assert_eq!(
        schema::partitions_to_drop(&partitions, T0 + DAY_MS + 12 * 3_600_000, 1),
        vec![20_251_231],
        "1 day of retention at 2026-01-02 12:00 drops 2025-12-31 only"
    );
    assert_eq!(
        as_u64(&result(11)[0]["stored"]),
        2,
        "the dropped partition took d2's reading"
    );

    let checkpoint = result(12);
    assert_eq!(checkpoint.len(), 1, "{checkpoint:?}");
    assert_eq!(as_u64(&checkpoint[0]["next_offset"]), 10);
    assert_eq!(as_u64(&checkpoint[0]["saved_version"]), 7);
    assert_eq!(as_u64(&checkpoint[0]["log_partition"]), 0);
    assert_eq!(as_u64(&result(13)[0]["version"]), 7);
    assert!(result(14).is_empty(), "no checkpoint of an unknown group");
}

#[test]
fn legacy_schema_also_runs_on_a_current_server() {
    let Some(python) = service_env(CHDB_PYTHON) else {
        return;
    };
    let mut statements = render_schema(&SchemaConfig::default(), Dialect::Legacy).expect("renders");
    statements.push(insert_raw(
        &[raw_values("agent-1", 1, 0, "d1", "temperature_c", T0, 1.5)],
        "",
    ));
    statements.push(
        schema::sql_raw_range(
            "tributary",
            &[SeriesSelector {
                device_id: "d1".into(),
                metric: "temperature_c".into(),
                tags: String::new(),
            }],
            T0,
            T0 + 1,
        )
        .expect("selection"),
    );
    let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
    let results =
        chdb_run(&python, &refs).unwrap_or_else(|error| panic!("chdb via {python}: {error}"));
    let rows = results.last().expect("results");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["value"].as_f64(), Some(1.5));
}
