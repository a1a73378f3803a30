//! Subscribe mode's MQTT 3.1.1 fallback against a real Mosquitto: a proxy in front of it
//! refuses every MQTT 5 CONNECT the way a 3.1.1-only broker does (CONNACK "unacceptable
//! protocol version") and forwards 3.1.1 connections; the agent (`protocol = "auto"`) falls
//! back, subscribes, and acknowledges QoS 1 messages once durable.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Accepts MQTT connections; refuses MQTT 5 CONNECTs, pipes the rest to `upstream`.
async fn refuse_mqtt5_proxy(listener: tokio::net::TcpListener, upstream: String) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        let upstream = upstream.clone();
        tokio::spawn(async move {
            // Enough of the CONNECT to see the protocol level (byte 8 for a short CONNECT).
            let mut head = vec![0u8; 9];
            if client.read_exact(&mut head).await.is_err() {
                return;
            }
            if head[8] == 5 {
                let _ = client.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
                return;
            }
            let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            if server.write_all(&head).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_mqtt_3_1_1_when_the_broker_refuses_mqtt_5() {
    let Some(address) = service_env(MQTT_ADDR) else {
        return;
    };
    let (host, port) = address.rsplit_once(':').expect("host:port");
    let port: u16 = port.parse().expect("port");
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let proxy_address = proxy.local_addr().expect("proxy address");
    tokio::spawn(refuse_mqtt5_proxy(proxy, address.clone()));

    let suffix = unique_suffix();
    let prefix = format!("tributary-fallback-test/{suffix}");
    let directory = tempfile::tempdir().expect("tempdir");
    let metrics_port = free_port();
    let config_path = directory.path().join("agent.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
agent_id = "gw-fallback-test"
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
broker_address = "{proxy_address}"
client_id = "tributary-fallback-{suffix}"
[[sources.mqtt_subscribe.topics]]
template = "{prefix}/{{device}}/{{metric}}"
"#,
            directory.path().join("buffer").display()
        ),
    )
    .expect("write config");
    let mut agent = spawn_agent(&config_path);
    wait_for_metrics(
        metrics_port,
        &mut agent,
        Duration::from_secs(60),
        "the MQTT 3.1.1 connection after the fallback",
        |text| metric(text, "tributary_agent_source_connected{source=\"broker\"}") == Some(1.0),
    )
    .await;

    let mut options = MqttOptions::new(format!("tributary-fallback-pub-{suffix}"), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut publisher_loop) = AsyncClient::new(options, 64);
    let driver = tokio::spawn(async move {
        loop {
            if let Err(error) = publisher_loop.poll().await {
                panic!("publisher connection failed: {error}");
            }
        }
    });
    // Publish until the agent has taken readings (its subscription may still be in flight).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut value = 0u32;
    loop {
        publisher
            .publish(
                format!("{prefix}/dev-1/temp"),
                QoS::AtLeastOnce,
                false,
                value.to_string(),
            )
            .await
            .expect("publish");
        value += 1;
        let readings = get_metrics(metrics_port).and_then(|text| {
            metric(
                &text,
                "tributary_agent_readings_in_total{source=\"broker\",kind=\"mqtt_subscribe\"}",
            )
        });
        if readings.unwrap_or(0.0) >= 5.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never received a reading over MQTT 3.1.1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // QoS 1 acknowledgements flow: the pipeline released some after durable commits.
    wait_for_metrics(
        metrics_port,
        &mut agent,
        Duration::from_secs(30),
        "acknowledgements",
        |text| metric(text, "tributary_agent_mqtt_acks_total").unwrap_or(0.0) >= 1.0,
    )
    .await;
    driver.abort();
    let _ = agent.kill();
    let _ = agent.wait();
}
