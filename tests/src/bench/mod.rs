//! The benchmark harness: one module per bench, each returning JSON lines.
//!
//! Every bench measures its own baselines in the same run, on the same machine and
//! data, so a line is comparable on its own. `bench NAME [--quick]` prints one JSON
//! object per line with a `"bench"` field; `--quick` shrinks the workload so a
//! release build finishes within 60 s (CI smoke), the full run is what
//! `docs/benchmarks.md` quotes.

pub mod buffer;
pub mod codec;

use std::time::Instant;

use serde_json::Value;

/// Options shared by every bench.
#[derive(Debug, Clone, Default)]
pub struct BenchOptions {
    /// Smaller workload, for a smoke run.
    pub quick: bool,
    /// Override of the zstd level, for codec experiments.
    pub zstd_level: Option<i32>,
}

/// The benches `bench` knows, in the order `bench all` runs them.
pub const BENCH_NAMES: &[&str] = &["codec", "buffer"];

/// Runs one bench by name and returns its JSON lines.
pub fn run(name: &str, options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    match name {
        "codec" => codec::run(options),
        "buffer" => buffer::run(options),
        other => anyhow::bail!(
            "unknown bench {other:?}; known benches: {}",
            BENCH_NAMES.join(", ")
        ),
    }
}

/// Runs `work` and returns its result and the elapsed wall time in seconds.
pub fn timed<T>(work: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let result = work();
    (result, start.elapsed().as_secs_f64())
}

/// Rounds for display: figures keep three significant decimals, not seventeen.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
