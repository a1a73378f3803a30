//! Shared by the fuzz targets and by `protocol/tests/fuzz_inputs.rs` (which includes
//! `drive.rs` by path), so seeds and regressions run through exactly the fuzzed code.
pub mod drive;
