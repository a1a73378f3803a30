//! `/api/v1/live`: the WebSocket that pushes what the processor just produced.
//!
//! Why push from the [`LiveFeed`] rather than poll the store: the feed carries window
//! results and readings the moment the processor makes them, so a dashboard sees data in
//! well under a second without one query per client per tick.
//!
//! Protocol (JSON text messages):
//! - client -> server: `{"type":"subscribe","devices":[..],"metrics":[..],"series":[..],
//!   "resolutions_ms":[..],"windows":true,"readings":true}`; every field optional, an empty
//!   or missing list means "all". A new subscription replaces the previous one. Nothing is
//!   pushed before the first subscription.
//! - server -> client: `subscribed` (the filter in force), `data` (`produced_ms`, `sent_ms`,
//!   `windows`, `readings`: only what matches), `lagged` (`skipped_batches`: the client fell
//!   behind the feed's ring and was skipped ahead to the newest data), `error` (a bad
//!   subscription; the connection stays open).
//!
//! A slow client never slows the pipeline: the feed is a broadcast ring that never waits for
//! a listener. A client whose socket accepts nothing for `send_timeout_ms` is disconnected.
//! The filtering ([`Subscription::select`]) is plain code, tested without sockets.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::params::{parse_selector, ParamError};
use crate::live::{LiveBatch, LiveFeed, LiveReading, LiveWindow};
use crate::store::SeriesSelector;

/// Most entries in one subscription's lists together.
pub const MAX_SUBSCRIPTION_ENTRIES: usize = 10_000;
/// Largest message a client may send.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 256 * 1024;

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    Subscribe {
        #[serde(default)]
        devices: Vec<String>,
        #[serde(default)]
        metrics: Vec<String>,
        /// Series selectors (`device_id/metric[/tags]`).
        #[serde(default)]
        series: Vec<String>,
        #[serde(default)]
        resolutions_ms: Vec<i64>,
        #[serde(default = "yes")]
        windows: bool,
        #[serde(default = "yes")]
        readings: bool,
    },
}

fn yes() -> bool {
    true
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Subscribed {
        devices: Vec<String>,
        metrics: Vec<String>,
        series: Vec<String>,
        resolutions_ms: Vec<i64>,
        windows: bool,
        readings: bool,
    },
    Data {
        produced_ms: i64,
        sent_ms: i64,
        windows: Vec<LiveWindow>,
        readings: Vec<LiveReading>,
    },
    Lagged {
        skipped_batches: u64,
    },
    Error {
        error: String,
    },
}

/// A client's filter. Empty sets match everything; a series selector matches only its series.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    pub devices: BTreeSet<String>,
    pub metrics: BTreeSet<String>,
    pub series: BTreeSet<SeriesSelector>,
    pub resolutions_ms: BTreeSet<i64>,
    pub windows: bool,
    pub readings: bool,
}

impl Subscription {
    /// Checks and converts a subscribe message.
    pub fn from_message(message: ClientMessage) -> Result<Self, ParamError> {
        let ClientMessage::Subscribe {
            devices,
            metrics,
            series,
            resolutions_ms,
            windows,
            readings,
        } = message;
        let entries = devices.len() + metrics.len() + series.len() + resolutions_ms.len();
        if entries > MAX_SUBSCRIPTION_ENTRIES {
            return Err(ParamError::new(
                "subscribe",
                format!("{entries} filter entries; at most {MAX_SUBSCRIPTION_ENTRIES}"),
            ));
        }
        let series = series
            .iter()
            .map(|text| parse_selector("series", text))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            devices: devices.into_iter().collect(),
            metrics: metrics.into_iter().collect(),
            series,
            resolutions_ms: resolutions_ms.into_iter().collect(),
            windows,
            readings,
        })
    }

    fn matches(&self, device_id: &str, metric: &str, tags: &str) -> bool {
        (self.devices.is_empty() || self.devices.contains(device_id))
            && (self.metrics.is_empty() || self.metrics.contains(metric))
            && (self.series.is_empty()
                || self.series.iter().any(|selector| {
                    selector.device_id == device_id
                        && selector.metric == metric
                        && selector.tags == tags
                }))
    }

    /// The part of `batch` this client asked for, or `None` when nothing matches.
    pub fn select(&self, batch: &LiveBatch, sent_ms: i64) -> Option<ServerMessage> {
        let windows: Vec<LiveWindow> = if self.windows {
            batch
                .windows
                .iter()
                .filter(|window| {
                    (self.resolutions_ms.is_empty()
                        || self.resolutions_ms.contains(&window.resolution_ms))
                        && self.matches(&window.device_id, &window.metric, &window.tags)
                })
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let readings: Vec<LiveReading> = if self.readings {
            batch
                .readings
                .iter()
                .filter(|reading| self.matches(&reading.device_id, &reading.metric, &reading.tags))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        if windows.is_empty() && readings.is_empty() {
            return None;
        }
        Some(ServerMessage::Data {
            produced_ms: batch.produced_ms,
            sent_ms,
            windows,
            readings,
        })
    }

    fn acknowledgement(&self) -> ServerMessage {
        ServerMessage::Subscribed {
            devices: self.devices.iter().cloned().collect(),
            metrics: self.metrics.iter().cloned().collect(),
            series: self
                .series
                .iter()
                .map(|selector| {
                    super::params::selector_string(
                        &selector.device_id,
                        &selector.metric,
                        &selector.tags,
                    )
                })
                .collect(),
            resolutions_ms: self.resolutions_ms.iter().copied().collect(),
            windows: self.windows,
            readings: self.readings,
        }
    }
}

/// Parses one client text message into a subscription, or the error to send back.
pub fn parse_client_message(text: &str) -> Result<Subscription, String> {
    let message: ClientMessage = serde_json::from_str(text).map_err(|error| {
        format!(
            "message is not a subscription ({error}); send {{\"type\":\"subscribe\",\"devices\":[],\"metrics\":[],\"series\":[]}}"
        )
    })?;
    Subscription::from_message(message).map_err(|error| error.to_string())
}

/// Settings of one WebSocket connection.
#[derive(Debug, Clone, Copy)]
pub struct LiveLimits {
    /// A client whose socket takes longer than this to accept one message is disconnected.
    pub send_timeout_ms: u64,
}

impl Default for LiveLimits {
    fn default() -> Self {
        Self {
            send_timeout_ms: 5_000,
        }
    }
}

enum Sent {
    Ok,
    Gone,
}

async fn send(socket: &mut WebSocket, message: &ServerMessage, limits: LiveLimits) -> Sent {
    let Ok(text) = serde_json::to_string(message) else {
        return Sent::Ok;
    };
    let timeout = Duration::from_millis(limits.send_timeout_ms);
    match tokio::time::timeout(timeout, socket.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => Sent::Ok,
        Ok(Err(_)) => Sent::Gone,
        Err(_) => {
            tracing::info!(
                timeout_ms = limits.send_timeout_ms,
                "live client accepted nothing in time; disconnecting it"
            );
            Sent::Gone
        }
    }
}

/// Runs one client connection until it closes, the server shuts down, or it stalls.
pub(crate) async fn run_connection(
    mut socket: WebSocket,
    feed: LiveFeed,
    clock: super::Clock,
    limits: LiveLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    // Subscribed to the feed from the start, so nothing falls between the subscribe
    // message and the first push.
    let mut batches = feed.subscribe();
    let mut subscription: Option<Subscription> = None;
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let reply = match incoming {
                    Some(Ok(Message::Text(text))) => match parse_client_message(text.as_str()) {
                        Ok(parsed) => {
                            let acknowledgement = parsed.acknowledgement();
                            subscription = Some(parsed);
                            acknowledgement
                        }
                        Err(error) => ServerMessage::Error { error },
                    },
                    Some(Ok(Message::Binary(_))) => ServerMessage::Error {
                        error: "binary messages are not understood; send JSON text".to_string(),
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                };
                if let Sent::Gone = send(&mut socket, &reply, limits).await {
                    return;
                }
            }
            received = batches.recv() => {
                let message = match received {
                    Ok(batch) => match &subscription {
                        Some(subscription) => match subscription.select(&batch, clock()) {
                            Some(message) => message,
                            None => continue,
                        },
                        None => continue,
                    },
                    Err(broadcast::error::RecvError::Lagged(skipped_batches)) => {
                        ServerMessage::Lagged { skipped_batches }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if let Sent::Gone = send(&mut socket, &message, limits).await {
                    return;
                }
            }
            _ = shutdown.changed() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: &str, metric: &str, value: f64) -> LiveReading {
        LiveReading {
            agent_id: "gw-1".into(),
            device_id: device.into(),
            metric: metric.into(),
            tags: String::new(),
            time_ms: 1_000,
            value,
        }
    }

    fn window(device: &str, resolution_ms: i64) -> LiveWindow {
        LiveWindow {
            agent_id: "gw-1".into(),
            device_id: device.into(),
            metric: "temperature".into(),
            tags: String::new(),
            resolution_ms,
            window_start_ms: 0,
            count: 1,
            sum: 1.0,
            min: 1.0,
            max: 1.0,
            last_time_ms: 0,
            last_value: 1.0,
            is_final: false,
        }
    }

    #[test]
    fn an_empty_subscription_matches_everything() {
        let subscription = parse_client_message(r#"{"type":"subscribe"}"#).expect("valid");
        let batch = LiveBatch {
            produced_ms: 5,
            windows: vec![window("a", 60_000)],
            readings: vec![
                reading("a", "temperature", 1.0),
                reading("b", "humidity", 2.0),
            ],
        };
        let Some(ServerMessage::Data {
            windows, readings, ..
        }) = subscription.select(&batch, 6)
        else {
            panic!("everything matches");
        };
        assert_eq!((windows.len(), readings.len()), (1, 2));
    }

    #[test]
    fn filters_by_device_metric_series_and_resolution() {
        let subscription = parse_client_message(
            r#"{"type":"subscribe","devices":["a","b"],"metrics":["temperature"],"resolutions_ms":[60000],"readings":true}"#,
        )
        .expect("valid");
        let batch = LiveBatch {
            produced_ms: 5,
            windows: vec![
                window("a", 60_000),
                window("a", 3_600_000),
                window("c", 60_000),
            ],
            readings: vec![
                reading("a", "temperature", 1.0),
                reading("b", "humidity", 2.0),
                reading("c", "temperature", 3.0),
            ],
        };
        let Some(ServerMessage::Data {
            windows, readings, ..
        }) = subscription.select(&batch, 6)
        else {
            panic!("some match");
        };
        assert_eq!(windows, vec![window("a", 60_000)]);
        assert_eq!(readings, vec![reading("a", "temperature", 1.0)]);

        let by_series =
            parse_client_message(r#"{"type":"subscribe","series":["b/humidity"],"windows":false}"#)
                .expect("valid");
        let Some(ServerMessage::Data {
            windows, readings, ..
        }) = by_series.select(&batch, 6)
        else {
            panic!("b/humidity matches");
        };
        assert!(windows.is_empty());
        assert_eq!(readings, vec![reading("b", "humidity", 2.0)]);

        let nothing =
            parse_client_message(r#"{"type":"subscribe","devices":["zzz"]}"#).expect("valid");
        assert_eq!(nothing.select(&batch, 6), None);
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        for (text, expected) in [
            ("not json", "not a subscription"),
            (r#"{"type":"unsubscribe"}"#, "not a subscription"),
            (
                r#"{"type":"subscribe","device":["a"]}"#,
                "not a subscription",
            ),
            (r#"{"type":"subscribe","series":["nometric"]}"#, "series:"),
        ] {
            let error = parse_client_message(text).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
