//! Sources: turning what sensors send into readings, before aggregation.
//!
//! Everything in this module is sans-IO. The MQTT and serial shells (elsewhere) own the sockets
//! and ttys and call in here with bytes, a topic and the receive time; the functions here never
//! read a clock, never block and never panic on untrusted input. That keeps every parsing rule
//! testable with property tests and lets one bad sensor cost exactly one counted rejection.
//!
//! - [`topic`]: topic templates (`site/{site}/dev/{device}/{metric}`) that map MQTT topic levels
//!   to device, metric and tags, and derive the subscription filter.
//! - [`readings`]: what parsers produce: the readings of one message with their key text
//!   held once ([`ParsedReadings`]), looked up by the registry without allocating.
//! - [`payload`]: payload formats (plain number, JSON object, SenML JSON, InfluxDB line
//!   protocol) and the typed rejection reasons counted by the metrics layer.
//! - [`serial_line`]: the serial line protocol (`docs/serial-protocol.md`): a byte-chunk line
//!   decoder with a length bound and the per-line parser.
//! - [`time`]: substitution of implausible device timestamps by the receive time.

pub mod broker;
pub mod mqtt;
pub mod payload;
pub mod readings;
pub mod serial;
pub mod serial_line;
pub mod time;
pub mod topic;

mod json;
mod line_protocol;
mod senml;

pub use payload::{
    parse_payload, MessageParser, PayloadError, PayloadFormat, PayloadOptions, TimeUnit,
    TopicRouter,
};
pub use readings::{
    KeyPieces, ParsedReading, ParsedReadings, ReadingRef, ReadingSink, ReadingsPool, SeriesKeyRef,
};
pub use serial_line::{
    crc8, parse_line, LineDecoder, LineDecoderStats, RawLine, SerialLineError, SerialLineOptions,
    SerialLineReader,
};
pub use time::{plausible_time, TimePolicy};
pub use topic::{TemplateError, TopicFields, TopicTags, TopicTemplate};

/// Shortens untrusted text quoted in an error message so a hostile payload cannot blow up logs.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX_CHARS: usize = 32;
    let mut chars = text.chars();
    let mut shown: String = chars.by_ref().take(MAX_CHARS).collect();
    if chars.next().is_some() {
        shown.push('…');
    }
    shown
}

/// Parses a decimal number as sensors write it, telling NaN and infinities apart from text that
/// is not a number at all (they are rejected with different reasons).
pub(crate) enum NumberText {
    Finite(f64),
    NanOrInf,
    NotANumber,
}

pub(crate) fn parse_number_text(text: &str) -> NumberText {
    let trimmed = text.trim();
    if let Some(value) = parse_short_decimal(trimmed.as_bytes()) {
        return NumberText::Finite(value);
    }
    // Rust's float parser also accepts "inf", "infinity" and "nan" in any case; sensors that send
    // those mean "no valid value", which we reject explicitly rather than as a syntax error.
    match trimmed.parse::<f64>() {
        Ok(value) if value.is_finite() => NumberText::Finite(value),
        Ok(_) => NumberText::NanOrInf,
        Err(_) => NumberText::NotANumber,
    }
}

/// Powers of ten an `f64` holds exactly.
const EXACT_POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// The value of a plain decimal as sensors mostly send it (`21.53`, `-4`, `+0.125`: sign,
/// digits, at most one point, no exponent) when its digits fit 2^53, or `None` for anything
/// else, which the caller then gives to Rust's full float parser. Such a decimal is
/// `digits / 10^fraction_digits` with both numbers exact in an `f64`, so one IEEE division
/// rounds it correctly: the same value the full parser returns (Clinger's fast path). The
/// full parser, with the UTF-8 check and two trims before it, was about 310 instructions of
/// a plain-number message (`docs/benchmarks.md`, "Session 6").
pub(crate) fn parse_short_decimal(bytes: &[u8]) -> Option<f64> {
    const MAX_EXACT_MANTISSA: u64 = 1 << 53;
    let (negative, unsigned) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, bytes),
    };
    let mut mantissa = 0u64;
    let mut digits = 0usize;
    let mut fraction_digits = 0usize;
    let mut seen_point = false;
    for byte in unsigned {
        match byte {
            b'0'..=b'9' => {
                // 19 digits always fit a u64; longer numbers take the full parser.
                if digits == 19 {
                    return None;
                }
                mantissa = mantissa * 10 + u64::from(byte - b'0');
                digits += 1;
                fraction_digits += usize::from(seen_point);
            }
            b'.' if !seen_point => seen_point = true,
            _ => return None,
        }
    }
    if digits == 0 || mantissa > MAX_EXACT_MANTISSA {
        return None;
    }
    let scale = EXACT_POWERS_OF_TEN.get(fraction_digits)?;
    let magnitude = mantissa as f64 / scale;
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_decimals_parse_exactly_like_the_full_parser() {
        let mut texts: Vec<String> = [
            "0",
            "-0",
            "+0",
            "0.0",
            "-0.0",
            "1",
            "1.",
            ".5",
            "-.5",
            "+.5",
            "21.53",
            "-4",
            "+0.125",
            "007",
            "0.1",
            "0.2",
            "0.3",
            "123456789012345678",
            "9007199254740992",
            "9007199254740993",
            "900719925474099.3",
            "0.0000000000000000000001",
            "0.00000000000000000000001",
            "1234567890.1234567",
            "99999999999999999999",
        ]
        .iter()
        .map(|text| (*text).to_owned())
        .collect();
        // Quantized sensor values, as the simulated fleet sends them.
        for step in 0..20_000u32 {
            let value = f64::from(step) * 0.37 - 3_000.0;
            for decimals in 0..6 {
                texts.push(format!("{value:.decimals$}"));
            }
            texts.push(format!("{value}"));
        }
        for text in &texts {
            let full: f64 = text.parse().unwrap();
            if let Some(fast) = parse_short_decimal(text.as_bytes()) {
                assert_eq!(fast.to_bits(), full.to_bits(), "`{text}`");
            }
            match parse_number_text(text) {
                NumberText::Finite(value) => {
                    assert_eq!(value.to_bits(), full.to_bits(), "`{text}`")
                }
                _ => panic!("`{text}` is a number"),
            }
        }
        assert_eq!(parse_short_decimal(b"21.53"), Some(21.53));
        assert_eq!(
            parse_short_decimal(b"-0").map(f64::to_bits),
            Some((-0.0f64).to_bits())
        );
    }

    #[test]
    fn anything_but_a_plain_decimal_is_left_to_the_full_parser() {
        for text in [
            "",
            "-",
            "+",
            ".",
            "-.",
            "1e3",
            "1E3",
            "1.2.3",
            "--1",
            "+-1",
            "1-",
            " 1",
            "1 ",
            "0x10",
            "inf",
            "NaN",
            "1_000",
            "١",
            "12345678901234567890",
            "9007199254740993",
        ] {
            assert_eq!(parse_short_decimal(text.as_bytes()), None, "`{text}`");
        }
        assert!(matches!(parse_number_text(" 1e3 "), NumberText::Finite(value) if value == 1000.0));
        assert!(matches!(parse_number_text("-inf"), NumberText::NanOrInf));
        assert!(matches!(parse_number_text("abc"), NumberText::NotANumber));
        assert!(matches!(parse_number_text("."), NumberText::NotANumber));
    }
}
