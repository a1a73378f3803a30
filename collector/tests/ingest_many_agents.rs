//! Many agents at once over real QUIC into (a) the embedded log and (b) real Kafka:
//! 200 concurrent sessions, each with its own UDP socket, sending a few batches in
//! parallel streams; some resend after the ack on the same connection, some reconnect
//! and resend, some resend while the original is still being written. Every
//! (agent, sequence) must be in the log exactly once, every batch acked, no error
//! counted, and the fleet view must list every agent with what it reported.
//!
//! Also, over a log that does not finish its writes: the backpressure time metric, and
//! graceful shutdown (in-flight batches drained and acked; past the drain timeout,
//! nothing acked that was not written).

mod log_kafka_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use quinn::Connection;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tributary_collector::ingest::{
    DedupStore, FleetView, IngestConfig, IngestMetrics, IngestParts, IngestServer, TlsIdentity,
    TokenStore,
};
use tributary_collector::log::kafka::KafkaLogConfig;
use tributary_collector::log::{
    AppendReceipt, AppendRecord, DurableLog, EmbeddedLog, EmbeddedLogConfig, LogError, LogRecord,
    OffsetRange, SystemClock,
};
use tributary_protocol::frame::{FrameDecoder, FrameLimits};
use tributary_protocol::session::{Backlog, Hello, Message, NackReason, PROTOCOL_VERSION};
use tributary_protocol::{
    decode_batch, encode_batch, Batch, BatchLimits, Reading, SeriesDef, SeriesKey,
};

const AGENTS: usize = 200;
const BATCHES_PER_AGENT: u64 = 4;
const SERIES_PER_BATCH: u32 = 3;
const READINGS_PER_SERIES: i64 = 50;
/// Every wait in these tests ends by this deadline; far above what they need.
const DEADLINE: Duration = Duration::from_secs(60);

/// Each agent has its own UDP socket (as separate gateways would), and the server and
/// Kafka clients need some more: raise the soft limit if it is low.
fn ensure_file_descriptors(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(got, 0, "getrlimit(RLIMIT_NOFILE) failed");
    if limit.rlim_cur >= needed {
        return;
    }
    assert!(
        limit.rlim_max >= needed,
        "this test needs {needed} file descriptors and the hard limit is {}; raise it (ulimit -Hn)",
        limit.rlim_max
    );
    limit.rlim_cur = needed;
    // SAFETY: as above.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(set, 0, "setrlimit(RLIMIT_NOFILE, {needed}) failed");
}

fn agent_id(index: usize) -> String {
    format!("gw-{index:04}")
}

fn token(index: usize) -> String {
    format!("token-{index:04}-{}", index * 7919)
}

struct Harness<L: DurableLog> {
    server: IngestServer<L>,
    log: Arc<L>,
    metrics: Arc<IngestMetrics>,
    identity: TlsIdentity,
    _state: tempfile::TempDir,
}

fn start<L: DurableLog>(log: Arc<L>, config: IngestConfig, agents: usize) -> Harness<L> {
    let state = tempfile::tempdir().expect("temporary directory");
    let identity = TlsIdentity::self_signed(&["localhost".to_owned()]).expect("certificate");
    let ids: Vec<(String, String)> = (0..agents).map(|i| (agent_id(i), token(i))).collect();
    let metrics = Arc::new(IngestMetrics::default());
    let server = IngestServer::start(IngestParts {
        config: IngestConfig {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..config
        },
        identity: identity.clone(),
        tokens: TokenStore::from_tokens(
            ids.iter().map(|(id, token)| (id.as_str(), token.as_str())),
        ),
        log: log.clone(),
        dedup: DedupStore::open(&state.path().join("dedup"), 4096).expect("dedup store"),
        metrics: metrics.clone(),
        fleet: FleetView::new(),
    })
    .expect("ingest server starts");
    Harness {
        server,
        log,
        metrics,
        identity,
        _state: state,
    }
}

fn client_config(identity: &TlsIdentity) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(identity.cert_chain[0].clone())
        .expect("trust the test certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tributary_protocol::session::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// Sends `bytes` on a new stream and reads the one answer frame.
async fn exchange(connection: &Connection, bytes: &[u8]) -> Result<Message, String> {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|error| error.to_string())?;
    send.write_all(bytes)
        .await
        .map_err(|error| error.to_string())?;
    let _ = send.finish();
    let mut decoder = FrameDecoder::new(FrameLimits::DEFAULT);
    loop {
        if let Some(frame) = decoder
            .next_owned_frame()
            .map_err(|error| error.to_string())?
        {
            return Message::decode(frame.as_ref()).map_err(|error| error.to_string());
        }
        match recv
            .read_chunk(4096, true)
            .await
            .map_err(|error| error.to_string())?
        {
            Some(chunk) => decoder.feed(&chunk.bytes),
            None => return Err("stream ended without an answer".to_owned()),
        }
    }
}

/// A connected, welcomed agent session on its own endpoint (own UDP socket).
async fn session(
    server: SocketAddr,
    client: &quinn::ClientConfig,
    index: usize,
) -> Result<(quinn::Endpoint, Connection), String> {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(|error| format!("client endpoint: {error}"))?;
    endpoint.set_default_client_config(client.clone());
    let connection = endpoint
        .connect(server, "localhost")
        .map_err(|error| error.to_string())?
        .await
        .map_err(|error| format!("handshake: {error}"))?;
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: agent_id(index),
        token: token(index),
        agent_version: "many-agents-test".to_owned(),
        backlog: Backlog {
            batches: index as u64,
            bytes: index as u64 * 1000,
            oldest_unsent_time_ms: None,
        },
    })
    .encode_to_vec(&FrameLimits::DEFAULT)
    .map_err(|error| error.to_string())?;
    match exchange(&connection, &hello).await? {
        Message::Welcome(_) => Ok((endpoint, connection)),
        other => Err(format!("expected a welcome, got {other:?}")),
    }
}

fn batch_frame(index: usize, batch_seq: u64) -> Vec<u8> {
    let start_ms = 1_700_000_000_000 + batch_seq as i64 * 60_000;
    let series: Vec<SeriesDef> = (0..SERIES_PER_BATCH)
        .map(|id| SeriesDef {
            id,
            key: SeriesKey::new(format!("dev-{index}-{id}"), "temperature_c"),
        })
        .collect();
    let readings = series
        .iter()
        .flat_map(|definition| {
            (0..READINGS_PER_SERIES).map(move |second| Reading {
                series: definition.id,
                time_ms: start_ms + second * 1000,
                value: index as f64 + second as f64 * 0.5,
                flags: 0,
            })
        })
        .collect();
    let batch = Batch {
        agent_id: agent_id(index),
        batch_seq,
        created_ms: start_ms + 60_000,
        series,
        readings,
        summaries: Vec::new(),
    };
    Message::Batch(encode_batch(&batch))
        .encode_to_vec(&FrameLimits::DEFAULT)
        .expect("batch frame encodes")
}

/// Sends one batch until it is acked: a retryable nack (the same sequence being
/// written from another stream) is retried, anything else is an error.
async fn send_until_acked(
    connection: &Connection,
    index: usize,
    batch_seq: u64,
    retries: &std::sync::atomic::AtomicU64,
) -> Result<(), String> {
    let frame = batch_frame(index, batch_seq);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match exchange(connection, &frame).await? {
            Message::Ack(ack) if ack.batch_seq == batch_seq => return Ok(()),
            Message::Nack(nack) if nack.retryable && Instant::now() < deadline => {
                retries.fetch_add(1, Ordering::Relaxed);
                // The agent's retry backoff; the original write finishes meanwhile.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return Err(format!("batch {batch_seq}: {other:?}")),
        }
    }
}

/// How an agent resends, by its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    None,
    /// Batch 1 again on the same connection after its ack.
    AfterAck,
    /// A new connection (which supersedes the first), then batch 2 again.
    Reconnect,
    /// Batch 3 twice at once: one stream writes, the other waits or is a duplicate.
    Concurrent,
}

fn resend_of(index: usize) -> Resend {
    match index % 4 {
        0 => Resend::None,
        1 => Resend::AfterAck,
        2 => Resend::Reconnect,
        _ => Resend::Concurrent,
    }
}

async fn run_agent(
    server: SocketAddr,
    client: quinn::ClientConfig,
    index: usize,
    retries: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), String> {
    let (endpoint, connection) = session(server, &client, index).await?;
    let mut sends = tokio::task::JoinSet::new();
    for batch_seq in 0..BATCHES_PER_AGENT {
        let connection = connection.clone();
        let retries = retries.clone();
        sends.spawn(async move { send_until_acked(&connection, index, batch_seq, &retries).await });
    }
    if resend_of(index) == Resend::Concurrent {
        let connection = connection.clone();
        let retries = retries.clone();
        sends.spawn(async move { send_until_acked(&connection, index, 3, &retries).await });
    }
    while let Some(sent) = sends.join_next().await {
        sent.map_err(|error| format!("send task: {error}"))??;
    }
    match resend_of(index) {
        Resend::AfterAck => send_until_acked(&connection, index, 1, &retries).await?,
        Resend::Reconnect => {
            let (second_endpoint, second) = session(server, &client, index).await?;
            send_until_acked(&second, index, 2, &retries).await?;
            second.close(0u32.into(), b"done");
            second_endpoint.wait_idle().await;
        }
        Resend::None | Resend::Concurrent => {}
    }
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(())
}

/// Every record of every partition, read through the log's own reader up to the offset
/// the next record will get (all of them are durable: they were acked).
async fn read_all<L: DurableLog>(log: &L) -> Vec<LogRecord> {
    let mut records = Vec::new();
    for partition in 0..log.partition_count() {
        let OffsetRange { earliest, next } = log
            .offset_range(partition)
            .await
            .unwrap_or_else(|error| panic!("offset range of partition {partition}: {error}"));
        let deadline = Instant::now() + DEADLINE;
        let mut position = earliest;
        while position < next {
            assert!(
                Instant::now() < deadline,
                "partition {partition}: read up to {position} of {next} before the deadline"
            );
            let read = log
                .read(partition, position, 1 << 20)
                .await
                .unwrap_or_else(|error| {
                    panic!("read partition {partition} at {position}: {error}")
                });
            if let Some(last) = read.last() {
                position = last.offset + 1;
            }
            records.extend(read);
        }
    }
    records
}

/// Runs the fleet into `log` and checks everything the issue asks of many agents.
async fn many_agents_into<L: DurableLog>(log: Arc<L>) {
    ensure_file_descriptors(AGENTS as u64 * 2 + 512);
    let harness = start(log, IngestConfig::default(), AGENTS);
    let address = harness.server.local_address();
    let client = client_config(&harness.identity);
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for index in 0..AGENTS {
        let client = client.clone();
        let retries = retries.clone();
        agents.spawn(async move { (index, run_agent(address, client, index, retries).await) });
    }
    let mut failures = Vec::new();
    while let Some(joined) = tokio::time::timeout(DEADLINE, agents.join_next())
        .await
        .expect("every agent finishes before the deadline")
    {
        let (index, result) = joined.expect("agent task");
        if let Err(error) = result {
            failures.push(format!("{}: {error}", agent_id(index)));
        }
    }
    assert!(failures.is_empty(), "agents failed: {failures:#?}");
    eprintln!(
        "{AGENTS} agents, {} batches acked in {:?} ({} retried after a retryable nack)",
        harness.metrics.acks.load(Ordering::Relaxed),
        started.elapsed(),
        retries.load(Ordering::Relaxed)
    );

    // Exactly once in the log, per (agent, sequence), self-contained and complete.
    let records = read_all(harness.log.as_ref()).await;
    let mut counts: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for record in &records {
        let batch = decode_batch(&record.value, &BatchLimits::default()).unwrap_or_else(|error| {
            panic!("record at {}/{}: {error}", record.partition, record.offset)
        });
        assert_eq!(batch.agent_id, record.headers.agent_id);
        assert_eq!(batch.batch_seq, record.headers.batch_seq);
        assert_eq!(
            batch.readings.len(),
            (SERIES_PER_BATCH as i64 * READINGS_PER_SERIES) as usize
        );
        assert_eq!(batch.series.len(), SERIES_PER_BATCH as usize);
        assert_eq!(
            record.partition,
            harness.log.partition_for_key(&record.headers.agent_id),
            "one agent's batches stay in one partition"
        );
        *counts
            .entry((record.headers.agent_id.clone(), record.headers.batch_seq))
            .or_default() += 1;
    }
    let expected: BTreeSet<(String, u64)> = (0..AGENTS)
        .flat_map(|index| (0..BATCHES_PER_AGENT).map(move |seq| (agent_id(index), seq)))
        .collect();
    let written: BTreeSet<(String, u64)> = counts.keys().cloned().collect();
    assert_eq!(
        expected.difference(&written).count(),
        0,
        "missing from the log: {:?}",
        expected.difference(&written).take(10).collect::<Vec<_>>()
    );
    assert_eq!(written, expected, "the log holds batches nobody sent");
    let twice: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "written more than once: {twice:?}");

    // Metrics: every send acked, every resend recognised, no errors.
    let metrics = &harness.metrics;
    let batches = (AGENTS as u64) * BATCHES_PER_AGENT;
    let resends = (0..AGENTS)
        .filter(|index| resend_of(*index) != Resend::None)
        .count() as u64;
    let overloaded = metrics.nacks(NackReason::Overloaded);
    assert_eq!(
        overloaded,
        retries.load(Ordering::Relaxed),
        "the only nacks are the retryable ones for a sequence being written"
    );
    assert_eq!(metrics.acks.load(Ordering::Relaxed), batches + resends);
    assert_eq!(metrics.duplicates.load(Ordering::Relaxed), resends);
    for reason in [
        NackReason::Malformed,
        NackReason::TooLarge,
        NackReason::UnknownSeries,
        NackReason::StorageUnavailable,
        NackReason::Internal,
    ] {
        assert_eq!(metrics.nacks(reason), 0, "nacks for {reason:?}");
    }
    assert_eq!(metrics.protocol_violations.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.hellos_rejected.load(Ordering::Relaxed), 0);
    assert_eq!(
        metrics.connections_accepted.load(Ordering::Relaxed),
        AGENTS as u64
            + (0..AGENTS)
                .filter(|index| resend_of(*index) == Resend::Reconnect)
                .count() as u64
    );
    assert_eq!(
        metrics.readings_in.load(Ordering::Relaxed),
        batches * (SERIES_PER_BATCH as i64 * READINGS_PER_SERIES) as u64
    );

    // The fleet view lists every agent with what it reported and what was acked.
    let fleet = harness.server.fleet().snapshot();
    assert_eq!(fleet.len(), AGENTS, "fleet view: {fleet:#?}");
    for (index, status) in fleet.iter().enumerate() {
        assert_eq!(status.agent_id, agent_id(index));
        assert_eq!(status.agent_version, "many-agents-test");
        assert_eq!(status.reported_backlog.batches, index as u64);
        assert_eq!(status.batches_acked, BATCHES_PER_AGENT, "{status:?}");
        assert_eq!(status.highest_acked_seq, Some(BATCHES_PER_AGENT - 1));
        let expected_duplicates = u64::from(resend_of(index) != Resend::None);
        assert_eq!(status.duplicates, expected_duplicates, "{status:?}");
    }
    // All agents closed their connections: the fleet view sees them go.
    let deadline = Instant::now() + DEADLINE;
    while harness.server.fleet().connected_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} agents still shown connected after they closed",
            harness.server.fleet().connected_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    harness.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_agents_into_the_embedded_log_each_batch_once() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let log = EmbeddedLog::open(
        EmbeddedLogConfig::new(directory.path().join("log")),
        SystemClock,
    )
    .expect("embedded log opens");
    many_agents_into(Arc::new(log)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_agents_into_kafka_each_batch_once() {
    let Some((brokers, topic)) = log_kafka_support::fresh_topic("many_agents", 4).await else {
        return;
    };
    let log = log_kafka_support::connect(KafkaLogConfig::new(&brokers, &topic)).await;
    many_agents_into(Arc::new(log)).await;
}

/// A log whose appends wait at a gate the test opens: a log that has fallen behind.
struct GatedLog {
    inner: EmbeddedLog,
    gate: Arc<Semaphore>,
}

impl DurableLog for GatedLog {
    fn partition_count(&self) -> u32 {
        self.inner.partition_count()
    }

    async fn append(&self, record: AppendRecord) -> Result<AppendReceipt, LogError> {
        let _pass = self.gate.acquire().await.map_err(|_| LogError::Closed)?;
        self.inner.append(record).await
    }

    async fn read(
        &self,
        partition: u32,
        from_offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        self.inner.read(partition, from_offset, max_bytes).await
    }

    async fn offset_range(&self, partition: u32) -> Result<OffsetRange, LogError> {
        self.inner.offset_range(partition).await
    }

    async fn offset_for_time(&self, partition: u32, time_ms: i64) -> Result<u64, LogError> {
        self.inner.offset_for_time(partition, time_ms).await
    }

    async fn commit_position(
        &self,
        group: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), LogError> {
        self.inner
            .commit_position(group, partition, next_offset)
            .await
    }

    async fn load_position(&self, group: &str, partition: u32) -> Result<Option<u64>, LogError> {
        self.inner.load_position(group, partition).await
    }
}

/// With the log stalled, ingest holds at most `max_in_flight_batches_total` streams,
/// reads no further (QUIC flow control holds the agents), acks nothing, and counts
/// the time it spent waiting as backpressure; once the log moves, everything is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_holds_streams_back_and_counts_backpressure_time() {
    const IN_FLIGHT_TOTAL: usize = 2;
    const SENT: u64 = 6;
    const STALL: Duration = Duration::from_millis(300);
    let directory = tempfile::tempdir().expect("temporary directory");
    let gate = Arc::new(Semaphore::new(0));
    let log = GatedLog {
        inner: EmbeddedLog::open(
            EmbeddedLogConfig::new(directory.path().join("log")),
            SystemClock,
        )
        .expect("embedded log opens"),
        gate: gate.clone(),
    };
    let harness = start(
        Arc::new(log),
        IngestConfig {
            max_in_flight_batches_total: IN_FLIGHT_TOTAL,
            ..IngestConfig::default()
        },
        2,
    );
    let client = client_config(&harness.identity);
    let address = harness.server.local_address();
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut sends = tokio::task::JoinSet::new();
    let mut endpoints = Vec::new();
    for index in 0..2 {
        let (endpoint, connection) = session(address, &client, index).await.expect("session");
        endpoints.push((endpoint, connection.clone()));
        for batch_seq in 0..SENT / 2 {
            let connection = connection.clone();
            let retries = retries.clone();
            sends.spawn(
                async move { send_until_acked(&connection, index, batch_seq, &retries).await },
            );
        }
    }
    let metrics = harness.metrics.clone();
    let deadline = Instant::now() + DEADLINE;
    while metrics.batches_in_flight.load(Ordering::Relaxed) < IN_FLIGHT_TOTAL as i64 {
        assert!(Instant::now() < deadline, "streams never reached the log");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Held for a measured while: nothing more is taken, nothing is acked.
    tokio::time::sleep(STALL).await;
    assert_eq!(
        metrics.batches_in_flight.load(Ordering::Relaxed),
        IN_FLIGHT_TOTAL as i64
    );
    assert_eq!(
        metrics.batches_in.load(Ordering::Relaxed),
        IN_FLIGHT_TOTAL as u64
    );
    assert_eq!(metrics.acks.load(Ordering::Relaxed), 0);
    assert_eq!(
        metrics.backpressure_micros.load(Ordering::Relaxed),
        0,
        "counted when a wait ends"
    );

    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    while let Some(sent) = tokio::time::timeout(DEADLINE, sends.join_next())
        .await
        .expect("every batch is acked once the log moves")
    {
        sent.expect("send task").expect("acked");
    }
    assert_eq!(metrics.acks.load(Ordering::Relaxed), SENT);
    let backpressure_micros = metrics.backpressure_micros.load(Ordering::Relaxed);
    assert!(
        backpressure_micros >= STALL.as_micros() as u64,
        "a stream waited the whole stall, but backpressure counts {backpressure_micros} us"
    );
    let rendered = metrics.render();
    let line = rendered
        .lines()
        .find(|line| line.starts_with("tributary_ingest_backpressure_seconds_total "))
        .expect("backpressure metric rendered");
    let seconds: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|value| value.parse().ok())
        .expect("a number");
    assert!(seconds >= STALL.as_secs_f64(), "{line}");
    assert_eq!(read_all(harness.log.as_ref()).await.len(), SENT as usize);
    for (endpoint, connection) in endpoints {
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    }
    harness.server.shutdown().await;
}

/// Starts a collector over a stalled log and gets `count` batches of one agent into
/// it: each stream read and waiting for the log.
async fn batches_waiting_on_a_stalled_log(
    config: IngestConfig,
    count: u64,
) -> (
    Harness<GatedLog>,
    Arc<Semaphore>,
    quinn::Endpoint,
    Connection,
    tokio::task::JoinSet<Result<(), String>>,
    tempfile::TempDir,
) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let gate = Arc::new(Semaphore::new(0));
    let log = GatedLog {
        inner: EmbeddedLog::open(
            EmbeddedLogConfig::new(directory.path().join("log")),
            SystemClock,
        )
        .expect("embedded log opens"),
        gate: gate.clone(),
    };
    let harness = start(Arc::new(log), config, 1);
    let client = client_config(&harness.identity);
    let (endpoint, connection) = session(harness.server.local_address(), &client, 0)
        .await
        .expect("session");
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut sends = tokio::task::JoinSet::new();
    for batch_seq in 0..count {
        let connection = connection.clone();
        let retries = retries.clone();
        sends.spawn(async move { send_until_acked(&connection, 0, batch_seq, &retries).await });
    }
    let deadline = Instant::now() + DEADLINE;
    while harness.metrics.batches_in.load(Ordering::Relaxed) < count {
        assert!(Instant::now() < deadline, "batches never reached the log");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (harness, gate, endpoint, connection, sends, directory)
}

/// Graceful shutdown waits for in-flight batches: they become durable and are acked
/// before `shutdown` returns, and then the connection is closed as shutting down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_batches_before_closing() {
    const IN_FLIGHT: u64 = 3;
    let (harness, gate, endpoint, connection, mut sends, _directory) =
        batches_waiting_on_a_stalled_log(IngestConfig::default(), IN_FLIGHT).await;
    let Harness {
        server,
        log,
        metrics,
        ..
    } = harness;
    let shutdown = tokio::spawn(server.shutdown());
    // The log catches up a little into the drain.
    let opener = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        gate.add_permits(Semaphore::MAX_PERMITS / 2);
    });
    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("shutdown finishes within the drain timeout")
        .expect("shutdown task");
    assert_eq!(
        metrics.acks.load(Ordering::Relaxed),
        IN_FLIGHT,
        "shutdown returned before the in-flight batches were acked"
    );
    while let Some(sent) = sends.join_next().await {
        sent.expect("send task").expect("acked during the drain");
    }
    assert_eq!(read_all(log.as_ref()).await.len(), IN_FLIGHT as usize);
    match tokio::time::timeout(DEADLINE, connection.closed())
        .await
        .expect("the connection is closed after the drain")
    {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
            close.error_code,
            quinn::VarInt::from_u32(tributary_protocol::close::CLOSE_SHUTTING_DOWN)
        ),
        other => panic!("expected a shutting-down close, got {other}"),
    }
    opener.await.expect("gate task");
    endpoint.wait_idle().await;
}

/// When the log does not catch up within `drain_timeout_ms`, shutdown gives up on the
/// in-flight batches: nothing is acked that was not written, and the agent (which still
/// holds them) sees the connection end instead of an ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_the_drain_timeout_acks_nothing_unwritten() {
    const DRAIN_TIMEOUT_MS: u64 = 300;
    let (harness, _gate, endpoint, _connection, mut sends, _directory) =
        batches_waiting_on_a_stalled_log(
            IngestConfig {
                drain_timeout_ms: DRAIN_TIMEOUT_MS,
                ..IngestConfig::default()
            },
            2,
        )
        .await;
    let Harness {
        server,
        log,
        metrics,
        ..
    } = harness;
    let started = Instant::now();
    tokio::time::timeout(DEADLINE, server.shutdown())
        .await
        .expect("shutdown gives up after the drain timeout");
    assert!(started.elapsed() >= Duration::from_millis(DRAIN_TIMEOUT_MS));
    while let Some(sent) = sends.join_next().await {
        let result = sent.expect("send task");
        assert!(result.is_err(), "a batch was acked: {result:?}");
    }
    assert_eq!(metrics.acks.load(Ordering::Relaxed), 0);
    assert_eq!(read_all(log.as_ref()).await.len(), 0);
    endpoint.wait_idle().await;
}
