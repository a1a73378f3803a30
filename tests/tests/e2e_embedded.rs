//! The whole path on one machine: simulated fleet -> agent (embedded MQTT broker and a
//! serial device on a pseudo-terminal) -> QUIC -> collector (embedded log, window processor,
//! embedded store) -> query API, checked exactly against the fleet's ledger.

use std::time::Duration;

use tributary_firmware_sim::cluster::{Agent, AgentSpec, Collector, CollectorSpec};
use tributary_firmware_sim::format::MessageFormat;
use tributary_firmware_sim::run::{run, RunOptions};
use tributary_firmware_sim::sim::SimConfig;
use tributary_tests::e2e::{
    assert_rejections_counted, assert_store_matches_ledger, binaries, Ledger,
};

#[test]
fn a_faulty_fleet_arrives_exactly_once_in_the_embedded_store() {
    let binaries = binaries();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut collector = Collector::start(
        &binaries,
        &CollectorSpec {
            dir: dir.path().join("collector"),
            agent_ids: vec!["gw-e2e".into()],
            extra_config: String::new(),
            api_port: None,
        },
    )
    .expect("collector starts");
    let serial_link = dir.path().join("serial-device");
    let mut spec = AgentSpec::new(dir.path().join("agent"), "gw-e2e", &collector).expect("spec");
    spec.serial_path = Some(serial_link.clone());
    let mut agent = Agent::start(&binaries, &spec).expect("agent starts");

    let ledger_path = dir.path().join("ledger.jsonl");
    let config = SimConfig {
        devices: 4,
        format: MessageFormat::Json,
        rate_hz: 2.0,
        seed: 11,
        window_ms: 60_000,
        faults: "duplicates,reorder,malformed,serial-garbage"
            .parse()
            .expect("faults"),
        serial: true,
    };
    let options = RunOptions {
        mqtt_address: Some(agent.broker_address.to_string()),
        qos: 1,
        duration_ms: 12_000,
        ledger_path: Some(ledger_path.clone()),
        serial_link: Some(serial_link),
        client_id: "e2e-fleet".into(),
        topic_prefix: None,
        drain_timeout: Duration::from_secs(20),
        stop: None,
    };
    let summary = run(config, &options, |_| {}).expect("the fleet runs");
    assert!(summary.serial_lines > 0, "the serial device wrote nothing");

    let ledger = Ledger::read(&ledger_path);
    let report = assert_store_matches_ledger(
        &ledger,
        &mut collector,
        &mut [&mut agent],
        Duration::from_secs(120),
    );
    assert!(report.windows_checked > 0);
    assert_rejections_counted(&ledger, &agent);
    assert!(agent.process.stop(Duration::from_secs(20)).expect("stop agent"));
    assert!(collector
        .process
        .stop(Duration::from_secs(20))
        .expect("stop collector"));
}
