//! The dashboard page in a real browser: Debian's headless Chromium, driven over the Chrome
//! DevTools Protocol (a WebSocket, so no Node or chromedriver is needed), loads the page
//! from an in-process collector API over an embedded store with a small fleet, lists the
//! devices, and a chart shows a reading within 2 s of its publish on the live feed.
//!
//! The browser is found at `$TRIBUTARY_CHROMIUM` or `/usr/bin/chromium`
//! (`deploy/dev/browser-deps.sh` installs it). Without it the test prints SKIPPED, and
//! fails with `CI=true`. A screenshot goes to `target/dashboard.png`; with
//! `TRIBUTARY_BLESS=1` also to `docs/dashboard.png`.

use std::io::BufRead;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};
use tributary_collector::api::{self, ApiState};
use tributary_collector::ingest::{
    DedupStore, FleetView, IngestConfig, IngestMetrics, IngestParts, IngestServer, TlsIdentity,
    TokenStore,
};
use tributary_collector::live::{LiveBatch, LiveFeed, LiveReading};
use tributary_collector::log::{EmbeddedLog, EmbeddedLogConfig, SystemClock};
use tributary_collector::process::WindowResult;
use tributary_collector::store::{
    render_tags, EmbeddedStore, EmbeddedStoreConfig, LastSeenRow, Queries, RawReadingRow, Store,
};
use tributary_protocol::frame::{FrameDecoder, FrameLimits};
use tributary_protocol::session::{Backlog, Hello, Message as SessionMessage, PROTOCOL_VERSION};
use tributary_protocol::summary::Summary;
use tributary_protocol::SeriesKey;
use tributary_tests::services::{repo_root, running_in_ci};

const MINUTE_MS: i64 = 60_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

fn chromium_path() -> Option<PathBuf> {
    let path = std::env::var_os("TRIBUTARY_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.is_file() {
        return Some(path);
    }
    let message = format!(
        "no Chromium at {} (set TRIBUTARY_CHROMIUM, or run deploy/dev/browser-deps.sh)",
        path.display()
    );
    assert!(
        !running_in_ci(),
        "CI=true and the browser is missing: {message}"
    );
    eprintln!("SKIPPED: {message}");
    None
}

/// Headless Chromium with a fresh profile; killed when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: WebSocket<TcpStream>,
    next_id: u64,
    session_id: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn launch(executable: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(executable)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "--window-size=1440,860",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", executable.display()));
        // Chromium prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID".
        let stderr = child.stderr.take().expect("piped stderr");
        let (found, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if !sent {
                    if let Some(url) = line.split("DevTools listening on ").nth(1) {
                        let _ = found.send(url.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let url = match listening.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("Chromium did not open its DevTools socket within 30 s");
            }
        };
        let address: SocketAddr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .and_then(|host| host.parse().ok())
            .unwrap_or_else(|| panic!("unexpected DevTools URL {url}"));
        let stream = TcpStream::connect(address).expect("connect to DevTools");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let (socket, _) = tungstenite::client::client(url.as_str(), stream)
            .unwrap_or_else(|error| panic!("DevTools handshake: {error}"));
        let mut browser = Browser {
            child,
            _profile: profile,
            socket,
            next_id: 0,
            session_id: String::new(),
        };
        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        browser.session_id = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1440, "height": 860, "deviceScaleFactor": 1, "mobile": false }),
        );
        browser
    }

    /// Sends one DevTools command (to the page once attached) and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if !self.session_id.is_empty() {
            command["sessionId"] = json!(self.session_id);
        }
        self.socket
            .send(Message::text(command.to_string()))
            .unwrap_or_else(|error| panic!("{method}: {error}"));
        loop {
            let message = match self.socket.read() {
                Ok(Message::Text(text)) => text,
                Ok(_) => continue,
                Err(error) => panic!("{method}: reading the DevTools answer: {error}"),
            };
            let answer: Value = serde_json::from_str(message.as_str()).expect("DevTools JSON");
            if answer["id"] != json!(id) {
                continue; // an event
            }
            if let Some(error) = answer.get("error") {
                panic!("{method} failed: {error}");
            }
            return answer["result"].clone();
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until `done` accepts its value; the value, or a panic at the deadline.
    fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        deadline: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let value = self.evaluate(expression);
            if done(&value) {
                return value;
            }
            assert!(
                started.elapsed() < deadline,
                "timed out after {deadline:?} waiting for {what}; last value {value}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        decode_base64(shot["data"].as_str().expect("screenshot data"))
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    fn value(byte: u8) -> Option<u32> {
        match byte {
            b'A'..=b'Z' => Some(u32::from(byte - b'A')),
            b'a'..=b'z' => Some(u32::from(byte - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(byte - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut buffer = 0_u32;
    let mut bits = 0;
    for byte in text.bytes().filter_map(value) {
        buffer = (buffer << 6) | byte;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

/// Real QUIC ingest that the gateways say hello to, so the fleet view the page shows comes
/// from the ingest code: two gateways online (one with a backlog), one that disconnected.
struct Gateways {
    server: Option<IngestServer<EmbeddedLog>>,
    connections: Vec<(quinn::Endpoint, quinn::Connection)>,
    _state: tempfile::TempDir,
}

const GATEWAYS: [&str; 3] = ["gw-factory-1", "gw-coldchain-7", "gw-rooftop-9"];

fn client_config(identity: &TlsIdentity) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in &identity.cert_chain {
        roots.add(certificate.clone()).expect("trust the collector");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tributary_protocol::session::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    quinn::ClientConfig::new(Arc::new(crypto))
}

async fn hello(
    address: SocketAddr,
    config: quinn::ClientConfig,
    agent_id: &str,
    backlog: Backlog,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut endpoint =
        quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("client endpoint");
    endpoint.set_default_client_config(config);
    let connection = endpoint
        .connect(address, "localhost")
        .expect("connect")
        .await
        .expect("QUIC handshake");
    let frame = SessionMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: agent_id.to_owned(),
        token: format!("token-{agent_id}"),
        agent_version: "0.1.0".to_owned(),
        backlog,
    })
    .encode_to_vec(&FrameLimits::DEFAULT)
    .expect("encode hello");
    let (mut send, mut receive) = connection.open_bi().await.expect("stream");
    send.write_all(&frame).await.expect("send hello");
    send.finish().expect("finish");
    let mut decoder = FrameDecoder::new(FrameLimits::DEFAULT);
    loop {
        if let Some(frame) = decoder.next_owned_frame().expect("frame") {
            match SessionMessage::decode(frame.as_ref()).expect("answer") {
                SessionMessage::Welcome(_) => return (endpoint, connection),
                other => panic!("{agent_id}: expected a welcome, got {other:?}"),
            }
        }
        match receive.read_chunk(64 * 1024, true).await.expect("read") {
            Some(chunk) => decoder.feed(&chunk.bytes),
            None => panic!("{agent_id}: the collector closed the stream without an answer"),
        }
    }
}

async fn gateways(fleet: FleetView, now_ms: i64) -> Gateways {
    let state = tempfile::tempdir().expect("state dir");
    let identity = TlsIdentity::self_signed(&["localhost".to_owned()]).expect("identity");
    let tokens: Vec<(String, String)> = GATEWAYS
        .iter()
        .map(|agent_id| (agent_id.to_string(), format!("token-{agent_id}")))
        .collect();
    let log = EmbeddedLog::open(
        EmbeddedLogConfig::new(state.path().join("log")),
        SystemClock,
    )
    .expect("embedded log");
    let server = IngestServer::start(IngestParts {
        config: IngestConfig {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..IngestConfig::default()
        },
        identity: identity.clone(),
        tokens: TokenStore::from_tokens(
            tokens
                .iter()
                .map(|(agent, token)| (agent.as_str(), token.as_str())),
        ),
        log: Arc::new(log),
        dedup: DedupStore::open(&state.path().join("dedup"), 4096).expect("dedup"),
        metrics: Arc::new(IngestMetrics::default()),
        fleet: fleet.clone(),
    })
    .expect("ingest server");
    let address = server.local_address();
    let config = client_config(&identity);
    let mut connections = vec![
        hello(address, config.clone(), GATEWAYS[0], Backlog::default()).await,
        // Back from an outage, still draining 20 minutes of backlog.
        hello(
            address,
            config.clone(),
            GATEWAYS[1],
            Backlog {
                batches: 184,
                bytes: 3_145_728,
                oldest_unsent_time_ms: Some(now_ms - 20 * MINUTE_MS),
            },
        )
        .await,
    ];
    let (endpoint, connection) = hello(address, config, GATEWAYS[2], Backlog::default()).await;
    connection.close(0_u32.into(), b"bye");
    endpoint.wait_idle().await;
    let started = Instant::now();
    while fleet.connected_count() != 2 || fleet.snapshot().len() != 3 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "ingest never saw the gateways: {:?}",
            fleet.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    connections.shrink_to_fit();
    Gateways {
        server: Some(server),
        connections,
        _state: state,
    }
}

/// A small fleet: two gateways, four devices, smooth signals over the last five minutes.
struct Fleet {
    queries: Queries,
    _directory: tempfile::TempDir,
}

fn signal(base: f64, amplitude: f64, period_ms: f64, time_ms: i64, phase: f64) -> f64 {
    let angle = (time_ms as f64 / period_ms) * std::f64::consts::TAU + phase;
    let value = base + amplitude * angle.sin() + amplitude * 0.25 * (angle * 3.1).sin();
    (value * 100.0).round() / 100.0
}

fn fleet_series() -> Vec<(&'static str, SeriesKey, f64, f64, f64)> {
    vec![
        (
            "gw-factory-1",
            SeriesKey::new("boiler-1", "temperature_c"),
            82.0,
            3.0,
            0.0,
        ),
        (
            "gw-factory-1",
            SeriesKey::new("boiler-1", "pressure_bar"),
            4.2,
            0.3,
            1.0,
        ),
        (
            "gw-factory-1",
            SeriesKey::new("press-2", "vibration_mm_s").with_tags([("axis", "x")]),
            2.4,
            0.8,
            2.0,
        ),
        (
            "gw-coldchain-7",
            SeriesKey::new("cold-room-3", "temperature_c"),
            -18.0,
            0.7,
            0.5,
        ),
        (
            "gw-coldchain-7",
            SeriesKey::new("cold-room-3", "humidity_pct"),
            71.0,
            4.0,
            1.5,
        ),
        (
            "gw-coldchain-7",
            SeriesKey::new("dock-door-4", "temperature_c"),
            6.5,
            2.5,
            3.0,
        ),
    ]
}

async fn fleet(now_ms: i64) -> Fleet {
    let directory = tempfile::tempdir().expect("temp dir");
    let mut store = EmbeddedStore::open(EmbeddedStoreConfig::new(
        directory.path().join("store"),
        vec![MINUTE_MS],
    ))
    .expect("open embedded store");
    let start_ms = now_ms - 5 * MINUTE_MS;
    let mut raw = Vec::new();
    let mut windows = Vec::new();
    let mut seen = Vec::new();
    for (index, (agent, key, base, amplitude, phase)) in fleet_series().into_iter().enumerate() {
        let tags = render_tags(&key.tags);
        let mut by_window: std::collections::BTreeMap<i64, Summary> = Default::default();
        let mut time_ms = start_ms;
        let mut position = 0;
        while time_ms < now_ms - 1_000 {
            let value = signal(base, amplitude, 170_000.0, time_ms, phase);
            raw.push(RawReadingRow {
                agent_id: agent.into(),
                batch_seq: index as u64 * 1_000 + (position / 10),
                position: (position % 10) as u32,
                device_id: key.device_id.clone(),
                metric: key.metric.clone(),
                tags: tags.clone(),
                time_ms,
                value,
                flags: 0,
            });
            by_window
                .entry(time_ms - time_ms.rem_euclid(MINUTE_MS))
                .or_insert_with(Summary::empty)
                .observe(time_ms, value);
            time_ms += 2_000;
            position += 1;
        }
        for (window_start_ms, summary) in by_window {
            windows.push(WindowResult {
                agent_id: Arc::from(agent),
                series: Arc::new(key.clone()),
                resolution_ms: MINUTE_MS,
                window_start_ms,
                version: summary.count,
                summary: Arc::new(summary),
                is_final: false,
            });
        }
        for (kind, device, metric, row_tags) in [
            ("device", key.device_id.as_str(), "", ""),
            (
                "series",
                key.device_id.as_str(),
                key.metric.as_str(),
                tags.as_str(),
            ),
        ] {
            seen.push(LastSeenRow {
                kind: kind.into(),
                agent_id: agent.into(),
                device_id: device.into(),
                metric: metric.into(),
                tags: row_tags.into(),
                last_seen_ms: (now_ms - 1_000) as u64,
            });
        }
    }
    store.write_raw_readings(raw, now_ms);
    store
        .write_window_results(&windows, now_ms)
        .expect("known resolution");
    store.write_last_seen(seen, now_ms);
    store.flush().await.expect("flush the fleet");
    Fleet {
        queries: Queries::from(store.reader()),
        _directory: directory,
    }
}

#[test]
fn the_dashboard_lists_devices_and_a_chart_follows_the_live_feed() {
    let Some(chromium) = chromium_path() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let fleet = runtime.block_on(fleet(now_ms()));
    let fleet_view = FleetView::new();
    let mut gateways = runtime.block_on(gateways(fleet_view.clone(), now_ms()));
    let feed = LiveFeed::new(256);
    let state = ApiState::new(fleet.queries.clone(), fleet_view, feed.clone(), None);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(api::serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let mut browser = Browser::launch(&chromium);
    browser.call("Page.enable", json!({}));
    browser.call(
        "Page.navigate",
        json!({ "url": format!("http://{address}/") }),
    );

    let devices = browser.wait_for(
        "the device list",
        "[...document.querySelectorAll('#device-list [data-device-id]')].map(item => item.dataset.deviceId)",
        Duration::from_secs(15),
        |value| value.as_array().is_some_and(|list| list.len() == 4),
    );
    assert_eq!(
        devices,
        json!(["boiler-1", "cold-room-3", "dock-door-4", "press-2"])
    );
    assert_eq!(
        browser.evaluate("document.getElementById('devices-count').textContent"),
        json!("4")
    );

    // The first device is selected; its charts fill from the raw history.
    let selector = "boiler-1/temperature_c";
    let chart = format!("document.querySelector('[data-selector=\"{selector}\"]')");
    browser.wait_for(
        "the boiler-1 charts with their history",
        &format!("{chart} ? Number({chart}.dataset.points || 0) : 0"),
        Duration::from_secs(15),
        |points| points.as_u64().is_some_and(|points| points > 100),
    );
    // The live socket is subscribed before we publish.
    let started = Instant::now();
    while feed.listeners() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the page never opened the live WebSocket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    browser.wait_for(
        "the live subscription",
        "document.getElementById('freshness-label').textContent",
        Duration::from_secs(10),
        |label| label.as_str().is_some_and(|text| text.starts_with("Live")),
    );

    // Publish readings of every series (as the processor would); the chart must show the
    // new boiler value within 2 s.
    let published_at = Instant::now();
    let time_ms = now_ms();
    let readings = fleet_series()
        .into_iter()
        .map(|(agent, key, base, amplitude, phase)| LiveReading {
            agent_id: agent.into(),
            device_id: key.device_id.clone(),
            metric: key.metric.clone(),
            tags: render_tags(&key.tags),
            time_ms,
            value: if key.device_id == "boiler-1" && key.metric == "temperature_c" {
                87.25
            } else {
                signal(base, amplitude, 170_000.0, time_ms, phase)
            },
        })
        .collect();
    feed.publish(LiveBatch {
        produced_ms: time_ms,
        windows: Vec::new(),
        readings,
    });
    browser.wait_for(
        "the chart to show the published value",
        &format!("{chart}.dataset.lastValue"),
        Duration::from_secs(2),
        |value| value == &json!("87.25"),
    );
    let shown_after = published_at.elapsed();
    assert!(
        shown_after < Duration::from_secs(2),
        "shown after {shown_after:?}"
    );
    let freshness = browser.evaluate("document.getElementById('freshness').className");
    assert_eq!(
        freshness,
        json!("freshness is-fresh"),
        "the freshness indicator shows fresh data"
    );
    eprintln!("chart updated {shown_after:?} after the publish");

    // Per-gateway freshness comes from the same live data.
    browser.wait_for(
        "the newest-data age of gw-factory-1",
        "document.querySelector('#gateways-body tr[data-agent-id=\"gw-factory-1\"] td:nth-child(5)').textContent",
        Duration::from_secs(5),
        |text| text.as_str().is_some_and(|text| text.ends_with(" old")),
    );

    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    // Cargo's scratch directory for integration tests: it exists wherever the target dir is.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&target, &png).unwrap_or_else(|error| panic!("{}: {error}", target.display()));
    if std::env::var("TRIBUTARY_BLESS").is_ok_and(|value| value == "1") {
        let docs = repo_root().join("docs").join("dashboard.png");
        std::fs::write(&docs, &png).unwrap_or_else(|error| panic!("{}: {error}", docs.display()));
    }

    drop(browser);
    for (endpoint, connection) in gateways.connections.drain(..) {
        connection.close(0_u32.into(), b"done");
        drop(endpoint);
    }
    if let Some(server) = gateways.server.take() {
        runtime.block_on(server.shutdown());
    }
    let _ = stop.send(());
    runtime
        .block_on(server)
        .expect("server task")
        .expect("server stopped cleanly");
}
