//! The serial line protocol: decoding byte chunks into lines and lines into readings.

use proptest::prelude::*;
use tributary_agent::source::{
    crc8, parse_line, LineDecoder, ParsedReading, ParsedReadings, SerialLineError,
    SerialLineOptions, SerialLineReader,
};
use tributary_protocol::model::SeriesKey;

/// Renders a line as a device would, with its CRC-8.
fn render_line(device: &str, pairs: &[(&str, f64)], time_ms: Option<i64>, crlf: bool) -> String {
    let mut body = device.to_owned();
    for (metric, value) in pairs {
        body.push_str(&format!(" {metric}={value:?}"));
    }
    if let Some(time_ms) = time_ms {
        body.push_str(&format!(" t={time_ms}"));
    }
    body.push(' ');
    format!(
        "{body}*{:02X}{}",
        crc8(body.as_bytes()),
        if crlf { "\r\n" } else { "\n" }
    )
}

fn reading(device: &str, metric: &str, time_ms: Option<i64>, value: f64) -> ParsedReading {
    ParsedReading {
        key: SeriesKey::new(device, metric),
        time_ms,
        value,
    }
}

/// Parses into both sinks (owned keys, and the agent's `ParsedReadings`), which must agree.
fn parse(line: &str) -> Result<Vec<ParsedReading>, SerialLineError> {
    let mut compact = ParsedReadings::new();
    let compact_result = parse_line(line.as_bytes(), &SerialLineOptions::default(), &mut compact);
    let mut out = Vec::new();
    let result = parse_line(line.as_bytes(), &SerialLineOptions::default(), &mut out);
    assert_eq!(compact_result, result);
    assert_eq!(compact.to_vec(), out);
    result?;
    Ok(out)
}

/// Feeds `stream` in `chunk_sizes` pieces (cycled) and collects everything the reader reports.
fn read_all(
    stream: &[u8],
    chunk_sizes: &[usize],
    options: SerialLineOptions,
) -> (Vec<ParsedReading>, Vec<SerialLineError>) {
    let mut reader = SerialLineReader::new(options);
    // The serial shell's sink: readings of every line accumulate, rejected lines are taken back.
    let mut readings = ParsedReadings::new();
    let mut errors = Vec::new();
    let mut rest = stream;
    let mut sizes = chunk_sizes.iter().cycle();
    while !rest.is_empty() {
        let size = (*sizes.next().unwrap()).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        reader.push(chunk);
        while let Some(result) = reader.next_readings(&mut readings) {
            if let Err(error) = result {
                errors.push(error);
            }
        }
    }
    errors.extend(reader.finish());
    (readings.to_vec(), errors)
}

#[test]
fn documented_example_line_parses() {
    let line = render_line(
        "dev-7",
        &[("temp", 21.53), ("hum", 40.1)],
        Some(1_764_284_000_123),
        true,
    );
    assert!(
        line.starts_with("dev-7 temp=21.53 hum=40.1 t=1764284000123 *"),
        "{line}"
    );
    let readings = parse(line.trim_end()).unwrap();
    assert_eq!(
        readings,
        vec![
            reading("dev-7", "temp", Some(1_764_284_000_123), 21.53),
            reading("dev-7", "hum", Some(1_764_284_000_123), 40.1),
        ]
    );
    // Lower-case hex and no space before `*` are fine too.
    let body = "dev-7 temp=1";
    assert_eq!(
        parse(&format!("{body}*{:02x}", crc8(body.as_bytes()))).unwrap(),
        vec![reading("dev-7", "temp", None, 1.0)]
    );
}

#[test]
fn rejections_have_reasons() {
    let with_crc = |body: &str| format!("{body}*{:02X}", crc8(body.as_bytes()));
    let reason = |line: &str| parse(line).unwrap_err().reason();
    assert_eq!(reason("dev-7 temp=21.53 *00"), "bad_checksum");
    assert_eq!(reason("dev-7 temp=21.35 *7F"), "bad_checksum");
    assert_eq!(reason("dev-7 temp=21.53"), "missing_checksum");
    assert_eq!(reason("dev-7 temp=21.53 *Z1"), "garbage");
    assert_eq!(reason(&with_crc("dev-7 temp")), "garbage");
    assert_eq!(reason(&with_crc("dev-7")), "garbage");
    assert_eq!(reason(&with_crc("dev/7 temp=1")), "garbage");
    assert_eq!(reason(&with_crc("dev-7 temp=warm")), "not_a_number");
    assert_eq!(reason(&with_crc("dev-7 temp=")), "not_a_number");
    assert_eq!(reason(&with_crc("dev-7 temp=NaN")), "nan_or_inf");
    assert_eq!(
        reason(&with_crc("dev-7 temp=1 t=yesterday")),
        "bad_timestamp"
    );
    assert_eq!(reason(&with_crc("dev-7 te\u{1}mp=1")), "garbage");
    let error = parse(&with_crc("dev-7 temp=1 hum")).unwrap_err();
    assert_eq!(
        error,
        SerialLineError::Garbage {
            byte_offset: 13,
            detail: "expected metric=value"
        }
    );
    assert_eq!(parse("# booting v1.2").unwrap(), vec![]);
    assert_eq!(parse("   ").unwrap(), vec![]);
    let lenient = SerialLineOptions {
        require_checksum: false,
        ..SerialLineOptions::default()
    };
    let mut out = Vec::new();
    assert_eq!(parse_line(b"dev-7 temp=2", &lenient, &mut out), Ok(1));
    for reason in [
        "bad_checksum",
        "garbage",
        "partial_line",
        "line_too_long",
        "not_a_number",
    ] {
        assert!(SerialLineError::REASONS.contains(&reason));
    }
}

#[test]
fn decoder_handles_crlf_lf_and_split_terminators() {
    let mut decoder = LineDecoder::new(64);
    decoder.push(b"one\r");
    assert!(decoder.next_line().is_none());
    decoder.push(b"\ntwo\nthr");
    let first = decoder.next_line().unwrap().unwrap();
    assert_eq!((first.bytes, first.first_after_start), (&b"one"[..], true));
    let second = decoder.next_line().unwrap().unwrap();
    assert_eq!(
        (second.bytes, second.first_after_start),
        (&b"two"[..], false)
    );
    assert!(decoder.next_line().is_none());
    decoder.push(b"ee\n");
    assert_eq!(decoder.next_line().unwrap().unwrap().bytes, b"three");
    assert_eq!(decoder.stats().lines_out, 3);
}

#[test]
fn over_long_line_is_discarded_to_the_next_newline_and_counted() {
    let mut decoder = LineDecoder::new(16);
    decoder.push(b"ok\n");
    decoder.push(&[b'x'; 40]);
    assert_eq!(decoder.next_line().unwrap().unwrap().bytes, b"ok");
    assert!(decoder.next_line().is_none());
    decoder.push(&[b'y'; 1000]);
    assert!(decoder.next_line().is_none());
    decoder.push(b"yy\nafter\n");
    assert_eq!(
        decoder.next_line().unwrap().unwrap_err(),
        SerialLineError::LineTooLong {
            discarded_bytes: 1042,
            max_line_bytes: 16
        }
    );
    assert_eq!(decoder.next_line().unwrap().unwrap().bytes, b"after");
    assert!(decoder.next_line().is_none());
    assert_eq!(decoder.stats().lines_too_long, 1);

    // A too-long line that arrives complete in one chunk is reported the same way.
    decoder.push(b"0123456789abcdefXYZ\nshort\n");
    assert_eq!(
        decoder.next_line().unwrap().unwrap_err().reason(),
        "line_too_long"
    );
    assert_eq!(decoder.next_line().unwrap().unwrap().bytes, b"short");
}

#[test]
fn first_line_after_opening_mid_line_is_partial() {
    let whole = render_line("dev-1", &[("temp", 20.0)], None, true);
    let stream = format!("{}{whole}", &whole[5..]);
    let (readings, errors) = read_all(stream.as_bytes(), &[7], SerialLineOptions::default());
    assert_eq!(readings, vec![reading("dev-1", "temp", None, 20.0)]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].reason(), "partial_line");

    // Unplugged mid-line: the unterminated rest is reported by finish().
    let mut reader = SerialLineReader::new(SerialLineOptions::default());
    reader.push(&whole.as_bytes()[..10]);
    let mut out = Vec::new();
    assert!(reader.next_readings(&mut out).is_none());
    assert_eq!(reader.finish().unwrap().reason(), "partial_line");
    assert!(reader.finish().is_none());
}

fn valid_line() -> impl Strategy<Value = (String, Vec<(String, f64)>, Option<i64>, bool)> {
    (
        "[a-z][a-z0-9_.:-]{0,11}",
        prop::collection::vec(
            (
                "[a-s][a-z0-9_]{0,7}",
                prop_oneof![
                    (-100_000i64..100_000).prop_map(|v| v as f64 / 100.0),
                    any::<f64>().prop_filter("finite", |v| v.is_finite())
                ],
            ),
            1..5,
        ),
        prop::option::of(0i64..4_000_000_000_000),
        any::<bool>(),
    )
}

fn render(line: &(String, Vec<(String, f64)>, Option<i64>, bool)) -> (String, Vec<ParsedReading>) {
    let (device, pairs, time_ms, crlf) = line;
    let pair_refs: Vec<(&str, f64)> = pairs
        .iter()
        .map(|(metric, value)| (metric.as_str(), *value))
        .collect();
    let text = render_line(device, &pair_refs, *time_ms, *crlf);
    let readings = pairs
        .iter()
        .map(|(metric, value)| reading(device, metric, *time_ms, *value))
        .collect();
    (text, readings)
}

/// Is `needle` a subsequence of `haystack`?
fn is_subsequence(needle: &[ParsedReading], haystack: &[ParsedReading]) -> bool {
    let mut remaining = haystack.iter();
    needle
        .iter()
        .all(|wanted| remaining.any(|found| found == wanted))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_chunking_yields_the_same_readings(
        lines in prop::collection::vec(valid_line(), 1..12),
        chunk_sizes in prop::collection::vec(1usize..64, 1..8),
    ) {
        let mut stream = String::new();
        let mut expected = Vec::new();
        for line in &lines {
            let (text, readings) = render(line);
            stream.push_str(&text);
            expected.extend(readings);
        }
        let options = SerialLineOptions { max_line_bytes: 1024, ..SerialLineOptions::default() };
        let (readings, errors) = read_all(stream.as_bytes(), &chunk_sizes, options);
        prop_assert!(errors.is_empty(), "{errors:?}");
        prop_assert_eq!(readings, expected);
    }

    #[test]
    fn garbage_between_lines_never_loses_valid_lines(
        items in prop::collection::vec(
            prop_oneof![
                valid_line().prop_map(Ok),
                prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..300).prop_map(Err),
            ],
            1..16,
        ),
        chunk_sizes in prop::collection::vec(1usize..100, 1..8),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        let mut garbage_lines = 0;
        for item in &items {
            match item {
                Ok(line) => {
                    let (text, readings) = render(line);
                    stream.extend_from_slice(text.as_bytes());
                    expected.extend(readings);
                }
                Err(garbage) => {
                    stream.extend_from_slice(garbage);
                    stream.push(b'\n');
                    garbage_lines += 1;
                }
            }
        }
        let options = SerialLineOptions { max_line_bytes: 200, ..SerialLineOptions::default() };
        let (readings, errors) = read_all(&stream, &chunk_sizes, options);
        prop_assert!(is_subsequence(&expected, &readings), "lost valid readings:\n{expected:?}\n{readings:?}");
        prop_assert!(errors.len() <= garbage_lines);
    }

    #[test]
    fn parse_line_never_panics(line in prop::collection::vec(any::<u8>(), 0..300), lenient in any::<bool>()) {
        let options = SerialLineOptions { require_checksum: !lenient, ..SerialLineOptions::default() };
        let mut out = Vec::new();
        match parse_line(&line, &options, &mut out) {
            Ok(count) => prop_assert_eq!(count, out.len()),
            Err(error) => {
                prop_assert!(out.is_empty());
                prop_assert!(SerialLineError::REASONS.contains(&error.reason()));
            }
        }
    }

    #[test]
    fn decoder_memory_stays_bounded(stream in prop::collection::vec(any::<u8>(), 0..4000), chunk in 1usize..50) {
        let max_line_bytes = 64;
        let mut decoder = LineDecoder::new(max_line_bytes);
        for piece in stream.chunks(chunk) {
            decoder.push(piece);
            while let Some(line) = decoder.next_line() {
                if let Ok(line) = line {
                    prop_assert!(line.bytes.len() <= max_line_bytes);
                }
            }
            // Drained: only an incomplete line may remain, and never more than the limit
            // (+1 for a `\r` waiting for its `\n`).
            prop_assert!(decoder.buffered_bytes() <= max_line_bytes + 1, "{} bytes buffered", decoder.buffered_bytes());
        }
    }
}

/// The example in docs/serial-protocol.md must stay a valid line, checksum included.
#[test]
fn documented_example_in_the_protocol_doc_is_valid() {
    let doc_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/serial-protocol.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let example = doc
        .lines()
        .find(|line| line.starts_with("dev-7 temp=21.53"))
        .expect("example line in the doc");
    let line = example.trim_end_matches("\\r\\n");
    assert_eq!(
        parse(line).unwrap(),
        vec![
            reading("dev-7", "temp", Some(1_764_284_000_123), 21.53),
            reading("dev-7", "hum", Some(1_764_284_000_123), 40.1),
        ]
    );
}
