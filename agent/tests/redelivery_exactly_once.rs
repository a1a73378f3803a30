//! Nothing counted twice: QoS 1 redeliveries after the agent dies between a group commit
//! and its PUBACKs.
//!
//! The agent is made to abort right after a durable commit and before it hands out that
//! commit's acknowledgements (`TRIBUTARY_AGENT_FAULT_ABORT_AFTER_ACKS`: the state a kill -9
//! leaves in that window). After the restart the sender redelivers those messages; the agent
//! must acknowledge them without ingesting them again. Checked exactly: every value published
//! is in the buffer once as a raw reading, the summaries cover each reading once, and the
//! skip counter shows the window was really hit. Against the real Mosquitto (subscribe
//! mode, which resends with DUP = 1) and against the embedded broker with a rumqttc client
//! (which resends with DUP = 0 on a resumed session). Also a direct test of the records.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

mod support;

use support::{free_port, metric, service_env, unique_suffix, AgentProcess, Publisher, MQTT_ADDR};
use tributary_agent::source::broker::redelivery::{RedeliveryLog, FAULT_ABORT_AFTER_ACKS};

const MESSAGES: u32 = 1_500;
/// The agent aborts after the commit that brings its released acknowledgements to this.
const ABORT_AFTER_ACKS: u32 = 300;

/// Starts the agent with the abort fault armed for its first run.
fn start_armed(agent_id: &str, sources: &str) -> AgentProcess {
    AgentProcess::start_with_env(
        agent_id,
        sources,
        &[(FAULT_ABORT_AFTER_ACKS, ABORT_AFTER_ACKS.to_string())],
    )
}

/// Waits for the armed fault to abort the agent, then starts it again unarmed.
async fn wait_for_abort_and_restart(agent: &mut AgentProcess) {
    let what = format!("the abort after {ABORT_AFTER_ACKS} acknowledgements");
    let status = agent.wait_for_exit(Duration::from_secs(60), &what).await;
    assert!(!status.success(), "the agent must have aborted: {status:?}");
    agent.restart();
}

/// Raw reading values (with multiplicity) and readings covered by summaries in a buffer.
fn buffered(path: &Path) -> (BTreeMap<i64, u32>, u64) {
    let buffered = support::buffered(path);
    let mut raw: BTreeMap<i64, u32> = BTreeMap::new();
    for value in buffered.raw_by_device.values().flatten() {
        *raw.entry(*value).or_default() += 1;
    }
    (raw, buffered.summarised)
}

/// Every value 0..MESSAGES exactly once, nothing else, and summaries covering each once.
fn assert_exactly_once(path: &Path) {
    let (raw, summarised) = buffered(path);
    let missing: Vec<u32> = (0..MESSAGES)
        .filter(|value| !raw.contains_key(&i64::from(*value)))
        .collect();
    let doubled: Vec<(i64, u32)> = raw
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(value, count)| (*value, *count))
        .collect();
    assert!(
        missing.is_empty(),
        "{} messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(
        doubled.is_empty(),
        "{} values stored more than once (value, times), e.g. {:?}",
        doubled.len(),
        &doubled[..doubled.len().min(20)]
    );
    assert_eq!(raw.len() as u32, MESSAGES, "unexpected raw values");
    assert_eq!(
        summarised,
        u64::from(MESSAGES),
        "the summaries must cover every reading exactly once"
    );
}

const AGGREGATION: &str = r#"
[sources.aggregation]
window_ms = 1000
raw = { policy = "all" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_mode_redeliveries_after_a_crash_are_not_counted_twice() {
    let Some(address) = service_env(MQTT_ADDR) else {
        return;
    };
    let suffix = unique_suffix();
    let prefix = format!("tributary-redelivery-test/{suffix}");
    let mut agent = start_armed(
        "gw-redelivery-subscribe",
        &format!(
            r#"
[[sources]]
name = "broker"
[sources.mqtt_subscribe]
broker_address = "{address}"
client_id = "tributary-redelivery-{suffix}"
qos = 1
[[sources.mqtt_subscribe.topics]]
template = "{prefix}/{{device}}/{{metric}}"
{AGGREGATION}"#
        ),
    );
    agent
        .wait_for_metrics(Duration::from_secs(60), "the MQTT connection", |text| {
            metric(text, "tributary_agent_source_connected{source=\"broker\"}") == Some(1.0)
        })
        .await;
    let mut publisher =
        Publisher::connect(&address, format!("tributary-redelivery-pub-{suffix}"), 4096);
    let probes = publisher
        .probe_subscription(&prefix, &agent, "broker")
        .await;

    for index in 0..MESSAGES {
        publisher
            .publish(
                format!("{prefix}/dev-{}/temp", index % 10),
                index.to_string(),
            )
            .await;
    }
    wait_for_abort_and_restart(&mut agent).await;
    // Mosquitto has every message (its PUBACKs); the agent gets the rest after the restart.
    publisher
        .wait_for_acks(probes + MESSAGES, Duration::from_secs(60))
        .await;
    // The sentinel is not a number: once the restarted agent counts a rejection, everything
    // the broker held for it before the sentinel (resends first) has been delivered.
    publisher
        .publish(format!("{prefix}/sentinel/temp"), "end".to_owned())
        .await;
    agent
        .wait_for_metrics(Duration::from_secs(60), "the sentinel", |text| {
            text.lines().any(|line| {
                line.starts_with("tributary_agent_rejected_total{source=\"broker\"")
                    && !line.ends_with(" 0")
            })
        })
        .await;
    let skipped = agent
        .metric("tributary_agent_redeliveries_skipped_total{source=\"broker\"}")
        .unwrap_or(0.0);
    assert!(
        skipped >= 1.0,
        "the abort left durable, unacknowledged messages: Mosquitto must have resent some (DUP = 1) and the agent skipped them"
    );
    drop(publisher);
    agent.stop().await;
    assert_exactly_once(&agent.buffer);
}

/// Publishes `MESSAGES` values at QoS 1 with a rumqttc MQTT 3.1.1 client on a persistent
/// session, riding out the agent's abort and restart (the client reconnects and resends its
/// unacknowledged messages with DUP = 0); returns once every message got its PUBACK.
async fn publish_through_restart(port: u16, client_id: String, agent: &mut AgentProcess) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_clean_session(false);
    // Every message gets its own packet id. rumqttc moves its whole request channel into the
    // resend queue when the connection drops and replays that queue past its in-flight limit;
    // with ids wrapping at the default limit (100) the replay collides with unacknowledged
    // ids, and rumqttc keeps only the last colliding publish: messages were lost in the client
    // and the test waited forever for PUBACKs (CI, 2026-11-28: 831 of 1,500).
    options.set_inflight(MESSAGES as u16 + 16);
    let (client, mut event_loop) = AsyncClient::new(options, MESSAGES as usize + 16);
    for index in 0..MESSAGES {
        client
            .publish(
                format!("plant/dev-{}/temp", index % 10),
                QoS::AtLeastOnce,
                false,
                index.to_string(),
            )
            .await
            .expect("queue publish");
    }
    let mut acknowledged = 0u32;
    let mut restarted = false;
    let mut session_present_after_restart = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acknowledged < MESSAGES {
        // Only the overall deadline may cut a poll short: rumqttc's `poll` is not cancel-safe
        // (a poll dropped while it writes queued publishes loses them, and they are never
        // resent), so a per-poll timeout made this test lose messages on a loaded machine.
        let Ok(event) = tokio::time::timeout_at(deadline.into(), event_loop.poll()).await else {
            panic!("only {acknowledged} of {MESSAGES} PUBACKs within 120 s");
        };
        match event {
            Ok(Event::Incoming(Packet::PubAck(_))) => acknowledged += 1,
            Ok(Event::Incoming(Packet::ConnAck(connack))) if restarted => {
                session_present_after_restart = connack.session_present;
                assert!(
                    session_present_after_restart,
                    "the restarted agent must resume the persistent session"
                );
            }
            Ok(_) => {}
            Err(_) => {
                // The agent died (the armed fault): restart it once, then reconnect. Polling
                // again reconnects; while the agent is not listening yet, wait a little
                // before the next attempt instead of spinning.
                if !restarted {
                    wait_for_abort_and_restart(agent).await;
                    restarted = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(restarted, "the agent never aborted");
    assert!(session_present_after_restart);
    client.disconnect().await.expect("disconnect request");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = event_loop.poll().await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_resends_after_a_crash_are_not_counted_twice() {
    let mqtt_port = free_port();
    let mut agent = start_armed(
        "gw-redelivery-broker",
        &format!(
            r#"
[[sources]]
name = "embedded"
[sources.mqtt_broker]
listen_address = "127.0.0.1:{mqtt_port}"
[[sources.mqtt_broker.topics]]
template = "plant/{{device}}/{{metric}}"
{AGGREGATION}"#
        ),
    );
    agent
        .wait_for_metrics(Duration::from_secs(60), "the broker to listen", |_| {
            TcpStream::connect(("127.0.0.1", mqtt_port)).is_ok()
        })
        .await;
    publish_through_restart(mqtt_port, format!("sensor-{}", unique_suffix()), &mut agent).await;
    // Every message has its PUBACK, so each is durable in the agent (journal or buffer).
    let skipped = agent
        .metric("tributary_agent_redeliveries_skipped_total{source=\"embedded\"}")
        .unwrap_or(0.0);
    assert!(
        skipped >= 1.0,
        "the abort left durable, unacknowledged messages: the client must have resent some and the agent skipped them"
    );
    agent.stop().await;
    assert_exactly_once(&agent.buffer);
}

/// The records themselves, without processes: a match needs a durable record of an earlier
/// connection with the same packet id and the same content; a record whose readings the
/// journal never reached is dropped at load.
#[test]
fn records_match_only_durable_same_content_from_an_earlier_connection() {
    let directory = tempfile::tempdir().expect("tempdir");
    let open = || {
        // A just-dropped sled database holds its lock until its threads let go.
        let db =
            tributary_sled_open::open(&sled::Config::new().path(directory.path().join("state")))
                .expect("reopen the state database");
        let log = RedeliveryLog::open(&db, vec!["mqtt".to_owned()]).expect("open log");
        (db, log)
    };
    let input = || {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        (
            tributary_agent::run::PipelineInput {
                source: 0,
                readings: Default::default(),
                receive_ms: 0,
                durable: Some(sender),
            },
            receiver,
        )
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    {
        let (db, log) = open();
        assert_eq!(log.load(0).expect("load"), 0);
        let (pipeline, mut inputs) = tokio::sync::mpsc::channel(16);
        let first = log.message_id(0, "sensor", 1, 7, b"t", b"21.5");
        let second = log.message_id(0, "sensor", 1, 8, b"t", b"22.0");
        for message in [&first, &second] {
            let (input, _receiver) = input();
            runtime
                .block_on(log.send(&pipeline, input, Some(message.clone())))
                .expect("send");
            runtime.block_on(inputs.recv()).expect("input");
        }
        // Journal: message 7 ends below seq 10, message 8 below seq 20.
        log.ingested(0, 10);
        log.ingested(0, 20);
        log.write_pending();
        assert!(
            !log.take_redelivery(0, &log.message_id(0, "sensor", 2, 7, b"t", b"21.5")),
            "not durable before its commit"
        );
        log.committed(2);
        assert!(
            !log.take_redelivery(0, &first),
            "the connection that sent it never resends it"
        );
        db.flush().expect("flush");
    }
    // The journal came back up to seq 15: message 8's readings were not durable.
    let (_db, log) = open();
    assert_eq!(
        log.load(15).expect("load"),
        1,
        "only message 7's record is valid"
    );
    assert!(
        !log.take_redelivery(0, &log.message_id(0, "sensor", 1, 7, b"t", b"99")),
        "same packet id, other content: a new message"
    );
    assert!(
        !log.take_redelivery(0, &log.message_id(0, "other", 1, 7, b"t", b"21.5")),
        "another session"
    );
    assert!(log.take_redelivery(0, &log.message_id(0, "sensor", 1, 7, b"t", b"21.5")));
    assert_eq!(log.skipped(0), 1);
    assert!(
        !log.take_redelivery(0, &log.message_id(0, "sensor", 1, 7, b"t", b"21.5")),
        "a record matches once"
    );
    assert_eq!(log.records(), 0);
}
