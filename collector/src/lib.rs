//! The cloud side: QUIC ingest, durable log, window processor, store, query API.

pub mod api;
pub mod config;
pub mod ingest;
pub mod live;
pub mod log;
pub mod pipeline;
pub mod process;
pub use tributary_sled_open as sled_open;
pub mod store;
