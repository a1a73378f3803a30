//! The agent's configuration file (TOML), and its validation.
//!
//! Parsing and validation are separate steps on purpose. Serde rejects what cannot be read at
//! all (a syntax error, an unknown field, a wrong type) and we report it with line and column.
//! [`AgentConfig::validate`] then checks meaning and collects *every* problem with its field path
//! (`sources[1].serial.baud_rate: ...`), so `tributary-agent check-config` shows a user all they
//! must fix in one run instead of one per restart. Every field has a documented default where a
//! sane one exists; `agent/agent.example.toml` documents each field and is parsed by a test.
//!
//! Relative file paths (`ca_file`, `token_file`, `buffer.path`, ...) are relative to the agent's
//! working directory; the systemd unit should use absolute paths.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::source::{
    MessageParser, PayloadFormat, PayloadOptions, SerialLineOptions, TimePolicy, TopicRouter,
    TopicTemplate,
};

/// Baud rates every Linux serial driver understands (termios `Bxxx` constants).
pub const STANDARD_BAUD_RATES: &[u32] = &[
    300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115_200, 230_400, 460_800, 500_000,
    576_000, 921_600, 1_000_000, 1_500_000, 2_000_000, 3_000_000, 4_000_000,
];

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Names this gateway to the collector; part of every batch's identity.
    pub agent_id: String,
    pub collector: CollectorConfig,
    #[serde(default)]
    pub buffer: BufferConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub batching: BatchingConfig,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
}

/// A secret read from the config; never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// `host:port` of the collector's QUIC endpoint.
    pub address: String,
    /// TLS server name; defaults to the host part of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// SHA-256 of the collector's certificate (DER), 64 hex digits, `:` separators allowed.
    #[serde(default)]
    pub cert_fingerprint_sha256: Option<String>,
    /// PEM file of the CA that signed the collector's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default = "default_max_batches_in_flight")]
    pub max_batches_in_flight: u32,
    /// Cap on backlog replay after an outage (live data is never capped); `None` = no cap.
    #[serde(default)]
    pub backlog_max_bytes_per_s: Option<u64>,
}

fn default_max_batches_in_flight() -> u32 {
    8
}

impl CollectorConfig {
    /// The TLS server name: `server_name`, or the host part of `address`.
    pub fn effective_server_name(&self) -> &str {
        if let Some(name) = &self.server_name {
            return name;
        }
        let host = self
            .address
            .rsplit_once(':')
            .map_or(self.address.as_str(), |(host, _)| host);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// When buffered batches are flushed to stable storage (see `docs/agent-buffer.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Flush after every batch: safest, slowest.
    EveryBatch,
    /// Group commit: one flush covers all batches of `group_commit_interval_ms`.
    #[default]
    Group,
    /// Never flush explicitly; the OS writes back when it likes. Loses the last moments on power loss.
    Os,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    pub path: PathBuf,
    pub max_buffer_bytes: u64,
    pub fsync: FsyncPolicy,
    pub group_commit_interval_ms: u64,
    /// sled's page cache of the buffer: most of the agent's resident memory under load.
    pub cache_capacity_bytes: u64,
    /// sled's page cache of the agent state database (series registry, journal).
    pub state_cache_capacity_bytes: u64,
}

/// Default page cache of the buffer. Smaller caches did not lower `bench agent`'s peak RSS
/// once batches stopped carrying definitions (docs/benchmarks.md), so the old size stays:
/// it spares a backlog drain disk reads on slow flash.
pub const DEFAULT_BUFFER_CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// Default page cache of the agent state database (series registry, journal).
pub const DEFAULT_STATE_CACHE_BYTES: u64 = 4 * 1024 * 1024;

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/tributary/buffer"),
            max_buffer_bytes: 256 * 1024 * 1024,
            fsync: FsyncPolicy::Group,
            group_commit_interval_ms: 50,
            cache_capacity_bytes: DEFAULT_BUFFER_CACHE_BYTES,
            state_cache_capacity_bytes: DEFAULT_STATE_CACHE_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where Prometheus `/metrics` is served; loopback by default.
    pub listen_address: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen_address: "127.0.0.1:9464".to_owned(),
        }
    }
}

/// One input. Exactly one of `mqtt_subscribe`, `mqtt_broker` and `serial` must be set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Unique; labels this source's metrics.
    pub name: String,
    #[serde(default)]
    pub mqtt_subscribe: Option<MqttSubscribeConfig>,
    #[serde(default)]
    pub mqtt_broker: Option<MqttBrokerConfig>,
    #[serde(default)]
    pub serial: Option<SerialConfig>,
    #[serde(default)]
    pub aggregation: AggregationConfig,
    #[serde(default)]
    pub time: TimePolicy,
    /// Journal every reading of this source, not only those that wait for an MQTT QoS 1
    /// acknowledgement, so a crash loses no open window of serial or QoS 0 data either
    /// (costs one write to the state database per reading; `docs/agent.md`).
    #[serde(default)]
    pub journal_all_readings: bool,
}

/// The kind of a source, once validation has checked exactly one is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SourceKind<'a> {
    MqttSubscribe(&'a MqttSubscribeConfig),
    MqttBroker(&'a MqttBrokerConfig),
    Serial(&'a SerialConfig),
}

impl SourceConfig {
    /// The configured kind; `None` if zero or several are set (a validation problem).
    pub fn kind(&self) -> Option<SourceKind<'_>> {
        match (&self.mqtt_subscribe, &self.mqtt_broker, &self.serial) {
            (Some(config), None, None) => Some(SourceKind::MqttSubscribe(config)),
            (None, Some(config), None) => Some(SourceKind::MqttBroker(config)),
            (None, None, Some(config)) => Some(SourceKind::Serial(config)),
            _ => None,
        }
    }
}

/// Subscribe to an existing broker on the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSubscribeConfig {
    /// `host:port` of the broker.
    pub broker_address: String,
    pub client_id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// 0 (at most once) or 1 (at least once, acknowledged only once durable in the buffer).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// MQTT 5 receive-maximum: how many QoS 1 messages the broker may have in flight to us.
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u32,
    /// Keep the broker-side session (and queued QoS 1 messages) across reconnects.
    #[serde(default = "default_true")]
    pub persistent_session: bool,
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u32,
    /// MQTT revision: `auto` tries 5.0 and falls back to 3.1.1 if the broker refuses it.
    #[serde(default)]
    pub protocol: MqttProtocol,
    pub topics: Vec<TopicConfig>,
}

/// The MQTT revision a subscribe source speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MqttProtocol {
    /// MQTT 5.0, falling back to 3.1.1 for the run if the broker refuses 5.0.
    #[default]
    Auto,
    V5,
    V311,
}

fn default_qos() -> u8 {
    1
}
fn default_receive_maximum() -> u32 {
    1024
}
fn default_true() -> bool {
    true
}
fn default_keep_alive_s() -> u32 {
    30
}

/// Compiles a source's topic list into a router (validation has already reported any error,
/// with its field path; this returns the first one).
pub fn topic_router(topics: &[TopicConfig]) -> Result<TopicRouter, String> {
    let parsers = topics
        .iter()
        .map(TopicConfig::message_parser)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TopicRouter::new(parsers))
}

/// Run an MQTT broker inside the agent that sensors publish to directly
/// (`docs/agent-broker.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttBrokerConfig {
    #[serde(default = "default_broker_listen_address")]
    pub listen_address: String,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Largest MQTT packet accepted from a client; a larger one closes that client.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: u32,
    /// QoS 1 messages per client awaiting durability before the broker stops reading from
    /// it; MQTT 5 clients are told it as receive-maximum.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Time a new connection has to send its CONNECT.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Accepted credentials; empty (default) accepts anonymous clients.
    #[serde(default)]
    pub users: Vec<BrokerUserConfig>,
    pub topics: Vec<TopicConfig>,
}

fn default_broker_listen_address() -> String {
    "127.0.0.1:1883".to_owned()
}
fn default_max_connections() -> u32 {
    1000
}
fn default_max_packet_bytes() -> u32 {
    256 * 1024
}
fn default_max_in_flight() -> u32 {
    1024
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}

/// One username the embedded broker accepts, with its password inline or in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerUserConfig {
    pub username: String,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl MqttBrokerConfig {
    /// The run-time settings, reading password files (validation has checked the shape).
    pub fn settings(&self) -> Result<crate::source::broker::BrokerSettings, String> {
        let mut users = Vec::with_capacity(self.users.len());
        for user in &self.users {
            let password = match (&user.password, &user.password_file) {
                (Some(password), _) => password.0.clone(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .map_err(|error| {
                        format!(
                            "cannot read the password_file {} of broker user `{}`: {error}",
                            path.display(),
                            user.username
                        )
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
                (None, None) => String::new(),
            };
            users.push(crate::source::broker::BrokerUser {
                username: user.username.clone(),
                password,
            });
        }
        Ok(crate::source::broker::BrokerSettings {
            limits: crate::source::broker::SessionLimits {
                max_packet_bytes: self.max_packet_bytes as usize,
                max_in_flight: self.max_in_flight as usize,
                connect_timeout_ms: i64::try_from(self.connect_timeout_ms).unwrap_or(i64::MAX),
            },
            max_connections: self.max_connections as usize,
            users: users.into(),
        })
    }
}

/// A topic template and how to read the payloads published under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub template: String,
    #[serde(default)]
    pub payload: PayloadOptions,
}

impl TopicConfig {
    /// Compiles the template and options; the message says what is wrong (validation reports it
    /// with its field path).
    pub fn message_parser(&self) -> Result<MessageParser, String> {
        let template = TopicTemplate::parse(&self.template).map_err(|error| error.to_string())?;
        MessageParser::new(template, self.payload.clone()).map_err(|error| error.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    Software,
    Hardware,
}

/// A sensor on a serial port speaking the line protocol of `docs/serial-protocol.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// The tty, e.g. `/dev/ttyUSB0`, or better a stable `/dev/serial/by-id/...` link.
    pub path: PathBuf,
    #[serde(default = "default_baud_rate")]
    pub baud_rate: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default)]
    pub flow_control: FlowControl,
    /// How often to retry opening the port while it is missing (USB unplugged).
    #[serde(default = "default_reconnect_interval_ms")]
    pub reconnect_interval_ms: u64,
    #[serde(default)]
    pub line: SerialLineOptions,
}

fn default_baud_rate() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_reconnect_interval_ms() -> u64 {
    1000
}

/// Which raw readings are forwarded besides the window summaries.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawPolicy {
    /// Every reading.
    #[default]
    All,
    /// Summaries only.
    None,
    /// Every `n`-th reading of each series.
    EveryNth { n: u32 },
    /// A reading only when it differs from the last forwarded one by more than `threshold`.
    Deadband { threshold: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// Width of the event-time tumbling windows summarised per series.
    pub window_ms: u64,
    pub raw: RawPolicy,
    /// How far behind a series' newest event time a reading may arrive and still land in
    /// its window (a later one becomes a partial summary the collector merges).
    pub allowed_disorder_ms: u64,
    /// Processing time of silence after which a series' open windows are closed; default
    /// (`None`) one window width plus `allowed_disorder_ms`.
    pub idle_close_ms: Option<u64>,
    /// Processing time of silence after which a series' state is dropped from memory.
    pub series_evict_after_ms: u64,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        Self {
            window_ms: 10_000,
            raw: RawPolicy::All,
            allowed_disorder_ms: crate::aggregate::DEFAULT_ALLOWED_DISORDER_MS.unsigned_abs(),
            idle_close_ms: None,
            series_evict_after_ms: crate::aggregate::DEFAULT_SERIES_EVICT_AFTER_MS.unsigned_abs(),
        }
    }
}

impl AggregationConfig {
    /// The aggregator's settings.
    pub fn window_config(&self) -> crate::aggregate::WindowConfig {
        let to_ms = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let mut config = crate::aggregate::WindowConfig::new(self.window_ms, self.raw)
            .with_allowed_disorder_ms(to_ms(self.allowed_disorder_ms));
        if let Some(idle_close_ms) = self.idle_close_ms {
            config.idle_timeout_ms = to_ms(idle_close_ms);
        }
        config.series_evict_after_ms = to_ms(self.series_evict_after_ms);
        config
    }

    /// The effective idle close time (for validation and docs).
    pub fn effective_idle_close_ms(&self) -> u64 {
        self.idle_close_ms
            .unwrap_or_else(|| self.window_ms.saturating_add(self.allowed_disorder_ms))
    }
}

/// How aggregated output is cut into batches (raw and summary batches are separate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// A batch is cut when it holds this many readings (or summaries).
    pub max_items_per_batch: u32,
    /// A non-empty batch is cut when its oldest item has waited this long.
    pub max_batch_age_ms: u64,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_items_per_batch: u32::try_from(crate::aggregate::DEFAULT_MAX_ITEMS_PER_BATCH)
                .unwrap_or(u32::MAX),
            max_batch_age_ms: crate::aggregate::DEFAULT_MAX_BATCH_AGE_MS.unsigned_abs(),
        }
    }
}

impl BatchingConfig {
    pub fn cutter(&self) -> crate::aggregate::BatchCutter {
        crate::aggregate::BatchCutter::new(
            self.max_items_per_batch as usize,
            i64::try_from(self.max_batch_age_ms).unwrap_or(i64::MAX),
        )
    }

    fn validate(&self, problems: &mut Problems) {
        check_range(
            problems,
            "batching.max_items_per_batch",
            self.max_items_per_batch.into(),
            1,
            1_000_000,
        );
        check_range(
            problems,
            "batching.max_batch_age_ms",
            self.max_batch_age_ms,
            10,
            600_000,
        );
    }
}

/// One thing wrong in a config, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Field path, e.g. `sources[1].serial.baud_rate`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{} problem(s) in {origin}:\n{}", problems.len(), problems.iter().map(|problem| format!("  {problem}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        origin: String,
        problems: Vec<ConfigProblem>,
    },
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, byte_offset: usize) -> (usize, usize) {
    let offset = byte_offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    let column = before
        .get(line_start..)
        .map_or(0, |rest| rest.chars().count())
        + 1;
    (line, column)
}

impl AgentConfig {
    /// Parses TOML text without checking meaning. `origin` names the text in messages (a path).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|error| {
            let (line, column) = error
                .span()
                .map_or((1, 1), |span| line_and_column(text, span.start));
            ConfigError::Syntax {
                origin: origin.to_owned(),
                line,
                column,
                message: error.message().trim_end().to_owned(),
            }
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml_str_validated(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config = Self::from_toml_str(text, origin)?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems,
            })
        }
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str_validated(&text, &path.display().to_string())
    }

    /// Every problem in the config, each with its field path; empty if the config is usable.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut problems = Problems::default();
        check_name(&mut problems, "agent_id", &self.agent_id);
        self.collector.validate(&mut problems);
        self.buffer.validate(&mut problems);
        self.batching.validate(&mut problems);
        check_socket_address(
            &mut problems,
            "metrics.listen_address",
            &self.metrics.listen_address,
        );
        if self.sources.is_empty() {
            problems.push(
                "sources",
                "no sources configured; add at least one [[sources]] table".to_owned(),
            );
        }
        for (index, source) in self.sources.iter().enumerate() {
            let path = format!("sources[{index}]");
            if self.sources[..index]
                .iter()
                .any(|earlier| earlier.name == source.name)
            {
                problems.push(
                    format!("{path}.name"),
                    format!(
                        "`{}` is used by an earlier source; names must be unique",
                        source.name
                    ),
                );
            }
            source.validate(&path, &mut problems);
        }
        problems.0
    }
}

#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: String) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message,
        });
    }
}

fn check_name(problems: &mut Problems, path: &str, name: &str) {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
    {
        problems.push(
            path,
            format!("`{name}` is not a valid name; use 1-64 characters of A-Z a-z 0-9 _ - ."),
        );
    }
}

fn check_host_port(problems: &mut Problems, path: &str, address: &str) {
    let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0)
    });
    if !valid {
        problems.push(
            path,
            format!(
                "`{address}` is not host:port (e.g. `collector.example.com:4433` or `[::1]:4433`)"
            ),
        );
    }
}

fn check_socket_address(problems: &mut Problems, path: &str, address: &str) {
    if address.parse::<std::net::SocketAddr>().is_err() {
        problems.push(
            path,
            format!("`{address}` is not an IP address and port (e.g. `127.0.0.1:9464`)"),
        );
    }
}

fn check_range(problems: &mut Problems, path: &str, value: u64, min: u64, max: u64) {
    if value < min || value > max {
        problems.push(path, format!("{value} is out of range; use {min}..={max}"));
    }
}

impl CollectorConfig {
    fn validate(&self, problems: &mut Problems) {
        check_host_port(problems, "collector.address", &self.address);
        if self.server_name.as_deref() == Some("") {
            problems.push(
                "collector.server_name",
                "is empty; remove it to use the host of `address`".to_owned(),
            );
        }
        match (&self.cert_fingerprint_sha256, &self.ca_file) {
            (None, None) => problems.push(
                "collector",
                "set `cert_fingerprint_sha256` (pin the collector's certificate) or `ca_file` (trust a CA)".to_owned(),
            ),
            (Some(_), Some(_)) => problems.push(
                "collector.ca_file",
                "set either `cert_fingerprint_sha256` or `ca_file`, not both".to_owned(),
            ),
            _ => {}
        }
        if let Some(fingerprint) = &self.cert_fingerprint_sha256 {
            let digits: String = fingerprint.chars().filter(|c| *c != ':').collect();
            if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
                problems.push(
                    "collector.cert_fingerprint_sha256",
                    format!("`{fingerprint}` is not a SHA-256 fingerprint; expected 64 hex digits (`:` separators allowed), e.g. from `openssl x509 -noout -fingerprint -sha256`"),
                );
            }
        }
        match (&self.token, &self.token_file) {
            (None, None) => problems.push(
                "collector",
                "set `token` or `token_file` (the collector authenticates agents by token)"
                    .to_owned(),
            ),
            (Some(_), Some(_)) => problems.push(
                "collector.token_file",
                "set either `token` or `token_file`, not both".to_owned(),
            ),
            (Some(token), None) if token.0.is_empty() => {
                problems.push("collector.token", "is empty".to_owned())
            }
            _ => {}
        }
        check_range(
            problems,
            "collector.max_batches_in_flight",
            self.max_batches_in_flight.into(),
            1,
            1024,
        );
        if self.backlog_max_bytes_per_s == Some(0) {
            problems.push(
                "collector.backlog_max_bytes_per_s",
                "0 would never drain the backlog; remove it for no cap".to_owned(),
            );
        }
    }
}

impl BufferConfig {
    fn validate(&self, problems: &mut Problems) {
        if self.path.as_os_str().is_empty() {
            problems.push(
                "buffer.path",
                "is empty; give a directory on persistent storage".to_owned(),
            );
        }
        // Small enough for the tiniest gateway flash partition (and for tests that fill it).
        const MIN_BUFFER_BYTES: u64 = 64 * 1024;
        if self.max_buffer_bytes < MIN_BUFFER_BYTES {
            problems.push(
                "buffer.max_buffer_bytes",
                format!(
                    "{} is below the minimum of {MIN_BUFFER_BYTES} (64 KiB)",
                    self.max_buffer_bytes
                ),
            );
        }
        if self.fsync == FsyncPolicy::Group {
            check_range(
                problems,
                "buffer.group_commit_interval_ms",
                self.group_commit_interval_ms,
                1,
                1000,
            );
        }
        const MIN_CACHE_BYTES: u64 = 256 * 1024;
        for (field, value) in [
            ("buffer.cache_capacity_bytes", self.cache_capacity_bytes),
            (
                "buffer.state_cache_capacity_bytes",
                self.state_cache_capacity_bytes,
            ),
        ] {
            if value < MIN_CACHE_BYTES {
                problems.push(
                    field,
                    format!("{value} is below the minimum of {MIN_CACHE_BYTES} (256 KiB)"),
                );
            }
        }
    }
}

impl SourceConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        check_name(problems, &format!("{path}.name"), &self.name);
        let kinds = [
            self.mqtt_subscribe.is_some(),
            self.mqtt_broker.is_some(),
            self.serial.is_some(),
        ];
        match kinds.iter().filter(|set| **set).count() {
            0 => problems.push(path, "no source kind; add one of [mqtt_subscribe], [mqtt_broker], [serial]".to_owned()),
            1 => {}
            _ => problems.push(path, "several source kinds; a source has exactly one of mqtt_subscribe, mqtt_broker, serial (add another [[sources]] for the other)".to_owned()),
        }
        if let Some(config) = &self.mqtt_subscribe {
            let path = format!("{path}.mqtt_subscribe");
            check_host_port(
                problems,
                &format!("{path}.broker_address"),
                &config.broker_address,
            );
            if config.client_id.is_empty() {
                problems.push(
                    format!("{path}.client_id"),
                    "is empty; a persistent session needs a stable client id".to_owned(),
                );
            }
            if config.qos > 1 {
                problems.push(format!("{path}.qos"), format!("{} is not supported; use 0 or 1 (1 gives the durable acknowledgement chain)", config.qos));
            }
            check_range(
                problems,
                &format!("{path}.receive_maximum"),
                config.receive_maximum.into(),
                1,
                65_535,
            );
            check_range(
                problems,
                &format!("{path}.keep_alive_s"),
                config.keep_alive_s.into(),
                5,
                65_535,
            );
            validate_topics(&config.topics, &format!("{path}.topics"), problems);
        }
        if let Some(config) = &self.mqtt_broker {
            let path = format!("{path}.mqtt_broker");
            check_socket_address(
                problems,
                &format!("{path}.listen_address"),
                &config.listen_address,
            );
            check_range(
                problems,
                &format!("{path}.max_connections"),
                config.max_connections.into(),
                1,
                100_000,
            );
            check_range(
                problems,
                &format!("{path}.max_packet_bytes"),
                config.max_packet_bytes.into(),
                64,
                16 * 1024 * 1024,
            );
            check_range(
                problems,
                &format!("{path}.max_in_flight"),
                config.max_in_flight.into(),
                1,
                65_535,
            );
            check_range(
                problems,
                &format!("{path}.connect_timeout_ms"),
                config.connect_timeout_ms,
                100,
                600_000,
            );
            for (index, user) in config.users.iter().enumerate() {
                let user_path = format!("{path}.users[{index}]");
                if user.username.is_empty() {
                    problems.push(format!("{user_path}.username"), "is empty".to_owned());
                }
                if config.users[..index]
                    .iter()
                    .any(|earlier| earlier.username == user.username)
                {
                    problems.push(
                        format!("{user_path}.username"),
                        format!("`{}` is listed twice", user.username),
                    );
                }
                match (&user.password, &user.password_file) {
                    (None, None) => {
                        problems.push(user_path, "set `password` or `password_file`".to_owned())
                    }
                    (Some(_), Some(_)) => problems.push(
                        format!("{user_path}.password_file"),
                        "set either `password` or `password_file`, not both".to_owned(),
                    ),
                    _ => {}
                }
            }
            validate_topics(&config.topics, &format!("{path}.topics"), problems);
        }
        if let Some(config) = &self.serial {
            let path = format!("{path}.serial");
            if config.path.as_os_str().is_empty() {
                problems.push(
                    format!("{path}.path"),
                    "is empty; give the tty, e.g. /dev/ttyUSB0".to_owned(),
                );
            }
            if !STANDARD_BAUD_RATES.contains(&config.baud_rate) {
                let rates: Vec<String> = STANDARD_BAUD_RATES.iter().map(u32::to_string).collect();
                problems.push(
                    format!("{path}.baud_rate"),
                    format!(
                        "{} is not a standard rate; use one of {}",
                        config.baud_rate,
                        rates.join(", ")
                    ),
                );
            }
            if !(5..=8).contains(&config.data_bits) {
                problems.push(
                    format!("{path}.data_bits"),
                    format!("{} is not possible; use 5, 6, 7 or 8", config.data_bits),
                );
            }
            if !(1..=2).contains(&config.stop_bits) {
                problems.push(
                    format!("{path}.stop_bits"),
                    format!("{} is not possible; use 1 or 2", config.stop_bits),
                );
            }
            check_range(
                problems,
                &format!("{path}.reconnect_interval_ms"),
                config.reconnect_interval_ms,
                10,
                600_000,
            );
            check_range(
                problems,
                &format!("{path}.line.max_line_bytes"),
                config.line.max_line_bytes as u64,
                16,
                65_536,
            );
        }
        let aggregation_path = format!("{path}.aggregation");
        check_range(
            problems,
            &format!("{aggregation_path}.window_ms"),
            self.aggregation.window_ms,
            100,
            86_400_000,
        );
        check_range(
            problems,
            &format!("{aggregation_path}.allowed_disorder_ms"),
            self.aggregation.allowed_disorder_ms,
            0,
            86_400_000,
        );
        if let Some(idle_close_ms) = self.aggregation.idle_close_ms {
            check_range(
                problems,
                &format!("{aggregation_path}.idle_close_ms"),
                idle_close_ms,
                100,
                7 * 86_400_000,
            );
        }
        let idle_close_ms = self.aggregation.effective_idle_close_ms();
        if self.aggregation.series_evict_after_ms < idle_close_ms {
            problems.push(
                format!("{aggregation_path}.series_evict_after_ms"),
                format!(
                    "{} is below the idle close time of {idle_close_ms} ms (idle_close_ms, or window_ms + allowed_disorder_ms); a series is evicted only after its windows closed, so use at least that",
                    self.aggregation.series_evict_after_ms
                ),
            );
        }
        match self.aggregation.raw {
            RawPolicy::EveryNth { n: 0 } => problems.push(
                format!("{aggregation_path}.raw.n"),
                "0 is not possible; use 1 or more (1 forwards every reading)".to_owned(),
            ),
            RawPolicy::Deadband { threshold } if !(threshold.is_finite() && threshold >= 0.0) => {
                problems.push(
                    format!("{aggregation_path}.raw.threshold"),
                    format!("{threshold} is not possible; use a finite value >= 0"),
                )
            }
            _ => {}
        }
        if self.time.max_future_ms < 0 {
            problems.push(
                format!("{path}.time.max_future_ms"),
                format!("{} is negative; use 0 or more", self.time.max_future_ms),
            );
        }
    }
}

fn validate_topics(topics: &[TopicConfig], path: &str, problems: &mut Problems) {
    if topics.is_empty() {
        problems.push(
            path,
            "no topics; add at least one [[...topics]] with a template".to_owned(),
        );
    }
    for (index, topic) in topics.iter().enumerate() {
        let path = format!("{path}[{index}]");
        if let Err(message) = topic.message_parser() {
            problems.push(format!("{path}.template"), message);
        }
        let payload = &topic.payload;
        let payload_path = format!("{path}.payload");
        check_range(
            problems,
            &format!("{payload_path}.max_payload_bytes"),
            payload.max_payload_bytes as u64,
            1,
            16 * 1024 * 1024,
        );
        if payload.timestamp_field.is_some() && payload.format != PayloadFormat::Json {
            problems.push(
                format!("{payload_path}.timestamp_field"),
                format!(
                    "only applies to format `json`, not `{}`",
                    payload.format.name()
                ),
            );
        }
        if payload.timestamp_unit.is_some()
            && !matches!(
                payload.format,
                PayloadFormat::Json | PayloadFormat::LineProtocol
            )
        {
            problems.push(
                format!("{payload_path}.timestamp_unit"),
                format!(
                    "only applies to formats `json` and `line_protocol`, not `{}`",
                    payload.format.name()
                ),
            );
        }
        if payload.senml_unit_as_tag && payload.format != PayloadFormat::Senml {
            problems.push(
                format!("{payload_path}.senml_unit_as_tag"),
                format!(
                    "only applies to format `senml`, not `{}`",
                    payload.format.name()
                ),
            );
        }
    }
}
