//! The QUIC shell of the shipper: connect, hello, then keep the disk buffer draining.
//!
//! Scheduling per session, in this order whenever a slot is free:
//! 1. retries that are due (nacked or failed batches, with backoff);
//! 2. live batches: those appended since the session started, in order;
//! 3. the backlog (what was buffered when the session started), oldest first,
//!    optionally capped in bytes/s.
//!
//! So after an outage the newest data goes out at once while the backlog drains in
//! parallel in the remaining slots. Both kinds are read through cursors that only move
//! forward, so picking the next batch costs one buffer lookup however many batches are
//! in flight. A batch leaves the buffer only on an ack (or a
//! non-retryable nack, see below). All decisions are made by the sans-IO
//! [`super::state`] machines; this file moves bytes and reads clocks.
//!
//! Series definitions: the agent buffers batches without them (the series registry in the
//! agent's state database holds every key durably). Before a batch goes out, the shipper
//! reads which series ids it uses (`BatchDecoder::series_usage`: the run column, not the
//! readings) and attaches the definitions this session has not confirmed, from the batch
//! itself (batches buffered by older builds carry theirs) or from the registry.
//!
//! Dead letters: a non-retryable nack means the collector can never accept these
//! bytes (they do not decode, or are over its limits). Keeping them would resend them
//! on every reconnect forever and hold buffer space, so the shipper removes them from
//! the buffer, counts them (`dead_lettered`) and logs the collector's reason at error
//! level. `tributary-agent buffer verify` is the tool to look for local corruption.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, VarInt};
use ring::rand::SecureRandom;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tributary_protocol::batch::{
    batch_format_version, format_version_for_protocol, replace_series_definitions,
    series_definitions_bytes, transcode_batch, BatchDecoder, SenderSessionDictionary,
};
use tributary_protocol::close::{CLOSE_NORMAL, CLOSE_PROTOCOL_VIOLATION};
use tributary_protocol::frame::{frame_header, Frame, FrameDecoder, FrameKind, FrameLimits};
use tributary_protocol::session::{
    speaks_version, Backlog, Hello, Message, Nack, NackReason, Welcome, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use tributary_protocol::{BatchLimits, SeriesDef, SeriesId};

use super::config::ShipConfig;
use super::error::ShipError;
use super::state::{Backoff, DrainRate, InFlightBook, NackAction, ReconnectSchedule, SendPlan};
use super::tls::{client_config, PinnedCertVerifier};
use crate::aggregate::RegistryReader;
use crate::buffer::{DiskBuffer, ReplayOrder, StoredBatch};

/// Buffered batches created this recently when a session starts are sent as live data,
/// ahead of the backlog (see `Shipper::live_boundary`).
pub const LIVE_WINDOW_MS: i64 = 5_000;

/// Counters of the shipper, for metrics and tests.
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Sessions established (welcome received).
    pub sessions: AtomicU64,
    /// Sessions established after the first: how often the link was re-established.
    pub reconnects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub batches_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// `bytes_sent` split: raw batches and summary batches without their series
    /// definitions, and the definitions (the session dictionary) apart.
    pub raw_bytes_sent: AtomicU64,
    pub summary_bytes_sent: AtomicU64,
    pub definition_bytes_sent: AtomicU64,
    pub batches_acked: AtomicU64,
    pub nacks_retryable: AtomicU64,
    /// Batches the collector refused for good; removed from the buffer.
    pub dead_lettered: AtomicU64,
    /// Streams that ended without an answer (timeout, reset, lost connection).
    pub stream_failures: AtomicU64,
    pub connected: AtomicBool,
    /// Latest QUIC round-trip estimate.
    pub rtt_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ShipStats {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_last_error(&self, error: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error);
    }

    fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }
}

struct HandleInner {
    wake: Notify,
    stop: CancellationToken,
    stats: Arc<ShipStats>,
    endpoint: quinn::Endpoint,
}

/// Controls a running [`Shipper`] from elsewhere (the agent's run loop, tests).
#[derive(Clone)]
pub struct ShipperHandle {
    inner: Arc<HandleInner>,
}

impl ShipperHandle {
    /// New batches are in the buffer: look now instead of at the next poll.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Ends [`Shipper::run`]: the connection is closed, unacked batches stay buffered.
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }

    pub fn stats(&self) -> &Arc<ShipStats> {
        &self.inner.stats
    }

    /// The local UDP address in use.
    pub fn local_address(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Moves the endpoint to another UDP socket, as a gateway changing networks
    /// does; the QUIC session migrates instead of reconnecting.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        self.inner.endpoint.rebind(socket)
    }
}

/// Ships batches from a [`DiskBuffer`] to a collector until stopped.
pub struct Shipper {
    config: ShipConfig,
    buffer: DiskBuffer,
    client_config: quinn::ClientConfig,
    pinned: Option<Arc<PinnedCertVerifier>>,
    handle: ShipperHandle,
    clock: Instant,
    random: SmallRandom,
    /// Where definitions missing from a buffered batch come from.
    registry: Option<RegistryReader>,
    decoder: BatchDecoder,
}

/// Why a session ended.
enum SessionEnd {
    Stopped,
    Lost(String),
}

impl Shipper {
    /// Validates the config and binds the UDP endpoint. Must run inside a tokio runtime.
    pub fn new(config: ShipConfig, buffer: DiskBuffer) -> Result<Self, ShipError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(ShipError::Config(problems.join("; ")));
        }
        let (tls, pinned) = client_config(
            config.server_fingerprint_sha256.as_deref(),
            config.ca_file.as_deref(),
        )?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|error| ShipError::Tls(error.to_string()))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_millis(config.keep_alive_interval_ms)));
        let idle = quinn::IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms))
            .map_err(|error| ShipError::Config(format!("ship.idle_timeout_ms: {error}")))?;
        transport.max_idle_timeout(Some(idle));
        transport.max_concurrent_uni_streams(VarInt::from_u32(0));
        transport.max_concurrent_bidi_streams(VarInt::from_u32(0));
        client_config.transport_config(Arc::new(transport));
        let endpoint =
            quinn::Endpoint::client(config.bind_address).map_err(|source| ShipError::Endpoint {
                address: config.bind_address,
                source,
            })?;
        let handle = ShipperHandle {
            inner: Arc::new(HandleInner {
                wake: Notify::new(),
                stop: CancellationToken::new(),
                stats: Arc::new(ShipStats::default()),
                endpoint,
            }),
        };
        Ok(Shipper {
            config,
            buffer,
            client_config,
            pinned,
            handle,
            clock: Instant::now(),
            random: SmallRandom::seeded(),
            registry: None,
            decoder: BatchDecoder::new(),
        })
    }

    /// The agent's series registry, for batches buffered without their definitions
    /// (without it, batches go out with the definitions they carry, if any).
    pub fn set_registry(&mut self, registry: RegistryReader) {
        self.registry = Some(registry);
    }

    pub fn handle(&self) -> ShipperHandle {
        self.handle.clone()
    }

    /// Milliseconds on the shipper's monotonic clock (for the state machines).
    fn now_ms(&self) -> i64 {
        self.clock.elapsed().as_millis() as i64
    }

    /// Connects, ships, reconnects with backoff, until [`ShipperHandle::stop`]. Returns
    /// an error only when retrying cannot help (bad token, unknown agent, fingerprint
    /// mismatch, unsupported protocol version): an operator must act.
    pub async fn run(mut self) -> Result<(), ShipError> {
        let mut schedule = ReconnectSchedule::new(Backoff {
            min_ms: self.config.reconnect_min_ms,
            max_ms: self.config.reconnect_max_ms,
        });
        let stop = self.handle.inner.stop.clone();
        loop {
            if stop.is_cancelled() {
                break;
            }
            let now_ms = self.now_ms();
            if !schedule.may_connect(now_ms) {
                let wait = Duration::from_millis(
                    schedule.next_attempt_ms().saturating_sub(now_ms).max(0) as u64,
                );
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let attempt = tokio::select! {
                _ = stop.cancelled() => break,
                attempt = self.connect_session() => attempt,
            };
            match attempt {
                Ok((connection, welcome)) => {
                    schedule.on_connected();
                    let stats = self.handle.inner.stats.clone();
                    if stats.sessions.fetch_add(1, Ordering::Relaxed) > 0 {
                        ShipStats::add(&stats.reconnects, 1);
                    }
                    stats.connected.store(true, Ordering::Relaxed);
                    tracing::info!(collector = %connection.remote_address(), session_id = welcome.session_id, "shipping session established");
                    let end = self.run_session(&connection, &welcome).await;
                    stats.connected.store(false, Ordering::Relaxed);
                    match end {
                        SessionEnd::Stopped => {
                            connection.close(VarInt::from_u32(CLOSE_NORMAL), b"agent stopping");
                            break;
                        }
                        SessionEnd::Lost(reason) => {
                            tracing::warn!(%reason, "shipping session lost; reconnecting");
                            stats.set_last_error(reason);
                            let jitter = self.random.unit();
                            schedule.on_failure(self.now_ms(), jitter, 0);
                        }
                    }
                }
                Err(error) if error.is_fatal() => {
                    tracing::error!(%error, "shipping stopped");
                    self.handle.inner.stats.set_last_error(error.to_string());
                    return Err(error);
                }
                Err(error) => {
                    let at_least_ms = match &error {
                        ShipError::Rejected { retry_after_ms, .. } => {
                            retry_after_ms.map_or(0, u64::from)
                        }
                        _ => 0,
                    };
                    ShipStats::add(&self.handle.inner.stats.connect_failures, 1);
                    self.handle.inner.stats.set_last_error(error.to_string());
                    let jitter = self.random.unit();
                    let delay_ms = schedule.on_failure(self.now_ms(), jitter, at_least_ms);
                    tracing::warn!(%error, delay_ms, "cannot reach the collector; retrying");
                }
            }
        }
        self.handle
            .inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_NORMAL), b"agent stopping");
        Ok(())
    }

    async fn connect_session(&self) -> Result<(Connection, Welcome), ShipError> {
        let address_text = &self.config.collector_address;
        let address = tokio::net::lookup_host(address_text.as_str())
            .await
            .map_err(|error| ShipError::Resolve {
                address: address_text.clone(),
                reason: error.to_string(),
            })?
            .next()
            .ok_or_else(|| ShipError::Resolve {
                address: address_text.clone(),
                reason: "no addresses".to_owned(),
            })?;
        let connect_error = |reason: String| ShipError::Connect {
            address: address.to_string(),
            reason,
        };
        let connecting = self
            .handle
            .inner
            .endpoint
            .connect_with(
                self.client_config.clone(),
                address,
                &self.config.server_name,
            )
            .map_err(|error| connect_error(error.to_string()))?;
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let connection = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                if let Some(presented) = self
                    .pinned
                    .as_ref()
                    .and_then(|pinned| pinned.take_mismatch())
                {
                    return Err(ShipError::FingerprintMismatch {
                        address: address.to_string(),
                        presented,
                        pinned: self
                            .config
                            .server_fingerprint_sha256
                            .clone()
                            .unwrap_or_default(),
                    });
                }
                return Err(connect_error(error.to_string()));
            }
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {} ms",
                    self.config.connect_timeout_ms
                )))
            }
        };
        match tokio::time::timeout(timeout, self.hello(&connection)).await {
            Ok(Ok(welcome)) => Ok((connection, welcome)),
            Ok(Err(error)) => {
                connection.close(VarInt::from_u32(CLOSE_NORMAL), b"handshake failed");
                Err(error)
            }
            Err(_) => {
                connection.close(VarInt::from_u32(CLOSE_NORMAL), b"handshake timed out");
                Err(ShipError::Handshake(format!(
                    "no welcome within {} ms",
                    self.config.connect_timeout_ms
                )))
            }
        }
    }

    async fn hello(&self, connection: &Connection) -> Result<Welcome, ShipError> {
        let handshake =
            |what: &str, error: String| ShipError::Handshake(format!("{what}: {error}"));
        let stats = self.buffer.stats(0);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: self.config.agent_id.clone(),
            token: self.config.token.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            backlog: Backlog {
                batches: stats.batches_buffered,
                bytes: stats.bytes_used,
                oldest_unsent_time_ms: None,
            },
        };
        let bytes = Message::Hello(hello)
            .encode_to_vec(&FrameLimits::DEFAULT)
            .map_err(|error| ShipError::Config(error.to_string()))?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|error| handshake("opening the control stream", error.to_string()))?;
        send.write_all(&bytes)
            .await
            .map_err(|error| handshake("sending the hello", error.to_string()))?;
        let _ = send.finish();
        let frame = read_control_frame(&mut recv).await.map_err(|error| {
            // A reject is followed by a close that may overtake the stream data.
            match connection.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                    ShipError::Handshake(format!(
                        "the collector closed the connection: {}",
                        String::from_utf8_lossy(&close.reason)
                    ))
                }
                _ => handshake("reading the answer to the hello", error),
            }
        })?;
        match Message::decode(frame.as_ref()) {
            Ok(Message::Welcome(welcome)) if !speaks_version(welcome.protocol_version) => {
                connection.close(
                    VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION),
                    b"welcome names a protocol version this agent does not speak",
                );
                Err(ShipError::Handshake(format!(
                    "the collector chose protocol version {}, but this agent speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}; upgrade the collector or the agent",
                    welcome.protocol_version
                )))
            }
            Ok(Message::Welcome(welcome)) => Ok(welcome),
            Ok(Message::Reject(reject)) => {
                connection.close(VarInt::from_u32(CLOSE_NORMAL), b"rejected");
                Err(ShipError::Rejected {
                    agent_id: self.config.agent_id.clone(),
                    reason: reject.reason,
                    message: reject.message,
                    retry_after_ms: reject.retry_after_ms,
                })
            }
            Ok(other) => {
                connection.close(
                    VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION),
                    b"expected welcome or reject",
                );
                Err(ShipError::Handshake(format!(
                    "the collector answered the hello with a {} frame",
                    other.kind()
                )))
            }
            Err(error) => Err(handshake(
                "decoding the answer to the hello",
                error.to_string(),
            )),
        }
    }

    async fn run_session(&mut self, connection: &Connection, welcome: &Welcome) -> SessionEnd {
        let max_in_flight = self
            .config
            .max_in_flight_batches
            .min(welcome.limits.max_in_flight_batches.max(1)) as usize;
        let mut session = SessionState {
            batch_format_version: format_version_for_protocol(welcome.protocol_version),
            book: InFlightBook::new(
                max_in_flight,
                Backoff {
                    min_ms: self.config.retry_min_ms,
                    max_ms: self.config.retry_max_ms,
                },
            ),
            dictionary: SenderSessionDictionary::new(),
            // Batches carry wall-clock creation times (the shipper's own clock is monotonic).
            live_boundary: self.live_boundary(crate::run::now_ms()),
            live_cursor: None,
            backlog_cursor: None,
            backlog_done: false,
            drain: DrainRate::new(self.config.backlog_max_bytes_per_second),
            frame_limits: FrameLimits {
                max_frame_bytes: welcome.limits.max_frame_bytes,
                ..FrameLimits::DEFAULT
            },
            reported_bad: HashSet::new(),
        };
        let mut tasks: JoinSet<(u64, Vec<SeriesId>, Result<Message, String>)> = JoinSet::new();
        let poll = Duration::from_millis(self.config.poll_interval_ms.max(1));
        let inner = self.handle.inner.clone();
        loop {
            let wake_at = self.fill_slots(connection, &mut session, &mut tasks);
            let sleep = match wake_at {
                Some(at_ms) => Duration::from_millis(
                    at_ms
                        .saturating_sub(self.now_ms())
                        .clamp(1, poll.as_millis() as i64) as u64,
                ),
                None => poll,
            };
            inner
                .stats
                .rtt_ms
                .store(connection.rtt().as_millis() as u64, Ordering::Relaxed);
            tokio::select! {
                biased;
                _ = inner.stop.cancelled() => return SessionEnd::Stopped,
                // Answers before the close: acks that arrived are not thrown away.
                Some(joined) = tasks.join_next() => {
                    if let Ok((batch_seq, defined, result)) = joined {
                        self.on_answer(&mut session, batch_seq, defined, result);
                    }
                }
                reason = connection.closed() => {
                    tasks.abort_all();
                    return SessionEnd::Lost(reason.to_string());
                }
                _ = inner.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Starts sends while slots are free. Returns when the shipper should look again
    /// even if nothing happens (a retry or the drain cap comes due).
    fn fill_slots(
        &mut self,
        connection: &Connection,
        session: &mut SessionState,
        tasks: &mut JoinSet<(u64, Vec<SeriesId>, Result<Message, String>)>,
    ) -> Option<i64> {
        let mut wake_at = None;
        while session.book.has_free_slot() {
            let now_ms = self.now_ms();
            if let Some(batch_seq) = session.book.next_due(now_ms) {
                match self.fetch(batch_seq) {
                    Some(stored) => {
                        let plan = session.book.start(batch_seq);
                        self.spawn_send(connection, session, tasks, stored, plan);
                    }
                    None => session.book.forget(batch_seq),
                }
                continue;
            }
            if let Some(stored) = self.next_live(session) {
                let plan = session.book.start(stored.batch_seq);
                self.spawn_send(connection, session, tasks, stored, plan);
                continue;
            }
            if session.backlog_done {
                break;
            }
            if let Some(until_ms) = session.drain.blocked_until(now_ms) {
                wake_at = Some(until_ms);
                break;
            }
            match self.next_backlog(session) {
                Some(stored) => {
                    session.drain.spend(stored.payload.len() as u64, now_ms);
                    let plan = session.book.start(stored.batch_seq);
                    self.spawn_send(connection, session, tasks, stored, plan);
                }
                None => session.backlog_done = true,
            }
        }
        match (wake_at, session.book.next_due_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Where live data starts for a new session: every batch appended from now on, and
    /// the newest buffered batches created within [`LIVE_WINDOW_MS`]. Those were appended
    /// while the session was being set up or in the last moments of the outage; counted as
    /// backlog they waited for the whole drain (the `bench agent` drain measured a live
    /// p99 of 2.4 s, all of it batches appended just before the welcome).
    fn live_boundary(&self, now_ms: i64) -> u64 {
        let next_seq = self.buffer.next_seq();
        let mut boundary = next_seq;
        let recent_since_ms = now_ms.saturating_sub(LIVE_WINDOW_MS);
        for entry in self
            .buffer
            .replay_range(ReplayOrder::NewestFirst, None, Some(next_seq))
        {
            match entry {
                Ok(stored) if stored.header.created_ms >= recent_since_ms => {
                    boundary = stored.batch_seq;
                }
                _ => break,
            }
        }
        boundary
    }

    fn fetch(&self, batch_seq: u64) -> Option<StoredBatch> {
        self.buffer
            .replay_range(
                ReplayOrder::OldestFirst,
                batch_seq.checked_sub(1),
                batch_seq.checked_add(1),
            )
            .next()
            .and_then(Result::ok)
            .filter(|stored| stored.batch_seq == batch_seq)
    }

    fn next_live(&self, session: &mut SessionState) -> Option<StoredBatch> {
        let after = session.live_cursor.or(session.live_boundary.checked_sub(1));
        let replay = self
            .buffer
            .replay_range(ReplayOrder::OldestFirst, after, None);
        for entry in replay {
            match entry {
                Ok(stored) => {
                    session.live_cursor = Some(stored.batch_seq);
                    if !session.book.is_tracked(stored.batch_seq) {
                        return Some(stored);
                    }
                }
                Err(bad) => {
                    if let Some(batch_seq) = bad.batch_seq {
                        session.live_cursor = Some(batch_seq);
                    }
                    session.report_bad(&bad);
                }
            }
        }
        None
    }

    fn next_backlog(&self, session: &mut SessionState) -> Option<StoredBatch> {
        let replay = self.buffer.replay_range(
            ReplayOrder::OldestFirst,
            session.backlog_cursor,
            Some(session.live_boundary),
        );
        for entry in replay {
            match entry {
                Ok(stored) => {
                    session.backlog_cursor = Some(stored.batch_seq);
                    if !session.book.is_tracked(stored.batch_seq) {
                        return Some(stored);
                    }
                }
                Err(bad) => {
                    if let Some(batch_seq) = bad.batch_seq {
                        session.backlog_cursor = Some(batch_seq);
                    }
                    session.report_bad(&bad);
                }
            }
        }
        None
    }

    fn spawn_send(
        &mut self,
        connection: &Connection,
        session: &SessionState,
        tasks: &mut JoinSet<(u64, Vec<SeriesId>, Result<Message, String>)>,
        stored: StoredBatch,
        plan: SendPlan,
    ) {
        let batch_seq = stored.batch_seq;
        let (payload, defined) = with_session_definitions(
            &mut self.decoder,
            self.registry.as_ref(),
            stored.payload,
            &session.dictionary,
            plan.full_definitions,
        );
        // The session's batch format, always: a collector of an older protocol version reads
        // only the older formats, and batches buffered by an older build go out in the
        // compact one (between formats 2 and 3 only the envelope is rewritten).
        let payload = match batch_format_version(&payload) {
            Ok(version) if version != session.batch_format_version => transcode_batch(
                &payload,
                session.batch_format_version,
                &BatchLimits::default(),
            )
            .unwrap_or(payload),
            _ => payload,
        };
        let stats = self.handle.inner.stats.clone();
        ShipStats::add(&stats.batches_sent, 1);
        ShipStats::add(&stats.bytes_sent, payload.len() as u64);
        let definition_bytes =
            series_definitions_bytes(&payload, &BatchLimits::default()).unwrap_or(0);
        let class_bytes = if stored.header.class == crate::buffer::BatchClass::Summary {
            &stats.summary_bytes_sent
        } else {
            &stats.raw_bytes_sent
        };
        ShipStats::add(
            class_bytes,
            payload.len().saturating_sub(definition_bytes) as u64,
        );
        ShipStats::add(&stats.definition_bytes_sent, definition_bytes as u64);
        let connection = connection.clone();
        let frame_limits = session.frame_limits;
        let ack_timeout = Duration::from_millis(self.config.ack_timeout_ms);
        tasks.spawn(async move {
            let result = match tokio::time::timeout(
                ack_timeout,
                send_batch(&connection, &payload, &frame_limits, batch_seq),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {} ms", ack_timeout.as_millis())),
            };
            (batch_seq, defined, result)
        });
    }

    fn on_answer(
        &mut self,
        session: &mut SessionState,
        batch_seq: u64,
        defined: Vec<SeriesId>,
        result: Result<Message, String>,
    ) {
        let stats = self.handle.inner.stats.clone();
        let now_ms = self.now_ms();
        match result {
            Ok(Message::Ack(ack)) if ack.batch_seq == batch_seq => {
                session.book.on_ack(batch_seq);
                session.dictionary.confirm(defined);
                ShipStats::add(&stats.batches_acked, 1);
                if let Err(error) = self.buffer.ack(batch_seq) {
                    tracing::warn!(batch_seq, %error, "acked batch could not be removed from the buffer; it will be resent and deduplicated");
                }
            }
            Ok(Message::Nack(nack)) => {
                let jitter = self.random.unit();
                let unknown_series = nack.reason == NackReason::UnknownSeries;
                match session.book.on_nack(
                    batch_seq,
                    nack.retryable,
                    unknown_series,
                    now_ms,
                    jitter,
                ) {
                    NackAction::Retry { due_ms } => {
                        ShipStats::add(&stats.nacks_retryable, 1);
                        tracing::debug!(batch_seq, reason = ?nack.reason, message = %nack.message, retry_in_ms = due_ms - now_ms, "batch nacked; will retry");
                    }
                    NackAction::DeadLetter => {
                        ShipStats::add(&stats.dead_lettered, 1);
                        tracing::error!(batch_seq, reason = ?nack.reason, message = %nack.message, "collector refused the batch for good; dropping it from the buffer");
                        if let Err(error) = self.buffer.ack(batch_seq) {
                            tracing::warn!(batch_seq, %error, "dead-lettered batch could not be removed from the buffer");
                        }
                    }
                }
            }
            Ok(other) => {
                ShipStats::add(&stats.stream_failures, 1);
                tracing::warn!(batch_seq, kind = %other.kind(), "unexpected answer to a batch; retrying it");
                let jitter = self.random.unit();
                session.book.on_failed(batch_seq, now_ms, jitter);
            }
            Err(reason) => {
                ShipStats::add(&stats.stream_failures, 1);
                tracing::debug!(batch_seq, %reason, "batch stream failed; retrying it");
                let jitter = self.random.unit();
                session.book.on_failed(batch_seq, now_ms, jitter);
            }
        }
    }
}

struct SessionState {
    book: InFlightBook,
    /// The batch format the collector reads in this session's protocol version.
    batch_format_version: u8,
    dictionary: SenderSessionDictionary,
    /// Batches at or above this sequence were appended during this session: live.
    live_boundary: u64,
    /// Last live sequence handed out (oldest-first cursor from `live_boundary`).
    live_cursor: Option<u64>,
    /// Last backlog sequence handed out (oldest-first cursor below `live_boundary`).
    backlog_cursor: Option<u64>,
    backlog_done: bool,
    drain: DrainRate,
    frame_limits: FrameLimits,
    reported_bad: HashSet<Option<u64>>,
}

impl SessionState {
    fn report_bad(&mut self, bad: &crate::buffer::BadEntry) {
        if self.reported_bad.insert(bad.batch_seq) {
            tracing::error!(error = %bad, "skipping an unreadable buffered batch; run `tributary-agent buffer verify`");
        }
    }
}

/// Attaches the definitions this session has not confirmed (every used series' on
/// request) and nothing else. They come from the batch itself when it carries them
/// (batches buffered by older builds, or when the registry could not be flushed) and from
/// the registry otherwise. Returns the bytes to send and the ids they define. A batch
/// that does not decode goes as is: the collector's nack will say what is wrong with it.
fn with_session_definitions(
    decoder: &mut BatchDecoder,
    registry: Option<&RegistryReader>,
    payload: Vec<u8>,
    dictionary: &SenderSessionDictionary,
    full_definitions: bool,
) -> (Vec<u8>, Vec<SeriesId>) {
    let limits = BatchLimits::default();
    let Ok(usage) = decoder.series_usage(&payload, &limits) else {
        return (payload, Vec::new());
    };
    let needed: Vec<SeriesId> = usage
        .used
        .iter()
        .copied()
        .filter(|id| full_definitions || !dictionary.is_confirmed(*id))
        .collect();
    let mut carried = usage.defined;
    carried.sort_unstable_by_key(|definition| definition.id);
    if carried.len() == needed.len()
        && carried
            .iter()
            .zip(&needed)
            .all(|(definition, id)| definition.id == *id)
    {
        // Exactly what the session needs (often: nothing at all).
        return (payload, needed);
    }
    let mut definitions: Vec<SeriesDef> = Vec::with_capacity(needed.len());
    let mut unresolved = Vec::new();
    for id in &needed {
        if let Ok(index) = carried.binary_search_by_key(id, |definition| definition.id) {
            definitions.push(carried[index].clone());
            continue;
        }
        match registry.map(|registry| registry.definition(*id)) {
            Some(Ok(Some(definition))) => definitions.push(definition),
            Some(Err(error)) => {
                tracing::error!(series_id = id, %error, "cannot read a series definition");
                unresolved.push(*id);
            }
            Some(Ok(None)) | None => unresolved.push(*id),
        }
    }
    if !unresolved.is_empty() {
        // The collector nacks the batch (unknown series); it is retried with backoff.
        tracing::error!(
            unresolved = unresolved.len(),
            first = unresolved.first().copied(),
            "a buffered batch uses series the agent's registry does not know; was the state directory replaced?"
        );
    }
    let defined: Vec<SeriesId> = definitions.iter().map(|definition| definition.id).collect();
    match replace_series_definitions(&payload, &definitions, &limits) {
        Ok(rewritten) => (rewritten, defined),
        Err(_) => (
            payload,
            carried.iter().map(|definition| definition.id).collect(),
        ),
    }
}

/// One batch on its own stream: frame out, ack or nack back.
async fn send_batch(
    connection: &Connection,
    payload: &[u8],
    limits: &FrameLimits,
    batch_seq: u64,
) -> Result<Message, String> {
    let header = match frame_header(FrameKind::Batch, payload.len(), limits) {
        Ok(header) => header,
        // The collector could never take it: a local non-retryable nack.
        Err(error) => {
            return Ok(Message::Nack(Nack::new(
                batch_seq,
                NackReason::TooLarge,
                false,
                format!("not sent: {error}"),
            )))
        }
    };
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|error| format!("opening a batch stream: {error}"))?;
    let written = match send.write_all(&header).await {
        Ok(()) => send.write_all(payload).await,
        Err(error) => Err(error),
    };
    let _ = send.finish();
    // Even when the collector stopped the stream early, its answer says why.
    let frame = read_control_frame(&mut recv)
        .await
        .map_err(|read_error| match &written {
            Err(write_error) => format!("sending batch {batch_seq}: {write_error}"),
            Ok(()) => read_error,
        })?;
    Message::decode(frame.as_ref()).map_err(|error| format!("answer to batch {batch_seq}: {error}"))
}

async fn read_control_frame(recv: &mut quinn::RecvStream) -> Result<Frame, String> {
    let limits = FrameLimits {
        max_frame_bytes: FrameLimits::DEFAULT.max_control_frame_bytes,
        ..FrameLimits::DEFAULT
    };
    let mut decoder = FrameDecoder::new(limits);
    loop {
        match decoder.next_owned_frame() {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(error) => return Err(error.to_string()),
        }
        match recv.read_chunk(4096, true).await {
            Ok(Some(chunk)) => decoder.feed(&chunk.bytes),
            Ok(None) => return Err("the stream ended before an answer arrived".to_owned()),
            Err(error) => return Err(error.to_string()),
        }
    }
}

/// Jitter source: xorshift seeded once from the system's random generator. Jitter
/// needs spread across a fleet, not secrecy.
struct SmallRandom(u64);

impl SmallRandom {
    fn seeded() -> Self {
        let mut seed = [0u8; 8];
        let _ = ring::rand::SystemRandom::new().fill(&mut seed);
        SmallRandom(u64::from_le_bytes(seed) | 1)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}
