//! The gateway daemon: reads MQTT and serial sensors, pre-aggregates, buffers to disk, ships over QUIC.
pub mod aggregate;
pub mod allocator;
pub mod buffer;
pub mod config;
pub mod metrics;
pub mod run;
pub mod ship;
use tributary_sled_open as sled_open;
pub mod source;
