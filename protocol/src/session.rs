//! The messages an agent and a collector exchange over one QUIC connection.
//!
//! Why it looks like this: the connection negotiates ALPN [`ALPN`]; the agent opens a
//! bidirectional control stream and sends [`Hello`]; the collector answers [`Welcome`]
//! (with the limits the agent must respect) or [`Reject`] (with a typed reason the agent
//! acts on: retry later, or stop and tell the operator). Then every batch travels on its
//! own bidirectional stream: the agent sends one `Batch` frame (the bytes encoded by
//! [`crate::batch`], opaque here), the collector answers [`Ack`] once the batch is durable
//! in the log, or [`Nack`] saying whether a retry can help. One stream per batch means a
//! slow or lost batch never blocks another (live data first, backlog in parallel).
//!
//! Every message is one frame ([`crate::frame`]); control messages are postcard-encoded.
//! Decoding is strict: unknown kinds, trailing bytes and over-long strings are errors.
//! Postcard allocates for strings, so the control-frame limit bounds what a hostile peer
//! can make us allocate, and field lengths are validated right after decoding.

use serde::{Deserialize, Serialize};

use crate::frame::{write_frame, write_frame_with, FrameError, FrameKind, FrameLimits, FrameRef};

/// The QUIC ALPN identifier of this protocol.
pub const ALPN: &[u8] = b"tributary/1";

/// The newest protocol version this build speaks. Bumped on any change of message layout
/// after the hello.
///
/// Upgrades in either order: the [`Hello`] layout is frozen (it only grows a new message
/// kind, never changes), the agent announces the newest version it speaks, and the
/// collector answers in [`Welcome::protocol_version`] with the version the session uses,
/// [`negotiate_version`]: the lower of the two newest. Each side keeps speaking every
/// version from [`MIN_PROTOCOL_VERSION`] up, so an old agent works with a new collector and
/// a new agent with an old collector, as long as their ranges overlap.
///
/// Version 2: batches may use batch format 2 (compact summaries); in a version 1 session
/// the agent sends format 1 ([`crate::batch::format_version_for_protocol`]).
/// Version 3: batches may use batch format 3 (compact series definitions); in a version 2
/// session the agent sends format 2.
pub const PROTOCOL_VERSION: u16 = 3;

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The version a session uses, given the newest version the agent speaks (its hello) and the
/// range `[min, newest]` the collector speaks; `None` when the ranges do not overlap (the
/// agent is older than everything the collector still speaks).
pub fn negotiate_version(
    agent_newest: u16,
    collector_min: u16,
    collector_newest: u16,
) -> Option<u16> {
    let version = agent_newest.min(collector_newest);
    (version >= collector_min).then_some(version)
}

/// Whether a welcome's session version is one this build speaks.
pub fn speaks_version(version: u16) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// Longest agent id: 1 to 128 bytes of ASCII letters, digits, `-`, `_`, `.`, `:`. The id
/// ends up in log keys, table rows and file names, so it is kept boring.
pub const MAX_AGENT_ID_BYTES: usize = 128;
/// Longest authentication token.
pub const MAX_TOKEN_BYTES: usize = 512;
/// Longest agent version string (e.g. `0.1.0+abcdef`).
pub const MAX_AGENT_VERSION_BYTES: usize = 64;
/// Longest human-readable message in a reject or nack.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// What the agent still has to send, so the collector can plan for the backlog drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backlog {
    /// Batches buffered on disk, not yet acknowledged.
    pub batches: u64,
    /// Their encoded size.
    pub bytes: u64,
    /// Event time of the oldest reading not yet sent, if any.
    pub oldest_unsent_time_ms: Option<i64>,
}

/// Agent -> collector, first message of a connection.
///
/// `protocol_version` is the first field so a collector can read it from a hello of any
/// future layout and answer with a typed reject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_id: String,
    pub token: String,
    pub agent_version: String,
    pub backlog: Backlog,
}

/// Limits the collector imposes on this session; the agent sizes its batches to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerLimits {
    /// Largest frame the collector accepts (so the largest encoded batch + 1).
    pub max_frame_bytes: u32,
    pub max_series_per_batch: u32,
    pub max_readings_per_batch: u32,
    /// Batch streams the agent may have open (unacknowledged) at once.
    pub max_in_flight_batches: u32,
}

/// Collector -> agent: the hello was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub session_id: u64,
    pub protocol_version: u16,
    /// The collector's clock when it welcomed the agent: lets the agent notice a wrong
    /// clock before it stamps readings with it.
    pub server_time_ms: i64,
    pub limits: ServerLimits,
}

/// Why a hello was refused. The agent's reaction depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectReason {
    /// Versions do not match: stop and tell the operator to upgrade.
    UnsupportedProtocolVersion,
    /// Unknown agent id or wrong token: stop and tell the operator.
    Unauthorized,
    /// The hello broke a rule (field length, agent id characters): a bug in the agent.
    InvalidHello,
    /// Another connection of the same agent id is live: retry after a delay.
    AgentAlreadyConnected,
    /// The collector is saturated: retry after `retry_after_ms`.
    Overloaded,
    /// The collector is shutting down: reconnect (possibly elsewhere).
    ShuttingDown,
}

impl RejectReason {
    /// Whether reconnecting later can succeed without an operator changing something.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            RejectReason::AgentAlreadyConnected
                | RejectReason::Overloaded
                | RejectReason::ShuttingDown
        )
    }
}

/// Collector -> agent: the hello was refused; the connection closes after this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub reason: RejectReason,
    pub message: String,
    /// Suggested delay before reconnecting, for retryable reasons.
    pub retry_after_ms: Option<u32>,
}

impl Reject {
    /// A reject whose message is cut (at a character boundary) to [`MAX_MESSAGE_BYTES`].
    pub fn new(
        reason: RejectReason,
        message: impl Into<String>,
        retry_after_ms: Option<u32>,
    ) -> Self {
        Reject {
            reason,
            message: truncate_message(message.into()),
            retry_after_ms,
        }
    }
}

/// Collector -> agent on a batch stream: the batch is durable; the agent may delete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ack {
    pub batch_seq: u64,
}

/// Why a batch was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NackReason {
    /// The batch bytes did not decode: retrying the same bytes cannot help.
    Malformed,
    /// The batch is over the session's limits: the agent must split it.
    TooLarge,
    /// The batch refers to series the collector does not know in this session.
    UnknownSeries,
    /// The same sequence number arrived earlier with different content.
    SequenceConflict,
    /// Backpressure: the collector cannot take it now.
    Overloaded,
    /// The durable log is unreachable.
    StorageUnavailable,
    /// A bug or unexpected failure on the collector.
    Internal,
}

/// Collector -> agent on a batch stream: the batch was not stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    /// The batch's sequence number, or 0 when it could not be decoded far enough to read
    /// it (the stream still identifies the batch).
    pub batch_seq: u64,
    pub reason: NackReason,
    /// Whether resending the same batch later can succeed.
    pub retryable: bool,
    pub message: String,
}

impl Nack {
    /// A nack whose message is cut (at a character boundary) to [`MAX_MESSAGE_BYTES`].
    pub fn new(
        batch_seq: u64,
        reason: NackReason,
        retryable: bool,
        message: impl Into<String>,
    ) -> Self {
        Nack {
            batch_seq,
            reason,
            retryable,
            message: truncate_message(message.into()),
        }
    }
}

fn truncate_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}

/// Any message of the session protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Reject(Reject),
    /// An encoded batch ([`crate::batch`]), carried as opaque bytes.
    Batch(Vec<u8>),
    Ack(Ack),
    Nack(Nack),
}

fn check_length(
    kind: FrameKind,
    field: &'static str,
    value: &str,
    max_bytes: usize,
) -> Result<(), FrameError> {
    if value.len() > max_bytes {
        Err(FrameError::FieldTooLong {
            kind,
            field,
            length_bytes: value.len(),
            max_bytes,
        })
    } else {
        Ok(())
    }
}

/// Whether `agent_id` follows the rules of [`MAX_AGENT_ID_BYTES`].
pub fn is_valid_agent_id(agent_id: &str) -> bool {
    !agent_id.is_empty()
        && agent_id.len() <= MAX_AGENT_ID_BYTES
        && agent_id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b':'))
}

impl Hello {
    /// Checks the field rules; both the agent (before sending) and the collector (after
    /// decoding) run it.
    pub fn validate(&self) -> Result<(), FrameError> {
        let kind = FrameKind::Hello;
        check_length(kind, "agent_id", &self.agent_id, MAX_AGENT_ID_BYTES)?;
        if !is_valid_agent_id(&self.agent_id) {
            return Err(FrameError::InvalidField {
                kind,
                field: "agent_id",
                problem: "must be 1 to 128 ASCII letters, digits, '-', '_', '.' or ':'",
            });
        }
        check_length(kind, "token", &self.token, MAX_TOKEN_BYTES)?;
        check_length(
            kind,
            "agent_version",
            &self.agent_version,
            MAX_AGENT_VERSION_BYTES,
        )
    }
}

impl Message {
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Hello(_) => FrameKind::Hello,
            Message::Welcome(_) => FrameKind::Welcome,
            Message::Reject(_) => FrameKind::Reject,
            Message::Batch(_) => FrameKind::Batch,
            Message::Ack(_) => FrameKind::Ack,
            Message::Nack(_) => FrameKind::Nack,
        }
    }

    /// Checks the field rules of the message (lengths, agent id characters).
    pub fn validate(&self) -> Result<(), FrameError> {
        match self {
            Message::Hello(hello) => hello.validate(),
            Message::Reject(reject) => check_length(
                FrameKind::Reject,
                "message",
                &reject.message,
                MAX_MESSAGE_BYTES,
            ),
            Message::Nack(nack) => {
                check_length(FrameKind::Nack, "message", &nack.message, MAX_MESSAGE_BYTES)
            }
            Message::Welcome(_) | Message::Batch(_) | Message::Ack(_) => Ok(()),
        }
    }

    /// Appends the message as one frame to `out`, after validating it and checking it
    /// against the receiver's `limits`. On error `out` is unchanged.
    pub fn encode(&self, limits: &FrameLimits, out: &mut Vec<u8>) -> Result<(), FrameError> {
        self.validate()?;
        let kind = self.kind();
        match self {
            Message::Batch(bytes) => write_frame(kind, bytes, limits, out),
            Message::Hello(hello) => write_postcard_frame(kind, hello, limits, out),
            Message::Welcome(welcome) => write_postcard_frame(kind, welcome, limits, out),
            Message::Reject(reject) => write_postcard_frame(kind, reject, limits, out),
            Message::Ack(ack) => write_postcard_frame(kind, ack, limits, out),
            Message::Nack(nack) => write_postcard_frame(kind, nack, limits, out),
        }
    }

    /// The message as one frame in a new buffer.
    pub fn encode_to_vec(&self, limits: &FrameLimits) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode(limits, &mut out)?;
        Ok(out)
    }

    /// Decodes and validates the message a frame carries. The frame came through
    /// [`crate::frame::Frame::check`], so its size is already within the limits.
    pub fn decode(frame: FrameRef<'_>) -> Result<Message, FrameError> {
        let kind = frame.kind;
        let payload = frame.payload;
        let message = match kind {
            FrameKind::Batch => Message::Batch(payload.to_vec()),
            FrameKind::Hello => {
                // Read the version alone first: a hello from an agent older than anything
                // this build speaks deserves a typed answer, not a decode error. Newer
                // agents are fine: the hello layout is frozen and the welcome negotiates.
                let (received, _) = postcard::take_from_bytes::<u16>(payload)
                    .map_err(|source| FrameError::Payload { kind, source })?;
                if negotiate_version(received, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION).is_none() {
                    return Err(FrameError::UnsupportedProtocolVersion {
                        received,
                        supported: MIN_PROTOCOL_VERSION,
                    });
                }
                Message::Hello(decode_exact(kind, payload)?)
            }
            FrameKind::Welcome => Message::Welcome(decode_exact(kind, payload)?),
            FrameKind::Reject => Message::Reject(decode_exact(kind, payload)?),
            FrameKind::Ack => Message::Ack(decode_exact(kind, payload)?),
            FrameKind::Nack => Message::Nack(decode_exact(kind, payload)?),
        };
        message.validate()?;
        Ok(message)
    }
}

/// Appends `value`, postcard-encoded, as one frame of `kind`.
fn write_postcard_frame<T: Serialize>(
    kind: FrameKind,
    value: &T,
    limits: &FrameLimits,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    write_frame_with(
        kind,
        limits,
        out,
        |out| postcard_extend(value, out),
        |source| FrameError::Encode { kind, source },
    )
}

fn postcard_extend<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    let taken = std::mem::take(out);
    *out = postcard::to_extend(value, taken)?;
    Ok(())
}

fn decode_exact<'a, T: Deserialize<'a>>(
    kind: FrameKind,
    payload: &'a [u8],
) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes(payload)
        .map_err(|source| FrameError::Payload { kind, source })?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes {
            kind,
            extra_bytes: rest.len(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, FrameDecoder};

    #[test]
    fn sessions_use_the_newest_version_both_sides_speak() {
        // Same versions.
        assert_eq!(negotiate_version(1, 1, 1), Some(1));
        // Agent upgraded first: the old collector's newest wins.
        assert_eq!(negotiate_version(3, 1, 1), Some(1));
        // Collector upgraded first: it still speaks the agent's version.
        assert_eq!(negotiate_version(1, 1, 3), Some(1));
        assert_eq!(negotiate_version(2, 1, 3), Some(2));
        // An agent older than anything the collector still speaks.
        assert_eq!(negotiate_version(1, 2, 3), None);
        assert!(speaks_version(PROTOCOL_VERSION));
        assert!(!speaks_version(PROTOCOL_VERSION + 1));
    }

    #[test]
    fn a_hello_from_a_newer_agent_decodes_and_an_older_one_gets_a_typed_error() {
        let limits = FrameLimits::DEFAULT;
        let mut newer = hello();
        newer.protocol_version = PROTOCOL_VERSION + 1;
        let bytes = Message::Hello(newer.clone())
            .encode_to_vec(&limits)
            .unwrap();
        let frame = Frame::parse(&bytes, &limits).unwrap().0;
        assert_eq!(Message::decode(frame).ok(), Some(Message::Hello(newer)));
        let mut older = hello();
        older.protocol_version = MIN_PROTOCOL_VERSION - 1;
        let bytes = Message::Hello(older).encode_to_vec(&limits).unwrap();
        let frame = Frame::parse(&bytes, &limits).unwrap().0;
        assert!(matches!(
            Message::decode(frame),
            Err(FrameError::UnsupportedProtocolVersion { received: 0, .. })
        ));
    }

    fn hello() -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: "gw-0017".into(),
            token: "secret".into(),
            agent_version: "0.1.0".into(),
            backlog: Backlog {
                batches: 3,
                bytes: 4096,
                oldest_unsent_time_ms: Some(1_700_000_000_000),
            },
        }
    }

    #[test]
    fn hello_round_trips_through_a_frame() {
        let limits = FrameLimits::DEFAULT;
        let bytes = Message::Hello(hello()).encode_to_vec(&limits).unwrap();
        let (frame, used) = Frame::parse(&bytes, &limits).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(Message::decode(frame).unwrap(), Message::Hello(hello()));
    }

    #[test]
    fn invalid_agent_ids_are_refused_on_both_ends() {
        let mut bad = hello();
        bad.agent_id = "gw 17/../x".into();
        let error = Message::Hello(bad.clone())
            .encode_to_vec(&FrameLimits::DEFAULT)
            .unwrap_err();
        assert!(
            matches!(
                error,
                FrameError::InvalidField {
                    field: "agent_id",
                    ..
                }
            ),
            "{error}"
        );
        let payload = postcard::to_allocvec(&bad).unwrap();
        let error = Message::decode(FrameRef {
            kind: FrameKind::Hello,
            payload: &payload,
        })
        .unwrap_err();
        assert!(
            matches!(
                error,
                FrameError::InvalidField {
                    field: "agent_id",
                    ..
                }
            ),
            "{error}"
        );
        let mut long = hello();
        long.token = "t".repeat(MAX_TOKEN_BYTES + 1);
        let payload = postcard::to_allocvec(&long).unwrap();
        let error = Message::decode(FrameRef {
            kind: FrameKind::Hello,
            payload: &payload,
        })
        .unwrap_err();
        assert!(matches!(
            error,
            FrameError::FieldTooLong {
                field: "token",
                length_bytes: 513,
                max_bytes: 512,
                ..
            }
        ));
    }

    #[test]
    fn a_hello_older_than_every_version_spoken_gets_a_typed_error_whatever_its_layout() {
        let payload = postcard::to_allocvec(&(0u16, "an ancient layout", 7u8)).unwrap();
        let error = Message::decode(FrameRef {
            kind: FrameKind::Hello,
            payload: &payload,
        })
        .unwrap_err();
        assert!(matches!(
            error,
            FrameError::UnsupportedProtocolVersion {
                received: 0,
                supported: MIN_PROTOCOL_VERSION
            }
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut payload = postcard::to_allocvec(&Ack { batch_seq: 9 }).unwrap();
        payload.push(0);
        let error = Message::decode(FrameRef {
            kind: FrameKind::Ack,
            payload: &payload,
        })
        .unwrap_err();
        assert!(matches!(
            error,
            FrameError::TrailingBytes {
                kind: FrameKind::Ack,
                extra_bytes: 1
            }
        ));
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let nack = Nack::new(5, NackReason::Internal, true, "é".repeat(MAX_MESSAGE_BYTES));
        assert!(nack.message.len() <= MAX_MESSAGE_BYTES);
        assert!(nack.message.len() >= MAX_MESSAGE_BYTES - 1);
        let mut decoder = FrameDecoder::new(FrameLimits::DEFAULT);
        decoder.feed(
            &Message::Nack(nack.clone())
                .encode_to_vec(&FrameLimits::DEFAULT)
                .unwrap(),
        );
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(Message::decode(frame).unwrap(), Message::Nack(nack));
    }
}
