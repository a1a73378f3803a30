//! Shared by the `ship_*` tests: a real collector ingest on loopback with a real
//! embedded log, agents with real sled buffers, and waiting for conditions with a
//! deadline (never sleeping to synchronise).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tributary_agent::buffer::{BatchClass, BatchInfo, BufferConfig, DiskBuffer};
use tributary_agent::ship::{ShipConfig, Shipper, ShipperHandle};
use tributary_collector::ingest::{
    DedupStore, FleetView, IngestConfig, IngestMetrics, IngestParts, IngestServer, TlsIdentity,
    TokenStore,
};
use tributary_collector::log::{EmbeddedLog, EmbeddedLogConfig, LogRecord, SystemClock};
use tributary_protocol::batch::series_ids_used;
use tributary_protocol::{
    decode_batch, encode_batch, Batch, BatchLimits, Reading, SeriesDef, SeriesKey,
};

pub const TOKEN: &str = "token-of-the-test-fleet";

/// A collector's ingest with its state in a directory that outlives restarts.
pub struct Collector {
    pub server: IngestServer<EmbeddedLog>,
    pub log: Arc<EmbeddedLog>,
    pub fingerprint: String,
    pub address: SocketAddr,
    pub metrics: Arc<IngestMetrics>,
    pub fleet: FleetView,
}

pub fn tokens_for(agents: &[String]) -> TokenStore {
    TokenStore::from_tokens(agents.iter().map(|agent| (agent.as_str(), TOKEN)))
}

pub fn ingest_config(listen_address: SocketAddr) -> IngestConfig {
    IngestConfig {
        listen_address,
        drain_timeout_ms: 2_000,
        ..IngestConfig::default()
    }
}

/// Starts ingest with state under `state_dir` (TLS identity, log, dedup).
pub fn start_collector(
    state_dir: &Path,
    listen_address: SocketAddr,
    tokens: TokenStore,
) -> Collector {
    start_collector_with(state_dir, ingest_config(listen_address), tokens)
}

pub fn start_collector_with(
    state_dir: &Path,
    config: IngestConfig,
    tokens: TokenStore,
) -> Collector {
    try_start_collector(state_dir, config, tokens).unwrap()
}

/// Like [`start_collector_with`], returning the bind error instead of panicking.
pub fn try_start_collector(
    state_dir: &Path,
    config: IngestConfig,
    tokens: TokenStore,
) -> Result<Collector, String> {
    let (identity, _) =
        TlsIdentity::load_or_generate(&state_dir.join("tls"), &["localhost".to_owned()])
            .map_err(|error| error.to_string())?;
    let fingerprint = identity.fingerprint_hex();
    let log = Arc::new(
        EmbeddedLog::open(EmbeddedLogConfig::new(state_dir.join("log")), SystemClock)
            .map_err(|error| error.to_string())?,
    );
    let dedup = DedupStore::open(&state_dir.join("dedup"), config.dedup_window)
        .map_err(|error| error.to_string())?;
    let metrics = Arc::new(IngestMetrics::default());
    let fleet = FleetView::new();
    let server = IngestServer::start(IngestParts {
        config,
        identity,
        tokens,
        log: log.clone(),
        dedup,
        metrics: metrics.clone(),
        fleet: fleet.clone(),
    })
    .map_err(|error| error.to_string())?;
    let address = server.local_address();
    Ok(Collector {
        server,
        log,
        fingerprint,
        address,
        metrics,
        fleet,
    })
}

pub fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub fn ship_config(agent_id: &str, collector: SocketAddr, fingerprint: &str) -> ShipConfig {
    ShipConfig {
        collector_address: collector.to_string(),
        agent_id: agent_id.to_owned(),
        token: TOKEN.to_owned(),
        server_fingerprint_sha256: Some(fingerprint.to_owned()),
        bind_address: loopback_any_port(),
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        retry_min_ms: 20,
        retry_max_ms: 500,
        connect_timeout_ms: 3_000,
        ack_timeout_ms: 10_000,
        poll_interval_ms: 20,
        ..ShipConfig::default()
    }
}

pub fn open_buffer(directory: &Path) -> DiskBuffer {
    DiskBuffer::open(BufferConfig::at(directory)).unwrap()
}

pub fn series_key(series: u32) -> SeriesKey {
    SeriesKey::new(
        format!("device-{}", series / 4),
        format!("metric-{}", series % 4),
    )
    .with_tags([("site", "test")])
}

/// Appends `count` self-contained raw batches of `readings_per_batch` readings over
/// `series` series to the buffer and flushes. Returns their sequence numbers.
pub fn fill_buffer(
    buffer: &DiskBuffer,
    agent_id: &str,
    count: usize,
    series: u32,
    readings_per_batch: usize,
) -> Vec<u64> {
    let mut seqs = Vec::new();
    for index in 0..count {
        let batch_seq = buffer.allocate_seq().unwrap();
        let created_ms = 1_700_000_000_000 + index as i64 * 1_000;
        let readings: Vec<Reading> = (0..readings_per_batch)
            .map(|position| Reading {
                series: position as u32 % series,
                time_ms: created_ms + position as i64,
                value: (index * 1000 + position) as f64 * 0.25,
                flags: 0,
            })
            .collect();
        let batch = Batch {
            agent_id: agent_id.to_owned(),
            batch_seq,
            created_ms,
            series: (0..series)
                .map(|id| SeriesDef {
                    id,
                    key: series_key(id),
                })
                .collect(),
            readings,
            summaries: Vec::new(),
        };
        let bytes = encode_batch(&batch);
        let info = BatchInfo {
            class: BatchClass::Raw,
            created_ms,
            oldest_event_ms: created_ms,
            reading_count: readings_per_batch as u32,
        };
        buffer.append(batch_seq, info, &bytes).unwrap();
        seqs.push(batch_seq);
    }
    buffer.flush().unwrap();
    seqs
}

/// Starts a shipper task; returns its handle and join handle.
pub fn spawn_shipper(
    config: ShipConfig,
    buffer: DiskBuffer,
) -> (
    ShipperHandle,
    tokio::task::JoinHandle<Result<(), tributary_agent::ship::ShipError>>,
) {
    let shipper = Shipper::new(config, buffer).unwrap();
    let handle = shipper.handle();
    (handle, tokio::spawn(shipper.run()))
}

/// Ships everything in `buffer` to the collector `config` names: starts a shipper, waits until
/// every batch is acked and removed, stops it cleanly; returns its handle for the stats.
pub async fn ship_all(config: ShipConfig, buffer: &DiskBuffer) -> ShipperHandle {
    let (handle, task) = spawn_shipper(config, buffer.clone());
    wait_for("all batches acked", Duration::from_secs(30), || {
        buffered(buffer) == 0
    })
    .await;
    handle.stop();
    task.await.unwrap().unwrap();
    handle
}

/// A logged batch is self-contained: it decodes, holds `readings` readings, and defines every
/// series it uses with its key (although the shipper strips definitions the collector has).
pub fn assert_self_contained(record: &LogRecord, readings: usize) -> Batch {
    let batch = decode_batch(&record.value, &BatchLimits::default()).unwrap();
    assert_eq!(batch.batch_seq, record.headers.batch_seq);
    assert_eq!(batch.readings.len(), readings);
    for id in series_ids_used(&batch) {
        let def = batch
            .series
            .iter()
            .find(|def| def.id == id)
            .unwrap_or_else(|| {
                panic!(
                    "batch {}: series {id} used but not defined",
                    batch.batch_seq
                )
            });
        assert_eq!(def.key, series_key(id));
    }
    batch
}

/// Waits until `condition` holds, polling, or panics after `deadline` naming `what`.
pub async fn wait_for(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let started = tokio::time::Instant::now();
    while !condition() {
        if started.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn buffered(buffer: &DiskBuffer) -> u64 {
    buffer.stats(0).batches_buffered
}

/// Every record in the log (all partitions).
pub fn all_records(log: &EmbeddedLog) -> Vec<LogRecord> {
    let mut records = Vec::new();
    for partition in 0..tributary_collector::log::DurableLog::partition_count(log) {
        let mut offset = log.retained_offsets(partition).unwrap().earliest;
        loop {
            let batch = log.read_records(partition, offset, 1 << 20).unwrap();
            let Some(last) = batch.last() else { break };
            offset = last.offset + 1;
            records.extend(batch);
        }
    }
    records
}

/// Records per (agent, batch sequence).
pub fn records_by_key(records: &[LogRecord]) -> BTreeMap<(String, u64), usize> {
    let mut counts = BTreeMap::new();
    for record in records {
        *counts
            .entry((record.headers.agent_id.clone(), record.headers.batch_seq))
            .or_insert(0) += 1;
    }
    counts
}

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path_in(directory: &tempfile::TempDir, name: &str) -> PathBuf {
    directory.path().join(name)
}
