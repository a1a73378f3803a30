//! What can stop the shipper, and what only delays it.

use tributary_protocol::session::RejectReason;

use crate::buffer::BufferError;

/// Errors of the shipper. [`ShipError::is_fatal`] ones end [`super::Shipper::run`]:
/// an operator has to change something. The others are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("shipping configuration is invalid: {0}")]
    Config(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("the collector refused agent {agent_id}: {reason:?}: {message}")]
    Rejected {
        agent_id: String,
        reason: RejectReason,
        message: String,
        retry_after_ms: Option<u32>,
    },
    #[error(
        "the collector at {address} presented a certificate with SHA-256 fingerprint {presented}, \
         but the config pins {pinned}; if the collector's certificate was replaced on purpose, put \
         the new fingerprint (printed by the collector on start) in ship.server_fingerprint_sha256, \
         otherwise something is intercepting the connection"
    )]
    FingerprintMismatch {
        address: String,
        presented: String,
        pinned: String,
    },
    #[error("cannot resolve the collector address {address:?}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("cannot connect to the collector at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("session handshake with the collector failed: {0}")]
    Handshake(String),
    #[error("cannot create the QUIC endpoint on {address}: {source}")]
    Endpoint {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Buffer(#[from] BufferError),
}

impl ShipError {
    /// Whether retrying without an operator's change is pointless.
    pub fn is_fatal(&self) -> bool {
        match self {
            ShipError::Config(_)
            | ShipError::Tls(_)
            | ShipError::FingerprintMismatch { .. }
            | ShipError::Endpoint { .. } => true,
            ShipError::Rejected { reason, .. } => !reason.is_retryable(),
            ShipError::Resolve { .. }
            | ShipError::Connect { .. }
            | ShipError::Handshake(_)
            | ShipError::Buffer(_) => false,
        }
    }
}
