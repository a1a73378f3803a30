//! The consumer loop on one machine: the embedded log into the embedded store.
//!
//! In process: results equal the brute-force reference (the engine run over the same log
//! records), and a second run resumes from the store's checkpoint without counting anything
//! twice. Through the real binary: `process` with a config holding only `state_dir` and the
//! metrics address, stopped by SIGTERM once caught up, then `replay --from 0 --into r1`,
//! whose store holds the same rollups.

mod pipeline_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pipeline_support::*;
use tokio_util::sync::CancellationToken;
use tributary_collector::live::LiveFeed;
use tributary_collector::log::{
    Clock, DurableLog, EmbeddedLog, EmbeddedLogConfig, ManualClock, SystemClock,
};
use tributary_collector::pipeline::{run_consumer, ConsumerConfig, PipelineMetrics, RunUntil};
use tributary_collector::store::{EmbeddedStore, EmbeddedStoreConfig, Queries};

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000;

fn consumer_config() -> ConsumerConfig {
    ConsumerConfig {
        engine: engine_config(),
        until: RunUntil::CaughtUp,
        ..ConsumerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_equal_the_engine_s_and_a_restart_resumes_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0 + 7_200_000));
    let log_config = EmbeddedLogConfig {
        partitions: 2,
        ..EmbeddedLogConfig::new(dir.path().join("log"))
    };
    let log = Arc::new(EmbeddedLog::open(log_config, clock.clone()).unwrap());
    let data = dataset(5, 90, T0);
    let half = data.batches.len() / 2;
    let store_config =
        EmbeddedStoreConfig::new(dir.path().join("store"), engine_config().resolutions_ms);
    let metrics = Arc::new(PipelineMetrics::default());
    let live = LiveFeed::new(100_000);
    let mut listener = live.subscribe();

    let mut ticks = Vec::new();
    for part in [&data.batches[..half], &data.batches[half..]] {
        for batch in part {
            clock.advance_ms(50);
            log.append(record(batch)).await.unwrap();
        }
        let store = EmbeddedStore::open(store_config.clone()).unwrap();
        let report = run_consumer(
            log.clone(),
            store,
            clock.clone(),
            consumer_config(),
            live.clone(),
            metrics.clone(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        ticks.push((report.next_offsets.values().sum::<u64>(), clock.now_ms()));
    }
    assert_eq!(
        metrics.records_processed.load(Ordering::Relaxed),
        data.batches.len() as u64,
        "the second run resumed where the first one's checkpoint ended: no record was read twice"
    );
    assert_eq!(
        metrics.duplicate_batches.load(Ordering::Relaxed),
        data.duplicates as u64
    );

    // The reference: the same records, with the ticks each run ended with.
    let records = read_all(log.as_ref()).await;
    let mut by_partition: Vec<Vec<&tributary_collector::log::LogRecord>> = vec![Vec::new(); 2];
    for record in &records {
        by_partition[record.partition as usize].push(record);
    }
    let mut steps = Vec::new();
    for (run, (_, wall_ms)) in ticks.iter().enumerate() {
        // What each run read: the records appended before it (the clock only moves on appends).
        let earlier_ms = if run == 0 { i64::MIN } else { ticks[run - 1].1 };
        let phase: Vec<&tributary_collector::log::LogRecord> = by_partition
            .iter()
            .flatten()
            .copied()
            .filter(|record| record.timestamp_ms > earlier_ms && record.timestamp_ms <= *wall_ms)
            .collect();
        steps.extend(phase.iter().map(|record| Step::Record(record)));
        steps.extend(final_ticks(&phase, 2, *wall_ms, &engine_config()));
    }
    let expected = reference(&steps, 2, &engine_config());
    assert!(
        expected.len() > 50,
        "the stream makes windows: {}",
        expected.len()
    );
    assert!(expected.values().any(|window| window.is_final));

    let store = EmbeddedStore::open(store_config.clone()).unwrap();
    let queries = Queries::Embedded(store.reader());
    let stored = stored_rollups(&queries, &data, &engine_config()).await;
    assert_same_windows(&stored, &expected, true);
    assert_eq!(raw_rows_once(&queries, &data).await, data.unique_readings);

    let mut live_windows = 0;
    while let Ok(batch) = listener.try_recv() {
        live_windows += batch.windows.len();
    }
    assert!(
        live_windows > 0,
        "window results were pushed to the live feed"
    );
}

#[test]
fn the_binary_processes_a_state_dir_only_config_and_replays_into_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let now_ms = SystemClock.now_ms();
    let start_ms = (now_ms - 7_200_000) / 600_000 * 600_000;
    let data = dataset(3, 60, start_ms);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let records = runtime.block_on(async {
        let log =
            EmbeddedLog::open(EmbeddedLogConfig::new(state_dir.join("log")), SystemClock).unwrap();
        for batch in &data.batches {
            log.append(record(batch)).await.unwrap();
        }
        read_all(&log).await
    });
    let end_offset = records.len() as u64;
    let port = free_port();
    let config_path = dir.path().join("collector.toml");
    std::fs::write(
        &config_path,
        format!(
            "state_dir = {:?}\nmetrics_address = \"127.0.0.1:{port}\"\n[process]\nresolutions_ms = [60000, 600000]\n",
            state_dir.display().to_string()
        ),
    )
    .unwrap();

    let child = std::process::Command::new(collector_binary())
        .args(["process", "--config"])
        .arg(&config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(Some(child));
    wait_until(
        "the processor checkpointed the whole log",
        Duration::from_secs(60),
        || {
            scrape(port).and_then(|text| {
                metric(
                    &text,
                    "tributary_processor_checkpointed_offset{partition=\"0\"}",
                )
            }) == Some(end_offset)
        },
    );
    terminate(guard.child());
    let output = guard.wait(Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "process exited with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("embedded log in") && stdout.contains("embedded store in"),
        "{stdout}"
    );

    let replay = std::process::Command::new(collector_binary())
        .args(["replay", "--from", "0", "--into", "r1", "--config"])
        .arg(&config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output = ChildGuard(Some(replay)).wait(Duration::from_secs(60));
    assert!(
        output.status.success(),
        "replay exited with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("replay caught up"));

    // The child ticked its caught-up engine with the wall clock: every changed window was
    // emitted. One tick past the last record does the same here.
    let mut steps: Vec<Step<'_>> = records.iter().map(Step::Record).collect();
    let all: Vec<_> = records.iter().collect();
    steps.extend(final_ticks(&all, 1, 0, &engine_config()));
    let expected = reference(&steps, 1, &engine_config());
    runtime.block_on(async {
        let mut results = Vec::new();
        for path in [state_dir.join("store"), state_dir.join("store-r1")] {
            let store = EmbeddedStore::open(EmbeddedStoreConfig::new(
                path,
                engine_config().resolutions_ms,
            ))
            .unwrap();
            let queries = Queries::Embedded(store.reader());
            let stored = stored_rollups(&queries, &data, &engine_config()).await;
            // Ticks at the wall clock only emit what changed; contents equal the reference's.
            assert_same_windows(&stored, &expected, false);
            assert_eq!(raw_rows_once(&queries, &data).await, data.unique_readings);
            results.push(stored);
        }
        assert_same_windows(&results[1], &results[0], true);
    });
}
