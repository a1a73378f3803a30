//! The embedded broker's sans-IO session, driven byte by byte without sockets or clocks:
//! CONNECT of both protocol revisions, PUBACK only after durability and in arrival order,
//! the in-flight window, keep-alive and connect deadlines, credentials, SUBSCRIBE refusal,
//! oversized and malformed packets, and arbitrary bytes never panicking.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS as QoS4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use tributary_agent::source::broker::{
    BrokerSession, BrokerUser, Protocol, SessionEvent, SessionLimits,
};

const LIMITS: SessionLimits = SessionLimits {
    max_packet_bytes: 1024,
    max_in_flight: 4,
    connect_timeout_ms: 5_000,
};

fn session(users: &[(&str, &str)]) -> BrokerSession {
    let users: Vec<BrokerUser> = users
        .iter()
        .map(|(username, password)| BrokerUser {
            username: (*username).to_owned(),
            password: (*password).to_owned(),
        })
        .collect();
    BrokerSession::new(LIMITS, users.into(), true, 7, 0)
}

fn v4_bytes(packet: v4::Packet) -> Vec<u8> {
    let mut buffer = BytesMut::new();
    packet.write(&mut buffer, usize::MAX).expect("encode");
    buffer.to_vec()
}

fn v5_bytes(packet: v5::Packet) -> Vec<u8> {
    let mut buffer = BytesMut::new();
    packet.write(&mut buffer, None).expect("encode");
    buffer.to_vec()
}

fn v4_connect(client_id: &str, keep_alive: u16, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut connect = v4::Connect::new(client_id);
    connect.keep_alive = keep_alive;
    if let Some((username, password)) = login {
        connect.set_login(username, password);
    }
    v4_bytes(v4::Packet::Connect(connect))
}

fn v5_connect(client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: client_id.to_owned(),
        clean_start: true,
        properties: None,
    };
    let login = login.map(|(username, password)| v5::Login::new(username, password));
    v5_bytes(v5::Packet::Connect(connect, None, login))
}

fn v4_publish(topic: &str, payload: &str, qos: QoS4, pkid: u16) -> Vec<u8> {
    let mut publish = v4::Publish::new(topic, qos, payload.as_bytes().to_vec());
    publish.pkid = pkid;
    v4_bytes(v4::Packet::Publish(publish))
}

fn v5_publish(topic: &str, payload: &str, qos: QoS5, pkid: u16) -> Vec<u8> {
    let mut publish = v5::Publish::new(topic, qos, payload.as_bytes().to_vec(), None);
    publish.pkid = pkid;
    v5_bytes(v5::Packet::Publish(publish))
}

fn feed(session: &mut BrokerSession, bytes: &[u8], now_ms: i64) -> Vec<SessionEvent> {
    session.input_buffer().extend_from_slice(bytes);
    let mut events = Vec::new();
    while let Some(event) = session.poll_event(now_ms) {
        events.push(event);
    }
    events
}

fn output_v4(session: &mut BrokerSession) -> Vec<v4::Packet> {
    let mut output = session.take_output().unwrap_or_default();
    let mut packets = Vec::new();
    while !output.is_empty() {
        packets.push(v4::Packet::read(&mut output, usize::MAX).expect("valid output"));
    }
    packets
}

fn output_v5(session: &mut BrokerSession) -> Vec<v5::Packet> {
    let mut output = session.take_output().unwrap_or_default();
    let mut packets = Vec::new();
    while !output.is_empty() {
        let before = output.clone();
        packets.push(
            v5::Packet::read(&mut output, None)
                .unwrap_or_else(|error| panic!("invalid output {before:?}: {error}")),
        );
    }
    packets
}

fn connect_v4(session: &mut BrokerSession, keep_alive: u16) {
    let events = feed(session, &v4_connect("sensor-1", keep_alive, None), 0);
    assert_eq!(
        events,
        vec![SessionEvent::ConnectRequest {
            client_id: "sensor-1".to_owned(),
            clean_session: true,
            protocol: Protocol::V311,
        }]
    );
    session.accept(false);
    assert_eq!(
        output_v4(session),
        vec![v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::Success,
            false
        ))]
    );
}

#[test]
fn v311_puback_only_after_durability_and_in_arrival_order() {
    let mut session = session(&[]);
    connect_v4(&mut session, 30);
    let mut bytes = v4_publish("a/b", "1", QoS4::AtLeastOnce, 1);
    bytes.extend(v4_publish("a/c", "2", QoS4::AtLeastOnce, 2));
    bytes.extend(v4_publish("a/d", "3", QoS4::AtMostOnce, 0));
    let events = feed(&mut session, &bytes, 10);
    let publishes: Vec<(Bytes, u8, u16)> = events
        .into_iter()
        .map(|event| match event {
            SessionEvent::Publish(publish) => (publish.topic, publish.qos, publish.pkid),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        publishes,
        vec![
            (Bytes::from_static(b"a/b"), 1, 1),
            (Bytes::from_static(b"a/c"), 1, 2),
            (Bytes::from_static(b"a/d"), 0, 0),
        ]
    );
    assert_eq!(session.in_flight(), 2);
    assert!(
        session.take_output().is_none(),
        "no PUBACK before durability"
    );
    session.acknowledge(2);
    assert!(
        session.take_output().is_none(),
        "PUBACK 2 must wait for the older message 1"
    );
    session.acknowledge(1);
    assert_eq!(
        output_v4(&mut session),
        vec![
            v4::Packet::PubAck(v4::PubAck::new(1)),
            v4::Packet::PubAck(v4::PubAck::new(2))
        ]
    );
    assert_eq!(session.in_flight(), 0);
    feed(&mut session, &v4_bytes(v4::Packet::PingReq), 20);
    assert_eq!(output_v4(&mut session), vec![v4::Packet::PingResp]);
    feed(&mut session, &v4_bytes(v4::Packet::Disconnect), 30);
    assert!(session.is_closed());
    assert!(session.close_reason().expect("reason").clean);
}

#[test]
fn v5_connack_advertises_limits_and_qos2_is_refused() {
    let mut session = session(&[]);
    let events = feed(&mut session, &v5_connect("", None), 0);
    let SessionEvent::ConnectRequest {
        client_id,
        protocol,
        ..
    } = &events[0]
    else {
        panic!("expected a connect request, got {events:?}");
    };
    assert_eq!(*protocol, Protocol::V5);
    assert_eq!(client_id, "tributary-assigned-7");
    session.accept(false);
    let packets = output_v5(&mut session);
    let v5::Packet::ConnAck(connack) = &packets[0] else {
        panic!("expected CONNACK, got {packets:?}");
    };
    assert_eq!(connack.code, v5::ConnectReturnCode::Success);
    let properties = connack.properties.as_ref().expect("properties");
    assert_eq!(properties.receive_max, Some(4));
    assert_eq!(properties.max_qos, Some(1));
    assert_eq!(properties.max_packet_size, Some(1024));
    assert_eq!(
        properties.assigned_client_identifier.as_deref(),
        Some("tributary-assigned-7")
    );

    let events = feed(
        &mut session,
        &v5_publish("x/y", "1", QoS5::AtLeastOnce, 9),
        5,
    );
    assert_eq!(events.len(), 1);
    session.acknowledge(9);
    assert_eq!(
        output_v5(&mut session),
        vec![v5::Packet::PubAck(v5::PubAck::new(9, None))]
    );

    let events = feed(
        &mut session,
        &v5_publish("x/y", "1", QoS5::ExactlyOnce, 10),
        6,
    );
    assert!(events.is_empty());
    assert!(session.is_closed());
    assert_eq!(
        session.close_reason().expect("reason").reason,
        "qos2_not_supported"
    );
    let packets = output_v5(&mut session);
    assert_eq!(
        packets,
        vec![v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::QoSNotSupported
        ))]
    );
}

#[test]
fn v5_short_disconnect_is_an_orderly_end() {
    let mut session = session(&[]);
    feed(&mut session, &v5_connect("c", None), 0);
    session.accept(false);
    feed(&mut session, &[0xE0, 0x00], 1);
    assert!(session.is_closed());
    assert!(session.close_reason().expect("reason").clean);
}

#[test]
fn full_in_flight_window_stops_reading_until_acknowledged() {
    let mut session = session(&[]);
    connect_v4(&mut session, 0);
    let mut bytes = Vec::new();
    for pkid in 1..=6u16 {
        bytes.extend(v4_publish("t", "1", QoS4::AtLeastOnce, pkid));
    }
    let events = feed(&mut session, &bytes, 1);
    assert_eq!(events.len(), 4, "max_in_flight = 4");
    assert!(!session.wants_read());
    session.acknowledge(1);
    assert!(session.wants_read());
    let events = feed(&mut session, &[], 2);
    assert_eq!(events.len(), 1, "one slot freed, one more message parsed");
    assert!(!session.wants_read());
}

#[test]
fn keep_alive_and_connect_deadlines() {
    let mut session = session(&[]);
    assert_eq!(session.next_timeout_ms(), Some(5_000));
    session.handle_timeout(4_999);
    assert!(!session.is_closed());
    session.handle_timeout(5_000);
    assert_eq!(
        session.close_reason().expect("closed").reason,
        "connect_timeout"
    );

    let mut session = session_connected_at(1_000, 10);
    assert_eq!(session.next_timeout_ms(), Some(16_000));
    feed(&mut session, &v4_bytes(v4::Packet::PingReq), 12_000);
    assert_eq!(session.next_timeout_ms(), Some(27_000));
    session.handle_timeout(26_999);
    assert!(!session.is_closed());
    session.handle_timeout(27_000);
    assert_eq!(
        session.close_reason().expect("closed").reason,
        "keep_alive_timeout"
    );
}

fn session_connected_at(now_ms: i64, keep_alive_s: u16) -> BrokerSession {
    let mut session = BrokerSession::new(LIMITS, Arc::from(Vec::new()), true, 1, now_ms);
    feed(&mut session, &v4_connect("k", keep_alive_s, None), now_ms);
    session.accept(false);
    session
}

#[test]
fn credentials_are_checked_for_both_protocols() {
    let users = [("sensor", "s3cret")];
    let mut refused = session(&users);
    assert!(feed(
        &mut refused,
        &v4_connect("a", 30, Some(("sensor", "wrong"))),
        0
    )
    .is_empty());
    assert_eq!(
        output_v4(&mut refused),
        vec![v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::BadUserNamePassword,
            false
        ))]
    );
    assert_eq!(
        refused.close_reason().expect("closed").reason,
        "bad_credentials"
    );

    let mut anonymous = session(&users);
    assert!(feed(&mut anonymous, &v5_connect("a", None), 0).is_empty());
    let packets = output_v5(&mut anonymous);
    assert!(
        matches!(&packets[0], v5::Packet::ConnAck(connack) if connack.code == v5::ConnectReturnCode::BadUserNamePassword),
        "{packets:?}"
    );

    let mut accepted = session(&users);
    let events = feed(
        &mut accepted,
        &v5_connect("a", Some(("sensor", "s3cret"))),
        0,
    );
    assert_eq!(events.len(), 1);
}

#[test]
fn over_max_connections_gets_server_unavailable() {
    let mut session = BrokerSession::new(LIMITS, Arc::from(Vec::new()), false, 1, 0);
    assert!(feed(&mut session, &v4_connect("a", 30, None), 0).is_empty());
    assert_eq!(
        output_v4(&mut session),
        vec![v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::ServiceUnavailable,
            false
        ))]
    );
    assert_eq!(
        session.close_reason().expect("closed").reason,
        "max_connections"
    );
}

#[test]
fn subscribe_is_refused_per_filter() {
    let mut session = session(&[]);
    connect_v4(&mut session, 30);
    let subscribe = v4::Subscribe::new_many([
        v4::SubscribeFilter::new("a/#".to_owned(), QoS4::AtLeastOnce),
        v4::SubscribeFilter::new("b".to_owned(), QoS4::AtMostOnce),
    ]);
    let mut subscribe = subscribe;
    subscribe.pkid = 3;
    feed(&mut session, &v4_bytes(v4::Packet::Subscribe(subscribe)), 1);
    assert_eq!(
        output_v4(&mut session),
        vec![v4::Packet::SubAck(v4::SubAck::new(
            3,
            vec![
                v4::SubscribeReasonCode::Failure,
                v4::SubscribeReasonCode::Failure
            ]
        ))]
    );
    assert!(!session.is_closed(), "a refused SUBSCRIBE keeps the client");
}

#[test]
fn oversized_malformed_and_out_of_order_packets_close_the_client() {
    let mut session = session(&[]);
    connect_v4(&mut session, 30);
    let big = "x".repeat(2_000);
    feed(&mut session, &v4_publish("t", &big, QoS4::AtMostOnce, 0), 1);
    assert_eq!(
        session.close_reason().expect("closed").reason,
        "packet_too_large"
    );

    let mut session = self::session(&[]);
    feed(&mut session, b"GET / HTTP/1.1\r\n\r\n", 0);
    assert_eq!(
        session.close_reason().expect("closed").reason,
        "malformed_packet"
    );

    let mut session = self::session(&[]);
    feed(&mut session, &v4_bytes(v4::Packet::PingReq), 0);
    assert!(session.is_closed(), "PINGREQ before CONNECT");

    let mut session = self::session(&[]);
    connect_v4(&mut session, 30);
    // A PUBLISH whose remaining length promises more topic than there is.
    feed(&mut session, &[0x30, 0x03, 0x00, 0x09, b'a'], 1);
    assert_eq!(
        session.close_reason().expect("closed").reason,
        "malformed_packet"
    );

    let mut session = self::session(&[]);
    connect_v4(&mut session, 30);
    feed(&mut session, &v4_connect("again", 30, None), 1);
    assert_eq!(
        session.close_reason().expect("closed").reason,
        "protocol_error"
    );
}

#[test]
fn mqtt_3_1_is_refused_with_a_protocol_version_connack() {
    let mut session = session(&[]);
    // CONNECT, protocol name "MQIsdp", level 3.
    let mut bytes = vec![0x10, 0x12, 0x00, 0x06];
    bytes.extend_from_slice(b"MQIsdp");
    bytes.extend_from_slice(&[0x03, 0x02, 0x00, 0x1e, 0x00, 0x04]);
    bytes.extend_from_slice(b"abcd");
    feed(&mut session, &bytes, 0);
    assert!(session.is_closed());
    assert_eq!(
        output_v4(&mut session),
        vec![v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::RefusedProtocolVersion,
            false
        ))]
    );
}

fn conversation() -> Vec<u8> {
    let mut bytes = v4_connect("c", 30, None);
    bytes.extend(v4_publish("a", "1", QoS4::AtLeastOnce, 1));
    bytes.extend(v4_bytes(v4::Packet::PingReq));
    bytes.extend(v4_publish("b", "2", QoS4::AtMostOnce, 0));
    bytes
}

fn run_in_chunks(bytes: &[u8], chunk: usize) -> Vec<SessionEvent> {
    let mut session = session(&[]);
    let mut events = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        let mut fed = feed(&mut session, piece, 0);
        while !fed.is_empty() {
            let connect = fed
                .iter()
                .any(|event| matches!(event, SessionEvent::ConnectRequest { .. }));
            events.append(&mut fed);
            if connect {
                session.accept(false);
                fed = feed(&mut session, &[], 0);
            }
        }
    }
    events
}

proptest! {
    #[test]
    fn events_do_not_depend_on_how_bytes_are_split(chunk in 1usize..64) {
        let bytes = conversation();
        prop_assert_eq!(run_in_chunks(&bytes, chunk), run_in_chunks(&bytes, bytes.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(prefix_v5 in any::<bool>(), garbage in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut session = session(&[]);
        let connect = if prefix_v5 { v5_connect("c", None) } else { v4_connect("c", 30, None) };
        feed(&mut session, &connect, 0);
        session.accept(false);
        let _ = session.take_output();
        for event in feed(&mut session, &garbage, 1) {
            if let SessionEvent::Publish(publish) = event {
                session.acknowledge(publish.pkid);
            }
        }
        let _ = session.take_output();
        prop_assert!(session.in_flight() <= LIMITS.max_in_flight);
    }

    #[test]
    fn arbitrary_first_bytes_never_panic(garbage in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut session = session(&[]);
        let _ = feed(&mut session, &garbage, 0);
        session.handle_timeout(10_000);
        prop_assert!(session.is_closed());
    }
}
