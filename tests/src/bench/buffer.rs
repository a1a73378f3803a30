//! `bench buffer`: group-commit latency of the agent's disk buffer.
//!
//! The MQTT acknowledgement chain acks the broker only after a buffer flush, so the
//! time one flush takes (p50/p99) bounds how fast messages are acknowledged; group
//! commit is what keeps it to one fsync per group of batches. The baseline is the
//! same flush with one batch per group (one fsync per batch), measured in the same
//! run. `BUFFER_BENCH_DIR` picks the filesystem (default: the system temp dir).

use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use tributary_agent::buffer::{BatchClass, BatchInfo, BufferConfig, DiskBuffer};

use super::{round3, BenchOptions};

const BATCH_BYTES: usize = 2048;

/// One JSON line per group size.
pub fn run(options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    let parent = std::env::var_os("BUFFER_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&parent)
        .with_context(|| format!("creating a buffer directory under {}", parent.display()))?;
    let buffer = DiskBuffer::open(BufferConfig::at(dir.path()))
        .with_context(|| format!("opening a disk buffer in {}", dir.path().display()))?;
    let payload = vec![7u8; BATCH_BYTES];
    let info = BatchInfo {
        class: BatchClass::Raw,
        created_ms: 1,
        oldest_event_ms: 0,
        reading_count: 3,
    };
    let groups = if options.quick { 40 } else { 200 };

    let mut lines = Vec::new();
    let mut baseline_batches_per_s = None;
    for batches_per_group in [1usize, 10, 50] {
        let mut flush_ms = Vec::with_capacity(groups);
        let started = Instant::now();
        for _ in 0..groups {
            for _ in 0..batches_per_group {
                let batch_seq = buffer.allocate_seq()?;
                buffer.append(batch_seq, info, &payload)?;
            }
            let flush_started = Instant::now();
            buffer.flush()?;
            flush_ms.push(flush_started.elapsed().as_secs_f64() * 1e3);
        }
        let seconds = started.elapsed().as_secs_f64();
        flush_ms.sort_by(f64::total_cmp);
        let percentile = |fraction: f64| {
            let last = flush_ms.len().saturating_sub(1);
            flush_ms
                .get((last as f64 * fraction) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let batches_per_s = (groups * batches_per_group) as f64 / seconds;
        let baseline = *baseline_batches_per_s.get_or_insert(batches_per_s);
        lines.push(json!({
            "bench": "buffer",
            "batches_per_group": batches_per_group,
            "batch_bytes": BATCH_BYTES,
            "groups": groups,
            "seconds": round3(seconds),
            "p50_ms": round3(percentile(0.5)),
            "p99_ms": round3(percentile(0.99)),
            "batches_per_s": batches_per_s.round(),
            "baseline_one_batch_per_flush_batches_per_s": baseline.round(),
        }));
    }
    Ok(lines)
}
