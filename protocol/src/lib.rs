//! The data model and wire format shared by every Tributary component.
//!
//! Everything in this crate is sans-IO: plain types, encoders and decoders that
//! take bytes and return values. Nothing here opens a socket or reads a clock.
//!
//! - [`model`]: series, readings and window summaries.
//! - [`summary`]: the mergeable per-window [`summary::Summary`] and its quantile sketch.
//! - [`batch`]: the columnar batch an agent ships (encoding chosen by measurement, see
//!   `docs/benchmarks.md`).
//! - [`frame`]: length-prefixed framing for untrusted byte streams, with hard limits.
//! - [`session`]: the messages exchanged over a QUIC connection (hello, welcome, batch, ack, nack).

pub mod batch;
pub mod close;
pub mod frame;
pub mod model;
pub mod session;
pub mod sketch;
pub mod summary;

pub use batch::{decode_batch, encode_batch, Batch, BatchError, BatchLimits};
pub use model::{Reading, SeriesDef, SeriesId, SeriesKey, WindowSummary};
pub use summary::Summary;
