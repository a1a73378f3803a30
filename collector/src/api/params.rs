//! Query parameters of the HTTP API, parsed and checked without IO.
//!
//! Why by hand rather than a derived deserializer: a client that sends a bad parameter must
//! be told which parameter was wrong and why (`from_ms: "abc" is not an integer`), and a
//! query string is untrusted input that must never panic or ask for unbounded work. Every
//! request is checked against limits here before the store sees it.
//!
//! Series are named in URLs by a *selector* string: `device_id/metric` or
//! `device_id/metric/tags`, where tags is the store's canonical rendering
//! (`name=value,...`, see `store::render_tags`). Inside each part `%` is written `%25` and
//! `/` is written `%2F`, so any device id, metric or tag survives the round trip. The API
//! returns the ready-made selector with every series, so clients rarely build one.

use crate::store::SeriesSelector;

/// Most series one request may name.
pub const MAX_SERIES_PER_REQUEST: usize = 100;
/// Most windows per series one rollup range may span (`(to_ms - from_ms) / resolution_ms`).
pub const MAX_WINDOWS_PER_SERIES: i64 = 100_000;
/// Widest raw range: one day.
pub const MAX_RAW_SPAN_MS: i64 = 86_400_000;
/// Widest late-count range: 400 days.
pub const MAX_LATE_SPAN_MS: i64 = 400 * 86_400_000;

/// A parameter that was missing, malformed or out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {reason}")]
pub struct ParamError {
    pub parameter: String,
    pub reason: String,
}

impl ParamError {
    pub fn new(parameter: &str, reason: impl Into<String>) -> Self {
        Self {
            parameter: parameter.to_string(),
            reason: reason.into(),
        }
    }
}

fn escape_part(text: &str, out: &mut String) {
    for character in text.chars() {
        match character {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            other => out.push(other),
        }
    }
}

fn unescape_part(part: &str) -> Option<String> {
    let mut out = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(index) = rest.find('%') {
        out.push_str(&rest[..index]);
        let escape = rest.get(index..index + 3)?;
        match escape {
            "%25" => out.push('%'),
            "%2F" | "%2f" => out.push('/'),
            _ => return None,
        }
        rest = &rest[index + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// The selector string of a series (see the module docs).
pub fn selector_string(device_id: &str, metric: &str, tags: &str) -> String {
    let mut text = String::with_capacity(device_id.len() + metric.len() + tags.len() + 2);
    escape_part(device_id, &mut text);
    text.push('/');
    escape_part(metric, &mut text);
    if !tags.is_empty() {
        text.push('/');
        escape_part(tags, &mut text);
    }
    text
}

/// Parses a selector string; `parameter` names it in the error.
pub fn parse_selector(parameter: &str, text: &str) -> Result<SeriesSelector, ParamError> {
    let shape = || {
        ParamError::new(
            parameter,
            format!(
                "{text:?} is not a series selector; write device_id/metric or device_id/metric/tags \
                 (with % as %25 and / as %2F inside a part)"
            ),
        )
    };
    let mut parts = text.split('/');
    let (Some(device), Some(metric)) = (parts.next(), parts.next()) else {
        return Err(shape());
    };
    let tags = parts.next().unwrap_or("");
    if parts.next().is_some() || device.is_empty() || metric.is_empty() {
        return Err(shape());
    }
    let decode = |part: &str| unescape_part(part).ok_or_else(shape);
    Ok(SeriesSelector {
        device_id: decode(device)?,
        metric: decode(metric)?,
        tags: decode(tags)?,
    })
}

/// The decoded query string, in order; repeated names allowed (`series=a&series=b`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryParams {
    pairs: Vec<(String, String)>,
}

impl QueryParams {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self { pairs }
    }

    /// Refuses names the endpoint does not know, so a typo (`form_ms`) is not ignored.
    pub fn only(&self, known: &[&str]) -> Result<(), ParamError> {
        match self
            .pairs
            .iter()
            .find(|(name, _)| !known.contains(&name.as_str()))
        {
            Some((name, _)) => Err(ParamError::new(
                name,
                format!(
                    "unknown parameter; this endpoint takes {}",
                    known.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    pub fn all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        let name = name.to_owned();
        self.pairs
            .iter()
            .filter(move |(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The single value of `name`, if given; an error when given twice.
    pub fn one(&self, name: &str) -> Result<Option<&str>, ParamError> {
        let mut values = self.all(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(ParamError::new(name, "given more than once"));
        }
        Ok(first)
    }

    pub fn integer(&self, name: &str) -> Result<Option<i64>, ParamError> {
        self.one(name)?
            .map(|text| {
                text.trim().parse::<i64>().map_err(|_| {
                    ParamError::new(
                        name,
                        format!("{text:?} is not an integer (milliseconds since the Unix epoch or a duration in ms)"),
                    )
                })
            })
            .transpose()
    }

    pub fn required_integer(&self, name: &str) -> Result<i64, ParamError> {
        self.integer(name)?
            .ok_or_else(|| ParamError::new(name, "required (an integer)"))
    }

    /// Every `series` parameter, parsed; at most [`MAX_SERIES_PER_REQUEST`].
    pub fn series(&self) -> Result<Vec<SeriesSelector>, ParamError> {
        let mut selectors: Vec<SeriesSelector> = Vec::new();
        for text in self.all("series") {
            if selectors.len() == MAX_SERIES_PER_REQUEST {
                return Err(ParamError::new(
                    "series",
                    format!(
                        "at most {MAX_SERIES_PER_REQUEST} series per request; split the request"
                    ),
                ));
            }
            let selector = parse_selector("series", text)?;
            if !selectors.contains(&selector) {
                selectors.push(selector);
            }
        }
        Ok(selectors)
    }

    /// Like [`Self::series`], for requests that need at least one series.
    pub fn required_series(&self) -> Result<Vec<SeriesSelector>, ParamError> {
        let series = self.series()?;
        if series.is_empty() {
            return Err(ParamError::new(
                "series",
                "required: name one or more series (series=device_id/metric)",
            ));
        }
        Ok(series)
    }
}

/// A half-open time range `[from_ms, to_ms)`. Answers over a range repeat it (flattened:
/// `from_ms`, `to_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TimeRange {
    pub from_ms: i64,
    pub to_ms: i64,
}

impl TimeRange {
    /// `from_ms` and `to_ms` from the query; `to_ms` must be after `from_ms` and the span at
    /// most `max_span_ms`.
    pub fn from_params(params: &QueryParams, max_span_ms: i64) -> Result<Self, ParamError> {
        let from_ms = params.required_integer("from_ms")?;
        let to_ms = params.required_integer("to_ms")?;
        if to_ms <= from_ms {
            return Err(ParamError::new(
                "to_ms",
                format!("{to_ms} is not after from_ms {from_ms}; the range is [from_ms, to_ms)"),
            ));
        }
        let span_ms = to_ms.saturating_sub(from_ms);
        if span_ms > max_span_ms {
            return Err(ParamError::new(
                "to_ms",
                format!(
                    "the range spans {span_ms} ms, more than the {max_span_ms} ms this endpoint allows; \
                     ask for a narrower range or a coarser resolution"
                ),
            ));
        }
        Ok(Self { from_ms, to_ms })
    }
}

/// A checked request for rollup windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    pub series: Vec<SeriesSelector>,
    pub resolution_ms: i64,
    pub range: TimeRange,
}

impl RangeRequest {
    /// `resolutions_ms`: what the store keeps; without `resolution_ms` the finest is used.
    pub fn parse(params: &QueryParams, resolutions_ms: &[i64]) -> Result<Self, ParamError> {
        params.only(&["series", "resolution_ms", "from_ms", "to_ms"])?;
        let series = params.required_series()?;
        let listed = || {
            resolutions_ms
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let resolution_ms = match params.integer("resolution_ms")? {
            Some(resolution_ms) if resolutions_ms.contains(&resolution_ms) => resolution_ms,
            Some(resolution_ms) => {
                return Err(ParamError::new(
                    "resolution_ms",
                    format!(
                        "the store keeps no {resolution_ms} ms rollups; choose one of: {}",
                        listed()
                    ),
                ))
            }
            None => resolutions_ms.iter().copied().min().ok_or_else(|| {
                ParamError::new(
                    "resolution_ms",
                    "the store keeps no rollups; use /api/v1/raw",
                )
            })?,
        };
        let max_span_ms = resolution_ms.saturating_mul(MAX_WINDOWS_PER_SERIES);
        let range = TimeRange::from_params(params, max_span_ms)?;
        Ok(Self {
            series,
            resolution_ms,
            range,
        })
    }
}

/// A checked request for raw readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRequest {
    pub series: Vec<SeriesSelector>,
    pub range: TimeRange,
}

impl RawRequest {
    pub fn parse(params: &QueryParams) -> Result<Self, ParamError> {
        params.only(&["series", "from_ms", "to_ms"])?;
        let series = params.required_series()?;
        let range = TimeRange::from_params(params, MAX_RAW_SPAN_MS)?;
        Ok(Self { series, range })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> QueryParams {
        QueryParams::new(
            pairs
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        )
    }

    #[test]
    fn selectors_round_trip_any_text() {
        for (device, metric, tags) in [
            ("dev-1", "temperature", ""),
            ("a/b", "m%25/x", "line=x%3D1%25,zone=a%2Cb"),
            ("d", "m", "k=v/w"),
        ] {
            let text = selector_string(device, metric, tags);
            let parsed = parse_selector("series", &text).expect("own selector parses");
            assert_eq!(
                (
                    parsed.device_id.as_str(),
                    parsed.metric.as_str(),
                    parsed.tags.as_str()
                ),
                (device, metric, tags),
                "{text}"
            );
        }
    }

    #[test]
    fn malformed_selectors_name_the_parameter() {
        for bad in [
            "", "dev-only", "/metric", "dev/", "a/b/c/d", "a%/b", "a%41/b",
        ] {
            let error = parse_selector("series", bad).expect_err(bad);
            assert_eq!(error.parameter, "series", "{bad}");
        }
    }

    #[test]
    fn range_requests_are_checked() {
        let resolutions = [60_000, 3_600_000];
        let good = params(&[("series", "d/m"), ("from_ms", "0"), ("to_ms", "60000")]);
        let request = RangeRequest::parse(&good, &resolutions).expect("valid");
        assert_eq!(request.resolution_ms, 60_000, "finest by default");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("from_ms", "0"), ("to_ms", "1")], "series"),
            (&[("series", "d/m"), ("to_ms", "1")], "from_ms"),
            (
                &[("series", "d/m"), ("from_ms", "x"), ("to_ms", "1")],
                "from_ms",
            ),
            (
                &[("series", "d/m"), ("from_ms", "5"), ("to_ms", "5")],
                "to_ms",
            ),
            (
                &[
                    ("series", "d/m"),
                    ("from_ms", "0"),
                    ("to_ms", "1"),
                    ("resolution_ms", "1000"),
                ],
                "resolution_ms",
            ),
            (
                &[
                    ("series", "d/m"),
                    ("from_ms", "0"),
                    ("to_ms", "99999999999"),
                ],
                "to_ms",
            ),
            (
                &[
                    ("series", "d/m"),
                    ("from_ms", "0"),
                    ("to_ms", "1"),
                    ("form_ms", "1"),
                ],
                "form_ms",
            ),
            (
                &[
                    ("series", "d/m"),
                    ("from_ms", "0"),
                    ("from_ms", "0"),
                    ("to_ms", "1"),
                ],
                "from_ms",
            ),
        ];
        for (pairs, parameter) in cases {
            let error = RangeRequest::parse(&params(pairs), &resolutions).expect_err("invalid");
            assert_eq!(error.parameter, *parameter, "{pairs:?}: {error}");
        }
    }

    #[test]
    fn too_many_series_are_refused() {
        let selectors: Vec<String> = (0..=MAX_SERIES_PER_REQUEST)
            .map(|index| format!("d{index}/m"))
            .collect();
        let mut pairs: Vec<(&str, &str)> = selectors
            .iter()
            .map(|text| ("series", text.as_str()))
            .collect();
        pairs.extend([("from_ms", "0"), ("to_ms", "1")]);
        let error = RawRequest::parse(&params(&pairs)).expect_err("too many");
        assert_eq!(error.parameter, "series");
    }
}
