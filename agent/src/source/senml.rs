//! SenML JSON payloads (RFC 8428), parsed in one streaming pass.
//!
//! Base fields (`bn`, `bt`, `bu`, `bv`) apply to the record they appear in and every later one
//! until replaced, as the RFC's resolution rules say. Times are seconds; resolved times below
//! 2^28 s are relative to "now", which for a sans-IO parser is the receive time passed in.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::json::{json_kind, syntax_error, Key, Scalar};
use super::payload::{Emitter, PayloadError, PayloadOptions, TimeUnit};

/// RFC 8428 section 4.5.3: resolved times below this many seconds are relative to now.
const RELATIVE_TIME_LIMIT_S: f64 = 268_435_456.0;

struct SenmlState<'s, 'o, 'f> {
    options: &'s PayloadOptions,
    emitter: &'s mut Emitter<'o, 'f>,
    receive_ms: i64,
    base_name: String,
    base_time_s: f64,
    base_unit: String,
    base_value: f64,
    record_index: usize,
    failure: Option<PayloadError>,
}

#[derive(Default)]
struct Record<'de> {
    name: Option<Cow<'de, str>>,
    unit: Option<Cow<'de, str>>,
    value: Option<f64>,
    bool_value: Option<bool>,
    has_text_value: bool,
    has_sum: bool,
    time_s: Option<f64>,
}

impl SenmlState<'_, '_, '_> {
    fn fail<E: de::Error>(&mut self, error: PayloadError) -> E {
        self.failure = Some(error);
        E::custom("payload rejected")
    }

    fn bad_field<E: de::Error>(&mut self, field: &str, expected: &'static str) -> E {
        let error = PayloadError::SenmlBadField {
            record_index: self.record_index,
            field: field.to_owned(),
            expected,
        };
        self.fail(error)
    }

    fn finish_record<E: de::Error>(&mut self, record: Record<'_>) -> Result<(), E> {
        let has_regular_field = record.name.is_some()
            || record.unit.is_some()
            || record.value.is_some()
            || record.bool_value.is_some()
            || record.has_text_value
            || record.has_sum
            || record.time_s.is_some();
        if !has_regular_field {
            // A record of base fields only: it sets context for the records after it.
            return Ok(());
        }
        let mut name = self.base_name.clone();
        if let Some(record_name) = &record.name {
            name.push_str(record_name);
        }
        if name.is_empty() {
            return Err(self.fail(PayloadError::SenmlMissingName {
                record_index: self.record_index,
            }));
        }
        let value = if let Some(value) = record.value {
            self.base_value + value
        } else if let Some(bool_value) = record.bool_value {
            if self.options.booleans_as_numbers {
                if bool_value {
                    1.0
                } else {
                    0.0
                }
            } else if self.options.skip_non_numeric {
                return Ok(());
            } else {
                let error = PayloadError::NotANumber {
                    field: name,
                    found: format!("boolean {bool_value}"),
                };
                return Err(self.fail(error));
            }
        } else if record.has_text_value && self.options.skip_non_numeric {
            return Ok(());
        } else if record.has_text_value {
            let error = PayloadError::NotANumber {
                field: name,
                found: "a string or data value".to_owned(),
            };
            return Err(self.fail(error));
        } else {
            let error = PayloadError::SenmlMissingValue {
                record_index: self.record_index,
                name,
            };
            return Err(self.fail(error));
        };
        let resolved_time_s = self.base_time_s + record.time_s.unwrap_or(0.0);
        let time_ms = if resolved_time_s == 0.0 {
            None
        } else if resolved_time_s.abs() < RELATIVE_TIME_LIMIT_S {
            TimeUnit::S
                .float_to_ms(resolved_time_s)
                .and_then(|offset_ms| self.receive_ms.checked_add(offset_ms))
        } else {
            TimeUnit::S.float_to_ms(resolved_time_s)
        };
        if resolved_time_s != 0.0 && time_ms.is_none() {
            let error = PayloadError::BadTimestamp {
                field: name,
                found: format!("{resolved_time_s} s"),
            };
            return Err(self.fail(error));
        }
        let unit = record.unit.as_deref().unwrap_or(&self.base_unit);
        let unit_tag = [("unit", unit)];
        let tags: &[(&str, &str)] = if self.options.senml_unit_as_tag && !unit.is_empty() {
            &unit_tag
        } else {
            &[]
        };
        let result = self.emitter.push(&name, tags, time_ms, value, &name);
        result.map_err(|error| self.fail(error))
    }
}

struct RecordSeed<'a, 's, 'o, 'f> {
    state: &'a mut SenmlState<'s, 'o, 'f>,
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_, '_, '_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_, '_, '_, '_> {
    type Value = ();
    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a SenML record object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let state = self.state;
        let mut record = Record::default();
        while let Some(Key(key)) = map.next_key::<Key>()? {
            let value = map.next_value::<Scalar>()?;
            let key = key.as_ref();
            match key {
                "bn" | "bu" | "n" | "u" | "vs" | "vd" => {
                    let Scalar::Text(text) = value else {
                        return Err(state.bad_field(key, "a string"));
                    };
                    match key {
                        "bn" => state.base_name = text.into_owned(),
                        "bu" => state.base_unit = text.into_owned(),
                        "n" => record.name = Some(text),
                        "u" => record.unit = Some(text),
                        _ => record.has_text_value = true,
                    }
                }
                "bt" | "bv" | "v" | "s" | "t" | "bver" | "ut" | "bs" => {
                    let Some(number) = value.as_f64() else {
                        return Err(state.bad_field(key, "a number"));
                    };
                    match key {
                        "bt" => state.base_time_s = number,
                        "bv" => state.base_value = number,
                        "v" => record.value = Some(number),
                        "s" => record.has_sum = true,
                        "t" => record.time_s = Some(number),
                        _ => {}
                    }
                }
                "vb" => {
                    let Scalar::Bool(flag) = value else {
                        return Err(state.bad_field(key, "a boolean"));
                    };
                    record.bool_value = Some(flag);
                }
                _ if key.ends_with('_') => {
                    let error = PayloadError::SenmlUnsupportedField {
                        record_index: state.record_index,
                        field: key.to_owned(),
                    };
                    return Err(state.fail(error));
                }
                _ => {}
            }
        }
        state.finish_record(record)
    }
}

struct Pack<'a, 's, 'o, 'f> {
    state: &'a mut SenmlState<'s, 'o, 'f>,
}

impl<'de> Visitor<'de> for Pack<'_, '_, '_, '_> {
    type Value = ();
    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a SenML array of records")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            if seq
                .next_element_seed(RecordSeed {
                    state: &mut *self.state,
                })?
                .is_none()
            {
                return Ok(());
            }
            self.state.record_index += 1;
        }
    }
}

pub(crate) fn parse_senml(
    text: &str,
    options: &PayloadOptions,
    receive_ms: i64,
    emitter: &mut Emitter<'_, '_>,
) -> Result<(), PayloadError> {
    let kind = json_kind(text);
    if kind != "a JSON array" {
        if kind == "not JSON" {
            if let Err(error) = serde_json::from_str::<de::IgnoredAny>(text) {
                return Err(syntax_error(&error));
            }
        }
        return Err(PayloadError::SenmlNotArray { found: kind });
    }
    let mut state = SenmlState {
        options,
        emitter,
        receive_ms,
        base_name: String::new(),
        base_time_s: 0.0,
        base_unit: String::new(),
        base_value: 0.0,
        record_index: 0,
        failure: None,
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let result = deserializer
        .deserialize_seq(Pack { state: &mut state })
        .and_then(|()| deserializer.end());
    if let Some(failure) = state.failure.take() {
        return Err(failure);
    }
    match result {
        Ok(()) => Ok(()),
        // The only typed deserialization inside a pack is "record is a map": a data error here
        // means a record was some other JSON value.
        Err(error) if error.classify() == serde_json::error::Category::Data => {
            Err(PayloadError::SenmlBadRecord {
                record_index: state.record_index,
            })
        }
        Err(error) => Err(syntax_error(&error)),
    }
}
