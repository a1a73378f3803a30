//! One client connection of the embedded broker, as a sans-IO state machine.
//!
//! The shell owns the socket and the clock; this type owns every decision: which protocol
//! the client speaks, whether its CONNECT is accepted, which packets are answered how, when
//! the keep-alive has expired, and when a PUBACK may go out. Bytes come in through
//! [`BrokerSession::input_buffer`], packets to send come out of
//! [`BrokerSession::take_output`], and time only ever enters as a `now_ms` argument, so the
//! tests drive whole conversations without a socket or a sleep.
//!
//! Memory is bounded per client: the input buffer never holds more than one packet of at most
//! `max_packet_bytes` plus one read, and no more than `max_in_flight` QoS 1 messages await
//! their durability signal; while that window is full the session stops parsing (and the
//! shell stops reading), so TCP back-pressures the sensor instead of the agent growing.
//!
//! PUBACKs are written in the order the PUBLISHes arrived (MQTT requires it), each only
//! after the shell reports the message durable through [`BrokerSession::acknowledge`].

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// MQTT protocol revision a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// Per-connection limits, from the source's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Largest packet accepted (remaining length, i.e. without the fixed header).
    pub max_packet_bytes: usize,
    /// QoS 1 messages awaiting durability before the session stops reading; advertised to
    /// MQTT 5 clients as receive-maximum.
    pub max_in_flight: usize,
    /// Time a new connection has to send its CONNECT.
    pub connect_timeout_ms: i64,
}

/// A username and password the broker accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUser {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for BrokerUser {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BrokerUser")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What the session hands the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A valid, authenticated CONNECT: the shell answers with [`BrokerSession::accept`]
    /// (telling whether it holds a session for this client id).
    ConnectRequest {
        client_id: String,
        clean_session: bool,
        protocol: Protocol,
    },
    /// A message to parse and ingest. QoS 1 messages (`pkid` != 0) need an
    /// [`BrokerSession::acknowledge`] once durable (or at once if rejected).
    Publish(InboundPublish),
}

/// One PUBLISH received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPublish {
    pub topic: Bytes,
    pub payload: Bytes,
    /// 0 or 1 (QoS 2 is refused before it gets here).
    pub qos: u8,
    /// Packet identifier; 0 for QoS 0.
    pub pkid: u16,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// Counted reason (a metrics label), e.g. `malformed_packet`.
    pub reason: &'static str,
    /// What happened, for the (rate-limited) log.
    pub detail: String,
    /// True for an orderly end (the client sent DISCONNECT): nothing to count as rejected.
    pub clean: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingConnect,
    AwaitingAccept,
    Connected,
    Closed,
}

enum Decoded {
    V311(v4::Packet),
    /// Boxed: an MQTT 5 packet is several times larger than a 3.1.1 one.
    V5(Box<v5::Packet>),
}

enum DecodeFailure {
    Incomplete,
    TooLarge(usize),
    Malformed(String),
}

/// The state of one client connection.
pub struct BrokerSession {
    limits: SessionLimits,
    users: Arc<[BrokerUser]>,
    admitted: bool,
    connection_id: u64,
    state: State,
    protocol: Protocol,
    client_id: String,
    assigned_client_id: bool,
    keep_alive_ms: i64,
    connect_deadline_ms: i64,
    last_packet_ms: i64,
    input: BytesMut,
    output: BytesMut,
    in_flight: VecDeque<(u16, bool)>,
    close: Option<CloseReason>,
}

impl std::fmt::Debug for BrokerSession {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BrokerSession")
            .field("connection_id", &self.connection_id)
            .field("client_id", &self.client_id)
            .field("state", &self.state)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

/// Bytes one socket read may add beyond a packet (the shell reads into spare capacity).
pub const READ_CHUNK_BYTES: usize = 8 * 1024;

impl BrokerSession {
    /// A new connection accepted at `now_ms`. `admitted` false when the broker is at
    /// `max_connections`: the CONNECT is then answered with "server unavailable/busy".
    /// An empty `users` list accepts any client (with or without credentials).
    pub fn new(
        limits: SessionLimits,
        users: Arc<[BrokerUser]>,
        admitted: bool,
        connection_id: u64,
        now_ms: i64,
    ) -> Self {
        Self {
            limits,
            users,
            admitted,
            connection_id,
            state: State::AwaitingConnect,
            protocol: Protocol::V311,
            client_id: String::new(),
            assigned_client_id: false,
            keep_alive_ms: 0,
            connect_deadline_ms: now_ms.saturating_add(limits.connect_timeout_ms),
            last_packet_ms: now_ms,
            input: BytesMut::with_capacity(READ_CHUNK_BYTES),
            output: BytesMut::new(),
            in_flight: VecDeque::new(),
            close: None,
        }
    }

    /// Where the shell reads socket bytes into (only while [`BrokerSession::wants_read`]).
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        if self.input.capacity() - self.input.len() < READ_CHUNK_BYTES / 4 {
            self.input.reserve(READ_CHUNK_BYTES);
        }
        &mut self.input
    }

    /// Whether the shell should read more bytes now.
    pub fn wants_read(&self) -> bool {
        matches!(self.state, State::AwaitingConnect | State::Connected)
            && self.in_flight.len() < self.limits.max_in_flight
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.close.as_ref()
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// QoS 1 messages received and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Bytes to write to the socket, if any.
    pub fn take_output(&mut self) -> Option<BytesMut> {
        if self.output.is_empty() {
            None
        } else {
            Some(self.output.split())
        }
    }

    /// The end of the socket: the peer closed it or it failed.
    pub fn peer_gone(&mut self, detail: &str) {
        if self.state != State::Closed {
            self.finish("connection_lost", detail.to_owned(), false);
        }
    }

    /// When [`BrokerSession::handle_timeout`] must next be called.
    pub fn next_timeout_ms(&self) -> Option<i64> {
        match self.state {
            State::AwaitingConnect => Some(self.connect_deadline_ms),
            State::Connected if self.keep_alive_ms > 0 => Some(
                self.last_packet_ms
                    .saturating_add(self.keep_alive_ms.saturating_mul(3) / 2),
            ),
            _ => None,
        }
    }

    /// Enforces the CONNECT deadline and the keep-alive (one and a half times the client's
    /// keep-alive without any packet ends the connection, as MQTT specifies).
    pub fn handle_timeout(&mut self, now_ms: i64) {
        let Some(deadline_ms) = self.next_timeout_ms() else {
            return;
        };
        if now_ms < deadline_ms {
            return;
        }
        if self.state == State::AwaitingConnect {
            self.finish(
                "connect_timeout",
                format!(
                    "no CONNECT within {} ms of opening the connection",
                    self.limits.connect_timeout_ms
                ),
                false,
            );
        } else {
            self.close_with(
                "keep_alive_timeout",
                format!(
                    "no packet for 1.5 x the keep-alive of {} s",
                    self.keep_alive_ms / 1000
                ),
                v5::DisconnectReasonCode::KeepAliveTimeout,
            );
        }
    }

    /// Ends the connection from the agent's side (for example: a message could not be made
    /// durable, so it must not be acknowledged; the client resends it after reconnecting).
    pub fn close_by_server(&mut self, reason: &'static str, detail: String) {
        self.close_with(
            reason,
            detail,
            v5::DisconnectReasonCode::ImplementationSpecificError,
        );
    }

    /// Answers the pending CONNECT (after a [`SessionEvent::ConnectRequest`]).
    pub fn accept(&mut self, session_present: bool) {
        if self.state != State::AwaitingAccept {
            return;
        }
        self.state = State::Connected;
        match self.protocol {
            Protocol::V311 => self.write_v4(v4::Packet::ConnAck(v4::ConnAck::new(
                v4::ConnectReturnCode::Success,
                session_present,
            ))),
            Protocol::V5 => {
                let properties = v5::ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: Some(u16::try_from(self.limits.max_in_flight).unwrap_or(u16::MAX)),
                    max_qos: Some(1),
                    retain_available: None,
                    max_packet_size: Some(
                        u32::try_from(self.limits.max_packet_bytes).unwrap_or(u32::MAX),
                    ),
                    assigned_client_identifier: self
                        .assigned_client_id
                        .then(|| self.client_id.clone()),
                    topic_alias_max: None,
                    reason_string: None,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: Some(0),
                    subscription_identifiers_available: Some(0),
                    shared_subscription_available: Some(0),
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                };
                self.write_v5(v5::Packet::ConnAck(v5::ConnAck {
                    session_present,
                    code: v5::ConnectReturnCode::Success,
                    properties: Some(properties),
                }));
            }
        }
    }

    /// Marks the QoS 1 message `pkid` durable (or rejected: nothing to keep) and writes the
    /// PUBACKs now due, oldest first.
    pub fn acknowledge(&mut self, pkid: u16) {
        if let Some(entry) = self
            .in_flight
            .iter_mut()
            .find(|(in_flight, done)| *in_flight == pkid && !*done)
        {
            entry.1 = true;
        }
        while let Some(&(pkid, true)) = self.in_flight.front() {
            self.in_flight.pop_front();
            if self.state != State::Connected {
                continue;
            }
            match self.protocol {
                Protocol::V311 => self.write_v4(v4::Packet::PubAck(v4::PubAck::new(pkid))),
                Protocol::V5 => self.write_v5(v5::Packet::PubAck(v5::PubAck::new(pkid, None))),
            }
        }
    }

    /// Parses the next packet, answering those the session handles itself (PINGREQ,
    /// SUBSCRIBE, ...), and returns the next event for the shell. `None` when more bytes
    /// are needed, the in-flight window is full, a CONNECT awaits its answer, or the session
    /// is closed.
    pub fn poll_event(&mut self, now_ms: i64) -> Option<SessionEvent> {
        loop {
            if !self.wants_read() {
                return None;
            }
            let decoded = match self.decode() {
                Ok(decoded) => decoded,
                Err(DecodeFailure::Incomplete) => return None,
                Err(DecodeFailure::TooLarge(bytes)) => {
                    self.close_with(
                        "packet_too_large",
                        format!(
                            "packet of {bytes} bytes exceeds max_packet_bytes = {}",
                            self.limits.max_packet_bytes
                        ),
                        v5::DisconnectReasonCode::PacketTooLarge,
                    );
                    return None;
                }
                Err(DecodeFailure::Malformed(detail)) => {
                    self.close_with(
                        "malformed_packet",
                        detail,
                        v5::DisconnectReasonCode::MalformedPacket,
                    );
                    return None;
                }
            };
            self.last_packet_ms = now_ms;
            let event = match decoded {
                Decoded::V311(packet) => self.handle_v4(packet),
                Decoded::V5(packet) => self.handle_v5(*packet),
            };
            if event.is_some() {
                return event;
            }
        }
    }

    fn decode(&mut self) -> Result<Decoded, DecodeFailure> {
        if self.state == State::AwaitingConnect {
            self.protocol = match peek_connect_level(&self.input)? {
                4 => Protocol::V311,
                5 => Protocol::V5,
                level => {
                    // 3.1 (level 3, "MQIsdp") and anything else: refuse with the 3.1.1 code
                    // every revision understands.
                    self.write_v4(v4::Packet::ConnAck(v4::ConnAck::new(
                        v4::ConnectReturnCode::RefusedProtocolVersion,
                        false,
                    )));
                    return Err(DecodeFailure::Malformed(format!(
                        "unsupported MQTT protocol level {level}; use MQTT 3.1.1 or 5.0"
                    )));
                }
            };
        }
        let max_packet_bytes = self.limits.max_packet_bytes;
        let input = &mut self.input;
        // The packet codecs are rumqttc's; untrusted bytes must not take the agent down even
        // if one of them has a bug, so a panic in them becomes a malformed packet.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode_packet(self.protocol, input, max_packet_bytes)
        }));
        match result {
            Ok(result) => result,
            Err(_) => Err(DecodeFailure::Malformed(
                "the packet decoder failed on this input".to_owned(),
            )),
        }
    }

    fn handle_v4(&mut self, packet: v4::Packet) -> Option<SessionEvent> {
        if self.state == State::AwaitingConnect {
            let v4::Packet::Connect(connect) = packet else {
                self.finish(
                    "protocol_error",
                    "the first packet is not CONNECT".to_owned(),
                    false,
                );
                return None;
            };
            let login = connect.login.map(|login| (login.username, login.password));
            return self.connect(
                connect.client_id,
                connect.clean_session,
                connect.keep_alive,
                login,
            );
        }
        match packet {
            v4::Packet::Publish(publish) => {
                let qos = publish.qos as u8;
                self.publish(
                    Bytes::from(publish.topic),
                    publish.payload,
                    qos,
                    publish.pkid,
                )
            }
            v4::Packet::PingReq => {
                self.write_v4(v4::Packet::PingResp);
                None
            }
            v4::Packet::Subscribe(subscribe) => {
                let codes = subscribe
                    .filters
                    .iter()
                    .map(|_| v4::SubscribeReasonCode::Failure)
                    .collect();
                self.write_v4(v4::Packet::SubAck(v4::SubAck::new(subscribe.pkid, codes)));
                None
            }
            v4::Packet::Unsubscribe(unsubscribe) => {
                self.write_v4(v4::Packet::UnsubAck(v4::UnsubAck::new(unsubscribe.pkid)));
                None
            }
            v4::Packet::Disconnect => {
                self.finish("disconnect", "the client disconnected".to_owned(), true);
                None
            }
            v4::Packet::Connect(_) => {
                self.finish(
                    "protocol_error",
                    "a second CONNECT on one connection".to_owned(),
                    false,
                );
                None
            }
            other => {
                let name = v4_packet_name(&other);
                self.finish(
                    "protocol_error",
                    format!("unexpected {name} from a client (this broker sends no messages)"),
                    false,
                );
                None
            }
        }
    }

    fn handle_v5(&mut self, packet: v5::Packet) -> Option<SessionEvent> {
        if self.state == State::AwaitingConnect {
            let v5::Packet::Connect(connect, _will, login) = packet else {
                self.finish(
                    "protocol_error",
                    "the first packet is not CONNECT".to_owned(),
                    false,
                );
                return None;
            };
            let login = login.map(|login| (login.username, login.password));
            return self.connect(
                connect.client_id,
                connect.clean_start,
                connect.keep_alive,
                login,
            );
        }
        match packet {
            v5::Packet::Publish(publish) => {
                if publish
                    .properties
                    .as_ref()
                    .is_some_and(|properties| properties.topic_alias.is_some())
                {
                    self.close_with(
                        "protocol_error",
                        "topic alias used, but this broker allows none (topic alias maximum 0)"
                            .to_owned(),
                        v5::DisconnectReasonCode::TopicAliasInvalid,
                    );
                    return None;
                }
                let qos = publish.qos as u8;
                self.publish(publish.topic, publish.payload, qos, publish.pkid)
            }
            v5::Packet::PingReq(_) => {
                self.write_v5(v5::Packet::PingResp(v5::PingResp));
                None
            }
            v5::Packet::Subscribe(subscribe) => {
                let return_codes = subscribe
                    .filters
                    .iter()
                    .map(|_| v5::SubscribeReasonCode::ImplementationSpecific)
                    .collect();
                self.write_v5(v5::Packet::SubAck(v5::SubAck {
                    pkid: subscribe.pkid,
                    return_codes,
                    properties: None,
                }));
                None
            }
            v5::Packet::Unsubscribe(unsubscribe) => {
                let reasons = unsubscribe
                    .filters
                    .iter()
                    .map(|_| v5::UnsubAckReason::NoSubscriptionExisted)
                    .collect();
                self.write_v5(v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: unsubscribe.pkid,
                    reasons,
                    properties: None,
                }));
                None
            }
            v5::Packet::Disconnect(_) => {
                self.finish("disconnect", "the client disconnected".to_owned(), true);
                None
            }
            v5::Packet::Connect(..) => {
                self.close_with(
                    "protocol_error",
                    "a second CONNECT on one connection".to_owned(),
                    v5::DisconnectReasonCode::ProtocolError,
                );
                None
            }
            other => {
                let name = v5_packet_name(&other);
                self.close_with(
                    "protocol_error",
                    format!("unexpected {name} from a client (this broker sends no messages)"),
                    v5::DisconnectReasonCode::ProtocolError,
                );
                None
            }
        }
    }

    fn connect(
        &mut self,
        client_id: String,
        clean_session: bool,
        keep_alive_s: u16,
        login: Option<(String, String)>,
    ) -> Option<SessionEvent> {
        if !self.admitted {
            self.refuse(
                v4::ConnectReturnCode::ServiceUnavailable,
                v5::ConnectReturnCode::ServerBusy,
                "max_connections",
                "the broker is at max_connections".to_owned(),
            );
            return None;
        }
        if !self.users.is_empty() {
            let allowed = login.as_ref().is_some_and(|(username, password)| {
                self.users.iter().any(|user| {
                    user.username == *username
                        && constant_time_equal(user.password.as_bytes(), password.as_bytes())
                })
            });
            if !allowed {
                let who = login.map_or_else(
                    || "no username".to_owned(),
                    |(username, _)| format!("username `{}`", crate::source::excerpt(&username)),
                );
                self.refuse(
                    v4::ConnectReturnCode::BadUserNamePassword,
                    v5::ConnectReturnCode::BadUserNamePassword,
                    "bad_credentials",
                    format!("{who}: not in the configured users or wrong password"),
                );
                return None;
            }
        }
        let client_id = if client_id.is_empty() {
            if self.protocol == Protocol::V311 && !clean_session {
                self.refuse(
                    v4::ConnectReturnCode::BadClientId,
                    v5::ConnectReturnCode::ClientIdentifierNotValid,
                    "bad_client_id",
                    "empty client id with a persistent session".to_owned(),
                );
                return None;
            }
            self.assigned_client_id = true;
            format!("tributary-assigned-{}", self.connection_id)
        } else {
            client_id
        };
        self.client_id = client_id.clone();
        self.keep_alive_ms = i64::from(keep_alive_s) * 1000;
        self.state = State::AwaitingAccept;
        Some(SessionEvent::ConnectRequest {
            client_id,
            clean_session,
            protocol: self.protocol,
        })
    }

    fn publish(
        &mut self,
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        pkid: u16,
    ) -> Option<SessionEvent> {
        match qos {
            0 => {}
            1 => self.in_flight.push_back((pkid, false)),
            _ => {
                // MQTT 5 clients were told max QoS 1 in the CONNACK; 3.1.1 has no way to say it.
                self.close_with(
                    "qos2_not_supported",
                    "QoS 2 publish; this broker accepts QoS 0 and 1 (QoS 1 is acknowledged once durable)".to_owned(),
                    v5::DisconnectReasonCode::QoSNotSupported,
                );
                return None;
            }
        }
        Some(SessionEvent::Publish(InboundPublish {
            topic,
            payload,
            qos,
            pkid,
        }))
    }

    fn refuse(
        &mut self,
        code_v4: v4::ConnectReturnCode,
        code_v5: v5::ConnectReturnCode,
        reason: &'static str,
        detail: String,
    ) {
        match self.protocol {
            Protocol::V311 => self.write_v4(v4::Packet::ConnAck(v4::ConnAck::new(code_v4, false))),
            Protocol::V5 => self.write_v5(v5::Packet::ConnAck(v5::ConnAck {
                session_present: false,
                code: code_v5,
                properties: None,
            })),
        }
        self.finish(reason, detail, false);
    }

    /// Closes, telling an MQTT 5 client why with a DISCONNECT (3.1.1 has no server DISCONNECT).
    fn close_with(&mut self, reason: &'static str, detail: String, code: v5::DisconnectReasonCode) {
        if self.state == State::Closed {
            return;
        }
        if self.protocol == Protocol::V5 && self.state == State::Connected {
            // Written by hand: rumqttc 0.25 announces a remaining length of 1 for a
            // DISCONNECT with a reason code but writes 2 bytes (reason and an empty
            // property length); this is the same packet with the right length.
            self.output
                .extend_from_slice(&[0xE0, 0x02, code as u8, 0x00]);
        }
        self.finish(reason, detail, false);
    }

    fn finish(&mut self, reason: &'static str, detail: String, clean: bool) {
        self.state = State::Closed;
        self.in_flight.clear();
        self.input = BytesMut::new();
        self.close = Some(CloseReason {
            reason,
            detail,
            clean,
        });
    }

    fn write_v4(&mut self, packet: v4::Packet) {
        if let Err(error) = packet.write(&mut self.output, usize::MAX) {
            tracing::debug!(%error, "cannot encode an MQTT 3.1.1 packet");
        }
    }

    fn write_v5(&mut self, packet: v5::Packet) {
        if let Err(error) = packet.write(&mut self.output, None) {
            tracing::debug!(%error, "cannot encode an MQTT 5 packet");
        }
    }
}

/// The protocol level of the CONNECT at the start of `input`, once enough bytes are there.
fn peek_connect_level(input: &[u8]) -> Result<u8, DecodeFailure> {
    let Some(&first) = input.first() else {
        return Err(DecodeFailure::Incomplete);
    };
    if first >> 4 != 1 {
        return Err(DecodeFailure::Malformed(format!(
            "the first packet is not CONNECT (packet type {})",
            first >> 4
        )));
    }
    // Remaining length: 1 to 4 bytes of 7 bits each.
    let mut offset = 1;
    loop {
        let Some(&byte) = input.get(offset) else {
            return Err(DecodeFailure::Incomplete);
        };
        offset += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if offset > 4 {
            return Err(DecodeFailure::Malformed(
                "remaining length longer than 4 bytes".to_owned(),
            ));
        }
    }
    let name_length = match (input.get(offset), input.get(offset + 1)) {
        (Some(&high), Some(&low)) => usize::from(u16::from_be_bytes([high, low])),
        _ => return Err(DecodeFailure::Incomplete),
    };
    if name_length > 6 {
        return Err(DecodeFailure::Malformed(format!(
            "CONNECT protocol name of {name_length} bytes; expected `MQTT`"
        )));
    }
    match input.get(offset + 2 + name_length) {
        Some(&level) => Ok(level),
        None => Err(DecodeFailure::Incomplete),
    }
}

fn decode_packet(
    protocol: Protocol,
    input: &mut BytesMut,
    max_packet_bytes: usize,
) -> Result<Decoded, DecodeFailure> {
    match protocol {
        Protocol::V311 => match v4::Packet::read(input, max_packet_bytes) {
            Ok(packet) => Ok(Decoded::V311(packet)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Err(DecodeFailure::Incomplete),
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(bytes)) => {
                Err(DecodeFailure::TooLarge(bytes))
            }
            Err(error) => Err(DecodeFailure::Malformed(error.to_string())),
        },
        Protocol::V5 => {
            // rumqttc refuses the 2-byte DISCONNECT MQTT 5 allows (reason code 0 omitted).
            if input.len() >= 2 && input[0] == 0xE0 && input[1] == 0 {
                let _ = input.split_to(2);
                return Ok(Decoded::V5(Box::new(v5::Packet::Disconnect(
                    v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection),
                ))));
            }
            let max = u32::try_from(max_packet_bytes).unwrap_or(u32::MAX);
            match v5::Packet::read(input, Some(max)) {
                Ok(packet) => Ok(Decoded::V5(Box::new(packet))),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {
                    Err(DecodeFailure::Incomplete)
                }
                Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded {
                    pkt_size, ..
                }) => Err(DecodeFailure::TooLarge(pkt_size)),
                Err(error) => Err(DecodeFailure::Malformed(error.to_string())),
            }
        }
    }
}

fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

fn v4_packet_name(packet: &v4::Packet) -> &'static str {
    match packet {
        v4::Packet::ConnAck(_) => "CONNACK",
        v4::Packet::PubAck(_) => "PUBACK",
        v4::Packet::PubRec(_) => "PUBREC",
        v4::Packet::PubRel(_) => "PUBREL",
        v4::Packet::PubComp(_) => "PUBCOMP",
        v4::Packet::SubAck(_) => "SUBACK",
        v4::Packet::UnsubAck(_) => "UNSUBACK",
        v4::Packet::PingResp => "PINGRESP",
        _ => "packet",
    }
}

fn v5_packet_name(packet: &v5::Packet) -> &'static str {
    match packet {
        v5::Packet::Auth(_) => "AUTH (enhanced authentication is not supported)",
        v5::Packet::ConnAck(_) => "CONNACK",
        v5::Packet::PubAck(_) => "PUBACK",
        v5::Packet::PubRec(_) => "PUBREC",
        v5::Packet::PubRel(_) => "PUBREL",
        v5::Packet::PubComp(_) => "PUBCOMP",
        v5::Packet::SubAck(_) => "SUBACK",
        v5::Packet::UnsubAck(_) => "UNSUBACK",
        v5::Packet::PingResp(_) => "PINGRESP",
        _ => "packet",
    }
}
