//! Smoke test: a QoS 1 publish/subscribe round trip through the Mosquitto that
//! `deploy/dev/services.sh up` starts, with the rumqttc client the agent uses.
//!
//! Why: the agent's MQTT source depends on QoS 1 delivery and on the broker letting many
//! messages be in flight at once; this proves the dev broker is configured for both.

use std::collections::BTreeSet;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::time::{timeout_at, Instant};
use tributary_tests::services::{service_env, unique_suffix, MQTT_ADDR};

const MESSAGE_COUNT: usize = 1000;

fn split_host_port(addr: &str) -> (String, u16) {
    let (host, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{MQTT_ADDR}={addr} is not host:port"));
    let port = port
        .parse()
        .unwrap_or_else(|error| panic!("{MQTT_ADDR}={addr}: bad port: {error}"));
    (host.to_string(), port)
}

fn options(client_id: String, host: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(Duration::from_secs(10));
    options
}

/// The subscriber's next event; panics with `missing()` when `deadline` passes first.
async fn next_event(
    eventloop: &mut EventLoop,
    deadline: Instant,
    addr: &str,
    missing: impl FnOnce() -> String,
) -> Event {
    match timeout_at(deadline, eventloop.poll()).await {
        Ok(Ok(event)) => event,
        Ok(Err(error)) => panic!("mosquitto at {addr}: subscriber connection failed: {error}"),
        Err(_) => panic!("mosquitto at {addr}: {}", missing()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_publish_subscribe_round_trip_at_qos_1() {
    let Some(addr) = service_env(MQTT_ADDR) else {
        return;
    };
    let (host, port) = split_host_port(&addr);
    let suffix = unique_suffix();
    let topic = format!("tributary/smoke/{suffix}");
    let deadline = Instant::now() + Duration::from_secs(30);

    let (subscriber, mut subscriber_loop) =
        AsyncClient::new(options(format!("smoke-sub-{suffix}"), &host, port), 64);
    subscriber
        .subscribe(&topic, QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    subscriber
        .subscribe("$SYS/broker/version", QoS::AtMostOnce)
        .await
        .expect("queue subscribe");
    let mut suback_count = 0;
    while suback_count < 2 {
        let event = next_event(&mut subscriber_loop, deadline, &addr, || {
            "no SUBACK within 30 s".to_string()
        })
        .await;
        if let Event::Incoming(Packet::SubAck(_)) = event {
            suback_count += 1;
        }
    }

    let (publisher, mut publisher_loop) = AsyncClient::new(
        options(format!("smoke-pub-{suffix}"), &host, port),
        MESSAGE_COUNT,
    );
    let publisher_driver = tokio::spawn(async move {
        let mut acknowledged = 0;
        while acknowledged < MESSAGE_COUNT {
            match publisher_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acknowledged += 1,
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(acknowledged)
    });
    let sent: BTreeSet<String> = (0..MESSAGE_COUNT)
        .map(|index| format!("reading-{index}"))
        .collect();
    for payload in &sent {
        publisher
            .publish(
                &topic,
                QoS::AtLeastOnce,
                false,
                payload.clone().into_bytes(),
            )
            .await
            .expect("queue publish");
    }

    let mut received = BTreeSet::new();
    let mut broker_version = None;
    while received.len() < MESSAGE_COUNT || broker_version.is_none() {
        let event = next_event(&mut subscriber_loop, deadline, &addr, || {
            format!(
                "received {} of {MESSAGE_COUNT} messages within 30 s (version seen: {broker_version:?})",
                received.len()
            )
        })
        .await;
        if let Event::Incoming(Packet::Publish(publish)) = event {
            let payload = String::from_utf8_lossy(&publish.payload).into_owned();
            if publish.topic == "$SYS/broker/version" {
                broker_version = Some(payload);
            } else {
                assert_eq!(publish.topic, topic);
                assert_eq!(publish.qos, QoS::AtLeastOnce, "delivery must keep QoS 1");
                received.insert(payload);
            }
        }
    }
    assert_eq!(
        received, sent,
        "every published payload arrives, and nothing else"
    );

    let acknowledged = timeout_at(deadline, publisher_driver)
        .await
        .expect("publisher did not get all PUBACKs within 30 s")
        .expect("publisher task panicked")
        .unwrap_or_else(|error| {
            panic!("mosquitto at {addr}: publisher connection failed: {error}")
        });
    assert_eq!(acknowledged, MESSAGE_COUNT);

    let _ = subscriber.disconnect().await;
    let _ = publisher.disconnect().await;
    eprintln!(
        "{} at {addr}: published and received {MESSAGE_COUNT} messages at QoS 1 ({acknowledged} PUBACKs)",
        broker_version.unwrap_or_default()
    );
}
