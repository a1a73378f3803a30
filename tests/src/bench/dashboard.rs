//! `bench dashboard`: how fresh the live push is and how many dashboards one collector
//! serves at that freshness (issue 7).
//!
//! A release collector (embedded log and store) and agent run on loopback; a 100-device
//! fleet (1,000 series at 1 Hz) publishes to the agent's broker all the time. WebSocket
//! clients of `/api/v1/live` each subscribe like a device page of the dashboard: the marker
//! device plus one fleet device, windows and readings. Every 100 ms a marker reading is
//! published on MQTT; freshness is the time from just before that publish to its arrival
//! at a client (both instants taken in this process, so no clock skew), over every client
//! and marker of a step. Markers rotate over 20 metrics because the live feed pushes only
//! the newest reading of a series per processor step.
//!
//! Clients are added in steps (10, 100, 250, 500, 1000 in a full run); a step is good when
//! its p99 is under 1 s, no client saw an error or a `lagged` skip, and every marker
//! reached every client. `clients` is the largest good step; `p50_ms`/`p99_ms` are measured
//! at it. Client threads run in the bench process on the same two cores as the collector
//! and agent, so the figure is conservative.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};
use tributary_firmware_sim::cluster::{
    wait_for, Agent, AgentSpec, Binaries, Collector, CollectorSpec,
};

use super::e2e::mqtt::{now_ms, FleetMessages, Publisher};
use super::e2e::AGENT_MAX_BATCH_AGE_MS;
use super::{percentile, round3, BenchOptions};

const AGENT_ID: &str = "bench-dashboard";
const MARKER_DEVICE: &str = "bench-marker";
const MARKER_TOPIC: &str = "site/bench/dev/bench-marker";
const MARKER_METRICS: usize = 20;
const MARKER_INTERVAL: Duration = Duration::from_millis(100);
const FLEET_DEVICES: usize = 100;
/// The freshness goal of issue 7.
const GOAL_P99_MS: f64 = 1_000.0;
/// Most markers a run publishes (sizes the table of publish instants).
const MAX_MARKERS: usize = 100_000;

struct Sizes {
    repetitions: usize,
    steps: Vec<usize>,
    step_duration: Duration,
}

/// State shared by the client threads and the marker publisher.
struct Shared {
    start: Instant,
    /// Nanoseconds since `start` at each marker's publish; 0 = not published.
    published_ns: Vec<AtomicU64>,
    /// Latencies of the current step, in ms.
    latencies_ms: Mutex<Vec<f64>>,
    /// Markers received in the current step (over all clients).
    received: AtomicU64,
    /// Markers at or after this sequence count for the current step.
    step_first_marker: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    subscribed: AtomicUsize,
    stop: AtomicBool,
}

impl Shared {
    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut slot) = self.first_error.lock() {
            slot.get_or_insert(message);
        }
    }
}

/// One dashboard page: a WebSocket client on its own thread.
fn spawn_client(
    api: SocketAddr,
    fleet_device: String,
    shared: Arc<Shared>,
) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ws-client".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            if let Err(error) = client_loop(api, &fleet_device, &shared) {
                if !shared.stop.load(Ordering::SeqCst) {
                    shared.error(format!("{error:#}"));
                }
            }
        })
        .context("starting a WebSocket client thread")
}

fn client_loop(api: SocketAddr, fleet_device: &str, shared: &Shared) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&api, Duration::from_secs(10))
        .with_context(|| format!("connecting to {api}"))?;
    // The handshake blocks (up to 30 s); only then does a short timeout let the loop see
    // the stop flag. A short timeout during the handshake would abort it under load.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let reader = stream.try_clone().context("cloning the client socket")?;
    let (mut socket, _) = tungstenite::client(format!("ws://{api}/api/v1/live"), stream)
        .map_err(|error| anyhow::anyhow!("WebSocket handshake with {api}: {error}"))?;
    reader.set_read_timeout(Some(Duration::from_millis(200)))?;
    let subscribe = json!({"type": "subscribe", "devices": [MARKER_DEVICE, fleet_device]});
    socket
        .send(Message::text(subscribe.to_string()))
        .context("sending the subscription")?;
    let mut subscribed = false;
    while !shared.stop.load(Ordering::SeqCst) {
        let message = match socket.read() {
            Ok(message) => message,
            Err(tungstenite::Error::Io(error))
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(error) => bail!("reading the live socket: {error}"),
        };
        let Message::Text(text) = message else {
            continue;
        };
        let text = text.as_str();
        if !subscribed {
            if text.contains("\"subscribed\"") {
                subscribed = true;
                shared.subscribed.fetch_add(1, Ordering::SeqCst);
            }
            continue;
        }
        if text.contains("\"lagged\"") || text.contains("\"error\"") {
            bail!("the collector sent {text}");
        }
        if !text.contains(MARKER_DEVICE) {
            continue;
        }
        let arrived_ns = shared.start.elapsed().as_nanos() as u64;
        let value: Value = serde_json::from_str(text).context("parsing a data message")?;
        for reading in value["readings"].as_array().into_iter().flatten() {
            if reading["device_id"] != MARKER_DEVICE {
                continue;
            }
            let Some(sequence) = reading["value"].as_f64().map(|value| value as usize) else {
                continue;
            };
            if (sequence as u64) < shared.step_first_marker.load(Ordering::SeqCst) {
                continue;
            }
            let Some(published) = shared.published_ns.get(sequence) else {
                continue;
            };
            let published = published.load(Ordering::SeqCst);
            if published == 0 {
                continue;
            }
            let latency_ms = arrived_ns.saturating_sub(published) as f64 / 1e6;
            shared.received.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut latencies) = shared.latencies_ms.lock() {
                latencies.push(latency_ms);
            }
        }
    }
    let _ = socket.close(None);
    Ok(())
}

/// What one step of the ramp measured.
#[derive(Debug, Clone)]
struct Step {
    clients: usize,
    p50_ms: f64,
    p99_ms: f64,
    markers: u64,
    expected: u64,
    received: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Step {
    fn good(&self) -> bool {
        self.p99_ms <= GOAL_P99_MS && self.errors == 0 && self.received >= self.expected
    }

    fn to_json(&self) -> Value {
        json!({
            "clients": self.clients,
            "p50_ms": round3(self.p50_ms),
            "p99_ms": round3(self.p99_ms),
            "markers": self.markers,
            "deliveries_expected": self.expected,
            "deliveries_received": self.received,
            "errors": self.errors,
            "first_error": self.first_error,
            "good": self.good(),
        })
    }
}

/// Runs the bench: one JSON line.
pub fn run(options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    let binaries = Binaries::locate().context(
        "bench dashboard runs the real agent and collector: `cargo build --release -p \
         tributary-agent -p tributary-collector` first",
    )?;
    let sizes = if options.quick {
        Sizes {
            repetitions: 1,
            steps: vec![10, 100],
            step_duration: Duration::from_secs(4),
        }
    } else {
        Sizes {
            repetitions: 3,
            steps: vec![10, 100, 250, 500, 1000],
            step_duration: Duration::from_secs(10),
        }
    };
    let mut ramps = Vec::new();
    for repetition in 0..sizes.repetitions {
        eprintln!(
            "bench dashboard: run {}/{}",
            repetition + 1,
            sizes.repetitions
        );
        ramps.push(one_ramp(&binaries, &sizes)?);
    }
    // Per run: the largest good step (or the first step, marked bad, if none was good).
    let chosen: Vec<Step> = ramps
        .iter()
        .map(|ramp| {
            ramp.iter()
                .rev()
                .find(|step| step.good())
                .or_else(|| ramp.first())
                .cloned()
        })
        .collect::<Option<_>>()
        .context("a ramp measured no step")?;
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        percentile(&values, 0.5)
    };
    let clients = median(
        chosen
            .iter()
            .map(|step| {
                if step.good() {
                    step.clients as f64
                } else {
                    0.0
                }
            })
            .collect(),
    );
    Ok(vec![json!({
        "bench": "dashboard",
        "p50_ms": round3(median(chosen.iter().map(|step| step.p50_ms).collect())),
        "p99_ms": round3(median(chosen.iter().map(|step| step.p99_ms).collect())),
        "clients": clients as u64,
        "goal_p99_ms": GOAL_P99_MS,
        "fleet_series": FLEET_DEVICES * 10,
        "marker_interval_ms": MARKER_INTERVAL.as_millis() as u64,
        "agent_max_batch_age_ms": AGENT_MAX_BATCH_AGE_MS,
        "runs": ramps
            .iter()
            .map(|ramp| ramp.iter().map(Step::to_json).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        "quick": options.quick,
    })])
}

fn one_ramp(binaries: &Binaries, sizes: &Sizes) -> anyhow::Result<Vec<Step>> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let mut collector = Collector::start(
        binaries,
        &CollectorSpec {
            dir: dir.path().join("collector"),
            agent_ids: vec![AGENT_ID.into()],
            extra_config: String::new(),
            api_port: None,
        },
    )?;
    let mut spec = AgentSpec::new(dir.path().join("agent"), AGENT_ID, &collector)?;
    spec.extra_config = format!("[batching]\nmax_batch_age_ms = {AGENT_MAX_BATCH_AGE_MS}\n");
    let mut agent = Agent::start(binaries, &spec)?;
    let shared = Arc::new(Shared {
        start: Instant::now(),
        published_ns: (0..MAX_MARKERS).map(|_| AtomicU64::new(0)).collect(),
        latencies_ms: Mutex::new(Vec::new()),
        received: AtomicU64::new(0),
        step_first_marker: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        subscribed: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    });

    // The background fleet at 1 Hz for the whole ramp.
    let stop_fleet = Arc::new(AtomicBool::new(false));
    let fleet_thread = {
        let stop_fleet = stop_fleet.clone();
        let mut publisher = Publisher::connect(agent.broker_address, "bench-dashboard-fleet")?;
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut fleet = FleetMessages::new(FLEET_DEVICES, 2024);
            let start = Instant::now();
            let mut second = 0;
            while !stop_fleet.load(Ordering::SeqCst) {
                let due = start + Duration::from_secs(second);
                if let Some(remaining) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(remaining.min(Duration::from_millis(100)));
                    continue;
                }
                for (topic, payload) in fleet.next_period_single(now_ms(), 10_000) {
                    publisher.publish(&topic, payload)?;
                }
                publisher.check()?;
                second += 1;
            }
            Ok(())
        })
    };
    let mut markers = Publisher::connect(agent.broker_address, "bench-dashboard-marker")?;
    let fleet_devices: Vec<String> = (0..FLEET_DEVICES)
        .map(|index| format!("dev-{index:04}"))
        .collect();
    let outcome = (|| -> anyhow::Result<Vec<Step>> {
        let mut clients: Vec<JoinHandle<()>> = Vec::new();
        let mut next_marker = 1_usize;
        let mut steps = Vec::new();
        for &target in &sizes.steps {
            while clients.len() < target {
                let device = fleet_devices
                    .get(clients.len() % fleet_devices.len())
                    .cloned()
                    .unwrap_or_default();
                clients.push(spawn_client(collector.api_address, device, shared.clone())?);
            }
            wait_for(
                &format!("{target} WebSocket clients to subscribe"),
                Duration::from_secs(120),
                || {
                    collector.process.check_running()?;
                    if shared.errors.load(Ordering::SeqCst) > 0 {
                        return Ok(Some(()));
                    }
                    Ok((shared.subscribed.load(Ordering::SeqCst) >= target).then_some(()))
                },
            )?;
            // A new step: forget what earlier markers did.
            shared
                .step_first_marker
                .store(next_marker as u64, Ordering::SeqCst);
            shared.received.store(0, Ordering::SeqCst);
            if let Ok(mut latencies) = shared.latencies_ms.lock() {
                latencies.clear();
            }
            let errors_before = shared.errors.load(Ordering::SeqCst);
            let step_start = Instant::now();
            let first = next_marker;
            while step_start.elapsed() < sizes.step_duration && next_marker < MAX_MARKERS {
                let due = step_start + MARKER_INTERVAL * (next_marker - first) as u32;
                if let Some(remaining) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(remaining);
                }
                let metric = format!("freshness_{}", next_marker % MARKER_METRICS);
                let payload = format!("{{\"{metric}\":{next_marker},\"ts\":{}}}", now_ms());
                if let Some(slot) = shared.published_ns.get(next_marker) {
                    slot.store(
                        shared.start.elapsed().as_nanos().max(1) as u64,
                        Ordering::SeqCst,
                    );
                }
                markers.publish(MARKER_TOPIC, payload.into_bytes())?;
                next_marker += 1;
            }
            let step_markers = (next_marker - first) as u64;
            let expected = step_markers * target as u64;
            // Late arrivals still count (with their latency) until everything is in or 3 s
            // pass; a marker that never arrives makes the step bad.
            let _ = wait_for(
                "every marker at every client",
                Duration::from_secs(3),
                || Ok((shared.received.load(Ordering::SeqCst) >= expected).then_some(())),
            );
            let mut latencies = shared
                .latencies_ms
                .lock()
                .map(|latencies| latencies.clone())
                .unwrap_or_default();
            latencies.sort_by(f64::total_cmp);
            let step = Step {
                clients: target,
                p50_ms: percentile(&latencies, 0.5),
                p99_ms: percentile(&latencies, 0.99),
                markers: step_markers,
                expected,
                received: shared.received.load(Ordering::SeqCst),
                errors: shared.errors.load(Ordering::SeqCst) - errors_before,
                first_error: shared.first_error.lock().ok().and_then(|slot| slot.clone()),
            };
            eprintln!("bench dashboard: {}", step.to_json());
            let good = step.good();
            steps.push(step);
            if !good {
                break;
            }
        }
        shared.stop.store(true, Ordering::SeqCst);
        for client in clients {
            let _ = client.join();
        }
        Ok(steps)
    })();
    shared.stop.store(true, Ordering::SeqCst);
    stop_fleet.store(true, Ordering::SeqCst);
    let fleet_outcome = fleet_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the fleet publisher thread panicked"))?;
    let steps = outcome?;
    fleet_outcome?;
    agent.process.check_running()?;
    agent.process.stop(Duration::from_secs(20))?;
    collector.process.stop(Duration::from_secs(30))?;
    Ok(steps)
}
