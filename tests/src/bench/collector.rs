//! `bench collector`: QUIC ingest into the embedded log and into Kafka, measured from
//! simulated agents on loopback; connections held; and the two log-design measurements
//! that used to be ignored tests (segment files against sled, Kafka producer settings).
//!
//! Why it looks like this: issue 4 sets the goals on this 2-core machine (2 M readings/s
//! into the embedded log, 1 M into Kafka, batches of ~5,000 readings, 1,000 agents held).
//! Agents are hand-driven QUIC clients speaking the session protocol (hello, one stream
//! per batch, ack when durable), as `collector/tests/ingest_protocol.rs` does, with
//! batches encoded before the clock starts so the figure is the collector's, not the
//! encoder's. The collector runs in-process on its own runtime whose threads are named
//! `collector`, so its CPU time is read per thread from `/proc/self/task` apart from the
//! agents'. RSS is the whole process (agents' pre-encoded frames included, reported as
//! `frames_mib`).
//!
//! Baselines, same run: the log alone (appends from 64 concurrent tasks, no QUIC, no
//! decode), so the line shows what ingest costs on top of durability.

mod log_design;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use tributary_collector::ingest::{
    DedupStore, FleetView, IngestConfig, IngestMetrics, IngestParts, IngestServer, TlsIdentity,
    TokenStore,
};
use tributary_collector::log::kafka::{KafkaLog, KafkaLogConfig};
use tributary_collector::log::{
    AppendRecord, DurableLog, EmbeddedLog, EmbeddedLogConfig, RecordHeaders, SystemClock,
};
use tributary_firmware_sim::fleet::Fleet;
use tributary_protocol::batch::{series_ids_used, SenderSessionDictionary};
use tributary_protocol::frame::{FrameDecoder, FrameLimits};
use tributary_protocol::session::{Backlog, Hello, Message, PROTOCOL_VERSION};
use tributary_protocol::{encode_batch, Batch};

use super::{peak_rss_mib, percentile, reset_peak_rss, round3, rss_mib, BenchOptions};
use crate::services::{lookup_service_env, running_in_ci, unique_suffix, KAFKA_BROKERS};

/// An agent of 500 series (50 devices x 10 metrics) shipping 10 s batches: 5,000 readings each.
const DEVICES_PER_AGENT: usize = 50;
const PERIODS_PER_BATCH: usize = 10;
const START_MS: i64 = 1_700_000_000_000;
const IN_FLIGHT_PER_AGENT: usize = 16;
/// Thread name of the collector's runtime; `/proc` truncates names to 15 bytes.
pub(crate) const COLLECTOR_THREAD: &str = "collector";

/// How big a run is.
#[derive(Debug, Clone, Copy)]
struct Load {
    agents: usize,
    batches_per_agent: usize,
}

/// Every frame an agent will send, encoded ahead of time; the first carries the
/// session's series definitions and is sent (and acked) before the clock starts.
struct AgentFrames {
    agent_id: String,
    token: String,
    frames: Vec<Bytes>,
    readings_per_frame: Vec<u64>,
}

fn agent_frames(agent_index: usize, batches: usize) -> anyhow::Result<AgentFrames> {
    let agent_id = format!("bench-agent-{agent_index:04}");
    let mut fleet = Fleet::new(DEVICES_PER_AGENT, 7 + agent_index as u64);
    let definitions = fleet.series();
    let mut dictionary = SenderSessionDictionary::new();
    let mut frames = Vec::with_capacity(batches);
    let mut readings_per_frame = Vec::with_capacity(batches);
    for batch_seq in 0..batches {
        let mut readings = Vec::with_capacity(PERIODS_PER_BATCH * DEVICES_PER_AGENT * 10);
        for period in 0..PERIODS_PER_BATCH {
            let second = batch_seq * PERIODS_PER_BATCH + period;
            fleet.sample_period(START_MS + second as i64 * 1000, &mut readings);
        }
        let mut batch = Batch {
            agent_id: agent_id.clone(),
            batch_seq: batch_seq as u64,
            created_ms: START_MS + ((batch_seq + 1) * PERIODS_PER_BATCH) as i64 * 1000,
            series: Vec::new(),
            readings,
            summaries: Vec::new(),
        };
        // The first batch (sent and acked before the clock starts) defines every series:
        // later batches travel 16 at a time, so a definition sent with one of them could
        // arrive after a batch that needs it (UnknownSeries nack).
        let needed = if batch_seq == 0 {
            definitions.iter().map(|definition| definition.id).collect()
        } else {
            dictionary.definitions_needed(&series_ids_used(&batch))
        };
        batch.series = needed
            .iter()
            .filter_map(|id| definitions.iter().find(|definition| definition.id == *id))
            .cloned()
            .collect();
        dictionary.confirm(needed);
        readings_per_frame.push(batch.readings.len() as u64);
        let frame = Message::Batch(encode_batch(&batch))
            .encode_to_vec(&FrameLimits::DEFAULT)
            .with_context(|| format!("framing batch {batch_seq} of {agent_id}"))?;
        frames.push(Bytes::from(frame));
    }
    Ok(AgentFrames {
        token: format!("token-{agent_id}"),
        agent_id,
        frames,
        readings_per_frame,
    })
}

/// The collector under test: an ingest server on its own named runtime.
pub(crate) struct Collector<L: DurableLog> {
    runtime: Runtime,
    server: Option<IngestServer<L>>,
    pub(crate) identity: TlsIdentity,
    pub(crate) metrics: Arc<IngestMetrics>,
    fleet: FleetView,
    _state: tempfile::TempDir,
}

pub(crate) fn collector_runtime() -> anyhow::Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(COLLECTOR_THREAD)
        .enable_all()
        .build()?)
}

impl<L: DurableLog> Collector<L> {
    pub(crate) fn start(
        runtime: Runtime,
        log: Arc<L>,
        agent_ids: &[String],
        state: tempfile::TempDir,
    ) -> anyhow::Result<Self> {
        let identity = TlsIdentity::self_signed(&["localhost".to_owned()])?;
        let metrics = Arc::new(IngestMetrics::default());
        let fleet = FleetView::new();
        let tokens: Vec<(String, String)> = agent_ids
            .iter()
            .map(|agent_id| (agent_id.clone(), format!("token-{agent_id}")))
            .collect();
        let dedup = DedupStore::open(&state.path().join("dedup"), 4096)?;
        let parts = IngestParts {
            config: IngestConfig {
                listen_address: SocketAddr::from(([127, 0, 0, 1], 0)),
                idle_timeout_ms: 120_000,
                ..IngestConfig::default()
            },
            identity: identity.clone(),
            tokens: TokenStore::from_tokens(
                tokens
                    .iter()
                    .map(|(agent_id, token)| (agent_id.as_str(), token.as_str())),
            ),
            log,
            dedup,
            metrics: metrics.clone(),
            fleet: fleet.clone(),
        };
        let server = runtime.block_on(async { IngestServer::start(parts) })?;
        Ok(Self {
            runtime,
            server: Some(server),
            identity,
            metrics,
            fleet,
            _state: state,
        })
    }

    pub(crate) fn address(&self) -> anyhow::Result<SocketAddr> {
        Ok(self
            .server
            .as_ref()
            .context("the ingest server was already shut down")?
            .local_address())
    }

    pub(crate) fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}

/// CPU seconds used so far by this process's threads whose name starts with one of `prefixes`.
pub(crate) fn threads_cpu_seconds(prefixes: &[&str]) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut total = 0.0;
    for task in tasks.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !prefixes
            .iter()
            .any(|prefix| name.trim().starts_with(prefix))
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((_, after_name)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|index| fields.get(*index)?.parse::<f64>().ok())
            .sum();
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
        total += ticks / per_second as f64;
    }
    total
}

fn client_config(identity: &TlsIdentity) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in &identity.cert_chain {
        roots.add(certificate.clone())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tributary_protocol::session::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Longest a simulated agent waits for one answer before counting an error: a bench must
/// end with a report, never hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one frame on a new stream and reads the one answer (bounded by [`ANSWER_TIMEOUT`]).
async fn exchange(connection: &quinn::Connection, frame: &[u8]) -> anyhow::Result<Message> {
    tokio::time::timeout(ANSWER_TIMEOUT, exchange_unbounded(connection, frame))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the collector within {ANSWER_TIMEOUT:?}"))?
}

async fn exchange_unbounded(
    connection: &quinn::Connection,
    frame: &[u8],
) -> anyhow::Result<Message> {
    let (mut send, mut receive) = connection.open_bi().await?;
    send.write_all(frame).await?;
    send.finish()?;
    let mut decoder = FrameDecoder::new(FrameLimits::DEFAULT);
    loop {
        if let Some(frame) = decoder.next_owned_frame()? {
            return Ok(Message::decode(frame.as_ref())?);
        }
        match receive.read_chunk(64 * 1024, true).await? {
            Some(chunk) => decoder.feed(&chunk.bytes),
            None => bail!("the collector closed the stream without an answer"),
        }
    }
}

/// One simulated agent's session: connect, hello, and the first frame (with definitions).
async fn open_session(
    address: SocketAddr,
    config: quinn::ClientConfig,
    agent: &AgentFrames,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    endpoint.set_default_client_config(config);
    let connection = endpoint.connect(address, "localhost")?.await?;
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: agent.agent_id.clone(),
        token: agent.token.clone(),
        agent_version: "bench".to_owned(),
        backlog: Backlog::default(),
    })
    .encode_to_vec(&FrameLimits::DEFAULT)?;
    match exchange(&connection, &hello).await? {
        Message::Welcome(_) => {}
        other => bail!("{}: expected a welcome, got {other:?}", agent.agent_id),
    }
    let first = agent.frames.first().context("an agent with no frames")?;
    match exchange(&connection, first).await? {
        Message::Ack(ack) if ack.batch_seq == 0 => {}
        other => bail!("{}: first batch answered with {other:?}", agent.agent_id),
    }
    Ok((endpoint, connection))
}

/// What the agents saw.
#[derive(Debug, Default)]
struct AgentTotals {
    readings_acked: u64,
    batches_acked: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_ms: Vec<f64>,
}

/// Sends frames 1.. with up to [`IN_FLIGHT_PER_AGENT`] streams open, one per batch.
async fn send_pipelined(connection: quinn::Connection, agent: Arc<AgentFrames>) -> AgentTotals {
    let mut totals = AgentTotals::default();
    let mut in_flight = tokio::task::JoinSet::new();
    let record = |totals: &mut AgentTotals, outcome: anyhow::Result<(usize, f64)>| match outcome {
        Ok((index, latency_ms)) => {
            totals.batches_acked += 1;
            totals.readings_acked += agent.readings_per_frame.get(index).copied().unwrap_or(0);
            totals.latencies_ms.push(latency_ms);
        }
        Err(error) => {
            totals.errors += 1;
            totals.first_error.get_or_insert_with(|| error.to_string());
        }
    };
    for index in 1..agent.frames.len() {
        while in_flight.len() >= IN_FLIGHT_PER_AGENT {
            if let Some(joined) = in_flight.join_next().await {
                record(
                    &mut totals,
                    joined
                        .map_err(anyhow::Error::from)
                        .and_then(|outcome| outcome),
                );
            }
        }
        let connection = connection.clone();
        let agent = agent.clone();
        in_flight.spawn(async move {
            let frame = agent.frames.get(index).context("frame index")?;
            let sent = Instant::now();
            match exchange(&connection, frame).await? {
                Message::Ack(ack) if ack.batch_seq == index as u64 => {
                    Ok((index, sent.elapsed().as_secs_f64() * 1e3))
                }
                other => bail!("batch {index}: answered with {other:?}"),
            }
        });
    }
    while let Some(joined) = in_flight.join_next().await {
        record(
            &mut totals,
            joined
                .map_err(anyhow::Error::from)
                .and_then(|outcome| outcome),
        );
    }
    totals
}

/// Drives `agents` against a running collector; returns one JSON line.
fn measure_throughput<L: DurableLog>(
    log_name: &str,
    collector: &Collector<L>,
    agents: Vec<AgentFrames>,
) -> anyhow::Result<Value> {
    let address = collector.address()?;
    let config = client_config(&collector.identity)?;
    let agent_count = agents.len();
    let frames_bytes: usize = agents
        .iter()
        .flat_map(|agent| agent.frames.iter().map(Bytes::len))
        .sum();
    let frames_total: usize = agents.iter().map(|agent| agent.frames.len()).sum();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agents")
        .enable_all()
        .build()?;
    let agents: Vec<Arc<AgentFrames>> = agents.into_iter().map(Arc::new).collect();
    let rss_before_mib = rss_mib().unwrap_or(0.0);
    reset_peak_rss();
    let (totals, seconds, collector_cpu_seconds) = runtime.block_on(async {
        let mut sessions = Vec::with_capacity(agent_count);
        for agent in &agents {
            sessions.push(open_session(address, config.clone(), agent).await?);
        }
        let cpu_before = threads_cpu_seconds(&[COLLECTOR_THREAD, "log-flush", "rdk:"]);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for ((_, connection), agent) in sessions.iter().zip(&agents) {
            tasks.spawn(send_pipelined(connection.clone(), agent.clone()));
        }
        let mut totals = AgentTotals::default();
        while let Some(joined) = tasks.join_next().await {
            let agent_totals = joined?;
            totals.readings_acked += agent_totals.readings_acked;
            totals.batches_acked += agent_totals.batches_acked;
            totals.errors += agent_totals.errors;
            if totals.first_error.is_none() {
                totals.first_error = agent_totals.first_error;
            }
            totals.latencies_ms.extend(agent_totals.latencies_ms);
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu = threads_cpu_seconds(&[COLLECTOR_THREAD, "log-flush", "rdk:"]) - cpu_before;
        close_sessions(
            sessions
                .iter()
                .map(|(endpoint, connection)| (endpoint, connection)),
        )
        .await;
        anyhow::Ok((totals, seconds, cpu))
    })?;
    let mut latencies = totals.latencies_ms;
    latencies.sort_by(f64::total_cmp);
    Ok(json!({
        "bench": "collector",
        "log": log_name,
        "agents": agent_count,
        "readings_per_batch": DEVICES_PER_AGENT * 10 * PERIODS_PER_BATCH,
        "batches": totals.batches_acked,
        "errors": totals.errors,
        "first_error": totals.first_error,
        "seconds": round3(seconds),
        "readings_per_s": (totals.readings_acked as f64 / seconds.max(1e-9)).round(),
        "batches_per_s": round3(totals.batches_acked as f64 / seconds.max(1e-9)),
        "mb_per_s": round3(frames_bytes as f64 / frames_total.max(1) as f64 * totals.batches_acked as f64 / seconds.max(1e-9) / 1e6),
        "bytes_per_batch": frames_bytes / frames_total.max(1),
        "p50_ms": round3(percentile(&latencies, 0.5)),
        "p99_ms": round3(percentile(&latencies, 0.99)),
        "collector_cpu_s": round3(collector_cpu_seconds),
        "rss_mib": round3(peak_rss_mib().unwrap_or(0.0)),
        "rss_before_agents_mib": round3(rss_before_mib),
        "frames_mib": round3(frames_bytes as f64 / (1024.0 * 1024.0)),
        "acks": collector.metrics.acks.load(Ordering::Relaxed),
    }))
}

/// The baseline: the same records appended to the log directly by 64 tasks.
fn log_alone<L: DurableLog>(
    runtime: &Runtime,
    log: Arc<L>,
    agents: &[AgentFrames],
) -> anyhow::Result<f64> {
    let readings = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (task, agent) in agents.iter().enumerate() {
            for lane in 0..8usize {
                let log = log.clone();
                let readings = readings.clone();
                let agent_id = format!("baseline-{task}-{lane}");
                let frames: Vec<(Bytes, u64)> = agent
                    .frames
                    .iter()
                    .zip(&agent.readings_per_frame)
                    .skip(lane)
                    .step_by(8)
                    .map(|(frame, count)| (frame.clone(), *count))
                    .collect();
                tasks.spawn(async move {
                    for (batch_seq, (value, count)) in frames.into_iter().enumerate() {
                        log.append(AppendRecord {
                            headers: RecordHeaders {
                                agent_id: agent_id.clone(),
                                batch_seq: batch_seq as u64,
                                protocol_version: PROTOCOL_VERSION,
                            },
                            value,
                        })
                        .await?;
                        readings.fetch_add(count, Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                });
            }
        }
        while let Some(joined) = tasks.join_next().await {
            joined??;
        }
        anyhow::Ok(())
    })?;
    Ok(readings.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

fn build_agents(load: Load, offset: usize) -> anyhow::Result<Vec<AgentFrames>> {
    (0..load.agents)
        .map(|index| agent_frames(offset + index, load.batches_per_agent))
        .collect()
}

fn embedded_line(load: Load) -> anyhow::Result<Value> {
    let state = tempfile::tempdir()?;
    let runtime = collector_runtime()?;
    let log = Arc::new(EmbeddedLog::open(
        EmbeddedLogConfig::new(state.path().join("log")),
        SystemClock,
    )?);
    let agents = build_agents(load, 0)?;
    let agent_ids: Vec<String> = agents.iter().map(|agent| agent.agent_id.clone()).collect();
    let baseline = {
        let baseline_log = Arc::new(EmbeddedLog::open(
            EmbeddedLogConfig::new(state.path().join("baseline-log")),
            SystemClock,
        )?);
        log_alone(&runtime, baseline_log, &agents)?
    };
    let collector = Collector::start(runtime, log, &agent_ids, state)?;
    let mut line = measure_throughput("embedded", &collector, agents)?;
    line["baseline_log_alone_readings_per_s"] = json!(baseline.round());
    collector.shutdown();
    Ok(line)
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .with_context(|| format!("kafka at {brokers}: creating an admin client"))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("message.timestamp.type", "LogAppendTime");
    for result in admin.create_topics(&[new_topic], &options).await? {
        result.map_err(|(name, code)| {
            anyhow::anyhow!("kafka at {brokers}: create topic {name}: {code}")
        })?;
    }
    Ok(())
}

async fn delete_topic(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let Ok(admin) = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let _ = admin.delete_topics(&[topic], &options).await;
}

/// A Kafka log on a fresh topic, retrying while its metadata propagates (bounded).
async fn connect_kafka(config: KafkaLogConfig) -> anyhow::Result<KafkaLog> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match KafkaLog::connect(config.clone()).await {
            Ok(log) => return Ok(log),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => {
                return Err(error).with_context(|| format!("connecting to topic {}", config.topic))
            }
        }
    }
}

/// The Kafka brokers, or a line saying why the Kafka part was skipped.
fn kafka_brokers(part: &str) -> anyhow::Result<Result<String, Value>> {
    match lookup_service_env(KAFKA_BROKERS) {
        Some(brokers) => Ok(Ok(brokers)),
        None if running_in_ci() => bail!(
            "CI=true and {KAFKA_BROKERS} is not set; start the services with `deploy/dev/services.sh up`"
        ),
        None => Ok(Err(json!({
            "bench": "collector",
            "log": "kafka",
            "part": part,
            "note": format!("skipped: {KAFKA_BROKERS} not set; run deploy/dev/services.sh up"),
        }))),
    }
}

fn kafka_line(load: Load) -> anyhow::Result<Value> {
    let brokers = match kafka_brokers("throughput")? {
        Ok(brokers) => brokers,
        Err(skipped) => return Ok(skipped),
    };
    let state = tempfile::tempdir()?;
    let runtime = collector_runtime()?;
    let topic = format!("tributary.bench.collector.{}", unique_suffix());
    let baseline_topic = format!("{topic}.baseline");
    let (log, baseline_log) = runtime.block_on(async {
        create_topic(&brokers, &topic, 4).await?;
        create_topic(&brokers, &baseline_topic, 4).await?;
        let log = connect_kafka(KafkaLogConfig::new(&brokers, &topic)).await?;
        let baseline_log = connect_kafka(KafkaLogConfig::new(&brokers, &baseline_topic)).await?;
        anyhow::Ok((log, baseline_log))
    })?;
    let agents = build_agents(load, 0)?;
    let agent_ids: Vec<String> = agents.iter().map(|agent| agent.agent_id.clone()).collect();
    let outcome = (|| {
        let baseline = log_alone(&runtime, Arc::new(baseline_log), &agents)?;
        let collector = Collector::start(runtime, Arc::new(log), &agent_ids, state)?;
        let line = measure_throughput("kafka", &collector, agents);
        let runtime = { collector.shutdown_keep_runtime() };
        let mut line = line?;
        line["baseline_log_alone_readings_per_s"] = json!(baseline.round());
        anyhow::Ok((line, runtime))
    })();
    let cleanup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    cleanup.block_on(async {
        delete_topic(&brokers, &topic).await;
        delete_topic(&brokers, &baseline_topic).await;
    });
    outcome.map(|(line, _runtime)| line)
}

impl<L: DurableLog> Collector<L> {
    /// Shuts the server down and hands the runtime back (dropping it inside async code
    /// would panic).
    fn shutdown_keep_runtime(mut self) -> Runtime {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
        self.runtime
    }
}

/// Many agents connected at once, each sending a few batches: does the collector hold them?
fn connections_line(agents_wanted: usize) -> anyhow::Result<Value> {
    let descriptors_needed = agents_wanted as u64 + 256;
    let (soft_limit, hard_limit) = raise_open_files_limit(descriptors_needed);
    let state = tempfile::tempdir()?;
    let runtime = collector_runtime()?;
    let log = Arc::new(EmbeddedLog::open(
        EmbeddedLogConfig::new(state.path().join("log")),
        SystemClock,
    )?);
    let load = Load {
        agents: agents_wanted,
        batches_per_agent: 3,
    };
    let agents: Vec<Arc<AgentFrames>> = (0..load.agents)
        .map(|index| small_agent_frames(10_000 + index, load.batches_per_agent).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let agent_ids: Vec<String> = agents.iter().map(|agent| agent.agent_id.clone()).collect();
    let collector = Collector::start(runtime, log, &agent_ids, state)?;
    let address = collector.address()?;
    let config = client_config(&collector.identity)?;
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agents")
        .enable_all()
        .build()?;
    let started = Instant::now();
    let (
        connected_at_peak,
        errors,
        first_error,
        batches_acked,
        seconds_to_connect,
        seconds_to_close,
    ) = client_runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(64));
        for agent in &agents {
            let agent = agent.clone();
            let config = config.clone();
            let limit = limit.clone();
            tasks.spawn(async move {
                // Connect at most 64 at a time, as a fleet reconnecting after an outage would be spread.
                let permit = limit.acquire_owned().await?;
                let session = open_session(address, config, &agent).await;
                drop(permit);
                session.map(|session| (session, agent))
            });
        }
        let mut sessions = Vec::with_capacity(agents.len());
        let mut errors = 0u64;
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined
                .map_err(anyhow::Error::from)
                .and_then(|outcome| outcome)
            {
                Ok(session) => sessions.push(session),
                Err(error) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| error.to_string());
                }
            }
        }
        let seconds_to_connect = started.elapsed().as_secs_f64();
        let connected_at_peak = collector.fleet.connected_count();
        // Every held session now sends the rest of its batches.
        let mut sending = tokio::task::JoinSet::new();
        for ((_, connection), agent) in &sessions {
            sending.spawn(send_pipelined(connection.clone(), agent.clone()));
        }
        let mut batches_acked = sessions.len() as u64;
        while let Some(joined) = sending.join_next().await {
            let totals = joined?;
            batches_acked += totals.batches_acked;
            errors += totals.errors;
            if first_error.is_none() {
                first_error = totals.first_error;
            }
        }
        let closing = Instant::now();
        close_sessions(
            sessions
                .iter()
                .map(|((endpoint, connection), _)| (endpoint, connection)),
        )
        .await;
        let seconds_to_close = closing.elapsed().as_secs_f64();
        anyhow::Ok((
            connected_at_peak,
            errors,
            first_error,
            batches_acked,
            seconds_to_connect,
            seconds_to_close,
        ))
    })?;
    let line = json!({
        "bench": "collector",
        "log": "embedded",
        "part": "connections",
        "agents": agents_wanted,
        "connected_at_peak": connected_at_peak,
        "batches_acked": batches_acked,
        "errors": errors,
        "first_error": first_error,
        "seconds_to_connect_all": round3(seconds_to_connect),
        "seconds_to_close_all": round3(seconds_to_close),
        "open_files_soft_limit": soft_limit,
        "open_files_hard_limit": hard_limit,
        "rss_mib": round3(rss_mib().unwrap_or(0.0)),
    });
    collector.shutdown();
    Ok(line)
}

/// Longest the bench waits for closed connections to drain before it moves on.
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes every session, then waits for all their endpoints to drain at once (bounded).
///
/// Why at once: a closed QUIC connection drains for three probe timeouts, which the busy
/// phase before inflates to about a second; waiting endpoint by endpoint made the
/// 1,000-connection part sit idle for many minutes (the stalled full run).
async fn close_sessions<'a>(
    sessions: impl Iterator<Item = (&'a quinn::Endpoint, &'a quinn::Connection)>,
) {
    let mut draining = tokio::task::JoinSet::new();
    for (endpoint, connection) in sessions {
        connection.close(0u32.into(), b"bench done");
        let endpoint = endpoint.clone();
        draining.spawn(async move { endpoint.wait_idle().await });
    }
    let drained = async { while draining.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(CLOSE_DRAIN_TIMEOUT, drained).await;
}

/// Small batches (50 readings) for the connections part: it is about holding sessions.
fn small_agent_frames(agent_index: usize, batches: usize) -> anyhow::Result<AgentFrames> {
    let agent_id = format!("bench-agent-{agent_index:05}");
    let mut fleet = Fleet::new(1, agent_index as u64);
    let definitions = fleet.series();
    let mut frames = Vec::with_capacity(batches);
    let mut readings_per_frame = Vec::with_capacity(batches);
    for batch_seq in 0..batches {
        let mut readings = Vec::new();
        for period in 0..5 {
            let second = batch_seq * 5 + period;
            fleet.sample_period(START_MS + second as i64 * 1000, &mut readings);
        }
        let batch = Batch {
            agent_id: agent_id.clone(),
            batch_seq: batch_seq as u64,
            created_ms: START_MS + (batch_seq as i64 + 1) * 5000,
            // Every batch carries its definitions: simple, and the session allows it.
            series: definitions.clone(),
            readings,
            summaries: Vec::new(),
        };
        readings_per_frame.push(batch.readings.len() as u64);
        frames.push(Bytes::from(
            Message::Batch(encode_batch(&batch)).encode_to_vec(&FrameLimits::DEFAULT)?,
        ));
    }
    Ok(AgentFrames {
        token: format!("token-{agent_id}"),
        agent_id,
        frames,
        readings_per_frame,
    })
}

/// Raises the soft open-files limit to cover `needed` descriptors (up to the hard limit).
/// Returns the (soft, hard) limits in force afterwards.
#[allow(
    clippy::useless_conversion,
    reason = "rlim_t is u64 here but 32 bits wide on some targets"
)]
fn raise_open_files_limit(needed: u64) -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (0, 0);
    }
    if u64::from(limit.rlim_cur) < needed {
        let raised = libc::rlimit {
            rlim_cur: libc::rlim_t::try_from(needed.min(u64::from(limit.rlim_max)))
                .unwrap_or(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    (u64::from(limit.rlim_cur), u64::from(limit.rlim_max))
}

/// Runs the bench: embedded and Kafka throughput lines, connections, and the log-design
/// measurements.
pub fn run(options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    let (embedded_load, kafka_load, connections) = if options.quick {
        (
            Load {
                agents: 4,
                batches_per_agent: 25,
            },
            Load {
                agents: 4,
                batches_per_agent: 25,
            },
            100,
        )
    } else {
        (
            Load {
                agents: 8,
                batches_per_agent: 400,
            },
            Load {
                agents: 8,
                batches_per_agent: 250,
            },
            1_000,
        )
    };
    let mut lines = Vec::new();
    lines.push(embedded_line(embedded_load)?);
    eprintln!("bench collector: {}", lines[lines.len() - 1]);
    lines.push(kafka_line(kafka_load)?);
    eprintln!("bench collector: {}", lines[lines.len() - 1]);
    lines.push(connections_line(connections)?);
    eprintln!("bench collector: {}", lines[lines.len() - 1]);
    lines.extend(log_design::segment_files_against_sled(options)?);
    match kafka_brokers("producer_settings")? {
        Ok(brokers) => lines.extend(log_design::kafka_producer_settings(&brokers, options)?),
        Err(skipped) => lines.push(skipped),
    }
    Ok(lines)
}
