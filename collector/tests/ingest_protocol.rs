//! Collector ingest against a hand-driven QUIC client on loopback: the handshake,
//! acks only after durability, duplicates, and what broken or hostile input gets.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use quinn::Connection;
use tributary_collector::ingest::{
    DedupStore, FleetView, IngestConfig, IngestMetrics, IngestParts, IngestServer, TlsIdentity,
    TokenStore,
};
use tributary_collector::log::{
    DurableLog, EmbeddedLog, EmbeddedLogConfig, LogRecord, SystemClock,
};
use tributary_protocol::close::CLOSE_PROTOCOL_VIOLATION;
use tributary_protocol::frame::{FrameDecoder, FrameKind, FrameLimits};
use tributary_protocol::session::{
    Backlog, Hello, Message, NackReason, RejectReason, PROTOCOL_VERSION,
};
use tributary_protocol::{
    decode_batch, encode_batch, Batch, BatchLimits, Reading, SeriesDef, SeriesKey,
};

struct Harness {
    server: IngestServer<EmbeddedLog>,
    log: Arc<EmbeddedLog>,
    metrics: Arc<IngestMetrics>,
    identity: TlsIdentity,
    _state: tempfile::TempDir,
}

fn start(config: IngestConfig) -> Harness {
    let state = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::self_signed(&["localhost".to_owned()]).unwrap();
    let log = Arc::new(
        EmbeddedLog::open(
            EmbeddedLogConfig::new(state.path().join("log")),
            SystemClock,
        )
        .unwrap(),
    );
    let metrics = Arc::new(IngestMetrics::default());
    let server = IngestServer::start(IngestParts {
        config: IngestConfig {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..config
        },
        identity: identity.clone(),
        tokens: TokenStore::from_tokens([("gw-1", "secret-1"), ("gw-2", "secret-2")]),
        log: log.clone(),
        dedup: DedupStore::open(&state.path().join("dedup"), 64).unwrap(),
        metrics: metrics.clone(),
        fleet: FleetView::new(),
    })
    .unwrap();
    Harness {
        server,
        log,
        metrics,
        identity,
        _state: state,
    }
}

async fn connect(harness: &Harness) -> Connection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(harness.identity.cert_chain[0].clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tributary_protocol::session::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
        .connect(harness.server.local_address(), "localhost")
        .unwrap()
        .await
        .unwrap()
}

/// Sends `bytes` on a new stream and reads one answer frame.
async fn exchange(connection: &Connection, bytes: &[u8]) -> Result<Message, String> {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|error| error.to_string())?;
    // The server may stop the stream before it has read everything (an oversized frame):
    // its answer still arrives.
    let written = send.write_all(bytes).await;
    let _ = send.finish();
    let mut decoder = FrameDecoder::new(FrameLimits::DEFAULT);
    loop {
        if let Some(frame) = decoder
            .next_owned_frame()
            .map_err(|error| error.to_string())?
        {
            return Message::decode(frame.as_ref()).map_err(|error| error.to_string());
        }
        match recv
            .read_chunk(4096, true)
            .await
            .map_err(|error| error.to_string())?
        {
            Some(chunk) => decoder.feed(&chunk.bytes),
            None => return Err(format!("stream ended (write: {written:?})")),
        }
    }
}

fn hello(agent_id: &str, token: &str) -> Vec<u8> {
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: agent_id.to_owned(),
        token: token.to_owned(),
        agent_version: "test".to_owned(),
        backlog: Backlog::default(),
    };
    Message::Hello(hello)
        .encode_to_vec(&FrameLimits::DEFAULT)
        .unwrap()
}

async fn session(harness: &Harness, agent_id: &str, token: &str) -> Connection {
    let connection = connect(harness).await;
    match exchange(&connection, &hello(agent_id, token))
        .await
        .unwrap()
    {
        Message::Welcome(welcome) => assert_eq!(welcome.limits.max_in_flight_batches, 16),
        other => panic!("expected a welcome, got {other:?}"),
    }
    connection
}

fn batch_frame(agent_id: &str, batch_seq: u64, with_definitions: bool) -> Vec<u8> {
    let batch = Batch {
        agent_id: agent_id.to_owned(),
        batch_seq,
        created_ms: 1_700_000_000_000,
        series: if with_definitions {
            vec![SeriesDef {
                id: 3,
                key: SeriesKey::new("dev-1", "temperature"),
            }]
        } else {
            Vec::new()
        },
        readings: (0..100)
            .map(|index| Reading {
                series: 3,
                time_ms: 1_700_000_000_000 + index,
                value: index as f64,
                flags: 0,
            })
            .collect(),
        summaries: Vec::new(),
    };
    Message::Batch(encode_batch(&batch))
        .encode_to_vec(&FrameLimits::DEFAULT)
        .unwrap()
}

fn records(log: &EmbeddedLog) -> Vec<LogRecord> {
    (0..log.partition_count())
        .flat_map(|partition| log.read_records(partition, 0, usize::MAX).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_acked_once_durable_and_a_resend_is_acked_without_a_second_write() {
    let harness = start(IngestConfig::default());
    let connection = session(&harness, "gw-1", "secret-1").await;
    assert!(
        matches!(exchange(&connection, &batch_frame("gw-1", 7, true)).await.unwrap(), Message::Ack(ack) if ack.batch_seq == 7)
    );
    // Durable before the ack: the record is readable the moment the ack arrived.
    let written = records(&harness.log);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].headers.agent_id, "gw-1");
    assert_eq!(written[0].headers.batch_seq, 7);
    assert_eq!(written[0].headers.protocol_version, PROTOCOL_VERSION);
    let batch = decode_batch(&written[0].value, &BatchLimits::default()).unwrap();
    assert_eq!(
        batch.series,
        vec![SeriesDef {
            id: 3,
            key: SeriesKey::new("dev-1", "temperature")
        }]
    );

    // Same sequence again, even on a new connection: acked, not written.
    let again = session(&harness, "gw-1", "secret-1").await;
    assert!(
        matches!(exchange(&again, &batch_frame("gw-1", 7, true)).await.unwrap(), Message::Ack(ack) if ack.batch_seq == 7)
    );
    assert_eq!(records(&harness.log).len(), 1);
    assert_eq!(harness.metrics.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(harness.metrics.acks.load(Ordering::Relaxed), 2);
    harness.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_series_are_nacked_retryable_until_the_definitions_come() {
    let harness = start(IngestConfig::default());
    let connection = session(&harness, "gw-1", "secret-1").await;
    match exchange(&connection, &batch_frame("gw-1", 1, false))
        .await
        .unwrap()
    {
        Message::Nack(nack) => {
            assert_eq!(
                (nack.batch_seq, nack.reason, nack.retryable),
                (1, NackReason::UnknownSeries, true)
            );
            assert!(nack.message.contains("series id 3"), "{}", nack.message);
        }
        other => panic!("expected a nack, got {other:?}"),
    }
    assert!(matches!(
        exchange(&connection, &batch_frame("gw-1", 1, true))
            .await
            .unwrap(),
        Message::Ack(_)
    ));
    // The session now knows series 3: a batch without definitions is accepted and
    // written self-contained.
    assert!(matches!(
        exchange(&connection, &batch_frame("gw-1", 2, false))
            .await
            .unwrap(),
        Message::Ack(_)
    ));
    let written = records(&harness.log);
    assert_eq!(written.len(), 2);
    let batch = decode_batch(&written[1].value, &BatchLimits::default()).unwrap();
    assert_eq!(batch.series.len(), 1);
    harness.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_and_unknown_agents_are_rejected_with_a_reason() {
    let harness = start(IngestConfig::default());
    for (agent, token, expected) in [
        ("gw-1", "secret-2", "wrong token"),
        ("gw-9", "secret-1", "not in the collector's tokens file"),
    ] {
        let connection = connect(&harness).await;
        match exchange(&connection, &hello(agent, token)).await.unwrap() {
            Message::Reject(reject) => {
                assert_eq!(reject.reason, RejectReason::Unauthorized);
                assert!(reject.message.contains(expected), "{}", reject.message);
            }
            other => panic!("expected a reject, got {other:?}"),
        }
        // The collector closes the connection after the reject.
        tokio::time::timeout(Duration::from_secs(10), connection.closed())
            .await
            .unwrap();
    }
    assert_eq!(harness.metrics.hellos_rejected.load(Ordering::Relaxed), 2);
    harness.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_oversized_batches_are_nacked_and_the_session_goes_on() {
    let harness = start(IngestConfig {
        max_frame_bytes: 64 * 1024,
        ..IngestConfig::default()
    });
    let connection = session(&harness, "gw-1", "secret-1").await;

    let mut garbage = b"T\x01 this is not a batch".to_vec();
    garbage.extend_from_slice(&[0xff; 64]);
    let frame = Message::Batch(garbage)
        .encode_to_vec(&FrameLimits::DEFAULT)
        .unwrap();
    match exchange(&connection, &frame).await.unwrap() {
        Message::Nack(nack) => {
            assert!(!nack.retryable);
            assert!(
                matches!(nack.reason, NackReason::Malformed | NackReason::TooLarge),
                "{nack:?}"
            );
            assert!(
                nack.message.contains("cannot be decoded"),
                "{}",
                nack.message
            );
        }
        other => panic!("expected a nack, got {other:?}"),
    }

    // A header announcing 100 MiB: refused as soon as the header is in.
    let mut oversized = (100u32 * 1024 * 1024).to_be_bytes().to_vec();
    oversized.push(FrameKind::Batch.as_byte());
    oversized.extend_from_slice(&[0; 1024]);
    match exchange(&connection, &oversized).await.unwrap() {
        Message::Nack(nack) => {
            assert_eq!((nack.reason, nack.retryable), (NackReason::TooLarge, false));
            assert!(
                nack.message.contains("over the limit of 65536 bytes"),
                "{}",
                nack.message
            );
        }
        other => panic!("expected a nack, got {other:?}"),
    }

    // A batch for another agent inside this agent's session.
    match exchange(&connection, &batch_frame("gw-2", 1, true))
        .await
        .unwrap()
    {
        Message::Nack(nack) => assert!(
            nack.message.contains("session belongs to"),
            "{}",
            nack.message
        ),
        other => panic!("expected a nack, got {other:?}"),
    }

    assert!(matches!(
        exchange(&connection, &batch_frame("gw-1", 5, true))
            .await
            .unwrap(),
        Message::Ack(_)
    ));
    assert_eq!(records(&harness.log).len(), 1);
    assert_eq!(
        harness.metrics.nacks(NackReason::TooLarge) + harness.metrics.nacks(NackReason::Malformed),
        3
    );
    harness.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_framing_closes_that_connection_only() {
    let harness = start(IngestConfig::default());
    let bad = session(&harness, "gw-1", "secret-1").await;
    let good = session(&harness, "gw-2", "secret-2").await;
    // Unknown frame kind 0x7f.
    let result = exchange(&bad, &[0, 0, 0, 2, 0x7f, 0]).await;
    assert!(result.is_err(), "{result:?}");
    let reason = tokio::time::timeout(Duration::from_secs(10), bad.closed())
        .await
        .unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION)
            );
            assert!(
                String::from_utf8_lossy(&close.reason).contains("unknown frame kind"),
                "{close:?}"
            );
        }
        other => panic!("expected an application close, got {other}"),
    }
    // A control frame where a batch belongs is a violation too.
    let other = session(&harness, "gw-1", "secret-1").await;
    assert!(exchange(&other, &hello("gw-1", "secret-1")).await.is_err());
    tokio::time::timeout(Duration::from_secs(10), other.closed())
        .await
        .unwrap();

    assert!(matches!(
        exchange(&good, &batch_frame("gw-2", 1, true))
            .await
            .unwrap(),
        Message::Ack(_)
    ));
    assert_eq!(
        harness.metrics.protocol_violations.load(Ordering::Relaxed),
        2
    );
    harness.server.shutdown().await;
}

/// Fuzzing the server's stream handling over real QUIC: random bytes, random batch
/// payloads in valid frames, and valid batches with flipped bytes. Every stream gets a
/// nack or an ack, or (broken framing) the connection is closed; the server keeps
/// serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_batch_streams_never_stop_the_server() {
    let harness = start(IngestConfig {
        max_frame_bytes: 64 * 1024,
        ..IngestConfig::default()
    });
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut connection = session(&harness, "gw-1", "secret-1").await;
    let mut closed = 0;
    for case in 0..96u64 {
        let length = (next() % 2048) as usize;
        let random: Vec<u8> = (0..length).map(|_| next() as u8).collect();
        let bytes = match case % 3 {
            0 => random,
            1 => Message::Batch(random)
                .encode_to_vec(&FrameLimits::DEFAULT)
                .unwrap(),
            _ => {
                let mut valid = batch_frame("gw-1", 1_000 + case, true);
                for _ in 0..3 {
                    let position = (next() as usize) % valid.len();
                    valid[position] ^= (next() as u8) | 1;
                }
                valid
            }
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), exchange(&connection, &bytes))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "case {case} ({} bytes, kind {}) got no answer",
                    bytes.len(),
                    case % 3
                )
            });
        match answer {
            Ok(Message::Ack(_)) | Ok(Message::Nack(_)) => {}
            Ok(other) => panic!("case {case}: unexpected answer {other:?}"),
            Err(error) => {
                // Broken framing closed the connection: what a protocol violation gets.
                tokio::time::timeout(Duration::from_secs(10), connection.closed())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("case {case}: {error}, but the connection stays open")
                    });
                closed += 1;
                connection = session(&harness, "gw-1", "secret-1").await;
            }
        }
    }
    assert_eq!(
        closed,
        harness.metrics.protocol_violations.load(Ordering::Relaxed)
    );
    assert!(matches!(
        exchange(&connection, &batch_frame("gw-1", 5_000, true))
            .await
            .unwrap(),
        Message::Ack(_)
    ));
    harness.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_http() {
    let harness = start(IngestConfig::default());
    let connection = session(&harness, "gw-1", "secret-1").await;
    assert!(matches!(
        exchange(&connection, &batch_frame("gw-1", 1, true))
            .await
            .unwrap(),
        Message::Ack(_)
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let state = tributary_collector::ingest::http::HttpState {
        metrics: harness.metrics.clone(),
        ready,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(tributary_collector::ingest::http::serve(
        listener,
        state,
        async move {
            let _ = stopped.await;
        },
    ));
    let body = http_get(address, "/metrics").await;
    assert!(body.contains("tributary_ingest_acks_total 1"), "{body}");
    assert!(
        body.contains("tributary_ingest_readings_total 100"),
        "{body}"
    );
    assert!(
        body.contains("tributary_ingest_connected_agents 1"),
        "{body}"
    );
    assert!(http_get(address, "/readyz").await.contains("200 OK"));
    let _ = stop.send(());
    http.await.unwrap().unwrap();
    harness.server.shutdown().await;
}

async fn http_get(address: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Upgrades in either order: an agent newer than this collector is welcomed with the
/// newest version both speak, and its batches are written under that version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_newer_than_the_collector_gets_the_common_version_and_is_served() {
    let harness = start(IngestConfig::default());
    let connection = connect(&harness).await;
    let newer_hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        agent_id: "gw-1".to_owned(),
        token: "secret-1".to_owned(),
        agent_version: "9.0.0".to_owned(),
        backlog: Backlog::default(),
    })
    .encode_to_vec(&FrameLimits::DEFAULT)
    .unwrap();
    match exchange(&connection, &newer_hello).await.unwrap() {
        Message::Welcome(welcome) => assert_eq!(welcome.protocol_version, PROTOCOL_VERSION),
        other => panic!("expected a welcome, got {other:?}"),
    }
    assert!(
        matches!(exchange(&connection, &batch_frame("gw-1", 1, true)).await.unwrap(), Message::Ack(ack) if ack.batch_seq == 1)
    );
    let written = records(&harness.log);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].headers.protocol_version, PROTOCOL_VERSION);
    harness.server.shutdown().await;
}
