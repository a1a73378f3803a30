//! The acknowledgement journal, driven in-process: acknowledgements fire only after a
//! commit, a "crash" (dropping the pipeline without closing windows) replays the open
//! windows' readings on reopen, and the journal empties once the windows are in durable
//! summary batches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tributary_agent::buffer::{BatchClass, DiskBuffer, ReplayOrder};
use tributary_agent::config::AgentConfig;
use tributary_agent::metrics::{Metrics, SourceMetrics};
use tributary_agent::run::{buffer_config, Pipeline, PipelineInput};
use tributary_agent::source::ParsedReading;
use tributary_protocol::batch::{decode_batch, BatchLimits};
use tributary_protocol::model::SeriesKey;

const T0_MS: i64 = 1_764_284_000_000;

fn config(directory: &std::path::Path) -> AgentConfig {
    let text = format!(
        r#"
agent_id = "gw-journal"
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
raw = {{ policy = "none" }}
"#,
        directory.join("buffer").display()
    );
    AgentConfig::from_toml_str_validated(&text, "test").expect("valid config")
}

/// Opens buffer and pipeline, retrying while sled still holds the previous lock.
fn open(config: &AgentConfig) -> (Pipeline, u64, DiskBuffer, Arc<Metrics>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = Arc::new(Metrics::new(vec![Arc::new(SourceMetrics::new(
            "broker",
            "mqtt_subscribe",
        ))]));
        let attempt = DiskBuffer::open(buffer_config(&config.buffer))
            .map_err(|error| error.to_string())
            .and_then(|buffer| {
                Pipeline::open(config, buffer.clone(), Arc::clone(&metrics))
                    .map(|(pipeline, replayed)| (pipeline, replayed, buffer))
                    .map_err(|error| error.to_string())
            });
        match attempt {
            Ok((pipeline, replayed, buffer)) => return (pipeline, replayed, buffer, metrics),
            Err(error) => {
                assert!(Instant::now() < deadline, "cannot reopen: {error}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn message(time_ms: i64, value: f64) -> (PipelineInput, oneshot::Receiver<()>) {
    let (sender, receiver) = oneshot::channel();
    let reading = ParsedReading {
        key: SeriesKey::new("dev-1", "temp"),
        time_ms: Some(time_ms),
        value,
    };
    (
        PipelineInput {
            source: 0,
            readings: vec![reading].into(),
            receive_ms: T0_MS + 10_000,
            durable: Some(sender),
        },
        receiver,
    )
}

#[tokio::test]
async fn journal_replays_open_windows_after_a_crash_and_empties_once_durable() {
    let directory = tempfile::tempdir().expect("tempdir");
    let config = config(directory.path());
    {
        let (mut pipeline, replayed, _buffer, metrics) = open(&config);
        assert_eq!(replayed, 0);
        let mut receivers = Vec::new();
        for index in 0..10 {
            let (input, receiver) = message(T0_MS + index * 10, index as f64);
            pipeline.ingest(input, T0_MS);
            receivers.push(receiver);
        }
        for receiver in &mut receivers {
            assert!(
                receiver.try_recv().is_err(),
                "acknowledged before the commit"
            );
        }
        pipeline.commit(T0_MS).await;
        for receiver in receivers {
            receiver.await.expect("acknowledged after the commit");
        }
        assert_eq!(
            metrics.pipeline.journal_entries.load(Ordering::Relaxed),
            10,
            "the window is still open"
        );
        // Crash: the pipeline goes away without closing its window.
    }
    let (mut pipeline, replayed, buffer, metrics) = open(&config);
    assert_eq!(
        replayed, 10,
        "the open window's readings come back from the journal"
    );
    // A reading far later closes the replayed window (watermark) and opens another.
    let (input, receiver) = message(T0_MS + 5_000, 100.0);
    pipeline.ingest(input, T0_MS);
    let (sender, inputs) = mpsc::channel(1);
    drop(sender);
    // Runs to the end at once (no senders): closes every window, commits, truncates.
    pipeline.run(inputs).await;
    receiver.await.expect("acknowledged");
    assert_eq!(metrics.pipeline.journal_entries.load(Ordering::Relaxed), 0);

    let mut counts = Vec::new();
    for stored in buffer.replay(ReplayOrder::OldestFirst) {
        let stored = stored.expect("intact");
        assert_eq!(
            stored.header.class,
            BatchClass::Summary,
            "raw policy none buffers no raw batches"
        );
        let batch = decode_batch(&stored.payload, &BatchLimits::default()).expect("decodes");
        counts.extend(batch.summaries.iter().map(|summary| {
            (
                summary.window_start_ms,
                summary.summary.count,
                summary.summary.sum,
            )
        }));
    }
    counts.sort_by_key(|(start, _, _)| *start);
    assert_eq!(counts, vec![(T0_MS, 10, 45.0), (T0_MS + 5_000, 1, 100.0)]);
    drop(buffer);
    drop(metrics);
    let (_pipeline, replayed, _buffer, _metrics) = open(&config);
    assert_eq!(
        replayed, 0,
        "nothing left to replay once the summaries are durable"
    );
}

#[tokio::test]
async fn journal_all_readings_covers_readings_nobody_acknowledges() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut config = config(directory.path());
    config.sources[0].journal_all_readings = true;
    {
        let (mut pipeline, _, _buffer, metrics) = open(&config);
        for index in 0..10 {
            let (mut input, _receiver) = message(T0_MS + index * 10, index as f64);
            // Serial lines and QoS 0 messages: nobody waits for durability.
            input.durable = None;
            pipeline.ingest(input, T0_MS);
        }
        pipeline.commit(T0_MS).await;
        assert_eq!(metrics.pipeline.journal_entries.load(Ordering::Relaxed), 10);
        // Crash with the window open.
    }
    let (_pipeline, replayed, _buffer, _metrics) = open(&config);
    assert_eq!(replayed, 10, "unacknowledged readings come back too");

    // Without the option they are not journaled: a crash loses the open window.
    let directory = tempfile::tempdir().expect("tempdir");
    let config = self::config(directory.path());
    {
        let (mut pipeline, _, _buffer, _metrics) = open(&config);
        let (mut input, _receiver) = message(T0_MS, 1.0);
        input.durable = None;
        pipeline.ingest(input, T0_MS);
        pipeline.commit(T0_MS).await;
    }
    let (_pipeline, replayed, _buffer, _metrics) = open(&config);
    assert_eq!(replayed, 0);
}
