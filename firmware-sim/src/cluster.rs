//! Real processes on loopback: a collector and agents started from their binaries with
//! generated configs, for the demo and the end-to-end tests.
//!
//! Why processes and not libraries: the end-to-end promises are about what survives a
//! `kill -9`, a restart, a network cut; only real processes with their own state
//! directories can show that. Everything here is blocking std code (no runtime), waits for
//! conditions with deadlines (never sleeps to synchronise), and every child gets
//! `PR_SET_PDEATHSIG` so nothing outlives the process that started it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where the `tributary-agent` and `tributary-collector` binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    pub collector: PathBuf,
}

impl Binaries {
    /// `$TRIBUTARY_BIN_DIR`, else the directory of the running executable or its parent
    /// (test executables live in `target/<profile>/deps/`).
    pub fn locate() -> anyhow::Result<Self> {
        let mut candidates = Vec::new();
        if let Some(dir) = std::env::var_os("TRIBUTARY_BIN_DIR") {
            candidates.push(PathBuf::from(dir));
        }
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                candidates.push(dir.to_path_buf());
                if let Some(parent) = dir.parent() {
                    candidates.push(parent.to_path_buf());
                }
            }
        }
        for dir in &candidates {
            let agent = dir.join("tributary-agent");
            let collector = dir.join("tributary-collector");
            if agent.is_file() && collector.is_file() {
                return Ok(Self { agent, collector });
            }
        }
        bail!(
            "tributary-agent and tributary-collector binaries not found in {:?}; build them \
             (`cargo build -p tributary-agent -p tributary-collector`) or set TRIBUTARY_BIN_DIR",
            candidates
        )
    }
}

/// A TCP port free on 127.0.0.1 right now (the OS picks; the listener is closed again).
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A UDP port free on 127.0.0.1 right now.
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `condition` returns `Some`, checking every `poll`; fails after `timeout`
/// with `what` and the last error the condition reported.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match condition() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(error) => bail!("timed out after {timeout:?} waiting for {what}: {error:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 GET on loopback: status and body. Enough for our own JSON and metrics
/// endpoints (Content-Length or chunked bodies).
pub fn http_get(address: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .with_context(|| format!("connecting to http://{address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading http://{address}{path}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("http://{address}{path}: response without a header end"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("http://{address}{path}: no status in {head:?}"))?;
    let chunked = head.lines().any(|line| {
        let lower = line.to_ascii_lowercase();
        lower.starts_with("transfer-encoding:") && lower.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body.split_once("\r\n").context("truncated chunked body")?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).context("truncated chunk")?;
        out.push_str(chunk);
        body = rest.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// The value of a Prometheus sample `name{labels}` (labels as written, e.g.
/// `source="fleet"`), or of `name` without labels when `labels` is empty; summed over
/// every sample that matches when `labels` is a subset.
pub fn metric_value(metrics_text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut total = None;
    for line in metrics_text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name || !labels.iter().all(|label| label_text.contains(label)) {
            continue;
        }
        if let Ok(value) = value.parse::<f64>() {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

/// A child process with its output in files and a death signal tied to our thread.
#[derive(Debug)]
pub struct Process {
    name: String,
    command: Vec<String>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    child: Option<Child>,
}

impl Process {
    fn spawn(name: &str, program: &Path, args: &[&str], dir: &Path) -> anyhow::Result<Self> {
        let stdout_path = dir.join(format!("{name}.stdout"));
        let stderr_path = dir.join(format!("{name}.stderr"));
        let mut process = Self {
            name: name.to_string(),
            command: std::iter::once(program.display().to_string())
                .chain(args.iter().map(|arg| arg.to_string()))
                .collect(),
            stdout_path,
            stderr_path,
            child: None,
        };
        process.start()?;
        Ok(process)
    }

    /// (Re)starts the command; output is appended to the same files.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let open = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))
        };
        let mut command = Command::new(&self.command[0]);
        command
            .args(&self.command[1..])
            .stdin(Stdio::null())
            .stdout(open(&self.stdout_path)?)
            .stderr(open(&self.stderr_path)?);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.command.join(" ")))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The last lines of stderr, for error messages.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let text = self.stderr();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails if the process has exited (with its status and stderr tail).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!(
                "{} exited with {status}; stderr ends with:\n{}",
                self.name,
                self.stderr_tail(30)
            );
        }
        Ok(())
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit (SIGKILL after it). Returns
    /// whether the exit was clean (status 0).
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() >= deadline {
                child.kill().ok();
                child.wait()?;
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// How to run a collector.
#[derive(Debug, Clone)]
pub struct CollectorSpec {
    /// State, config, tokens and output files go here.
    pub dir: PathBuf,
    /// Agents to create tokens for.
    pub agent_ids: Vec<String>,
    /// Extra TOML appended to the generated config (`[log]`, `[store]`, `[process]`
    /// sections for Kafka and ClickHouse setups).
    pub extra_config: String,
    /// Port of the query API and dashboard; a free one when `None`.
    pub api_port: Option<u16>,
}

/// A running `tributary-collector serve`.
#[derive(Debug)]
pub struct Collector {
    pub process: Process,
    pub config_path: PathBuf,
    pub quic_address: SocketAddr,
    pub metrics_address: SocketAddr,
    pub api_address: SocketAddr,
    pub fingerprint: String,
    /// Token per agent id, in the order of `CollectorSpec::agent_ids`.
    pub tokens: Vec<(String, String)>,
}

impl Collector {
    pub fn start(binaries: &Binaries, spec: &CollectorSpec) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("creating {}", spec.dir.display()))?;
        let quic_address = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        let metrics_address = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let api_port = match spec.api_port {
            Some(port) => port,
            None => free_tcp_port()?,
        };
        let api_address = SocketAddr::from(([127, 0, 0, 1], api_port));
        let tokens_file = spec.dir.join("tokens");
        let config_path = spec.dir.join("collector.toml");
        let config = format!(
            "state_dir = {state_dir:?}\nmetrics_address = \"{metrics_address}\"\n\n\
             [ingest]\nlisten_address = \"{quic_address}\"\ntokens_file = {tokens_file:?}\n\n\
             [api]\nlisten_address = \"{api_address}\"\n\n{extra}\n",
            state_dir = spec.dir.join("state").display().to_string(),
            tokens_file = tokens_file.display().to_string(),
            extra = spec.extra_config,
        );
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut tokens = Vec::new();
        for agent_id in &spec.agent_ids {
            let output = Command::new(&binaries.collector)
                .args(["token", "add", agent_id, "--tokens-file"])
                .arg(&tokens_file)
                .output()
                .context("running tributary-collector token add")?;
            if !output.status.success() {
                bail!(
                    "tributary-collector token add {agent_id} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let token = String::from_utf8_lossy(&output.stdout).trim().to_string();
            tokens.push((agent_id.clone(), token));
        }
        let config_arg = config_path.display().to_string();
        let process = Process::spawn(
            "collector",
            &binaries.collector,
            &["serve", "--config", &config_arg],
            &spec.dir,
        )?;
        let mut collector = Self {
            process,
            config_path,
            quic_address,
            metrics_address,
            api_address,
            fingerprint: String::new(),
            tokens,
        };
        collector.wait_ready()?;
        Ok(collector)
    }

    /// Waits for the fingerprint line and a 200 from `/readyz`.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let metrics_address = self.metrics_address;
        let process = &mut self.process;
        let fingerprint = wait_for("the collector to start", Duration::from_secs(60), || {
            process.check_running()?;
            let stdout = process.stdout();
            let fingerprint = stdout
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("certificate fingerprint (sha256): "))
                .map(str::to_string);
            let Some(fingerprint) = fingerprint else {
                return Ok(None);
            };
            match http_get(metrics_address, "/readyz") {
                Ok((200, _)) => Ok(Some(fingerprint)),
                Ok((status, body)) => bail!("/readyz answered {status}: {body}"),
                Err(error) => Err(error),
            }
        })?;
        self.fingerprint = fingerprint;
        Ok(())
    }

    pub fn token(&self, agent_id: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(id, _)| id == agent_id)
            .map(|(_, token)| token.as_str())
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        match http_get(self.metrics_address, "/metrics")? {
            (200, body) => Ok(body),
            (status, body) => bail!("collector /metrics answered {status}: {body}"),
        }
    }

    /// GET on the query API; the body of a 200, else an error with the answer.
    pub fn api_get(&self, path: &str) -> anyhow::Result<String> {
        match http_get(self.api_address, path)? {
            (200, body) => Ok(body),
            (status, body) => bail!("GET {path} answered {status}: {body}"),
        }
    }

    /// Restarts after a kill or stop, with the same config and state.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.start()?;
        self.wait_ready()
    }
}

/// How to run an agent: an embedded MQTT broker source and optionally a serial source.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub dir: PathBuf,
    pub agent_id: String,
    pub collector_address: SocketAddr,
    pub fingerprint: String,
    pub token: String,
    /// The tty (or a symlink to it) of a serial device to read, if any.
    pub serial_path: Option<PathBuf>,
    /// Edge window width.
    pub window_ms: u64,
    /// Buffer cap in bytes.
    pub max_buffer_bytes: u64,
    /// Topic prefix the simulator uses (`P/site/...`), if any.
    pub topic_prefix: Option<String>,
    /// Extra TOML appended to the generated config (e.g. a `[batching]` section).
    pub extra_config: String,
}

impl AgentSpec {
    pub fn new(dir: PathBuf, agent_id: &str, collector: &Collector) -> anyhow::Result<Self> {
        let token = collector
            .token(agent_id)
            .with_context(|| format!("the collector has no token for {agent_id}"))?
            .to_string();
        Ok(Self {
            dir,
            agent_id: agent_id.to_string(),
            collector_address: collector.quic_address,
            fingerprint: collector.fingerprint.clone(),
            token,
            serial_path: None,
            window_ms: 10_000,
            max_buffer_bytes: 64 * 1024 * 1024,
            topic_prefix: None,
            extra_config: String::new(),
        })
    }
}

/// A running `tributary-agent run`.
#[derive(Debug)]
pub struct Agent {
    pub process: Process,
    pub config_path: PathBuf,
    pub broker_address: SocketAddr,
    pub metrics_address: SocketAddr,
}

impl Agent {
    pub fn start(binaries: &Binaries, spec: &AgentSpec) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("creating {}", spec.dir.display()))?;
        let broker_address = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let metrics_address = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let config_path = spec.dir.join("agent.toml");
        let prefix = spec
            .topic_prefix
            .as_ref()
            .map(|prefix| format!("{prefix}/"))
            .unwrap_or_default();
        let mut config = format!(
            "agent_id = {agent_id:?}\n\n\
             [collector]\naddress = \"{collector}\"\nserver_name = \"localhost\"\n\
             cert_fingerprint_sha256 = {fingerprint:?}\ntoken = {token:?}\n\n\
             [buffer]\npath = {buffer:?}\nmax_buffer_bytes = {max_buffer_bytes}\n\n\
             [metrics]\nlisten_address = \"{metrics_address}\"\n\n\
             [[sources]]\nname = \"fleet\"\n\n\
             [sources.mqtt_broker]\nlisten_address = \"{broker_address}\"\n\n\
             [[sources.mqtt_broker.topics]]\ntemplate = \"{prefix}site/{{site}}/dev/{{device}}/{{metric}}\"\n\
             payload = {{ format = \"plain\" }}\n\n\
             [[sources.mqtt_broker.topics]]\ntemplate = \"{prefix}site/{{site}}/dev/{{device}}\"\n\
             payload = {{ format = \"json\", timestamp_field = \"ts\", timestamp_unit = \"ms\" }}\n\n\
             [sources.aggregation]\nwindow_ms = {window_ms}\nraw = {{ policy = \"all\" }}\n",
            agent_id = spec.agent_id,
            collector = spec.collector_address,
            fingerprint = spec.fingerprint,
            token = spec.token,
            buffer = spec.dir.join("buffer").display().to_string(),
            max_buffer_bytes = spec.max_buffer_bytes,
            window_ms = spec.window_ms,
        );
        if let Some(serial) = &spec.serial_path {
            config.push_str(&format!(
                "\n[[sources]]\nname = \"serial\"\n\n[sources.serial]\npath = {path:?}\n\
                 reconnect_interval_ms = 100\n\n[sources.aggregation]\nwindow_ms = {window_ms}\n\
                 raw = {{ policy = \"all\" }}\n",
                path = serial.display().to_string(),
                window_ms = spec.window_ms,
            ));
        }
        if !spec.extra_config.is_empty() {
            config.push('\n');
            config.push_str(&spec.extra_config);
            config.push('\n');
        }
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let config_arg = config_path.display().to_string();
        let process = Process::spawn(
            &format!("agent-{}", spec.agent_id),
            &binaries.agent,
            &["run", "--config", &config_arg],
            &spec.dir,
        )?;
        let mut agent = Self {
            process,
            config_path,
            broker_address,
            metrics_address,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Waits for `/metrics` and the broker's port to answer.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let metrics_address = self.metrics_address;
        let broker_address = self.broker_address;
        let process = &mut self.process;
        wait_for("the agent to start", Duration::from_secs(60), || {
            process.check_running()?;
            if http_get(metrics_address, "/metrics").is_err() {
                return Ok(None);
            }
            Ok(
                TcpStream::connect_timeout(&broker_address, Duration::from_secs(1))
                    .ok()
                    .map(|_| ()),
            )
        })
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        match http_get(self.metrics_address, "/metrics")? {
            (200, body) => Ok(body),
            (status, body) => bail!("agent /metrics answered {status}: {body}"),
        }
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.start()?;
        self.wait_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_are_found_by_name_and_label_subset() {
        let text = "# HELP x\nreadings_total{source=\"a\",kind=\"raw\"} 3\n\
                    readings_total{source=\"b\",kind=\"raw\"} 4\nother 1.5\n";
        assert_eq!(metric_value(text, "readings_total", &[]), Some(7.0));
        assert_eq!(
            metric_value(text, "readings_total", &["source=\"b\""]),
            Some(4.0)
        );
        assert_eq!(metric_value(text, "other", &[]), Some(1.5));
        assert_eq!(metric_value(text, "missing", &[]), None);
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").ok(),
            Some("hello world".to_string())
        );
        assert!(dechunk("zz\r\nhello").is_err());
    }

    #[test]
    fn the_relay_forwards_both_ways_and_drops_everything_while_cut() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_address = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buffer = [0_u8; 64];
            while let Ok((length, from)) = echo.recv_from(&mut buffer) {
                let _ = echo.send_to(&buffer[..length], from);
            }
        });
        let relay = UdpRelay::start(echo_address).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buffer = [0_u8; 64];
        client.send_to(b"one", relay.address).unwrap();
        let (length, _) = client.recv_from(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"one");
        relay.set_cut(true);
        client.send_to(b"two", relay.address).unwrap();
        assert!(
            client.recv_from(&mut buffer).is_err(),
            "a cut relay forwarded"
        );
        assert_eq!(relay.dropped(), 1);
        relay.set_cut(false);
        client.send_to(b"three", relay.address).unwrap();
        let (length, _) = client.recv_from(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"three");
        // Counted after the send returns, so the echo may arrive first: wait for the count.
        wait_for("the relay to count", Duration::from_secs(5), || {
            Ok((relay.bytes_up() == 8 && relay.bytes_down() == 8).then_some(()))
        })
        .unwrap_or_else(|error| {
            panic!(
                "{error}: up {} down {} (expected 8 each: the dropped datagram is not counted)",
                relay.bytes_up(),
                relay.bytes_down()
            )
        });
    }

    #[test]
    fn the_tcp_relay_forwards_and_counts_both_ways() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_address = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = echo.accept() {
                let mut buffer = [0_u8; 64];
                while let Ok(length) = stream.read(&mut buffer) {
                    if length == 0 || stream.write_all(&buffer[..length]).is_err() {
                        break;
                    }
                }
            }
        });
        let relay = TcpRelay::start(echo_address).unwrap();
        let mut client = TcpStream::connect(relay.address).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.write_all(b"hello relay").unwrap();
        let mut answer = [0_u8; 11];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"hello relay");
        wait_for("the relay to count", Duration::from_secs(5), || {
            Ok((relay.bytes_up() == 11 && relay.bytes_down() == 11).then_some(()))
        })
        .unwrap();
    }

    #[test]
    fn waiting_reports_the_last_error_on_timeout() {
        let error = wait_for::<()>("nothing", Duration::from_millis(10), || {
            bail!("still broken")
        })
        .unwrap_err();
        assert!(error.to_string().contains("still broken"), "{error}");
    }
}

/// A UDP relay between agents and a collector that a test can cut: while cut, every
/// datagram in both directions is dropped (a network outage as QUIC sees it, without
/// root or namespaces). One upstream socket per client address, so QUIC connection
/// migration and several agents work.
#[derive(Debug)]
pub struct UdpRelay {
    pub address: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// UDP payload bytes forwarded towards the upstream (agent -> collector) and back.
    bytes_up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    bytes_down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpRelay {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        use std::collections::hash_map::Entry;
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;

        let listener = UdpSocket::bind("127.0.0.1:0").context("binding the relay")?;
        listener.set_read_timeout(Some(Duration::from_millis(50)))?;
        let address = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let bytes_up = Arc::new(AtomicU64::new(0));
        let bytes_down = Arc::new(AtomicU64::new(0));
        let thread = {
            let (cut, stop, dropped) = (cut.clone(), stop.clone(), dropped.clone());
            let (bytes_up, bytes_down) = (bytes_up.clone(), bytes_down.clone());
            std::thread::Builder::new()
                .name("udp-relay".into())
                .spawn(move || {
                    // Upstream here; one thread per client carries the collector's answers back.
                    let mut upstreams: HashMap<SocketAddr, UdpSocket> = HashMap::new();
                    let mut downstream_threads = Vec::new();
                    let mut buffer = vec![0_u8; 65_536];
                    while !stop.load(Ordering::SeqCst) {
                        let Ok((length, client)) = listener.recv_from(&mut buffer) else {
                            continue;
                        };
                        let socket = match upstreams.entry(client) {
                            Entry::Occupied(entry) => entry.into_mut(),
                            Entry::Vacant(entry) => {
                                let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
                                    continue;
                                };
                                let (Ok(()), Ok(()), Ok(back), Ok(reply)) = (
                                    socket.connect(upstream),
                                    socket.set_read_timeout(Some(Duration::from_millis(50))),
                                    socket.try_clone(),
                                    listener.try_clone(),
                                ) else {
                                    continue;
                                };
                                let (cut, stop, dropped) =
                                    (cut.clone(), stop.clone(), dropped.clone());
                                let bytes_down = bytes_down.clone();
                                downstream_threads.push(std::thread::spawn(move || {
                                    let mut buffer = vec![0_u8; 65_536];
                                    while !stop.load(Ordering::SeqCst) {
                                        let Ok(length) = back.recv(&mut buffer) else {
                                            continue;
                                        };
                                        if cut.load(Ordering::SeqCst) {
                                            dropped.fetch_add(1, Ordering::Relaxed);
                                        } else if reply.send_to(&buffer[..length], client).is_ok() {
                                            bytes_down.fetch_add(length as u64, Ordering::Relaxed);
                                        }
                                    }
                                }));
                                entry.insert(socket)
                            }
                        };
                        if cut.load(Ordering::SeqCst) {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        } else if socket.send(&buffer[..length]).is_ok() {
                            bytes_up.fetch_add(length as u64, Ordering::Relaxed);
                        }
                    }
                    for thread in downstream_threads {
                        let _ = thread.join();
                    }
                })
                .context("starting the relay thread")?
        };
        Ok(Self {
            address,
            cut,
            stop,
            dropped,
            bytes_up,
            bytes_down,
            thread: Some(thread),
        })
    }

    /// UDP payload bytes forwarded from clients to the upstream so far (IP and UDP headers
    /// not included).
    pub fn bytes_up(&self) -> u64 {
        self.bytes_up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// UDP payload bytes forwarded from the upstream back to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.bytes_down.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops everything from now on (`true`) or forwards again (`false`).
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }

    /// Datagrams dropped while cut.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP relay that counts the bytes it carries each way: the uplink of a do-it-yourself
/// MQTT bridge, measured the way [`UdpRelay`] measures the agent's QUIC traffic (payload
/// bytes, without IP and TCP headers). One pair of copy threads per accepted connection.
#[derive(Debug)]
pub struct TcpRelay {
    pub address: SocketAddr,
    bytes_up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    bytes_down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpRelay {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};

        let listener = TcpListener::bind("127.0.0.1:0").context("binding the TCP relay")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let bytes_up = Arc::new(AtomicU64::new(0));
        let bytes_down = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (bytes_up, bytes_down) = (bytes_up.clone(), bytes_down.clone());
            let (stop, connections) = (stop.clone(), connections.clone());
            std::thread::Builder::new()
                .name("tcp-relay".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let client = match listener.accept() {
                            Ok((client, _)) => client,
                            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(10));
                                continue;
                            }
                            Err(_) => continue,
                        };
                        let Ok(server) =
                            TcpStream::connect_timeout(&upstream, Duration::from_secs(2))
                        else {
                            continue;
                        };
                        let (Ok(()), Ok(()), Ok(()), Ok(client_read), Ok(server_read)) = (
                            client.set_nonblocking(false),
                            client.set_nodelay(true),
                            server.set_nodelay(true),
                            client.try_clone(),
                            server.try_clone(),
                        ) else {
                            continue;
                        };
                        if let Ok(mut open) = connections.lock() {
                            open.extend(client.try_clone().ok());
                            open.extend(server.try_clone().ok());
                        }
                        Self::copy(client_read, server, bytes_up.clone());
                        Self::copy(server_read, client, bytes_down.clone());
                    }
                })
                .context("starting the TCP relay thread")?
        };
        Ok(Self {
            address,
            bytes_up,
            bytes_down,
            stop,
            connections,
            thread: Some(thread),
        })
    }

    /// Copies `from` into `to` until either side closes, counting what was written.
    fn copy(
        mut from: TcpStream,
        mut to: TcpStream,
        counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) {
        std::thread::spawn(move || {
            let mut buffer = vec![0_u8; 65_536];
            loop {
                let length = match from.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(length) => length,
                };
                let Some(chunk) = buffer.get(..length) else {
                    break;
                };
                if to.write_all(chunk).is_err() {
                    break;
                }
                counter.fetch_add(length as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }

    /// Bytes carried from clients to the upstream so far (TCP payload only).
    pub fn bytes_up(&self) -> u64 {
        self.bytes_up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes carried from the upstream back to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.bytes_down.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(open) = self.connections.lock() {
            for stream in open.iter() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
