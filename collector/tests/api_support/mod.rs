//! Shared by the query API tests: an embedded store filled with known rows, a server on a
//! loopback port, and a small HTTP/1.1 client (the API is plain JSON over HTTP/1.1).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tributary_collector::api::{self, ApiState};
use tributary_collector::ingest::FleetView;
use tributary_collector::live::LiveFeed;
use tributary_collector::process::{LateItem, LateReading, LateReason, WindowResult};
use tributary_collector::store::{
    EmbeddedStore, EmbeddedStoreConfig, LastSeenRow, Queries, RawReadingRow, Store,
};
use tributary_protocol::summary::Summary;
use tributary_protocol::SeriesKey;

/// 2026-01-01T00:00:00Z
pub const T0: i64 = 1_767_225_600_000;
pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
/// "Now" for every test: ten minutes after T0.
pub const NOW_MS: i64 = T0 + 10 * MINUTE_MS;

pub struct Fixture {
    pub queries: Queries,
    pub _directory: tempfile::TempDir,
}

fn raw(
    agent: &str,
    seq: u64,
    position: u32,
    key: &SeriesKey,
    time_ms: i64,
    value: f64,
) -> RawReadingRow {
    RawReadingRow {
        agent_id: agent.into(),
        batch_seq: seq,
        position,
        device_id: key.device_id.clone(),
        metric: key.metric.clone(),
        tags: tributary_collector::store::render_tags(&key.tags),
        time_ms,
        value,
        flags: 0,
    }
}

fn window(
    agent: &str,
    key: &SeriesKey,
    resolution_ms: i64,
    start_ms: i64,
    readings: &[(i64, f64)],
    is_final: bool,
) -> WindowResult {
    let mut summary = Summary::empty();
    for (time_ms, value) in readings {
        summary.observe(*time_ms, *value);
    }
    let count = summary.count;
    WindowResult {
        agent_id: Arc::from(agent),
        series: Arc::new(key.clone()),
        resolution_ms,
        window_start_ms: start_ms,
        summary: Arc::new(summary),
        version: if is_final {
            count | tributary_collector::process::FINAL_VERSION_BIT
        } else {
            count
        },
        is_final,
    }
}

fn seen(kind: &str, agent: &str, device: &str, metric: &str, tags: &str, ms: i64) -> LastSeenRow {
    LastSeenRow {
        kind: kind.into(),
        agent_id: agent.into(),
        device_id: device.into(),
        metric: metric.into(),
        tags: tags.into(),
        last_seen_ms: ms as u64,
    }
}

pub fn temperature() -> SeriesKey {
    SeriesKey::new("d1", "temperature_c")
}

pub fn humidity() -> SeriesKey {
    SeriesKey::new("d1", "humidity_pct").with_tags([("zone", "north")])
}

pub fn pressure() -> SeriesKey {
    SeriesKey::new("d2", "pressure_hpa")
}

/// The known rows:
/// - d1/temperature_c from gw-1: raw 20.0 @T0+1s, 21.0 @T0+2s, 22.5 @T0+61s; 1 min windows
///   at T0 (final: 20, 21) and T0+1min (running: 22.5); the 1 h window at T0 (all three).
/// - d1/humidity_pct/zone=north from gw-1: raw 40 @T0+3s; 1 min window at T0.
/// - d2/pressure_hpa from gw-2: raw 1013.25 @T0+5s; 1 min window at T0.
/// - late: one reading of d1 (window_closed, 1 min) and one summary of 10 readings.
/// - last seen: d1 at T0+9min by gw-1, d2 at T0+8min by gw-2.
pub async fn fixture() -> Fixture {
    let directory = tempfile::tempdir().expect("temp dir");
    let mut store = EmbeddedStore::open(EmbeddedStoreConfig::new(
        directory.path().join("store"),
        vec![MINUTE_MS, HOUR_MS],
    ))
    .expect("open embedded store");
    let (t, h, p) = (temperature(), humidity(), pressure());
    store.write_raw_readings(
        vec![
            raw("gw-1", 1, 0, &t, T0 + 1_000, 20.0),
            raw("gw-1", 1, 1, &t, T0 + 2_000, 21.0),
            raw("gw-1", 1, 2, &h, T0 + 3_000, 40.0),
            raw("gw-1", 2, 0, &t, T0 + 61_000, 22.5),
            raw("gw-2", 1, 0, &p, T0 + 5_000, 1013.25),
        ],
        NOW_MS,
    );
    store
        .write_window_results(
            &[
                window(
                    "gw-1",
                    &t,
                    MINUTE_MS,
                    T0,
                    &[(T0 + 1_000, 20.0), (T0 + 2_000, 21.0)],
                    true,
                ),
                window(
                    "gw-1",
                    &t,
                    MINUTE_MS,
                    T0 + MINUTE_MS,
                    &[(T0 + 61_000, 22.5)],
                    false,
                ),
                window(
                    "gw-1",
                    &t,
                    HOUR_MS,
                    T0,
                    &[(T0 + 1_000, 20.0), (T0 + 2_000, 21.0), (T0 + 61_000, 22.5)],
                    false,
                ),
                window("gw-1", &h, MINUTE_MS, T0, &[(T0 + 3_000, 40.0)], false),
                window("gw-2", &p, MINUTE_MS, T0, &[(T0 + 5_000, 1013.25)], false),
            ],
            NOW_MS,
        )
        .expect("known resolutions");
    store.write_late_readings(
        &[
            LateReading {
                agent_id: Arc::from("gw-1"),
                batch_seq: 3,
                series: Arc::new(t.clone()),
                resolution_ms: Some(MINUTE_MS),
                window_start_ms: Some(T0),
                item: LateItem::Reading {
                    time_ms: T0 + 500,
                    value: 19.0,
                },
                reason: LateReason::WindowClosed,
            },
            LateReading {
                agent_id: Arc::from("gw-1"),
                batch_seq: 4,
                series: Arc::new(t.clone()),
                resolution_ms: Some(MINUTE_MS),
                window_start_ms: Some(T0),
                item: LateItem::Summary {
                    window_start_ms: T0,
                    window_ms: 60_000,
                    summary: {
                        let mut summary = Summary::empty();
                        for index in 0..10 {
                            summary.observe(T0 + index, 20.0);
                        }
                        summary
                    },
                },
                reason: LateReason::WindowClosed,
            },
        ],
        NOW_MS,
    );
    store.write_last_seen(
        vec![
            seen("agent", "gw-1", "", "", "", T0 + 9 * MINUTE_MS),
            seen("device", "gw-1", "d1", "", "", T0 + 9 * MINUTE_MS),
            seen(
                "series",
                "gw-1",
                "d1",
                "temperature_c",
                "",
                T0 + 9 * MINUTE_MS,
            ),
            seen(
                "series",
                "gw-1",
                "d1",
                "humidity_pct",
                "zone=north",
                T0 + 9 * MINUTE_MS,
            ),
            seen("agent", "gw-2", "", "", "", T0 + 8 * MINUTE_MS),
            seen("device", "gw-2", "d2", "", "", T0 + 8 * MINUTE_MS),
            seen(
                "series",
                "gw-2",
                "d2",
                "pressure_hpa",
                "",
                T0 + 8 * MINUTE_MS,
            ),
        ],
        NOW_MS,
    );
    store.flush().await.expect("flush the fixture");
    Fixture {
        queries: Queries::from(store.reader()),
        _directory: directory,
    }
}

pub fn state(queries: Queries, live: LiveFeed, token: Option<&str>) -> ApiState {
    ApiState::with_clock(
        queries,
        FleetView::new(),
        live,
        token.map(str::to_owned),
        Arc::new(|| NOW_MS),
    )
}

/// A running server; stops when dropped.
pub struct Server {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn start(state: ApiState) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(api::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    Server {
        address,
        stop: Some(stop),
        task: Some(task),
    }
}

pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The `error` message of a JSON error answer.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {}", self.body))
            .to_string()
    }
}

/// `GET path` with an optional bearer token; the whole answer (`Connection: close`).
pub async fn get(address: SocketAddr, path: &str, token: Option<&str>) -> HttpAnswer {
    let deadline = Duration::from_secs(10);
    tokio::time::timeout(deadline, async {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let authorization = token
            .map(|token| format!("Authorization: Bearer {token}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\n{authorization}Connection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.expect("read answer");
        let text = String::from_utf8(bytes).expect("UTF-8 answer");
        let (head, body) = text.split_once("\r\n\r\n").expect("header and body");
        let mut lines = head.lines();
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status code");
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
            .collect();
        HttpAnswer {
            status,
            headers,
            body: body.to_string(),
        }
    })
    .await
    .unwrap_or_else(|_| panic!("GET {path} did not answer within {deadline:?}"))
}

/// Waits for `condition` with a deadline; panics with `what` when it never holds.
pub async fn wait_for(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
