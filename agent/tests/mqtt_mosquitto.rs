//! The MQTT acknowledgement chain against a real Mosquitto: kill -9 the agent mid-stream at
//! QoS 1, restart it, and every message the broker was told was published must be in the
//! buffer (raw readings), with the windows' summaries covering them too.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tributary_agent::buffer::{BatchClass, BufferConfig, DiskBuffer, ReplayOrder};
use tributary_protocol::batch::{decode_batch, BatchLimits};

const MQTT_ADDR: &str = "TRIBUTARY_MQTT_ADDR";

/// The broker address from the environment or the env file `deploy/dev/services.sh up` writes
/// (same rules as `tributary_tests::services`, kept here so this crate does not depend on the
/// tests crate). `None` (skip, loudly) unless `CI=true`, where a missing broker fails.
fn service_env(name: &str) -> Option<String> {
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
        if std::env::var("CI").is_ok_and(|value| value == "true" || value == "1") {
            panic!("CI=true and a required service is missing: {message}");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

const MESSAGE_COUNT: u32 = 3_000;
const KILL_AFTER: u32 = 1_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

fn get_metrics(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

fn spawn_agent(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tributary-agent"))
        .args(["run", "--config", config.to_str().expect("utf-8 path")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn agent")
}

/// Waits until `condition` holds for the agent's /metrics, failing after `limit`.
async fn wait_for_metrics(
    port: u16,
    child: &mut Child,
    limit: Duration,
    what: &str,
    condition: impl Fn(&str) -> bool,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_9_at_qos_1_loses_nothing_the_broker_handed_over() {
    let Some(address) = service_env(MQTT_ADDR) else {
        return;
    };
    let (host, port) = address.rsplit_once(':').expect("host:port");
    let port: u16 = port.parse().expect("port");
    let suffix = unique_suffix();
    let prefix = format!("tributary-agent-test/{suffix}");
    let directory = tempfile::tempdir().expect("tempdir");
    let metrics_port = free_port();
    let buffer_path = directory.path().join("buffer");
    let config_path = directory.path().join("agent.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
agent_id = "gw-mqtt-test"
[collector]
address = "127.0.0.1:9"
cert_fingerprint_sha256 = "5E:9B:0C:21:7A:44:13:C8:F0:2D:6B:93:AA:10:7E:55:C4:21:08:3F:9D:6A:E2:71:B0:4C:58:13:2E:9F:07:D6"
token = "t"
[buffer]
path = "{}"
[metrics]
listen_address = "127.0.0.1:{metrics_port}"
[[sources]]
name = "broker"
[sources.mqtt_subscribe]
broker_address = "{address}"
client_id = "tributary-test-{suffix}"
qos = 1
[[sources.mqtt_subscribe.topics]]
template = "{prefix}/{{device}}/{{metric}}"
[sources.aggregation]
window_ms = 1000
raw = {{ policy = "all" }}
"#,
            buffer_path.display()
        ),
    )
    .expect("write config");

    let mut agent = spawn_agent(&config_path);
    wait_for_metrics(
        metrics_port,
        &mut agent,
        Duration::from_secs(60),
        "the MQTT connection",
        |text| metric(text, "tributary_agent_source_connected{source=\"broker\"}") == Some(1.0),
    )
    .await;

    let mut options = MqttOptions::new(format!("tributary-test-pub-{suffix}"), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut publisher_loop) = AsyncClient::new(options, 256);
    let (acked_sender, mut acked_receiver) = tokio::sync::watch::channel(0u32);
    let driver = tokio::spawn(async move {
        let mut acknowledged = 0u32;
        loop {
            match publisher_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acknowledged += 1;
                    let _ = acked_sender.send(acknowledged);
                }
                Ok(_) => {}
                Err(error) => panic!("publisher connection failed: {error}"),
            }
        }
    });

    // Probe until the agent's subscription is live (a probe is rejected: not a number).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        publisher
            .publish(
                format!("{prefix}/probe/temp"),
                QoS::AtLeastOnce,
                false,
                "probe",
            )
            .await
            .expect("publish probe");
        let seen = get_metrics(metrics_port).and_then(|text| {
            metric(
                &text,
                "tributary_agent_messages_in_total{source=\"broker\",kind=\"mqtt_subscribe\"}",
            )
        });
        if seen.unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never received a probe message"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for index in 0..MESSAGE_COUNT {
        let topic = format!("{prefix}/dev-{}/temp", index % 10);
        publisher
            .publish(topic, QoS::AtLeastOnce, false, index.to_string())
            .await
            .expect("publish");
        if index == KILL_AFTER {
            // Mid-stream: make sure the agent has taken some messages, then kill it hard.
            wait_for_metrics(metrics_port, &mut agent, Duration::from_secs(30), "some readings", |text| {
                metric(text, "tributary_agent_readings_in_total{source=\"broker\",kind=\"mqtt_subscribe\"}").unwrap_or(0.0) >= 200.0
            })
            .await;
            agent.kill().expect("kill -9");
            let _ = agent.wait();
            agent = spawn_agent(&config_path);
        }
    }
    // The sentinel is not a number: once the agent counts it rejected, everything the broker
    // queued before it has been delivered.
    publisher
        .publish(
            format!("{prefix}/sentinel/temp"),
            QoS::AtLeastOnce,
            false,
            "end",
        )
        .await
        .expect("publish sentinel");
    let deadline = Instant::now() + Duration::from_secs(60);
    while *acked_receiver.borrow_and_update() < MESSAGE_COUNT + 1 {
        assert!(
            Instant::now() < deadline,
            "Mosquitto did not acknowledge all publishes"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), acked_receiver.changed()).await;
    }
    wait_for_metrics(
        metrics_port,
        &mut agent,
        Duration::from_secs(60),
        "the sentinel",
        |text| {
            text.lines().any(|line| {
                line.starts_with("tributary_agent_rejected_total{source=\"broker\"")
                    && !line.ends_with(" 0")
            })
        },
    )
    .await;
    driver.abort();

    // Graceful stop: windows close, buffer flushes.
    // SAFETY: signalling our own child process by its id.
    assert_eq!(
        unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = agent.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "agent exit {status:?}");

    let buffer = DiskBuffer::open(BufferConfig::at(&buffer_path)).expect("open buffer");
    let mut raw_values = BTreeSet::new();
    let mut raw_readings = 0u64;
    let mut summarised = 0u64;
    for stored in buffer.replay(ReplayOrder::OldestFirst) {
        let stored = stored.expect("intact entry");
        let batch =
            decode_batch(&stored.payload, &BatchLimits::default()).expect("decodable batch");
        match stored.header.class {
            BatchClass::Raw => {
                for reading in &batch.readings {
                    raw_readings += 1;
                    raw_values.insert(reading.value as u32);
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
    let missing: Vec<u32> = (0..MESSAGE_COUNT)
        .filter(|value| !raw_values.contains(value))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {MESSAGE_COUNT} messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(raw_readings >= u64::from(MESSAGE_COUNT));
    assert!(
        summarised >= u64::from(MESSAGE_COUNT),
        "summaries cover {summarised} readings, expected at least {MESSAGE_COUNT}"
    );
    eprintln!(
        "raw readings {raw_readings} (duplicates from redelivery: {}), summarised {summarised}",
        raw_readings - u64::from(MESSAGE_COUNT)
    );
}
