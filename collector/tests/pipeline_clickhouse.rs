//! The consumer loop against the real services from `deploy/dev/services.sh up`: Kafka as
//! the log and ClickHouse 18.16 as the store.
//!
//! - `tributary-collector process` as a child process, killed with SIGKILL mid-run and
//!   started again: the final rollups equal the brute-force reference (the engine run
//!   in-process over the same records), every raw row is stored once; then
//!   `replay --from 0 --into SUFFIX` rebuilds the same rollups into a new database.
//! - ClickHouse stopped mid-run (`services.sh stop clickhouse`): the loop stops
//!   checkpointing (consumption pauses, the log holds the data), resumes by itself once
//!   the server is back, and loses nothing. A guard starts ClickHouse again even when the
//!   test fails.

mod log_kafka_support;
mod pipeline_support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline_support::*;
use tokio_util::sync::CancellationToken;
use tributary_collector::live::LiveFeed;
use tributary_collector::log::kafka::KafkaLogConfig;
use tributary_collector::log::{Clock, DurableLog, EmbeddedLog, EmbeddedLogConfig, SystemClock};
use tributary_collector::pipeline::{run_consumer, ConsumerConfig, PipelineMetrics};
use tributary_collector::process::EngineConfig;
use tributary_collector::store::schema::{RollupSpec, SchemaConfig};
use tributary_collector::store::{ClickHouseStore, ClickHouseStoreConfig, Queries, RetryPolicy};
use tributary_tests::services::{
    drop_clickhouse_database, service_env, unique_suffix, CLICKHOUSE_URL, SERVICES_SCRIPT,
};

/// Wall-clock ticks must not change what a window holds: no gap or idle timeouts while the
/// tests run (the reference has no wall clock).
fn test_engine_config() -> EngineConfig {
    EngineConfig {
        sequence_gap_timeout_ms: 3_600_000,
        idle_timeout_ms: 7_200_000,
        ..engine_config()
    }
}

fn store_config(url: &str, database: &str) -> ClickHouseStoreConfig {
    ClickHouseStoreConfig {
        url: url.to_string(),
        schema: SchemaConfig {
            database: database.to_string(),
            rollups: test_engine_config()
                .resolutions_ms
                .iter()
                .map(|resolution_ms| RollupSpec {
                    resolution_ms: *resolution_ms,
                    retention_days: 30,
                })
                .collect(),
            ..SchemaConfig::default()
        },
        retry: RetryPolicy {
            initial_delay_ms: 50,
            max_delay_ms: 500,
            give_up_after_ms: 1_500,
        },
        request_timeout_ms: 5_000,
        ..ClickHouseStoreConfig::default()
    }
}

/// A store on `database`; retried for a while, since another test may be restarting the server.
async fn connect_store(url: &str, database: &str) -> ClickHouseStore {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match ClickHouseStore::connect(store_config(url, database), SystemClock.now_ms()).await {
            Ok(store) => return store,
            Err(error) if Instant::now() < deadline => {
                eprintln!("ClickHouse not reachable yet: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("ClickHouse at {url}: {error}"),
        }
    }
}

async fn queries(url: &str, database: &str) -> Queries {
    Queries::ClickHouse(connect_store(url, database).await.reader())
}

/// Sum over partitions of a per-partition gauge in a scrape.
fn partition_sum(text: &str, name: &str, partitions: u32) -> Option<u64> {
    (0..partitions)
        .map(|partition| metric(text, &format!("{name}{{partition=\"{partition}\"}}")))
        .sum()
}

/// One test at a time in this binary: one of them stops the shared ClickHouse, which would cut
/// the other tests' requests short.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[test]
fn a_processor_killed_mid_run_resumes_to_the_reference_and_a_replay_rebuilds_it() {
    let _turn = TURN.blocking_lock();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some((brokers, topic)) = runtime.block_on(log_kafka_support::fresh_topic("pipeline", 2))
    else {
        return;
    };
    let Some(url) = service_env(CLICKHOUSE_URL) else {
        return;
    };
    let database = format!("tributary_test_pipeline_{}", unique_suffix());
    let start_ms = (SystemClock.now_ms() - 7_200_000) / 600_000 * 600_000;
    let data = dataset(6, 120, start_ms);
    let records = runtime.block_on(async {
        let log = log_kafka_support::connect(KafkaLogConfig::new(&brokers, &topic)).await;
        for batch in &data.batches {
            log.append(record(batch)).await.unwrap();
        }
        read_all(&log).await
    });
    assert_eq!(records.len(), data.batches.len());
    let end_offsets: BTreeMap<u32, u64> =
        records.iter().fold(BTreeMap::new(), |mut ends, record| {
            let end = ends.entry(record.partition).or_insert(0);
            *end = (*end).max(record.offset + 1);
            ends
        });
    let total_end: u64 = end_offsets.values().sum();

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config_path = dir.path().join("collector.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"state_dir = {state:?}
metrics_address = "127.0.0.1:{port}"
[log]
kind = "kafka"
brokers = "{brokers}"
topic = "{topic}"
[process]
resolutions_ms = [60000, 600000]
sequence_gap_timeout_ms = 3600000
idle_timeout_ms = 7200000
group = "pipeline-test"
[store]
kind = "clickhouse"
url = "{url}"
database = "{database}"
[store.batch]
max_batch_rows = 300
"#,
            state = dir.path().display().to_string()
        ),
    )
    .unwrap();
    let spawn = |arguments: &[&str]| {
        ChildGuard(Some(
            Command::new(collector_binary())
                .args(arguments)
                .arg("--config")
                .arg(&config_path)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    };
    let checkpointed = || {
        scrape(port).and_then(|text| {
            partition_sum(
                &text,
                "tributary_processor_checkpointed_offset",
                end_offsets.len() as u32,
            )
        })
    };

    let mut first = spawn(&["process"]);
    wait_until(
        "a quarter of the records checkpointed",
        Duration::from_secs(120),
        || checkpointed().is_some_and(|offsets| offsets >= total_end / 4),
    );
    let at_kill = checkpointed().unwrap_or(0);
    first.child().kill().unwrap();
    let _ = first.wait(Duration::from_secs(10));
    if at_kill >= total_end {
        eprintln!("note: the processor had finished before the kill ({at_kill} of {total_end})");
    }

    let mut second = spawn(&["process"]);
    wait_until(
        "every record checkpointed after the restart",
        Duration::from_secs(180),
        || checkpointed() == Some(total_end),
    );
    terminate(second.child());
    let output = second.wait(Duration::from_secs(60));
    assert!(
        output.status.success(),
        "process exited with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let suffix = "r1";
    let replay = spawn(&["replay", "--from", "0", "--into", suffix]);
    let output = replay.wait(Duration::from_secs(180));
    assert!(
        output.status.success(),
        "replay exited with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let mut steps: Vec<Step<'_>> = records.iter().map(Step::Record).collect();
    let all: Vec<_> = records.iter().collect();
    steps.extend(final_ticks(&all, 2, 0, &test_engine_config()));
    let expected = reference(&steps, 2, &test_engine_config());
    runtime.block_on(async {
        let live = queries(&url, &database).await;
        let stored = stored_rollups(&live, &data, &test_engine_config()).await;
        assert_same_windows(&stored, &expected, true);
        assert_eq!(raw_rows_once(&live, &data).await, data.unique_readings);

        let replayed_database = format!("{database}_{suffix}");
        let rebuilt = queries(&url, &replayed_database).await;
        let replayed = stored_rollups(&rebuilt, &data, &test_engine_config()).await;
        assert_same_windows(&replayed, &stored, true);
        assert_eq!(raw_rows_once(&rebuilt, &data).await, data.unique_readings);
        drop_clickhouse_database(&url, &database).await;
        drop_clickhouse_database(&url, &replayed_database).await;
    });
}

/// Starts ClickHouse again when dropped, so a failing test never leaves it down.
struct ClickHouseGuard {
    script: String,
    stopped: bool,
}

impl ClickHouseGuard {
    fn run(&self, action: &str) {
        let status = Command::new(&self.script)
            .args([action, "clickhouse"])
            .status()
            .unwrap_or_else(|error| {
                panic!("cannot run {} {action} clickhouse: {error}", self.script)
            });
        assert!(
            status.success(),
            "{} {action} clickhouse failed: {status}",
            self.script
        );
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.run("stop");
    }

    fn start(&mut self) {
        self.run("start");
        self.stopped = false;
    }
}

impl Drop for ClickHouseGuard {
    fn drop(&mut self) {
        if self.stopped {
            let _ = Command::new(&self.script)
                .args(["start", "clickhouse"])
                .status();
        }
    }
}

async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_mid_run_pauses_consumption_which_resumes_by_itself_losing_nothing() {
    let _turn = TURN.lock().await;
    let Some(url) = service_env(CLICKHOUSE_URL) else {
        return;
    };
    let Some(script) = service_env(SERVICES_SCRIPT) else {
        return;
    };
    let database = format!("tributary_test_pipeline_outage_{}", unique_suffix());
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        EmbeddedLog::open(EmbeddedLogConfig::new(dir.path().join("log")), SystemClock).unwrap(),
    );
    let start_ms = (SystemClock.now_ms() - 7_200_000) / 600_000 * 600_000;
    let data = dataset(4, 80, start_ms);
    let half = data.batches.len() / 2;
    let store = connect_store(&url, &database).await;
    let metrics = Arc::new(PipelineMetrics::default());
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(run_consumer(
        log.clone(),
        store,
        SystemClock,
        ConsumerConfig {
            engine: test_engine_config(),
            retry_max_delay_ms: 1_000,
            ..ConsumerConfig::default()
        },
        LiveFeed::default(),
        metrics.clone(),
        stop.clone(),
    ));
    let checkpointed = |metrics: &PipelineMetrics| {
        metrics
            .progress()
            .get(&0)
            .map_or(0, |progress| progress.checkpointed_offset)
    };

    for batch in &data.batches[..half] {
        log.append(record(batch)).await.unwrap();
    }
    wait_for(
        "the first half checkpointed",
        Duration::from_secs(60),
        || checkpointed(&metrics) == half as u64,
    )
    .await;

    let mut clickhouse = ClickHouseGuard {
        script,
        stopped: false,
    };
    clickhouse.stop();
    let errors_before = metrics.store_errors.load(Ordering::Relaxed);
    for batch in &data.batches[half..] {
        log.append(record(batch)).await.unwrap();
    }
    wait_for(
        "failed flushes while ClickHouse is down",
        Duration::from_secs(60),
        || metrics.store_errors.load(Ordering::Relaxed) >= errors_before + 2,
    )
    .await;
    assert_eq!(
        checkpointed(&metrics),
        half as u64,
        "nothing is checkpointed while the store cannot take the results"
    );
    assert!(
        !consumer.is_finished(),
        "the loop keeps retrying instead of failing"
    );
    clickhouse.start();
    wait_for(
        "the whole log checkpointed after ClickHouse came back",
        Duration::from_secs(180),
        || checkpointed(&metrics) == data.batches.len() as u64,
    )
    .await;
    stop.cancel();
    consumer.await.unwrap().unwrap();

    let records = read_all(log.as_ref()).await;
    let mut steps: Vec<Step<'_>> = records.iter().map(Step::Record).collect();
    let all: Vec<_> = records.iter().collect();
    steps.extend(final_ticks(&all, 1, 0, &test_engine_config()));
    let expected = reference(&steps, 1, &test_engine_config());
    let stored_queries = queries(&url, &database).await;
    let stored = stored_rollups(&stored_queries, &data, &test_engine_config()).await;
    assert_same_windows(&stored, &expected, true);
    assert_eq!(
        raw_rows_once(&stored_queries, &data).await,
        data.unique_readings
    );
    drop_clickhouse_database(&url, &database).await;
}
