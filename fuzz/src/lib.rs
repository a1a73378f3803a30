//! Shared by the fuzz targets and by the tests that replay their inputs:
//! `protocol/tests/fuzz_inputs.rs` includes `drive.rs` by path, and
//! `collector/tests/ingest_fuzz_inputs.rs` includes `ingest_drive.rs`, so seeds and
//! regressions run through exactly the fuzzed code.
pub mod drive;

/// The collector's sans-IO ingest decisions, compiled from the collector's own source
/// file so the fuzz build does not pull in the collector (Kafka, ClickHouse, QUIC).
#[path = "../../collector/src/ingest/decide.rs"]
pub mod decide;

pub mod ingest_drive;
