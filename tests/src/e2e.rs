//! Shared steps of the end-to-end tests: a simulated fleet run into a real agent and
//! collector, and the exact ledger check against the store through the query API.
//!
//! Every test builds its cluster with `tributary_firmware_sim::cluster`, runs the fleet
//! in-process (its ledger is the ground truth), injects its fault, and ends with
//! [`assert_store_matches_ledger`]: nothing missing, nothing counted twice, every rejected
//! message counted by the agent under the ledger's reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::time::Instant;

use tributary_firmware_sim::cluster::{
    http_get, metric_value, wait_for, Agent, AgentSpec, Binaries, Collector, CollectorSpec,
    UdpRelay,
};
use tributary_firmware_sim::format::MessageFormat;
use tributary_firmware_sim::ledger::{parse_json_lines, LedgerRecord, RejectedStats};
use tributary_firmware_sim::observe::observed_windows;
use tributary_firmware_sim::run::{run, RunOptions, RunSummary};
use tributary_firmware_sim::sim::SimConfig;
use tributary_firmware_sim::verify::{compare, split_records, VerifyReport};

/// The agent and collector binaries of this build; a clear failure when they are missing.
pub fn binaries() -> Binaries {
    match Binaries::locate() {
        Ok(binaries) => binaries,
        Err(error) => panic!(
            "{error:#}\n(the end-to-end tests run the real binaries: `cargo build -p tributary-agent \
             -p tributary-collector` with the same profile first; deploy/dev/test.sh does)"
        ),
    }
}

/// A ledger file read back.
pub struct Ledger {
    pub path: PathBuf,
    pub records: Vec<LedgerRecord>,
}

impl Ledger {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("reading the ledger {}: {error}", path.display()));
        let records = parse_json_lines(&text)
            .unwrap_or_else(|error| panic!("parsing the ledger {}: {error}", path.display()));
        Self {
            path: path.to_path_buf(),
            records,
        }
    }

    pub fn rejected(&self) -> Vec<RejectedStats> {
        self.records
            .iter()
            .filter_map(|record| match record {
                LedgerRecord::Rejected(rejected) => Some(rejected.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn windowed_readings(&self) -> u64 {
        self.records
            .iter()
            .map(|record| match record {
                LedgerRecord::Window(window) => window.count,
                _ => 0,
            })
            .sum()
    }
}

/// Polls the store through the query API until it holds exactly what the ledger says (or
/// `timeout` passes, then panics with the last report and both processes' logs).
pub fn assert_store_matches_ledger(
    ledger: &Ledger,
    collector: &mut Collector,
    agents: &mut [&mut Agent],
    timeout: Duration,
) -> VerifyReport {
    let (ledger_windows, receive_timed) = split_records(ledger.records.clone());
    assert!(
        !ledger_windows.is_empty(),
        "the ledger {} holds no window: the fleet sent nothing",
        ledger.path.display()
    );
    let window_ms = ledger_windows[0].window_ms;
    let from_ms = ledger_windows
        .iter()
        .map(|window| window.window_start_ms)
        .min()
        .unwrap_or(0)
        - 3_600_000;
    let to_ms = ledger_windows
        .iter()
        .map(|window| window.window_start_ms)
        .max()
        .unwrap_or(0)
        + window_ms
        + 3_600_000;
    let mut last_report = None;
    let outcome = wait_for("the store to match the ledger", timeout, || {
        collector.process.check_running()?;
        for agent in agents.iter_mut() {
            agent.process.check_running()?;
        }
        let observed = observed_windows(collector.api_address, window_ms, from_ms, to_ms)?;
        let report = compare(&ledger_windows, &receive_timed, &observed, 1e-9);
        if report.is_exact() {
            return Ok(Some(report));
        }
        last_report = Some(report);
        Ok(None)
    });
    match outcome {
        Ok(report) => report,
        Err(error) => {
            let mut logs = format!("collector stderr:\n{}\n", collector.process.stderr_tail(40));
            for agent in agents.iter() {
                logs.push_str(&format!(
                    "agent stderr:\n{}\n",
                    agent.process.stderr_tail(40)
                ));
            }
            panic!(
                "{error:#}\nlast comparison:\n{}\n{logs}",
                last_report
                    .map(|report| report.render(15))
                    .unwrap_or_else(|| "(none)".into())
            )
        }
    }
}

/// Asserts the agent counted exactly the messages the ledger says must be rejected, by
/// reason (`mqtt/json_syntax` in the ledger is reason `json_syntax` of an MQTT source). Only
/// for runs where the agent was not restarted (its counters start at zero).
pub fn assert_rejections_counted(ledger: &Ledger, agent: &Agent) {
    let metrics = agent.metrics().expect("agent metrics");
    for rejected in ledger.rejected() {
        let reason = rejected
            .reason
            .split_once('/')
            .map_or(rejected.reason.as_str(), |(_, reason)| reason);
        let label = format!("reason=\"{reason}\"");
        let counted = metric_value(&metrics, "tributary_agent_rejected_total", &[&label])
            .unwrap_or(0.0) as u64;
        assert_eq!(
            counted, rejected.count,
            "the ledger says {} messages must be rejected as {}, the agent counted {counted}",
            rejected.count, rejected.reason
        );
    }
}

/// A fleet run in a background thread, so a test can inject its fault while it publishes.
pub struct FleetRun {
    pub ledger_path: PathBuf,
    thread: Option<std::thread::JoinHandle<anyhow::Result<RunSummary>>>,
}

/// What a test's fleet looks like; small, so a run takes seconds in a debug build.
pub fn fleet_config(devices: usize, rate_hz: f64, faults: &str, serial: bool) -> SimConfig {
    SimConfig {
        devices,
        format: MessageFormat::Json,
        rate_hz,
        seed: 11,
        window_ms: 60_000,
        faults: faults.parse().expect("fault names"),
        serial,
    }
}

impl FleetRun {
    /// Starts publishing to `agent`'s embedded broker (and the serial link, if the config
    /// has a serial device) for `duration`.
    pub fn start(
        config: SimConfig,
        agent: &Agent,
        serial_link: Option<PathBuf>,
        duration: Duration,
        dir: &Path,
    ) -> Self {
        let ledger_path = dir.join("ledger.jsonl");
        let options = RunOptions {
            mqtt_address: Some(agent.broker_address.to_string()),
            qos: 1,
            duration_ms: duration.as_millis() as i64,
            ledger_path: Some(ledger_path.clone()),
            serial_link,
            client_id: "e2e-fleet".into(),
            topic_prefix: None,
            drain_timeout: Duration::from_secs(60),
            stop: None,
        };
        let thread = std::thread::spawn(move || run(config, &options, |_| {}));
        Self {
            ledger_path,
            thread: Some(thread),
        }
    }

    /// Waits for the run to end and reads its ledger.
    pub fn finish(mut self) -> (RunSummary, Ledger) {
        let summary = self
            .thread
            .take()
            .expect("finished once")
            .join()
            .expect("the fleet thread panicked")
            .expect("the fleet run failed");
        (summary, Ledger::read(&self.ledger_path))
    }
}

/// Waits until the agent has taken in at least `readings` readings (over all sources).
pub fn wait_for_agent_readings(agent: &mut Agent, readings: u64) {
    let metrics_address = agent.metrics_address;
    let process = &mut agent.process;
    wait_for(
        "the agent to read the fleet",
        Duration::from_secs(60),
        || {
            process.check_running()?;
            let (_, body) = http_get(metrics_address, "/metrics")?;
            let seen = metric_value(&body, "tributary_agent_readings_in_total", &[]).unwrap_or(0.0);
            Ok((seen as u64 >= readings).then_some(()))
        },
    )
    .expect("the agent reads");
}

/// Tests that stop or restart a shared service, or load the machine, take turns.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How to set up a cluster: one collector, one agent (embedded MQTT broker), optionally a
/// serial device and a cuttable relay between agent and collector.
pub struct ClusterOptions {
    pub agent_id: &'static str,
    /// Extra collector config (`[log]`, `[store]` for Kafka and ClickHouse).
    pub extra_config: String,
    pub serial: bool,
    pub via_relay: bool,
}

impl ClusterOptions {
    /// Embedded log and store, no serial device, no relay.
    pub fn embedded(agent_id: &'static str) -> Self {
        Self {
            agent_id,
            extra_config: String::new(),
            serial: false,
            via_relay: false,
        }
    }
}

/// A running collector and agent in a scratch directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub collector: Collector,
    pub agent: Agent,
    pub serial_link: PathBuf,
    pub relay: Option<UdpRelay>,
}

impl Cluster {
    /// Starts both processes; `tweak` adjusts the agent's spec before it starts.
    pub fn start(options: ClusterOptions, tweak: impl FnOnce(&mut AgentSpec)) -> Self {
        let binaries = binaries();
        let dir = tempfile::tempdir().expect("tempdir");
        let collector = Collector::start(
            &binaries,
            &CollectorSpec {
                dir: dir.path().join("collector"),
                agent_ids: vec![options.agent_id.into()],
                extra_config: options.extra_config,
                api_port: None,
            },
        )
        .expect("collector starts");
        let serial_link = dir.path().join("serial-device");
        let mut spec =
            AgentSpec::new(dir.path().join("agent"), options.agent_id, &collector).expect("spec");
        if options.serial {
            spec.serial_path = Some(serial_link.clone());
        }
        let relay = options
            .via_relay
            .then(|| UdpRelay::start(collector.quic_address).expect("relay"));
        if let Some(relay) = &relay {
            spec.collector_address = relay.address;
        }
        tweak(&mut spec);
        let agent = Agent::start(&binaries, &spec).expect("agent starts");
        Self {
            dir,
            collector,
            agent,
            serial_link,
            relay,
        }
    }

    /// Starts a fleet publishing to the agent (and playing the serial device if `config`
    /// has one) for `duration`.
    pub fn fleet(&self, config: SimConfig, duration: Duration) -> FleetRun {
        let serial_link = config.serial.then(|| self.serial_link.clone());
        FleetRun::start(config, &self.agent, serial_link, duration, self.dir.path())
    }

    /// The exact ledger check (see [`assert_store_matches_ledger`]).
    pub fn check(&mut self, ledger: &Ledger, timeout: Duration) {
        let report = assert_store_matches_ledger(
            ledger,
            &mut self.collector,
            &mut [&mut self.agent],
            timeout,
        );
        assert!(report.windows_checked > 0);
    }

    /// Waits until the collector took at least one batch (so a fault lands mid-stream).
    pub fn wait_for_collector_batches(&self) {
        let collector = &self.collector;
        wait_for_metric(
            "the collector to take batches",
            || collector.metrics(),
            |metrics| {
                metric_value(metrics, "tributary_ingest_batches_total", &[]).unwrap_or(0.0) > 0.0
            },
        );
    }

    /// `kill -9` of the collector once batches flow, and a restart on the same state.
    pub fn kill9_collector_and_restart(&mut self) {
        self.wait_for_collector_batches();
        self.collector.process.kill9().expect("kill -9");
        self.collector.restart().expect("collector restarts");
    }

    /// Cuts the relay for at least `outage`, until `also` holds for the agent's metrics too.
    pub fn cut_link_for(&self, outage: Duration, also: impl Fn(&str) -> bool) {
        let relay = self
            .relay
            .as_ref()
            .expect("the cluster was started with a relay");
        relay.set_cut(true);
        let cut_at = Instant::now();
        let agent = &self.agent;
        // The outage is the fault itself: wall time while the fleet keeps publishing.
        wait_for_metric(
            "the outage to last",
            || agent.metrics(),
            |metrics| cut_at.elapsed() >= outage && relay.dropped() > 0 && also(metrics),
        );
        relay.set_cut(false);
    }

    /// SIGTERM to both; each must exit cleanly.
    pub fn stop(mut self) {
        assert!(
            self.agent
                .process
                .stop(Duration::from_secs(20))
                .expect("stop"),
            "the agent did not stop cleanly on SIGTERM"
        );
        assert!(
            self.collector
                .process
                .stop(Duration::from_secs(30))
                .expect("stop"),
            "the collector did not stop cleanly on SIGTERM"
        );
    }
}

/// Waits (up to 2 minutes) until `holds` is true of what `scrape` returns.
pub fn wait_for_metric(
    what: &str,
    scrape: impl Fn() -> anyhow::Result<String>,
    holds: impl Fn(&str) -> bool,
) {
    wait_for(what, Duration::from_secs(120), || {
        let metrics = scrape()?;
        Ok(holds(&metrics).then_some(()))
    })
    .unwrap_or_else(|error| panic!("{error:#}"));
}
