//! The measurements behind the durable logs' designs, formerly ignored tests in
//! `collector/tests/` (`log_measure.rs`, `log_kafka_measure.rs`):
//!
//! - segment files with group commit against sled 0.34, both made durable before an
//!   append counts as done (`docs/embedded-log.md` records the figures);
//! - the Kafka producer's `linger_ms` and `batch_size_bytes` (`docs/kafka.md`): a flood of
//!   5 KiB records (throughput and enqueue-to-ack latency under load), then sequential
//!   single appends (the ack latency of a lone batch on a quiet link).
//!
//! Environment for the first: `TRIBUTARY_LOG_MEASURE_RECORDS` (default 20000; 2000 with
//! `--quick`), `..._RECORD_BYTES` (5000), `..._CONCURRENCY` (64),
//! `TRIBUTARY_LOG_MEASURE_DIRECTORY` (default the system temp dir: point it at the disk
//! you want to measure).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use serde_json::{json, Value};
use tributary_collector::log::kafka::KafkaLogConfig;
use tributary_collector::log::{
    AppendRecord, DurableLog, EmbeddedLog, EmbeddedLogConfig, RecordHeaders, SystemClock,
};

use super::super::{percentile, round3, BenchOptions};
use crate::services::unique_suffix;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(format!("TRIBUTARY_LOG_MEASURE_{name}"))
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn scratch_directory() -> anyhow::Result<tempfile::TempDir> {
    Ok(match std::env::var("TRIBUTARY_LOG_MEASURE_DIRECTORY") {
        Ok(parent) => tempfile::tempdir_in(&parent).with_context(|| {
            format!("creating a directory in TRIBUTARY_LOG_MEASURE_DIRECTORY={parent}")
        })?,
        Err(_) => tempfile::tempdir()?,
    })
}

fn directory_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => directory_bytes(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Incompressible-ish bytes, as compressed batches are.
fn payload(record_bytes: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    Bytes::from(
        (0..record_bytes)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect::<Vec<u8>>(),
    )
}

fn design_line(
    backend: &str,
    phase: &str,
    records: u64,
    record_bytes: u64,
    concurrency: u64,
    seconds: f64,
) -> Value {
    json!({
        "bench": "collector",
        "part": "embedded_log_design",
        "backend": backend,
        "phase": phase,
        "records": records,
        "record_bytes": record_bytes,
        "concurrency": concurrency,
        "seconds": round3(seconds),
        "records_per_s": (records as f64 / seconds.max(1e-9)).round(),
        "mb_per_s": round3((records * record_bytes) as f64 / seconds.max(1e-9) / 1e6),
    })
}

fn measure_segments(
    records: u64,
    record_bytes: u64,
    concurrency: u64,
) -> anyhow::Result<Vec<Value>> {
    let directory = scratch_directory()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let log = Arc::new(EmbeddedLog::open(
            EmbeddedLogConfig::new(directory.path()),
            SystemClock,
        )?);
        let per_task = records / concurrency;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..concurrency {
            let log = log.clone();
            tasks.spawn(async move {
                let agent_id = format!("gw-{task}");
                for batch_seq in 0..per_task {
                    let record = AppendRecord {
                        headers: RecordHeaders {
                            agent_id: agent_id.clone(),
                            batch_seq,
                            protocol_version: 1,
                        },
                        value: payload(record_bytes as usize, task * 1_000_000 + batch_seq),
                    };
                    log.append(record).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined??;
        }
        let seconds = started.elapsed().as_secs_f64();
        let written = per_task * concurrency;
        let stats = log.stats();
        let mut append = design_line(
            "segments",
            "append_durable",
            written,
            record_bytes,
            concurrency,
            seconds,
        );
        append["group_commits"] = json!(stats.group_commits);
        append["records_per_commit"] =
            json!(round3(written as f64 / stats.group_commits.max(1) as f64));
        append["disk_bytes"] = json!(directory_bytes(directory.path()));

        let started = Instant::now();
        let mut next = 0;
        let mut read = 0u64;
        loop {
            let batch = log.read(0, next, 1 << 20).await?;
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            read += batch.len() as u64;
        }
        ensure!(
            read == written,
            "replay read {read} records of {written} written"
        );
        let replay = design_line(
            "segments",
            "replay",
            read,
            record_bytes,
            1,
            started.elapsed().as_secs_f64(),
        );
        Ok(vec![append, replay])
    })
}

fn measure_sled(records: u64, record_bytes: u64, concurrency: u64) -> anyhow::Result<Vec<Value>> {
    let directory = scratch_directory()?;
    let database = sled::Config::new()
        .path(directory.path())
        .flush_every_ms(None)
        .open()?;
    let next_offset = Arc::new(AtomicU64::new(0));
    let per_thread = records / concurrency;
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..concurrency)
            .map(|thread| {
                let database = database.clone();
                let next_offset = next_offset.clone();
                scope.spawn(move || -> anyhow::Result<()> {
                    for batch_seq in 0..per_thread {
                        let offset = next_offset.fetch_add(1, Ordering::SeqCst);
                        let value = payload(record_bytes as usize, thread * 1_000_000 + batch_seq);
                        database.insert(offset.to_be_bytes(), value.as_ref())?;
                        // Durable before it counts, as an ack to an agent requires.
                        database.flush()?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a sled writer panicked"))?
        })
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let written = per_thread * concurrency;
    let mut append = design_line(
        "sled",
        "append_durable",
        written,
        record_bytes,
        concurrency,
        seconds,
    );
    append["disk_bytes"] = json!(directory_bytes(directory.path()));

    let started = Instant::now();
    let mut read = 0u64;
    for entry in database.iter() {
        let (_, value) = entry?;
        ensure!(
            value.len() as u64 == record_bytes,
            "sled returned a record of the wrong size"
        );
        read += 1;
    }
    ensure!(
        read == written,
        "sled replay read {read} records of {written} written"
    );
    let replay = design_line(
        "sled",
        "replay",
        read,
        record_bytes,
        1,
        started.elapsed().as_secs_f64(),
    );
    Ok(vec![append, replay])
}

/// Segment files against sled, alone (nothing to group) and with concurrency.
pub fn segment_files_against_sled(options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    let records = setting("RECORDS", if options.quick { 2_000 } else { 20_000 });
    let record_bytes = setting("RECORD_BYTES", 5_000);
    let concurrency = setting("CONCURRENCY", 64).max(1);
    let mut lines = Vec::new();
    // Without concurrency there is nothing to group: one fsync per append.
    lines.extend(measure_segments(records / 20, record_bytes, 1)?);
    lines.extend(measure_sled(records / 20, record_bytes, 1)?);
    lines.extend(measure_segments(records, record_bytes, concurrency)?);
    lines.extend(measure_sled(records, record_bytes, concurrency)?);
    Ok(lines)
}

const KAFKA_RECORD_BYTES: usize = 5 * 1024;
const KAFKA_IN_FLIGHT: usize = 2000;

fn kafka_record(agent_id: &str, batch_seq: u64, value: Bytes) -> AppendRecord {
    AppendRecord {
        headers: RecordHeaders {
            agent_id: agent_id.to_owned(),
            batch_seq,
            protocol_version: 1,
        },
        value,
    }
}

/// For each (`linger_ms`, `batch_size_bytes`) pair, on its own fresh 4-partition topic.
pub fn kafka_producer_settings(
    brokers: &str,
    options: &BenchOptions,
) -> anyhow::Result<Vec<Value>> {
    let (flood_records, lone_appends) = if options.quick {
        (600, 20)
    } else {
        (6000, 100)
    };
    let settings = [
        (0u32, 64 * 1024u32),
        (5, 64 * 1024),
        (5, 1024 * 1024),
        (20, 1024 * 1024),
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let payloads: Vec<Bytes> = (0..64)
        .map(|seed| payload(KAFKA_RECORD_BYTES, seed))
        .collect();
    let mut lines = Vec::new();
    for (linger_ms, batch_size_bytes) in settings {
        let topic = format!("tributary.bench.producer.{}", unique_suffix());
        let outcome = runtime.block_on(async {
            super::create_topic(brokers, &topic, 4).await?;
            let log = super::connect_kafka(KafkaLogConfig {
                linger_ms,
                batch_size_bytes,
                ..KafkaLogConfig::new(brokers, &topic)
            })
            .await?;
            let started = Instant::now();
            let mut latencies = Vec::with_capacity(flood_records);
            let mut in_flight = std::collections::VecDeque::new();
            for index in 0..flood_records {
                let agent_id = format!("measure-agent-{}", index % 50);
                let value = payloads[index % payloads.len()].clone();
                let enqueued = Instant::now();
                let acknowledgement = log
                    .enqueue(kafka_record(&agent_id, index as u64, value))
                    .await?;
                in_flight.push_back((enqueued, tokio::spawn(acknowledgement)));
                while in_flight.len() >= KAFKA_IN_FLIGHT {
                    if let Some((enqueued, handle)) = in_flight.pop_front() {
                        handle.await??;
                        latencies.push(enqueued.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
            for (enqueued, handle) in in_flight {
                handle.await??;
                latencies.push(enqueued.elapsed().as_secs_f64() * 1e3);
            }
            let elapsed = started.elapsed().as_secs_f64();
            latencies.sort_by(f64::total_cmp);

            let mut lone = Vec::with_capacity(lone_appends);
            for index in 0..lone_appends {
                let value = payloads[index % payloads.len()].clone();
                let started = Instant::now();
                log.append(kafka_record("lone-agent", index as u64, value))
                    .await?;
                lone.push(started.elapsed().as_secs_f64() * 1e3);
            }
            lone.sort_by(f64::total_cmp);
            log.flush(Duration::from_secs(30)).await?;
            anyhow::Ok(json!({
                "bench": "collector",
                "log": "kafka",
                "part": "producer_settings",
                "linger_ms": linger_ms,
                "batch_size_bytes": batch_size_bytes,
                "record_bytes": KAFKA_RECORD_BYTES,
                "flood_records": flood_records,
                "records_per_s": (flood_records as f64 / elapsed).round(),
                "mb_per_s": round3((flood_records * KAFKA_RECORD_BYTES) as f64 / elapsed / 1e6),
                "flood_p50_ms": round3(percentile(&latencies, 0.5)),
                "flood_p99_ms": round3(percentile(&latencies, 0.99)),
                "lone_p50_ms": round3(percentile(&lone, 0.5)),
                "lone_p99_ms": round3(percentile(&lone, 0.99)),
            }))
        });
        runtime.block_on(super::delete_topic(brokers, &topic));
        lines.push(outcome?);
    }
    Ok(lines)
}
