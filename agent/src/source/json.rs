//! JSON-object payloads, parsed in one streaming pass with serde_json.
//!
//! The document is never built as a `serde_json::Value`: a visitor walks the object and appends
//! readings as it meets numeric fields, so the only allocations are the metric names we must own.
//! Typed rejections raised inside the visitor are parked in the parse state and returned instead
//! of serde's own error.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::excerpt;
use super::payload::{Emitter, PayloadError, PayloadOptions, TimeUnit};

/// Deepest object nesting accepted in a JSON payload (the top-level object is depth 1).
pub const MAX_JSON_DEPTH: usize = 8;

/// What the first significant byte of a document says it is, for "expected an object" messages.
pub(crate) fn json_kind(text: &str) -> &'static str {
    match text.trim_start().as_bytes().first() {
        Some(b'{') => "a JSON object",
        Some(b'[') => "a JSON array",
        Some(b'"') => "a JSON string",
        Some(b't' | b'f') => "a JSON boolean",
        Some(b'n') => "JSON null",
        Some(b'-' | b'0'..=b'9') => "a JSON number",
        None => "empty",
        Some(_) => "not JSON",
    }
}

pub(crate) fn syntax_error(error: &serde_json::Error) -> PayloadError {
    PayloadError::JsonSyntax {
        line: error.line(),
        column: error.column(),
        detail: error.to_string(),
    }
}

/// An object key, borrowed from the payload unless it contained escapes.
pub(crate) struct Key<'de>(pub(crate) Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(value)))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(value.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Any JSON value reduced to what a numeric parser cares about. Arrays and objects are consumed
/// and reported as `Compound`.
#[derive(Debug)]
pub(crate) enum Scalar<'de> {
    Integer(i128),
    Float(f64),
    Text(Cow<'de, str>),
    Bool(bool),
    Null,
    Compound(&'static str),
}

impl Scalar<'_> {
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match *self {
            Scalar::Integer(value) => Some(value as f64),
            Scalar::Float(value) => Some(value),
            _ => None,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Scalar::Integer(value) => value.to_string(),
            Scalar::Float(value) => value.to_string(),
            Scalar::Text(text) => format!("string \"{}\"", excerpt(text)),
            Scalar::Bool(value) => format!("boolean {value}"),
            Scalar::Null => "null".to_owned(),
            Scalar::Compound(kind) => (*kind).to_owned(),
        }
    }

    pub(crate) fn to_ms(&self, unit: TimeUnit) -> Option<i64> {
        match *self {
            Scalar::Integer(value) => unit.integer_to_ms(value),
            Scalar::Float(value) => unit.float_to_ms(value),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(value))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Integer(value.into()))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Integer(value.into()))
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Float(value))
            }
            fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Text(Cow::Borrowed(value)))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Text(Cow::Owned(value.to_owned())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Compound("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Compound("an object"))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct JsonState<'s, 'o, 'f> {
    options: &'s PayloadOptions,
    emitter: &'s mut Emitter<'o, 'f>,
    /// The dotted path of the field being visited (the metric name under construction).
    path: String,
    time_ms: Option<i64>,
    failure: Option<PayloadError>,
}

impl JsonState<'_, '_, '_> {
    /// Parks a typed rejection and returns the serde error that unwinds the parse.
    fn fail<E: de::Error>(&mut self, error: PayloadError) -> E {
        self.failure = Some(error);
        E::custom("payload rejected")
    }

    fn number<E: de::Error>(&mut self, value: f64) -> Result<(), E> {
        let path = std::mem::take(&mut self.path);
        let result = self.emitter.push(&path, &[], None, value, &path);
        self.path = path;
        result.map_err(|error| self.fail(error))
    }

    fn non_numeric<E: de::Error>(&mut self, found: String) -> Result<(), E> {
        if self.options.skip_non_numeric {
            return Ok(());
        }
        let error = PayloadError::NotANumber {
            field: self.path.clone(),
            found,
        };
        Err(self.fail(error))
    }

    fn visit_object<'de, A: MapAccess<'de>>(
        &mut self,
        mut map: A,
        depth: usize,
    ) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key::<Key>()? {
            if depth == 1 && self.options.timestamp_field.as_deref() == Some(key.as_ref()) {
                let value = map.next_value::<Scalar>()?;
                let unit = self.options.timestamp_unit.unwrap_or(TimeUnit::Ms);
                match value.to_ms(unit) {
                    Some(time_ms) => self.time_ms = Some(time_ms),
                    None => {
                        let error = PayloadError::BadTimestamp {
                            field: key.into_owned(),
                            found: value.describe(),
                        };
                        return Err(self.fail(error));
                    }
                }
                continue;
            }
            let saved_len = self.path.len();
            if !self.path.is_empty() {
                self.path.push('.');
            }
            self.path.push_str(&key);
            map.next_value_seed(FieldSeed {
                state: &mut *self,
                depth,
            })?;
            self.path.truncate(saved_len);
        }
        Ok(())
    }
}

struct FieldSeed<'a, 's, 'o, 'f> {
    state: &'a mut JsonState<'s, 'o, 'f>,
    /// Depth of the object that holds this field.
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_, '_, '_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_, '_, '_, '_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a numeric field")
    }
    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        self.state.number(value)
    }
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        self.state.number(value as f64)
    }
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        self.state.number(value as f64)
    }
    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        if self.state.options.booleans_as_numbers {
            self.state.number(if value { 1.0 } else { 0.0 })
        } else {
            self.state.non_numeric(format!("boolean {value}"))
        }
    }
    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        self.state
            .non_numeric(format!("string \"{}\"", excerpt(value)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.state.non_numeric("null".to_owned())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.state.non_numeric("null".to_owned())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.state.non_numeric("an array".to_owned())?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        if self.depth >= MAX_JSON_DEPTH {
            let error = PayloadError::JsonTooDeep {
                field: self.state.path.clone(),
                max_depth: MAX_JSON_DEPTH,
            };
            return Err(self.state.fail(error));
        }
        self.state.visit_object(map, self.depth + 1)
    }
}

struct TopObject<'a, 's, 'o, 'f> {
    state: &'a mut JsonState<'s, 'o, 'f>,
}

impl<'de> Visitor<'de> for TopObject<'_, '_, '_, '_> {
    type Value = ();
    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.state.visit_object(map, 1)
    }
}

pub(crate) fn parse_json(
    text: &str,
    options: &PayloadOptions,
    emitter: &mut Emitter<'_, '_>,
) -> Result<(), PayloadError> {
    let kind = json_kind(text);
    if kind != "a JSON object" {
        if kind == "not JSON" {
            // Let serde_json describe the syntax error with its position.
            if let Err(error) = serde_json::from_str::<IgnoredAny>(text) {
                return Err(syntax_error(&error));
            }
        }
        return Err(PayloadError::JsonNotObject { found: kind });
    }
    let first_index = emitter.len();
    let mut state = JsonState {
        options,
        emitter,
        path: String::new(),
        time_ms: None,
        failure: None,
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let result = deserializer
        .deserialize_map(TopObject { state: &mut state })
        .and_then(|()| deserializer.end());
    if let Some(failure) = state.failure.take() {
        return Err(failure);
    }
    result.map_err(|error| syntax_error(&error))?;
    if let Some(time_ms) = state.time_ms {
        state.emitter.set_time_from(first_index, time_ms);
    }
    Ok(())
}
