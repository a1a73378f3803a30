//! `/api/v1/live` over a real WebSocket: a client receives what the processor publishes,
//! filtered by its subscription; a client that falls behind is skipped ahead and told so;
//! a client that stops reading is disconnected; none of them slows the publisher.

mod api_support;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use api_support::*;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};
use tributary_collector::api::live::LiveLimits;
use tributary_collector::live::{LiveBatch, LiveFeed, LiveReading, LiveWindow};

type Client = WebSocket<TcpStream>;

fn connect(address: SocketAddr, query: &str) -> Client {
    let stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let url = format!("ws://{address}/api/v1/live{query}");
    let (client, response) =
        tungstenite::client::client(url.as_str(), stream).expect("WebSocket handshake");
    assert_eq!(response.status().as_u16(), 101);
    client
}

fn send(client: &mut Client, message: &str) {
    client.send(Message::text(message)).expect("send");
}

/// The next JSON text message (pings and pongs skipped).
fn next(client: &mut Client) -> Value {
    loop {
        match client.read().expect("read a message") {
            Message::Text(text) => {
                return serde_json::from_str(text.as_str()).expect("JSON message")
            }
            Message::Close(frame) => panic!("closed by the server: {frame:?}"),
            _ => continue,
        }
    }
}

fn reading(device: &str, metric: &str, time_ms: i64, value: f64) -> LiveReading {
    LiveReading {
        agent_id: "gw-1".into(),
        device_id: device.into(),
        metric: metric.into(),
        tags: String::new(),
        time_ms,
        value,
    }
}

fn window(device: &str, resolution_ms: i64) -> LiveWindow {
    LiveWindow {
        agent_id: "gw-1".into(),
        device_id: device.into(),
        metric: "temperature_c".into(),
        tags: String::new(),
        resolution_ms,
        window_start_ms: T0,
        count: 3,
        sum: 63.0,
        min: 20.0,
        max: 22.0,
        last_time_ms: T0 + 3_000,
        last_value: 22.0,
        is_final: false,
    }
}

/// Waits until the feed has `count` listeners (a connection subscribes to the feed when it opens).
fn wait_for_listeners(feed: &LiveFeed, count: usize) {
    let started = Instant::now();
    while feed.listeners() != count {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "feed has {} listeners, expected {count}",
            feed.listeners()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_receives_what_matches_its_filter() {
    let fixture = fixture().await;
    let feed = LiveFeed::new(64);
    let server = start(state(fixture.queries.clone(), feed.clone(), None)).await;
    let address = server.address;
    let publisher = feed.clone();
    tokio::task::spawn_blocking(move || {
        let mut client = connect(address, "");
        send(&mut client, "hello?");
        let error = next(&mut client);
        assert_eq!(error["type"], "error");
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|text| text.contains("not a subscription")),
            "{error}"
        );

        send(
            &mut client,
            r#"{"type":"subscribe","devices":["d1"],"resolutions_ms":[60000]}"#,
        );
        let subscribed = next(&mut client);
        assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
        assert_eq!(subscribed["devices"], serde_json::json!(["d1"]));

        wait_for_listeners(&publisher, 1);
        // Nothing of d2 reaches this client; the hourly window is filtered out.
        publisher.publish(LiveBatch {
            produced_ms: 1,
            windows: vec![window("d2", 60_000)],
            readings: vec![reading("d2", "pressure_hpa", T0, 1013.0)],
        });
        publisher.publish(LiveBatch {
            produced_ms: 2,
            windows: vec![window("d1", 60_000), window("d1", 3_600_000)],
            readings: vec![
                reading("d1", "temperature_c", T0 + 3_000, 22.0),
                reading("d2", "pressure_hpa", T0, 1013.0),
            ],
        });
        let data = next(&mut client);
        assert_eq!(data["type"], "data", "{data}");
        assert_eq!(data["produced_ms"], 2, "the d2-only batch was not sent");
        assert_eq!(data["sent_ms"], NOW_MS);
        assert_eq!(data["readings"].as_array().map(Vec::len), Some(1), "{data}");
        assert_eq!(data["readings"][0]["device_id"], "d1");
        assert_eq!(data["readings"][0]["value"], 22.0);
        assert_eq!(data["windows"].as_array().map(Vec::len), Some(1), "{data}");
        assert_eq!(data["windows"][0]["resolution_ms"], 60_000);

        // A new subscription replaces the old one.
        send(
            &mut client,
            r#"{"type":"subscribe","series":["d2/pressure_hpa"],"windows":false}"#,
        );
        assert_eq!(next(&mut client)["type"], "subscribed");
        publisher.publish(LiveBatch {
            produced_ms: 3,
            windows: vec![window("d2", 60_000)],
            readings: vec![
                reading("d1", "temperature_c", T0, 1.0),
                reading("d2", "pressure_hpa", T0 + 9, 1014.0),
            ],
        });
        let data = next(&mut client);
        assert_eq!(data["produced_ms"], 3);
        assert_eq!(data["windows"], serde_json::json!([]));
        assert_eq!(data["readings"][0]["value"], 1014.0);
        client.close(None).expect("close");
    })
    .await
    .expect("client thread");
}

fn big_batch(produced_ms: i64) -> LiveBatch {
    LiveBatch {
        produced_ms,
        windows: Vec::new(),
        readings: (0..500)
            .map(|index| {
                reading(
                    &format!("device-{index:04}"),
                    "temperature_c",
                    T0 + produced_ms,
                    index as f64,
                )
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_falls_behind_is_skipped_ahead_and_told() {
    let fixture = fixture().await;
    let feed = LiveFeed::new(4);
    let server = start(state(fixture.queries.clone(), feed.clone(), None)).await;
    let address = server.address;
    let publisher = feed.clone();
    tokio::task::spawn_blocking(move || {
        let mut client = connect(address, "");
        send(&mut client, r#"{"type":"subscribe"}"#);
        assert_eq!(next(&mut client)["type"], "subscribed");
        wait_for_listeners(&publisher, 1);

        // The client reads nothing while 400 batches (~40 MB of JSON) are published: the
        // socket's buffers fill, the connection's task blocks on its send, and the feed's
        // ring of 4 overflows. The publisher never waits.
        let published = 400;
        let started = Instant::now();
        for produced_ms in 1..=published {
            publisher.publish(big_batch(produced_ms));
        }
        let publish_time = started.elapsed();
        assert!(
            publish_time < Duration::from_secs(5),
            "publishing took {publish_time:?}"
        );

        let mut lagged = 0_u64;
        let mut data_messages = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "the newest batch never arrived");
            let message = next(&mut client);
            match message["type"].as_str() {
                Some("lagged") => lagged += message["skipped_batches"].as_u64().expect("count"),
                Some("data") => {
                    data_messages += 1;
                    if message["produced_ms"] == published {
                        break;
                    }
                }
                other => panic!("unexpected message {other:?}"),
            }
        }
        assert!(lagged > 0, "the client was never told it was skipped ahead");
        assert_eq!(
            data_messages + lagged,
            published as u64,
            "every batch was either delivered or counted as skipped"
        );
    })
    .await
    .expect("client thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected() {
    let fixture = fixture().await;
    let feed = LiveFeed::new(4);
    let state = state(fixture.queries.clone(), feed.clone(), None).with_live_limits(LiveLimits {
        send_timeout_ms: 300,
    });
    let server = start(state).await;
    let address = server.address;
    let publisher = feed.clone();
    tokio::task::spawn_blocking(move || {
        let mut stalled = connect(address, "");
        send(&mut stalled, r#"{"type":"subscribe"}"#);
        assert_eq!(next(&mut stalled)["type"], "subscribed");
        wait_for_listeners(&publisher, 1);
        // Keep publishing (as the processor would) until the server gives up on the client.
        let started = Instant::now();
        let mut produced_ms = 0;
        while publisher.listeners() > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the stalled client was never disconnected"
            );
            produced_ms += 1;
            publisher.publish(big_batch(produced_ms));
            std::thread::sleep(Duration::from_millis(2));
        }
        // A new client is served normally afterwards.
        let mut fresh = connect(address, "");
        send(
            &mut fresh,
            r#"{"type":"subscribe","devices":["device-0001"]}"#,
        );
        assert_eq!(next(&mut fresh)["type"], "subscribed");
        wait_for_listeners(&publisher, 1);
        publisher.publish(big_batch(produced_ms + 1));
        let data = next(&mut fresh);
        assert_eq!(data["produced_ms"], produced_ms + 1);
        assert_eq!(data["readings"].as_array().map(Vec::len), Some(1));
    })
    .await
    .expect("client thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_socket_takes_the_token_in_the_query() {
    let fixture = fixture().await;
    let feed = LiveFeed::new(4);
    let server = start(state(fixture.queries.clone(), feed.clone(), Some("tok"))).await;
    let address = server.address;
    tokio::task::spawn_blocking(move || {
        let stream = TcpStream::connect(address).expect("connect");
        let refused =
            tungstenite::client::client(format!("ws://{address}/api/v1/live").as_str(), stream);
        match refused {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                assert_eq!(response.status().as_u16(), 401)
            }
            Err(other) => panic!("expected a 401, got {other}"),
            Ok((_, response)) => panic!("expected a 401, got {}", response.status()),
        }
        let mut client = connect(address, "?access_token=tok");
        send(&mut client, r#"{"type":"subscribe"}"#);
        assert_eq!(next(&mut client)["type"], "subscribed");
    })
    .await
    .expect("client thread");
}
