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
    KeyPieces, ParsedReading, ParsedReadings, ReadingRef, ReadingSink, SeriesKeyRef,
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
    // Rust's float parser also accepts "inf", "infinity" and "nan" in any case; sensors that send
    // those mean "no valid value", which we reject explicitly rather than as a syntax error.
    match trimmed.parse::<f64>() {
        Ok(value) if value.is_finite() => NumberText::Finite(value),
        Ok(_) => NumberText::NanOrInf,
        Err(_) => NumberText::NotANumber,
    }
}
