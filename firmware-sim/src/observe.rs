//! Reading what the store holds through the collector's query API, as ledger windows.
//!
//! Why through the API and not the tables: the same check then works for the embedded
//! store and ClickHouse, and it exercises the path operators use. The store keeps one
//! rollup per (agent, series with its tags, window); the ledger names a series by device
//! and metric. A device speaks through one gateway with one tag set, but should several
//! rows share a ledger key they are merged exactly as summaries merge (a reading stored
//! twice would then show up as a count too high, which is what the check must catch).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::cluster::http_get;
use crate::ledger::WindowStats;

/// The series the API lists.
#[derive(Debug, Deserialize)]
struct SeriesList {
    series: Vec<SeriesEntry>,
}

#[derive(Debug, Deserialize)]
struct SeriesEntry {
    selector: String,
}

#[derive(Debug, Deserialize)]
struct RangeAnswer {
    windows: Vec<WindowEntry>,
}

#[derive(Debug, Deserialize)]
struct WindowEntry {
    device_id: String,
    metric: String,
    window_start_ms: i64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first_time_ms: i64,
    first_value: f64,
    last_time_ms: i64,
    last_value: f64,
}

/// Series named per range request (the API's limit is 100).
const SERIES_PER_REQUEST: usize = 50;

/// Percent-encodes a query parameter value (everything but RFC 3986 unreserved characters).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn get_json<T: for<'de> Deserialize<'de>>(api: SocketAddr, path: &str) -> anyhow::Result<T> {
    let (status, body) = http_get(api, path)?;
    if status != 200 {
        bail!("GET {path} answered {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET {path}: unexpected answer {body}"))
}

/// Every window at `resolution_ms` starting in `[from_ms, to_ms)` of every series the store
/// knows, keyed and merged as the ledger keys them.
pub fn observed_windows(
    api: SocketAddr,
    resolution_ms: i64,
    from_ms: i64,
    to_ms: i64,
) -> anyhow::Result<Vec<WindowStats>> {
    let series: SeriesList = get_json(api, "/api/v1/series")?;
    let mut merged: BTreeMap<(String, String, i64), (WindowStats, i64, i64)> = BTreeMap::new();
    for chunk in series.series.chunks(SERIES_PER_REQUEST) {
        let mut path =
            format!("/api/v1/range?resolution_ms={resolution_ms}&from_ms={from_ms}&to_ms={to_ms}");
        for entry in chunk {
            path.push_str("&series=");
            path.push_str(&encode_query_value(&entry.selector));
        }
        let answer: RangeAnswer = get_json(api, &path)?;
        for window in answer.windows {
            let key = (
                window.device_id.clone(),
                window.metric.clone(),
                window.window_start_ms,
            );
            match merged.get_mut(&key) {
                None => {
                    merged.insert(
                        key,
                        (
                            WindowStats {
                                device: window.device_id,
                                metric: window.metric,
                                window_start_ms: window.window_start_ms,
                                window_ms: resolution_ms,
                                count: window.count,
                                sum: window.sum,
                                min: window.min,
                                max: window.max,
                                first: window.first_value,
                                last: window.last_value,
                                duplicate_copies: 0,
                            },
                            window.first_time_ms,
                            window.last_time_ms,
                        ),
                    );
                }
                Some((stats, first_time_ms, last_time_ms)) => {
                    stats.count += window.count;
                    stats.sum += window.sum;
                    stats.min = stats.min.min(window.min);
                    stats.max = stats.max.max(window.max);
                    if window.first_time_ms < *first_time_ms {
                        *first_time_ms = window.first_time_ms;
                        stats.first = window.first_value;
                    }
                    if window.last_time_ms > *last_time_ms {
                        *last_time_ms = window.last_time_ms;
                        stats.last = window.last_value;
                    }
                }
            }
        }
    }
    Ok(merged.into_values().map(|(stats, _, _)| stats).collect())
}

/// Parses `http://HOST:PORT[/]` (the collector's API address) into a socket address.
pub fn parse_api_url(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.parse().with_context(|| {
        format!("--store must be the query API's http://IP:PORT (loopback), got `{url}`")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded_once() {
        assert_eq!(
            encode_query_value("dev%2F1/temp/site=a,b"),
            "dev%252F1%2Ftemp%2Fsite%3Da%2Cb"
        );
    }

    #[test]
    fn api_urls_parse_to_socket_addresses() {
        assert_eq!(
            parse_api_url("http://127.0.0.1:8080/").ok(),
            Some(SocketAddr::from(([127, 0, 0, 1], 8080)))
        );
        assert!(parse_api_url("http://localhost:8080").is_err());
    }
}
