//! The IO shell of `tributary-sim run`: paces the simulation's ticks on the wall clock,
//! publishes over MQTT (rumqttc), writes the serial device, and writes the ledger at the end.
//!
//! The ledger is only true if what it counts reached the broker, so before a deliberate
//! disconnect and at the end the shell waits until every publish was acknowledged (QoS 1) or
//! written to the socket (QoS 0; a broker may still drop QoS 0 under load, which is why tests
//! use QoS 1).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::serial::{PseudoTerminal, SerialWriter};
use crate::sim::{Action, SimConfig, Simulation};

/// How to carry out a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `host:port` of the broker; `None` runs without MQTT (serial only, or a dry run).
    pub mqtt_address: Option<String>,
    pub qos: u8,
    pub duration_ms: i64,
    pub ledger_path: Option<PathBuf>,
    /// A stable symlink to the serial device's tty.
    pub serial_link: Option<PathBuf>,
    pub client_id: String,
    /// Prepended to every topic (`PREFIX/site/...`), so parallel runs and tests stay apart.
    pub topic_prefix: Option<String>,
    /// How long to wait for acknowledgements and for a serial reader at the end.
    pub drain_timeout: Duration,
    /// Set to end the run early (at the next tick), as if its duration had passed.
    pub stop: Option<Arc<AtomicBool>>,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub ticks: u64,
    pub messages_published: u64,
    pub serial_lines: u64,
    pub reconnects: u64,
    pub windowed_readings: u64,
}

struct Counters {
    sent: AtomicU64,
    acknowledged: AtomicU64,
    connected: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
}

/// One MQTT connection and the thread driving its event loop.
struct Publisher {
    client: Client,
    counters: Arc<Counters>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    qos: QoS,
    published: u64,
}

impl Publisher {
    fn connect(address: &str, client_id: &str, qos: QoS) -> anyhow::Result<Self> {
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_owned(), port.parse::<u16>().ok()?)))
            .with_context(|| format!("--mqtt must be HOST:PORT, got `{address}`"))?;
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(10));
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        // A persistent session: after a reconnect (an agent restart too) the client resends
        // the QoS 1 publishes it had in flight without a PUBACK; with a clean session rumqttc
        // drops them when the broker answers "session present = 0".
        options.set_clean_session(false);
        // After a drop rumqttc replays its in-flight publishes and its whole request channel
        // at once, past its in-flight limit, and packet ids wrap at that limit: a replay
        // larger than the id space collides with unacknowledged ids and rumqttc keeps only
        // the last colliding publish. An id space far above in-flight + channel capacity
        // (256) keeps every publish of a replay distinct.
        options.set_inflight(4096);
        let (client, mut connection) = Client::new(options, 256);
        let counters = Arc::new(Counters {
            sent: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            last_error: std::sync::Mutex::new(None),
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let counters = Arc::clone(&counters);
            let stopping = Arc::clone(&stopping);
            std::thread::spawn(move || {
                for event in connection.iter() {
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            counters.connected.store(true, Ordering::SeqCst)
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            counters.acknowledged.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                            counters.sent.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                            if stopping.load(Ordering::SeqCst) {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(error) => {
                            counters.connected.store(false, Ordering::SeqCst);
                            if stopping.load(Ordering::SeqCst) {
                                break;
                            }
                            if let Ok(mut last) = counters.last_error.lock() {
                                *last = Some(error.to_string());
                            }
                            tracing::warn!(%error, "MQTT connection failed; retrying");
                            // The event loop reconnects on the next poll; do not spin.
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })
        };
        Ok(Self {
            client,
            counters,
            stopping,
            thread: Some(thread),
            qos,
            published: 0,
        })
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic.clone(), self.qos, false, payload)
            .with_context(|| format!("publishing to {topic}: the MQTT client has stopped"))?;
        self.published += 1;
        Ok(())
    }

    /// Waits until every publish was acknowledged (QoS 1) or sent (QoS 0).
    fn drain(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = match self.qos {
                QoS::AtMostOnce => self.counters.sent.load(Ordering::SeqCst),
                _ => self.counters.acknowledged.load(Ordering::SeqCst),
            };
            if done >= self.published {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let last_error = self
                    .counters
                    .last_error
                    .lock()
                    .ok()
                    .and_then(|last| last.clone());
                bail!(
                    "only {done} of {} MQTT publishes confirmed after {timeout:?} (last error: {}); is the broker reachable?",
                    self.published,
                    last_error.unwrap_or_else(|| "none".into())
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn close(mut self, timeout: Duration) -> anyhow::Result<()> {
        let drained = self.drain(timeout);
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.client.disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        drained
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// Runs the simulation in real time. `on_serial_ready` is called with the tty path before the
/// first tick (the binary prints it for the agent).
pub fn run(
    config: SimConfig,
    options: &RunOptions,
    on_serial_ready: impl FnOnce(&std::path::Path),
) -> anyhow::Result<RunSummary> {
    let qos = match options.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        other => bail!("--qos must be 0 or 1, got {other}"),
    };
    let serial_enabled = config.serial;
    let mut sim = Simulation::new(config, now_ms())?;
    let serial = if serial_enabled {
        let terminal = PseudoTerminal::open()?;
        if let Some(link) = &options.serial_link {
            terminal.symlink(link)?;
        }
        let writer = SerialWriter::start(terminal);
        on_serial_ready(&writer.device_path);
        Some(writer)
    } else {
        None
    };
    let connect = || -> anyhow::Result<Option<Publisher>> {
        options
            .mqtt_address
            .as_deref()
            .map(|address| Publisher::connect(address, &options.client_id, qos))
            .transpose()
    };
    let mut publisher = connect()?;
    let offsets = sim.tick_offsets_ms(options.duration_ms);
    let started = Instant::now();
    let mut reconnects = 0;
    let mut summary_ticks = 0;
    let mut execute =
        |actions: Vec<Action>, publisher: &mut Option<Publisher>| -> anyhow::Result<()> {
            for action in actions {
                match action {
                    Action::Publish(message) => {
                        if let Some(publisher) = publisher.as_mut() {
                            let topic = match &options.topic_prefix {
                                Some(prefix) => format!("{prefix}/{}", message.topic),
                                None => message.topic,
                            };
                            publisher.publish(topic, message.payload)?;
                        }
                    }
                    Action::SerialWrite(line) => {
                        if let Some(serial) = &serial {
                            serial.write(line);
                        }
                    }
                    Action::Reconnect => {
                        if let Some(old) = publisher.take() {
                            old.close(options.drain_timeout)?;
                            reconnects += 1;
                            *publisher = connect()?;
                        }
                    }
                }
            }
            Ok(())
        };
    for offset_ms in offsets {
        if options
            .stop
            .as_ref()
            .is_some_and(|stop| stop.load(Ordering::SeqCst))
        {
            break;
        }
        let due = started + Duration::from_millis(offset_ms.max(0) as u64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        execute(sim.tick(offset_ms), &mut publisher)?;
        summary_ticks += 1;
    }
    execute(sim.finish(), &mut publisher)?;
    if let Some(publisher) = publisher {
        publisher.close(options.drain_timeout)?;
    }
    let serial_lines = match serial {
        Some(writer) => writer
            .finish(options.drain_timeout)
            .context("finishing the serial device")?,
        None => 0,
    };
    if let Some(path) = &options.ledger_path {
        std::fs::write(path, sim.ledger().to_json_lines())
            .with_context(|| format!("writing the ledger to {}", path.display()))?;
    }
    Ok(RunSummary {
        ticks: summary_ticks,
        messages_published: sim.messages_emitted(),
        serial_lines,
        reconnects,
        windowed_readings: sim.ledger().windowed_reading_count(),
    })
}
