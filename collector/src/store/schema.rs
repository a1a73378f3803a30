//! The SQL the ClickHouse store runs, rendered for the server it talks to.
//!
//! Why one renderer for everything: the processor creates and migrates the schema at start,
//! `deploy/clickhouse/` ships the same DDL for people who manage schemas themselves, and the
//! tests run the rendered DDL and every query on ClickHouse 18.16 (the Debian server) and on a
//! current engine (chdb). Rendering from one place is what keeps those three in agreement;
//! a test checks the committed files equal what this module renders.
//!
//! Two dialects, chosen from `SELECT version()`:
//! - [`Dialect::Legacy`] (below 22.8, e.g. Debian's 18.16): plain types, `DateTime('UTC')`
//!   derived from the millisecond column, no `TTL` (a retention task drops old partitions),
//!   dedup of retried inserts by the `ReplacingMergeTree` key only.
//! - [`Dialect::Modern`] (22.8 and later; verified on 26.9 through chdb): `LowCardinality`,
//!   column codecs (`Delta`/`DoubleDelta`/`Gorilla` + `ZSTD`), `DateTime64(3, 'UTC')`, `TTL`
//!   for retention, and `insert_deduplication_token` (tables keep a non-replicated dedup
//!   window) so a retried block is dropped at insert time, not only at merge time.
//!
//! Both dialects share the inserted columns (times as `Int64` milliseconds; the `DateTime`
//! columns used for partitioning, TTL and Grafana are `MATERIALIZED` from them), so one row
//! type serves both servers. Every query reads through `FINAL`, so results are exact before
//! background merges have collapsed replaced versions or retried duplicates.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The schema version this code creates; stored in the `schema_version` table.
///
/// 2: adds the `checkpoints` table (created by `IF NOT EXISTS` on a version-1 database).
pub const SCHEMA_VERSION: u32 = 2;

/// The first server version rendered with [`Dialect::Modern`]. 22.8 is the LTS release that
/// has every feature the modern DDL uses (`insert_deduplication_token` arrived in 22.2).
pub const MODERN_MIN_VERSION: (u32, u32) = (22, 8);

/// Latest instant a derived `DateTime` column holds (2100-01-01): times beyond it (refused
/// readings with absurd clocks) are clamped for partitioning only; the millisecond column keeps
/// the original.
const MAX_PARTITION_TIME_MS: i64 = 4_102_444_800_000;

/// Which SQL features the server has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// ClickHouse before 22.8: no TTL, codecs, DateTime64 or insert dedup tokens.
    Legacy,
    /// ClickHouse 22.8 and later.
    Modern,
}

impl Dialect {
    /// The dialect for a `SELECT version()` answer such as `18.16.1` or `26.9.2.1`.
    pub fn for_version(version: &str) -> Result<Self, SchemaError> {
        let (major, minor) = parse_version(version)?;
        Ok(if (major, minor) >= MODERN_MIN_VERSION {
            Dialect::Modern
        } else {
            Dialect::Legacy
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dialect::Legacy => "legacy",
            Dialect::Modern => "modern",
        }
    }
}

/// Why rendering or interpreting schema inputs failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("ClickHouse answered `SELECT version()` with {version:?}, which is not MAJOR.MINOR[.…]; is the URL a ClickHouse HTTP interface?")]
    UnparsableVersion { version: String },
    #[error("database name {name:?} is not a plain identifier (letters, digits, `_`, not starting with a digit); choose another `database`")]
    BadDatabaseName { name: String },
    #[error("rollup resolution {resolution_ms} ms is not positive, or listed twice; fix `rollups` in the store config")]
    BadResolution { resolution_ms: i64 },
    #[error("{what} retention of 0 days would drop data as it arrives; set at least 1 day")]
    ZeroRetention { what: String },
}

/// Parses the leading `MAJOR.MINOR` of a ClickHouse version string.
pub fn parse_version(version: &str) -> Result<(u32, u32), SchemaError> {
    let unparsable = || SchemaError::UnparsableVersion {
        version: version.to_string(),
    };
    let mut parts = version.trim().split('.');
    let major = parts
        .next()
        .and_then(|part| part.parse().ok())
        .ok_or_else(unparsable)?;
    let minor = parts
        .next()
        .and_then(|part| part.parse().ok())
        .ok_or_else(unparsable)?;
    Ok((major, minor))
}

/// One rollup table: a window resolution and how long its rows are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupSpec {
    pub resolution_ms: i64,
    pub retention_days: u32,
}

/// What the schema looks like: the database name, the rollup resolutions and retentions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaConfig {
    pub database: String,
    pub raw_retention_days: u32,
    pub late_retention_days: u32,
    /// Finest first is not required; queries for "latest value" use the finest.
    pub rollups: Vec<RollupSpec>,
}

impl Default for SchemaConfig {
    fn default() -> Self {
        Self {
            database: "tributary".to_string(),
            raw_retention_days: 7,
            late_retention_days: 30,
            rollups: vec![
                RollupSpec {
                    resolution_ms: 60_000,
                    retention_days: 90,
                },
                RollupSpec {
                    resolution_ms: 3_600_000,
                    retention_days: 730,
                },
            ],
        }
    }
}

/// The tables whose partitions expire, with their retention in days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedTable {
    pub table: String,
    pub retention_days: u32,
}

impl SchemaConfig {
    /// Checks names and numbers before any SQL is rendered from them.
    pub fn validate(&self) -> Result<(), SchemaError> {
        let name = &self.database;
        let plain = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !plain {
            return Err(SchemaError::BadDatabaseName { name: name.clone() });
        }
        for (index, rollup) in self.rollups.iter().enumerate() {
            let repeated = self.rollups[..index]
                .iter()
                .any(|other| other.resolution_ms == rollup.resolution_ms);
            if rollup.resolution_ms <= 0 || repeated {
                return Err(SchemaError::BadResolution {
                    resolution_ms: rollup.resolution_ms,
                });
            }
            if rollup.retention_days == 0 {
                return Err(SchemaError::ZeroRetention {
                    what: rollup_table_name(rollup.resolution_ms),
                });
            }
        }
        if self.raw_retention_days == 0 {
            return Err(SchemaError::ZeroRetention {
                what: RAW_TABLE.to_string(),
            });
        }
        if self.late_retention_days == 0 {
            return Err(SchemaError::ZeroRetention {
                what: LATE_TABLE.to_string(),
            });
        }
        Ok(())
    }

    /// The finest configured resolution, whose table answers "latest value per series".
    pub fn finest_resolution_ms(&self) -> Option<i64> {
        self.rollups.iter().map(|rollup| rollup.resolution_ms).min()
    }

    /// Every table with daily partitions and its retention.
    pub fn retained_tables(&self) -> Vec<RetainedTable> {
        let mut tables = vec![
            RetainedTable {
                table: RAW_TABLE.to_string(),
                retention_days: self.raw_retention_days,
            },
            RetainedTable {
                table: LATE_TABLE.to_string(),
                retention_days: self.late_retention_days,
            },
        ];
        tables.extend(self.rollups.iter().map(|rollup| RetainedTable {
            table: rollup_table_name(rollup.resolution_ms),
            retention_days: rollup.retention_days,
        }));
        tables
    }
}

pub const RAW_TABLE: &str = "raw_readings";
pub const LATE_TABLE: &str = "late_readings";
pub const LAST_SEEN_TABLE: &str = "last_seen";
pub const SCHEMA_VERSION_TABLE: &str = "schema_version";
pub const CHECKPOINTS_TABLE: &str = "checkpoints";

/// `rollup_1m`, `rollup_1h`, `rollup_1d`, `rollup_10s`, or `rollup_1500ms` for odd widths.
pub fn rollup_table_name(resolution_ms: i64) -> String {
    const UNITS: [(i64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    for (unit_ms, suffix) in UNITS {
        if resolution_ms >= unit_ms && resolution_ms % unit_ms == 0 {
            return format!("rollup_{}{suffix}", resolution_ms / unit_ms);
        }
    }
    format!("rollup_{resolution_ms}ms")
}

/// A ClickHouse string literal: quotes, with `\` and `'` escaped.
pub fn quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('\'');
    for character in text.chars() {
        match character {
            '\\' => quoted.push_str("\\\\"),
            '\'' => quoted.push_str("\\'"),
            other => quoted.push(other),
        }
    }
    quoted.push('\'');
    quoted
}

/// How one logical column is spelled in each dialect.
struct Column {
    name: &'static str,
    legacy: &'static str,
    modern: &'static str,
}

const fn column(name: &'static str, legacy: &'static str, modern: &'static str) -> Column {
    Column {
        name,
        legacy,
        modern,
    }
}

const LOW_CARDINALITY_STRING: &str = "LowCardinality(String)";

const SERIES_COLUMNS: [Column; 4] = [
    column("agent_id", "String", LOW_CARDINALITY_STRING),
    column("device_id", "String", LOW_CARDINALITY_STRING),
    column("metric", "String", LOW_CARDINALITY_STRING),
    column("tags", "String", LOW_CARDINALITY_STRING),
];

/// The derived `DateTime` column over a millisecond column, clamped into the range
/// `DateTime` can hold.
fn derived_time_column(name: &str, millis_column: &str, dialect: Dialect) -> String {
    let clamped = format!("greatest(least({millis_column}, {MAX_PARTITION_TIME_MS}), 0)");
    match dialect {
        Dialect::Legacy => format!("{name} DateTime('UTC') MATERIALIZED toDateTime(intDiv({clamped}, 1000), 'UTC')"),
        Dialect::Modern => format!(
            "{name} DateTime64(3, 'UTC') MATERIALIZED fromUnixTimestamp64Milli({clamped}, 'UTC') CODEC(DoubleDelta, ZSTD(1))"
        ),
    }
}

fn ttl_clause(time_column: &str, retention_days: u32, dialect: Dialect) -> String {
    match dialect {
        Dialect::Legacy => String::new(),
        Dialect::Modern => {
            format!("\nTTL toDateTime({time_column}) + INTERVAL {retention_days} DAY")
        }
    }
}

fn dedup_settings(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Legacy => "",
        // Remembers the last blocks' tokens so a retried block is skipped at insert time.
        Dialect::Modern => "\nSETTINGS non_replicated_deduplication_window = 1000",
    }
}

fn render_table(
    database: &str,
    table: &str,
    columns: &[&Column],
    derived: &str,
    engine: &str,
    tail: &str,
    dialect: Dialect,
) -> String {
    let mut sql = format!("CREATE TABLE IF NOT EXISTS {database}.{table}\n(\n");
    for column in columns {
        let spelled = match dialect {
            Dialect::Legacy => column.legacy,
            Dialect::Modern => column.modern,
        };
        let _ = writeln!(sql, "    {} {spelled},", column.name);
    }
    let _ = writeln!(sql, "    {derived}");
    let _ = write!(sql, ")\nENGINE = {engine}{tail}");
    sql
}

/// The statements that create the whole schema, in order; each is idempotent
/// (`IF NOT EXISTS`). The store runs them at start, then records [`SCHEMA_VERSION`].
pub fn render_schema(config: &SchemaConfig, dialect: Dialect) -> Result<Vec<String>, SchemaError> {
    config.validate()?;
    let database = &config.database;
    let [agent, device, metric, tags] = &SERIES_COLUMNS;
    let mut statements = vec![format!("CREATE DATABASE IF NOT EXISTS {database}")];

    statements.push(format!(
        "CREATE TABLE IF NOT EXISTS {database}.{SCHEMA_VERSION_TABLE}\n(\n    version UInt32,\n    applied_ms Int64\n)\nENGINE = ReplacingMergeTree()\nORDER BY version"
    ));

    let raw_columns = [
        agent,
        &column("batch_seq", "UInt64", "UInt64 CODEC(Delta, ZSTD(1))"),
        &column("position", "UInt32", "UInt32 CODEC(Delta, ZSTD(1))"),
        device,
        metric,
        tags,
        &column("time_ms", "Int64", "Int64 CODEC(DoubleDelta, ZSTD(1))"),
        &column("value", "Float64", "Float64 CODEC(Gorilla, ZSTD(1))"),
        &column("flags", "UInt8", "UInt8 CODEC(ZSTD(1))"),
    ];
    statements.push(render_table(
        database,
        RAW_TABLE,
        &raw_columns,
        &derived_time_column("event_time", "time_ms", dialect),
        "ReplacingMergeTree()",
        &format!(
            "\nPARTITION BY toYYYYMMDD(event_time)\nORDER BY (device_id, metric, tags, time_ms, agent_id, batch_seq, position){}{}",
            ttl_clause("event_time", config.raw_retention_days, dialect),
            dedup_settings(dialect)
        ),
        dialect,
    ));

    let gorilla = "Float64 CODEC(Gorilla, ZSTD(1))";
    let rollup_columns = [
        agent,
        device,
        metric,
        tags,
        &column(
            "window_start_ms",
            "Int64",
            "Int64 CODEC(DoubleDelta, ZSTD(1))",
        ),
        &column("version", "UInt64", "UInt64 CODEC(Delta, ZSTD(1))"),
        &column("is_final", "UInt8", "UInt8 CODEC(ZSTD(1))"),
        &column("count", "UInt64", "UInt64 CODEC(ZSTD(1))"),
        &column("sum", "Float64", gorilla),
        &column("min", "Float64", gorilla),
        &column("max", "Float64", gorilla),
        &column(
            "first_time_ms",
            "Int64",
            "Int64 CODEC(DoubleDelta, ZSTD(1))",
        ),
        &column("first_value", "Float64", gorilla),
        &column("last_time_ms", "Int64", "Int64 CODEC(DoubleDelta, ZSTD(1))"),
        &column("last_value", "Float64", gorilla),
        &column("p50", "Float64", gorilla),
        &column("p90", "Float64", gorilla),
        &column("p99", "Float64", gorilla),
        &column("sketch", "String", "String CODEC(ZSTD(1))"),
    ];
    for rollup in &config.rollups {
        statements.push(render_table(
            database,
            &rollup_table_name(rollup.resolution_ms),
            &rollup_columns,
            &derived_time_column("window_start", "window_start_ms", dialect),
            "ReplacingMergeTree(version)",
            &format!(
                "\nPARTITION BY toYYYYMMDD(window_start)\nORDER BY (device_id, metric, tags, window_start_ms, agent_id){}{}",
                ttl_clause("window_start", rollup.retention_days, dialect),
                dedup_settings(dialect)
            ),
            dialect,
        ));
    }

    let late_columns = [
        agent,
        &column("batch_seq", "UInt64", "UInt64 CODEC(Delta, ZSTD(1))"),
        device,
        metric,
        tags,
        &column("resolution_ms", "Int64", "Int64 CODEC(ZSTD(1))"),
        &column("window_start_ms", "Int64", "Int64 CODEC(Delta, ZSTD(1))"),
        &column("item_kind", "String", LOW_CARDINALITY_STRING),
        &column("time_ms", "Int64", "Int64 CODEC(Delta, ZSTD(1))"),
        &column("window_ms", "UInt32", "UInt32 CODEC(ZSTD(1))"),
        &column("value", "Float64", gorilla),
        &column("readings", "UInt64", "UInt64 CODEC(ZSTD(1))"),
        &column("reason", "String", LOW_CARDINALITY_STRING),
    ];
    statements.push(render_table(
        database,
        LATE_TABLE,
        &late_columns,
        &derived_time_column("event_time", "time_ms", dialect),
        "ReplacingMergeTree()",
        &format!(
            "\nPARTITION BY toYYYYMMDD(event_time)\nORDER BY (device_id, metric, tags, time_ms, agent_id, batch_seq, resolution_ms, item_kind, value){}{}",
            ttl_clause("event_time", config.late_retention_days, dialect),
            dedup_settings(dialect)
        ),
        dialect,
    ));

    // Not partitioned by day: one row per key must survive however old its last sighting is.
    let last_seen_columns = [
        &column("kind", "String", LOW_CARDINALITY_STRING),
        agent,
        device,
        metric,
        tags,
    ];
    statements.push(render_table(
        database,
        LAST_SEEN_TABLE,
        &last_seen_columns,
        "last_seen_ms UInt64",
        "ReplacingMergeTree(last_seen_ms)",
        &format!(
            "\nORDER BY (kind, agent_id, device_id, metric, tags){}",
            dedup_settings(dialect)
        ),
        dialect,
    ));

    // Not partitioned and never expired: one row per consumer group and log partition. The
    // version is the store's write counter, not the offset, because a replay into new tables
    // legitimately moves the offset backwards.
    let checkpoint_columns = [
        &column("consumer_group", "String", LOW_CARDINALITY_STRING),
        &column("log_partition", "UInt32", "UInt32"),
        &column("next_offset", "UInt64", "UInt64"),
        &column("engine_state", "String", "String CODEC(ZSTD(1))"),
    ];
    statements.push(render_table(
        database,
        CHECKPOINTS_TABLE,
        &checkpoint_columns,
        "saved_version UInt64",
        "ReplacingMergeTree(saved_version)",
        &format!(
            "\nORDER BY (consumer_group, log_partition){}",
            dedup_settings(dialect)
        ),
        dialect,
    ));
    Ok(statements)
}

/// The whole schema as one SQL file (what `deploy/clickhouse/` holds).
pub fn render_schema_file(config: &SchemaConfig, dialect: Dialect) -> Result<String, SchemaError> {
    let statements = render_schema(config, dialect)?;
    let mut file = format!(
        "-- Tributary ClickHouse schema v{SCHEMA_VERSION}, {} dialect ({}).\n\
         -- Generated by tributary_collector::store::schema::render_schema_file; do not edit by hand:\n\
         -- the test `deploy_sql_files_match_the_renderer` fails when this file and the code differ.\n\
         -- The collector creates this schema itself at start; apply it by hand only if you manage schemas.\n\n",
        dialect.name(),
        match dialect {
            Dialect::Legacy => "ClickHouse before 22.8, e.g. Debian's 18.16; run the collector's retention task",
            Dialect::Modern => "ClickHouse 22.8 and later; TTL handles retention",
        }
    );
    for statement in statements {
        file.push_str(&statement);
        file.push_str(";\n\n");
    }
    let _ = writeln!(
        file,
        "INSERT INTO {}.{SCHEMA_VERSION_TABLE} (version, applied_ms) VALUES ({SCHEMA_VERSION}, 0);",
        config.database
    );
    Ok(file)
}

/// `SELECT max(version)` over the schema version table (0 when empty).
pub fn sql_schema_version(database: &str) -> String {
    format!("SELECT toUInt32(max(version)) AS version FROM {database}.{SCHEMA_VERSION_TABLE}")
}

pub fn sql_record_schema_version(database: &str, applied_ms: i64) -> String {
    format!("INSERT INTO {database}.{SCHEMA_VERSION_TABLE} (version, applied_ms) VALUES ({SCHEMA_VERSION}, {applied_ms})")
}

/// Selects one series in a `WHERE` clause.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeriesSelector {
    pub device_id: String,
    pub metric: String,
    /// Canonical tags (see [`super::render_tags`]); empty for none.
    pub tags: String,
}

fn series_condition(series: &[SeriesSelector]) -> String {
    let alternatives: Vec<String> = series
        .iter()
        .map(|selector| {
            format!(
                "(device_id = {} AND metric = {} AND tags = {})",
                quote(&selector.device_id),
                quote(&selector.metric),
                quote(&selector.tags)
            )
        })
        .collect();
    format!("({})", alternatives.join(" OR "))
}

/// Devices with the agent that reported them last: [`super::DeviceRow`].
pub fn sql_list_devices(database: &str) -> String {
    format!(
        "SELECT device_id, argMax(agent_id, last_seen_ms) AS last_agent_id, max(last_seen_ms) AS seen_ms\n\
         FROM {database}.{LAST_SEEN_TABLE} FINAL\nWHERE kind = 'device'\nGROUP BY device_id\nORDER BY device_id"
    )
}

/// Series with when they were last seen: [`super::SeriesRow`].
pub fn sql_list_series(database: &str) -> String {
    format!(
        "SELECT device_id, metric, tags, max(last_seen_ms) AS seen_ms\n\
         FROM {database}.{LAST_SEEN_TABLE} FINAL\nWHERE kind = 'series'\nGROUP BY device_id, metric, tags\nORDER BY device_id, metric, tags"
    )
}

/// Latest value per series, from the finest rollup table: [`super::LatestValueRow`].
/// `series` empty means every series.
pub fn sql_latest_values(
    database: &str,
    finest_resolution_ms: i64,
    series: &[SeriesSelector],
) -> String {
    let filter = if series.is_empty() {
        String::new()
    } else {
        format!("\nWHERE {}", series_condition(series))
    };
    format!(
        "SELECT device_id, metric, tags, max(last_time_ms) AS latest_time_ms, argMax(last_value, last_time_ms) AS latest_value\n\
         FROM {database}.{} FINAL{filter}\nGROUP BY device_id, metric, tags\nORDER BY device_id, metric, tags",
        rollup_table_name(finest_resolution_ms)
    )
}

/// Windows of `series` starting in `[from_ms, to_ms)` at one resolution, one row per agent
/// and window at its highest version: [`super::RollupRow`]. `None` for an empty selection.
pub fn sql_rollup_range(
    database: &str,
    resolution_ms: i64,
    series: &[SeriesSelector],
    from_ms: i64,
    to_ms: i64,
) -> Option<String> {
    if series.is_empty() {
        return None;
    }
    Some(format!(
        "SELECT agent_id, device_id, metric, tags, window_start_ms, version, is_final, count, sum, min, max, \
         first_time_ms, first_value, last_time_ms, last_value, p50, p90, p99, sketch\n\
         FROM {database}.{} FINAL\nWHERE {} AND window_start_ms >= {from_ms} AND window_start_ms < {to_ms}\n\
         ORDER BY device_id, metric, tags, window_start_ms, agent_id",
        rollup_table_name(resolution_ms),
        series_condition(series)
    ))
}

/// Raw readings of `series` with event time in `[from_ms, to_ms)`, each once:
/// [`super::RawReadingRow`]. `None` for an empty selection.
pub fn sql_raw_range(
    database: &str,
    series: &[SeriesSelector],
    from_ms: i64,
    to_ms: i64,
) -> Option<String> {
    if series.is_empty() {
        return None;
    }
    Some(format!(
        "SELECT agent_id, batch_seq, position, device_id, metric, tags, time_ms, value, flags\n\
         FROM {database}.{RAW_TABLE} FINAL\nWHERE {} AND time_ms >= {from_ms} AND time_ms < {to_ms}\n\
         ORDER BY device_id, metric, tags, time_ms, agent_id, batch_seq, position",
        series_condition(series)
    ))
}

/// Late rows and the readings they stand for with event time in `[from_ms, to_ms)`, per agent,
/// reason and resolution: [`super::LateCountRow`].
pub fn sql_late_counts(database: &str, from_ms: i64, to_ms: i64) -> String {
    format!(
        "SELECT agent_id, reason, resolution_ms, count() AS late_rows, sum(readings) AS late_readings\n\
         FROM {database}.{LATE_TABLE} FINAL\nWHERE time_ms >= {from_ms} AND time_ms < {to_ms}\n\
         GROUP BY agent_id, reason, resolution_ms\nORDER BY agent_id, reason, resolution_ms"
    )
}

/// The latest checkpoint of one consumer group's log partition: [`super::clickhouse::CheckpointRow`].
pub fn sql_load_checkpoint(database: &str, group: &str, partition: u32) -> String {
    format!(
        "SELECT consumer_group, log_partition, next_offset, engine_state, saved_version\n\
         FROM {database}.{CHECKPOINTS_TABLE} FINAL\nWHERE consumer_group = {} AND log_partition = {partition}\n\
         ORDER BY saved_version DESC\nLIMIT 1",
        quote(group)
    )
}

/// The highest checkpoint version written so far (0 when none), so a restarted store keeps
/// counting upwards.
pub fn sql_max_checkpoint_version(database: &str) -> String {
    format!("SELECT toUInt64(max(saved_version)) AS version FROM {database}.{CHECKPOINTS_TABLE}")
}

/// The partitions (ids such as `20260101`) of one table, for the retention task.
pub fn sql_list_partitions(database: &str, table: &str) -> String {
    format!(
        "SELECT DISTINCT partition FROM system.parts WHERE database = {} AND table = {} AND active ORDER BY partition",
        quote(database),
        quote(table)
    )
}

pub fn sql_drop_partition(database: &str, table: &str, partition_day: u32) -> String {
    format!("ALTER TABLE {database}.{table} DROP PARTITION {partition_day}")
}

/// `YYYYMMDD` of the UTC day containing `time_ms`.
pub fn utc_day_number(time_ms: i64) -> u32 {
    let days = time_ms.div_euclid(86_400_000);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let number = year.clamp(0, 9_999) * 10_000 + month * 100 + day;
    u32::try_from(number).unwrap_or(0)
}

/// The daily partitions to drop: those whose whole day ended more than `retention_days`
/// before `now_ms`. Partition ids that are not `YYYYMMDD` numbers are kept.
pub fn partitions_to_drop(partitions: &[String], now_ms: i64, retention_days: u32) -> Vec<u32> {
    let cutoff_ms = now_ms.saturating_sub(i64::from(retention_days).saturating_mul(86_400_000));
    let oldest_kept_day = utc_day_number(cutoff_ms);
    let mut days: Vec<u32> = partitions
        .iter()
        .filter_map(|partition| partition.trim().trim_matches('\'').parse::<u32>().ok())
        .filter(|day| *day < oldest_kept_day)
        .collect();
    days.sort_unstable();
    days.dedup();
    days
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_pick_the_dialect() {
        assert_eq!(Dialect::for_version("18.16.1"), Ok(Dialect::Legacy));
        assert_eq!(Dialect::for_version("22.3.5.1"), Ok(Dialect::Legacy));
        assert_eq!(Dialect::for_version("22.8.1"), Ok(Dialect::Modern));
        assert_eq!(Dialect::for_version("26.9.2.1"), Ok(Dialect::Modern));
        assert!(Dialect::for_version("<html>").is_err());
        assert!(Dialect::for_version("26").is_err());
    }

    #[test]
    fn table_names_use_the_largest_whole_unit() {
        assert_eq!(rollup_table_name(60_000), "rollup_1m");
        assert_eq!(rollup_table_name(3_600_000), "rollup_1h");
        assert_eq!(rollup_table_name(86_400_000), "rollup_1d");
        assert_eq!(rollup_table_name(10_000), "rollup_10s");
        assert_eq!(rollup_table_name(90_000), "rollup_90s");
        assert_eq!(rollup_table_name(1_500), "rollup_1500ms");
    }

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(quote("it's"), "'it\\'s'");
        assert_eq!(quote("a\\'b"), "'a\\\\\\'b'");
    }

    #[test]
    fn utc_days_are_civil_dates() {
        assert_eq!(utc_day_number(0), 19_700_101);
        assert_eq!(utc_day_number(1_767_225_600_000), 20_260_101);
        assert_eq!(utc_day_number(1_767_225_599_999), 20_251_231);
        assert_eq!(utc_day_number(951_782_400_000), 20_000_229);
    }

    #[test]
    fn retention_drops_only_whole_days_past_the_cutoff() {
        let partitions: Vec<String> = ["20251229", "20251230", "20251231", "20260101", "tuple()"]
            .iter()
            .map(|id| id.to_string())
            .collect();
        // now = 2026-01-01 12:00 UTC, 1 day: 2025-12-31 12:00 is the cutoff, its day is kept.
        let now_ms = 1_767_225_600_000 + 12 * 3_600_000;
        assert_eq!(
            partitions_to_drop(&partitions, now_ms, 1),
            vec![20_251_229, 20_251_230]
        );
        assert_eq!(
            partitions_to_drop(&partitions, now_ms, 30),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn config_validation_refuses_what_would_break_sql() {
        let mut config = SchemaConfig::default();
        assert_eq!(config.validate(), Ok(()));
        config.database = "x; DROP".to_string();
        assert!(config.validate().is_err());
        let mut config = SchemaConfig::default();
        config.rollups.push(RollupSpec {
            resolution_ms: 60_000,
            retention_days: 1,
        });
        assert!(config.validate().is_err());
        let config = SchemaConfig {
            raw_retention_days: 0,
            ..SchemaConfig::default()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn empty_selections_render_no_query() {
        assert_eq!(sql_rollup_range("db", 60_000, &[], 0, 1), None);
        assert_eq!(sql_raw_range("db", &[], 0, 1), None);
    }
}
