//! `bench e2e`: the whole pipeline with real processes (issue 6), once on the embedded log
//! and store and once on Kafka + ClickHouse. Release binaries of the agent and collector run
//! on loopback with generated configs (`tributary_firmware_sim::cluster`).
//!
//! Each run has two phases on one collector:
//!
//! 1. **Live** (freshness and uplink bytes): a 100-device fleet (1,000 series at 1 Hz, one
//!    JSON reading per MQTT message, the usual sensor habit) publishes to the agent's
//!    embedded broker; the agent ships through a counting [`UdpRelay`]. The very same
//!    messages go to the do-it-yourself baseline ([`bridge`]: gateway Mosquitto bridged to a
//!    cloud Mosquitto through a counting TCP relay). Meanwhile marker readings, one at a
//!    time, are published with the wall clock as sensor timestamp and the query API
//!    (`/api/v1/raw` for that one timestamp) is polled every 5 ms until the reading is
//!    queryable: freshness = the time it was first seen minus its timestamp. Bytes are read
//!    once every reading was acknowledged to the agent by the collector and (full runs)
//!    every edge summary of the sent windows arrived, and once every message crossed the
//!    bridge; both count payload bytes both ways (IP/UDP/TCP headers excluded), from after
//!    both uplinks connected.
//! 2. **Flood** (sustained readings/s): a second agent, connected directly, is flooded by
//!    two publisher connections (1,000 devices, one message per device with its 10
//!    readings). The rate is readings the processor handed to the store
//!    (`tributary_processor_readings_total`) per second over a steady interval after a
//!    warm-up; the agent's intake over the same interval is reported beside it, and the run
//!    waits until the store has every reading the agent took in (`drain_after_flood_s`).
//!
//! The agent runs with `[batching] max_batch_age_ms = 250` (the default, 1000, is the floor
//! of live latency and alone would put p99 over a second); bytes and freshness are
//! measured on the same configuration.

pub mod bridge;
pub mod mqtt;
pub mod stages;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tributary_firmware_sim::cluster::{
    http_get, metric_value, wait_for, Agent, AgentSpec, Binaries, Collector, CollectorSpec,
    UdpRelay,
};
use tributary_firmware_sim::observe::encode_query_value;

use self::bridge::Bridge;
use self::mqtt::{now_ms, stamp, FleetMessages, Publisher};
use super::{percentile, round3, BenchOptions};
use crate::services::{
    lookup_service_env, running_in_ci, unique_suffix, CLICKHOUSE_URL, KAFKA_BROKERS,
};

/// The agent's edge window (`AgentSpec` default), to know which summaries it will ship.
const EDGE_WINDOW_MS: i64 = 10_000;
/// Batch age at which the agent cuts a live batch, for both phases.
pub const AGENT_MAX_BATCH_AGE_MS: u64 = 250;
const LIVE_AGENT: &str = "bench-e2e-live";
const FLOOD_AGENT: &str = "bench-e2e-flood";
const MARKER_DEVICE: &str = "bench-marker";
const MARKER_METRIC: &str = "freshness";
const MARKER_TOPIC: &str = "site/bench/dev/bench-marker";
/// Polling period of the query API while waiting for a marker.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
const FLOOD_PUBLISHERS: usize = 2;

/// How much work one run does.
#[derive(Debug, Clone)]
struct Sizes {
    repetitions: usize,
    live_devices: usize,
    live_seconds: u64,
    markers: usize,
    marker_spacing: Duration,
    wait_for_summaries: bool,
    flood_devices: usize,
    flood_warmup: Duration,
    flood_measure: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                repetitions: 1,
                live_devices: 100,
                live_seconds: 5,
                markers: 15,
                marker_spacing: Duration::from_millis(50),
                wait_for_summaries: false,
                flood_devices: 1_000,
                flood_warmup: Duration::from_secs(2),
                flood_measure: Duration::from_secs(4),
            }
        } else {
            Self {
                repetitions: 3,
                live_devices: 100,
                live_seconds: 30,
                markers: 100,
                marker_spacing: Duration::from_millis(150),
                wait_for_summaries: true,
                flood_devices: 1_000,
                flood_warmup: Duration::from_secs(5),
                flood_measure: Duration::from_secs(15),
            }
        }
    }
}

/// Where the collector keeps its log and store.
#[derive(Debug, Clone)]
enum Setup {
    Embedded,
    KafkaClickHouse {
        brokers: String,
        clickhouse_url: String,
    },
}

impl Setup {
    fn name(&self) -> &'static str {
        match self {
            Setup::Embedded => "embedded",
            Setup::KafkaClickHouse { .. } => "kafka-clickhouse",
        }
    }
}

/// The release binaries next to the bench binary, or a message saying how to build them.
fn release_binaries() -> anyhow::Result<Binaries> {
    Binaries::locate().context(
        "bench e2e and bench dashboard run the real agent and collector: build them with the \
         same profile as the bench first: `cargo build --release -p tributary-agent -p \
         tributary-collector` (an older build next to the bench would be measured instead)",
    )
}

/// Runs the bench: one JSON line per setup.
pub fn run(options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    let binaries = release_binaries()?;
    let sizes = Sizes::new(options.quick);
    let mut setups = vec![Setup::Embedded];
    // `TRIBUTARY_BENCH_E2E_SETUPS=kafka-clickhouse` (comma-separated names) measures only those.
    let only = std::env::var("TRIBUTARY_BENCH_E2E_SETUPS").ok();
    match (
        lookup_service_env(KAFKA_BROKERS),
        lookup_service_env(CLICKHOUSE_URL),
    ) {
        (Some(brokers), Some(clickhouse_url)) => setups.push(Setup::KafkaClickHouse {
            brokers,
            clickhouse_url,
        }),
        _ if running_in_ci() => bail!(
            "CI=true and Kafka or ClickHouse is not configured: run `deploy/dev/services.sh up`"
        ),
        _ => eprintln!(
            "bench e2e: Kafka/ClickHouse not configured (deploy/dev/services.sh up); \
             measuring the embedded setup only"
        ),
    }
    if let Some(only) = &only {
        setups.retain(|setup| only.split(',').any(|name| name.trim() == setup.name()));
    }
    let mut lines = Vec::new();
    for setup in &setups {
        let mut runs = Vec::new();
        for repetition in 0..sizes.repetitions {
            eprintln!(
                "bench e2e: {} run {}/{}",
                setup.name(),
                repetition + 1,
                sizes.repetitions
            );
            runs.push(one_run(setup, &binaries, &sizes)?);
        }
        lines.push(summarise(setup, &sizes, &runs));
    }
    Ok(lines)
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
struct RunFigures {
    readings_per_s: f64,
    agent_intake_readings_per_s: f64,
    drain_after_flood_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    markers: usize,
    live_readings: u64,
    bytes_up: u64,
    bytes_down: u64,
    baseline_bytes_up: u64,
    baseline_bytes_down: u64,
    /// What the agent handed to QUIC over the same interval as `bytes_up`, by part.
    ship: ShipBytes,
    /// Where the markers' time went: the collector's stage histograms over the marker phase
    /// ([`stages`]), plus the query that first saw each marker (`query_ms`).
    stages: Value,
}

/// The agent's batch payload bytes (its `tributary_agent_ship_*bytes_sent_total` counters):
/// raw and summary batches without their series definitions, and the definitions apart.
/// Whatever the relay counted beyond their sum is transport: QUIC and TLS (handshake,
/// packet headers, ACK frames), stream framing and the collector's answers.
#[derive(Debug, Clone, Copy, Default)]
struct ShipBytes {
    raw: u64,
    summary: u64,
    definitions: u64,
    total: u64,
}

impl ShipBytes {
    fn read(agent: &Agent) -> anyhow::Result<Self> {
        let text = agent.metrics()?;
        let counter = |name: &str| metric_value(&text, name, &[]).unwrap_or(0.0) as u64;
        Ok(Self {
            raw: counter("tributary_agent_ship_raw_bytes_sent_total"),
            summary: counter("tributary_agent_ship_summary_bytes_sent_total"),
            definitions: counter("tributary_agent_ship_definition_bytes_sent_total"),
            total: counter("tributary_agent_ship_bytes_sent_total"),
        })
    }

    fn since(self, start: ShipBytes) -> Self {
        Self {
            raw: self.raw.saturating_sub(start.raw),
            summary: self.summary.saturating_sub(start.summary),
            definitions: self.definitions.saturating_sub(start.definitions),
            total: self.total.saturating_sub(start.total),
        }
    }
}

impl RunFigures {
    fn per_reading(&self, bytes: u64) -> f64 {
        bytes as f64 / self.live_readings.max(1) as f64
    }

    /// Uplink transport: what the relay carried up beyond the agent's batch payloads.
    fn transport_up_bytes(&self) -> u64 {
        self.bytes_up.saturating_sub(self.ship.total)
    }

    /// Both directions without the session's series definitions: what a long-lived
    /// gateway session pays per reading once its dictionary has been sent.
    fn steady_bytes_per_reading(&self) -> f64 {
        self.per_reading((self.bytes_up + self.bytes_down).saturating_sub(self.ship.definitions))
    }

    fn bytes_per_reading(&self) -> f64 {
        (self.bytes_up + self.bytes_down) as f64 / self.live_readings.max(1) as f64
    }

    fn baseline_bytes_per_reading(&self) -> f64 {
        (self.baseline_bytes_up + self.baseline_bytes_down) as f64
            / self.live_readings.max(1) as f64
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5)
}

fn summarise(setup: &Setup, sizes: &Sizes, runs: &[RunFigures]) -> Value {
    let field = |pick: &dyn Fn(&RunFigures) -> f64| median(runs.iter().map(pick).collect());
    let bytes = field(&|run| run.bytes_per_reading());
    let baseline = field(&|run| run.baseline_bytes_per_reading());
    let steady = field(&|run| run.steady_bytes_per_reading());
    // Where the bytes go (medians of each part, so they need not add up exactly).
    let split = |run: &RunFigures| {
        json!({
            "raw_batches": round3(run.per_reading(run.ship.raw)),
            "summary_batches": round3(run.per_reading(run.ship.summary)),
            "dictionary": round3(run.per_reading(run.ship.definitions)),
            "transport_up": round3(run.per_reading(run.transport_up_bytes())),
            "down": round3(run.per_reading(run.bytes_down)),
        })
    };
    let split_median = json!({
        "raw_batches": round3(field(&|run| run.per_reading(run.ship.raw))),
        "summary_batches": round3(field(&|run| run.per_reading(run.ship.summary))),
        "dictionary": round3(field(&|run| run.per_reading(run.ship.definitions))),
        "transport_up": round3(field(&|run| run.per_reading(run.transport_up_bytes()))),
        "down": round3(field(&|run| run.per_reading(run.bytes_down))),
    });
    let per_run: Vec<Value> = runs
        .iter()
        .map(|run| {
            json!({
                "readings_per_s": run.readings_per_s.round(),
                "p50_ms": round3(run.p50_ms),
                "p99_ms": round3(run.p99_ms),
                "bytes_per_reading": round3(run.bytes_per_reading()),
                "baseline_mosquitto_bridge_bytes_per_reading": round3(run.baseline_bytes_per_reading()),
                "steady_bytes_per_reading": round3(run.steady_bytes_per_reading()),
                "split_bytes_per_reading": split(run),
                "stages": run.stages,
            })
        })
        .collect();
    json!({
        "bench": "e2e",
        "setup": setup.name(),
        "readings_per_s": field(&|run| run.readings_per_s).round(),
        "p50_ms": round3(field(&|run| run.p50_ms)),
        "p99_ms": round3(field(&|run| run.p99_ms)),
        "bytes_per_reading": round3(bytes),
        "baseline_mosquitto_bridge_bytes_per_reading": round3(baseline),
        "baseline_over_ours": round3(baseline / bytes.max(f64::MIN_POSITIVE)),
        "steady_bytes_per_reading": round3(steady),
        "baseline_over_ours_steady": round3(baseline / steady.max(f64::MIN_POSITIVE)),
        "split_bytes_per_reading": split_median,
        "agent_intake_readings_per_s": field(&|run| run.agent_intake_readings_per_s).round(),
        "drain_after_flood_s": round3(field(&|run| run.drain_after_flood_s)),
        "max_ms": round3(field(&|run| run.max_ms)),
        "bytes_up_per_reading": round3(field(&|run| run.bytes_up as f64 / run.live_readings.max(1) as f64)),
        "baseline_bytes_up_per_reading": round3(field(&|run| run.baseline_bytes_up as f64 / run.live_readings.max(1) as f64)),
        "markers_per_run": runs.first().map_or(0, |run| run.markers),
        "live_readings_per_run": runs.first().map_or(0, |run| run.live_readings),
        "live_series": sizes.live_devices * 10,
        "agent_max_batch_age_ms": AGENT_MAX_BATCH_AGE_MS,
        "summaries_counted": sizes.wait_for_summaries,
        "runs": per_run,
        "quick": sizes.repetitions == 1,
    })
}

/// Names created in the shared services for one run, removed at the end.
struct ServiceNames {
    brokers: String,
    clickhouse_url: String,
    topic: String,
    database: String,
}

impl Drop for ServiceNames {
    fn drop(&mut self) {
        let brokers = self.brokers.clone();
        let topic = self.topic.clone();
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(delete_topic(&brokers, &topic));
        }
        let _ = clickhouse_post(
            &self.clickhouse_url,
            &format!("DROP DATABASE IF EXISTS {}", self.database),
        );
    }
}

async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .with_context(|| format!("kafka at {brokers}: creating an admin client"))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new_topic = NewTopic::new(topic, 2, TopicReplication::Fixed(1))
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
    let _ = admin.delete_topics(&[topic], &AdminOptions::new()).await;
}

/// One statement to ClickHouse over HTTP (POST), for cleanup.
fn clickhouse_post(url: &str, statement: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let address: SocketAddr = authority
        .parse()
        .with_context(|| format!("ClickHouse URL {url} is not http://IP:PORT"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "POST / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{statement}",
        statement.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 200") {
        bail!("ClickHouse answered {answer:?} to {statement:?}");
    }
    Ok(())
}

fn collector_metric(collector: &Collector, name: &str) -> anyhow::Result<f64> {
    Ok(metric_value(&collector.metrics()?, name, &[]).unwrap_or(0.0))
}

fn agent_metric(agent: &Agent, name: &str) -> anyhow::Result<f64> {
    Ok(metric_value(&agent.metrics()?, name, &[]).unwrap_or(0.0))
}

/// Sleeps until `instant` (pacing a publisher, not synchronising on a condition).
fn sleep_until(instant: Instant) {
    if let Some(remaining) = instant.checked_duration_since(Instant::now()) {
        std::thread::sleep(remaining);
    }
}

fn one_run(setup: &Setup, binaries: &Binaries, sizes: &Sizes) -> anyhow::Result<RunFigures> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let (extra_config, _names) = match setup {
        Setup::Embedded => (String::new(), None),
        Setup::KafkaClickHouse {
            brokers,
            clickhouse_url,
        } => {
            let suffix = unique_suffix();
            let names = ServiceNames {
                brokers: brokers.clone(),
                clickhouse_url: clickhouse_url.clone(),
                topic: format!("tributary.bench.e2e.{suffix}"),
                database: format!("tributary_bench_e2e_{suffix}"),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(create_topic(brokers, &names.topic))?;
            let config = format!(
                "[log]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\n\n\
                 [store]\nkind = \"clickhouse\"\nurl = \"{clickhouse_url}\"\ndatabase = \"{database}\"\n",
                topic = names.topic,
                database = names.database,
            );
            (config, Some(names))
        }
    };
    let mut collector = Collector::start(
        binaries,
        &CollectorSpec {
            dir: dir.path().join("collector"),
            agent_ids: vec![LIVE_AGENT.into(), FLOOD_AGENT.into()],
            extra_config,
            api_port: None,
        },
    )?;
    let batching = format!("[batching]\nmax_batch_age_ms = {AGENT_MAX_BATCH_AGE_MS}\n");
    let mut figures = live_phase(&mut collector, binaries, sizes, dir.path(), &batching)
        .with_context(|| format!("{}: live phase", setup.name()))?;
    flood_phase(
        &mut collector,
        binaries,
        sizes,
        dir.path(),
        &batching,
        figures.live_readings,
        &mut figures,
    )
    .with_context(|| format!("{}: flood phase", setup.name()))?;
    collector.process.stop(Duration::from_secs(30))?;
    Ok(figures)
}

/// The marker series' selector, once the store lists it.
fn marker_selector(api: SocketAddr) -> anyhow::Result<Option<String>> {
    let (status, body) = http_get(api, "/api/v1/series")?;
    if status != 200 {
        bail!("GET /api/v1/series answered {status}: {body}");
    }
    let answer: Value = serde_json::from_str(&body).context("parsing /api/v1/series")?;
    Ok(answer["series"].as_array().and_then(|series| {
        series
            .iter()
            .find(|entry| entry["device_id"] == MARKER_DEVICE && entry["metric"] == MARKER_METRIC)
            .and_then(|entry| entry["selector"].as_str().map(str::to_string))
    }))
}

/// Whether the raw reading of the marker series at `time_ms` is queryable.
fn marker_queryable(api: SocketAddr, selector: &str, time_ms: i64) -> anyhow::Result<bool> {
    let path = format!(
        "/api/v1/raw?series={}&from_ms={time_ms}&to_ms={}",
        encode_query_value(selector),
        time_ms + 1
    );
    let (status, body) = http_get(api, &path)?;
    if status != 200 {
        bail!("GET {path} answered {status}: {body}");
    }
    let answer: Value = serde_json::from_str(&body).with_context(|| format!("parsing {path}"))?;
    Ok(answer["readings"]
        .as_array()
        .is_some_and(|readings| !readings.is_empty()))
}

fn marker_payload(sequence: usize, time_ms: i64) -> Vec<u8> {
    format!("{{\"{MARKER_METRIC}\":{sequence},\"ts\":{time_ms}}}").into_bytes()
}

fn live_phase(
    collector: &mut Collector,
    binaries: &Binaries,
    sizes: &Sizes,
    dir: &std::path::Path,
    batching: &str,
) -> anyhow::Result<RunFigures> {
    let relay = UdpRelay::start(collector.quic_address)?;
    let mut spec = AgentSpec::new(dir.join("agent-live"), LIVE_AGENT, collector)?;
    spec.collector_address = relay.address;
    spec.extra_config = batching.to_string();
    let mut agent = Agent::start(binaries, &spec)?;
    let bridge = Bridge::start(&dir.join("bridge"))?;
    wait_for(
        "the live agent to connect to the collector",
        Duration::from_secs(30),
        || {
            agent.process.check_running()?;
            Ok(
                (collector_metric(collector, "tributary_ingest_connected_agents")? >= 1.0)
                    .then_some(()),
            )
        },
    )?;
    let mut fleet_to_agent = Publisher::connect(agent.broker_address, "bench-fleet")?;
    let mut fleet_to_bridge = Publisher::connect(bridge.gateway_address(), "bench-fleet")?;
    let mut marker_to_agent = Publisher::connect(agent.broker_address, "bench-marker")?;
    let mut marker_to_bridge = Publisher::connect(bridge.gateway_address(), "bench-marker")?;
    let (start_up, start_down) = (relay.bytes_up(), relay.bytes_down());
    let ship_start = ShipBytes::read(&agent)?;
    let (bridge_start_up, bridge_start_down) = bridge.bytes();
    let bridge_start_delivered = bridge.delivered();
    let readings_before = collector_metric(collector, "tributary_ingest_readings_total")? as u64;
    let summaries_before = collector_metric(collector, "tributary_ingest_summaries_total")? as u64;

    // The fleet, paced at 1 Hz on its own thread.
    let stop_fleet = Arc::new(AtomicBool::new(false));
    let fleet_thread = {
        let stop_fleet = stop_fleet.clone();
        let (devices, seconds) = (sizes.live_devices, sizes.live_seconds);
        std::thread::spawn(move || -> anyhow::Result<(u64, HashSet<(u32, i64)>)> {
            let mut fleet = FleetMessages::new(devices, 2024);
            let start = Instant::now();
            let mut published = 0_u64;
            for second in 0..seconds {
                sleep_until(start + Duration::from_secs(second));
                if stop_fleet.load(Ordering::SeqCst) {
                    break;
                }
                for (topic, payload) in fleet.next_period_single(now_ms(), EDGE_WINDOW_MS) {
                    fleet_to_agent.publish(&topic, payload.clone())?;
                    fleet_to_bridge.publish(&topic, payload)?;
                    published += 1;
                }
            }
            fleet_to_agent.wait_acknowledged(Duration::from_secs(60))?;
            fleet_to_bridge.wait_acknowledged(Duration::from_secs(60))?;
            Ok((published, fleet.windows_sent))
        })
    };

    let api = collector.api_address;
    let phase_end = Instant::now() + Duration::from_secs(sizes.live_seconds);
    let mut marker_windows = HashSet::new();
    let mut markers_published = 0_u64;
    let mut latencies_ms = Vec::new();
    let mut query_ms = Vec::new();
    let mut stages_before = stages::Snapshot::default();
    let marker_outcome = (|| -> anyhow::Result<()> {
        // The first marker creates the series; its latency includes that and is not counted.
        let first_ms = now_ms();
        marker_to_agent.publish(MARKER_TOPIC, marker_payload(0, first_ms))?;
        marker_to_bridge.publish(MARKER_TOPIC, marker_payload(0, first_ms))?;
        markers_published += 1;
        marker_windows.insert(first_ms.div_euclid(EDGE_WINDOW_MS));
        let selector = wait_for(
            "the marker series in /api/v1/series",
            Duration::from_secs(60),
            || marker_selector(api),
        )?;
        stages_before = stages::snapshot(&collector.metrics()?);
        for sequence in 1..=sizes.markers {
            if Instant::now() >= phase_end && sequence > 10 {
                break;
            }
            let time_ms = now_ms();
            marker_to_agent.publish(MARKER_TOPIC, marker_payload(sequence, time_ms))?;
            marker_to_bridge.publish(MARKER_TOPIC, marker_payload(sequence, time_ms))?;
            markers_published += 1;
            marker_windows.insert(time_ms.div_euclid(EDGE_WINDOW_MS));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let query_started = Instant::now();
                if marker_queryable(api, &selector, time_ms)? {
                    latencies_ms.push((now_ms() - time_ms) as f64);
                    query_ms.push(query_started.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("marker {sequence} (time {time_ms}) not queryable after 30 s");
                }
                std::thread::sleep(POLL_INTERVAL);
            }
            std::thread::sleep(sizes.marker_spacing);
        }
        Ok(())
    })();
    if marker_outcome.is_err() {
        stop_fleet.store(true, Ordering::SeqCst);
    }
    let mut stage_figures =
        stages::breakdown(&stages_before, &stages::snapshot(&collector.metrics()?));
    query_ms.sort_by(f64::total_cmp);
    stage_figures["query_ms"] = json!({
        "p50": round3(percentile(&query_ms, 0.5)),
        "p99": round3(percentile(&query_ms, 0.99)),
    });
    let fleet_outcome = fleet_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the fleet publisher thread panicked"))?;
    marker_outcome?;
    let (fleet_published, fleet_windows) = fleet_outcome?;
    marker_to_agent.wait_acknowledged(Duration::from_secs(30))?;
    marker_to_bridge.wait_acknowledged(Duration::from_secs(30))?;
    let live_readings = fleet_published + markers_published;

    wait_for(
        "the collector to take in every live reading",
        Duration::from_secs(60),
        || {
            agent.process.check_running()?;
            let readings = collector_metric(collector, "tributary_ingest_readings_total")? as u64;
            Ok((readings >= readings_before + live_readings).then_some(()))
        },
    )?;
    if sizes.wait_for_summaries {
        // Windows close one window width plus the allowed disorder after their last data.
        let expected = (fleet_windows.len() + marker_windows.len()) as u64;
        wait_for(
            "the collector to take in every edge summary of the live phase",
            Duration::from_secs(90),
            || {
                agent.process.check_running()?;
                let summaries =
                    collector_metric(collector, "tributary_ingest_summaries_total")? as u64;
                Ok((summaries >= summaries_before + expected).then_some(()))
            },
        )?;
    }
    wait_for(
        "every message to cross the Mosquitto bridge",
        Duration::from_secs(60),
        || Ok((bridge.delivered() >= bridge_start_delivered + live_readings).then_some(())),
    )?;
    let (bridge_up, bridge_down) = bridge.bytes();
    let ship = ShipBytes::read(&agent)?.since(ship_start);
    let figures = RunFigures {
        p50_ms: {
            latencies_ms.sort_by(f64::total_cmp);
            percentile(&latencies_ms, 0.5)
        },
        p99_ms: percentile(&latencies_ms, 0.99),
        max_ms: latencies_ms.last().copied().unwrap_or(0.0),
        markers: latencies_ms.len(),
        live_readings,
        bytes_up: relay.bytes_up() - start_up,
        bytes_down: relay.bytes_down() - start_down,
        baseline_bytes_up: bridge_up - bridge_start_up,
        baseline_bytes_down: bridge_down - bridge_start_down,
        ship,
        stages: stage_figures,
        ..RunFigures::default()
    };
    agent.process.stop(Duration::from_secs(20))?;
    Ok(figures)
}

fn flood_phase(
    collector: &mut Collector,
    binaries: &Binaries,
    sizes: &Sizes,
    dir: &std::path::Path,
    batching: &str,
    live_readings: u64,
    figures: &mut RunFigures,
) -> anyhow::Result<()> {
    let mut spec = AgentSpec::new(dir.join("agent-flood"), FLOOD_AGENT, collector)?;
    spec.extra_config = batching.to_string();
    let mut agent = Agent::start(binaries, &spec)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for index in 0..FLOOD_PUBLISHERS {
        let mut publisher =
            Publisher::connect(agent.broker_address, &format!("bench-flood-{index}"))?;
        let (stop, devices) = (stop.clone(), sizes.flood_devices);
        threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut fleet = FleetMessages::new(devices, 7);
            let mut last_ms = 0;
            while !stop.load(Ordering::SeqCst) {
                let time_ms = now_ms().max(last_ms + 1);
                last_ms = time_ms;
                let period = fleet.next_period_per_device();
                for (position, (topic, payload, _)) in period.iter().enumerate() {
                    if position % FLOOD_PUBLISHERS == index {
                        publisher.publish(topic, stamp(payload, time_ms))?;
                    }
                }
                publisher.check()?;
            }
            publisher.wait_acknowledged(Duration::from_secs(120))
        }));
    }
    let outcome = (|| -> anyhow::Result<()> {
        std::thread::sleep(sizes.flood_warmup);
        agent.process.check_running()?;
        let start = Instant::now();
        let processed_start = collector_metric(collector, "tributary_processor_readings_total")?;
        let intake_start = agent_metric(&agent, "tributary_agent_readings_in_total")?;
        std::thread::sleep(sizes.flood_measure);
        let processed_end = collector_metric(collector, "tributary_processor_readings_total")?;
        let intake_end = agent_metric(&agent, "tributary_agent_readings_in_total")?;
        let elapsed = start.elapsed().as_secs_f64();
        figures.readings_per_s = (processed_end - processed_start) / elapsed;
        figures.agent_intake_readings_per_s = (intake_end - intake_start) / elapsed;
        Ok(())
    })();
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a flood publisher thread panicked"))??;
    }
    outcome?;
    let drain_start = Instant::now();
    let taken_in = agent_metric(&agent, "tributary_agent_readings_in_total")? as u64;
    wait_for(
        "the store to have every reading the flooded agent took in",
        Duration::from_secs(600),
        || {
            agent.process.check_running()?;
            collector.process.check_running()?;
            let processed =
                collector_metric(collector, "tributary_processor_readings_total")? as u64;
            Ok((processed >= live_readings + taken_in).then_some(()))
        },
    )?;
    figures.drain_after_flood_s = drain_start.elapsed().as_secs_f64();
    agent.process.stop(Duration::from_secs(20))?;
    Ok(())
}
