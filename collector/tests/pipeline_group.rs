//! Kafka consumer-group membership (`[process] partitions = "group"`) against the real
//! services from `deploy/dev/services.sh up`: two `tributary-collector process` children
//! share a 4-partition topic fed by many agents; one is killed with SIGKILL mid-run; the
//! survivor takes over its partitions from their checkpoints in the store, and the final
//! rollups equal the brute-force reference exactly, every raw row stored once.

mod log_kafka_support;
mod pipeline_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pipeline_support::*;
use tributary_collector::log::kafka::KafkaLogConfig;
use tributary_collector::log::{Clock, DurableLog, SystemClock};
use tributary_collector::process::EngineConfig;
use tributary_collector::store::schema::{RollupSpec, SchemaConfig};
use tributary_collector::store::{ClickHouseStore, ClickHouseStoreConfig, Queries, RetryPolicy};
use tributary_tests::services::{
    drop_clickhouse_database, service_env, unique_suffix, CLICKHOUSE_URL,
};

const PARTITIONS: u32 = 4;

/// Wall-clock ticks must not change what a window holds (the reference has no wall clock).
fn test_engine_config() -> EngineConfig {
    EngineConfig {
        sequence_gap_timeout_ms: 3_600_000,
        idle_timeout_ms: 7_200_000,
        ..engine_config()
    }
}

async fn queries(url: &str, database: &str) -> Queries {
    let config = ClickHouseStoreConfig {
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
            give_up_after_ms: 30_000,
        },
        ..ClickHouseStoreConfig::default()
    };
    let store = ClickHouseStore::connect(config, SystemClock.now_ms())
        .await
        .unwrap_or_else(|error| panic!("ClickHouse at {url}: {error}"));
    Queries::ClickHouse(store.reader())
}

/// `checkpointed_offset` per partition this processor owns now (the gauges of revoked
/// partitions are removed).
fn owned_checkpoints(port: u16) -> Option<BTreeMap<u32, u64>> {
    let text = scrape(port)?;
    let prefix = "tributary_processor_checkpointed_offset{partition=\"";
    Some(
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(prefix)?;
                let (partition, value) = rest.split_once("\"}")?;
                Some((
                    partition.parse().ok()?,
                    value.trim().parse::<f64>().ok()? as u64,
                ))
            })
            .collect(),
    )
}

fn spawn_process(config_path: &Path, stderr_path: &Path) -> ChildGuard {
    let stderr = std::fs::File::create(stderr_path).unwrap();
    ChildGuard(Some(
        Command::new(collector_binary())
            .args(["process", "--config"])
            .arg(config_path)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    ))
}

#[test]
fn group_members_share_partitions_and_a_survivor_takes_over_a_killed_member_exactly() {
    let started = Instant::now();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some((brokers, topic)) =
        runtime.block_on(log_kafka_support::fresh_topic("group", PARTITIONS as i32))
    else {
        return;
    };
    let Some(url) = service_env(CLICKHOUSE_URL) else {
        return;
    };
    let database = format!("tributary_test_group_{}", unique_suffix());
    let start_ms = (SystemClock.now_ms() - 7_200_000) / 600_000 * 600_000;
    let data = dataset(12, 30, start_ms);
    let log = runtime.block_on(log_kafka_support::connect(KafkaLogConfig::new(
        &brokers, &topic,
    )));
    let mut end_offsets: BTreeMap<u32, u64> = (0..PARTITIONS).map(|p| (p, 0)).collect();
    let mut append = |batches: &[tributary_protocol::Batch]| {
        runtime.block_on(async {
            for batch in batches {
                let receipt = log.append(record(batch)).await.unwrap();
                let end = end_offsets.entry(receipt.partition).or_insert(0);
                *end = (*end).max(receipt.offset + 1);
            }
        });
        end_offsets.clone()
    };

    let dir = tempfile::tempdir().unwrap();
    let member = |name: &str| {
        let port = free_port();
        let state = dir.path().join(name);
        std::fs::create_dir_all(&state).unwrap();
        let config_path = state.join("collector.toml");
        std::fs::write(
            &config_path,
            format!(
                r#"state_dir = {state:?}
metrics_address = "127.0.0.1:{port}"
[log]
kind = "kafka"
brokers = "{brokers}"
topic = "{topic}"
group_session_timeout_ms = 6000
[process]
resolutions_ms = [60000, 600000]
sequence_gap_timeout_ms = 3600000
idle_timeout_ms = 7200000
group = "group-test"
partitions = "group"
[store]
kind = "clickhouse"
url = "{url}"
database = "{database}"
[store.batch]
max_batch_rows = 300
"#,
                state = state.display().to_string()
            ),
        )
        .unwrap();
        (port, config_path, state.join("stderr.log"))
    };
    let (port_a, config_a, stderr_a) = member("a");
    let (port_b, config_b, stderr_b) = member("b");
    let stderr_of = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();

    // A first (it creates the schema), then B; the group splits the 4 partitions.
    let mut a = spawn_process(&config_a, &stderr_a);
    wait_until("A owns every partition", Duration::from_secs(60), || {
        owned_checkpoints(port_a).is_some_and(|owned| owned.len() == PARTITIONS as usize)
    });
    let mut b = spawn_process(&config_b, &stderr_b);
    wait_until(
        "A and B share the partitions after a rebalance",
        Duration::from_secs(60),
        || {
            let (Some(owned_a), Some(owned_b)) =
                (owned_checkpoints(port_a), owned_checkpoints(port_b))
            else {
                return false;
            };
            !owned_a.is_empty()
                && !owned_b.is_empty()
                && owned_a.len() + owned_b.len() == PARTITIONS as usize
                && owned_a
                    .keys()
                    .all(|partition| !owned_b.contains_key(partition))
        },
    );

    // Half the stream, processed by both members.
    let half = data.batches.len() / 2;
    let ends = append(&data.batches[..half]);
    wait_until(
        "both members checkpointed the first half",
        Duration::from_secs(60),
        || {
            let (Some(owned_a), Some(owned_b)) =
                (owned_checkpoints(port_a), owned_checkpoints(port_b))
            else {
                return false;
            };
            let mut union = owned_a;
            union.extend(owned_b);
            union == ends
        },
    );
    let owned_by_b = owned_checkpoints(port_b).unwrap_or_default();
    assert!(!owned_by_b.is_empty(), "B owns partitions before the kill");

    // A quarter more, and B is killed while it processes it.
    let three_quarters = data.batches.len() * 3 / 4;
    append(&data.batches[half..three_quarters]);
    b.child().kill().unwrap();
    let _ = b.wait(Duration::from_secs(10));
    let ends = append(&data.batches[three_quarters..]);

    wait_until(
        "A took over B's partitions and checkpointed everything",
        Duration::from_secs(60),
        || owned_checkpoints(port_a).is_some_and(|owned| owned == ends),
    );
    let log_a = stderr_of(&stderr_a);
    for line in log_a.lines().filter(|line| line.contains("consumer group")) {
        eprintln!("A: {line}");
    }
    assert!(
        log_a.contains("took partitions from the consumer group"),
        "A logs its assignments:\n{log_a}"
    );
    terminate(a.child());
    let output = a.wait(Duration::from_secs(60));
    assert!(
        output.status.success(),
        "A exited with {}: {}",
        output.status,
        stderr_of(&stderr_a)
    );

    let records = runtime.block_on(read_all(&log));
    assert_eq!(records.len(), data.batches.len());
    let mut steps: Vec<Step<'_>> = records.iter().map(Step::Record).collect();
    let all: Vec<_> = records.iter().collect();
    steps.extend(final_ticks(&all, PARTITIONS, 0, &test_engine_config()));
    let expected = reference(&steps, PARTITIONS, &test_engine_config());
    runtime.block_on(async {
        let stored_queries = queries(&url, &database).await;
        let stored = stored_rollups(&stored_queries, &data, &test_engine_config()).await;
        assert_same_windows(&stored, &expected, true);
        assert_eq!(
            raw_rows_once(&stored_queries, &data).await,
            data.unique_readings
        );
        drop_clickhouse_database(&url, &database).await;
    });
    eprintln!("group takeover test took {:?}", started.elapsed());
}
