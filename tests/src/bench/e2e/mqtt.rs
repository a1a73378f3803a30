//! MQTT load for the end-to-end and dashboard benches: a blocking QoS 1 publisher that
//! counts acknowledgements, and a simulated fleet turned into the JSON messages sensors
//! publish.
//!
//! Why not `tributary-sim run`: it paces one connection and writes a ledger; the benches
//! need to send the same messages to two brokers at once (the agent and the
//! do-it-yourself baseline) and to flood the agent from several connections.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use tributary_firmware_sim::cluster::wait_for;
use tributary_firmware_sim::fleet::Fleet;
use tributary_firmware_sim::format::{device_topic, encode_messages, MessageFormat};
use tributary_protocol::{Reading, SeriesDef};

/// Wall-clock milliseconds since the Unix epoch: the "sensor timestamp" of bench readings.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// One MQTT connection publishing at QoS 1, with its event loop on a thread.
pub struct Publisher {
    client: Client,
    acknowledged: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
    published: u64,
    address: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Connects (MQTT 3.1.1, clean session) and waits for the CONNACK.
    pub fn connect(address: SocketAddr, client_id: &str) -> anyhow::Result<Self> {
        let mut options = MqttOptions::new(client_id, address.ip().to_string(), address.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        // The agent's broker takes 1024 unacknowledged QoS 1 messages per client.
        options.set_inflight(1000);
        let (client, mut connection) = Client::new(options, 1000);
        let acknowledged = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicBool::new(false));
        let stopping = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let thread = {
            let (acknowledged, connected) = (acknowledged.clone(), connected.clone());
            let (stopping, error) = (stopping.clone(), error.clone());
            std::thread::Builder::new()
                .name(format!("mqtt-{client_id}"))
                .spawn(move || {
                    for event in connection.iter() {
                        match event {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                connected.store(true, Ordering::SeqCst);
                            }
                            Ok(Event::Incoming(Packet::PubAck(_))) => {
                                acknowledged.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(failure) => {
                                if !stopping.load(Ordering::SeqCst) {
                                    if let Ok(mut slot) = error.lock() {
                                        *slot = Some(failure.to_string());
                                    }
                                }
                                break;
                            }
                        }
                    }
                })
                .context("starting an MQTT event loop thread")?
        };
        let publisher = Self {
            client,
            acknowledged,
            connected,
            stopping,
            error,
            published: 0,
            address,
            thread: Some(thread),
        };
        wait_for(
            &format!("an MQTT connection to {address}"),
            Duration::from_secs(20),
            || {
                publisher.check()?;
                Ok(publisher.connected.load(Ordering::SeqCst).then_some(()))
            },
        )?;
        Ok(publisher)
    }

    /// Fails with the event loop's error, if it stopped on one.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(error) = self.error.lock().ok().and_then(|slot| slot.clone()) {
            bail!("MQTT connection to {} failed: {error}", self.address);
        }
        Ok(())
    }

    /// Queues one QoS 1 message (blocks while the in-flight window is full).
    pub fn publish(&mut self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .with_context(|| format!("publishing to {}", self.address))?;
        self.published += 1;
        Ok(())
    }

    pub fn published(&self) -> u64 {
        self.published
    }

    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// Waits until every message published so far was acknowledged.
    pub fn wait_acknowledged(&self, timeout: Duration) -> anyhow::Result<()> {
        let published = self.published;
        wait_for(
            &format!("{published} PUBACKs from {}", self.address),
            timeout,
            || {
                self.check()?;
                Ok((self.acknowledged() >= published).then_some(()))
            },
        )
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.client.disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A simulated fleet (realistic signals from `tributary_firmware_sim::fleet`) as MQTT
/// messages in the JSON format the agent reads (`{"<metric>": value, "ts": ms}` on
/// `site/{site}/dev/{device}`), stamped with the wall clock when sent.
pub struct FleetMessages {
    fleet: Fleet,
    series: Vec<SeriesDef>,
    readings: Vec<Reading>,
    period: i64,
    /// (series index, 10 s window) pairs sent: the edge summaries the agent will ship.
    pub windows_sent: HashSet<(u32, i64)>,
}

impl FleetMessages {
    pub fn new(devices: usize, seed: u64) -> Self {
        let fleet = Fleet::new(devices, seed);
        let series = fleet.series();
        Self {
            fleet,
            series,
            readings: Vec::new(),
            period: 0,
            windows_sent: HashSet::new(),
        }
    }

    /// Series in the fleet.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// The `site` tag of a fleet series (the fleet gives every series one).
    pub(crate) fn site_of(definition: &SeriesDef) -> &str {
        definition
            .key
            .tags
            .iter()
            .find(|(name, _)| name == "site")
            .map_or("site", |(_, value)| value.as_str())
    }

    /// The next sample period: one message per reading (the usual MQTT habit, one value per
    /// publish), all stamped `time_ms`. `edge_window_ms` is used to track the summaries.
    pub fn next_period_single(
        &mut self,
        time_ms: i64,
        edge_window_ms: i64,
    ) -> Vec<(String, Vec<u8>)> {
        self.readings.clear();
        self.fleet
            .sample_period(self.period * 1000, &mut self.readings);
        self.period += 1;
        let mut out = Vec::with_capacity(self.readings.len());
        for reading in &self.readings {
            let Some(definition) = self.series.get(reading.series as usize) else {
                continue;
            };
            self.windows_sent
                .insert((reading.series, time_ms.div_euclid(edge_window_ms)));
            let key = &definition.key;
            for message in encode_messages(
                MessageFormat::Json,
                Self::site_of(definition),
                &key.device_id,
                time_ms,
                &[(key.metric.as_str(), reading.value)],
            ) {
                out.push((message.topic, message.payload));
            }
        }
        out
    }

    /// The next sample period with each device's readings in one message (several
    /// readings per publish), for the throughput flood; the caller stamps `ts`.
    /// Returns (topic, payload without the timestamp, readings in it).
    pub fn next_period_per_device(&mut self) -> Vec<(String, String, usize)> {
        self.readings.clear();
        self.fleet
            .sample_period(self.period * 1000, &mut self.readings);
        self.period += 1;
        let mut per_device: Vec<(String, String, usize)> = Vec::new();
        for reading in &self.readings {
            let Some(definition) = self.series.get(reading.series as usize) else {
                continue;
            };
            let key = &definition.key;
            let topic = device_topic(Self::site_of(definition), &key.device_id);
            let field = format!("\"{}\":{},", key.metric, reading.value);
            match per_device.last_mut() {
                Some((last_topic, payload, count)) if *last_topic == topic => {
                    payload.push_str(&field);
                    *count += 1;
                }
                _ => per_device.push((topic, format!("{{{field}"), 1)),
            }
        }
        per_device
    }
}

/// Completes a payload from [`FleetMessages::next_period_per_device`] with its timestamp.
pub fn stamp(payload_without_time: &str, time_ms: i64) -> Vec<u8> {
    format!("{payload_without_time}\"ts\":{time_ms}}}").into_bytes()
}
