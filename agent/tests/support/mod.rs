//! Shared by the tests that run the `tributary-agent` binary as a user would (`mqtt_*`,
//! `broker_clients`, `cli_commands`): finding the dev services, writing a config, starting,
//! killing and stopping the agent, reading its /metrics, waiting for a condition with a
//! deadline (never sleeping to synchronise), and reading back what landed in its buffer.
//! One copy here so a change to how the agent is run is made once.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tributary_agent::aggregate::registry::SeriesRegistry;
use tributary_agent::buffer::{BatchClass, BufferConfig, DiskBuffer, ReplayOrder};
use tributary_protocol::batch::{decode_batch, BatchLimits};

/// The env variable (or env-file key) naming the dev Mosquitto's `host:port`.
pub const MQTT_ADDR: &str = "TRIBUTARY_MQTT_ADDR";

/// The broker address from the environment or the env file `deploy/dev/services.sh up` writes
/// (same rules as `tributary_tests::services`, kept here so this crate does not depend on the
/// tests crate). `None` (skip, loudly) unless `CI=true`, where a missing service fails.
pub fn service_env(name: &str) -> Option<String> {
    let from_env = std::env::var(name).ok().filter(|value| !value.is_empty());
    let mut files = Vec::new();
    if let Ok(directory) = std::env::var("TRIBUTARY_SERVICES_DIR") {
        files.push(Path::new(&directory).join("env"));
    }
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.services/env"));
    let found = from_env.or_else(|| {
        files.iter().find_map(|path| {
            let contents = std::fs::read_to_string(path).ok()?;
            contents.lines().find_map(|line| {
                let line = line.trim();
                let line = line.strip_prefix("export ").unwrap_or(line);
                let (key, value) = line.split_once('=')?;
                (key.trim() == name)
                    .then(|| value.trim().trim_matches('"').trim_matches('\'').to_owned())
                    .filter(|value| !value.is_empty())
            })
        })
    });
    if found.is_none() {
        let message =
            format!("{name} is not set; start the services with `deploy/dev/services.sh up`");
        if ci_requires_services() {
            panic!("CI=true and a required service is missing: {message}");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}

/// With `CI=true` a missing service or tool fails the test instead of skipping it.
pub fn ci_requires_services() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}

/// Splits a `host:port` service address.
pub fn host_and_port(address: &str) -> (&str, u16) {
    let (host, port) = address.rsplit_once(':').expect("host:port");
    (host, port.parse().expect("port"))
}

/// Unique per process and moment: keeps topics and client ids of concurrent runs apart.
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// The whole HTTP response of the agent's /metrics, or `None` while it does not answer.
pub fn get_metrics(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// The value of one series (name with its labels, exactly as rendered) in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// An agent config that ships nowhere (collector on the discard port), buffers under
/// `buffer`, serves /metrics on `metrics_port`, followed by `sources` (TOML from
/// `[[sources]]` on).
pub fn agent_config(agent_id: &str, buffer: &Path, metrics_port: u16, sources: &str) -> String {
    format!(
        r#"
agent_id = "{agent_id}"
[collector]
address = "127.0.0.1:9"
cert_fingerprint_sha256 = "5E:9B:0C:21:7A:44:13:C8:F0:2D:6B:93:AA:10:7E:55:C4:21:08:3F:9D:6A:E2:71:B0:4C:58:13:2E:9F:07:D6"
token = "t"
[buffer]
path = "{}"
[metrics]
listen_address = "127.0.0.1:{metrics_port}"
{sources}"#,
        buffer.display()
    )
}

/// `tributary-agent run --config <config>` with logs at info to `stderr`.
pub fn spawn_agent(config: &Path, stderr: Stdio) -> Child {
    spawn_agent_with_env(config, stderr, &[])
}

/// [`spawn_agent`] with extra environment variables (a fault switch, for example).
pub fn spawn_agent_with_env(config: &Path, stderr: Stdio, env: &[(&str, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tributary-agent"))
        .args(["run", "--config", config.to_str().expect("utf-8 path")])
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn agent")
}

/// Waits until `condition` holds for the agent's /metrics text, failing after `limit` or as
/// soon as the agent exits.
pub async fn wait_for_metrics(
    port: u16,
    child: &mut Child,
    limit: Duration,
    what: &str,
    mut condition: impl FnMut(&str) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(text) = get_metrics(port) {
            if condition(&text) {
                return;
            }
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "agent exited while waiting for {what}"
        );
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGTERM, then waits up to `limit` for the exit (windows close, the buffer flushes).
pub async fn terminate(child: &mut Child, limit: Duration) -> ExitStatus {
    // SAFETY: signalling our own child process by its id.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not stop within {limit:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent process with its config, buffer and metrics port in a temporary directory that
/// lives as long as it does; killed on drop.
pub struct AgentProcess {
    pub child: Child,
    pub config: PathBuf,
    pub buffer: PathBuf,
    pub metrics_port: u16,
    _directory: tempfile::TempDir,
}

impl AgentProcess {
    /// Writes [`agent_config`] with `sources` and starts the agent on it.
    pub fn start(agent_id: &str, sources: &str) -> AgentProcess {
        AgentProcess::start_with_env(agent_id, sources, &[])
    }

    /// [`AgentProcess::start`] with extra environment variables for this first run only:
    /// [`AgentProcess::restart`] starts the agent without them (a fault armed once).
    pub fn start_with_env(agent_id: &str, sources: &str, env: &[(&str, String)]) -> AgentProcess {
        let directory = tempfile::tempdir().expect("tempdir");
        let metrics_port = free_port();
        let buffer = directory.path().join("buffer");
        let config = directory.path().join("agent.toml");
        std::fs::write(
            &config,
            agent_config(agent_id, &buffer, metrics_port, sources),
        )
        .expect("write config");
        let child = spawn_agent_with_env(&config, Stdio::inherit(), env);
        AgentProcess {
            child,
            config,
            buffer,
            metrics_port,
            _directory: directory,
        }
    }

    /// kill -9 and reap: no chance to flush or close windows.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// Starts the agent again on the same config and buffer.
    pub fn restart(&mut self) {
        self.child = spawn_agent(&self.config, Stdio::inherit());
    }

    /// Waits up to `limit` for the agent to exit by itself (an armed fault), failing after it.
    pub async fn wait_for_exit(&mut self, limit: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn wait_for_metrics(
        &mut self,
        limit: Duration,
        what: &str,
        condition: impl FnMut(&str) -> bool,
    ) {
        wait_for_metrics(self.metrics_port, &mut self.child, limit, what, condition).await;
    }

    /// One series' current value, `None` while the agent does not answer or lacks it.
    pub fn metric(&self, series: &str) -> Option<f64> {
        get_metrics(self.metrics_port).and_then(|text| metric(&text, series))
    }

    /// SIGTERM and wait for a successful exit.
    pub async fn stop(&mut self) {
        let status = terminate(&mut self.child, Duration::from_secs(30)).await;
        assert!(status.success(), "agent exit {status:?}");
    }

    /// What the (stopped) agent's buffer holds.
    pub fn buffered(&self) -> Buffered {
        buffered(&self.buffer)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a buffer holds: raw reading values by device, and how many readings the summaries
/// cover.
pub struct Buffered {
    pub raw_by_device: BTreeMap<String, Vec<i64>>,
    pub summarised: u64,
}

/// Reads every batch in the buffer at `path` (oldest first); each must be intact. A reading's
/// device comes from its batch's series definitions or, for batches buffered without them,
/// from the series registry in the agent's state database beside the buffer.
pub fn buffered(path: &Path) -> Buffered {
    let buffer = DiskBuffer::open(BufferConfig::at(path)).expect("open buffer");
    let state_path = tributary_agent::run::state_path(path);
    let registry = state_path.exists().then(|| {
        let state = sled::open(&state_path).expect("open the agent state database");
        SeriesRegistry::open(state.open_tree("series").expect("series tree"))
            .expect("load the series registry")
    });
    let mut raw_by_device: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut summarised = 0u64;
    for stored in buffer.replay(ReplayOrder::OldestFirst) {
        let stored = stored.expect("intact entry");
        let batch =
            decode_batch(&stored.payload, &BatchLimits::default()).expect("decodable batch");
        match stored.header.class {
            BatchClass::Raw => {
                for reading in &batch.readings {
                    let device = batch
                        .series
                        .iter()
                        .find(|definition| definition.id == reading.series)
                        .map(|definition| definition.key.device_id.clone())
                        .or_else(|| {
                            let key = registry.as_ref()?.key(reading.series)?;
                            Some(key.device_id.clone())
                        })
                        .unwrap_or_else(|| "?".to_owned());
                    raw_by_device
                        .entry(device)
                        .or_default()
                        .push(reading.value as i64);
                }
            }
            BatchClass::Summary => {
                summarised += batch
                    .summaries
                    .iter()
                    .map(|summary| summary.summary.count)
                    .sum::<u64>()
            }
        }
    }
    Buffered {
        raw_by_device,
        summarised,
    }
}

/// Publishes to `topic` at QoS 1 (payload `payload(attempt)`, attempt counting from 0) until the
/// agent's `series` reaches `at_least`, failing after 30 s: a subscription or connection may
/// still be in flight when a test starts publishing. Returns how many it published.
pub async fn publish_until(
    publisher: &rumqttc::AsyncClient,
    topic: &str,
    payload: impl Fn(u32) -> String,
    agent: &AgentProcess,
    series: &str,
    at_least: f64,
    what: &str,
) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0u32;
    loop {
        publisher
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload(attempt))
            .await
            .expect("publish");
        attempt += 1;
        if agent.metric(series).unwrap_or(0.0) >= at_least {
            return attempt;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never received {what} ({series} below {at_least} after 30 s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A QoS 1 publisher on a broker with a task that drives its connection and counts the
/// broker's PUBACKs; the task stops when this is dropped.
pub struct Publisher {
    pub client: rumqttc::AsyncClient,
    acknowledged: tokio::sync::watch::Receiver<u32>,
    driver: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Connects as `client_id` to `address` (`host:port`) with a request channel of `capacity`.
    pub fn connect(address: &str, client_id: String, capacity: usize) -> Publisher {
        use rumqttc::{Event, Packet};
        let (host, port) = host_and_port(address);
        let mut options = rumqttc::MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut event_loop) = rumqttc::AsyncClient::new(options, capacity);
        let (sender, acknowledged) = tokio::sync::watch::channel(0u32);
        let driver = tokio::spawn(async move {
            let mut count = 0u32;
            loop {
                match event_loop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        count += 1;
                        let _ = sender.send(count);
                    }
                    Ok(_) => {}
                    Err(error) => panic!("publisher connection failed: {error}"),
                }
            }
        });
        Publisher {
            client,
            acknowledged,
            driver,
        }
    }

    /// Publishes at QoS 1 (queued to the connection task).
    pub async fn publish(&self, topic: String, payload: String) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }

    /// Publishes probes (rejected by the agent: not a number) to `{prefix}/probe/temp` until the
    /// agent's subscribe source `source` has taken one, i.e. its subscription is live; returns
    /// how many it published.
    pub async fn probe_subscription(
        &self,
        prefix: &str,
        agent: &AgentProcess,
        source: &str,
    ) -> u32 {
        publish_until(
            &self.client,
            &format!("{prefix}/probe/temp"),
            |_| "probe".to_owned(),
            agent,
            &format!(
                "tributary_agent_messages_in_total{{source=\"{source}\",kind=\"mqtt_subscribe\"}}"
            ),
            1.0,
            "a probe message",
        )
        .await
    }

    /// Waits until the broker has acknowledged `count` publishes, failing after `limit`.
    pub async fn wait_for_acks(&mut self, count: u32, limit: Duration) {
        let deadline = Instant::now() + limit;
        while *self.acknowledged.borrow_and_update() < count {
            assert!(
                Instant::now() < deadline,
                "the broker acknowledged only {} of {count} publishes within {limit:?}",
                *self.acknowledged.borrow()
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), self.acknowledged.changed()).await;
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.driver.abort();
    }
}
