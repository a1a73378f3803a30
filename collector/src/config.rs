//! `collector.toml`: the collector's configuration file.
//!
//! Why one file with sections: `serve` runs every stage in one process and each stage
//! reads its own section; `ingest` and `process` read only what they need. Unknown fields
//! are errors so a typo never silently falls back to a default. The documented example,
//! `collector/collector.example.toml`, is parsed by a test.
//!
//! `[log]` and `[store]` choose a backend with `kind` (embedded by default, so a file with
//! only `state_dir` runs the whole pipeline with no services). They are read in two steps
//! (the table, then the chosen backend's struct) so each backend's own struct keeps
//! rejecting unknown fields; `[process]` likewise splits the consumer's own fields from the
//! window engine's. Every problem is reported with its field path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use thiserror::Error;

use crate::ingest::IngestConfig;
use crate::log::kafka::KafkaLogConfig;
use crate::log::EmbeddedLogConfig;
use crate::pipeline::{ConsumerConfig, PartitionAssignment};
use crate::process::{EngineConfig, ProcessError};
use crate::store::schema::{RollupSpec, SchemaConfig};
use crate::store::{BatchPolicy, ClickHouseStoreConfig, EmbeddedStoreConfig, RetryPolicy};

const DAY_MS: i64 = 86_400_000;

/// The whole file, resolved: defaults filled in, backends chosen.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// Where the collector keeps its state: the generated TLS identity (`tls/`), the
    /// duplicate-detection state (`dedup/`) and, unless `[log]`/`[store]` say otherwise,
    /// the embedded log (`log/`) and the embedded store (`store/`).
    pub state_dir: PathBuf,
    /// HTTP address of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_address: SocketAddr,
    pub ingest: IngestConfig,
    pub log: LogConfig,
    pub process: ProcessConfig,
    pub store: StoreConfig,
    pub api: ApiConfig,
}

/// `[log]`: where ingest appends and the processor reads.
#[derive(Debug, Clone)]
pub enum LogConfig {
    Embedded(EmbeddedLogConfig),
    Kafka(KafkaLogConfig),
}

impl LogConfig {
    pub fn describe(&self) -> String {
        match self {
            LogConfig::Embedded(config) => format!(
                "embedded log in {} ({} partitions)",
                config.directory.display(),
                config.partitions
            ),
            LogConfig::Kafka(config) => {
                format!("Kafka topic {} at {}", config.topic, config.brokers)
            }
        }
    }
}

/// `[process]`: the window engine's settings plus the consumer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    pub engine: EngineConfig,
    /// Consumer name: keys checkpoints in the store and positions in the log.
    pub group: String,
    /// Partitions this processor consumes (`"all"`, `"0,2"`, or `"1/3"`).
    pub partitions: PartitionAssignment,
    pub poll_interval_ms: u64,
    pub caught_up_flush_interval_ms: i64,
    pub max_read_bytes: usize,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        let consumer = ConsumerConfig::default();
        Self {
            engine: consumer.engine,
            group: consumer.group,
            partitions: consumer.partitions,
            poll_interval_ms: consumer.poll_interval_ms,
            caught_up_flush_interval_ms: consumer.caught_up_flush_interval_ms,
            max_read_bytes: consumer.max_read_bytes,
        }
    }
}

impl ProcessConfig {
    /// The consumer loop's settings (start and end are the caller's: live or replay).
    pub fn consumer_config(&self) -> ConsumerConfig {
        ConsumerConfig {
            engine: self.engine.clone(),
            group: self.group.clone(),
            partitions: self.partitions.clone(),
            poll_interval_ms: self.poll_interval_ms,
            caught_up_flush_interval_ms: self.caught_up_flush_interval_ms,
            max_read_bytes: self.max_read_bytes,
            ..ConsumerConfig::default()
        }
    }
}

/// The consumer's own fields under `[process]`; the rest is the engine's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProcessOwnFields {
    group: Option<String>,
    partitions: Option<PartitionAssignment>,
    poll_interval_ms: Option<u64>,
    caught_up_flush_interval_ms: Option<i64>,
    max_read_bytes: Option<usize>,
}

const PROCESS_OWN_FIELDS: [&str; 5] = [
    "group",
    "partitions",
    "poll_interval_ms",
    "caught_up_flush_interval_ms",
    "max_read_bytes",
];

/// `[store]`: where results land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Embedded(EmbeddedStoreSettings),
    ClickHouse(ClickHouseSettings),
}

impl StoreConfig {
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Embedded(settings) => {
                format!("embedded store in {}", settings.path.display())
            }
            StoreConfig::ClickHouse(settings) => format!(
                "ClickHouse database {} at {}",
                settings.database, settings.url
            ),
        }
    }

    /// The same store with its tables renamed for a replay: the ClickHouse database gets
    /// `_<suffix>`, the embedded store's directory `-<suffix>`.
    pub fn with_suffix(&self, suffix: &str) -> StoreConfig {
        match self {
            StoreConfig::Embedded(settings) => {
                let mut name = settings
                    .path
                    .file_name()
                    .map(|name| name.to_os_string())
                    .unwrap_or_else(|| "store".into());
                name.push(format!("-{suffix}"));
                StoreConfig::Embedded(EmbeddedStoreSettings {
                    path: settings.path.with_file_name(name),
                    ..settings.clone()
                })
            }
            StoreConfig::ClickHouse(settings) => StoreConfig::ClickHouse(ClickHouseSettings {
                database: format!("{}_{suffix}", settings.database),
                ..settings.clone()
            }),
        }
    }
}

/// `[store] kind = "embedded"`. Rollups follow `[process] resolutions_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedStoreSettings {
    /// Defaults to `<state_dir>/store`.
    pub path: PathBuf,
    pub batch: BatchPolicy,
    /// Raw readings older than this (event time) are deleted.
    pub raw_retention_ms: i64,
    /// Rollup windows older than this (window start) are deleted.
    pub rollup_retention_ms: i64,
    /// Late rows older than this (event time) are deleted.
    pub late_retention_ms: i64,
    /// sled's page cache: the bulk of the store's memory.
    pub cache_capacity_bytes: u64,
}

impl Default for EmbeddedStoreSettings {
    fn default() -> Self {
        let store = EmbeddedStoreConfig::new(PathBuf::new(), Vec::new());
        Self {
            path: store.path,
            batch: store.batch,
            raw_retention_ms: store.raw_retention_ms.unwrap_or(7 * DAY_MS),
            rollup_retention_ms: store.rollup_retention_ms.unwrap_or(90 * DAY_MS),
            late_retention_ms: store.late_retention_ms.unwrap_or(30 * DAY_MS),
            cache_capacity_bytes: store.cache_capacity_bytes,
        }
    }
}

impl EmbeddedStoreSettings {
    /// The store's config for the engine's resolutions.
    pub fn store_config(&self, resolutions_ms: &[i64]) -> EmbeddedStoreConfig {
        EmbeddedStoreConfig {
            path: self.path.clone(),
            resolutions_ms: resolutions_ms.to_vec(),
            batch: self.batch.clone(),
            raw_retention_ms: Some(self.raw_retention_ms),
            rollup_retention_ms: Some(self.rollup_retention_ms),
            late_retention_ms: Some(self.late_retention_ms),
            cache_capacity_bytes: self.cache_capacity_bytes,
        }
    }
}

/// `[store] kind = "clickhouse"`. Rollup tables follow `[process] resolutions_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseSettings {
    /// The HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: String,
    pub batch: BatchPolicy,
    pub retry: RetryPolicy,
    pub request_timeout_ms: u64,
    pub raw_retention_days: u32,
    pub late_retention_days: u32,
    /// One per entry of `[process] resolutions_ms`, in that order; empty means 90 days for
    /// resolutions under an hour and 730 days for the others.
    pub rollup_retention_days: Vec<u32>,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        let store = ClickHouseStoreConfig::default();
        Self {
            url: store.url,
            user: None,
            password: None,
            database: store.schema.database,
            batch: store.batch,
            retry: store.retry,
            request_timeout_ms: store.request_timeout_ms,
            raw_retention_days: store.schema.raw_retention_days,
            late_retention_days: store.schema.late_retention_days,
            rollup_retention_days: Vec::new(),
        }
    }
}

impl ClickHouseSettings {
    /// The store's config, with one rollup table per engine resolution.
    pub fn store_config(&self, resolutions_ms: &[i64]) -> ClickHouseStoreConfig {
        let rollups = resolutions_ms
            .iter()
            .enumerate()
            .map(|(index, resolution_ms)| RollupSpec {
                resolution_ms: *resolution_ms,
                retention_days: self
                    .rollup_retention_days
                    .get(index)
                    .copied()
                    .unwrap_or(if *resolution_ms < 3_600_000 { 90 } else { 730 }),
            })
            .collect();
        ClickHouseStoreConfig {
            url: self.url.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            schema: SchemaConfig {
                database: self.database.clone(),
                raw_retention_days: self.raw_retention_days,
                late_retention_days: self.late_retention_days,
                rollups,
            },
            batch: self.batch.clone(),
            retry: self.retry.clone(),
            request_timeout_ms: self.request_timeout_ms,
        }
    }
}

/// `[api]`: the HTTP query API and live feed for the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen_address: SocketAddr,
    /// Bearer token clients must send; required unless `listen_address` is loopback.
    pub token: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
        }
    }
}

/// The file as written; sections with a `kind` are kept as tables until resolved.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    #[serde(default = "default_metrics_address")]
    metrics_address: SocketAddr,
    #[serde(default)]
    ingest: IngestConfig,
    #[serde(default)]
    log: Option<toml::Table>,
    #[serde(default)]
    process: Option<toml::Table>,
    #[serde(default)]
    store: Option<toml::Table>,
    #[serde(default)]
    api: ApiConfig,
}

fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has problems:\n  - {}", problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// Takes `kind` out of a section table (default `embedded`).
fn take_kind(
    table: &mut toml::Table,
    section: &str,
    known: &[&str],
    problems: &mut Vec<String>,
) -> Option<String> {
    match table.remove("kind") {
        None => Some("embedded".to_string()),
        Some(toml::Value::String(kind)) if known.contains(&kind.as_str()) => Some(kind),
        Some(other) => {
            problems.push(format!(
                "{section}.kind is {other:?}; use one of {}",
                known
                    .iter()
                    .map(|kind| format!("\"{kind}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            None
        }
    }
}

/// Deserialises a section's table into its struct, naming the section in errors.
fn section<T: DeserializeOwned>(
    table: toml::Table,
    section: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    match toml::Value::Table(table).try_into::<T>() {
        Ok(value) => Some(value),
        Err(error) => {
            problems.push(format!("{section}: {}", error.to_string().trim()));
            None
        }
    }
}

impl CollectorConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
        let mut problems = Vec::new();
        let config = Self::resolve(raw, &mut problems);
        match config {
            Some(config) if problems.is_empty() => {
                let problems = config.problems();
                if problems.is_empty() {
                    Ok(config)
                } else {
                    Err(ConfigError::Invalid {
                        path: path.to_path_buf(),
                        problems,
                    })
                }
            }
            _ => Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            }),
        }
    }

    fn resolve(raw: RawConfig, problems: &mut Vec<String>) -> Option<Self> {
        let state_dir = raw.state_dir;
        let log = match raw.log {
            None => Some(LogConfig::Embedded(EmbeddedLogConfig::new(
                state_dir.join("log"),
            ))),
            Some(mut table) => match take_kind(&mut table, "log", &["embedded", "kafka"], problems)
                .as_deref()
            {
                Some("kafka") => {
                    section::<KafkaLogConfig>(table, "log", problems).map(LogConfig::Kafka)
                }
                Some(_) => {
                    if !table.contains_key("directory") {
                        table.insert(
                            "directory".to_string(),
                            toml::Value::String(
                                state_dir.join("log").to_string_lossy().into_owned(),
                            ),
                        );
                    }
                    section::<EmbeddedLogConfig>(table, "log", problems).map(LogConfig::Embedded)
                }
                None => None,
            },
        };
        let process = match raw.process {
            None => Some(ProcessConfig::default()),
            Some(mut table) => {
                let mut own = toml::Table::new();
                for field in PROCESS_OWN_FIELDS {
                    if let Some(value) = table.remove(field) {
                        own.insert(field.to_string(), value);
                    }
                }
                let own = section::<ProcessOwnFields>(own, "process", problems);
                let engine = section::<EngineConfig>(table, "process", problems);
                match (own, engine) {
                    (Some(own), Some(engine)) => {
                        let defaults = ProcessConfig::default();
                        Some(ProcessConfig {
                            engine,
                            group: own.group.unwrap_or(defaults.group),
                            partitions: own.partitions.unwrap_or(defaults.partitions),
                            poll_interval_ms: own
                                .poll_interval_ms
                                .unwrap_or(defaults.poll_interval_ms),
                            caught_up_flush_interval_ms: own
                                .caught_up_flush_interval_ms
                                .unwrap_or(defaults.caught_up_flush_interval_ms),
                            max_read_bytes: own.max_read_bytes.unwrap_or(defaults.max_read_bytes),
                        })
                    }
                    _ => None,
                }
            }
        };
        let default_store_path = state_dir.join("store");
        let store = match raw.store {
            None => Some(StoreConfig::Embedded(EmbeddedStoreSettings {
                path: default_store_path,
                ..EmbeddedStoreSettings::default()
            })),
            Some(mut table) => {
                match take_kind(&mut table, "store", &["embedded", "clickhouse"], problems)
                    .as_deref()
                {
                    Some("clickhouse") => section::<ClickHouseSettings>(table, "store", problems)
                        .map(StoreConfig::ClickHouse),
                    Some(_) => section::<EmbeddedStoreSettings>(table, "store", problems).map(
                        |mut settings| {
                            if settings.path.as_os_str().is_empty() {
                                settings.path = default_store_path;
                            }
                            StoreConfig::Embedded(settings)
                        },
                    ),
                    None => None,
                }
            }
        };
        Some(CollectorConfig {
            state_dir,
            metrics_address: raw.metrics_address,
            ingest: raw.ingest,
            log: log?,
            process: process?,
            store: store?,
            api: raw.api,
        })
    }

    /// Every problem with the settings, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.ingest.problems();
        match &self.log {
            LogConfig::Embedded(config) => {
                if let Err(error) = config.validate() {
                    problems.push(format!("log: {error}"));
                }
            }
            LogConfig::Kafka(config) => {
                if let Err(error) = config.validate() {
                    problems.push(format!("log: {error}"));
                }
            }
        }
        match self.process.engine.validate() {
            Ok(()) => {}
            Err(ProcessError::InvalidConfig { field, reason }) => {
                problems.push(format!("process.{field}: {reason}"));
            }
            Err(other) => problems.push(format!("process: {other}")),
        }
        let group = &self.process.group;
        if group.is_empty()
            || group.len() > 128
            || !group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            problems.push(format!(
                "process.group {group:?} is not usable: use 1 to 128 characters from A-Z a-z 0-9 . _ -"
            ));
        }
        if self.process.max_read_bytes == 0 {
            problems.push("process.max_read_bytes must be at least 1".to_string());
        }
        if self.process.caught_up_flush_interval_ms < 0 {
            problems.push("process.caught_up_flush_interval_ms must be 0 or more".to_string());
        }
        let resolutions = &self.process.engine.resolutions_ms;
        match &self.store {
            StoreConfig::Embedded(settings) => {
                for (field, value) in [
                    ("raw_retention_ms", settings.raw_retention_ms),
                    ("rollup_retention_ms", settings.rollup_retention_ms),
                    ("late_retention_ms", settings.late_retention_ms),
                ] {
                    if value <= 0 {
                        problems.push(format!("store.{field} is {value}; it must be positive"));
                    }
                }
            }
            StoreConfig::ClickHouse(settings) => {
                if !settings.rollup_retention_days.is_empty()
                    && settings.rollup_retention_days.len() != resolutions.len()
                {
                    problems.push(format!(
                        "store.rollup_retention_days lists {} entries but process.resolutions_ms has {}; give one per resolution, in the same order (or leave it out)",
                        settings.rollup_retention_days.len(),
                        resolutions.len()
                    ));
                }
                if let Err(error) = settings.store_config(resolutions).schema.validate() {
                    problems.push(format!("store: {error}"));
                }
            }
        }
        if !self.api.listen_address.ip().is_loopback()
            && self.api.token.as_deref().is_none_or(str::is_empty)
        {
            problems.push(format!(
                "api.token is required because api.listen_address {} is not a loopback address; set a long random token, or listen on 127.0.0.1",
                self.api.listen_address
            ));
        }
        problems
    }

    /// The embedded log's settings, when the log is embedded.
    pub fn embedded_log_config(&self) -> Option<&EmbeddedLogConfig> {
        match &self.log {
            LogConfig::Embedded(config) => Some(config),
            LogConfig::Kafka(_) => None,
        }
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.state_dir.join("tls")
    }

    pub fn dedup_dir(&self) -> PathBuf {
        self.state_dir.join("dedup")
    }
}
