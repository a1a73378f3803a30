//! The decisions of ingest, without IO: what to answer to the bytes of a hello stream,
//! to the bytes of a batch stream, and to the batch inside.
//!
//! Why a module of its own: everything an agent's bytes can steer is decided here, by
//! plain functions that take bytes, the session dictionary and limits, and return an
//! answer (welcome, reject, ack-ready record, nack, or close for a protocol violation).
//! The QUIC shell ([`super::server`]) owns sockets, timeouts, the per-agent sequence
//! windows, the rate limiter and the log, and calls these functions in order:
//!
//! 1. hello stream: [`StreamFrameReader`] (control limits) -> [`decide_hello`];
//! 2. each batch stream: [`StreamFrameReader`] (batch limits) -> [`decide_batch_stream`]
//!    -> [`admit_batch`] (header, owner) -> duplicate check (shell) -> [`prepare_batch`]
//!    (decode, session dictionary, self-contained record) -> durable append (shell) -> ack.
//!
//! The fuzz target `ingest_stream` (`fuzz/fuzz_targets/ingest_stream.rs`) compiles this
//! very file (it includes it by path) and drives the same sequence with arbitrary bytes,
//! so what the fuzzer shows (no panic, bounded buffering, every answer encodable, every
//! record self-contained) holds for the server. Keep this file's imports to `std` and
//! `tributary_protocol` so the fuzz crate can build it without the collector.

use std::sync::Mutex;

use tributary_protocol::batch::{
    decode_batch_header, replace_series_definitions, series_ids_used, DictionaryError,
    ReceiverSessionDictionary,
};
use tributary_protocol::frame::{Frame, FrameDecoder, FrameError, FrameKind, FrameLimits};
use tributary_protocol::session::{Hello, Message, Nack, NackReason, Reject, RejectReason};
use tributary_protocol::{decode_batch, BatchError, BatchLimits, SeriesDef};

/// Limits on the hello stream: it carries one control frame, never a batch.
pub const HELLO_FRAME_LIMITS: FrameLimits = FrameLimits {
    max_frame_bytes: FrameLimits::DEFAULT.max_control_frame_bytes,
    max_control_frame_bytes: FrameLimits::DEFAULT.max_control_frame_bytes,
};

/// Where reading the one frame a stream carries stands.
#[derive(Debug)]
pub enum ReadProgress {
    /// No whole frame yet: read more.
    NeedMore,
    /// The frame is whole; bytes after it are ignored.
    Frame(Frame),
    /// The bytes cannot be a frame within the limits (checked from the header, before
    /// the frame is buffered whole).
    Failed(FrameError),
    /// The stream ended before a whole frame arrived.
    EndedEarly,
}

/// Assembles the single frame of a stream from the chunks the transport delivers.
///
/// Buffering is bounded: the decoder refuses a header announcing more than the limit,
/// and the caller stops at the first whole frame, so at most one frame plus one chunk
/// is ever held.
#[derive(Debug)]
pub struct StreamFrameReader {
    decoder: FrameDecoder,
}

impl StreamFrameReader {
    pub fn new(limits: FrameLimits) -> Self {
        StreamFrameReader {
            decoder: FrameDecoder::new(limits),
        }
    }

    /// Takes the next chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) -> ReadProgress {
        self.decoder.feed(chunk);
        self.poll()
    }

    /// The stream ended (the peer finished it).
    pub fn finish(&mut self) -> ReadProgress {
        match self.poll() {
            ReadProgress::NeedMore => ReadProgress::EndedEarly,
            other => other,
        }
    }

    /// Bytes held, waiting for the rest of a frame.
    pub fn buffered_bytes(&self) -> usize {
        self.decoder.buffered_bytes()
    }

    fn poll(&mut self) -> ReadProgress {
        match self.decoder.next_owned_frame() {
            Ok(Some(frame)) => ReadProgress::Frame(frame),
            Ok(None) => ReadProgress::NeedMore,
            Err(error) => ReadProgress::Failed(error),
        }
    }
}

/// What to do with a connection after its hello stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloDecision {
    /// Authenticated: send a welcome and serve batch streams.
    Accept(Hello),
    /// Send this reject, then close the connection.
    Reject(Reject),
    /// Close the connection for a protocol violation, with this reason.
    Violation(String),
    /// The agent went away before a whole hello: drop the connection quietly.
    Abandon,
}

/// Decides about a connection from the progress of its hello stream; `None` while more
/// bytes are needed. `authenticate` checks the agent id and token (a failure carries the
/// reason the agent is told); it runs only on a well-formed hello while not shutting down.
pub fn decide_hello(
    progress: ReadProgress,
    shutting_down: bool,
    authenticate: impl FnOnce(&Hello) -> Result<(), String>,
) -> Option<HelloDecision> {
    let frame = match progress {
        ReadProgress::NeedMore => return None,
        ReadProgress::EndedEarly => return Some(HelloDecision::Abandon),
        ReadProgress::Failed(error) => {
            return Some(HelloDecision::Violation(format!("first stream: {error}")))
        }
        ReadProgress::Frame(frame) => frame,
    };
    let hello = match Message::decode(frame.as_ref()) {
        Ok(Message::Hello(hello)) => hello,
        Ok(other) => {
            return Some(HelloDecision::Violation(format!(
                "expected a hello on the first stream, got a {} frame",
                other.kind()
            )))
        }
        Err(FrameError::UnsupportedProtocolVersion {
            received,
            supported,
        }) => {
            return Some(HelloDecision::Reject(Reject::new(
                RejectReason::UnsupportedProtocolVersion,
                format!("agent speaks protocol versions up to {received}, this collector speaks {supported} and newer; upgrade the agent"),
                None,
            )))
        }
        Err(error) => {
            return Some(HelloDecision::Reject(Reject::new(
                RejectReason::InvalidHello,
                format!("invalid hello: {error}"),
                None,
            )))
        }
    };
    if shutting_down {
        return Some(HelloDecision::Reject(Reject::new(
            RejectReason::ShuttingDown,
            "collector is shutting down",
            Some(1000),
        )));
    }
    if let Err(reason) = authenticate(&hello) {
        return Some(HelloDecision::Reject(Reject::new(
            RejectReason::Unauthorized,
            reason,
            None,
        )));
    }
    Some(HelloDecision::Accept(hello))
}

/// What to do with a batch stream once its frame is read (or cannot be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamDecision {
    /// A whole batch frame: its payload goes on to [`admit_batch`].
    Batch(Vec<u8>),
    /// Answer with this nack and stop reading; the connection goes on.
    Nack(Nack),
    /// Close the connection for a protocol violation, with this reason.
    Violation(String),
}

/// Decides about a batch stream from its read progress; `None` while more bytes are
/// needed. An oversized frame is refused from its header (nack, not retryable: the
/// welcome announced the limit); broken framing closes the connection, since the agent
/// no longer speaks the protocol.
pub fn decide_batch_stream(progress: ReadProgress) -> Option<StreamDecision> {
    match progress {
        ReadProgress::NeedMore => None,
        ReadProgress::Failed(error @ FrameError::TooLarge { .. }) => {
            Some(StreamDecision::Nack(Nack::new(
                0,
                NackReason::TooLarge,
                false,
                format!("{error}; the welcome announced the limit"),
            )))
        }
        ReadProgress::Failed(error) => {
            Some(StreamDecision::Violation(format!("batch stream: {error}")))
        }
        ReadProgress::EndedEarly => Some(StreamDecision::Nack(Nack::new(
            0,
            NackReason::Malformed,
            false,
            "the batch stream ended in the middle of a frame",
        ))),
        ReadProgress::Frame(frame) if frame.kind != FrameKind::Batch => {
            Some(StreamDecision::Violation(format!(
                "expected a batch frame on a batch stream, got a {} frame",
                frame.kind
            )))
        }
        ReadProgress::Frame(frame) => Some(StreamDecision::Batch(frame.payload)),
    }
}

/// The nack for a batch that cannot be decoded.
pub fn batch_nack(batch_seq: u64, error: &BatchError) -> Nack {
    let reason = match error {
        BatchError::OverLimit { .. } => NackReason::TooLarge,
        _ => NackReason::Malformed,
    };
    Nack::new(
        batch_seq,
        reason,
        false,
        format!("batch {batch_seq} cannot be decoded: {error}"),
    )
}

/// Reads the batch header only (cheap, no decompression): the sequence number the
/// duplicate check needs, and whether the batch belongs to this session's agent.
pub fn admit_batch(
    payload: &[u8],
    session_agent_id: &str,
    limits: &BatchLimits,
) -> Result<u64, Nack> {
    let header = decode_batch_header(payload, limits).map_err(|error| batch_nack(0, &error))?;
    if header.agent_id != session_agent_id {
        return Err(Nack::new(
            header.batch_seq,
            NackReason::Malformed,
            false,
            format!(
                "batch names agent {:?} but this session belongs to {:?}",
                header.agent_id, session_agent_id
            ),
        ));
    }
    Ok(header.batch_seq)
}

/// A batch ready to be appended to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedBatch {
    pub batch_seq: u64,
    /// The log record's value: the batch carrying the definition of every series it
    /// uses, so the processor never needs the session that delivered it.
    pub record_value: Vec<u8>,
    pub readings: u64,
    pub summaries: u64,
    /// Sensor time of the newest raw reading, for the freshness metrics.
    pub newest_reading_ms: Option<i64>,
}

/// Decodes a batch that is not a known duplicate, resolves its series through the
/// session dictionary (learning the definitions it carries), and rewrites it
/// self-contained. The dictionary lock is held only for the lookup, not the decode.
pub fn prepare_batch(
    payload: &[u8],
    batch_seq: u64,
    dictionary: &Mutex<ReceiverSessionDictionary>,
    limits: &BatchLimits,
) -> Result<PreparedBatch, Nack> {
    let batch = decode_batch(payload, limits).map_err(|error| batch_nack(batch_seq, &error))?;
    let definitions = {
        let mut dictionary = dictionary
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = dictionary.accept(&batch) {
            let (reason, retryable) = match error {
                DictionaryError::UnknownSeries { .. } => (NackReason::UnknownSeries, true),
                DictionaryError::ConflictingDefinition { .. } => (NackReason::Malformed, false),
                DictionaryError::TooManySeries { .. } => (NackReason::TooLarge, false),
            };
            return Err(Nack::new(
                batch_seq,
                reason,
                retryable,
                format!("batch {batch_seq}: {error}"),
            ));
        }
        series_ids_used(&batch)
            .into_iter()
            .filter_map(|id| {
                dictionary.key(id).map(|key| SeriesDef {
                    id,
                    key: key.clone(),
                })
            })
            .collect::<Vec<_>>()
    };
    let record_value = replace_series_definitions(payload, &definitions, limits)
        .map_err(|error| batch_nack(batch_seq, &error))?;
    Ok(PreparedBatch {
        batch_seq,
        record_value,
        readings: batch.readings.len() as u64,
        summaries: batch.summaries.len() as u64,
        newest_reading_ms: batch.readings.iter().map(|reading| reading.time_ms).max(),
    })
}
