//! Shared helpers for Tributary's cross-process tests and the benchmark harness.

pub mod bench;
pub mod e2e;
pub mod services;
