//! The MQTT acknowledgement chain against a real Mosquitto: kill -9 the agent mid-stream at
//! QoS 1, restart it, and every message the broker was told was published must be in the
//! buffer (raw readings), with the windows' summaries covering them too.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{metric, service_env, unique_suffix, AgentProcess, Publisher, MQTT_ADDR};

const MESSAGE_COUNT: u32 = 3_000;
const KILL_AFTER: u32 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_9_at_qos_1_loses_nothing_the_broker_handed_over() {
    let Some(address) = service_env(MQTT_ADDR) else {
        return;
    };
    let suffix = unique_suffix();
    let prefix = format!("tributary-agent-test/{suffix}");
    let mut agent = AgentProcess::start(
        "gw-mqtt-test",
        &format!(
            r#"
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
"#
        ),
    );
    agent
        .wait_for_metrics(Duration::from_secs(60), "the MQTT connection", |text| {
            metric(text, "tributary_agent_source_connected{source=\"broker\"}") == Some(1.0)
        })
        .await;

    let mut publisher = Publisher::connect(&address, format!("tributary-test-pub-{suffix}"), 256);

    let probes = publisher
        .probe_subscription(&prefix, &agent, "broker")
        .await;

    for index in 0..MESSAGE_COUNT {
        publisher
            .publish(
                format!("{prefix}/dev-{}/temp", index % 10),
                index.to_string(),
            )
            .await;
        if index == KILL_AFTER {
            // Mid-stream: make sure the agent has taken some messages, then kill it hard.
            agent
                .wait_for_metrics(Duration::from_secs(30), "some readings", |text| {
                    metric(
                        text,
                        "tributary_agent_readings_in_total{source=\"broker\",kind=\"mqtt_subscribe\"}",
                    )
                    .unwrap_or(0.0)
                        >= 200.0
                })
                .await;
            agent.kill();
            agent.restart();
        }
    }
    // The sentinel is not a number: once the agent counts it rejected, everything the broker
    // queued before it has been delivered.
    publisher
        .publish(format!("{prefix}/sentinel/temp"), "end".to_owned())
        .await;
    publisher
        .wait_for_acks(probes + MESSAGE_COUNT + 1, Duration::from_secs(60))
        .await;
    agent
        .wait_for_metrics(Duration::from_secs(60), "the sentinel", |text| {
            text.lines().any(|line| {
                line.starts_with("tributary_agent_rejected_total{source=\"broker\"")
                    && !line.ends_with(" 0")
            })
        })
        .await;
    drop(publisher);

    // Graceful stop: windows close, buffer flushes.
    agent.stop().await;
    let buffered = agent.buffered();
    let raw_values: BTreeSet<u32> = buffered
        .raw_by_device
        .values()
        .flatten()
        .map(|value| *value as u32)
        .collect();
    let raw_readings = buffered.raw_by_device.values().map(Vec::len).sum::<usize>() as u64;
    let summarised = buffered.summarised;
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
