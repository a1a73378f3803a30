//! QUIC ingest: the collector's front door for agents.
//!
//! Data flow: an agent connects (TLS 1.3, ALPN `tributary/1`), sends a hello with its
//! token on the first stream and gets a welcome with the limits to respect, or a
//! reject with a reason. Then every batch travels on its own bidirectional stream and
//! is answered with an ack once it is durable in the [`crate::log::DurableLog`], or a
//! nack saying whether a retry can help.
//!
//! Invariants a change must not break:
//! - an ack is sent only after the log reported the record durable;
//! - a batch is acked without writing only if its (agent, sequence) is known to have
//!   been written ([`dedup`] never guesses);
//! - nothing an agent sends reaches a panic or an unbounded allocation: frames are
//!   checked against limits before they are buffered, batches before they are decoded;
//! - when the log is slow, ingest stops reading streams rather than queueing batches.
//!
//! Modules: [`decide`] (every decision about an agent's bytes, sans-IO; fuzzed),
//! [`config`] (settings), [`tls`] (identity, fingerprint), [`tokens`] (agent
//! authentication), [`dedup`] (resent batches), [`rate`] (per-agent byte rate),
//! [`fleet`] (what each agent reported), [`metrics`] and [`http`] (Prometheus and
//! health endpoints), [`server`] (the QUIC shell).

pub mod config;
pub mod decide;
pub mod dedup;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod rate;
pub mod server;
pub mod tls;
pub mod tokens;

pub use config::{IngestConfig, TlsConfig};
pub use dedup::{DedupStore, SequenceWindow};
pub use fleet::{AgentStatus, FleetView};
pub use metrics::IngestMetrics;
pub use server::{IngestError, IngestParts, IngestServer};
pub use tls::TlsIdentity;
pub use tokens::{add_token, TokenStore};
