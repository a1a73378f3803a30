//! `bench agent`: the gateway daemon's costs, measured three ways (issue 3).
//!
//! 1. In-process, one thread: MQTT-style messages (topic + plain-number payload, as most
//!    sensors publish) through the agent's own `TopicRouter` and `Pipeline` (parse ->
//!    aggregate into 10 s windows -> cut -> encode -> disk buffer with group commit), 10k
//!    active series (1,000 simulated devices x 10 metrics at 1 Hz), one run-loop tick
//!    (`Pipeline::tick`: idle close, cut by age, commit) per simulated second. Messages
//!    are generated per simulated second outside the timed sections. Peak RSS is the whole bench
//!    process's (`VmHWM`, reset before the run). Baseline, same run: parsing alone.
//! 2. Through Mosquitto at QoS 1 with the durable acknowledgement chain: the real agent
//!    (`run_agent`, on a runtime whose threads are named `agent`) subscribes; a publisher in
//!    this process floods messages; throughput is the agent's durable acks per second. CPU
//!    time of the agent's threads (its runtime, sled's) is read from `/proc/self/task`,
//!    Mosquitto's from `/proc/PID/stat`, both over the same interval. The agent ships to an
//!    in-process collector, so shipping is part of its cost.
//! 3. Backlog drain: one hour of a 1k-series fleet buffered while the collector was away,
//!    then the collector comes up while live data keeps arriving every second: time until
//!    the backlog is gone, and how old live data is when the collector has it durably
//!    (log append time minus the live batch's creation time).
//! 4. The agent process: the real `tributary-agent run` binary (embedded broker, shipping to
//!    a real `tributary-collector`) fed the 10k series of part 1 as JSON messages at QoS 1,
//!    one simulated second after another as fast as it acknowledges them; its own peak RSS
//!    (`VmHWM` of its process), which part 1's whole-bench figure only bounds from above.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tributary_agent::buffer::{BatchClass, BatchInfo, DiskBuffer, ReplayOrder};
use tributary_agent::config::{topic_router, AgentConfig};
use tributary_agent::metrics::{Metrics, SourceMetrics};
use tributary_agent::run::{buffer_config, Pipeline, PipelineInput};
use tributary_agent::ship::{ShipConfig, Shipper};
use tributary_agent::source::{ParsedReadings, ReadingsPool, TopicRouter};
use tributary_collector::log::{DurableLog, EmbeddedLog, EmbeddedLogConfig, SystemClock};
use tributary_firmware_sim::fleet::Fleet;
use tributary_protocol::{encode_batch, Batch, Reading, SeriesDef};

use super::collector::{collector_runtime, threads_cpu_seconds, Collector, COLLECTOR_THREAD};
use super::e2e::mqtt::{now_ms, stamp, FleetMessages, Publisher};
use super::{
    peak_rss_mib, percentile, process_cpu_seconds, reset_peak_rss, round3, rss_mib, BenchOptions,
};
use crate::services::{lookup_service_env, repo_root, running_in_ci, unique_suffix, MQTT_ADDR};

const AGENT_ID: &str = "bench-agent";
const START_MS: i64 = 1_700_000_000_000;
/// Thread-name prefix of the agent's runtime (the collector's is `collector`).
const AGENT_THREAD: &str = "agent-rt";
/// How often a live batch is appended during the drain: often enough for a p99 over a
/// drain that lasts seconds on loopback.
const LIVE_INTERVAL_MS: u64 = 100;

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// An agent config with one MQTT source under `template`, buffer in `directory`.
fn agent_config_text(
    directory: &std::path::Path,
    broker_address: &str,
    template: &str,
    collector: Option<(SocketAddr, String)>,
    metrics_address: SocketAddr,
) -> String {
    let (collector_address, fingerprint) =
        collector.unwrap_or_else(|| (SocketAddr::from(([127, 0, 0, 1], 9)), "00".repeat(32)));
    // `TRIBUTARY_BENCH_AGENT_CACHE_BYTES=BUFFER/STATE` sets the two sled page caches (the
    // sweep behind the agent's defaults); anything else leaves the defaults.
    let caches = std::env::var("TRIBUTARY_BENCH_AGENT_CACHE_BYTES")
        .ok()
        .and_then(|caches| {
            let (buffer_bytes, state_bytes) = caches.split_once('/')?;
            Some(format!(
                "cache_capacity_bytes = {}\nstate_cache_capacity_bytes = {}\n",
                buffer_bytes.trim(),
                state_bytes.trim()
            ))
        })
        .unwrap_or_default();
    format!(
        r#"agent_id = "{AGENT_ID}"

[collector]
address = "{collector_address}"
server_name = "localhost"
cert_fingerprint_sha256 = "{fingerprint}"
token = "token-{AGENT_ID}"

[buffer]
path = "{buffer}"
fsync = "group"
group_commit_interval_ms = 50
{caches}
[metrics]
listen_address = "{metrics_address}"

[[sources]]
name = "bench"

[sources.mqtt_subscribe]
broker_address = "{broker_address}"
client_id = "tributary-bench-{suffix}"
qos = 1
receive_maximum = 65535
persistent_session = false

[[sources.mqtt_subscribe.topics]]
template = "{template}"
payload = {{ format = "plain" }}

[sources.aggregation]
window_ms = 10000
raw = {{ policy = "all" }}
"#,
        buffer = directory.join("buffer").display(),
        suffix = unique_suffix(),
    )
}

/// The fleet as MQTT messages (topic, payload), one simulated second at a time, packed
/// into a few vectors. The in-process part measures the peak RSS of its own process, so
/// the bench's scaffolding counts against the agent there: the fleet's series keys and
/// one pair of small strings per message held 3-4 MiB (`docs/benchmarks.md`, "Session 7:
/// the bench's own memory"). Topics are kept once per series, payloads of the current
/// second in one string.
struct FleetFeed {
    fleet: Fleet,
    /// Every series' topic, concatenated; `topic_ends[id]` is where series `id`'s ends.
    topics: String,
    topic_ends: Vec<u32>,
    readings: Vec<Reading>,
    /// The current second's payloads, concatenated.
    payloads: String,
    /// The current second's messages: series id and the end of its payload in `payloads`.
    messages: Vec<(u32, u32)>,
}

impl FleetFeed {
    fn new(devices: usize, seed: u64, prefix: &str) -> Self {
        use std::fmt::Write as _;
        let fleet = Fleet::new(devices, seed);
        let mut topics = String::new();
        let mut topic_ends = Vec::new();
        for definition in fleet.series() {
            // Ids are dense (device index × metrics + metric index), in order.
            debug_assert_eq!(definition.id as usize, topic_ends.len());
            let site = FleetMessages::site_of(&definition);
            let _ = write!(
                topics,
                "{prefix}/{site}/{}/{}",
                definition.key.device_id, definition.key.metric
            );
            topic_ends.push(u32::try_from(topics.len()).unwrap_or(u32::MAX));
        }
        topics.shrink_to_fit();
        Self {
            fleet,
            topics,
            topic_ends,
            readings: Vec::new(),
            payloads: String::new(),
            messages: Vec::new(),
        }
    }

    /// Samples the fleet's simulated second `second`: one message per reading.
    fn next_second(&mut self, second: i64) {
        use std::fmt::Write as _;
        self.readings.clear();
        self.payloads.clear();
        self.messages.clear();
        self.fleet
            .sample_period(START_MS + second * 1000, &mut self.readings);
        for reading in &self.readings {
            if reading.series as usize >= self.topic_ends.len() {
                continue;
            }
            let _ = write!(self.payloads, "{}", reading.value);
            let end = u32::try_from(self.payloads.len()).unwrap_or(u32::MAX);
            self.messages.push((reading.series, end));
        }
    }

    /// The current second's messages as (topic, payload).
    fn messages(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let mut payload_start = 0;
        self.messages.iter().map(move |&(series, payload_end)| {
            let series = series as usize;
            let topic_start = match series {
                0 => 0,
                _ => self.topic_ends[series - 1] as usize,
            };
            let topic = &self.topics[topic_start..self.topic_ends[series] as usize];
            let payload = &self.payloads.as_bytes()[payload_start..payload_end as usize];
            payload_start = payload_end as usize;
            (topic, payload)
        })
    }
}

/// Part 1: the pipeline in-process on one thread.
fn in_process(options: &BenchOptions) -> anyhow::Result<Value> {
    let devices = 1_000;
    let seconds = if options.quick { 10 } else { 120 };
    let directory = tempfile::tempdir()?;
    let prefix = "tbench";
    let template = format!("{prefix}/{{site}}/{{device}}/{{metric}}");
    let text = agent_config_text(
        directory.path(),
        "127.0.0.1:1883",
        &template,
        None,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    );
    let config = AgentConfig::from_toml_str_validated(&text, "bench agent config")?;
    let topics = &config
        .sources
        .first()
        .and_then(|source| source.mqtt_subscribe.as_ref())
        .context("the bench config has no mqtt_subscribe source")?
        .topics;
    let router = topic_router(topics).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let mut feed = FleetFeed::new(devices, 11, prefix);

    // Baseline: parsing alone, the same messages.
    let mut parse_seconds = 0.0;
    let mut parsed_count = 0u64;
    let mut parsed = ParsedReadings::new();
    for second in 0..seconds {
        feed.next_second(second);
        let receive_ms = START_MS + second * 1000 + 500;
        let started = Instant::now();
        parsed_count += parse_second(&router, &mut parsed, &feed, receive_ms);
        parse_seconds += started.elapsed().as_secs_f64();
    }

    drop(parsed);
    let rss_before_mib = rss_mib().unwrap_or(0.0);
    let peak_reset = reset_peak_rss();
    let buffer = DiskBuffer::open(buffer_config(&config.buffer))?;
    let source_metrics = vec![Arc::new(SourceMetrics::new("bench", "mqtt_subscribe"))];
    let metrics = Arc::new(Metrics::new(source_metrics));
    let (mut pipeline, _) = Pipeline::open(&config, buffer.clone(), metrics.clone())?;
    // The same fleet again from its start; the baseline's copy is dropped, not kept beside it.
    drop(feed);
    let mut feed = FleetFeed::new(devices, 11, prefix);
    let mut pipeline_seconds = 0.0;
    let mut readings_in = 0u64;
    let pool = ReadingsPool::new();
    let cpu_before = process_cpu_seconds(std::process::id()).unwrap_or(0.0);
    for second in 0..seconds {
        feed.next_second(second);
        let receive_ms = START_MS + second * 1000 + 500;
        let started = Instant::now();
        readings_in += pipeline_second(&router, &mut pipeline, &runtime, &pool, &feed, receive_ms);
        pipeline_seconds += started.elapsed().as_secs_f64();
    }
    let cpu_seconds = process_cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu_before;
    let peak_mib = peak_rss_mib().unwrap_or(0.0);
    let open_windows = pipeline.stage().window_counts().0;
    let series_count = pipeline.stage().registry().len();
    let bytes_appended = metrics.pipeline.bytes_appended.load(Ordering::Relaxed);
    ensure_eq(
        readings_in,
        parsed_count,
        "readings through the pipeline and the parse baseline",
    )?;
    Ok(json!({
        "bench": "agent",
        "part": "in_process",
        "series": series_count,
        "open_windows_at_end": open_windows,
        "readings": readings_in,
        "simulated_seconds": seconds,
        "seconds": round3(pipeline_seconds),
        "readings_per_s": (readings_in as f64 / pipeline_seconds.max(1e-9)).round(),
        "baseline_parse_only_readings_per_s": (parsed_count as f64 / parse_seconds.max(1e-9)).round(),
        "process_cpu_s": round3(cpu_seconds),
        // Throughput per CPU second of the whole process (sled's threads included): on a
        // shared machine the wall-clock rate above also measures the neighbours.
        "readings_per_cpu_s": (readings_in as f64 / cpu_seconds.max(1e-9)).round(),
        "rss_mib": round3(peak_mib),
        "rss_mib_is_peak_of_phase": peak_reset,
        "rss_before_pipeline_mib": round3(rss_before_mib),
        // What the pipeline added to the peak: the agent's share of `rss_mib`.
        "rss_growth_mib": round3(peak_mib - rss_before_mib),
        // File-backed pages at the end (the bench binary's code and libraries): part of
        // `rss_mib`, not the agent's data.
        "rss_file_mib": round3(super::proc_status_mib(None, "RssFile").unwrap_or(0.0)),
        "buffer_cache_bytes": config.buffer.cache_capacity_bytes,
        "state_cache_bytes": config.buffer.state_cache_capacity_bytes,
        "buffer_bytes_appended": bytes_appended,
        "bytes_per_reading_buffered": round3(bytes_appended as f64 / readings_in.max(1) as f64),
    }))
}

/// The parse baseline's simulated second: every message parsed into one reused container.
/// Not inlined, like [`pipeline_second`], so a profiler can tell the two apart.
#[inline(never)]
fn parse_second(
    router: &TopicRouter,
    parsed: &mut ParsedReadings,
    feed: &FleetFeed,
    receive_ms: i64,
) -> u64 {
    let mut parsed_count = 0;
    for (topic, payload) in feed.messages() {
        parsed.clear();
        if router.parse(topic, payload, receive_ms, parsed).is_ok() {
            parsed_count += parsed.len() as u64;
        }
    }
    parsed_count
}

/// One simulated second through the pipeline, what `readings_per_s` times: parse each
/// message, ingest it, then one run-loop tick. Not inlined, so that
/// `valgrind --tool=callgrind --toggle-collect='*pipeline_second*'` counts exactly this
/// (`docs/benchmarks.md`, "Session 6"). Returns the readings ingested.
#[inline(never)]
fn pipeline_second(
    router: &TopicRouter,
    pipeline: &mut Pipeline,
    runtime: &tokio::runtime::Runtime,
    pool: &ReadingsPool,
    feed: &FleetFeed,
    receive_ms: i64,
) -> u64 {
    let mut readings_in = 0;
    for (topic, payload) in feed.messages() {
        // A container per message from a pool, as the MQTT shells send theirs to the
        // pipeline: ingesting drops it, which returns its emptied buffers to the pool.
        let mut parsed = pool.take();
        if router
            .parse(topic, payload, receive_ms, &mut parsed)
            .is_err()
        {
            continue;
        }
        readings_in += parsed.len() as u64;
        pipeline.ingest(
            PipelineInput {
                source: 0,
                readings: parsed,
                receive_ms,
                durable: None,
            },
            receive_ms,
        );
    }
    // What the run loop does on each tick: close idle windows, cut batches due by age
    // (about one raw batch per simulated second), commit.
    runtime.block_on(pipeline.tick(receive_ms));
    readings_in
}

fn ensure_eq(left: u64, right: u64, what: &str) -> anyhow::Result<()> {
    if left != right {
        bail!("{what} differ: {left} != {right}");
    }
    Ok(())
}

/// A free loopback TCP port (bound and released; good enough for a bench).
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Sum of a Prometheus counter over its label sets, from `/metrics` at `address`.
fn scrape(address: SocketAddr, metric: &str) -> Option<f64> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    let mut found = None;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Polls `condition` every 20 ms until it holds or `deadline` passes.
fn wait_until(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    while !condition() {
        if Instant::now() > until {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn mosquitto_pid() -> Option<u32> {
    let path = repo_root().join(".services/mosquitto/mosquitto.pid");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Part 2: the real agent behind Mosquitto at QoS 1.
fn through_mosquitto(options: &BenchOptions) -> anyhow::Result<Value> {
    let Some(broker) = lookup_service_env(MQTT_ADDR) else {
        if running_in_ci() {
            bail!("CI=true and {MQTT_ADDR} is not set; start the services with `deploy/dev/services.sh up`");
        }
        return Ok(json!({
            "bench": "agent", "part": "mosquitto",
            "note": format!("skipped: {MQTT_ADDR} not set; run deploy/dev/services.sh up"),
        }));
    };
    let messages_total: usize = if options.quick { 20_000 } else { 200_000 };
    let devices = 100;
    let directory = tempfile::tempdir()?;
    let prefix = format!("tbench{}", unique_suffix().replace('_', ""));
    let template = format!("{prefix}/{{site}}/{{device}}/{{metric}}");

    // The collector the agent ships to, in-process on its own threads.
    let collector_state = tempfile::tempdir()?;
    let log = Arc::new(EmbeddedLog::open(
        EmbeddedLogConfig::new(collector_state.path().join("log")),
        SystemClock,
    )?);
    let collector = Collector::start(
        collector_runtime()?,
        log,
        &[AGENT_ID.to_owned()],
        collector_state,
    )?;
    let metrics_address = free_port()?;
    let text = agent_config_text(
        directory.path(),
        &broker,
        &template,
        Some((collector.address()?, collector.identity.fingerprint_hex())),
        metrics_address,
    );
    let config = AgentConfig::from_toml_str_validated(&text, "bench agent config")?;
    let agent_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(AGENT_THREAD)
        .enable_all()
        .build()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let agent_task = agent_runtime.spawn(tributary_agent::run::run_agent(config, shutdown.clone()));
    let outcome = (|| {
        wait_until("the agent to subscribe", Duration::from_secs(30), || {
            scrape(metrics_address, "tributary_agent_source_connected").unwrap_or(0.0) >= 1.0
        })?;
        let publisher_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("publisher")
            .enable_all()
            .build()?;
        let mut feed = FleetFeed::new(devices, 5, &prefix);
        let mut all_messages = Vec::with_capacity(messages_total);
        let mut second = 0;
        while all_messages.len() < messages_total {
            feed.next_second(second);
            all_messages.extend(feed.messages().map(|(topic, payload)| {
                (
                    topic.to_owned(),
                    String::from_utf8_lossy(payload).into_owned(),
                )
            }));
            second += 1;
        }
        all_messages.truncate(messages_total);

        let mosquitto = mosquitto_pid();
        let agent_cpu_before = threads_cpu_seconds(&[AGENT_THREAD, "sled-io", "log flusher"]);
        let broker_cpu_before = mosquitto.and_then(process_cpu_seconds);
        let acks_before = scrape(metrics_address, "tributary_agent_mqtt_acks_total").unwrap_or(0.0);
        let started = Instant::now();
        let (host, port) = broker
            .rsplit_once(':')
            .context("TRIBUTARY_MQTT_ADDR is not host:port")?;
        let port: u16 = port.parse().context("TRIBUTARY_MQTT_ADDR port")?;
        publisher_runtime.block_on(async {
            let mut mqtt_options = rumqttc::MqttOptions::new(
                format!("bench-publisher-{}", unique_suffix()),
                host,
                port,
            );
            mqtt_options.set_inflight(1000);
            mqtt_options.set_max_packet_size(64 * 1024, 64 * 1024);
            let (client, mut event_loop) = rumqttc::AsyncClient::new(mqtt_options, 10_000);
            let total = all_messages.len();
            let publishing = tokio::spawn(async move {
                for (topic, payload) in all_messages {
                    client
                        .publish(
                            topic,
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            payload.into_bytes(),
                        )
                        .await?;
                }
                anyhow::Ok(client)
            });
            let mut acked = 0usize;
            while acked < total {
                match tokio::time::timeout(Duration::from_secs(60), event_loop.poll()).await {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => bail!("publisher connection to {broker}: {error}"),
                    Err(_) => bail!(
                        "publisher: no event from {broker} for 60 s ({acked} of {total} acked)"
                    ),
                }
            }
            let client = publishing.await??;
            let _ = client.disconnect().await;
            anyhow::Ok(())
        })?;
        let published_seconds = started.elapsed().as_secs_f64();
        let target = acks_before + messages_total as f64;
        wait_until("the agent's durable acks", Duration::from_secs(300), || {
            scrape(metrics_address, "tributary_agent_mqtt_acks_total").unwrap_or(0.0) >= target
        })?;
        let seconds = started.elapsed().as_secs_f64();
        let agent_cpu =
            threads_cpu_seconds(&[AGENT_THREAD, "sled-io", "log flusher"]) - agent_cpu_before;
        let broker_cpu = match (broker_cpu_before, mosquitto.and_then(process_cpu_seconds)) {
            (Some(before), Some(after)) => Some(round3(after - before)),
            _ => None,
        };
        anyhow::Ok(json!({
            "bench": "agent",
            "part": "mosquitto",
            "messages": messages_total,
            "qos": 1,
            "seconds": round3(seconds),
            "publish_seconds": round3(published_seconds),
            "mqtt_messages_per_s": (messages_total as f64 / seconds.max(1e-9)).round(),
            "agent_cpu_s": round3(agent_cpu),
            "baseline_broker_cpu_s": broker_cpu,
            "broker_pid_found": mosquitto.is_some(),
            "batches_acked_by_collector": collector.metrics.acks.load(Ordering::Relaxed),
        }))
    })();
    shutdown.cancel();
    let stopped = agent_runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), agent_task).await });
    drop(agent_runtime);
    collector.shutdown();
    let line = outcome?;
    match stopped {
        Ok(Ok(Ok(()))) => Ok(line),
        Ok(Ok(Err(error))) => Err(error.context("the agent stopped with an error")),
        Ok(Err(error)) => Err(anyhow::Error::from(error).context("the agent task failed")),
        Err(_) => bail!("the agent did not stop within 30 s of shutdown"),
    }
}

/// Part 3: an hour of backlog drains while live data keeps coming.
fn backlog_drain(options: &BenchOptions) -> anyhow::Result<Value> {
    let devices = 100; // x 10 metrics = 1,000 series
    let backlog_seconds: i64 = if options.quick { 300 } else { 3_600 };
    let batch_seconds: i64 = 10;
    let directory = tempfile::tempdir()?;
    let buffer = DiskBuffer::open(tributary_agent::buffer::BufferConfig::at(
        directory.path().join("buffer"),
    ))?;
    let mut fleet = Fleet::new(devices, 3);
    let series = fleet.series();
    let now = tributary_agent::run::now_ms();
    let backlog_start_ms = now - backlog_seconds * 1000;
    let mut backlog_readings = 0u64;
    let mut last_backlog_seq = 0;
    let mut backlog_bytes = 0usize;
    for first in (0..backlog_seconds).step_by(batch_seconds as usize) {
        let mut readings = Vec::new();
        for second in first..(first + batch_seconds).min(backlog_seconds) {
            fleet.sample_period(backlog_start_ms + second * 1000, &mut readings);
        }
        let created_ms = backlog_start_ms + (first + batch_seconds) * 1000;
        let (batch_seq, bytes) = append_batch(
            &buffer,
            &series,
            readings,
            created_ms,
            &mut backlog_readings,
        )?;
        backlog_bytes += bytes;
        last_backlog_seq = batch_seq;
    }
    buffer.flush()?;

    let collector_state = tempfile::tempdir()?;
    let log = Arc::new(EmbeddedLog::open(
        EmbeddedLogConfig::new(collector_state.path().join("log")),
        SystemClock,
    )?);
    let collector = Collector::start(
        collector_runtime()?,
        log.clone(),
        &[AGENT_ID.to_owned()],
        collector_state,
    )?;
    let agent_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(AGENT_THREAD)
        .enable_all()
        .build()?;
    let ship_config = ShipConfig {
        collector_address: collector.address()?.to_string(),
        agent_id: AGENT_ID.to_owned(),
        token: format!("token-{AGENT_ID}"),
        server_fingerprint_sha256: Some(collector.identity.fingerprint_hex()),
        bind_address: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ShipConfig::default()
    };
    // The shipper binds its QUIC endpoint on the runtime it will run on.
    let shipper = {
        let _runtime = agent_runtime.enter();
        Shipper::new(ship_config, buffer.clone())?
    };
    let handle = shipper.handle();
    let started = Instant::now();
    let ship_task = agent_runtime.spawn(shipper.run());

    // Live data: a batch of one second of the fleet (1,000 readings) every
    // LIVE_INTERVAL_MS of wall time, until the backlog is gone.
    let mut live_created: HashMap<u64, i64> = HashMap::new();
    let mut live_readings = 0u64;
    let drain_deadline = Duration::from_secs(if options.quick { 120 } else { 900 });
    let mut next_live = Instant::now();
    let drained = loop {
        let backlog_left = buffer
            .replay_range(ReplayOrder::OldestFirst, None, Some(last_backlog_seq + 1))
            .next()
            .is_some();
        if !backlog_left {
            break Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > drain_deadline {
            break Err(anyhow::anyhow!(
                "the backlog did not drain within {drain_deadline:?} (last error: {:?})",
                handle.stats().last_error()
            ));
        }
        if Instant::now() >= next_live {
            let created_ms = tributary_agent::run::now_ms();
            let mut readings = Vec::new();
            fleet.sample_period(created_ms - 1000, &mut readings);
            let (batch_seq, _) =
                append_batch(&buffer, &series, readings, created_ms, &mut live_readings)?;
            buffer.flush()?;
            handle.wake();
            live_created.insert(batch_seq, created_ms);
            next_live += Duration::from_millis(LIVE_INTERVAL_MS);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Let the last live batches land, then read when each became durable in the log.
    let last_live_acked = wait_until("the last live batches", Duration::from_secs(30), || {
        live_created.keys().all(|seq| {
            buffer
                .replay_range(ReplayOrder::OldestFirst, seq.checked_sub(1), Some(seq + 1))
                .next()
                .is_none()
        })
    });
    handle.stop();
    let _ = agent_runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), ship_task).await });
    let mut live_ms = Vec::new();
    let mut backlog_records = 0u64;
    for partition in 0..log.partition_count() {
        for record in log.read_records(partition, 0, usize::MAX)? {
            match live_created.get(&record.headers.batch_seq) {
                Some(created_ms) => live_ms.push((record.timestamp_ms - created_ms) as f64),
                None => backlog_records += 1,
            }
        }
    }
    let collector_cpu_seconds = threads_cpu_seconds(&[COLLECTOR_THREAD, "log-flush"]);
    drop(agent_runtime);
    collector.shutdown();
    let drain_seconds = drained?;
    last_live_acked?;
    live_ms.sort_by(f64::total_cmp);
    Ok(json!({
        "bench": "agent",
        "part": "backlog_drain",
        "series": series.len(),
        "backlog_seconds_of_data": backlog_seconds,
        "backlog_readings": backlog_readings,
        "backlog_batches_in_log": backlog_records,
        "backlog_mib": round3(mib(backlog_bytes as f64)),
        "drain_seconds": round3(drain_seconds),
        "drain_readings_per_s": (backlog_readings as f64 / drain_seconds.max(1e-9)).round(),
        "live_batches": live_ms.len(),
        "live_p50_ms": round3(percentile(&live_ms, 0.5)),
        "live_p99_ms": round3(percentile(&live_ms, 0.99)),
        "live_max_ms": round3(live_ms.last().copied().unwrap_or(0.0)),
        "live_batch_interval_ms": LIVE_INTERVAL_MS,
        "collector_cpu_s": round3(collector_cpu_seconds),
    }))
}

/// Appends one self-contained raw batch; returns its sequence number and size.
fn append_batch(
    buffer: &DiskBuffer,
    series: &[SeriesDef],
    readings: Vec<Reading>,
    created_ms: i64,
    counter: &mut u64,
) -> anyhow::Result<(u64, usize)> {
    let batch_seq = buffer.allocate_seq()?;
    let oldest_event_ms = readings
        .iter()
        .map(|reading| reading.time_ms)
        .min()
        .unwrap_or(created_ms);
    let reading_count = readings.len();
    *counter += reading_count as u64;
    let mut batch = Batch {
        agent_id: AGENT_ID.to_owned(),
        batch_seq,
        created_ms,
        series: series.to_vec(),
        readings,
        summaries: Vec::new(),
    };
    batch.sort_readings();
    let bytes = encode_batch(&batch);
    let info = BatchInfo {
        class: BatchClass::Raw,
        created_ms,
        oldest_event_ms,
        reading_count: u32::try_from(reading_count).unwrap_or(u32::MAX),
    };
    buffer.append(batch_seq, info, &bytes)?;
    Ok((batch_seq, bytes.len()))
}

/// Part 4: the real agent binary with 10k active series, and its peak RSS.
fn agent_process(options: &BenchOptions) -> anyhow::Result<Value> {
    use tributary_firmware_sim::cluster;
    let binaries = match cluster::Binaries::locate() {
        Ok(binaries) => binaries,
        Err(error) if running_in_ci() => {
            return Err(error
                .context("CI=true: bench agent's agent_process part needs the release binaries"));
        }
        Err(error) => {
            return Ok(json!({
                "bench": "agent", "part": "agent_process",
                "note": format!("skipped: {error:#}"),
            }));
        }
    };
    let devices = 1_000;
    // Past the first window closes (10 s windows, 2 s of disorder): every series then holds
    // its steady state of one or two open windows.
    let seconds: i64 = if options.quick { 14 } else { 40 };
    let directory = tempfile::tempdir()?;
    let agent_id = "bench-agent-process";
    let mut collector = cluster::Collector::start(
        &binaries,
        &cluster::CollectorSpec {
            dir: directory.path().join("collector"),
            agent_ids: vec![agent_id.to_string()],
            extra_config: String::new(),
            api_port: None,
        },
    )?;
    let spec = cluster::AgentSpec::new(directory.path().join("agent"), agent_id, &collector)?;
    let mut agent = cluster::Agent::start(&binaries, &spec)?;
    let pid = agent
        .process
        .pid()
        .context("the agent process has no pid")?;
    let rss_started_mib = super::proc_status_mib(Some(pid), "VmRSS").unwrap_or(0.0);
    let mut fleet = FleetMessages::new(devices, 11);
    let series = fleet.series_count();
    let mut publisher = Publisher::connect(agent.broker_address, "bench-agent-process")?;
    // Event time advances one second per period, as fast as the agent acknowledges, and
    // never passes the wall clock: it starts far enough in the past, on a window boundary.
    let window_ms = i64::try_from(spec.window_ms).unwrap_or(10_000).max(1);
    let first_ms = (now_ms() / window_ms - seconds / (window_ms / 1000).max(1) - 2) * window_ms;
    let started = Instant::now();
    let mut readings_sent = 0u64;
    for period in 0..seconds {
        let time_ms = first_ms + period * 1000;
        for (topic, payload, readings) in fleet.next_period_per_device() {
            publisher.publish(&topic, stamp(&payload, time_ms))?;
            readings_sent += readings as u64;
        }
        publisher.check()?;
        agent.process.check_running()?;
    }
    publisher.wait_acknowledged(Duration::from_secs(300))?;
    let intake_seconds = started.elapsed().as_secs_f64();
    // A PUBACK means durable in the agent, so every reading is counted by now.
    let readings_in =
        cluster::metric_value(&agent.metrics()?, "tributary_agent_readings_in_total", &[])
            .unwrap_or(0.0) as u64;
    let peak_mib = super::proc_status_mib(Some(pid), "VmHWM").unwrap_or(0.0);
    let file_mib = super::proc_status_mib(Some(pid), "RssFile").unwrap_or(0.0);
    let rss_end_mib = super::proc_status_mib(Some(pid), "VmRSS").unwrap_or(0.0);
    drop(publisher);
    agent.process.stop(Duration::from_secs(20))?;
    collector.process.stop(Duration::from_secs(20))?;
    ensure_eq(
        readings_in,
        readings_sent,
        "readings the agent took in and readings published",
    )?;
    Ok(json!({
        "bench": "agent",
        "part": "agent_process",
        "series": series,
        "readings": readings_in,
        "simulated_seconds": seconds,
        "messages": publisher_messages(devices, seconds),
        "intake_readings_per_s": (readings_in as f64 / intake_seconds.max(1e-9)).round(),
        // Peak resident memory of the agent process alone, its start included.
        "agent_rss_mib": round3(peak_mib),
        "agent_rss_started_mib": round3(rss_started_mib),
        "agent_rss_end_mib": round3(rss_end_mib),
        // File-backed pages at the end (the agent binary's code and libraries).
        "agent_rss_file_mib": round3(file_mib),
    }))
}

/// Messages part 4 publishes: one per device per simulated second.
fn publisher_messages(devices: usize, seconds: i64) -> u64 {
    devices as u64 * seconds.max(0).unsigned_abs()
}

/// Environment variable naming the parts to run (comma-separated: `in_process`,
/// `mosquitto`, `backlog_drain`, `agent_process`); unset runs all four. For profiling one
/// part alone.
pub const PARTS_ENV: &str = "TRIBUTARY_BENCH_AGENT_PARTS";

/// Runs the bench: in-process, Mosquitto, backlog drain, agent process (or the parts
/// `PARTS_ENV` names).
pub fn run(options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    // The agent binary sets these malloc options first thing in `main`; the in-process
    // pipeline is measured under the same allocator settings (an operator's `MALLOC_*`
    // variables win in both).
    let allocator = tributary_agent::allocator::tune_for_gateway();
    eprintln!("bench agent: {allocator:?}");
    let selected = std::env::var(PARTS_ENV).ok();
    let wanted = |part: &str| {
        selected
            .as_deref()
            .is_none_or(|parts| parts.split(',').any(|name| name.trim() == part))
    };
    let mut lines = Vec::new();
    if wanted("in_process") {
        lines.push(in_process(options)?);
    }
    if wanted("mosquitto") {
        lines.push(through_mosquitto(options)?);
    }
    if wanted("backlog_drain") {
        lines.push(backlog_drain(options)?);
    }
    if wanted("agent_process") {
        lines.push(agent_process(options)?);
    }
    Ok(lines)
}
