//! Encoding readings the way real sensors send them: the four MQTT payload formats the agent
//! reads and the serial line protocol (`docs/serial-protocol.md`).
//!
//! This is the encoder side only and deliberately does not share code with the agent's parsers:
//! the tests feed what is written here to the agent's parsers, so a drift in either is caught.
//! Values are printed with Rust's shortest round-trip formatting, so the agent parses back
//! exactly the f64 the ledger recorded.

use std::fmt::Write as _;

/// The MQTT payload formats, named as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MessageFormat {
    /// One number per message on `site/{site}/dev/{device}/{metric}`; no device time.
    Plain,
    /// `{"temperature":21.5,...,"ts":<ms>}` on `site/{site}/dev/{device}`.
    Json,
    /// SenML JSON (RFC 8428) with `bt` in seconds on `site/{site}/dev/{device}`.
    Senml,
    /// InfluxDB line protocol, measurement `fleet`, ns timestamps, on `site/{site}/dev/{device}`.
    Line,
}

/// The JSON field carrying the device time in ms (agent config: `timestamp_field = "ts"`).
pub const JSON_TIMESTAMP_FIELD: &str = "ts";
/// The line protocol measurement; the agent names the metric `fleet.<field>`.
pub const LINE_MEASUREMENT: &str = "fleet";

impl MessageFormat {
    /// The metric name the agent derives for `metric` in this format.
    pub fn agent_metric_name(self, metric: &str) -> String {
        match self {
            MessageFormat::Line => format!("{LINE_MEASUREMENT}.{metric}"),
            _ => metric.to_owned(),
        }
    }

    /// Whether messages carry a device time at all (plain payloads cannot).
    pub fn carries_device_time(self) -> bool {
        !matches!(self, MessageFormat::Plain)
    }

    /// The agent topic template that reads this format.
    pub fn topic_template(self) -> &'static str {
        match self {
            MessageFormat::Plain => "site/{site}/dev/{device}/{metric}",
            _ => "site/{site}/dev/{device}",
        }
    }
}

/// One MQTT message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttMessage {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The device topic for multi-metric formats.
pub fn device_topic(site: &str, device: &str) -> String {
    format!("site/{site}/dev/{device}")
}

/// Encodes one device's readings of one instant as the messages of `format`.
/// `time_ms` is the device's idea of the time (possibly skewed or unset).
pub fn encode_messages(
    format: MessageFormat,
    site: &str,
    device: &str,
    time_ms: i64,
    readings: &[(&str, f64)],
) -> Vec<MqttMessage> {
    let topic = device_topic(site, device);
    match format {
        MessageFormat::Plain => readings
            .iter()
            .map(|(metric, value)| MqttMessage {
                topic: format!("{topic}/{metric}"),
                payload: format!("{value}").into_bytes(),
            })
            .collect(),
        MessageFormat::Json => {
            let mut payload = String::from("{");
            for (metric, value) in readings {
                let _ = write!(payload, "\"{metric}\":{value},");
            }
            let _ = write!(payload, "\"{JSON_TIMESTAMP_FIELD}\":{time_ms}}}");
            vec![MqttMessage {
                topic,
                payload: payload.into_bytes(),
            }]
        }
        MessageFormat::Senml => {
            let mut payload = String::from("[");
            for (index, (metric, value)) in readings.iter().enumerate() {
                if index == 0 {
                    let seconds = time_ms.div_euclid(1000);
                    let millis = time_ms.rem_euclid(1000);
                    let _ = write!(
                        payload,
                        "{{\"bt\":{seconds}.{millis:03},\"n\":\"{metric}\",\"v\":{value}}}"
                    );
                } else {
                    let _ = write!(payload, ",{{\"n\":\"{metric}\",\"v\":{value}}}");
                }
            }
            payload.push(']');
            vec![MqttMessage {
                topic,
                payload: payload.into_bytes(),
            }]
        }
        MessageFormat::Line => {
            let fields: Vec<String> = readings
                .iter()
                .map(|(metric, value)| format!("{metric}={value}"))
                .collect();
            let time_ns = i128::from(time_ms) * 1_000_000;
            let payload = format!("{LINE_MEASUREMENT} {} {time_ns}", fields.join(","));
            vec![MqttMessage {
                topic,
                payload: payload.into_bytes(),
            }]
        }
    }
}

/// A malformed message for `format` and the reason label the agent rejects it with.
pub fn malformed_message(
    format: MessageFormat,
    site: &str,
    device: &str,
    metric: &str,
) -> (MqttMessage, &'static str) {
    let topic = device_topic(site, device);
    match format {
        MessageFormat::Plain => (
            MqttMessage {
                topic: format!("{topic}/{metric}"),
                payload: b"twenty-one".to_vec(),
            },
            "not_a_number",
        ),
        MessageFormat::Json => (
            MqttMessage {
                topic,
                payload: format!("{{\"{metric}\":21.5,").into_bytes(),
            },
            "json_syntax",
        ),
        MessageFormat::Senml => (
            MqttMessage {
                topic,
                payload: format!("[{{\"n\":\"{metric}\",\"v\":").into_bytes(),
            },
            "json_syntax",
        ),
        MessageFormat::Line => (
            MqttMessage {
                topic,
                payload: format!("{LINE_MEASUREMENT} {metric}=abc").into_bytes(),
            },
            "not_a_number",
        ),
    }
}

/// CRC-8/SMBUS (polynomial 0x07, init 0, no reflection, no final XOR), as the serial protocol
/// specifies.
pub fn crc8(bytes: &[u8]) -> u8 {
    let mut crc = 0u8;
    for byte in bytes {
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

/// One serial record: `dev-7 temp=21.53 hum=40.1 t=1764284000123 *XX\r\n`. `time_ms = None`
/// omits the `t=` field.
pub fn serial_line(device: &str, time_ms: Option<i64>, readings: &[(&str, f64)]) -> Vec<u8> {
    let mut line = String::from(device);
    for (metric, value) in readings {
        let _ = write!(line, " {metric}={value}");
    }
    if let Some(time_ms) = time_ms {
        let _ = write!(line, " t={time_ms}");
    }
    line.push(' ');
    let checksum = crc8(line.as_bytes());
    let _ = write!(line, "*{checksum:02X}\r\n");
    line.into_bytes()
}

/// A valid-looking serial line with a wrong checksum (the agent rejects it as `bad_checksum`).
pub fn serial_line_with_bad_checksum(
    device: &str,
    time_ms: i64,
    readings: &[(&str, f64)],
) -> Vec<u8> {
    let mut line = serial_line(device, Some(time_ms), readings);
    // The two hex digits sit before "\r\n"; flip the checksum's lowest bit.
    let digits_at = line.len().saturating_sub(4);
    if let Some(digits) = line.get(digits_at..digits_at + 2) {
        let text = String::from_utf8_lossy(digits).into_owned();
        if let Ok(checksum) = u8::from_str_radix(&text, 16) {
            let corrupted = format!("{:02X}", checksum ^ 0x01);
            line.splice(digits_at..digits_at + 2, corrupted.into_bytes());
        }
    }
    line
}

/// Line noise: control and high bytes with a valid checksum, so the agent rejects it as
/// `garbage` (not a record) rather than for its checksum.
pub fn serial_garbage(noise: &[u8]) -> Vec<u8> {
    // A leading control byte: the line can neither parse by accident nor pass as a `#` comment.
    let mut line = vec![0x01];
    line.extend(noise.iter().map(|byte| {
        if *byte == b'\n' || *byte == b'\r' {
            0x07
        } else {
            *byte
        }
    }));
    line.push(b' ');
    let checksum = crc8(&line);
    line.extend_from_slice(format!("*{checksum:02X}\r\n").as_bytes());
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc8_matches_the_catalogue_check_value() {
        assert_eq!(crc8(b"123456789"), 0xF4);
    }

    #[test]
    fn serial_line_has_the_documented_shape() {
        let line = serial_line(
            "dev-7",
            Some(1_764_284_000_123),
            &[("temp", 21.53), ("hum", 40.1)],
        );
        let text = String::from_utf8(line).unwrap();
        assert!(
            text.starts_with("dev-7 temp=21.53 hum=40.1 t=1764284000123 *"),
            "{text}"
        );
        assert!(text.ends_with("\r\n"));
        let star = text.find('*').unwrap();
        assert_eq!(
            u8::from_str_radix(&text[star + 1..star + 3], 16).unwrap(),
            crc8(&text.as_bytes()[..star])
        );
    }

    #[test]
    fn formats_put_time_where_the_agent_looks() {
        let json = encode_messages(MessageFormat::Json, "s", "d", 1500, &[("a", 1.5)]);
        assert_eq!(json[0].payload, b"{\"a\":1.5,\"ts\":1500}");
        let senml = encode_messages(
            MessageFormat::Senml,
            "s",
            "d",
            1500,
            &[("a", 1.5), ("b", -2.0)],
        );
        assert_eq!(
            senml[0].payload,
            b"[{\"bt\":1.500,\"n\":\"a\",\"v\":1.5},{\"n\":\"b\",\"v\":-2}]"
        );
        let line = encode_messages(MessageFormat::Line, "s", "d", 1500, &[("a", 1.5)]);
        assert_eq!(line[0].payload, b"fleet a=1.5 1500000000");
        let plain = encode_messages(
            MessageFormat::Plain,
            "s",
            "d",
            1500,
            &[("a", 1.5), ("b", 2.0)],
        );
        assert_eq!(plain.len(), 2);
        assert_eq!(plain[1].topic, "site/s/dev/d/b");
    }
}
