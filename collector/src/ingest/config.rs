//! Settings of the QUIC ingest server, as they appear under `[ingest]` in
//! `collector.toml`. Defaults suit one collector serving a few thousand gateways on
//! cellular links; every limit protects the collector from one broken or hostile agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tributary_protocol::session::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Where the TLS identity comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. With `key_file`; when both are absent a self-signed
    /// identity is generated in `<state_dir>/tls/` on first start and its fingerprint
    /// printed for agents to pin.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Host names put in a generated certificate.
    pub subject_alt_names: Vec<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            subject_alt_names: vec!["localhost".to_owned()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// UDP address the QUIC server listens on.
    pub listen_address: SocketAddr,
    /// Agents and their token hashes; see `tributary-collector token add`.
    pub tokens_file: PathBuf,
    pub tls: TlsConfig,
    /// Largest batch frame accepted (kind byte + encoded batch). Announced to agents
    /// in the welcome so they size their batches to fit.
    pub max_frame_bytes: u32,
    pub max_series_per_batch: u32,
    pub max_readings_per_batch: u32,
    pub max_summaries_per_batch: u32,
    /// Series one session may define: bounds the memory of one agent's dictionary.
    pub max_series_per_session: usize,
    /// Batch streams one agent may have open at once (QUIC stream limit).
    pub max_in_flight_batches_per_agent: u32,
    /// Batch streams being processed across all agents. When the log falls behind and
    /// this many wait for it, ingest stops accepting streams (backpressure through
    /// QUIC flow control) instead of buffering.
    pub max_in_flight_batches_total: usize,
    /// Per-agent rate limit on batch bytes; `None` for no limit. Over it, ingest reads
    /// the agent's streams more slowly (it never drops).
    pub max_bytes_per_second_per_agent: Option<u64>,
    /// Time an agent has to send its hello after connecting.
    pub hello_timeout_ms: u64,
    /// Time a batch stream may take to deliver its frame.
    pub batch_read_timeout_ms: u64,
    /// QUIC keep-alive; the agent keeps its own, this covers agents behind NATs that
    /// only the server can keep open.
    pub keep_alive_interval_ms: u64,
    /// A connection silent for this long is dropped.
    pub idle_timeout_ms: u64,
    /// On shutdown, how long in-flight batches get to become durable and be acked.
    pub drain_timeout_ms: u64,
    /// Acked sequence numbers remembered per agent above its contiguous prefix, for
    /// duplicate detection (see `ingest::dedup`).
    pub dedup_window: usize,
    /// Newest protocol version offered to agents; `None` offers the newest this build
    /// speaks. While upgrading collectors, pin it to what the build you may roll back to
    /// speaks: agents then send batches in a format that build reads (the log keeps batches
    /// in the format they arrived in).
    pub max_protocol_version: Option<u16>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen_address: SocketAddr::from(([0, 0, 0, 0], 4433)),
            tokens_file: PathBuf::from("/etc/tributary/tokens"),
            tls: TlsConfig::default(),
            max_frame_bytes: 16 * 1024 * 1024,
            max_series_per_batch: 100_000,
            max_readings_per_batch: 1_000_000,
            max_summaries_per_batch: 1_000_000,
            max_series_per_session: 200_000,
            max_in_flight_batches_per_agent: 16,
            max_in_flight_batches_total: 4096,
            max_bytes_per_second_per_agent: None,
            hello_timeout_ms: 10_000,
            batch_read_timeout_ms: 120_000,
            keep_alive_interval_ms: 15_000,
            idle_timeout_ms: 60_000,
            drain_timeout_ms: 10_000,
            dedup_window: 4096,
            max_protocol_version: None,
        }
    }
}

impl IngestConfig {
    /// The newest protocol version this collector offers (see `max_protocol_version`).
    pub fn offered_protocol_version(&self) -> u16 {
        self.max_protocol_version
            .map_or(PROTOCOL_VERSION, |version| {
                version.clamp(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
            })
    }

    /// Problems with the settings, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_frame_bytes < 1024 {
            problems.push(format!(
                "ingest.max_frame_bytes is {}, must be at least 1024",
                self.max_frame_bytes
            ));
        }
        if self.max_in_flight_batches_per_agent == 0 {
            problems.push("ingest.max_in_flight_batches_per_agent must be at least 1".to_owned());
        }
        if self.max_in_flight_batches_total == 0 {
            problems.push("ingest.max_in_flight_batches_total must be at least 1".to_owned());
        }
        if self.max_bytes_per_second_per_agent == Some(0) {
            problems.push("ingest.max_bytes_per_second_per_agent must be positive when set (remove it for no limit)".to_owned());
        }
        if self.idle_timeout_ms <= self.keep_alive_interval_ms {
            problems.push(format!(
                "ingest.idle_timeout_ms ({}) must be longer than ingest.keep_alive_interval_ms ({})",
                self.idle_timeout_ms, self.keep_alive_interval_ms
            ));
        }
        if let Some(version) = self.max_protocol_version {
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                problems.push(format!(
                    "ingest.max_protocol_version is {version}; this build speaks protocol versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION} (leave it out for {PROTOCOL_VERSION})"
                ));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            problems.push(
                "ingest.tls.cert_file and ingest.tls.key_file must be set together".to_owned(),
            );
        }
        problems
    }
}
