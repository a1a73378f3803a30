//! Subscribe mode's MQTT 3.1.1 fallback against a real Mosquitto: a proxy in front of it
//! refuses every MQTT 5 CONNECT the way a 3.1.1-only broker does (CONNACK "unacceptable
//! protocol version") and forwards 3.1.1 connections; the agent (`protocol = "auto"`) falls
//! back, subscribes, and acknowledges QoS 1 messages once durable.

mod support;

use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions};
use support::{
    host_and_port, metric, publish_until, service_env, unique_suffix, AgentProcess, MQTT_ADDR,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let (host, port) = host_and_port(&address);
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let proxy_address = proxy.local_addr().expect("proxy address");
    tokio::spawn(refuse_mqtt5_proxy(proxy, address.clone()));

    let suffix = unique_suffix();
    let prefix = format!("tributary-fallback-test/{suffix}");
    let mut agent = AgentProcess::start(
        "gw-fallback-test",
        &format!(
            r#"
[[sources]]
name = "broker"
[sources.mqtt_subscribe]
broker_address = "{proxy_address}"
client_id = "tributary-fallback-{suffix}"
[[sources.mqtt_subscribe.topics]]
template = "{prefix}/{{device}}/{{metric}}"
"#
        ),
    );
    agent
        .wait_for_metrics(
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
    publish_until(
        &publisher,
        &format!("{prefix}/dev-1/temp"),
        |attempt| attempt.to_string(),
        &agent,
        "tributary_agent_readings_in_total{source=\"broker\",kind=\"mqtt_subscribe\"}",
        5.0,
        "a reading over MQTT 3.1.1",
    )
    .await;
    // QoS 1 acknowledgements flow: the pipeline released some after durable commits.
    agent
        .wait_for_metrics(Duration::from_secs(30), "acknowledgements", |text| {
            metric(text, "tributary_agent_mqtt_acks_total").unwrap_or(0.0) >= 1.0
        })
        .await;
    driver.abort();
}
