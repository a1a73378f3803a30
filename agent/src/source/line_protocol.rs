//! InfluxDB line protocol payloads: `measurement[,tag=value...] field=value[,...] [timestamp]`.
//!
//! Escaping follows InfluxDB: in measurements a backslash escapes `,`, space and `\`; in tag
//! keys, tag values and field keys it also escapes `=`. A backslash before any other character is
//! kept literally. String field values are double-quoted with `\"` and `\\` escapes; they are not
//! numbers (rejected, or skipped with `skip_non_numeric`). Lines starting with `#` and blank lines
//! are ignored. `\r\n` line endings are accepted.

use std::borrow::Cow;

use super::payload::{Emitter, PayloadError, PayloadOptions, TimeUnit};
use super::{excerpt, parse_number_text, NumberText};

const MEASUREMENT_ESCAPES: &[u8] = b", \\";
const KEY_ESCAPES: &[u8] = b",= \\";

struct Cursor<'a> {
    text: &'a str,
    position: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.position).copied()
    }

    fn at_end(&self) -> bool {
        self.position >= self.text.len()
    }

    fn fail(&self, detail: &'static str) -> LineFailure {
        LineFailure::Syntax(self.position, detail)
    }

    /// Reads up to the first unescaped byte in `stops`, undoing escapes of bytes in `escapable`.
    fn token(&mut self, stops: &[u8], escapable: &[u8]) -> Cow<'a, str> {
        let bytes = self.text.as_bytes();
        let start = self.position;
        let mut owned: Option<String> = None;
        let mut copied_up_to = start;
        while let Some(&byte) = bytes.get(self.position) {
            if byte == b'\\' {
                if let Some(&next) = bytes.get(self.position + 1) {
                    if escapable.contains(&next) {
                        let buffer = owned.get_or_insert_with(String::new);
                        buffer.push_str(&self.text[copied_up_to..self.position]);
                        buffer.push(next as char);
                        self.position += 2;
                        copied_up_to = self.position;
                        continue;
                    }
                }
                self.position += 1;
                continue;
            }
            if stops.contains(&byte) {
                break;
            }
            self.position += 1;
        }
        match owned {
            Some(mut buffer) => {
                buffer.push_str(&self.text[copied_up_to..self.position]);
                Cow::Owned(buffer)
            }
            None => Cow::Borrowed(&self.text[start..self.position]),
        }
    }

    fn expect(&mut self, byte: u8, detail: &'static str) -> Result<(), LineFailure> {
        if self.peek() == Some(byte) {
            self.position += 1;
            Ok(())
        } else {
            Err(self.fail(detail))
        }
    }

    fn skip_spaces(&mut self) -> usize {
        let start = self.position;
        while self.peek() == Some(b' ') {
            self.position += 1;
        }
        self.position - start
    }

    /// A double-quoted string field value; the cursor is on the opening quote.
    fn quoted_string(&mut self) -> Result<(), LineFailure> {
        self.position += 1;
        let bytes = self.text.as_bytes();
        while let Some(&byte) = bytes.get(self.position) {
            match byte {
                b'\\' => self.position += 2,
                b'"' => {
                    self.position += 1;
                    return Ok(());
                }
                _ => self.position += 1,
            }
        }
        Err(self.fail("unterminated string field value"))
    }
}

enum FieldValue<'a> {
    Number(f64),
    Bool(bool),
    Text,
    Invalid(&'a str),
    NanOrInf,
}

fn classify_value(raw: &str) -> FieldValue<'_> {
    match raw {
        "t" | "T" | "true" | "True" | "TRUE" => return FieldValue::Bool(true),
        "f" | "F" | "false" | "False" | "FALSE" => return FieldValue::Bool(false),
        _ => {}
    }
    if let Some(integer) = raw.strip_suffix('i') {
        return integer
            .parse::<i64>()
            .map_or(FieldValue::Invalid(raw), |value| {
                FieldValue::Number(value as f64)
            });
    }
    if let Some(unsigned) = raw.strip_suffix('u') {
        return unsigned
            .parse::<u64>()
            .map_or(FieldValue::Invalid(raw), |value| {
                FieldValue::Number(value as f64)
            });
    }
    if raw.is_empty() || raw.starts_with(|c: char| c.is_whitespace() || c == '+') {
        return FieldValue::Invalid(raw);
    }
    match parse_number_text(raw) {
        NumberText::Finite(value) => FieldValue::Number(value),
        NumberText::NanOrInf => FieldValue::NanOrInf,
        NumberText::NotANumber => FieldValue::Invalid(raw),
    }
}

pub(crate) fn parse_line_protocol(
    text: &str,
    options: &PayloadOptions,
    emitter: &mut Emitter<'_, '_>,
) -> Result<(), PayloadError> {
    let unit = options.timestamp_unit.unwrap_or(TimeUnit::Ns);
    let mut line_start = 0usize;
    for (line_index, raw_line) in text.split('\n').enumerate() {
        let this_line_start = line_start;
        line_start += raw_line.len() + 1;
        let line = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        let trimmed = line.trim_start_matches(' ');
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let leading = line.len() - trimmed.len();
        parse_one_line(trimmed, options, unit, emitter).map_err(|failure| match failure {
            LineFailure::Syntax(offset, detail) => PayloadError::LineProtocolSyntax {
                line: line_index + 1,
                byte_offset: this_line_start + leading + offset,
                detail,
            },
            LineFailure::Payload(error) => error,
        })?;
    }
    Ok(())
}

enum LineFailure {
    Syntax(usize, &'static str),
    Payload(PayloadError),
}

fn parse_one_line(
    line: &str,
    options: &PayloadOptions,
    unit: TimeUnit,
    emitter: &mut Emitter<'_, '_>,
) -> Result<(), LineFailure> {
    let mut cursor = Cursor {
        text: line,
        position: 0,
    };
    let measurement = cursor.token(b", ", MEASUREMENT_ESCAPES);
    if measurement.is_empty() {
        return Err(cursor.fail("missing measurement name"));
    }
    let mut tags: Vec<(Cow<str>, Cow<str>)> = Vec::new();
    while cursor.peek() == Some(b',') {
        cursor.position += 1;
        let key = cursor.token(b"=, ", KEY_ESCAPES);
        if key.is_empty() {
            return Err(cursor.fail("empty tag key"));
        }
        cursor.expect(b'=', "expected `=` after tag key")?;
        let value = cursor.token(b", ", KEY_ESCAPES);
        if value.is_empty() {
            return Err(cursor.fail("empty tag value"));
        }
        tags.push((key, value));
    }
    if cursor.skip_spaces() == 0 || cursor.at_end() {
        return Err(cursor.fail("expected a space and then fields after the measurement and tags"));
    }
    let first_reading = emitter.len();
    let tag_refs: Vec<(&str, &str)> = tags
        .iter()
        .map(|(key, value)| (key.as_ref(), value.as_ref()))
        .collect();
    loop {
        let key = cursor.token(b"=, ", KEY_ESCAPES);
        if key.is_empty() {
            return Err(cursor.fail("empty field key"));
        }
        cursor.expect(b'=', "expected `=` after field key")?;
        let metric = format!("{measurement}.{key}");
        let value = if cursor.peek() == Some(b'"') {
            cursor.quoted_string()?;
            FieldValue::Text
        } else {
            let start = cursor.position;
            while !matches!(cursor.peek(), None | Some(b',' | b' ')) {
                cursor.position += 1;
            }
            classify_value(&line[start..cursor.position])
        };
        let number = match value {
            FieldValue::Number(number) => Some(number),
            FieldValue::Bool(flag) if options.booleans_as_numbers => {
                Some(if flag { 1.0 } else { 0.0 })
            }
            FieldValue::Bool(_) | FieldValue::Text if options.skip_non_numeric => None,
            FieldValue::Bool(flag) => {
                return Err(LineFailure::Payload(PayloadError::NotANumber {
                    field: metric,
                    found: format!("boolean {flag}"),
                }))
            }
            FieldValue::Text => {
                return Err(LineFailure::Payload(PayloadError::NotANumber {
                    field: metric,
                    found: "a string".to_owned(),
                }))
            }
            FieldValue::Invalid(raw) => {
                return Err(LineFailure::Payload(PayloadError::NotANumber {
                    field: metric,
                    found: format!("`{}`", excerpt(raw)),
                }))
            }
            FieldValue::NanOrInf => {
                return Err(LineFailure::Payload(PayloadError::NanOrInf {
                    field: metric,
                }))
            }
        };
        if let Some(number) = number {
            emitter
                .push(&metric, &tag_refs, None, number, &metric)
                .map_err(LineFailure::Payload)?;
        }
        if cursor.peek() == Some(b',') {
            cursor.position += 1;
            continue;
        }
        break;
    }
    cursor.skip_spaces();
    if !cursor.at_end() {
        let start = cursor.position;
        while !matches!(cursor.peek(), None | Some(b' ')) {
            cursor.position += 1;
        }
        let raw = &line[start..cursor.position];
        let Ok(timestamp) = raw.parse::<i64>() else {
            return Err(LineFailure::Syntax(start, "timestamp is not an integer"));
        };
        let Some(time_ms) = unit.integer_to_ms(i128::from(timestamp)) else {
            return Err(LineFailure::Payload(PayloadError::BadTimestamp {
                field: format!("{measurement} timestamp"),
                found: raw.to_owned(),
            }));
        };
        emitter.set_time_from(first_reading, time_ms);
        cursor.skip_spaces();
        if !cursor.at_end() {
            return Err(cursor.fail("unexpected text after the timestamp"));
        }
    }
    Ok(())
}
