//! Settings of the shipper, as they appear under `[ship]` in `agent.toml`.
//!
//! The timing defaults are tuned for cellular links: a 15 s keep-alive stays inside
//! the 30-60 s UDP NAT timeouts of mobile carriers, and a 60 s idle timeout notices a
//! dead link within a minute without tearing down sessions over a short radio gap
//! (QUIC retransmits meanwhile, and migrates the session if the address changes).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShipConfig {
    /// `host:port` of the collector's QUIC ingest.
    pub collector_address: String,
    /// Name sent in TLS SNI and checked against the certificate with `ca_file`.
    pub server_name: String,
    pub agent_id: String,
    /// This agent's token from `tributary-collector token add`.
    pub token: String,
    /// SHA-256 of the collector's certificate (hex, `:` allowed), as it prints on start.
    pub server_fingerprint_sha256: Option<String>,
    /// Or: a PEM file of CA certificates that signed the collector's certificate.
    pub ca_file: Option<PathBuf>,
    /// Local UDP address; port 0 picks one.
    pub bind_address: SocketAddr,
    /// Batches sent and not yet answered, at most (the collector may announce fewer).
    pub max_in_flight_batches: u32,
    pub keep_alive_interval_ms: u64,
    pub idle_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Time a batch may wait for its ack before the stream is abandoned and retried.
    pub ack_timeout_ms: u64,
    /// Reconnect backoff (exponential with jitter) between these bounds.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Backoff of a batch after a retryable nack.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// Cap on the backlog drain in bytes/s; live batches are never capped. `None`: no cap.
    pub backlog_max_bytes_per_second: Option<u64>,
    /// How often the buffer is checked for new batches when nobody wakes the shipper.
    pub poll_interval_ms: u64,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            collector_address: "localhost:4433".to_owned(),
            server_name: "localhost".to_owned(),
            agent_id: String::new(),
            token: String::new(),
            server_fingerprint_sha256: None,
            ca_file: None,
            bind_address: SocketAddr::from(([0, 0, 0, 0], 0)),
            max_in_flight_batches: 8,
            keep_alive_interval_ms: 15_000,
            idle_timeout_ms: 60_000,
            connect_timeout_ms: 10_000,
            ack_timeout_ms: 60_000,
            reconnect_min_ms: 500,
            reconnect_max_ms: 60_000,
            retry_min_ms: 200,
            retry_max_ms: 30_000,
            backlog_max_bytes_per_second: None,
            poll_interval_ms: 200,
        }
    }
}

impl ShipConfig {
    /// Problems with the settings, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !tributary_protocol::session::is_valid_agent_id(&self.agent_id) {
            problems.push(format!(
                "ship.agent_id {:?} must be 1 to 128 ASCII letters, digits, '-', '_', '.' or ':'",
                self.agent_id
            ));
        }
        if self.token.is_empty() {
            problems.push(
                "ship.token is empty; get one with `tributary-collector token add AGENT_ID`"
                    .to_owned(),
            );
        }
        if self.server_fingerprint_sha256.is_some() == self.ca_file.is_some() {
            problems.push(
                "set exactly one of ship.server_fingerprint_sha256 and ship.ca_file".to_owned(),
            );
        }
        if self.max_in_flight_batches == 0 {
            problems.push("ship.max_in_flight_batches must be at least 1".to_owned());
        }
        if self.idle_timeout_ms <= self.keep_alive_interval_ms {
            problems.push(format!(
                "ship.idle_timeout_ms ({}) must be longer than ship.keep_alive_interval_ms ({})",
                self.idle_timeout_ms, self.keep_alive_interval_ms
            ));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            problems.push(
                "ship.reconnect_min_ms must be positive and at most ship.reconnect_max_ms"
                    .to_owned(),
            );
        }
        if self.retry_min_ms == 0 || self.retry_min_ms > self.retry_max_ms {
            problems.push(
                "ship.retry_min_ms must be positive and at most ship.retry_max_ms".to_owned(),
            );
        }
        problems
    }
}
