//! `tributary-sim demo`: the whole pipeline on loopback, from one command.
//!
//! A collector (embedded log and store, query API and dashboard), an agent with its
//! embedded MQTT broker and a serial source, and a simulated fleet publishing to that
//! broker and playing one serial device on a pseudo-terminal. No external service is
//! needed. Ctrl-C (or SIGTERM) stops the fleet, then the agent, then the collector, each
//! cleanly, and nothing is left running: every child also dies with this process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cluster::{metric_value, Agent, AgentSpec, Binaries, Collector, CollectorSpec};
use crate::faults::FaultConfig;
use crate::format::MessageFormat;
use crate::run::{run, RunOptions};
use crate::sim::SimConfig;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// State and logs of every process; a fresh temporary directory when `None`.
    pub dir: Option<PathBuf>,
    pub devices: usize,
    pub rate_hz: f64,
    /// Port of the dashboard and query API on 127.0.0.1.
    pub http_port: u16,
    /// Stop by itself after this long (for scripted runs); run until Ctrl-C when `None`.
    pub duration: Option<Duration>,
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

const AGENT_ID: &str = "demo-gateway";

/// Runs the demo until Ctrl-C, SIGTERM or `duration`.
pub fn run_demo(options: &DemoOptions) -> anyhow::Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    let handler = request_stop as extern "C" fn(libc::c_int);
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let binaries = Binaries::locate()?;
    let dir = match &options.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("tributary-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("tributary demo: state and logs in {}", dir.display());

    let mut collector = Collector::start(
        &binaries,
        &CollectorSpec {
            dir: dir.join("collector"),
            agent_ids: vec![AGENT_ID.to_string()],
            extra_config: String::new(),
            api_port: Some(options.http_port),
        },
    )
    .context(
        "starting the collector (is the dashboard port free? pick another with --http-port)",
    )?;
    let serial_link = dir.join("serial-device");
    let mut agent_spec = AgentSpec::new(dir.join("agent"), AGENT_ID, &collector)?;
    agent_spec.serial_path = Some(serial_link.clone());
    let mut agent = Agent::start(&binaries, &agent_spec).context("starting the agent")?;

    let stop_fleet = Arc::new(AtomicBool::new(false));
    let fleet = {
        let config = SimConfig {
            devices: options.devices,
            format: MessageFormat::Json,
            rate_hz: options.rate_hz,
            seed: 1,
            window_ms: 60_000,
            faults: FaultConfig::default(),
            serial: true,
        };
        let run_options = RunOptions {
            mqtt_address: Some(agent.broker_address.to_string()),
            qos: 1,
            duration_ms: 7 * 86_400_000,
            ledger_path: None,
            serial_link: Some(serial_link),
            client_id: "tributary-demo-fleet".to_string(),
            topic_prefix: None,
            drain_timeout: Duration::from_secs(10),
            stop: Some(stop_fleet.clone()),
        };
        std::thread::Builder::new()
            .name("fleet".into())
            .spawn(move || run(config, &run_options, |_| {}))
            .context("starting the simulated fleet")?
    };

    let dashboard = format!("http://{}/", collector.api_address);
    println!(
        "\nrunning, all on 127.0.0.1:\n\
         - fleet: {devices} simulated devices publishing JSON at {rate} Hz (QoS 1) to the agent's\n  \
           embedded MQTT broker at {broker}, plus one serial device on a pseudo-terminal\n\
         - agent {AGENT_ID}: metrics http://{agent_metrics}/metrics, config {agent_config}\n\
         - collector: QUIC ingest {quic}, metrics http://{collector_metrics}/metrics\n\
         - dashboard: {dashboard}   query API: {dashboard}api/v1/devices\n\
         \nCtrl-C stops everything.\n",
        devices = options.devices,
        rate = options.rate_hz,
        broker = agent.broker_address,
        agent_metrics = agent.metrics_address,
        agent_config = agent.config_path.display(),
        quic = collector.quic_address,
        collector_metrics = collector.metrics_address,
    );

    let started = Instant::now();
    let mut next_report = Instant::now();
    let outcome = loop {
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            break Ok(());
        }
        if options
            .duration
            .is_some_and(|duration| started.elapsed() >= duration)
        {
            break Ok(());
        }
        if fleet.is_finished() {
            break Err(anyhow::anyhow!("the simulated fleet stopped unexpectedly"));
        }
        if let Err(error) = agent.process.check_running() {
            break Err(error.context("the agent stopped"));
        }
        if let Err(error) = collector.process.check_running() {
            break Err(error.context("the collector stopped"));
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(2);
            println!("{}", live_counts(&agent, &collector, started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    println!("\nstopping: fleet, then agent, then collector");
    stop_fleet.store(true, Ordering::SeqCst);
    match fleet.join() {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => eprintln!("fleet: {error:#}"),
        Err(_) => eprintln!("fleet: the thread panicked"),
    }
    let agent_clean = agent.process.stop(Duration::from_secs(20))?;
    let collector_clean = collector.process.stop(Duration::from_secs(20))?;
    println!(
        "stopped (agent {}, collector {}); state and logs stay in {}",
        if agent_clean { "cleanly" } else { "forcibly" },
        if collector_clean {
            "cleanly"
        } else {
            "forcibly"
        },
        dir.display()
    );
    outcome
}

/// One line of live counts from both processes' metrics.
fn live_counts(agent: &Agent, collector: &Collector, elapsed: Duration) -> String {
    let agent_metrics = agent.metrics().unwrap_or_default();
    let collector_metrics = collector.metrics().unwrap_or_default();
    let value = |text: &str, name: &str| metric_value(text, name, &[]).unwrap_or(0.0) as u64;
    format!(
        "[{:>5}s] agent: {} readings in, {} rejected, {} batches buffered | collector: {} batches, {} readings, {} summaries in, {} agents connected",
        elapsed.as_secs(),
        value(&agent_metrics, "tributary_agent_readings_in_total"),
        value(&agent_metrics, "tributary_agent_rejected_total"),
        value(&agent_metrics, "tributary_agent_buffer_batches"),
        value(&collector_metrics, "tributary_ingest_batches_total"),
        value(&collector_metrics, "tributary_ingest_readings_total"),
        value(&collector_metrics, "tributary_ingest_summaries_total"),
        value(&collector_metrics, "tributary_ingest_connected_agents"),
    )
}
