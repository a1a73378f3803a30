//! The serial line protocol: framing and parsing of sensor lines from RS-232/RS-485/USB-serial.
//!
//! Wire format (full specification in `docs/serial-protocol.md`):
//!
//! ```text
//! dev-7 temp=21.53 hum=40.1 t=1764284000123 *20\r\n
//! ```
//!
//! A device id, one or more `metric=value` pairs, an optional `t=` event time in ms since the
//! Unix epoch, and `*` followed by the CRC-8 (polynomial 0x07, init 0, as two hex digits) of every
//! byte before the `*`. CRC-8 rather than NMEA's XOR because XOR cannot see two swapped characters
//! (`21.53` vs `21.35`) or a pair of identical corrupted bytes, while CRC-8 catches every burst of
//! up to 8 bits and every odd number of bit errors for the same two hex digits of overhead and
//! a dozen lines of firmware.
//!
//! [`LineDecoder`] turns arbitrary byte chunks, as a tty delivers them, into lines with a bound on
//! line length; [`parse_line`] turns one line into readings; [`SerialLineReader`] joins the two
//! and is what the serial shell drives.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{excerpt, parse_number_text, KeyPieces, NumberText, ReadingSink};

/// Default bound on one line, terminator excluded.
pub const DEFAULT_MAX_LINE_BYTES: usize = 512;
/// Longest device id or metric name accepted.
pub const MAX_NAME_BYTES: usize = 64;

/// CRC-8 with polynomial 0x07, initial value 0, no reflection (CRC-8/SMBUS; check value of
/// `123456789` is 0xF4).
pub fn crc8(bytes: &[u8]) -> u8 {
    let mut crc = 0u8;
    for &byte in bytes {
        crc ^= byte;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x07
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Why a line (or what should have been one) produced no readings.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SerialLineError {
    #[error("line longer than max_line_bytes = {max_line_bytes} discarded ({discarded_bytes} bytes up to the next newline); check the baud rate and framing, or raise the limit")]
    LineTooLong {
        discarded_bytes: u64,
        max_line_bytes: usize,
    },
    #[error("partial line `{text}` (the port opened or closed mid-line); skipped")]
    PartialLine { text: String },
    #[error("checksum mismatch: line says {received:02X}, bytes before `*` give {computed:02X}; noise on the line or a wrong baud rate")]
    BadChecksum { received: u8, computed: u8 },
    #[error("line has no `*XX` checksum and require_checksum is set")]
    MissingChecksum,
    #[error("garbage at byte {byte_offset}: {detail}")]
    Garbage {
        byte_offset: usize,
        detail: &'static str,
    },
    #[error("{metric}: expected a number, found `{found}`")]
    NotANumber { metric: String, found: String },
    #[error("{metric}: NaN and infinite values are rejected")]
    NanOrInf { metric: String },
    #[error("`t={found}` is not a time in ms since the Unix epoch")]
    BadTimestamp { found: String },
}

impl SerialLineError {
    /// Every label [`SerialLineError::reason`] can return.
    pub const REASONS: &'static [&'static str] = &[
        "line_too_long",
        "partial_line",
        "bad_checksum",
        "missing_checksum",
        "garbage",
        "not_a_number",
        "nan_or_inf",
        "bad_timestamp",
    ];

    /// A stable label for the rejected-lines metric.
    pub fn reason(&self) -> &'static str {
        match self {
            SerialLineError::LineTooLong { .. } => "line_too_long",
            SerialLineError::PartialLine { .. } => "partial_line",
            SerialLineError::BadChecksum { .. } => "bad_checksum",
            SerialLineError::MissingChecksum => "missing_checksum",
            SerialLineError::Garbage { .. } => "garbage",
            SerialLineError::NotANumber { .. } => "not_a_number",
            SerialLineError::NanOrInf { .. } => "nan_or_inf",
            SerialLineError::BadTimestamp { .. } => "bad_timestamp",
        }
    }
}

/// Line-protocol settings of one serial source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SerialLineOptions {
    /// Longer lines are discarded up to the next newline and counted (`line_too_long`).
    pub max_line_bytes: usize,
    /// Reject lines without `*XX` (`missing_checksum`). Turn off only for sensors that cannot
    /// compute a CRC; the line then has no integrity check at all.
    pub require_checksum: bool,
}

impl Default for SerialLineOptions {
    fn default() -> Self {
        Self {
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            require_checksum: true,
        }
    }
}

/// Counters a metrics layer can read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineDecoderStats {
    pub bytes_in: u64,
    pub lines_out: u64,
    pub lines_too_long: u64,
}

/// A complete line, terminator removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawLine<'a> {
    pub bytes: &'a [u8],
    /// The first line after the stream (re)started: it may have begun before we were listening.
    pub first_after_start: bool,
}

/// Splits a byte stream into lines at `\n` (a `\r` before it is removed), with a length bound.
///
/// Usage: [`push`](Self::push) each chunk read from the tty, then call
/// [`next_line`](Self::next_line) until it returns `None`. Memory stays at most
/// `max_line_bytes` plus one chunk: an over-long line is dropped as soon as it is known to be too
/// long, the decoder skips to the next newline, and reports it once as `LineTooLong`.
#[derive(Debug)]
pub struct LineDecoder {
    buffer: Vec<u8>,
    /// Bytes at the front of `buffer` already handed out.
    consumed: usize,
    /// `buffer[consumed..scanned]` holds no newline (saves rescanning on every push).
    scanned: usize,
    max_line_bytes: usize,
    /// `Some(bytes so far)` while skipping the rest of an over-long line.
    discarding: Option<u64>,
    at_start: bool,
    stats: LineDecoderStats,
}

impl LineDecoder {
    pub fn new(max_line_bytes: usize) -> Self {
        Self {
            buffer: Vec::new(),
            consumed: 0,
            scanned: 0,
            max_line_bytes,
            discarding: None,
            at_start: true,
            stats: LineDecoderStats::default(),
        }
    }

    pub fn stats(&self) -> LineDecoderStats {
        self.stats
    }

    /// Bytes held for lines not yet complete or not yet handed out.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len() - self.consumed
    }

    /// Appends bytes read from the port.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.consumed > 0 {
            self.buffer.drain(..self.consumed);
            self.scanned -= self.consumed;
            self.consumed = 0;
        }
        self.stats.bytes_in += chunk.len() as u64;
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete line, a `LineTooLong` report, or `None` when more bytes are needed.
    pub fn next_line(&mut self) -> Option<Result<RawLine<'_>, SerialLineError>> {
        let newline = self
            .buffer
            .get(self.scanned..)?
            .iter()
            .position(|&byte| byte == b'\n');
        let Some(relative) = newline else {
            self.scanned = self.buffer.len();
            let pending = self.buffer.len() - self.consumed;
            if let Some(discarded) = self.discarding.as_mut() {
                *discarded += pending as u64;
                self.buffer.clear();
                self.consumed = 0;
                self.scanned = 0;
            } else if pending > self.max_line_bytes + 1 {
                // (+1: a `\r` may still be followed by its `\n`.)
                self.discarding = Some(pending as u64);
                self.buffer.clear();
                self.consumed = 0;
                self.scanned = 0;
            }
            return None;
        };
        let end = self.scanned + relative;
        let start = self.consumed;
        self.consumed = end + 1;
        self.scanned = self.consumed;
        let first_after_start = std::mem::replace(&mut self.at_start, false);
        if let Some(discarded) = self.discarding.take() {
            self.stats.lines_too_long += 1;
            return Some(Err(SerialLineError::LineTooLong {
                discarded_bytes: discarded + (end - start) as u64,
                max_line_bytes: self.max_line_bytes,
            }));
        }
        let line = self.buffer.get(start..end)?;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > self.max_line_bytes {
            self.stats.lines_too_long += 1;
            return Some(Err(SerialLineError::LineTooLong {
                discarded_bytes: line.len() as u64,
                max_line_bytes: self.max_line_bytes,
            }));
        }
        self.stats.lines_out += 1;
        Some(Ok(RawLine {
            bytes: line,
            first_after_start,
        }))
    }

    /// The stream ended (port closed or unplugged): reports what was left unterminated, and
    /// prepares for a new stream whose first line may be partial.
    pub fn finish(&mut self) -> Option<SerialLineError> {
        let leftover = self.buffer.get(self.consumed..).unwrap_or(&[]);
        let report = if let Some(discarded) = self.discarding.take() {
            self.stats.lines_too_long += 1;
            Some(SerialLineError::LineTooLong {
                discarded_bytes: discarded + leftover.len() as u64,
                max_line_bytes: self.max_line_bytes,
            })
        } else if leftover.iter().any(|byte| !byte.is_ascii_whitespace()) {
            Some(SerialLineError::PartialLine {
                text: excerpt(&String::from_utf8_lossy(leftover)),
            })
        } else {
            None
        };
        self.reset();
        report
    }

    /// Drops buffered bytes without reporting them; the next line may be partial.
    pub fn reset(&mut self) {
        self.buffer.clear();
        self.consumed = 0;
        self.scanned = 0;
        self.discarding = None;
        self.at_start = true;
    }
}

fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.' | b':')
}

/// Parses one line (terminator already removed) into readings appended to `out`.
///
/// Returns the number of readings; `Ok(0)` for blank lines and `#` comments, which devices may
/// print (boot banners) and which are not errors. On error nothing is appended.
pub fn parse_line(
    line: &[u8],
    options: &SerialLineOptions,
    out: &mut impl ReadingSink,
) -> Result<usize, SerialLineError> {
    let start_len = out.reading_count();
    let result = parse_line_inner(line, options, out);
    if result.is_err() {
        out.truncate_readings(start_len);
    }
    result.map(|()| out.reading_count() - start_len)
}

fn parse_line_inner(
    line: &[u8],
    options: &SerialLineOptions,
    out: &mut dyn ReadingSink,
) -> Result<(), SerialLineError> {
    let trimmed_end = line
        .iter()
        .rposition(|byte| !byte.is_ascii_whitespace())
        .map_or(0, |index| index + 1);
    let line = &line[..trimmed_end];
    let first = line.iter().position(|byte| !byte.is_ascii_whitespace());
    match first {
        None => return Ok(()),
        Some(index) if line.get(index) == Some(&b'#') => return Ok(()),
        Some(_) => {}
    }
    let body = match line.iter().rposition(|&byte| byte == b'*') {
        Some(star) => {
            let (body, checksum) = line.split_at(star);
            let digits = checksum.get(1..).unwrap_or(&[]);
            let received = std::str::from_utf8(digits)
                .ok()
                .filter(|text| text.len() == 2)
                .and_then(|text| u8::from_str_radix(text, 16).ok())
                .ok_or(SerialLineError::Garbage {
                    byte_offset: star,
                    detail: "`*` must be followed by exactly two hex digits",
                })?;
            let computed = crc8(body);
            if received != computed {
                return Err(SerialLineError::BadChecksum { received, computed });
            }
            body
        }
        None if options.require_checksum => return Err(SerialLineError::MissingChecksum),
        None => line,
    };
    if let Some(offset) = body
        .iter()
        .position(|&byte| !(byte == b' ' || byte == b'\t' || byte.is_ascii_graphic()))
    {
        return Err(SerialLineError::Garbage {
            byte_offset: offset,
            detail: "non-printable or non-ASCII byte",
        });
    }
    // Printable ASCII only from here on, so the body is valid UTF-8.
    let text = std::str::from_utf8(body).map_err(|error| SerialLineError::Garbage {
        byte_offset: error.valid_up_to(),
        detail: "not UTF-8",
    })?;
    let mut tokens = text.split_ascii_whitespace();
    let device = tokens.next().ok_or(SerialLineError::Garbage {
        byte_offset: 0,
        detail: "empty line before `*`",
    })?;
    if device.len() > MAX_NAME_BYTES || !device.bytes().all(is_name_byte) {
        return Err(SerialLineError::Garbage {
            byte_offset: 0,
            detail: "device id must be 1-64 of A-Z a-z 0-9 _ - . :",
        });
    }
    let mut time_ms = None;
    let first_reading = out.reading_count();
    for token in tokens {
        let byte_offset = token.as_ptr() as usize - text.as_ptr() as usize;
        let Some((name, value)) = token.split_once('=') else {
            return Err(SerialLineError::Garbage {
                byte_offset,
                detail: "expected metric=value",
            });
        };
        if name == "t" {
            let parsed = value.parse::<i64>().ok().filter(|time| *time >= 0);
            let Some(parsed) = parsed else {
                return Err(SerialLineError::BadTimestamp {
                    found: excerpt(value),
                });
            };
            time_ms = Some(parsed);
            continue;
        }
        if name.is_empty() || name.len() > MAX_NAME_BYTES || !name.bytes().all(is_name_byte) {
            return Err(SerialLineError::Garbage {
                byte_offset,
                detail: "metric name must be 1-64 of A-Z a-z 0-9 _ - . :",
            });
        }
        let number = match parse_number_text(value) {
            NumberText::Finite(number) if !value.is_empty() => number,
            NumberText::NanOrInf => {
                return Err(SerialLineError::NanOrInf {
                    metric: name.to_owned(),
                })
            }
            _ => {
                return Err(SerialLineError::NotANumber {
                    metric: name.to_owned(),
                    found: excerpt(value),
                })
            }
        };
        out.push_reading(
            KeyPieces {
                device_id: device,
                metric_prefix: "",
                metric_name: name,
                tag_groups: [&[], &[]],
            },
            None,
            number,
        );
    }
    if out.reading_count() == first_reading {
        return Err(SerialLineError::Garbage {
            byte_offset: device.len(),
            detail: "no metric=value pair",
        });
    }
    out.set_time_from(first_reading, time_ms);
    Ok(())
}

/// A [`LineDecoder`] and [`parse_line`] together: push chunks from the tty, pull readings.
///
/// A line that fails to parse right after the stream (re)started is reported as
/// `partial_line`, not as garbage or a bad checksum: it most likely began before the port was
/// opened.
#[derive(Debug)]
pub struct SerialLineReader {
    decoder: LineDecoder,
    options: SerialLineOptions,
}

impl SerialLineReader {
    pub fn new(options: SerialLineOptions) -> Self {
        Self {
            decoder: LineDecoder::new(options.max_line_bytes),
            options,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.decoder.push(chunk);
    }

    /// Parses the next line's readings into `out`: `Some(Ok(n))` with `n >= 1`, `Some(Err(_))`
    /// for a rejected line (count it by reason and keep going), `None` when more bytes are needed.
    /// Blank and comment lines are skipped.
    pub fn next_readings(
        &mut self,
        out: &mut impl ReadingSink,
    ) -> Option<Result<usize, SerialLineError>> {
        loop {
            let line = match self.decoder.next_line()? {
                Ok(line) => line,
                Err(error) => return Some(Err(error)),
            };
            match parse_line(line.bytes, &self.options, out) {
                Ok(0) => continue,
                Ok(count) => return Some(Ok(count)),
                Err(_) if line.first_after_start => {
                    return Some(Err(SerialLineError::PartialLine {
                        text: excerpt(&String::from_utf8_lossy(line.bytes)),
                    }))
                }
                Err(error) => return Some(Err(error)),
            }
        }
    }

    /// The port closed: reports an unterminated last line, if any. The next stream starts fresh.
    pub fn finish(&mut self) -> Option<SerialLineError> {
        self.decoder.finish()
    }

    pub fn stats(&self) -> LineDecoderStats {
        self.decoder.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc8_check_value() {
        assert_eq!(crc8(b"123456789"), 0xF4);
    }
}
