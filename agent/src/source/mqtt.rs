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
//! Brokers that speak only MQTT 3.1.1 refuse the MQTT 5 CONNECT; this shell reports that
//! in the log and keeps retrying (a v3.1.1 fallback is not implemented yet).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::aggregate::SourceIndex;
use crate::config::MqttSubscribeConfig;
use crate::metrics::SourceMetrics;
use crate::run::{now_ms, PipelineInput};
use crate::source::TopicRouter;

/// Session expiry asked of the broker: how long it keeps our queue while we are away.
pub const SESSION_EXPIRY_S: u32 = 24 * 3600;
const BACKOFF_INITIAL_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 30_000;

/// The rumqttc options for a subscribe source.
pub fn mqtt_options(config: &MqttSubscribeConfig) -> Result<MqttOptions, String> {
    let (host, port) = config.broker_address.rsplit_once(':').ok_or_else(|| {
        format!(
            "broker_address `{}` is not host:port",
            config.broker_address
        )
    })?;
    let port: u16 = port.parse().map_err(|error| {
        format!(
            "broker_address `{}`: bad port: {error}",
            config.broker_address
        )
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
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
        let password = match &config.password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|error| format!("cannot read password_file {}: {error}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            None => String::new(),
        };
        options.set_credentials(username.clone(), password);
    }
    Ok(options)
}

/// Runs one subscribe source until `stop` is cancelled.
pub async fn run_subscribe(
    source: SourceIndex,
    config: MqttSubscribeConfig,
    router: TopicRouter,
    metrics: Arc<SourceMetrics>,
    pipeline: mpsc::Sender<PipelineInput>,
    stop: CancellationToken,
) {
    let options = match mqtt_options(&config) {
        Ok(options) => options,
        Err(message) => {
            tracing::error!(source = %metrics.name, "{message}; this source stays idle");
            return;
        }
    };
    let qos = if config.qos >= 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let filters: Vec<String> = router
        .subscription_filters()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let capacity = usize::try_from(config.receive_maximum)
        .unwrap_or(1024)
        .max(16);
    let (client, mut event_loop) = AsyncClient::new(options, capacity);

    // Acknowledgements in arrival order, each once its data is durable.
    let (ack_sender, mut ack_receiver) =
        mpsc::unbounded_channel::<(Publish, oneshot::Receiver<()>)>();
    let ack_client = client.clone();
    let ack_metrics = Arc::clone(&metrics);
    let ack_task = tokio::spawn(async move {
        while let Some((publish, durable)) = ack_receiver.recv().await {
            if durable.await.is_ok() {
                if let Err(error) = ack_client.ack(&publish).await {
                    tracing::debug!(source = %ack_metrics.name, %error, "could not send PUBACK (disconnected); the broker will redeliver");
                }
            } else {
                tracing::warn!(source = %ack_metrics.name, pkid = publish.pkid, "message not acknowledged: its data could not be made durable; the broker redelivers it after a reconnect");
            }
        }
    });

    let mut backoff_ms = BACKOFF_INITIAL_MS;
    let mut readings = Vec::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = event_loop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                backoff_ms = BACKOFF_INITIAL_MS;
                metrics.connected.store(1, Ordering::Relaxed);
                tracing::info!(source = %metrics.name, session_present = connack.session_present, "connected to MQTT broker {}", config.broker_address);
                if !connack.session_present {
                    for filter in &filters {
                        if let Err(error) = client.subscribe(filter.clone(), qos).await {
                            tracing::error!(source = %metrics.name, filter, %error, "cannot subscribe");
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                metrics.messages_in.fetch_add(1, Ordering::Relaxed);
                let receive_ms = now_ms();
                readings.clear();
                let parsed = match std::str::from_utf8(&publish.topic) {
                    Ok(topic) => router
                        .parse(topic, &publish.payload, receive_ms, &mut readings)
                        .map_err(|error| (error.reason(), error.to_string())),
                    Err(_) => Err(("topic_not_utf8", "topic is not UTF-8".to_owned())),
                };
                let wants_ack = publish.qos != QoS::AtMostOnce;
                match parsed {
                    Ok(_) if !readings.is_empty() => {
                        let (durable, durable_receiver) = if wants_ack {
                            let (sender, receiver) = oneshot::channel();
                            (Some(sender), Some(receiver))
                        } else {
                            (None, None)
                        };
                        let input = PipelineInput {
                            source,
                            readings: std::mem::take(&mut readings),
                            receive_ms,
                            durable,
                        };
                        if pipeline.send(input).await.is_err() {
                            break;
                        }
                        if let Some(receiver) = durable_receiver {
                            let _ = ack_sender.send((publish, receiver));
                        }
                    }
                    outcome => {
                        if let Err((reason, message)) = outcome {
                            let topic = String::from_utf8_lossy(&publish.topic)
                                .chars()
                                .take(128)
                                .collect::<String>();
                            metrics.reject(reason, &format!("topic `{topic}`: {message}"));
                        }
                        if wants_ack {
                            let (sender, receiver) = oneshot::channel();
                            let _ = sender.send(());
                            let _ = ack_sender.send((publish, receiver));
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(error) => {
                metrics.connected.store(0, Ordering::Relaxed);
                metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %metrics.name, %error, retry_in_ms = backoff_ms, "MQTT connection to {} failed", config.broker_address);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                }
                backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
            }
        }
    }
    // Let acknowledgements of data already made durable go out before disconnecting.
    drop(ack_sender);
    drop(pipeline);
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
    metrics.connected.store(0, Ordering::Relaxed);
}
