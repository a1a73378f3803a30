//! The benchmark harness: one module per bench, each returning JSON lines.
//!
//! Every bench measures its own baselines in the same run, on the same machine and
//! data, so a line is comparable on its own. `bench NAME [--quick]` prints one JSON
//! object per line with a `"bench"` field; `--quick` shrinks the workload so a
//! release build finishes within 60 s (CI smoke), the full run is what
//! `docs/benchmarks.md` quotes.

pub mod agent;
pub mod buffer;
pub mod codec;
pub mod collector;
pub mod dashboard;
pub mod e2e;
pub mod processor;

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
pub const BENCH_NAMES: &[&str] = &[
    "codec",
    "buffer",
    "processor",
    "collector",
    "agent",
    "e2e",
    "dashboard",
];

/// Runs one bench by name and returns its JSON lines.
pub fn run(name: &str, options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    match name {
        "codec" => codec::run(options),
        "buffer" => buffer::run(options),
        "processor" => processor::run(options),
        "collector" => collector::run(options),
        "agent" => agent::run(options),
        "e2e" => e2e::run(options),
        "dashboard" => dashboard::run(options),
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

/// The value at `fraction` (0.5 = median) of an ascending slice; 0 when empty.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    let last = sorted.len().saturating_sub(1);
    sorted
        .get((last as f64 * fraction).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`), as MiB; `None` off Linux.
fn proc_status_mib(pid: Option<u32>, field: &str) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: f64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// This process's resident memory now, in MiB.
pub fn rss_mib() -> Option<f64> {
    proc_status_mib(None, "VmRSS")
}

/// This process's peak resident memory so far, in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    proc_status_mib(None, "VmHWM")
}

/// Resets the peak RSS counter (`VmHWM`) so a later [`peak_rss_mib`] measures one phase.
/// Linux >= 4.0; returns false where it cannot.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields after it are space-separated.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let user_ticks: f64 = fields.get(11)?.parse().ok()?;
    let system_ticks: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks_per_second > 0).then(|| (user_ticks + system_ticks) / ticks_per_second as f64)
}

/// CPU seconds this process has used.
pub fn own_cpu_seconds() -> Option<f64> {
    process_cpu_seconds(std::process::id())
}
