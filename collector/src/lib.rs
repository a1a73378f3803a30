//! The cloud side: QUIC ingest, durable log, window processor, store, query API.

pub mod log;
pub mod process;
