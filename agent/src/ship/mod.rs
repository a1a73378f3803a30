//! Shipping: from the disk buffer to the collector over QUIC.
//!
//! The [`Shipper`] keeps one QUIC session (TLS 1.3, ALPN `tributary/1`, the
//! collector's certificate pinned or CA-validated, token in the hello) and sends every
//! buffered batch on its own bidirectional stream, several in flight. A batch is
//! removed from the buffer only when the collector acked it, which it does only once
//! the batch is durable in its log: that is the agent's half of the acknowledgement
//! chain. Live batches go out first while the backlog drains in parallel.
//!
//! - [`state`]: the sans-IO bookkeeping (in-flight slots, retry and reconnect
//!   backoff, drain rate), unit-tested with time passed in;
//! - [`tls`]: certificate pinning;
//! - [`shipper`]: the QUIC shell;
//! - [`config`]: the `[ship]` settings and why the timing defaults suit cellular links.
//!
//! Contract with the code that fills the buffer: every buffered batch is encoded
//! self-contained, i.e. it carries the definition of every series id it uses. The
//! shipper strips the definitions the collector already confirmed in the current
//! session before sending, and sends them all again if the collector says it lacks one.

pub mod config;
pub mod error;
pub mod shipper;
pub mod state;
pub mod tls;

pub use config::ShipConfig;
pub use error::ShipError;
pub use shipper::{ShipStats, Shipper, ShipperHandle};
