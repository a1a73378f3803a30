//! The measurement behind the embedded log's design: segment files with group commit
//! against sled 0.34, both made durable before each append counts as done.
//!
//! Ignored by default (it writes hundreds of MB and takes a while); run it with
//!
//! ```text
//! cargo test -p tributary-collector --test log_measure -- --ignored --nocapture --test-threads=1
//! ```
//!
//! Environment: `TRIBUTARY_LOG_MEASURE_RECORDS` (default 20000), `..._RECORD_BYTES`
//! (default 5000), `..._CONCURRENCY` (default 64), `TRIBUTARY_LOG_MEASURE_DIRECTORY`
//! (default a temporary directory; point it at the disk you want to measure). Prints
//! one JSON line per measurement; the figures are recorded in `docs/embedded-log.md`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tributary_collector::log::{
    AppendRecord, DurableLog, EmbeddedLog, EmbeddedLogConfig, RecordHeaders, SystemClock,
};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(format!("TRIBUTARY_LOG_MEASURE_{name}"))
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn scratch_directory() -> tempfile::TempDir {
    match std::env::var("TRIBUTARY_LOG_MEASURE_DIRECTORY") {
        Ok(parent) => {
            tempfile::tempdir_in(parent).expect("tempdir in TRIBUTARY_LOG_MEASURE_DIRECTORY")
        }
        Err(_) => tempfile::tempdir().expect("tempdir"),
    }
}

fn directory_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).expect("list").flatten() {
        let metadata = entry.metadata().expect("stat");
        total += if metadata.is_dir() {
            directory_bytes(&entry.path())
        } else {
            metadata.len()
        };
    }
    total
}

fn payload(record_bytes: usize, seed: u64) -> Bytes {
    // Incompressible-ish bytes, as compressed batches are.
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

fn report(
    backend: &str,
    phase: &str,
    records: u64,
    record_bytes: u64,
    concurrency: u64,
    seconds: f64,
    extra: &str,
) {
    println!(
        "{{\"bench\":\"embedded-log\",\"backend\":\"{backend}\",\"phase\":\"{phase}\",\"records\":{records},\"record_bytes\":{record_bytes},\"concurrency\":{concurrency},\"seconds\":{seconds:.3},\"records_per_s\":{:.0},\"mb_per_s\":{:.1}{extra}}}",
        records as f64 / seconds,
        (records * record_bytes) as f64 / seconds / 1e6,
    );
}

fn measure_segments(records: u64, record_bytes: u64, concurrency: u64) {
    let directory = scratch_directory();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let log = Arc::new(
            EmbeddedLog::open(EmbeddedLogConfig::new(directory.path()), SystemClock).expect("open"),
        );
        let per_task = records / concurrency;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for task in 0..concurrency {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
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
                    log.append(record).await.expect("append");
                }
            }));
        }
        for task in tasks {
            task.await.expect("appender");
        }
        let seconds = started.elapsed().as_secs_f64();
        let written = per_task * concurrency;
        let stats = log.stats();
        let disk_bytes = directory_bytes(directory.path());
        let extra = format!(
            ",\"group_commits\":{},\"records_per_commit\":{:.1},\"disk_bytes\":{disk_bytes}",
            stats.group_commits,
            written as f64 / stats.group_commits.max(1) as f64
        );
        report(
            "segments",
            "append_durable",
            written,
            record_bytes,
            concurrency,
            seconds,
            &extra,
        );

        let started = Instant::now();
        let mut next = 0;
        let mut read = 0u64;
        loop {
            let batch = log.read(0, next, 1 << 20).await.expect("read");
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            read += batch.len() as u64;
        }
        assert_eq!(read, written);
        report(
            "segments",
            "replay",
            read,
            record_bytes,
            1,
            started.elapsed().as_secs_f64(),
            "",
        );
    });
}

fn measure_sled(records: u64, record_bytes: u64, concurrency: u64) {
    let directory = scratch_directory();
    let database = sled::Config::new()
        .path(directory.path())
        .flush_every_ms(None)
        .open()
        .expect("open sled");
    let next_offset = Arc::new(AtomicU64::new(0));
    let per_thread = records / concurrency;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..concurrency {
            let database = database.clone();
            let next_offset = next_offset.clone();
            scope.spawn(move || {
                for batch_seq in 0..per_thread {
                    let offset = next_offset.fetch_add(1, Ordering::SeqCst);
                    let value = payload(record_bytes as usize, thread * 1_000_000 + batch_seq);
                    database
                        .insert(offset.to_be_bytes(), value.as_ref())
                        .expect("insert");
                    // Durable before it counts, as an ack to an agent requires.
                    database.flush().expect("flush");
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let written = per_thread * concurrency;
    let disk_bytes = directory_bytes(directory.path());
    report(
        "sled",
        "append_durable",
        written,
        record_bytes,
        concurrency,
        seconds,
        &format!(",\"disk_bytes\":{disk_bytes}"),
    );

    let started = Instant::now();
    let mut read = 0u64;
    for entry in database.iter() {
        let (_, value) = entry.expect("iterate");
        assert_eq!(value.len() as u64, record_bytes);
        read += 1;
    }
    assert_eq!(read, written);
    report(
        "sled",
        "replay",
        read,
        record_bytes,
        1,
        started.elapsed().as_secs_f64(),
        "",
    );
}

#[test]
#[ignore = "measurement: writes hundreds of MB; run with --ignored --nocapture"]
fn measure_segment_files_against_sled() {
    let records = setting("RECORDS", 20_000);
    let record_bytes = setting("RECORD_BYTES", 5_000);
    let concurrency = setting("CONCURRENCY", 64).max(1);
    // Without concurrency there is nothing to group: one fsync per append.
    measure_segments(records / 20, record_bytes, 1);
    measure_sled(records / 20, record_bytes, 1);
    measure_segments(records, record_bytes, concurrency);
    measure_sled(records, record_bytes, concurrency);
}
