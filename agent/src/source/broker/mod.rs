//! The embedded MQTT broker: sensors publish straight into the agent.
//!
//! For gateways without a broker of their own (and the zero-service demo). It is a *sink*,
//! not a general broker: clients connect (MQTT 3.1.1 or 5.0), publish at QoS 0 or 1, ping,
//! and disconnect; SUBSCRIBE is answered with a failure code for every filter, because
//! nothing is ever forwarded to subscribers. Owning it (rather than embedding rumqttd, which
//! drags a web framework, a config loader and metrics exporters into a gateway binary) lets
//! it give sensors the guarantee subscribe mode gives a broker: **a QoS 1 PUBACK is sent
//! only once the message's readings are durable in the agent** (the journal and group
//! commit of `run.rs`), so a kill -9 of the agent loses nothing a sensor was told was
//! delivered.
//!
//! The decisions live in the sans-IO [`session::BrokerSession`] (protocol detection, CONNECT
//! and authentication, keep-alive, in-flight window, PUBACK order); this module is the thin
//! tokio shell: the TCP listener, one task per connection, the topic router, and the
//! durability signals of the pipeline. See `docs/agent-broker.md` for what is supported.
//!
//! Sessions: the broker stores no messages for clients (it sends none). The client ids that
//! asked for a persistent session are kept in the `broker_sessions` tree of the agent's
//! state database (written before the CONNACK), so their reconnects get "session present"
//! also after an agent restart: a client that had QoS 1 messages in flight without a PUBACK
//! when the agent was killed then resends them (rumqttc and most clients discard them on
//! "session present = 0", which loses them). A client id connecting again takes
//! over: the older connection is closed (MQTT requires it), its unacknowledged messages
//! stay unacknowledged and the client resends them.

pub mod redelivery;
pub mod session;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use session::{
    BrokerSession, BrokerUser, CloseReason, InboundPublish, Protocol, SessionEvent, SessionLimits,
};

use crate::aggregate::SourceIndex;
use crate::metrics::SourceMetrics;
use crate::run::{now_ms, PipelineInput};
use crate::source::TopicRouter;
use redelivery::{MessageId, RedeliveryLog};

/// How long a stopping broker waits for the durability of messages already received, so
/// their PUBACKs still go out (else the clients resend them: duplicates, not losses).
const STOP_ACK_GRACE: Duration = Duration::from_secs(2);
/// Connections beyond `max_connections` still get a "server busy" CONNACK; past this many
/// more, sockets are closed at once without reading.
const EXTRA_CONNECTIONS_ANSWERED: usize = 16;

/// Everything one broker source needs at run time (resolved from its config).
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub limits: SessionLimits,
    pub max_connections: usize,
    /// Empty: anonymous clients are accepted.
    pub users: Arc<[BrokerUser]>,
}

/// State shared by the connections of one broker.
#[derive(Debug, Default)]
struct Shared {
    connections: AtomicUsize,
    next_connection_id: AtomicU64,
    /// Client id -> (connection id, token that closes it): for session takeover.
    owners: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// Client ids that connected with a persistent session (loaded from `sessions` at start).
    persistent: Mutex<HashSet<String>>,
}

/// Where a broker remembers persistent-session client ids across restarts: a tree of the
/// agent's state database, keys `source name \0 client id`.
#[derive(Debug, Clone)]
pub struct SessionStore {
    tree: sled::Tree,
    prefix: Vec<u8>,
}

impl SessionStore {
    /// Opens the `broker_sessions` tree of `state_db` for the broker source `source_name`.
    pub fn open(state_db: &sled::Db, source_name: &str) -> sled::Result<Self> {
        let mut prefix = source_name.as_bytes().to_vec();
        prefix.push(0);
        Ok(Self {
            tree: state_db.open_tree("broker_sessions")?,
            prefix,
        })
    }

    fn key(&self, client_id: &str) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(client_id.as_bytes());
        key
    }

    /// The client ids stored for this source (unreadable entries are skipped: the worst
    /// outcome is one "session present = 0").
    fn load(&self, limit: usize) -> HashSet<String> {
        self.tree
            .scan_prefix(&self.prefix)
            .filter_map(|entry| entry.ok())
            .filter_map(|(key, _)| {
                let id = key.get(self.prefix.len()..)?;
                String::from_utf8(id.to_vec()).ok()
            })
            .take(limit)
            .collect()
    }

    /// Stores `client_id` durably; `false` if that failed (the client then gets "session
    /// present = 0" next time, as without a store).
    async fn remember(&self, client_id: &str) -> bool {
        if let Err(error) = self.tree.insert(self.key(client_id), &[]) {
            tracing::warn!(%error, client_id, "cannot store a persistent MQTT session");
            return false;
        }
        match self.tree.flush_async().await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%error, client_id, "cannot flush a persistent MQTT session");
                false
            }
        }
    }

    fn forget(&self, client_id: &str) {
        // Flushed with the next group commit; a stale entry only gives "session present".
        let _ = self.tree.remove(self.key(client_id));
    }
}

/// What every connection task of one broker uses.
struct BrokerContext {
    source: SourceIndex,
    settings: BrokerSettings,
    router: TopicRouter,
    metrics: Arc<SourceMetrics>,
    pipeline: mpsc::Sender<PipelineInput>,
    shared: Shared,
    sessions: Option<SessionStore>,
    redelivery: Option<Arc<RedeliveryLog>>,
    /// Every connection's readings containers come from here and return here once the
    /// pipeline has ingested them.
    pool: crate::source::ReadingsPool,
}

/// Binds the broker's listener (done before the run starts, so a taken port is a startup
/// error with the field to fix, not a silently idle source).
pub async fn bind(listen_address: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen_address).await
}

/// Accepts connections on `listener` until `stop` is cancelled, then lets the connections
/// finish their acknowledgements and returns. `sessions` (the agent's state database)
/// makes persistent sessions survive a restart; `None` keeps them in memory for the run.
/// With `redelivery`, a resent QoS 1 message that is already durable is acknowledged
/// without being ingested again (see [`redelivery`]).
#[allow(clippy::too_many_arguments)]
pub async fn run_broker(
    source: SourceIndex,
    listener: TcpListener,
    settings: BrokerSettings,
    router: TopicRouter,
    metrics: Arc<SourceMetrics>,
    pipeline: mpsc::Sender<PipelineInput>,
    sessions: Option<SessionStore>,
    redelivery: Option<Arc<RedeliveryLog>>,
    stop: CancellationToken,
) {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(source = %metrics.name, %address, "embedded MQTT broker listening");
    }
    let settings_max_connections = settings.max_connections;
    let context = Arc::new(BrokerContext {
        source,
        settings,
        router,
        metrics,
        pipeline,
        shared: Shared {
            persistent: Mutex::new(
                sessions
                    .as_ref()
                    .map(|store| store.load(max_persistent_sessions(settings_max_connections)))
                    .unwrap_or_default(),
            ),
            ..Shared::default()
        },
        sessions,
        redelivery,
        pool: crate::source::ReadingsPool::new(),
    });
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let active = context.shared.connections.fetch_add(1, Ordering::AcqRel);
                if active >= context.settings.max_connections + EXTRA_CONNECTIONS_ANSWERED {
                    context.shared.connections.fetch_sub(1, Ordering::AcqRel);
                    context.metrics.reject(
                        "max_connections",
                        &format!(
                            "{active} connections open; closing a new one unread (max_connections = {})",
                            context.settings.max_connections
                        ),
                    );
                    drop(stream);
                    continue;
                }
                let admitted = active < context.settings.max_connections;
                connections.spawn(serve_connection(
                    stream,
                    admitted,
                    Arc::clone(&context),
                    stop.clone(),
                ));
            }
            Err(error) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(source = %context.metrics.name, %error, "cannot accept an MQTT connection");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    drop(listener);
    let deadline = STOP_ACK_GRACE + Duration::from_secs(1);
    if tokio::time::timeout(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        connections.abort_all();
    }
}

/// A QoS 1 message awaiting durability: packet id, signal, redelivery identity.
type PendingAck = (u16, oneshot::Receiver<()>, Option<MessageId>);

/// Resolves with the oldest pending durability signal.
struct OldestDurable<'a>(&'a mut VecDeque<PendingAck>);

impl Future for OldestDurable<'_> {
    type Output = (u16, bool);

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        match self.0.front_mut() {
            Some((pkid, receiver, _)) => {
                let pkid = *pkid;
                Pin::new(receiver)
                    .poll(context)
                    .map(|result| (pkid, result.is_ok()))
            }
            None => Poll::Pending,
        }
    }
}

/// Decrements the connection count however the task ends.
struct ConnectionSlot<'a>(&'a AtomicUsize);

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve_connection(
    stream: TcpStream,
    admitted: bool,
    context: Arc<BrokerContext>,
    stop: CancellationToken,
) {
    let _slot = ConnectionSlot(&context.shared.connections);
    let _ = stream.set_nodelay(true);
    let connection_id = context
        .shared
        .next_connection_id
        .fetch_add(1, Ordering::Relaxed);
    let metrics = &context.metrics;
    let mut session = BrokerSession::new(
        context.settings.limits,
        Arc::clone(&context.settings.users),
        admitted,
        connection_id,
        now_ms(),
    );
    let (mut reader, mut writer) = stream.into_split();
    let mut pending: VecDeque<PendingAck> = VecDeque::new();
    // Acknowledged, PUBACK not yet written: their records go once it is.
    let mut acked_unwritten: Vec<MessageId> = Vec::new();
    let taken_over = CancellationToken::new();
    let mut connected = false;
    let mut stopping_deadline: Option<tokio::time::Instant> = None;
    let mut readings = context.pool.take();

    loop {
        while let Some(event) = session.poll_event(now_ms()) {
            match event {
                SessionEvent::ConnectRequest {
                    client_id,
                    clean_session,
                    protocol,
                } => {
                    let registered = register_client(
                        &context.shared,
                        &client_id,
                        clean_session,
                        connection_id,
                        &taken_over,
                        context.settings.max_connections,
                    );
                    let session_present = match (registered, &context.sessions) {
                        (Registered::Present, _) => true,
                        (Registered::New, Some(store)) => {
                            store.remember(&client_id).await;
                            false
                        }
                        (Registered::Clean, Some(store)) => {
                            store.forget(&client_id);
                            false
                        }
                        _ => false,
                    };
                    session.accept(session_present);
                    if !session_present {
                        // The client resends nothing of earlier connections.
                        if let Some(log) = &context.redelivery {
                            log.session_restarted(context.source, &client_id, connection_id);
                        }
                    }
                    connected = true;
                    metrics.connected.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(source = %metrics.name, client_id, ?protocol, clean_session, "MQTT client connected");
                }
                SessionEvent::Publish(publish) => {
                    let message = match (&context.redelivery, publish.qos) {
                        (Some(log), 1) => Some(log.message_id(
                            context.source,
                            session.client_id(),
                            connection_id,
                            publish.pkid,
                            &publish.topic,
                            &publish.payload,
                        )),
                        _ => None,
                    };
                    if let (Some(log), Some(message)) = (&context.redelivery, &message) {
                        // Resent by a resumed session (rumqttc resends with DUP = 0, so the
                        // flag is not required here) and already durable: not again.
                        if log.take_redelivery(context.source, message) {
                            tracing::debug!(source = %metrics.name, client_id = session.client_id(), pkid = publish.pkid, "redelivery of a message already durable: acknowledged, not ingested");
                            session.acknowledge(publish.pkid);
                            continue;
                        }
                    }
                    match ingest(&context, &publish, &mut readings, message.clone()).await {
                        Some(receiver) => pending.push_back((publish.pkid, receiver, message)),
                        None if publish.qos == 1 => session.acknowledge(publish.pkid),
                        None => {}
                    }
                }
            }
        }
        if let Some(bytes) = session.take_output() {
            match writer.write_all(&bytes).await {
                Ok(()) => {
                    if let Some(log) = &context.redelivery {
                        for message in acked_unwritten.drain(..) {
                            log.acknowledged(&message);
                        }
                    }
                }
                Err(error) => session.peer_gone(&format!("write failed: {error}")),
            }
        }
        if session.is_closed() {
            break;
        }
        if let Some(deadline) = stopping_deadline {
            if pending.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        let reading = session.wants_read() && stopping_deadline.is_none();
        let timeout = session.next_timeout_ms().map(|deadline_ms| {
            let wait_ms = u64::try_from(deadline_ms.saturating_sub(now_ms())).unwrap_or(0);
            tokio::time::Instant::now() + Duration::from_millis(wait_ms)
        });
        let wake = match (timeout, stopping_deadline) {
            (Some(timeout), Some(stopping)) => Some(timeout.min(stopping)),
            (timeout, stopping) => timeout.or(stopping),
        };
        let has_pending = !pending.is_empty();
        tokio::select! {
            _ = stop.cancelled(), if stopping_deadline.is_none() => {
                stopping_deadline = Some(tokio::time::Instant::now() + STOP_ACK_GRACE);
            }
            _ = taken_over.cancelled() => {
                session.close_by_server("session_taken_over", "another connection with the same client id".to_owned());
            }
            read = reader.read_buf(session.input_buffer()), if reading => match read {
                Ok(0) => session.peer_gone("closed by the client"),
                Ok(_) => {}
                Err(error) => session.peer_gone(&format!("read failed: {error}")),
            },
            (pkid, durable) = OldestDurable(&mut pending), if has_pending => {
                let message = pending.pop_front().and_then(|(_, _, message)| message);
                if durable {
                    session.acknowledge(pkid);
                    acked_unwritten.extend(message);
                } else {
                    session.close_by_server("not_durable", format!("message {pkid} could not be made durable; closing without PUBACK so the client resends it"));
                }
            }
            _ = sleep_until_option(wake), if wake.is_some() => {
                session.handle_timeout(now_ms());
            }
        }
    }
    if let Some(bytes) = session.take_output() {
        let written = tokio::time::timeout(Duration::from_secs(1), writer.write_all(&bytes)).await;
        if let (Ok(Ok(())), Some(log)) = (written, &context.redelivery) {
            for message in acked_unwritten.drain(..) {
                log.acknowledged(&message);
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
    if connected {
        metrics.connected.fetch_sub(1, Ordering::Relaxed);
        let mut owners = context
            .shared
            .owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if owners
            .get(session.client_id())
            .is_some_and(|(owner, _)| *owner == connection_id)
        {
            owners.remove(session.client_id());
        }
    }
    if let Some(close) = session.close_reason() {
        // A client that simply went away is not an error; protocol violations are counted.
        if !close.clean && close.reason != "connection_lost" {
            metrics.reject(
                close.reason,
                &format!("client `{}`: {}", session.client_id(), close.detail),
            );
        } else {
            tracing::debug!(source = %metrics.name, client_id = session.client_id(), reason = close.reason, "{}", close.detail);
        }
    }
}

async fn sleep_until_option(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How many persistent-session client ids a broker remembers.
fn max_persistent_sessions(max_connections: usize) -> usize {
    max_connections.saturating_mul(4)
}

/// What [`register_client`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registered {
    /// Clean session: any remembered session was forgotten.
    Clean,
    /// Persistent session already known: "session present".
    Present,
    /// Persistent session newly remembered (to be stored).
    New,
    /// Persistent session not remembered (the bound is reached).
    NotRemembered,
}

/// Records the client for takeover and persistent-session bookkeeping.
fn register_client(
    shared: &Shared,
    client_id: &str,
    clean_session: bool,
    connection_id: u64,
    taken_over: &CancellationToken,
    max_connections: usize,
) -> Registered {
    {
        let mut owners = shared
            .owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, previous)) =
            owners.insert(client_id.to_owned(), (connection_id, taken_over.clone()))
        {
            previous.cancel();
        }
    }
    let mut persistent = shared
        .persistent
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if clean_session {
        persistent.remove(client_id);
        Registered::Clean
    } else if persistent.contains(client_id) {
        Registered::Present
    } else if persistent.len() < max_persistent_sessions(max_connections) {
        // Bounded: beyond this many remembered ids, new ones are simply not remembered
        // (they get "session present = 0" on reconnect).
        persistent.insert(client_id.to_owned());
        Registered::New
    } else {
        Registered::NotRemembered
    }
}

/// Parses one PUBLISH and hands its readings to the pipeline. Returns the durability signal
/// to wait for before the PUBACK (QoS 1 with readings), or `None` when the message can be
/// acknowledged at once (QoS 0, or rejected: there is nothing to keep).
async fn ingest(
    context: &BrokerContext,
    publish: &InboundPublish,
    readings: &mut crate::source::ParsedReadings,
    message: Option<MessageId>,
) -> Option<oneshot::Receiver<()>> {
    let metrics = &context.metrics;
    metrics.messages_in.fetch_add(1, Ordering::Relaxed);
    let receive_ms = now_ms();
    readings.clear();
    let parsed = match std::str::from_utf8(&publish.topic) {
        Ok(topic) => context
            .router
            .parse(topic, &publish.payload, receive_ms, readings)
            .map_err(|error| (error.reason(), error.to_string())),
        Err(_) => Err(("topic_not_utf8", "topic is not UTF-8".to_owned())),
    };
    match parsed {
        Ok(_) if !readings.is_empty() => {
            let (durable, receiver) = if publish.qos == 1 {
                let (sender, receiver) = oneshot::channel();
                (Some(sender), Some(receiver))
            } else {
                (None, None)
            };
            let input = PipelineInput {
                source: context.source,
                readings: std::mem::replace(readings, context.pool.take()),
                receive_ms,
                durable,
            };
            // The pipeline is gone only at shutdown; no PUBACK then (the client resends).
            let sent = match &context.redelivery {
                Some(log) => log.send(&context.pipeline, input, message).await,
                None => context.pipeline.send(input).await.map_err(|_| ()),
            };
            if sent.is_err() {
                let (_, never) = oneshot::channel();
                return Some(never);
            }
            receiver
        }
        outcome => {
            if let Err((reason, message)) = outcome {
                let topic = String::from_utf8_lossy(&publish.topic)
                    .chars()
                    .take(128)
                    .collect::<String>();
                metrics.reject(reason, &format!("topic `{topic}`: {message}"));
            }
            None
        }
    }
}
