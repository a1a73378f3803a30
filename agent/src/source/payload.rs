//! Payload formats and the typed reasons a message is rejected.
//!
//! A message is parsed as a whole or rejected as a whole: on any error nothing from it is kept,
//! so a half-understood message never produces half its readings. Each rejection has a stable
//! [`PayloadError::reason`] label (a Prometheus label value) and a message that names what was
//! wrong and where (field path, record index, line and byte offset).
//!
//! Formats (all numbers only; NaN and infinities are rejected):
//! - `plain`: the payload is one number (`21.5`); the metric comes from the topic.
//! - `json`: an object whose fields are metrics. Nested objects are flattened with `.`
//!   (`{"env":{"temp":21}}` is metric `env.temp`, up to [`MAX_JSON_DEPTH`] levels) because
//!   common gateways (Zigbee2MQTT, Tasmota) nest readings and rejecting them would make those
//!   sensors unusable. An optional top-level timestamp field (`timestamp_field`, unit
//!   `timestamp_unit`, default ms) gives the event time. Booleans are 1/0 when
//!   `booleans_as_numbers` is set. Strings, nulls and arrays are rejected, or skipped when
//!   `skip_non_numeric` is set.
//! - `senml`: SenML JSON (RFC 8428): base name/time/value/unit, `n`, `v`, `vb`, `t` in seconds
//!   (converted to ms; times below 2^28 s are relative to the receive time, 0 means "now"), `u`
//!   ignored or kept as tag `unit` (`senml_unit_as_tag`). Fields ending in `_` are "must
//!   understand" extensions we do not know, so the message is rejected as the RFC requires.
//! - `line_protocol`: InfluxDB line protocol, one or more lines; the metric is
//!   `measurement.field`, tags become series tags, the timestamp precision is `timestamp_unit`
//!   (default ns, as in InfluxDB). Integer (`1i`), unsigned (`1u`) and float fields are numbers.
//!
//! When the topic also names a metric (`{metric}`), payload-derived names are appended to it:
//! topic metric `env` and JSON field `temp` give metric `env.temp`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::topic::{TopicFields, TopicTemplate};
use super::{excerpt, parse_number_text, parse_short_decimal, KeyPieces, NumberText, ReadingSink};

pub use super::json::MAX_JSON_DEPTH;

/// Default bound on one message, checked before any parsing.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    #[default]
    Plain,
    Json,
    Senml,
    LineProtocol,
}

impl PayloadFormat {
    pub fn name(self) -> &'static str {
        match self {
            PayloadFormat::Plain => "plain",
            PayloadFormat::Json => "json",
            PayloadFormat::Senml => "senml",
            PayloadFormat::LineProtocol => "line_protocol",
        }
    }
}

/// The unit of a numeric timestamp in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    S,
    Ms,
    Us,
    Ns,
}

impl TimeUnit {
    /// Converts an integer timestamp to ms (floor), `None` if it does not fit an `i64` of ms.
    pub fn integer_to_ms(self, value: i128) -> Option<i64> {
        let ms = match self {
            TimeUnit::S => value.checked_mul(1000)?,
            TimeUnit::Ms => value,
            TimeUnit::Us => value.div_euclid(1000),
            TimeUnit::Ns => value.div_euclid(1_000_000),
        };
        i64::try_from(ms).ok()
    }

    /// Converts a fractional timestamp to ms (rounded), `None` if not finite or out of range.
    pub fn float_to_ms(self, value: f64) -> Option<i64> {
        let ms = match self {
            TimeUnit::S => value * 1000.0,
            TimeUnit::Ms => value,
            TimeUnit::Us => value / 1000.0,
            TimeUnit::Ns => value / 1_000_000.0,
        }
        .round();
        // 2^63 is exactly representable; anything at or beyond it does not fit.
        if (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&ms) {
            Some(ms as i64)
        } else {
            None
        }
    }
}

/// How to read the payloads of one topic template. Deserialized from the agent config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PayloadOptions {
    pub format: PayloadFormat,
    /// Messages larger than this are rejected (`too_large`) before parsing.
    pub max_payload_bytes: usize,
    /// `json` only: the top-level field holding the event time.
    pub timestamp_field: Option<String>,
    /// `json` (default ms) and `line_protocol` (default ns): the unit of timestamps.
    pub timestamp_unit: Option<TimeUnit>,
    /// Booleans (JSON `true`, SenML `vb`, line-protocol `t`/`false`) become 1 and 0.
    pub booleans_as_numbers: bool,
    /// Skip string/null/array values instead of rejecting the whole message.
    pub skip_non_numeric: bool,
    /// `senml` only: keep the unit as tag `unit` (by default it is ignored).
    pub senml_unit_as_tag: bool,
}

impl Default for PayloadOptions {
    fn default() -> Self {
        Self {
            format: PayloadFormat::Plain,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            timestamp_field: None,
            timestamp_unit: None,
            booleans_as_numbers: false,
            skip_non_numeric: false,
            senml_unit_as_tag: false,
        }
    }
}

impl PayloadOptions {
    pub fn with_format(format: PayloadFormat) -> Self {
        Self {
            format,
            ..Self::default()
        }
    }
}

/// Why a message was rejected. See [`PayloadError::reason`] for the metric labels.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PayloadError {
    #[error("payload of {payload_bytes} bytes exceeds max_payload_bytes = {max_payload_bytes}; raise the limit or make the sensor send less per message")]
    TooLarge {
        payload_bytes: usize,
        max_payload_bytes: usize,
    },
    #[error("payload is not UTF-8 (invalid byte at offset {byte_offset})")]
    NotUtf8 { byte_offset: usize },
    #[error("topic `{topic}` does not match template `{template}`")]
    TopicMismatch { topic: String, template: String },
    #[error("template `{template}` has no `{{metric}}` and format `{format}` carries no metric names; add `{{metric}}` to the template or use a format with named values")]
    NoMetric {
        template: String,
        format: &'static str,
    },
    #[error("{field}: expected a number, found {found}")]
    NotANumber { field: String, found: String },
    #[error("{field}: NaN and infinite values are rejected")]
    NanOrInf { field: String },
    #[error("{field}: timestamp {found} is not a valid time in the configured unit")]
    BadTimestamp { field: String, found: String },
    #[error("{field}: produces an empty metric name")]
    EmptyMetricName { field: String },
    #[error("payload is not valid JSON: {detail}")]
    JsonSyntax {
        line: usize,
        column: usize,
        detail: String,
    },
    #[error("payload is {found}, expected a JSON object of metric fields")]
    JsonNotObject { found: &'static str },
    #[error("{field}: objects nested deeper than {max_depth} levels are rejected")]
    JsonTooDeep { field: String, max_depth: usize },
    #[error("payload is {found}, expected a SenML JSON array of records")]
    SenmlNotArray { found: &'static str },
    #[error("SenML record {record_index} is not an object")]
    SenmlBadRecord { record_index: usize },
    #[error("SenML record {record_index} (`{name}`) has no value (`v` or `vb`)")]
    SenmlMissingValue { record_index: usize, name: String },
    #[error("SenML record {record_index} has no name (neither `bn` nor `n`)")]
    SenmlMissingName { record_index: usize },
    #[error("SenML record {record_index}: field `{field}` must be {expected}")]
    SenmlBadField {
        record_index: usize,
        field: String,
        expected: &'static str,
    },
    #[error("SenML record {record_index}: field `{field}` is a must-understand extension this agent does not support")]
    SenmlUnsupportedField { record_index: usize, field: String },
    #[error("line protocol syntax error on line {line} (byte {byte_offset}): {detail}")]
    LineProtocolSyntax {
        line: usize,
        byte_offset: usize,
        detail: &'static str,
    },
    #[error("payload holds no readings")]
    NoReadings,
}

impl PayloadError {
    /// Every label [`PayloadError::reason`] can return, for registering metrics up front.
    pub const REASONS: &'static [&'static str] = &[
        "too_large",
        "not_utf8",
        "topic_mismatch",
        "no_metric",
        "not_a_number",
        "nan_or_inf",
        "bad_timestamp",
        "empty_metric_name",
        "json_syntax",
        "json_not_object",
        "json_too_deep",
        "senml_not_array",
        "senml_bad_record",
        "senml_missing_value",
        "senml_missing_name",
        "senml_bad_field",
        "senml_unsupported_field",
        "line_protocol_syntax",
        "no_readings",
    ];

    /// A stable, low-cardinality label for the rejected-messages metric.
    pub fn reason(&self) -> &'static str {
        match self {
            PayloadError::TooLarge { .. } => "too_large",
            PayloadError::NotUtf8 { .. } => "not_utf8",
            PayloadError::TopicMismatch { .. } => "topic_mismatch",
            PayloadError::NoMetric { .. } => "no_metric",
            PayloadError::NotANumber { .. } => "not_a_number",
            PayloadError::NanOrInf { .. } => "nan_or_inf",
            PayloadError::BadTimestamp { .. } => "bad_timestamp",
            PayloadError::EmptyMetricName { .. } => "empty_metric_name",
            PayloadError::JsonSyntax { .. } => "json_syntax",
            PayloadError::JsonNotObject { .. } => "json_not_object",
            PayloadError::JsonTooDeep { .. } => "json_too_deep",
            PayloadError::SenmlNotArray { .. } => "senml_not_array",
            PayloadError::SenmlBadRecord { .. } => "senml_bad_record",
            PayloadError::SenmlMissingValue { .. } => "senml_missing_value",
            PayloadError::SenmlMissingName { .. } => "senml_missing_name",
            PayloadError::SenmlBadField { .. } => "senml_bad_field",
            PayloadError::SenmlUnsupportedField { .. } => "senml_unsupported_field",
            PayloadError::LineProtocolSyntax { .. } => "line_protocol_syntax",
            PayloadError::NoReadings => "no_readings",
        }
    }
}

/// Appends readings for one message to `out`, keyed by the topic's device, metric and tags.
pub(crate) struct Emitter<'o, 'f> {
    fields: &'f TopicFields<'f>,
    out: &'o mut dyn ReadingSink,
}

impl<'o, 'f> Emitter<'o, 'f> {
    pub(crate) fn len(&self) -> usize {
        self.out.reading_count()
    }

    /// Sets the event time of every reading appended since `first_index`.
    pub(crate) fn set_time_from(&mut self, first_index: usize, time_ms: i64) {
        self.out.set_time_from(first_index, Some(time_ms));
    }

    /// `payload_name` is the name the payload gives the value (empty for `plain`).
    pub(crate) fn push(
        &mut self,
        payload_name: &str,
        payload_tags: &[(&str, &str)],
        time_ms: Option<i64>,
        value: f64,
        field_for_errors: &str,
    ) -> Result<(), PayloadError> {
        if !value.is_finite() {
            return Err(PayloadError::NanOrInf {
                field: field_for_errors.to_owned(),
            });
        }
        let key = KeyPieces {
            device_id: self.fields.device_id,
            metric_prefix: self.fields.metric.unwrap_or_default(),
            metric_name: payload_name,
            tag_groups: [self.fields.tags.as_slice(), payload_tags],
        };
        if key.metric_is_empty() {
            return Err(PayloadError::EmptyMetricName {
                field: field_for_errors.to_owned(),
            });
        }
        self.out.push_reading(key, time_ms, value);
        Ok(())
    }
}

/// Parses one payload for a matched topic, appending its readings to `out`.
///
/// `receive_ms` is when the agent received the message (SenML relative times are relative to
/// it). Returns how many readings were appended; on error `out` is left as it was.
pub fn parse_payload(
    options: &PayloadOptions,
    fields: &TopicFields<'_>,
    payload: &[u8],
    receive_ms: i64,
    out: &mut impl ReadingSink,
) -> Result<usize, PayloadError> {
    let start_len = out.reading_count();
    let result = parse_payload_inner(options, fields, payload, receive_ms, out);
    match result {
        Ok(()) if out.reading_count() > start_len => Ok(out.reading_count() - start_len),
        Ok(()) => Err(PayloadError::NoReadings),
        Err(error) => {
            out.truncate_readings(start_len);
            Err(error)
        }
    }
}

fn parse_payload_inner(
    options: &PayloadOptions,
    fields: &TopicFields<'_>,
    payload: &[u8],
    receive_ms: i64,
    out: &mut dyn ReadingSink,
) -> Result<(), PayloadError> {
    if payload.len() > options.max_payload_bytes {
        return Err(PayloadError::TooLarge {
            payload_bytes: payload.len(),
            max_payload_bytes: options.max_payload_bytes,
        });
    }
    let mut emitter = Emitter { fields, out };
    if options.format == PayloadFormat::Plain {
        // Most plain payloads are a short decimal: read straight from the bytes, without
        // validating UTF-8 and trimming first (it is ASCII if this succeeds).
        if let Some(value) = parse_short_decimal(payload.trim_ascii()) {
            return push_plain(&mut emitter, value);
        }
    }
    let text = std::str::from_utf8(payload).map_err(|error| PayloadError::NotUtf8 {
        byte_offset: error.valid_up_to(),
    })?;
    match options.format {
        PayloadFormat::Plain => parse_plain(text, options, &mut emitter),
        PayloadFormat::Json => super::json::parse_json(text, options, &mut emitter),
        PayloadFormat::Senml => super::senml::parse_senml(text, options, receive_ms, &mut emitter),
        PayloadFormat::LineProtocol => {
            super::line_protocol::parse_line_protocol(text, options, &mut emitter)
        }
    }
}

const PLAIN_FIELD: &str = "payload";

/// A plain payload carries no metric name: the topic must give it.
fn require_topic_metric(emitter: &Emitter<'_, '_>) -> Result<(), PayloadError> {
    if emitter.fields.metric.is_none() {
        return Err(PayloadError::NoMetric {
            template: String::from("(this topic's)"),
            format: "plain",
        });
    }
    Ok(())
}

/// The one reading of a plain payload.
fn push_plain(emitter: &mut Emitter<'_, '_>, value: f64) -> Result<(), PayloadError> {
    require_topic_metric(emitter)?;
    emitter.push("", &[], None, value, PLAIN_FIELD)
}

fn parse_plain(
    text: &str,
    options: &PayloadOptions,
    emitter: &mut Emitter<'_, '_>,
) -> Result<(), PayloadError> {
    // Before the value: a topic without a metric is the error to report, whatever follows.
    require_topic_metric(emitter)?;
    let trimmed = text.trim();
    if options.booleans_as_numbers {
        match trimmed {
            "true" => return push_plain(emitter, 1.0),
            "false" => return push_plain(emitter, 0.0),
            _ => {}
        }
    }
    match parse_number_text(trimmed) {
        NumberText::Finite(value) => push_plain(emitter, value),
        NumberText::NanOrInf => Err(PayloadError::NanOrInf {
            field: PLAIN_FIELD.to_owned(),
        }),
        NumberText::NotANumber => Err(PayloadError::NotANumber {
            field: PLAIN_FIELD.to_owned(),
            found: format!("`{}`", excerpt(trimmed)),
        }),
    }
}

/// A topic template and its payload options: everything needed to turn one MQTT message into
/// readings. Built once per configured template.
#[derive(Debug, Clone)]
pub struct MessageParser {
    template: TopicTemplate,
    options: PayloadOptions,
}

impl MessageParser {
    /// Fails with [`PayloadError::NoMetric`] if no metric name could ever be found (plain payloads
    /// under a template without `{metric}`).
    pub fn new(template: TopicTemplate, options: PayloadOptions) -> Result<Self, PayloadError> {
        if options.format == PayloadFormat::Plain && !template.has_metric() {
            return Err(PayloadError::NoMetric {
                template: template.as_str().to_owned(),
                format: "plain",
            });
        }
        Ok(Self { template, options })
    }

    pub fn template(&self) -> &TopicTemplate {
        &self.template
    }

    pub fn options(&self) -> &PayloadOptions {
        &self.options
    }

    /// Parses one message. Returns how many readings were appended to `out`; on error nothing
    /// is appended.
    pub fn parse(
        &self,
        topic: &str,
        payload: &[u8],
        receive_ms: i64,
        out: &mut impl ReadingSink,
    ) -> Result<usize, PayloadError> {
        let fields =
            self.template
                .match_topic(topic)
                .ok_or_else(|| PayloadError::TopicMismatch {
                    topic: excerpt(topic),
                    template: self.template.as_str().to_owned(),
                })?;
        parse_payload(&self.options, &fields, payload, receive_ms, out)
    }
}

/// All templates of one MQTT source: finds the template a topic matches and parses with it.
///
/// Templates are tried in configuration order and the first match wins, so put specific
/// templates before general ones (`dev/{device}/status` before `dev/{device}/{metric}`).
#[derive(Debug, Clone, Default)]
pub struct TopicRouter {
    parsers: Vec<MessageParser>,
}

impl TopicRouter {
    pub fn new(parsers: Vec<MessageParser>) -> Self {
        Self { parsers }
    }

    /// The MQTT subscription filters to subscribe to, one per template, duplicates removed.
    pub fn subscription_filters(&self) -> Vec<&str> {
        let mut filters: Vec<&str> = Vec::with_capacity(self.parsers.len());
        for parser in &self.parsers {
            let filter = parser.template().subscription_filter();
            if !filters.contains(&filter) {
                filters.push(filter);
            }
        }
        filters
    }

    /// Parses a message with the first template its topic matches; `TopicMismatch` if none does.
    pub fn parse(
        &self,
        topic: &str,
        payload: &[u8],
        receive_ms: i64,
        out: &mut impl ReadingSink,
    ) -> Result<usize, PayloadError> {
        for parser in &self.parsers {
            if let Some(fields) = parser.template().match_topic(topic) {
                return parse_payload(parser.options(), &fields, payload, receive_ms, out);
            }
        }
        let templates: Vec<&str> = self
            .parsers
            .iter()
            .map(|parser| parser.template().as_str())
            .collect();
        Err(PayloadError::TopicMismatch {
            topic: excerpt(topic),
            template: templates.join(" | "),
        })
    }
}
