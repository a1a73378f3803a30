//! The documented example config parses and validates; broken configs name every problem with
//! its field path, and syntax errors carry line and column.

use std::path::Path;

use tributary_agent::config::{AgentConfig, ConfigError, FsyncPolicy, RawPolicy, SourceKind};
use tributary_agent::source::PayloadFormat;

fn example_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.toml")
}

#[test]
fn example_config_parses_and_validates() {
    let config = AgentConfig::load(&example_path()).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(config.agent_id, "gw-berlin-01");
    assert_eq!(
        config.collector.effective_server_name(),
        "collector.example.com"
    );
    assert_eq!(config.buffer.fsync, FsyncPolicy::Group);
    assert_eq!(config.sources.len(), 3);
    let Some(SourceKind::MqttSubscribe(subscribe)) = config.sources[0].kind() else {
        panic!("first source should be mqtt_subscribe");
    };
    assert_eq!(subscribe.topics[1].payload.format, PayloadFormat::Json);
    let parser = subscribe.topics[0].message_parser().unwrap();
    assert_eq!(parser.template().subscription_filter(), "site/+/dev/+/+");
    let router = tributary_agent::config::topic_router(&subscribe.topics).unwrap();
    assert_eq!(
        router.subscription_filters(),
        vec!["site/+/dev/+/+", "zigbee2mqtt/+"]
    );
    let mut readings = Vec::new();
    assert_eq!(
        router.parse(
            "zigbee2mqtt/plug-3",
            br#"{"power": 5, "state": "ON"}"#,
            0,
            &mut readings
        ),
        Ok(1)
    );
    assert_eq!(
        router.parse("site/b/dev/d/temp", b"21.5", 0, &mut readings),
        Ok(1)
    );
    assert_eq!(
        readings[1].key.tags,
        vec![("site".to_owned(), "b".to_owned())]
    );
    assert_eq!(
        router
            .parse("other/topic", b"1", 0, &mut readings)
            .unwrap_err()
            .reason(),
        "topic_mismatch"
    );
    assert!(matches!(
        config.sources[1].kind(),
        Some(SourceKind::MqttBroker(_))
    ));
    assert_eq!(
        config.sources[1].aggregation.raw,
        RawPolicy::EveryNth { n: 6 }
    );
    let Some(SourceKind::Serial(serial)) = config.sources[2].kind() else {
        panic!("third source should be serial");
    };
    assert_eq!(serial.baud_rate, 9600);
    assert!(serial.line.require_checksum);
}

const MINIMAL: &str = r#"
agent_id = "gw-1"
[collector]
address = "127.0.0.1:4433"
ca_file = "ca.pem"
token = "secret"
[[sources]]
name = "serial-1"
serial = { path = "/dev/ttyUSB0" }
"#;

#[test]
fn minimal_config_gets_sane_defaults() {
    let config = AgentConfig::from_toml_str_validated(MINIMAL, "minimal.toml")
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(config.collector.effective_server_name(), "127.0.0.1");
    assert_eq!(config.buffer.max_buffer_bytes, 256 * 1024 * 1024);
    assert_eq!(config.buffer.group_commit_interval_ms, 50);
    assert_eq!(config.metrics.listen_address, "127.0.0.1:9464");
    assert_eq!(config.sources[0].aggregation.window_ms, 10_000);
    assert_eq!(config.sources[0].aggregation.raw, RawPolicy::All);
    let Some(SourceKind::Serial(serial)) = config.sources[0].kind() else {
        panic!("serial source")
    };
    assert_eq!(
        (serial.baud_rate, serial.data_bits, serial.stop_bits),
        (115_200, 8, 1)
    );
    assert_eq!(serial.line.max_line_bytes, 512);
    // The token never shows up in debug output (logs).
    assert!(!format!("{config:?}").contains("secret"));
}

const BROKEN: &str = r#"
agent_id = "gw 1"
[collector]
address = "collector"
cert_fingerprint_sha256 = "abc"
ca_file = "ca.pem"
[buffer]
max_buffer_bytes = 1000
[metrics]
listen_address = "localhost:9464"

[[sources]]
name = "mqtt"
[sources.mqtt_subscribe]
broker_address = "127.0.0.1:1883"
client_id = ""
qos = 2
[[sources.mqtt_subscribe.topics]]
template = "dev/{device}"
payload = { format = "plain", timestamp_field = "ts" }
[[sources.mqtt_subscribe.topics]]
template = "dev/{device}/#/x"

[[sources]]
name = "mqtt"
[sources.serial]
path = "/dev/ttyS0"
baud_rate = 12345
data_bits = 9
[sources.aggregation]
window_ms = 0
raw = { policy = "every_nth", n = 0 }

[[sources]]
name = "nothing"
"#;

#[test]
fn broken_config_reports_every_problem_with_its_path() {
    let config = AgentConfig::from_toml_str(BROKEN, "broken.toml").unwrap();
    let problems = config.validate();
    let rendered: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let expected_paths = [
        "agent_id",
        "collector.address",
        "collector.ca_file",
        "collector.cert_fingerprint_sha256",
        "collector",
        "buffer.max_buffer_bytes",
        "metrics.listen_address",
        "sources[0].mqtt_subscribe.client_id",
        "sources[0].mqtt_subscribe.qos",
        "sources[0].mqtt_subscribe.topics[0].template",
        "sources[0].mqtt_subscribe.topics[0].payload.timestamp_field",
        "sources[0].mqtt_subscribe.topics[1].template",
        "sources[1].name",
        "sources[1].serial.baud_rate",
        "sources[1].serial.data_bits",
        "sources[1].aggregation.window_ms",
        "sources[1].aggregation.raw.n",
        "sources[2]",
    ];
    for path in expected_paths {
        assert!(
            problems.iter().any(|problem| problem.path == path),
            "no problem at `{path}` in:\n{}",
            rendered.join("\n")
        );
    }
    assert_eq!(
        problems.len(),
        expected_paths.len(),
        "unexpected problems:\n{}",
        rendered.join("\n")
    );
    let baud = problems
        .iter()
        .find(|problem| problem.path == "sources[1].serial.baud_rate")
        .unwrap();
    assert!(
        baud.to_string().starts_with(
            "sources[1].serial.baud_rate: 12345 is not a standard rate; use one of 300, 600,"
        ),
        "{baud}"
    );
    let no_metric = problems
        .iter()
        .find(|problem| problem.path == "sources[0].mqtt_subscribe.topics[0].template")
        .unwrap();
    assert!(no_metric.message.contains("{metric}"), "{no_metric}");
    let hash = problems
        .iter()
        .find(|problem| problem.path == "sources[0].mqtt_subscribe.topics[1].template")
        .unwrap();
    assert!(
        hash.message.contains("`#` may only be the last level"),
        "{hash}"
    );
    assert!(rendered.contains(
        &"sources[1].name: `mqtt` is used by an earlier source; names must be unique".to_owned()
    ));

    let error = AgentConfig::from_toml_str_validated(BROKEN, "broken.toml").unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "{} problem(s) in broken.toml:\n  agent_id: ",
            expected_paths.len()
        )),
        "{message}"
    );
}

#[test]
fn unknown_field_is_a_syntax_error_with_line_and_column() {
    let text = MINIMAL.replace(
        "token = \"secret\"",
        "token = \"secret\"\ntokn_file = \"x\"",
    );
    let error = AgentConfig::from_toml_str(&text, "typo.toml").unwrap_err();
    let ConfigError::Syntax {
        line,
        column,
        message,
        ..
    } = &error
    else {
        panic!("{error:?}")
    };
    assert_eq!((*line, *column), (7, 1), "{error}");
    assert!(message.contains("tokn_file"), "{message}");
    assert!(error.to_string().starts_with("typo.toml:7:1: "), "{error}");
}

#[test]
fn wrong_type_and_unknown_policy_fields_are_syntax_errors() {
    let text = MINIMAL.replace(
        "serial = { path = \"/dev/ttyUSB0\" }",
        "serial = { path = \"/dev/ttyUSB0\", baud_rate = \"fast\" }",
    );
    let error = AgentConfig::from_toml_str(&text, "t.toml").unwrap_err();
    assert!(
        matches!(error, ConfigError::Syntax { line: 9, .. }),
        "{error}"
    );

    let text =
        format!("{MINIMAL}aggregation = {{ raw = {{ policy = \"deadband\", treshold = 1.0 }} }}\n");
    let error = AgentConfig::from_toml_str(&text, "t.toml").unwrap_err();
    assert!(
        matches!(error, ConfigError::Syntax { line: 10, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("treshold"), "{error}");

    let text = MINIMAL.replace("agent_id = \"gw-1\"", "agent_id = ");
    assert!(matches!(
        AgentConfig::from_toml_str(&text, "t.toml"),
        Err(ConfigError::Syntax { line: 2, .. })
    ));
}

#[test]
fn missing_file_says_which() {
    let error = AgentConfig::load(Path::new("/nonexistent/agent.toml")).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("cannot read config file /nonexistent/agent.toml: "),
        "{error}"
    );
}

#[test]
fn broker_aggregation_and_batching_knobs_are_validated_with_their_paths() {
    let text = r#"
agent_id = "gw"
[collector]
address = "c.example.com:4433"
cert_fingerprint_sha256 = "5E:9B:0C:21:7A:44:13:C8:F0:2D:6B:93:AA:10:7E:55:C4:21:08:3F:9D:6A:E2:71:B0:4C:58:13:2E:9F:07:D6"
token = "t"
[batching]
max_items_per_batch = 0
max_batch_age_ms = 5
[[sources]]
name = "b"
[sources.mqtt_broker]
max_packet_bytes = 10
max_in_flight = 0
connect_timeout_ms = 1
[[sources.mqtt_broker.users]]
username = "u"
[[sources.mqtt_broker.users]]
username = "u"
password = "p"
password_file = "/p"
[[sources.mqtt_broker.topics]]
template = "a/{device}/{metric}"
[sources.aggregation]
window_ms = 10000
allowed_disorder_ms = 5000
series_evict_after_ms = 14000
"#;
    let config =
        AgentConfig::from_toml_str(text, "test.toml").unwrap_or_else(|error| panic!("{error}"));
    let problems = config.validate();
    let paths: Vec<&str> = problems
        .iter()
        .map(|problem| problem.path.as_str())
        .collect();
    for expected in [
        "batching.max_items_per_batch",
        "batching.max_batch_age_ms",
        "sources[0].mqtt_broker.max_packet_bytes",
        "sources[0].mqtt_broker.max_in_flight",
        "sources[0].mqtt_broker.connect_timeout_ms",
        "sources[0].mqtt_broker.users[0]",
        "sources[0].mqtt_broker.users[1].username",
        "sources[0].mqtt_broker.users[1].password_file",
        "sources[0].aggregation.series_evict_after_ms",
    ] {
        assert!(
            paths.contains(&expected),
            "no problem at {expected}: {problems:?}"
        );
    }
    assert_eq!(problems.len(), 9, "{problems:?}");
    let window = config.sources[0].aggregation.window_config();
    assert_eq!(window.allowed_disorder_ms, 5_000);
    assert_eq!(
        window.idle_timeout_ms, 15_000,
        "window + disorder by default"
    );
    assert_eq!(window.series_evict_after_ms, 14_000);
}
