//! Batches buffered without series definitions: the run loop stores them so (the series
//! registry holds the keys durably) and the shipper attaches what each session needs from
//! the registry, while batches buffered by older builds (with their definitions) still ship.

mod ship_support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ship_support::*;
use tributary_agent::aggregate::SeriesRegistry;
use tributary_agent::buffer::{BatchClass, BatchInfo, DiskBuffer, ReplayOrder};
use tributary_agent::config::AgentConfig;
use tributary_agent::metrics::{Metrics, SourceMetrics};
use tributary_agent::run::{buffer_config, state_path, Pipeline, PipelineInput, RunError};
use tributary_agent::source::ParsedReading;
use tributary_protocol::batch::series_ids_used;
use tributary_protocol::{
    decode_batch, encode_batch, Batch, BatchLimits, Reading, SeriesKey, Summary, WindowSummary,
};

const DEADLINE: Duration = Duration::from_secs(30);
const SERIES: u32 = 8;

/// A batch as the agent now buffers it: no definitions.
fn append_without_definitions(buffer: &DiskBuffer, index: i64, summaries: bool) -> u64 {
    let batch_seq = buffer.allocate_seq().unwrap();
    let created_ms = 1_700_000_100_000 + index * 1_000;
    let mut batch = Batch {
        agent_id: "gw-1".to_owned(),
        batch_seq,
        created_ms,
        series: Vec::new(),
        readings: Default::default(),
        summaries: Vec::new(),
    };
    if summaries {
        batch.summaries = (0..SERIES)
            .map(|series| WindowSummary {
                series,
                window_start_ms: created_ms - 10_000,
                window_ms: 10_000,
                summary: Summary::from_reading(created_ms - 5_000, f64::from(series)),
            })
            .collect();
    } else {
        batch.readings = (0..SERIES * 20)
            .map(|position| Reading {
                series: position % SERIES,
                time_ms: created_ms + i64::from(position),
                value: f64::from(position) * 0.5,
                flags: 0,
            })
            .collect();
    }
    let info = BatchInfo {
        class: if summaries {
            BatchClass::Summary
        } else {
            BatchClass::Raw
        },
        created_ms,
        oldest_event_ms: created_ms - 10_000,
        reading_count: (batch.readings.len() + batch.summaries.len()) as u32,
    };
    buffer
        .append(batch_seq, info, &encode_batch(&batch))
        .unwrap();
    batch_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_without_definitions_ship_with_the_registrys_and_old_batches_with_their_own() {
    let state = temp_dir();
    let collector = start_collector(
        state.path(),
        loopback_any_port(),
        tokens_for(&["gw-1".to_owned()]),
    );
    let registry_dir = temp_dir();
    let registry_db = sled::open(registry_dir.path()).unwrap();
    let mut registry = SeriesRegistry::open(registry_db.open_tree("series").unwrap()).unwrap();
    for id in 0..SERIES {
        assert_eq!(registry.intern(&series_key(id)).unwrap(), id);
    }
    registry.write_pending().unwrap(); // What each commit does first.
    let buffer_dir = temp_dir();
    let buffer = open_buffer(buffer_dir.path());
    // Older builds' batches, self-contained, then batches without definitions.
    fill_buffer(&buffer, "gw-1", 6, SERIES, 100);
    for index in 0..12 {
        append_without_definitions(&buffer, index, index % 4 == 3);
    }
    buffer.flush().unwrap();

    let mut shipper = tributary_agent::ship::Shipper::new(
        ship_config("gw-1", collector.address, &collector.fingerprint),
        buffer.clone(),
    )
    .unwrap();
    shipper.set_registry(registry.reader().expect("a persistent registry"));
    let handle = shipper.handle();
    let task = tokio::spawn(shipper.run());
    wait_for("all batches acked", DEADLINE, || buffered(&buffer) == 0).await;
    handle.stop();
    task.await.unwrap().unwrap();

    let stats = handle.stats();
    assert_eq!(stats.batches_acked.load(Ordering::Relaxed), 18);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.nacks_retryable.load(Ordering::Relaxed),
        0,
        "no batch went out lacking a definition the collector needed"
    );
    let records = all_records(&collector.log);
    assert_eq!(records.len(), 18);
    for record in &records {
        let batch = decode_batch(&record.value, &BatchLimits::default()).unwrap();
        let used = series_ids_used(&batch);
        assert_eq!(used.len(), SERIES as usize);
        for id in used {
            let definition = batch
                .series
                .iter()
                .find(|definition| definition.id == id)
                .expect("the collector's record defines every series it uses");
            assert_eq!(definition.key, series_key(id));
        }
    }
    collector.server.shutdown().await;
}

fn pipeline_config(directory: &Path) -> AgentConfig {
    let text = format!(
        r#"
agent_id = "gw-registry"
[collector]
address = "127.0.0.1:9"
token = "t"
cert_fingerprint_sha256 = "5E:9B:0C:21:7A:44:13:C8:F0:2D:6B:93:AA:10:7E:55:C4:21:08:3F:9D:6A:E2:71:B0:4C:58:13:2E:9F:07:D6"
[buffer]
path = "{}"
[[sources]]
name = "broker"
[sources.mqtt_subscribe]
broker_address = "127.0.0.1:1883"
client_id = "x"
[[sources.mqtt_subscribe.topics]]
template = "d/{{device}}/{{metric}}"
[sources.aggregation]
window_ms = 1000
raw = {{ policy = "all" }}
"#,
        directory.join("buffer").display()
    );
    AgentConfig::from_toml_str_validated(&text, "test").expect("valid config")
}

fn open_pipeline(config: &AgentConfig) -> Result<Pipeline, RunError> {
    let metrics = Arc::new(Metrics::new(vec![Arc::new(SourceMetrics::new(
        "broker",
        "mqtt_subscribe",
    ))]));
    let buffer = DiskBuffer::open(buffer_config(&config.buffer))?;
    Pipeline::open(config, buffer, metrics).map(|(pipeline, _)| pipeline)
}

fn copy_directory(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_directory(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// What a power cut right after a commit leaves on disk: every batch the buffer holds is
/// stored without definitions, and every series it uses resolves in the registry to the
/// key that was ingested. With the registry gone, the agent refuses to start rather than
/// hand the buffered batches' ids to new series.
#[tokio::test]
async fn after_a_commit_every_buffered_series_is_in_the_durable_registry() {
    let directory = temp_dir();
    let config = pipeline_config(directory.path());
    let mut pipeline = open_pipeline(&config).unwrap();
    let t0_ms = 1_764_284_000_000i64;
    let key = |index: u32| SeriesKey::new(format!("dev-{index}"), "temp");
    for second in 0..3i64 {
        let now_ms = t0_ms + second * 1_000;
        for index in 0..(10 + second as u32 * 5) {
            pipeline.ingest(
                PipelineInput {
                    source: 0,
                    readings: vec![ParsedReading {
                        key: key(index),
                        time_ms: Some(now_ms),
                        value: f64::from(index),
                    }]
                    .into(),
                    receive_ms: now_ms,
                    durable: None,
                },
                now_ms,
            );
        }
        pipeline.tick(now_ms + 1_500).await;
    }
    // The snapshot of both databases, taken while they are open, is the crash.
    let crashed = temp_dir();
    let buffer_path = &config.buffer.path;
    copy_directory(buffer_path, &crashed.path().join("buffer"));
    copy_directory(
        &state_path(buffer_path),
        &state_path(&crashed.path().join("buffer")),
    );
    drop(pipeline);

    let crashed_config = pipeline_config(crashed.path());
    let state = sled::open(state_path(&crashed_config.buffer.path)).unwrap();
    let registry = SeriesRegistry::open(state.open_tree("series").unwrap()).unwrap();
    assert_eq!(registry.len(), 20);
    let buffer = DiskBuffer::open(buffer_config(&crashed_config.buffer)).unwrap();
    let mut batches = 0;
    let mut readings = 0;
    for stored in buffer.replay(ReplayOrder::OldestFirst) {
        let stored = stored.unwrap();
        let batch = decode_batch(&stored.payload, &BatchLimits::default()).unwrap();
        assert!(batch.series.is_empty(), "stored without definitions");
        for reading in &batch.readings {
            let expected = key(reading.value as u32);
            assert_eq!(registry.key(reading.series), Some(expected));
        }
        for summary in &batch.summaries {
            assert!(registry.key(summary.series).is_some());
        }
        readings += batch.readings.len();
        batches += 1;
    }
    assert!(batches >= 3, "{batches} batches");
    assert_eq!(readings, 10 + 15 + 20, "every raw reading is buffered");
    drop(buffer);
    drop(registry);
    drop(state);

    // The state directory lost: refused, with what to do.
    std::fs::remove_dir_all(state_path(&crashed_config.buffer.path)).unwrap();
    match open_pipeline(&crashed_config) {
        Err(error @ RunError::RegistryLost { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains("move the buffer directory aside"),
                "{message}"
            );
        }
        Err(other) => panic!("expected RegistryLost, got {other}"),
        Ok(_) => panic!("opened with an empty registry over a non-empty buffer"),
    }
}
