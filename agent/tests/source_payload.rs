//! Payload parsers: examples for every format and rejection reason, and property tests that
//! parsers never panic on arbitrary bytes and that generated valid payloads parse back to what
//! generated them.

use proptest::prelude::*;
use tributary_agent::source::{
    MessageParser, ParsedReading, ParsedReadings, PayloadError, PayloadFormat, PayloadOptions,
    TimeUnit, TopicTemplate,
};
use tributary_protocol::model::SeriesKey;

const RECEIVE_MS: i64 = 1_764_284_000_000;

fn parser(template: &str, options: PayloadOptions) -> MessageParser {
    MessageParser::new(TopicTemplate::parse(template).unwrap(), options).unwrap()
}

/// Parses into both sinks (owned keys, and the agent's `ParsedReadings`), which must agree.
fn parse(
    parser: &MessageParser,
    topic: &str,
    payload: &str,
) -> Result<Vec<ParsedReading>, PayloadError> {
    let mut compact = ParsedReadings::new();
    let compact_result = parser.parse(topic, payload.as_bytes(), RECEIVE_MS, &mut compact);
    let mut out = Vec::new();
    let result = parser.parse(topic, payload.as_bytes(), RECEIVE_MS, &mut out);
    assert_eq!(compact_result, result);
    assert_eq!(compact.to_vec(), out);
    let count = result?;
    assert_eq!(count, out.len());
    Ok(out)
}

fn reading(
    device: &str,
    metric: &str,
    tags: &[(&str, &str)],
    time_ms: Option<i64>,
    value: f64,
) -> ParsedReading {
    ParsedReading {
        key: SeriesKey::new(device, metric).with_tags(tags.iter().copied()),
        time_ms,
        value,
    }
}

fn reason(result: Result<Vec<ParsedReading>, PayloadError>) -> &'static str {
    result.expect_err("expected a rejection").reason()
}

#[test]
fn plain_number_takes_device_metric_and_tags_from_topic() {
    let parser = parser(
        "site/{site}/dev/{device}/{metric}",
        PayloadOptions::default(),
    );
    let readings = parse(&parser, "site/berlin/dev/dev-7/temp", " 21.5\n").unwrap();
    assert_eq!(
        readings,
        vec![reading("dev-7", "temp", &[("site", "berlin")], None, 21.5)]
    );
    assert_eq!(
        reason(parse(&parser, "site/berlin/dev/dev-7/temp", "warm")),
        "not_a_number"
    );
    assert_eq!(
        reason(parse(&parser, "site/berlin/dev/dev-7/temp", "NaN")),
        "nan_or_inf"
    );
    assert_eq!(
        reason(parse(&parser, "site/berlin/dev/dev-7/temp", "-inf")),
        "nan_or_inf"
    );
    assert_eq!(
        reason(parse(&parser, "site/berlin/other/dev-7/temp", "1")),
        "topic_mismatch"
    );
    let mut out = Vec::new();
    let error = parser
        .parse(
            "site/berlin/dev/dev-7/temp",
            b"\xff21",
            RECEIVE_MS,
            &mut out,
        )
        .unwrap_err();
    assert_eq!(error, PayloadError::NotUtf8 { byte_offset: 0 });
}

#[test]
fn plain_needs_a_metric_in_the_template() {
    let template = TopicTemplate::parse("dev/{device}").unwrap();
    let error = MessageParser::new(template, PayloadOptions::default()).unwrap_err();
    assert_eq!(error.reason(), "no_metric");
    assert!(error.to_string().contains("dev/{device}"), "{error}");
}

#[test]
fn oversized_payload_is_rejected_before_parsing() {
    let options = PayloadOptions {
        max_payload_bytes: 8,
        ..PayloadOptions::with_format(PayloadFormat::Json)
    };
    let parser = parser("dev/{device}", options);
    let error = parse(&parser, "dev/a", "{\"temperature\": 1}").unwrap_err();
    assert_eq!(
        error,
        PayloadError::TooLarge {
            payload_bytes: 18,
            max_payload_bytes: 8
        }
    );
}

#[test]
fn json_fields_nested_objects_timestamp_and_booleans() {
    let options = PayloadOptions {
        timestamp_field: Some("ts".to_owned()),
        booleans_as_numbers: true,
        ..PayloadOptions::with_format(PayloadFormat::Json)
    };
    let parser = parser("zigbee/{device}", options);
    let readings = parse(
        &parser,
        "zigbee/plug-1",
        r#"{"power": 12, "env": {"temp": 21.5, "ok": true}, "ts": 1764284000123}"#,
    )
    .unwrap();
    let time = Some(1_764_284_000_123);
    assert_eq!(
        readings,
        vec![
            reading("plug-1", "power", &[], time, 12.0),
            reading("plug-1", "env.temp", &[], time, 21.5),
            reading("plug-1", "env.ok", &[], time, 1.0),
        ]
    );
}

#[test]
fn json_rejections_name_the_field() {
    let parser = parser(
        "dev/{device}",
        PayloadOptions::with_format(PayloadFormat::Json),
    );
    let error = parse(&parser, "dev/a", r#"{"temp": 1, "state": "on"}"#).unwrap_err();
    assert_eq!(error.reason(), "not_a_number");
    assert_eq!(
        error.to_string(),
        "state: expected a number, found string \"on\""
    );
    let error = parse(&parser, "dev/a", r#"{"temp": 1,}"#).unwrap_err();
    assert_eq!(error.reason(), "json_syntax");
    assert!(
        matches!(error, PayloadError::JsonSyntax { line: 1, .. }),
        "{error:?}"
    );
    assert_eq!(reason(parse(&parser, "dev/a", "[1, 2]")), "json_not_object");
    assert_eq!(reason(parse(&parser, "dev/a", "{}")), "no_readings");
    assert_eq!(
        reason(parse(&parser, "dev/a", r#"{"a": true}"#)),
        "not_a_number"
    );
    assert_eq!(
        reason(parse(&parser, "dev/a", r#"{"a": 1e999}"#)),
        "json_syntax"
    );
    let deep = format!("{}1{}", r#"{"a":"#.repeat(9), "}".repeat(9));
    assert_eq!(reason(parse(&parser, "dev/a", &deep)), "json_too_deep");

    let skipping = parser_with(PayloadOptions {
        skip_non_numeric: true,
        ..PayloadOptions::with_format(PayloadFormat::Json)
    });
    let readings = parse(
        &skipping,
        "dev/a",
        r#"{"temp": 1, "state": "on", "list": [1], "n": null}"#,
    )
    .unwrap();
    assert_eq!(readings, vec![reading("a", "temp", &[], None, 1.0)]);
}

fn parser_with(options: PayloadOptions) -> MessageParser {
    parser("dev/{device}", options)
}

#[test]
fn json_under_a_topic_metric_is_prefixed() {
    let parser = parser(
        "dev/{device}/{metric}",
        PayloadOptions::with_format(PayloadFormat::Json),
    );
    let readings = parse(&parser, "dev/a/env", r#"{"temp": 3}"#).unwrap();
    assert_eq!(readings, vec![reading("a", "env.temp", &[], None, 3.0)]);
}

#[test]
fn json_timestamp_units_and_bad_timestamps() {
    let options = PayloadOptions {
        timestamp_field: Some("time".to_owned()),
        timestamp_unit: Some(TimeUnit::S),
        ..PayloadOptions::with_format(PayloadFormat::Json)
    };
    let parser = parser_with(options);
    let readings = parse(&parser, "dev/a", r#"{"time": 1764284000.5, "v": 1}"#).unwrap();
    assert_eq!(readings[0].time_ms, Some(1_764_284_000_500));
    let error = parse(&parser, "dev/a", r#"{"time": "yesterday", "v": 1}"#).unwrap_err();
    assert_eq!(error.reason(), "bad_timestamp");
    assert!(error.to_string().starts_with("time:"), "{error}");
}

#[test]
fn senml_resolves_base_fields_and_times() {
    let parser = parser_with(PayloadOptions {
        senml_unit_as_tag: true,
        ..PayloadOptions::with_format(PayloadFormat::Senml)
    });
    let payload = r#"[
        {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1764284000, "bu": "Cel", "n": "temp", "v": 23.1},
        {"n": "temp", "t": 10, "v": 23.5},
        {"n": "hum", "u": "%RH", "t": 10.25, "v": 40},
        {"n": "door", "vb": true}
    ]"#;
    let options_with_bools = PayloadOptions {
        booleans_as_numbers: true,
        senml_unit_as_tag: true,
        ..PayloadOptions::with_format(PayloadFormat::Senml)
    };
    let readings = parse(&parser_with(options_with_bools), "dev/gw", payload).unwrap();
    let base = "urn:dev:ow:10e2073a01080063:";
    assert_eq!(
        readings,
        vec![
            reading(
                "gw",
                &format!("{base}temp"),
                &[("unit", "Cel")],
                Some(1_764_284_000_000),
                23.1
            ),
            reading(
                "gw",
                &format!("{base}temp"),
                &[("unit", "Cel")],
                Some(1_764_284_010_000),
                23.5
            ),
            reading(
                "gw",
                &format!("{base}hum"),
                &[("unit", "%RH")],
                Some(1_764_284_010_250),
                40.0
            ),
            reading(
                "gw",
                &format!("{base}door"),
                &[("unit", "Cel")],
                Some(1_764_284_000_000),
                1.0
            ),
        ]
    );
    // Booleans are not numbers unless configured.
    assert_eq!(reason(parse(&parser, "dev/gw", payload)), "not_a_number");
}

#[test]
fn senml_relative_times_and_base_value() {
    let parser = parser_with(PayloadOptions::with_format(PayloadFormat::Senml));
    let readings = parse(
        &parser,
        "dev/a",
        r#"[{"bv": 100, "n": "c", "v": 5, "t": -5}, {"n": "now", "v": 1}]"#,
    )
    .unwrap();
    assert_eq!(
        readings,
        vec![
            reading("a", "c", &[], Some(RECEIVE_MS - 5_000), 105.0),
            reading("a", "now", &[], None, 101.0)
        ]
    );
}

#[test]
fn senml_rejections() {
    let parser = parser_with(PayloadOptions::with_format(PayloadFormat::Senml));
    let error = parse(&parser, "dev/a", r#"[{"n": "a", "v": 1}, {"n": "b"}]"#).unwrap_err();
    assert_eq!(
        error,
        PayloadError::SenmlMissingValue {
            record_index: 1,
            name: "b".to_owned()
        }
    );
    assert_eq!(
        reason(parse(&parser, "dev/a", r#"[{"v": 1}]"#)),
        "senml_missing_name"
    );
    assert_eq!(
        reason(parse(&parser, "dev/a", r#"[{"n": "a", "v": "1"}]"#)),
        "senml_bad_field"
    );
    assert_eq!(
        reason(parse(
            &parser,
            "dev/a",
            r#"[{"n": "a", "v": 1, "crit_": 1}]"#
        )),
        "senml_unsupported_field"
    );
    assert_eq!(
        reason(parse(&parser, "dev/a", r#"[{"n": "a", "v": 1}, 7]"#)),
        "senml_bad_record"
    );
    assert_eq!(
        reason(parse(&parser, "dev/a", r#"{"n": "a", "v": 1}"#)),
        "senml_not_array"
    );
    assert_eq!(
        reason(parse(&parser, "dev/a", r#"[{"n": "a", "v": 1"#)),
        "json_syntax"
    );
    assert_eq!(
        reason(parse(&parser, "dev/a", r#"[{"bn": "x"}]"#)),
        "no_readings"
    );
}

#[test]
fn line_protocol_fields_tags_escapes_and_timestamps() {
    let parser = parser(
        "lp/{device}",
        PayloadOptions {
            timestamp_unit: Some(TimeUnit::Ms),
            ..PayloadOptions::with_format(PayloadFormat::LineProtocol)
        },
    );
    let payload = "# comment\r\nweather,room=lab\\ 1,floor=2 temp=21.5,count=3i,total=7u 1764284000123\r\n\nmy\\,meas f\\=x=-1e3\n";
    let readings = parse(&parser, "lp/dev-1", payload).unwrap();
    let tags = [("room", "lab 1"), ("floor", "2")];
    assert_eq!(
        readings,
        vec![
            reading(
                "dev-1",
                "weather.temp",
                &tags,
                Some(1_764_284_000_123),
                21.5
            ),
            reading(
                "dev-1",
                "weather.count",
                &tags,
                Some(1_764_284_000_123),
                3.0
            ),
            reading(
                "dev-1",
                "weather.total",
                &tags,
                Some(1_764_284_000_123),
                7.0
            ),
            reading("dev-1", "my,meas.f=x", &[], None, -1000.0),
        ]
    );
}

#[test]
fn line_protocol_rejections_say_where() {
    let parser = parser_with(PayloadOptions::with_format(PayloadFormat::LineProtocol));
    let error = parse(&parser, "dev/a", "m v=1\nm,t v=1").unwrap_err();
    assert_eq!(
        error,
        PayloadError::LineProtocolSyntax {
            line: 2,
            byte_offset: 9,
            detail: "expected `=` after tag key"
        }
    );
    assert_eq!(reason(parse(&parser, "dev/a", "m")), "line_protocol_syntax");
    assert_eq!(
        reason(parse(&parser, "dev/a", "m v=1 12x")),
        "line_protocol_syntax"
    );
    assert_eq!(
        reason(parse(&parser, "dev/a", "m v=\"text\"")),
        "not_a_number"
    );
    assert_eq!(reason(parse(&parser, "dev/a", "m v=abc")), "not_a_number");
    assert_eq!(reason(parse(&parser, "dev/a", "m v=nan")), "nan_or_inf");
    assert_eq!(
        reason(parse(&parser, "dev/a", "m v=1 99999999999999999999")),
        "line_protocol_syntax"
    );
    // Nothing from a rejected message is kept, even lines before the bad one.
    let mut out = Vec::new();
    assert!(parser
        .parse("dev/a", b"m v=1\nm v=oops", RECEIVE_MS, &mut out)
        .is_err());
    assert!(out.is_empty());
}

#[test]
fn every_reason_is_listed() {
    let parser = parser_with(PayloadOptions::with_format(PayloadFormat::Json));
    let error = parse(&parser, "dev/a", "nope").unwrap_err();
    assert!(PayloadError::REASONS.contains(&error.reason()));
}

// ---------------------------------------------------------------------------------------------
// Property tests

fn any_format() -> impl Strategy<Value = PayloadFormat> {
    prop_oneof![
        Just(PayloadFormat::Plain),
        Just(PayloadFormat::Json),
        Just(PayloadFormat::Senml),
        Just(PayloadFormat::LineProtocol),
    ]
}

/// Arbitrary bytes biased towards the characters the parsers care about.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let interesting = prop::sample::select(b"{}[]\",:=\\ \n\r#*.-+0123456789eEtfnaiu_xbv".to_vec());
    prop::collection::vec(prop_oneof![any::<u8>(), interesting], 0..200)
}

/// Finite values that survive a decimal round trip exactly (Rust prints the shortest exact form).
fn finite_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |v| v.is_finite()),
        (-100_000i64..100_000).prop_map(|v| v as f64 / 100.0)
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,7}"
}

/// Names with every character line protocol must escape.
fn lp_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9 ,=\\\\_]{0,7}"
}

fn lp_escape(text: &str, specials: &[char]) -> String {
    let mut escaped = String::new();
    for c in text.chars() {
        if specials.contains(&c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn parsers_never_panic(format in any_format(), payload in hostile_bytes(), with_metric in any::<bool>()) {
        let template = if with_metric { "d/{device}/{metric}" } else { "d/{device}" };
        let options = PayloadOptions {
            timestamp_field: Some("t".to_owned()),
            booleans_as_numbers: true,
            ..PayloadOptions::with_format(format)
        };
        let Ok(parser) = MessageParser::new(TopicTemplate::parse(template).unwrap(), options) else {
            return Ok(());
        };
        let topic = if with_metric { "d/x/m" } else { "d/x" };
        let mut out = Vec::new();
        let result = parser.parse(topic, &payload, RECEIVE_MS, &mut out);
        match &result {
            Ok(count) => {
                prop_assert_eq!(*count, out.len());
                prop_assert!(out.iter().all(|reading| reading.value.is_finite()));
            }
            Err(error) => {
                prop_assert!(out.is_empty());
                prop_assert!(PayloadError::REASONS.contains(&error.reason()));
            }
        }
        // The agent's sink, holding a reading of an earlier message: on a rejection it is
        // left exactly as it was; otherwise it holds the same readings after it.
        let earlier = ParsedReading { key: SeriesKey::new("x", "earlier").with_tags([("site", "a")]), time_ms: None, value: 1.0 };
        let mut compact = ParsedReadings::from(vec![earlier.clone()]);
        prop_assert_eq!(&parser.parse(topic, &payload, RECEIVE_MS, &mut compact), &result);
        let mut expected = vec![earlier];
        expected.extend(out);
        prop_assert_eq!(compact.to_vec(), expected);
    }

    #[test]
    fn plain_round_trips(value in finite_value()) {
        let parser = parser("d/{device}/{metric}", PayloadOptions::default());
        let readings = parse(&parser, "d/x/m", &value.to_string()).unwrap();
        prop_assert_eq!(readings, vec![reading("x", "m", &[], None, value)]);
    }

    #[test]
    fn json_round_trips(
        fields in prop::collection::btree_map(name(), finite_value(), 1..6),
        nested in prop::collection::btree_map(name(), finite_value(), 0..3),
        time_ms in prop::option::of(0i64..4_000_000_000_000),
    ) {
        let mut object = serde_json::Map::new();
        for (key, value) in &fields {
            object.insert(key.clone(), serde_json::json!(value));
        }
        if !nested.is_empty() {
            object.insert("nested_group".to_owned(), serde_json::json!(nested));
        }
        if let Some(time_ms) = time_ms {
            object.insert("timestamp".to_owned(), serde_json::json!(time_ms));
        }
        let payload = serde_json::Value::Object(object).to_string();
        let options = PayloadOptions { timestamp_field: Some("timestamp".to_owned()), ..PayloadOptions::with_format(PayloadFormat::Json) };
        let mut readings = parse(&parser_with(options), "dev/x", &payload).unwrap();
        let mut expected: Vec<ParsedReading> = fields.iter().map(|(key, value)| reading("x", key, &[], time_ms, *value)).collect();
        expected.extend(nested.iter().map(|(key, value)| reading("x", &format!("nested_group.{key}"), &[], time_ms, *value)));
        readings.sort_by(|a, b| a.key.cmp(&b.key));
        expected.sort_by(|a, b| a.key.cmp(&b.key));
        prop_assert_eq!(readings, expected);
    }

    #[test]
    fn senml_round_trips(
        base_name in "[a-z]{0,4}:?",
        base_time_ms in prop::option::of(1_000_000_000_000i64..4_000_000_000_000),
        records in prop::collection::vec((name(), finite_value(), 0i64..3_600_000), 1..6),
    ) {
        let mut pack = Vec::new();
        for (index, (record_name, value, offset_ms)) in records.iter().enumerate() {
            let mut record = serde_json::Map::new();
            if index == 0 {
                record.insert("bn".to_owned(), serde_json::json!(base_name));
                if let Some(base_time_ms) = base_time_ms {
                    record.insert("bt".to_owned(), serde_json::json!(base_time_ms / 1000));
                }
            }
            record.insert("n".to_owned(), serde_json::json!(record_name));
            record.insert("v".to_owned(), serde_json::json!(value));
            // Times as exact decimal seconds with ms precision, as a device would print them.
            let offset_text = format!("{}.{:03}", offset_ms / 1000, offset_ms % 1000);
            record.insert("t".to_owned(), serde_json::from_str::<serde_json::Value>(&offset_text).unwrap());
            pack.push(serde_json::Value::Object(record));
        }
        let payload = serde_json::Value::Array(pack).to_string();
        let readings = parse(&parser_with(PayloadOptions::with_format(PayloadFormat::Senml)), "dev/x", &payload).unwrap();
        let expected: Vec<ParsedReading> = records.iter().map(|(record_name, value, offset_ms)| {
            let time_ms = match base_time_ms {
                Some(base_time_ms) => base_time_ms / 1000 * 1000 + offset_ms,
                None if *offset_ms == 0 => return reading("x", &format!("{base_name}{record_name}"), &[], None, *value),
                None => RECEIVE_MS + offset_ms,
            };
            reading("x", &format!("{base_name}{record_name}"), &[], Some(time_ms), *value)
        }).collect();
        prop_assert_eq!(readings, expected);
    }

    #[test]
    fn line_protocol_round_trips(
        lines in prop::collection::vec((
            lp_name(),
            prop::collection::btree_map(lp_name(), "[a-zA-Z0-9 ,=\\\\]{1,6}", 0..3),
            prop::collection::btree_map(lp_name(), finite_value(), 1..4),
            prop::option::of(-1_000_000_000_000_000_000i64..4_000_000_000_000_000_000),
        ), 1..4),
    ) {
        let mut payload = String::new();
        let mut expected = Vec::new();
        for (measurement, tags, fields, timestamp_ns) in &lines {
            payload.push_str(&lp_escape(measurement, &[',', ' ', '\\']));
            for (key, value) in tags {
                payload.push_str(&format!(",{}={}", lp_escape(key, &[',', '=', ' ', '\\']), lp_escape(value, &[',', '=', ' ', '\\'])));
            }
            let rendered: Vec<String> = fields
                .iter()
                .map(|(key, value)| format!("{}={value}", lp_escape(key, &[',', '=', ' ', '\\'])))
                .collect();
            payload.push(' ');
            payload.push_str(&rendered.join(","));
            if let Some(timestamp_ns) = timestamp_ns {
                payload.push_str(&format!(" {timestamp_ns}"));
            }
            payload.push('\n');
            let tag_refs: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            for (key, value) in fields {
                let time_ms = timestamp_ns.map(|ns| ns.div_euclid(1_000_000));
                expected.push(reading("x", &format!("{measurement}.{key}"), &tag_refs, time_ms, *value));
            }
        }
        let readings = parse(&parser_with(PayloadOptions::with_format(PayloadFormat::LineProtocol)), "dev/x", &payload).unwrap();
        prop_assert_eq!(readings, expected);
    }
}

#[test]
fn wrong_json_shape_messages_read_well() {
    let json = parser_with(PayloadOptions::with_format(PayloadFormat::Json));
    assert_eq!(
        parse(&json, "dev/a", "[1]").unwrap_err().to_string(),
        "payload is a JSON array, expected a JSON object of metric fields"
    );
    assert_eq!(
        parse(&json, "dev/a", "  ").unwrap_err().to_string(),
        "payload is empty, expected a JSON object of metric fields"
    );
    let senml = parser_with(PayloadOptions::with_format(PayloadFormat::Senml));
    assert_eq!(
        parse(&senml, "dev/a", "{}").unwrap_err().to_string(),
        "payload is a JSON object, expected a SenML JSON array of records"
    );
}
