//! The MQTT subscribe shell: a persistent MQTT 5 session with the gateway's broker.
//!
//! Thin on purpose: it owns the rumqttc event loop and does three things. It subscribes to
//! the filters the topic templates derive (again whenever the broker says it kept no
//! session). It parses every PUBLISH with the [`TopicRouter`] and hands the readings to the
//! pipeline; rejected messages are counted by reason and acknowledged at once (there is
//! nothing to keep). And it acknowledges QoS 1 messages *only after the pipeline says
//! their readings are durable* (manual acks; see `run.rs` for the journal behind that):
//! an ack task awaits each message's durability signal in arrival order and then sends
//! the PUBACK, so the event loop never waits for the disk.
//!
//! The session is persistent (`clean_start = false`, a fixed client id, a session expiry
//! of one day): messages published while the agent is down or restarting are queued by
//! the broker and delivered afterwards, and QoS 1 messages handed over but never
//! acknowledged are redelivered. Receive-maximum is raised (config, default 1024) so the
//! broker's in-flight window covers a whole group-commit interval of traffic.
//!
//! Brokers that speak only MQTT 3.1.1 refuse the MQTT 5 CONNECT, either with the 3.1.1
//! "unacceptable protocol version" CONNACK or by closing the connection. With
//! `protocol = "auto"` (the default) the sans-IO [`ProtocolNegotiation`] then falls back
//! to MQTT 3.1.1 for the rest of the run: on a version refusal at once, on two handshakes in
//! a row that end before any CONNACK otherwise. Under 3.1.1 the session is kept with
//! `clean_session = false` and there is no receive-maximum: the broker's own in-flight
//! limit (Mosquitto's `max_inflight_messages`) bounds the window. `protocol = "v5"` or
//! `"v311"` pins the revision.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::aggregate::SourceIndex;
use crate::config::{MqttProtocol, MqttSubscribeConfig};
use crate::metrics::SourceMetrics;
use crate::run::{now_ms, PipelineInput};
use crate::source::broker::redelivery::{MessageId, RedeliveryLog};
use crate::source::TopicRouter;

/// Session expiry asked of the broker: how long it keeps our queue while we are away.
pub const SESSION_EXPIRY_S: u32 = 24 * 3600;
const BACKOFF_INITIAL_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 30_000;

/// The MQTT revision a subscribe source is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    V5,
    V311,
}

/// How an MQTT 5 connection attempt ended, as far as the fallback decision cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The broker answered the CONNECT with "unsupported/unacceptable protocol version".
    RefusedProtocolVersion,
    /// The connection ended after it was opened and before any CONNACK was understood
    /// (what a 3.1.1-only broker's refusal looks like to an MQTT 5 decoder).
    ClosedBeforeConnAck,
    /// Anything else (broker down, network, a failure after a CONNACK).
    Other,
}

/// Which revision to speak next, from the configured setting and how attempts ended.
/// Sans-IO: the shell reports CONNACKs and failures, this decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolNegotiation {
    setting: MqttProtocol,
    current: MqttVersion,
    closed_before_connack: u32,
}

/// Handshakes in a row that end before a CONNACK before `auto` falls back to 3.1.1.
pub const FALLBACK_AFTER_CLOSED_HANDSHAKES: u32 = 2;

impl ProtocolNegotiation {
    pub fn new(setting: MqttProtocol) -> Self {
        let current = match setting {
            MqttProtocol::V311 => MqttVersion::V311,
            MqttProtocol::Auto | MqttProtocol::V5 => MqttVersion::V5,
        };
        Self {
            setting,
            current,
            closed_before_connack: 0,
        }
    }

    pub fn current(&self) -> MqttVersion {
        self.current
    }

    pub fn on_connack(&mut self) {
        self.closed_before_connack = 0;
    }

    /// Records a failed attempt; returns the revision for the next one.
    pub fn on_failure(&mut self, failure: HandshakeFailure) -> MqttVersion {
        if self.setting != MqttProtocol::Auto || self.current == MqttVersion::V311 {
            return self.current;
        }
        match failure {
            HandshakeFailure::RefusedProtocolVersion => self.current = MqttVersion::V311,
            HandshakeFailure::ClosedBeforeConnAck => {
                self.closed_before_connack += 1;
                if self.closed_before_connack >= FALLBACK_AFTER_CLOSED_HANDSHAKES {
                    self.current = MqttVersion::V311;
                }
            }
            HandshakeFailure::Other => self.closed_before_connack = 0,
        }
        self.current
    }
}

/// Classifies an MQTT 5 connection error; `got_connack` tells whether this connection had
/// been accepted before it failed.
pub fn classify_v5_failure(error: &ConnectionError, got_connack: bool) -> HandshakeFailure {
    use std::io::ErrorKind;
    let closed = |kind: ErrorKind| {
        matches!(
            kind,
            ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
        )
    };
    match error {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::RefusedProtocolVersion
            | ConnectReturnCode::UnsupportedProtocolVersion,
        ) => HandshakeFailure::RefusedProtocolVersion,
        _ if got_connack => HandshakeFailure::Other,
        ConnectionError::MqttState(
            StateError::ConnectionAborted | StateError::Deserialization(_),
        )
        | ConnectionError::NotConnAck(_) => HandshakeFailure::ClosedBeforeConnAck,
        ConnectionError::MqttState(StateError::Io(error)) | ConnectionError::Io(error)
            if closed(error.kind()) =>
        {
            HandshakeFailure::ClosedBeforeConnAck
        }
        _ => HandshakeFailure::Other,
    }
}

fn split_address(broker_address: &str) -> Result<(String, u16), String> {
    let (host, port) = broker_address
        .rsplit_once(':')
        .ok_or_else(|| format!("broker_address `{}` is not host:port", broker_address))?;
    let port: u16 = port
        .parse()
        .map_err(|error| format!("broker_address `{}`: bad port: {error}", broker_address))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

fn read_password(config: &MqttSubscribeConfig) -> Result<String, String> {
    match &config.password_file {
        Some(path) => Ok(std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read password_file {}: {error}", path.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_owned()),
        None => Ok(String::new()),
    }
}

/// The rumqttc options for a subscribe source speaking MQTT 5.
pub fn mqtt_options(config: &MqttSubscribeConfig) -> Result<MqttOptions, String> {
    let (host, port) = split_address(&config.broker_address)?;
    let mut options = MqttOptions::new(config.client_id.clone(), host, port);
    options.set_keep_alive(Duration::from_secs(u64::from(config.keep_alive_s)));
    options.set_clean_start(!config.persistent_session);
    if config.persistent_session {
        options.set_session_expiry_interval(Some(SESSION_EXPIRY_S));
    }
    options.set_manual_acks(true);
    options.set_receive_maximum(Some(
        u16::try_from(config.receive_maximum).unwrap_or(u16::MAX),
    ));
    options.set_max_packet_size(Some(16 * 1024 * 1024));
    if let Some(username) = &config.username {
        options.set_credentials(username.clone(), read_password(config)?);
    }
    Ok(options)
}

/// The rumqttc options for a subscribe source speaking MQTT 3.1.1.
pub fn mqtt_options_v311(config: &MqttSubscribeConfig) -> Result<rumqttc::MqttOptions, String> {
    let (host, port) = split_address(&config.broker_address)?;
    let mut options = rumqttc::MqttOptions::new(config.client_id.clone(), host, port);
    options.set_keep_alive(Duration::from_secs(u64::from(config.keep_alive_s)));
    options.set_clean_session(!config.persistent_session);
    options.set_manual_acks(true);
    options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
    if let Some(username) = &config.username {
        options.set_credentials(username.clone(), read_password(config)?);
    }
    Ok(options)
}

/// Why one protocol's loop returned.
enum LoopEnd {
    Stopped,
    FallBack,
}

/// What both protocol loops share.
struct Shell<'a> {
    source: SourceIndex,
    config: &'a MqttSubscribeConfig,
    router: &'a TopicRouter,
    metrics: &'a Arc<SourceMetrics>,
    pipeline: &'a mpsc::Sender<PipelineInput>,
    stop: &'a CancellationToken,
    readings: crate::source::ParsedReadings,
    /// Where `readings` come from and return to once the pipeline has ingested them.
    pool: crate::source::ReadingsPool,
    redelivery: Option<Arc<RedeliveryLog>>,
    /// Counts CONNACKs: a redelivery record matches only on a later connection.
    connection: u64,
}

/// What the event loop does with one QoS 1 PUBLISH before ingesting it.
enum Arrival {
    /// A redelivery of a message already durable: acknowledge, do not ingest.
    Redelivered,
    /// Ingest; record it under this identity (if redelivery records are kept).
    New(Option<MessageId>),
}

impl Shell<'_> {
    /// Parses one message and hands its readings to the pipeline. Returns the signal to
    /// wait for before acknowledging (already fired when there is nothing to keep), or
    /// `Err(())` when the pipeline is gone (shutdown).
    async fn ingest(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        wants_ack: bool,
        message: Option<MessageId>,
    ) -> Result<Option<oneshot::Receiver<()>>, ()> {
        let metrics = self.metrics;
        metrics.messages_in.fetch_add(1, Ordering::Relaxed);
        let receive_ms = now_ms();
        self.readings.clear();
        let parsed = match std::str::from_utf8(topic) {
            Ok(topic) => self
                .router
                .parse(topic, payload, receive_ms, &mut self.readings)
                .map_err(|error| (error.reason(), error.to_string())),
            Err(_) => Err(("topic_not_utf8", "topic is not UTF-8".to_owned())),
        };
        match parsed {
            Ok(_) if !self.readings.is_empty() => {
                let (durable, receiver) = if wants_ack {
                    let (sender, receiver) = oneshot::channel();
                    (Some(sender), Some(receiver))
                } else {
                    (None, None)
                };
                let input = PipelineInput {
                    source: self.source,
                    readings: std::mem::replace(&mut self.readings, self.pool.take()),
                    receive_ms,
                    durable,
                };
                match &self.redelivery {
                    Some(log) => log.send(self.pipeline, input, message).await?,
                    None => self.pipeline.send(input).await.map_err(|_| ())?,
                }
                Ok(receiver)
            }
            outcome => {
                if let Err((reason, message)) = outcome {
                    let topic = String::from_utf8_lossy(topic)
                        .chars()
                        .take(128)
                        .collect::<String>();
                    metrics.reject(reason, &format!("topic `{topic}`: {message}"));
                }
                if wants_ack {
                    let (sender, receiver) = oneshot::channel();
                    let _ = sender.send(());
                    Ok(Some(receiver))
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Classifies a QoS 1 PUBLISH: a redelivery (DUP = 1, same packet id and topic +
    /// payload as a durable record of an earlier connection) or a message to ingest.
    fn arrival(&self, pkid: u16, dup: bool, topic: &[u8], payload: &[u8]) -> Arrival {
        let Some(log) = &self.redelivery else {
            return Arrival::New(None);
        };
        let message = log.message_id(
            self.source,
            &self.config.client_id,
            self.connection,
            pkid,
            topic,
            payload,
        );
        if dup && log.take_redelivery(self.source, &message) {
            tracing::debug!(source = %self.metrics.name, pkid, "redelivery of a message already durable: acknowledged, not ingested");
            Arrival::Redelivered
        } else {
            Arrival::New(Some(message))
        }
    }

    /// A CONNACK: a new connection; without a stored session nothing earlier is resent.
    fn connected(&mut self, session_present: bool) {
        self.connection += 1;
        if !session_present {
            if let Some(log) = &self.redelivery {
                log.session_restarted(self.source, &self.config.client_id, self.connection);
            }
        }
    }

    async fn backoff(&self, backoff_ms: &mut u64) -> bool {
        let stopped = tokio::select! {
            _ = self.stop.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_millis(*backoff_ms)) => false,
        };
        *backoff_ms = (*backoff_ms * 2).min(BACKOFF_MAX_MS);
        stopped
    }
}

/// Runs one subscribe source until `stop` is cancelled. With `redelivery`, QoS 1
/// redeliveries of messages already durable are acknowledged without being ingested.
pub async fn run_subscribe(
    source: SourceIndex,
    config: MqttSubscribeConfig,
    router: TopicRouter,
    metrics: Arc<SourceMetrics>,
    pipeline: mpsc::Sender<PipelineInput>,
    redelivery: Option<Arc<RedeliveryLog>>,
    stop: CancellationToken,
) {
    let mut negotiation = ProtocolNegotiation::new(config.protocol);
    let pool = crate::source::ReadingsPool::new();
    let mut shell = Shell {
        source,
        config: &config,
        router: &router,
        metrics: &metrics,
        pipeline: &pipeline,
        stop: &stop,
        readings: pool.take(),
        pool,
        redelivery,
        connection: 0,
    };
    loop {
        let end = match negotiation.current() {
            MqttVersion::V5 => run_v5(&mut shell, &mut negotiation).await,
            MqttVersion::V311 => run_v311(&mut shell).await,
        };
        match end {
            Ok(LoopEnd::Stopped) => break,
            Ok(LoopEnd::FallBack) => {
                tracing::warn!(source = %metrics.name, "the broker at {} does not accept MQTT 5; falling back to MQTT 3.1.1 for this run (set `protocol = \"v311\"` to skip the attempt)", config.broker_address);
            }
            Err(message) => {
                tracing::error!(source = %metrics.name, "{message}; this source stays idle");
                break;
            }
        }
    }
    metrics.connected.store(0, Ordering::Relaxed);
}

/// A durability signal that has already fired (nothing to wait for).
fn fired() -> oneshot::Receiver<()> {
    let (sender, receiver) = oneshot::channel();
    let _ = sender.send(());
    receiver
}

fn subscription_filters(router: &TopicRouter) -> Vec<String> {
    router
        .subscription_filters()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

async fn run_v5(
    shell: &mut Shell<'_>,
    negotiation: &mut ProtocolNegotiation,
) -> Result<LoopEnd, String> {
    let config = shell.config;
    let metrics = Arc::clone(shell.metrics);
    let options = mqtt_options(config)?;
    let qos = if config.qos >= 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let filters = subscription_filters(shell.router);
    let capacity = usize::try_from(config.receive_maximum)
        .unwrap_or(1024)
        .max(16);
    let (client, mut event_loop) = AsyncClient::new(options, capacity);

    let (ack_sender, ack_task) =
        spawn_acknowledger(Arc::clone(&metrics), |publish| publish.pkid, {
            let client = client.clone();
            move |publish: Publish| {
                let client = client.clone();
                async move { client.ack(&publish).await }
            }
        });

    let mut backoff_ms = BACKOFF_INITIAL_MS;
    let mut got_connack = false;
    let mut end = LoopEnd::Stopped;
    loop {
        let event = tokio::select! {
            _ = shell.stop.cancelled() => break,
            event = event_loop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                backoff_ms = BACKOFF_INITIAL_MS;
                got_connack = true;
                negotiation.on_connack();
                shell.connected(connack.session_present);
                metrics.connected.store(1, Ordering::Relaxed);
                tracing::info!(source = %metrics.name, session_present = connack.session_present, "connected to MQTT broker {} (MQTT 5)", config.broker_address);
                if !connack.session_present {
                    for filter in &filters {
                        if let Err(error) = client.subscribe(filter.clone(), qos).await {
                            tracing::error!(source = %metrics.name, filter, %error, "cannot subscribe");
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let wants_ack = publish.qos != QoS::AtMostOnce;
                let arrival = if wants_ack {
                    shell.arrival(publish.pkid, publish.dup, &publish.topic, &publish.payload)
                } else {
                    Arrival::New(None)
                };
                let message = match arrival {
                    Arrival::Redelivered => {
                        let _ = ack_sender.send((publish, fired()));
                        continue;
                    }
                    Arrival::New(message) => message,
                };
                match shell
                    .ingest(&publish.topic, &publish.payload, wants_ack, message)
                    .await
                {
                    Ok(Some(receiver)) => {
                        let _ = ack_sender.send((publish, receiver));
                    }
                    Ok(None) => {}
                    Err(()) => break,
                }
            }
            Ok(_) => {}
            Err(error) => {
                metrics.connected.store(0, Ordering::Relaxed);
                metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                let failure = classify_v5_failure(&error, got_connack);
                got_connack = false;
                tracing::warn!(source = %metrics.name, %error, ?failure, retry_in_ms = backoff_ms, "MQTT connection to {} failed", config.broker_address);
                if negotiation.on_failure(failure) != MqttVersion::V5 {
                    end = LoopEnd::FallBack;
                    break;
                }
                if shell.backoff(&mut backoff_ms).await {
                    break;
                }
            }
        }
    }
    // Let acknowledgements of data already made durable go out before disconnecting.
    drop(ack_sender);
    let _ = tokio::time::timeout(Duration::from_secs(2), ack_task).await;
    // Bounded: the request channel may be full of acknowledgements nobody polls out anymore.
    let _ = tokio::time::timeout(Duration::from_millis(500), client.disconnect()).await;
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(event) = event_loop.poll().await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(end)
}

/// Acknowledgements in arrival order, each once its data is durable: the task sends the PUBACK
/// of each `(publish, durable)` once `durable` fires (with `ack`), and none for data that could
/// not be made durable (the broker redelivers it after a reconnect). A redelivery record
/// outlives its PUBACK: rumqttc reporting the PUBACK written means its buffer, not the broker,
/// so a kill right after can still make the broker resend (a crash test under load showed
/// exactly that). Keeping records is safe because a match needs DUP = 1 and the same content,
/// and a record is replaced when the broker reuses its packet id (at most 65,535 per session).
fn spawn_acknowledger<P, Ack, Sent, Error>(
    metrics: Arc<SourceMetrics>,
    pkid: fn(&P) -> u16,
    ack: Ack,
) -> (
    mpsc::UnboundedSender<(P, oneshot::Receiver<()>)>,
    tokio::task::JoinHandle<()>,
)
where
    P: Send + 'static,
    Ack: Fn(P) -> Sent + Send + 'static,
    Sent: std::future::Future<Output = Result<(), Error>> + Send,
    Error: std::fmt::Display,
{
    let (sender, mut receiver) = mpsc::unbounded_channel::<(P, oneshot::Receiver<()>)>();
    let task = tokio::spawn(async move {
        while let Some((publish, durable)) = receiver.recv().await {
            if durable.await.is_ok() {
                if let Err(error) = ack(publish).await {
                    tracing::debug!(source = %metrics.name, %error, "could not send PUBACK (disconnected); the broker will redeliver");
                }
            } else {
                tracing::warn!(source = %metrics.name, pkid = pkid(&publish), "message not acknowledged: its data could not be made durable; the broker redelivers it after a reconnect");
            }
        }
    });
    (sender, task)
}

async fn run_v311(shell: &mut Shell<'_>) -> Result<LoopEnd, String> {
    let config = shell.config;
    let metrics = Arc::clone(shell.metrics);
    let options = mqtt_options_v311(config)?;
    let qos = if config.qos >= 1 {
        rumqttc::QoS::AtLeastOnce
    } else {
        rumqttc::QoS::AtMostOnce
    };
    let filters = subscription_filters(shell.router);
    let capacity = usize::try_from(config.receive_maximum)
        .unwrap_or(1024)
        .max(16);
    let (client, mut event_loop) = rumqttc::AsyncClient::new(options, capacity);
    let (ack_sender, ack_task) =
        spawn_acknowledger(Arc::clone(&metrics), |publish| publish.pkid, {
            let client = client.clone();
            move |publish: rumqttc::Publish| {
                let client = client.clone();
                async move { client.ack(&publish).await }
            }
        });

    let mut backoff_ms = BACKOFF_INITIAL_MS;
    loop {
        let event = tokio::select! {
            _ = shell.stop.cancelled() => break,
            event = event_loop.poll() => event,
        };
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(connack))) => {
                backoff_ms = BACKOFF_INITIAL_MS;
                shell.connected(connack.session_present);
                metrics.connected.store(1, Ordering::Relaxed);
                tracing::info!(source = %metrics.name, session_present = connack.session_present, "connected to MQTT broker {} (MQTT 3.1.1)", config.broker_address);
                if !connack.session_present {
                    for filter in &filters {
                        if let Err(error) = client.subscribe(filter.clone(), qos).await {
                            tracing::error!(source = %metrics.name, filter, %error, "cannot subscribe");
                        }
                    }
                }
            }
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                let wants_ack = publish.qos != rumqttc::QoS::AtMostOnce;
                let arrival = if wants_ack {
                    shell.arrival(
                        publish.pkid,
                        publish.dup,
                        publish.topic.as_bytes(),
                        &publish.payload,
                    )
                } else {
                    Arrival::New(None)
                };
                let message = match arrival {
                    Arrival::Redelivered => {
                        let _ = ack_sender.send((publish, fired()));
                        continue;
                    }
                    Arrival::New(message) => message,
                };
                match shell
                    .ingest(
                        publish.topic.as_bytes(),
                        &publish.payload,
                        wants_ack,
                        message,
                    )
                    .await
                {
                    Ok(Some(receiver)) => {
                        let _ = ack_sender.send((publish, receiver));
                    }
                    Ok(None) => {}
                    Err(()) => break,
                }
            }
            Ok(_) => {}
            Err(error) => {
                metrics.connected.store(0, Ordering::Relaxed);
                metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %metrics.name, %error, retry_in_ms = backoff_ms, "MQTT connection to {} failed", config.broker_address);
                if shell.backoff(&mut backoff_ms).await {
                    break;
                }
            }
        }
    }
    drop(ack_sender);
    let _ = tokio::time::timeout(Duration::from_secs(2), ack_task).await;
    let _ = tokio::time::timeout(Duration::from_millis(500), client.disconnect()).await;
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(event) = event_loop.poll().await {
            if matches!(
                event,
                rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)
            ) {
                break;
            }
        }
    })
    .await;
    Ok(LoopEnd::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aborted() -> ConnectionError {
        ConnectionError::MqttState(StateError::ConnectionAborted)
    }

    #[test]
    fn auto_falls_back_on_a_version_refusal_at_once() {
        let mut negotiation = ProtocolNegotiation::new(MqttProtocol::Auto);
        assert_eq!(negotiation.current(), MqttVersion::V5);
        let refused = ConnectionError::ConnectionRefused(ConnectReturnCode::RefusedProtocolVersion);
        let failure = classify_v5_failure(&refused, false);
        assert_eq!(failure, HandshakeFailure::RefusedProtocolVersion);
        assert_eq!(negotiation.on_failure(failure), MqttVersion::V311);
        assert_eq!(
            negotiation.on_failure(HandshakeFailure::Other),
            MqttVersion::V311,
            "stays on 3.1.1 for the run"
        );
    }

    #[test]
    fn auto_falls_back_after_two_handshakes_closed_before_connack() {
        let mut negotiation = ProtocolNegotiation::new(MqttProtocol::Auto);
        let failure = classify_v5_failure(&aborted(), false);
        assert_eq!(failure, HandshakeFailure::ClosedBeforeConnAck);
        assert_eq!(negotiation.on_failure(failure), MqttVersion::V5);
        // A broker that is simply down in between resets the count.
        let down = ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify_v5_failure(&down, false), HandshakeFailure::Other);
        assert_eq!(
            negotiation.on_failure(HandshakeFailure::Other),
            MqttVersion::V5
        );
        assert_eq!(negotiation.on_failure(failure), MqttVersion::V5);
        assert_eq!(negotiation.on_failure(failure), MqttVersion::V311);
    }

    #[test]
    fn a_connection_that_was_accepted_never_causes_a_fallback() {
        let mut negotiation = ProtocolNegotiation::new(MqttProtocol::Auto);
        for _ in 0..5 {
            let failure = classify_v5_failure(&aborted(), true);
            assert_eq!(failure, HandshakeFailure::Other);
            assert_eq!(negotiation.on_failure(failure), MqttVersion::V5);
        }
        let failure = classify_v5_failure(&aborted(), false);
        negotiation.on_failure(failure);
        negotiation.on_connack();
        assert_eq!(
            negotiation.on_failure(failure),
            MqttVersion::V5,
            "a CONNACK resets the count"
        );
    }

    #[test]
    fn pinned_revisions_never_switch() {
        let mut v5 = ProtocolNegotiation::new(MqttProtocol::V5);
        assert_eq!(
            v5.on_failure(HandshakeFailure::RefusedProtocolVersion),
            MqttVersion::V5
        );
        let mut v311 = ProtocolNegotiation::new(MqttProtocol::V311);
        assert_eq!(v311.current(), MqttVersion::V311);
        assert_eq!(v311.on_failure(HandshakeFailure::Other), MqttVersion::V311);
    }
}
