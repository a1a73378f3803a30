//! The QUIC shell of ingest: accept connections, run the hello, and turn each batch
//! stream into one durable log record and an ack.
//!
//! The order on every batch stream is the product's central promise: read one frame
//! within the limits, decode within the limits, resolve series through the session
//! dictionary, append a self-contained record to the [`DurableLog`], wait until it is
//! durable, and only then ack. Anything that fails before durability becomes a nack
//! that says whether a retry can help; the agent keeps the batch until it sees an ack.
//!
//! Backpressure: each agent may have `max_in_flight_batches_per_agent` streams open
//! (a QUIC limit the agent cannot exceed), and ingest takes a slot from a global pool
//! before reading a stream. When the log falls behind, slots run out, ingest stops
//! reading, and QUIC flow control slows the agents, which keep the data in their disk
//! buffers. Nothing is buffered here beyond the slots in use.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tributary_protocol::batch::ReceiverSessionDictionary;
use tributary_protocol::close::{
    CLOSE_HELLO_TIMEOUT, CLOSE_PROTOCOL_VIOLATION, CLOSE_REJECTED, CLOSE_SHUTTING_DOWN,
    CLOSE_SUPERSEDED,
};
use tributary_protocol::frame::FrameLimits;
use tributary_protocol::session::{
    negotiate_version, Ack, Hello, Message, Nack, NackReason, Reject, ServerLimits, Welcome,
    MIN_PROTOCOL_VERSION,
};
use tributary_protocol::BatchLimits;

use super::config::IngestConfig;
use super::decide::{
    admit_batch, decide_batch_stream, decide_hello, prepare_batch, HelloDecision, ReadProgress,
    StreamDecision, StreamFrameReader, HELLO_FRAME_LIMITS,
};
use super::dedup::{DedupStore, SequenceWindow};
use super::fleet::FleetView;
use super::metrics::IngestMetrics;
use super::rate::TokenBucket;
use super::tls::{TlsError, TlsIdentity};
use super::tokens::TokenStore;
use crate::log::{AppendRecord, DurableLog, LogError, RecordHeaders};

/// Bytes asked of QUIC per read; a frame of any size is assembled from such chunks.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// How long a batch stream's task waits for the agent to acknowledge its ack or nack.
const ANSWER_DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum IngestError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the QUIC server configuration is invalid: {0}")]
    QuicConfig(String),
    #[error("cannot listen on UDP {address}: {source}; is another collector running there, or is the port privileged?")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Wall-clock milliseconds for the fleet view and the rate limiter (the shell's clock).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// Per-agent state shared by that agent's successive connections.
struct AgentEntry {
    dedup: Mutex<AgentSequences>,
    rate: Option<Mutex<TokenBucket>>,
    /// The live connection, so a newer one can supersede it.
    connection: Mutex<Option<(u64, Connection)>>,
}

struct AgentSequences {
    window: SequenceWindow,
    /// Sequences being written right now (a resend may race its original).
    in_progress: HashSet<u64>,
}

/// What one session shares between its batch streams.
struct Session {
    agent_id: String,
    /// The protocol version negotiated in the welcome; recorded in every log record.
    protocol_version: u16,
    agent: Arc<AgentEntry>,
    dictionary: Mutex<ReceiverSessionDictionary>,
    connection: Connection,
    /// The server's stop signal: a session that ends while it is set closes its
    /// connection as shutting down once its last batch was answered.
    stopping: CancellationToken,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Without this, the connection would end with the implicit close (code 0) when
        // the last batch task lets go of it, before the endpoint's shutting-down close.
        if self.stopping.is_cancelled() {
            self.connection.close(
                VarInt::from_u32(CLOSE_SHUTTING_DOWN),
                b"collector shutting down",
            );
        }
    }
}

struct Shared<L> {
    config: IngestConfig,
    tokens: TokenStore,
    log: Arc<L>,
    dedup: DedupStore,
    metrics: Arc<IngestMetrics>,
    fleet: FleetView,
    agents: Mutex<HashMap<String, Arc<AgentEntry>>>,
    slots: Arc<Semaphore>,
    frame_limits: FrameLimits,
    batch_limits: BatchLimits,
    next_connection_id: AtomicU64,
    /// Stop taking new connections and streams; drain.
    stopping: CancellationToken,
    /// Drop everything now (emulates a crash in tests).
    killed: CancellationToken,
    tracker: TaskTracker,
}

/// What [`IngestServer::start`] needs besides the config.
pub struct IngestParts<L> {
    pub config: IngestConfig,
    pub identity: TlsIdentity,
    pub tokens: TokenStore,
    pub log: Arc<L>,
    pub dedup: DedupStore,
    pub metrics: Arc<IngestMetrics>,
    pub fleet: FleetView,
}

/// The running server. Dropping it does not stop it; call [`IngestServer::shutdown`].
pub struct IngestServer<L: DurableLog> {
    shared: Arc<Shared<L>>,
    endpoint: quinn::Endpoint,
    local_address: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl<L: DurableLog> IngestServer<L> {
    /// Binds the QUIC endpoint and starts accepting agents. Must run inside a tokio runtime.
    pub fn start(parts: IngestParts<L>) -> Result<Self, IngestError> {
        let IngestParts {
            config,
            identity,
            tokens,
            log,
            dedup,
            metrics,
            fleet,
        } = parts;
        let server_config = quic_server_config(&config, &identity)?;
        let endpoint =
            quinn::Endpoint::server(server_config, config.listen_address).map_err(|source| {
                IngestError::Bind {
                    address: config.listen_address,
                    source,
                }
            })?;
        let local_address = endpoint.local_addr().map_err(|source| IngestError::Bind {
            address: config.listen_address,
            source,
        })?;
        let frame_limits = FrameLimits {
            max_frame_bytes: config.max_frame_bytes,
            max_control_frame_bytes: FrameLimits::DEFAULT.max_control_frame_bytes,
        };
        let batch_limits = BatchLimits {
            max_encoded_bytes: config.max_frame_bytes as usize,
            max_series: config.max_series_per_batch as usize,
            max_readings: config.max_readings_per_batch as usize,
            max_summaries: config.max_summaries_per_batch as usize,
            ..BatchLimits::default()
        };
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(config.max_in_flight_batches_total)),
            config,
            tokens,
            log,
            dedup,
            metrics,
            fleet,
            agents: Mutex::new(HashMap::new()),
            frame_limits,
            batch_limits,
            next_connection_id: AtomicU64::new(1),
            stopping: CancellationToken::new(),
            killed: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let accept_task = tokio::spawn(accept_loop(shared.clone(), endpoint.clone()));
        tracing::info!(%local_address, "ingest listening");
        Ok(IngestServer {
            shared,
            endpoint,
            local_address,
            accept_task,
        })
    }

    /// The address the server listens on (useful with port 0).
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    pub fn metrics(&self) -> Arc<IngestMetrics> {
        self.shared.metrics.clone()
    }

    pub fn fleet(&self) -> FleetView {
        self.shared.fleet.clone()
    }

    /// Graceful shutdown: stop accepting connections and streams, give in-flight
    /// batches `drain_timeout_ms` to become durable and be acked, close every
    /// connection with [`CLOSE_SHUTTING_DOWN`], and flush the duplicate state.
    pub async fn shutdown(self) {
        self.shared.stopping.cancel();
        self.shared.tracker.close();
        let drain = Duration::from_millis(self.shared.config.drain_timeout_ms);
        if tokio::time::timeout(drain, self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                drain_timeout_ms = self.shared.config.drain_timeout_ms,
                "in-flight batches did not finish in time; their agents will resend"
            );
            self.shared.killed.cancel();
        }
        self.endpoint.close(
            VarInt::from_u32(CLOSE_SHUTTING_DOWN),
            b"collector shutting down",
        );
        let _ = self.accept_task.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        if let Err(error) = self.shared.dedup.flush() {
            tracing::warn!(%error, "flushing duplicate-detection state failed");
        }
    }

    /// Stops at once, dropping in-flight work without acks, as a crash would (the
    /// process keeps running). For tests of agent recovery.
    pub async fn kill(self) {
        self.shared.killed.cancel();
        self.shared.stopping.cancel();
        self.endpoint
            .close(VarInt::from_u32(CLOSE_SHUTTING_DOWN), b"collector killed");
        self.shared.tracker.close();
        let _ = self.accept_task.await;
        self.shared.tracker.wait().await;
        self.endpoint.wait_idle().await;
    }
}

fn quic_server_config(
    config: &IngestConfig,
    identity: &TlsIdentity,
) -> Result<quinn::ServerConfig, IngestError> {
    let tls = identity.rustls_server_config()?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|error| IngestError::QuicConfig(error.to_string()))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // One extra stream for the control stream that carries the hello.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(
        config.max_in_flight_batches_per_agent.saturating_add(1),
    ));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    transport.keep_alive_interval(Some(Duration::from_millis(config.keep_alive_interval_ms)));
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms))
        .map_err(|error| IngestError::QuicConfig(format!("ingest.idle_timeout_ms: {error}")))?;
    transport.max_idle_timeout(Some(idle));
    server_config.transport_config(Arc::new(transport));
    Ok(server_config)
}

async fn accept_loop<L: DurableLog>(shared: Arc<Shared<L>>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shared.stopping.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let task_shared = shared.clone();
        shared.tracker.spawn(async move {
            let killed = task_shared.killed.clone();
            tokio::select! {
                _ = handle_connection(task_shared, incoming) => {}
                _ = killed.cancelled() => {}
            }
        });
    }
}

async fn handle_connection<L: DurableLog>(shared: Arc<Shared<L>>, incoming: quinn::Incoming) {
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%error, "QUIC handshake failed");
            return;
        }
    };
    shared
        .metrics
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    let remote_address = connection.remote_address();
    let hello_timeout = Duration::from_millis(shared.config.hello_timeout_ms);
    let session = match tokio::time::timeout(hello_timeout, run_hello(&shared, &connection)).await {
        Ok(Some(session)) => session,
        Ok(None) => return,
        Err(_) => {
            connection.close(
                VarInt::from_u32(CLOSE_HELLO_TIMEOUT),
                b"no hello within the hello timeout",
            );
            return;
        }
    };
    let session = Arc::new(session);
    shared
        .metrics
        .connected_agents
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(agent_id = %session.agent_id, %remote_address, "agent connected");
    let close_reason = serve_batches(&shared, &session).await;
    shared
        .metrics
        .connected_agents
        .fetch_sub(1, Ordering::Relaxed);
    let connection_id = {
        let mut current = session
            .agent
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match current.as_ref() {
            Some((id, live)) if live.stable_id() == connection.stable_id() => {
                let id = *id;
                *current = None;
                Some(id)
            }
            _ => None,
        }
    };
    if connection_id.is_some() {
        shared.fleet.on_disconnect(&session.agent_id, now_ms());
    }
    tracing::info!(agent_id = %session.agent_id, reason = %close_reason, "agent session ended");
}

/// Reads the hello on the first stream and answers it. `None` when the connection
/// was rejected or closed.
async fn run_hello<L: DurableLog>(
    shared: &Arc<Shared<L>>,
    connection: &Connection,
) -> Option<Session> {
    let (mut send, mut recv) = connection.accept_bi().await.ok()?;
    let mut reader = StreamFrameReader::new(HELLO_FRAME_LIMITS);
    let mut progress = ReadProgress::NeedMore;
    let decision = loop {
        let stopping = shared.stopping.is_cancelled();
        let decision = decide_hello(progress, stopping, |hello| {
            shared
                .tokens
                .verify(&hello.agent_id, &hello.token)
                .map_err(|failure| {
                    tracing::warn!(agent_id = %hello.agent_id, remote_address = %connection.remote_address(), ?failure, "hello refused");
                    failure.message(&hello.agent_id)
                })
        });
        if let Some(decision) = decision {
            break decision;
        }
        progress = match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => reader.feed(&chunk.bytes),
            Ok(None) => reader.finish(),
            Err(error) => {
                tracing::debug!(%error, "connection ended before its hello");
                return None;
            }
        };
    };
    let hello = match decision {
        HelloDecision::Accept(hello) => hello,
        HelloDecision::Reject(refusal) => {
            reject(shared, connection, &mut send, refusal).await;
            return None;
        }
        HelloDecision::Violation(problem) => {
            protocol_violation(shared, connection, &problem);
            return None;
        }
        HelloDecision::Abandon => {
            tracing::debug!("connection ended before its hello");
            return None;
        }
    };
    let agent = agent_entry(shared, &hello.agent_id);
    let connection_id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
    let superseded = agent
        .connection
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .replace((connection_id, connection.clone()));
    if let Some((_, old)) = superseded {
        // The agent reconnected (new address, or it noticed a dead link before we did):
        // the newer connection wins, the old one's in-flight batches will be resent.
        old.close(
            VarInt::from_u32(CLOSE_SUPERSEDED),
            b"a newer connection of this agent replaced this one",
        );
    }
    // The hello decoded, so the versions overlap (`Message::decode` refuses older agents).
    let session_version = negotiate_version(
        hello.protocol_version,
        MIN_PROTOCOL_VERSION,
        shared.config.offered_protocol_version(),
    )
    .unwrap_or(MIN_PROTOCOL_VERSION);
    let welcome = Welcome {
        session_id: connection_id,
        protocol_version: session_version,
        server_time_ms: now_ms(),
        limits: ServerLimits {
            max_frame_bytes: shared.config.max_frame_bytes,
            max_series_per_batch: shared.config.max_series_per_batch,
            max_readings_per_batch: shared.config.max_readings_per_batch,
            max_in_flight_batches: shared.config.max_in_flight_batches_per_agent,
        },
    };
    let bytes = Message::Welcome(welcome)
        .encode_to_vec(&FrameLimits::DEFAULT)
        .ok()?;
    send.write_all(&bytes).await.ok()?;
    let _ = send.finish();
    record_hello(shared, connection, &hello);
    Some(Session {
        agent_id: hello.agent_id,
        protocol_version: session_version,
        agent,
        dictionary: Mutex::new(ReceiverSessionDictionary::new(
            shared.config.max_series_per_session,
        )),
        connection: connection.clone(),
        stopping: shared.stopping.clone(),
    })
}

fn record_hello<L: DurableLog>(shared: &Arc<Shared<L>>, connection: &Connection, hello: &Hello) {
    shared.fleet.on_hello(
        &hello.agent_id,
        &hello.agent_version,
        connection.remote_address(),
        hello.backlog,
        now_ms(),
    );
}

fn agent_entry<L: DurableLog>(shared: &Arc<Shared<L>>, agent_id: &str) -> Arc<AgentEntry> {
    let mut agents = shared
        .agents
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    agents
        .entry(agent_id.to_owned())
        .or_insert_with(|| {
            Arc::new(AgentEntry {
                dedup: Mutex::new(AgentSequences {
                    window: shared.dedup.load(agent_id),
                    in_progress: HashSet::new(),
                }),
                rate: shared
                    .config
                    .max_bytes_per_second_per_agent
                    .map(|rate| Mutex::new(TokenBucket::new(rate))),
                connection: Mutex::new(None),
            })
        })
        .clone()
}

async fn reject<L: DurableLog>(
    shared: &Arc<Shared<L>>,
    connection: &Connection,
    send: &mut SendStream,
    reject: Reject,
) {
    shared
        .metrics
        .hellos_rejected
        .fetch_add(1, Ordering::Relaxed);
    if let Ok(bytes) = Message::Reject(reject.clone()).encode_to_vec(&FrameLimits::DEFAULT) {
        if send.write_all(&bytes).await.is_ok() && send.finish().is_ok() {
            // Give the reject a moment to arrive before the close overtakes it; the
            // agent closes the connection itself once it has read it.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        }
    }
    connection.close(VarInt::from_u32(CLOSE_REJECTED), reject.message.as_bytes());
}

fn protocol_violation<L: DurableLog>(
    shared: &Arc<Shared<L>>,
    connection: &Connection,
    problem: &str,
) {
    shared
        .metrics
        .protocol_violations
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(remote_address = %connection.remote_address(), problem, "closing connection for a protocol violation");
    let mut reason = problem.as_bytes().to_vec();
    reason.truncate(512);
    connection.close(VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION), &reason);
}

/// Accepts batch streams until the connection ends or the server stops. Returns why.
async fn serve_batches<L: DurableLog>(shared: &Arc<Shared<L>>, session: &Arc<Session>) -> String {
    loop {
        let accepted = tokio::select! {
            accepted = session.connection.accept_bi() => accepted,
            _ = shared.stopping.cancelled() => return "collector stopping".to_owned(),
        };
        let (send, recv) = match accepted {
            Ok(streams) => streams,
            Err(error) => return error.to_string(),
        };
        let permit = match shared.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let started = Instant::now();
                let permit = tokio::select! {
                    permit = shared.slots.clone().acquire_owned() => permit,
                    _ = shared.stopping.cancelled() => return "collector stopping".to_owned(),
                };
                shared
                    .metrics
                    .backpressure_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                match permit {
                    Ok(permit) => permit,
                    Err(_) => return "collector stopping".to_owned(),
                }
            }
        };
        let task_shared = shared.clone();
        let task_session = session.clone();
        shared.tracker.spawn(async move {
            let killed = task_shared.killed.clone();
            task_shared
                .metrics
                .batches_in_flight
                .fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = handle_batch_stream(&task_shared, &task_session, send, recv) => {}
                _ = killed.cancelled() => {}
            }
            task_shared
                .metrics
                .batches_in_flight
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// What became of one batch stream.
enum Outcome {
    Ack(u64),
    Nack(Nack),
}

/// Reads until [`decide_batch_stream`] decides; `None` when the stream was abandoned
/// (reset, connection lost, or no whole frame within the batch read timeout).
async fn read_batch_stream(recv: &mut RecvStream, limits: FrameLimits) -> Option<StreamDecision> {
    let mut reader = StreamFrameReader::new(limits);
    loop {
        let progress = match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => reader.feed(&chunk.bytes),
            Ok(None) => reader.finish(),
            Err(error) => {
                tracing::debug!(%error, "reading a batch stream failed");
                return None;
            }
        };
        if let Some(decision) = decide_batch_stream(progress) {
            return Some(decision);
        }
    }
}

async fn handle_batch_stream<L: DurableLog>(
    shared: &Arc<Shared<L>>,
    session: &Arc<Session>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let timeout = Duration::from_millis(shared.config.batch_read_timeout_ms);
    let decision = tokio::time::timeout(timeout, read_batch_stream(&mut recv, shared.frame_limits))
        .await
        .unwrap_or(None);
    // Whatever follows the frame is not read: one frame per stream.
    let _ = recv.stop(VarInt::from_u32(0));
    match decision {
        Some(StreamDecision::Batch(payload)) => {
            let outcome = process_batch(shared, session, Bytes::from(payload)).await;
            respond(shared, session, &mut send, outcome).await;
        }
        Some(StreamDecision::Nack(nack)) => {
            respond(shared, session, &mut send, Outcome::Nack(nack)).await;
        }
        Some(StreamDecision::Violation(problem)) => {
            protocol_violation(shared, &session.connection, &problem);
        }
        None => {
            tracing::debug!(agent_id = %session.agent_id, "batch stream abandoned");
        }
    }
}

async fn respond<L: DurableLog>(
    shared: &Arc<Shared<L>>,
    session: &Arc<Session>,
    send: &mut SendStream,
    outcome: Outcome,
) {
    let message = match outcome {
        Outcome::Ack(batch_seq) => {
            shared.metrics.acks.fetch_add(1, Ordering::Relaxed);
            Message::Ack(Ack { batch_seq })
        }
        Outcome::Nack(nack) => {
            shared.metrics.count_nack(nack.reason);
            tracing::debug!(agent_id = %session.agent_id, batch_seq = nack.batch_seq, reason = ?nack.reason, message = %nack.message, "batch nacked");
            Message::Nack(nack)
        }
    };
    if let Ok(bytes) = message.encode_to_vec(&FrameLimits::DEFAULT) {
        if send.write_all(&bytes).await.is_ok() && send.finish().is_ok() {
            // Wait (bounded) until the agent has the answer: a graceful shutdown waits
            // for this task, and closing the connection earlier would drop an ack
            // still in flight (the agent would resend a batch that is durable).
            let _ = tokio::time::timeout(ANSWER_DELIVERY_TIMEOUT, send.stopped()).await;
        }
    }
}

async fn process_batch<L: DurableLog>(
    shared: &Arc<Shared<L>>,
    session: &Arc<Session>,
    bytes: Bytes,
) -> Outcome {
    shared.metrics.batches_in.fetch_add(1, Ordering::Relaxed);
    shared
        .metrics
        .bytes_in
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    if let Some(rate) = &session.agent.rate {
        let wait_ms = rate
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take(bytes.len() as u64, now_ms());
        if wait_ms > 0 {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
    }
    let batch_seq = match admit_batch(&bytes, &session.agent_id, &shared.batch_limits) {
        Ok(batch_seq) => batch_seq,
        Err(nack) => return Outcome::Nack(nack),
    };
    {
        let mut sequences = session
            .agent
            .dedup
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if sequences.window.is_duplicate(batch_seq) {
            drop(sequences);
            shared.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
            shared.fleet.on_batch(
                &session.agent_id,
                batch_seq,
                0,
                true,
                session.connection.remote_address(),
                now_ms(),
            );
            return Outcome::Ack(batch_seq);
        }
        if !sequences.in_progress.insert(batch_seq) {
            return Outcome::Nack(Nack::new(
                batch_seq,
                NackReason::Overloaded,
                true,
                format!("batch {batch_seq} is being written from another stream; retry shortly"),
            ));
        }
    }
    let outcome = write_batch(shared, session, batch_seq, bytes).await;
    let mut sequences = session
        .agent
        .dedup
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    sequences.in_progress.remove(&batch_seq);
    if let Outcome::Ack(_) = outcome {
        sequences.window.record_acked(batch_seq);
        if let Err(error) = shared.dedup.save(&session.agent_id, &sequences.window) {
            tracing::warn!(%error, "duplicate detection state not persisted; a resend would be written again");
        }
    }
    outcome
}

/// Decodes, resolves and durably writes one batch that is not a known duplicate.
async fn write_batch<L: DurableLog>(
    shared: &Arc<Shared<L>>,
    session: &Arc<Session>,
    batch_seq: u64,
    bytes: Bytes,
) -> Outcome {
    let prepared = match prepare_batch(&bytes, batch_seq, &session.dictionary, &shared.batch_limits)
    {
        Ok(prepared) => prepared,
        Err(nack) => return Outcome::Nack(nack),
    };
    if let Some(newest_ms) = prepared.newest_reading_ms {
        let age_ms = now_ms().saturating_sub(newest_ms).max(0);
        shared
            .metrics
            .reading_age_at_receipt_seconds
            .observe_seconds(age_ms as f64 / 1e3);
    }
    let record = AppendRecord {
        headers: RecordHeaders {
            agent_id: session.agent_id.clone(),
            batch_seq,
            protocol_version: session.protocol_version,
        },
        value: Bytes::from(prepared.record_value),
    };
    let started = Instant::now();
    let appended = shared.log.append(record).await;
    shared
        .metrics
        .log_write_seconds
        .observe_seconds(started.elapsed().as_secs_f64());
    match appended {
        Ok(_) => {
            shared
                .metrics
                .readings_in
                .fetch_add(prepared.readings, Ordering::Relaxed);
            shared
                .metrics
                .summaries_in
                .fetch_add(prepared.summaries, Ordering::Relaxed);
            shared.fleet.on_batch(
                &session.agent_id,
                batch_seq,
                prepared.readings,
                false,
                session.connection.remote_address(),
                now_ms(),
            );
            Outcome::Ack(batch_seq)
        }
        Err(error) => Outcome::Nack(log_nack(batch_seq, &error)),
    }
}

fn log_nack(batch_seq: u64, error: &LogError) -> Nack {
    let (reason, retryable) = if error.is_retryable() {
        (NackReason::StorageUnavailable, true)
    } else {
        (NackReason::TooLarge, false)
    };
    Nack::new(
        batch_seq,
        reason,
        retryable,
        format!("batch {batch_seq} was not stored: {error}"),
    )
}
