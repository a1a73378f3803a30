//! The documented example config parses, and mistakes produce messages that name the field.

use std::path::Path;

use tributary_collector::config::{CollectorConfig, LogConfig, StoreConfig};
use tributary_collector::pipeline::PartitionAssignment;

#[test]
fn the_example_config_parses_and_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("collector.example.toml");
    let config = CollectorConfig::load(&path).unwrap();
    assert_eq!(config.ingest.listen_address.port(), 4433);
    assert_eq!(config.ingest.max_in_flight_batches_per_agent, 16);
    assert_eq!(
        config
            .embedded_log_config()
            .map(|log| log.directory.clone()),
        Some(Path::new("/var/lib/tributary-collector/log").to_path_buf())
    );
    assert_eq!(
        config.process.engine.resolutions_ms,
        vec![60_000, 3_600_000]
    );
    assert_eq!(config.process.group, "tributary-processor");
    assert_eq!(config.process.partitions, PartitionAssignment::All);
    match &config.store {
        StoreConfig::Embedded(store) => {
            assert_eq!(store.path, Path::new("/var/lib/tributary-collector/store"))
        }
        other => panic!("the example uses the embedded store, got {other:?}"),
    }
    assert_eq!(config.api.listen_address.port(), 8080);
}

#[test]
fn a_config_with_only_state_dir_runs_everything_embedded() {
    let config = CollectorConfig::parse("state_dir = \"/tmp/x\"\n", Path::new("c.toml")).unwrap();
    assert_eq!(
        config
            .embedded_log_config()
            .map(|log| log.directory.clone()),
        Some(Path::new("/tmp/x/log").to_path_buf())
    );
    assert!(
        matches!(&config.store, StoreConfig::Embedded(store) if store.path == Path::new("/tmp/x/store"))
    );
    let config = CollectorConfig::parse(
        "state_dir = \"/tmp/x\"\n[log]\npartitions = 4\n[store]\nkind = \"embedded\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    assert!(
        matches!(&config.log, LogConfig::Embedded(log) if log.partitions == 4 && log.directory == Path::new("/tmp/x/log"))
    );
}

#[test]
fn kafka_clickhouse_and_process_sections_resolve() {
    let config = CollectorConfig::parse(
        r#"
state_dir = "/tmp/x"
[log]
kind = "kafka"
brokers = "10.0.0.1:9092"
topic = "batches"
[process]
resolutions_ms = [10000, 60000]
allowed_lateness_ms = 5000
group = "proc-a"
partitions = "1/2"
[store]
kind = "clickhouse"
url = "http://10.0.0.2:8123"
database = "telemetry"
rollup_retention_days = [7, 30]
[store.batch]
max_batch_rows = 1000
[api]
listen_address = "0.0.0.0:8080"
token = "a-long-random-token"
"#,
        Path::new("c.toml"),
    )
    .unwrap();
    assert!(matches!(&config.log, LogConfig::Kafka(kafka) if kafka.topic == "batches"));
    assert_eq!(config.process.engine.allowed_lateness_ms, 5_000);
    assert_eq!(config.process.group, "proc-a");
    assert_eq!(
        config.process.partitions,
        PartitionAssignment::Share { index: 1, count: 2 }
    );
    let StoreConfig::ClickHouse(clickhouse) = &config.store else {
        panic!("expected ClickHouse: {:?}", config.store);
    };
    let store = clickhouse.store_config(&config.process.engine.resolutions_ms);
    assert_eq!(store.schema.database, "telemetry");
    assert_eq!(store.batch.max_batch_rows, 1_000);
    let retention: Vec<(i64, u32)> = store
        .schema
        .rollups
        .iter()
        .map(|rollup| (rollup.resolution_ms, rollup.retention_days))
        .collect();
    assert_eq!(retention, vec![(10_000, 7), (60_000, 30)]);
    match config.store.with_suffix("rebuild") {
        StoreConfig::ClickHouse(settings) => assert_eq!(settings.database, "telemetry_rebuild"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_fields_and_bad_values_are_named() {
    let problem = |text: &str| {
        CollectorConfig::parse(
            &format!("state_dir = \"/tmp/x\"\n{text}"),
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string()
    };
    let error = problem("[ingest]\nmax_inflight = 3\n");
    assert!(error.contains("max_inflight"), "{error}");
    let error = problem("[ingest]\nkeep_alive_interval_ms = 70000\nidle_timeout_ms = 60000\n");
    assert!(error.contains("ingest.idle_timeout_ms"), "{error}");
    let error = problem("[ingest]\nmax_protocol_version = 99\n");
    assert!(
        error.contains("ingest.max_protocol_version is 99"),
        "{error}"
    );
    let error = problem("[log]\nkind = \"kafka\"\ndirectory = \"/tmp/y\"\n");
    assert!(
        error.contains("log:") && error.contains("directory"),
        "{error}"
    );
    let error = problem("[log]\nkind = \"s3\"\n");
    assert!(error.contains("log.kind"), "{error}");
    let error = problem("[process]\nresolutions_ms = []\n");
    assert!(error.contains("process.resolutions_ms"), "{error}");
    let error = problem("[process]\nallowed_latenes_ms = 3\n");
    assert!(
        error.contains("process:") && error.contains("allowed_latenes_ms"),
        "{error}"
    );
    let error = problem("[process]\npartitions = \"x\"\n");
    assert!(error.contains("process:"), "{error}");
    let error = problem("[store]\nkind = \"clickhouse\"\ndatabase = \"bad-name\"\n");
    assert!(error.contains("store:"), "{error}");
    let error = problem("[store]\nkind = \"clickhouse\"\nrollup_retention_days = [1]\n");
    assert!(error.contains("store.rollup_retention_days"), "{error}");
    let error = problem("[store]\nraw_retention_ms = 0\n");
    assert!(error.contains("store.raw_retention_ms"), "{error}");
    let error = problem("[api]\nlisten_address = \"0.0.0.0:8080\"\n");
    assert!(error.contains("api.token"), "{error}");
}
