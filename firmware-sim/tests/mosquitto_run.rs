//! The sim against the real Mosquitto: a subscriber in the test receives everything a faulty
//! run published, rebuilds the ledger from it with the agent's parsers, and it must match the
//! ledger file the sim wrote exactly (duplicates twice, malformed by reason, unset clocks as
//! receive-timed).

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use tributary_agent::source::{MessageParser, PayloadFormat, PayloadOptions, TopicTemplate};
use tributary_firmware_sim::format::{MessageFormat, JSON_TIMESTAMP_FIELD};
use tributary_firmware_sim::ledger::{parse_json_lines, Ledger, LedgerRecord};
use tributary_firmware_sim::run::{run, RunOptions};
use tributary_firmware_sim::sim::SimConfig;
use tributary_firmware_sim::verify::{compare, split_records};

#[test]
fn a_faulty_run_delivers_exactly_what_its_ledger_says() {
    let Some(address) = common::mqtt_address() else {
        return;
    };
    let (host, port) = address
        .rsplit_once(':')
        .expect("TRIBUTARY_MQTT_ADDR is host:port");
    let suffix = common::unique_suffix();
    let prefix = format!("sim-test-{suffix}");

    let mut options = MqttOptions::new(
        format!("sim-test-sub-{suffix}"),
        host,
        port.parse::<u16>().unwrap(),
    );
    options.set_keep_alive(Duration::from_secs(10));
    let (subscriber, mut connection) = Client::new(options, 64);
    subscriber
        .subscribe(format!("{prefix}/#"), QoS::AtLeastOnce)
        .unwrap();
    let (subscribed_sender, subscribed) = mpsc::channel();
    let (message_sender, messages) = mpsc::channel::<(String, Vec<u8>)>();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_sender.send(());
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if message_sender
                        .send((publish.topic.clone(), publish.payload.to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    subscribed
        .recv_timeout(Duration::from_secs(10))
        .expect("no SUBACK from Mosquitto within 10 s");

    let ledger_path = std::env::temp_dir().join(format!("sim-ledger-{suffix}.jsonl"));
    let config = SimConfig {
        devices: 8,
        format: MessageFormat::Json,
        rate_hz: 10.0,
        seed: 11,
        window_ms: 1000,
        faults: "duplicates,reorder,malformed,disconnects,clock-skew,unset-clock,burst"
            .parse()
            .unwrap(),
        serial: false,
    };
    let run_options = RunOptions {
        mqtt_address: Some(address.clone()),
        qos: 1,
        duration_ms: 3000,
        ledger_path: Some(ledger_path.clone()),
        serial_link: None,
        client_id: format!("sim-test-pub-{suffix}"),
        topic_prefix: Some(prefix.clone()),
        drain_timeout: Duration::from_secs(20),
        stop: None,
    };
    let summary = run(config, &run_options, |_| {}).expect("sim run");
    assert!(summary.reconnects >= 1, "disconnects fault: {summary:?}");

    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (received.len() as u64) < summary.messages_published {
        let left = deadline.saturating_duration_since(Instant::now());
        match messages.recv_timeout(left) {
            Ok(message) => received.push(message),
            Err(_) => panic!(
                "received {} of {} messages within 20 s",
                received.len(),
                summary.messages_published
            ),
        }
    }
    // Nothing beyond what was published (a short grace period for strays).
    assert!(
        messages.recv_timeout(Duration::from_millis(300)).is_err(),
        "more messages than published"
    );

    let mut payload_options = PayloadOptions::with_format(PayloadFormat::Json);
    payload_options.timestamp_field = Some(JSON_TIMESTAMP_FIELD.to_owned());
    let parser = MessageParser::new(
        TopicTemplate::parse(&format!("{prefix}/site/{{site}}/dev/{{device}}")).unwrap(),
        payload_options,
    )
    .unwrap();
    let mut observed = Ledger::new(1000).unwrap();
    let mut parsed = Vec::new();
    for (topic, payload) in &received {
        parsed.clear();
        match parser.parse(topic, payload, 0, &mut parsed) {
            Ok(_) => common::account(&mut observed, &parsed),
            Err(error) => observed.record_rejected(&format!("mqtt/{}", error.reason())),
        }
    }

    let text = std::fs::read_to_string(&ledger_path).unwrap();
    let _ = std::fs::remove_file(&ledger_path);
    let records = parse_json_lines(&text).unwrap();
    let rejected: Vec<_> = records
        .iter()
        .filter_map(|r| {
            if let LedgerRecord::Rejected(r) = r {
                Some(r.clone())
            } else {
                None
            }
        })
        .collect();
    let (windows, receive_timed) = split_records(records);
    assert!(
        windows.iter().any(|w| w.duplicate_copies > 0),
        "the duplicates fault sent no duplicate"
    );
    assert!(!receive_timed.is_empty() && !rejected.is_empty());

    let report = compare(&windows, &[], &observed.windows(), 1e-9);
    assert!(report.is_exact(), "{}", report.render(10));
    assert_eq!(observed.receive_timed(), receive_timed);
    assert_eq!(observed.rejected(), rejected);
}
