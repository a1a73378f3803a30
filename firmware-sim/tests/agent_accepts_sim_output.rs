//! What the sim writes is what the agent's parsers accept: every format, with times where the
//! ledger expects them, and every deliberately malformed message rejected with the reason the
//! ledger recorded.

use tributary_agent::source::{
    parse_line, MessageParser, PayloadFormat, PayloadOptions, SerialLineOptions, TopicTemplate,
};
use tributary_firmware_sim::format::{
    encode_messages, malformed_message, serial_garbage, serial_line, serial_line_with_bad_checksum,
    MessageFormat, JSON_TIMESTAMP_FIELD,
};

const TIME_MS: i64 = 1_764_284_000_123;
const READINGS: [(&str, f64); 4] = [
    ("temperature", 21.53),
    ("humidity", 40.1),
    ("energy", 123456.0),
    ("signal_strength", -71.0),
];

fn parser_for(format: MessageFormat) -> MessageParser {
    let mut options = PayloadOptions::with_format(match format {
        MessageFormat::Plain => PayloadFormat::Plain,
        MessageFormat::Json => PayloadFormat::Json,
        MessageFormat::Senml => PayloadFormat::Senml,
        MessageFormat::Line => PayloadFormat::LineProtocol,
    });
    if format == MessageFormat::Json {
        options.timestamp_field = Some(JSON_TIMESTAMP_FIELD.to_owned());
    }
    MessageParser::new(
        TopicTemplate::parse(format.topic_template()).unwrap(),
        options,
    )
    .unwrap()
}

#[test]
fn every_format_parses_back_to_the_same_readings_and_times() {
    let receive_ms = TIME_MS + 500;
    for format in [
        MessageFormat::Plain,
        MessageFormat::Json,
        MessageFormat::Senml,
        MessageFormat::Line,
    ] {
        let parser = parser_for(format);
        let mut parsed = Vec::new();
        for message in encode_messages(format, "plant-north", "dev-0003", TIME_MS, &READINGS) {
            parser
                .parse(&message.topic, &message.payload, receive_ms, &mut parsed)
                .unwrap_or_else(|error| {
                    panic!(
                        "{format:?} {} rejected: {error}",
                        String::from_utf8_lossy(&message.payload)
                    )
                });
        }
        assert_eq!(parsed.len(), READINGS.len(), "{format:?}");
        for (reading, (metric, value)) in parsed.iter().zip(READINGS) {
            assert_eq!(reading.key.device_id, "dev-0003");
            assert_eq!(
                reading.key.metric,
                format.agent_metric_name(metric),
                "{format:?}"
            );
            assert_eq!(
                reading.value.to_bits(),
                value.to_bits(),
                "{format:?} {metric}"
            );
            let expected_time = format.carries_device_time().then_some(TIME_MS);
            assert_eq!(reading.time_ms, expected_time, "{format:?}");
            assert!(reading
                .key
                .tags
                .iter()
                .any(|(name, value)| name == "site" && value == "plant-north"));
        }
    }
}

#[test]
fn malformed_messages_are_rejected_with_the_ledgers_reason() {
    for format in [
        MessageFormat::Plain,
        MessageFormat::Json,
        MessageFormat::Senml,
        MessageFormat::Line,
    ] {
        let (message, reason) = malformed_message(format, "warehouse", "dev-0002", "temperature");
        let error = parser_for(format)
            .parse(&message.topic, &message.payload, TIME_MS, &mut Vec::new())
            .unwrap_err();
        assert_eq!(error.reason(), reason, "{format:?}: {error}");
    }
}

#[test]
fn serial_lines_parse_and_faulty_lines_are_rejected_with_the_ledgers_reason() {
    let options = SerialLineOptions::default();
    let line = serial_line("dev-0014", Some(TIME_MS), &READINGS);
    let mut parsed = Vec::new();
    let body = line.strip_suffix(b"\r\n").unwrap();
    assert_eq!(
        parse_line(body, &options, &mut parsed).unwrap(),
        READINGS.len()
    );
    assert!(parsed
        .iter()
        .all(|reading| reading.time_ms == Some(TIME_MS) && reading.key.device_id == "dev-0014"));
    assert_eq!(parsed[0].value, 21.53);

    let bad = serial_line_with_bad_checksum("dev-0014", TIME_MS, &READINGS);
    let error = parse_line(
        bad.strip_suffix(b"\r\n").unwrap(),
        &options,
        &mut Vec::new(),
    )
    .unwrap_err();
    assert_eq!(error.reason(), "bad_checksum");
    for noise in [
        &b""[..],
        b"\x00\xff\x13abc",
        b"dev-1 t=5 *00",
        b"# not a comment?\x02",
    ] {
        let garbage = serial_garbage(noise);
        let error = parse_line(
            garbage.strip_suffix(b"\r\n").unwrap(),
            &options,
            &mut Vec::new(),
        )
        .expect_err("noise must not parse");
        assert_eq!(error.reason(), "garbage", "{noise:?}: {error}");
    }
}
