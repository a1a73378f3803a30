//! Length-prefixed framing for untrusted byte streams, with hard limits.
//!
//! Why this shape: a QUIC stream (or any byte stream) delivers arbitrary chunks, and
//! the peer may be buggy or hostile. As in mini-redis, [`Frame::check`] first proves that
//! a whole frame is buffered, without allocating, and rejects a declared length over the
//! limit as soon as the 4-byte header is in, before a single payload byte is buffered
//! for it; only then is the frame handed out for decoding. [`FrameDecoder`] is the
//! sans-IO incremental form: feed it whatever chunks the transport produced, take frames
//! out. It never reads a socket or a clock, so any async shell (quinn, tokio) can drive it
//! and tests can drive it byte by byte.
//!
//! Wire layout of one frame:
//!
//! ```text
//! +----------------------+-----------+----------------------+
//! | length: u32 BE       | kind: u8  | payload              |
//! +----------------------+-----------+----------------------+
//!   length = 1 + payload bytes (counts the kind byte, not itself)
//! ```
//!
//! Control frames (every kind but [`FrameKind::Batch`]) carry a small postcard message
//! and have their own, much smaller limit, so a hello cannot make a server allocate
//! megabytes of strings.

use std::fmt;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Bytes before the payload: the length prefix and the kind byte.
pub const FRAME_HEADER_BYTES: usize = LENGTH_PREFIX_BYTES + 1;

/// What a frame carries. The byte values are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Agent -> collector, first frame of a connection: [`crate::session::Hello`].
    Hello = 1,
    /// Collector -> agent, answer to an accepted hello: [`crate::session::Welcome`].
    Welcome = 2,
    /// Collector -> agent, answer to a refused hello: [`crate::session::Reject`].
    Reject = 3,
    /// Agent -> collector on a batch stream: the opaque encoded batch bytes.
    Batch = 4,
    /// Collector -> agent on a batch stream: [`crate::session::Ack`].
    Ack = 5,
    /// Collector -> agent on a batch stream: [`crate::session::Nack`].
    Nack = 6,
}

impl FrameKind {
    pub const ALL: [FrameKind; 6] = [
        FrameKind::Hello,
        FrameKind::Welcome,
        FrameKind::Reject,
        FrameKind::Batch,
        FrameKind::Ack,
        FrameKind::Nack,
    ];

    /// The kind for a byte read from the wire.
    pub fn from_byte(byte: u8) -> Result<FrameKind, FrameError> {
        match byte {
            1 => Ok(FrameKind::Hello),
            2 => Ok(FrameKind::Welcome),
            3 => Ok(FrameKind::Reject),
            4 => Ok(FrameKind::Batch),
            5 => Ok(FrameKind::Ack),
            6 => Ok(FrameKind::Nack),
            _ => Err(FrameError::UnknownKind { kind_byte: byte }),
        }
    }

    pub fn as_byte(self) -> u8 {
        self as u8
    }

    /// Control frames carry a small postcard message; only batch frames are large.
    pub fn is_control(self) -> bool {
        self != FrameKind::Batch
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Hello => "hello",
            FrameKind::Welcome => "welcome",
            FrameKind::Reject => "reject",
            FrameKind::Batch => "batch",
            FrameKind::Ack => "ack",
            FrameKind::Nack => "nack",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Hard limits on frames accepted from (or sent to) a peer. The length counted is the
/// frame's length field: kind byte plus payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest frame of any kind (in practice: the largest encoded batch).
    pub max_frame_bytes: u32,
    /// Largest control frame (hello, welcome, reject, ack, nack).
    pub max_control_frame_bytes: u32,
}

impl FrameLimits {
    /// 16 MiB batches (a 10-minute backlog batch of a large gateway is a few MiB), 4 KiB
    /// control frames (a hello with the longest allowed fields is under 1 KiB).
    pub const DEFAULT: FrameLimits = FrameLimits {
        max_frame_bytes: 16 * 1024 * 1024,
        max_control_frame_bytes: 4096,
    };

    /// The limit on the length field of a frame of `kind`.
    pub fn limit_for(&self, kind: FrameKind) -> u32 {
        if kind.is_control() {
            self.max_control_frame_bytes.min(self.max_frame_bytes)
        } else {
            self.max_frame_bytes
        }
    }
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why bytes could not be framed, or a frame could not be turned into a message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(
        "{} frame declares {length_bytes} bytes, over the limit of {max_frame_bytes} bytes; \
         the peer must split its data or is not a conforming Tributary peer",
        kind_name(*kind)
    )]
    TooLarge {
        kind: Option<FrameKind>,
        length_bytes: u64,
        max_frame_bytes: u32,
    },
    #[error(
        "frame declares a length of 0, but every frame has at least its kind byte; the peer \
         is not speaking tributary/1 framing"
    )]
    Empty,
    #[error(
        "unknown frame kind byte 0x{kind_byte:02x}; the peer speaks another protocol or a \
         newer version (check both ends' ALPN and PROTOCOL_VERSION)"
    )]
    UnknownKind { kind_byte: u8 },
    #[error(
        "frame truncated: it needs {needed_bytes} bytes but only {available_bytes} are there; \
         wait for more bytes (or the stream ended mid-frame)"
    )]
    Truncated {
        needed_bytes: u64,
        available_bytes: usize,
    },
    #[error("{kind} frame payload failed to decode: {source}")]
    Payload {
        kind: FrameKind,
        #[source]
        source: postcard::Error,
    },
    #[error(
        "{kind} frame payload has {extra_bytes} bytes after the message; the peer encodes a \
         different message layout"
    )]
    TrailingBytes { kind: FrameKind, extra_bytes: usize },
    #[error("{kind} message could not be encoded: {source}")]
    Encode {
        kind: FrameKind,
        #[source]
        source: postcard::Error,
    },
    #[error(
        "field `{field}` of the {kind} message is {length_bytes} bytes, over the limit of \
         {max_bytes} bytes"
    )]
    FieldTooLong {
        kind: FrameKind,
        field: &'static str,
        length_bytes: usize,
        max_bytes: usize,
    },
    #[error("field `{field}` of the {kind} message is invalid: {problem}")]
    InvalidField {
        kind: FrameKind,
        field: &'static str,
        problem: &'static str,
    },
    #[error(
        "hello announces protocol version {received}, this side speaks {supported}; upgrade \
         the older side"
    )]
    UnsupportedProtocolVersion { received: u16, supported: u16 },
    #[error(
        "the frame decoder already failed on an earlier frame, so the stream's framing is \
         lost; close the stream"
    )]
    DecoderFailed,
}

fn kind_name(kind: Option<FrameKind>) -> &'static str {
    kind.map(FrameKind::name).unwrap_or("a")
}

/// A frame whose payload borrows the buffer it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub kind: FrameKind,
    pub payload: &'a [u8],
}

impl FrameRef<'_> {
    pub fn to_owned(&self) -> Frame {
        Frame {
            kind: self.kind,
            payload: self.payload.to_vec(),
        }
    }
}

/// A frame that owns its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn as_ref(&self) -> FrameRef<'_> {
        FrameRef {
            kind: self.kind,
            payload: &self.payload,
        }
    }

    /// Proves that `buffer` starts with a whole frame, without allocating.
    ///
    /// `Ok(Some(n))`: the first `n` bytes are one whole frame. `Ok(None)`: more bytes are
    /// needed (and the part seen so far is within limits). `Err`: the stream is not valid
    /// framing (oversized length, empty frame, unknown kind) and must be closed.
    pub fn check(buffer: &[u8], limits: &FrameLimits) -> Result<Option<usize>, FrameError> {
        let [b0, b1, b2, b3, ..] = *buffer else {
            return Ok(None);
        };
        let length = u32::from_be_bytes([b0, b1, b2, b3]);
        if length == 0 {
            return Err(FrameError::Empty);
        }
        if length > limits.max_frame_bytes {
            return Err(FrameError::TooLarge {
                kind: None,
                length_bytes: length as u64,
                max_frame_bytes: limits.max_frame_bytes,
            });
        }
        let Some(&kind_byte) = buffer.get(LENGTH_PREFIX_BYTES) else {
            return Ok(None);
        };
        let kind = FrameKind::from_byte(kind_byte)?;
        let limit = limits.limit_for(kind);
        if length > limit {
            return Err(FrameError::TooLarge {
                kind: Some(kind),
                length_bytes: length as u64,
                max_frame_bytes: limit,
            });
        }
        let Some(total_bytes) = (length as usize).checked_add(LENGTH_PREFIX_BYTES) else {
            return Err(FrameError::TooLarge {
                kind: Some(kind),
                length_bytes: length as u64,
                max_frame_bytes: limit,
            });
        };
        if buffer.len() < total_bytes {
            Ok(None)
        } else {
            Ok(Some(total_bytes))
        }
    }

    /// Parses the frame at the start of `buffer`: the frame and how many bytes it took.
    /// Bytes after the frame are left alone (they belong to the next frame).
    pub fn parse<'a>(
        buffer: &'a [u8],
        limits: &FrameLimits,
    ) -> Result<(FrameRef<'a>, usize), FrameError> {
        let Some(total_bytes) = Frame::check(buffer, limits)? else {
            let needed_bytes = match *buffer {
                [b0, b1, b2, b3, ..] => {
                    u32::from_be_bytes([b0, b1, b2, b3]) as u64 + LENGTH_PREFIX_BYTES as u64
                }
                _ => FRAME_HEADER_BYTES as u64,
            };
            return Err(FrameError::Truncated {
                needed_bytes,
                available_bytes: buffer.len(),
            });
        };
        let kind_byte = buffer.get(LENGTH_PREFIX_BYTES).copied().unwrap_or_default();
        let kind = FrameKind::from_byte(kind_byte)?;
        let payload = buffer
            .get(FRAME_HEADER_BYTES..total_bytes)
            .unwrap_or_default();
        Ok((FrameRef { kind, payload }, total_bytes))
    }
}

/// The 5 header bytes of a frame of `kind` with `payload_bytes` of payload, after checking
/// the size against `limits` (the limits the receiving side announced). For shells that
/// write the header and a large payload without copying them together.
pub fn frame_header(
    kind: FrameKind,
    payload_bytes: usize,
    limits: &FrameLimits,
) -> Result<[u8; FRAME_HEADER_BYTES], FrameError> {
    let limit = limits.limit_for(kind);
    let length = payload_bytes
        .checked_add(1)
        .and_then(|length| u32::try_from(length).ok());
    let length = match length {
        Some(length) if length <= limit => length,
        _ => {
            return Err(FrameError::TooLarge {
                kind: Some(kind),
                length_bytes: payload_bytes as u64 + 1,
                max_frame_bytes: limit,
            })
        }
    };
    let [b0, b1, b2, b3] = length.to_be_bytes();
    Ok([b0, b1, b2, b3, kind.as_byte()])
}

/// Appends one whole frame to `out`. Fails, leaving `out` unchanged, when the payload is
/// over the limit for its kind.
pub fn write_frame(
    kind: FrameKind,
    payload: &[u8],
    limits: &FrameLimits,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let header = frame_header(kind, payload.len(), limits)?;
    out.reserve(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends a frame of `kind` whose payload `write_payload` appends to `out` (so a postcard
/// message is encoded in place, without an intermediate buffer). On error `out` is left
/// as it was.
pub fn write_frame_with<E>(
    kind: FrameKind,
    limits: &FrameLimits,
    out: &mut Vec<u8>,
    write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    map_error: impl FnOnce(E) -> FrameError,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    if let Err(error) = write_payload(out) {
        out.truncate(start);
        return Err(map_error(error));
    }
    let payload_bytes = out.len() - start - FRAME_HEADER_BYTES;
    match frame_header(kind, payload_bytes, limits) {
        Ok(header) => {
            if let Some(slot) = out.get_mut(start..start + FRAME_HEADER_BYTES) {
                slot.copy_from_slice(&header);
            }
            Ok(())
        }
        Err(error) => {
            out.truncate(start);
            Err(error)
        }
    }
}

/// Sans-IO incremental frame decoder: feed it chunks, take whole frames out.
///
/// Drain it (call [`FrameDecoder::next_frame`] until `Ok(None)`) after every
/// [`FrameDecoder::feed`]; then it never holds more than one partial frame, which the
/// limits bound, plus the last chunk. After an error the decoder stays failed: framing is
/// lost and the stream must be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: FrameLimits,
    buffer: Vec<u8>,
    /// Start of the bytes not yet handed out.
    start: usize,
    /// Bytes of the frame handed out last, released on the next call.
    handed_out: usize,
    failed: bool,
}

impl FrameDecoder {
    pub fn new(limits: FrameLimits) -> Self {
        FrameDecoder {
            limits,
            buffer: Vec::new(),
            start: 0,
            handed_out: 0,
            failed: false,
        }
    }

    pub fn limits(&self) -> &FrameLimits {
        &self.limits
    }

    /// Appends bytes received from the transport.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.release();
        if self.failed {
            return;
        }
        // Compact when the consumed prefix dominates, so the buffer does not creep.
        if self.start > 0 && self.start >= self.buffer.len() / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(chunk);
    }

    fn release(&mut self) {
        self.start += self.handed_out;
        self.handed_out = 0;
        if self.start >= self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
    }

    /// The next whole frame, borrowing the decoder's buffer; `Ok(None)` when more bytes
    /// are needed.
    pub fn next_frame(&mut self) -> Result<Option<FrameRef<'_>>, FrameError> {
        self.release();
        if self.failed {
            return Err(FrameError::DecoderFailed);
        }
        let pending = self.buffer.get(self.start..).unwrap_or_default();
        match Frame::check(pending, &self.limits) {
            Ok(None) => Ok(None),
            Ok(Some(total_bytes)) => {
                self.handed_out = total_bytes;
                let pending = self.buffer.get(self.start..).unwrap_or_default();
                Frame::parse(pending, &self.limits).map(|(frame, _)| Some(frame))
            }
            Err(error) => {
                self.failed = true;
                self.buffer = Vec::new();
                self.start = 0;
                Err(error)
            }
        }
    }

    /// Like [`FrameDecoder::next_frame`], copying the payload out.
    pub fn next_owned_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        Ok(self.next_frame()?.map(|frame| frame.to_owned()))
    }

    /// Bytes received but not yet handed out as frames (a partial frame at the end of a
    /// stream means the peer stopped mid-frame).
    pub fn buffered_bytes(&self) -> usize {
        self.buffer
            .len()
            .saturating_sub(self.start + self.handed_out)
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FrameLimits = FrameLimits {
        max_frame_bytes: 1000,
        max_control_frame_bytes: 100,
    };

    #[test]
    fn check_waits_for_a_whole_frame() {
        let mut bytes = Vec::new();
        write_frame(FrameKind::Batch, b"hello", &LIMITS, &mut bytes).unwrap();
        assert_eq!(bytes, [0, 0, 0, 6, 4, b'h', b'e', b'l', b'l', b'o']);
        for cut in 0..bytes.len() {
            assert_eq!(
                Frame::check(&bytes[..cut], &LIMITS).unwrap(),
                None,
                "cut at {cut}"
            );
        }
        bytes.push(9);
        assert_eq!(Frame::check(&bytes, &LIMITS).unwrap(), Some(10));
        let (frame, used) = Frame::parse(&bytes, &LIMITS).unwrap();
        assert_eq!(
            (frame.kind, frame.payload, used),
            (FrameKind::Batch, &b"hello"[..], 10)
        );
    }

    #[test]
    fn oversized_lengths_are_rejected_from_the_header_alone() {
        let error = Frame::check(&[0xff, 0xff, 0xff, 0xff], &LIMITS).unwrap_err();
        assert!(matches!(
            error,
            FrameError::TooLarge {
                kind: None,
                length_bytes: 0xffff_ffff,
                max_frame_bytes: 1000
            }
        ));
        let message = error.to_string();
        assert!(
            message.contains("4294967295") && message.contains("1000"),
            "{message}"
        );
        // A control frame has the smaller limit, known once the kind byte is in.
        let error = Frame::check(&[0, 0, 0, 101, FrameKind::Ack.as_byte()], &LIMITS).unwrap_err();
        assert!(matches!(
            error,
            FrameError::TooLarge {
                kind: Some(FrameKind::Ack),
                length_bytes: 101,
                max_frame_bytes: 100
            }
        ));
        assert_eq!(
            Frame::check(&[0, 0, 0, 101, FrameKind::Batch.as_byte()], &LIMITS).unwrap(),
            None
        );
    }

    #[test]
    fn empty_and_unknown_frames_are_rejected() {
        assert!(matches!(
            Frame::check(&[0, 0, 0, 0], &LIMITS),
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            Frame::check(&[0, 0, 0, 1, 0x7f], &LIMITS),
            Err(FrameError::UnknownKind { kind_byte: 0x7f })
        ));
        assert!(matches!(
            Frame::parse(&[0, 0, 0, 9, 4, 1], &LIMITS),
            Err(FrameError::Truncated {
                needed_bytes: 13,
                available_bytes: 6
            })
        ));
    }

    #[test]
    fn writing_refuses_payloads_over_the_limit() {
        let mut out = vec![1, 2];
        let error = write_frame(FrameKind::Hello, &[0; 100], &LIMITS, &mut out).unwrap_err();
        assert!(matches!(
            error,
            FrameError::TooLarge {
                kind: Some(FrameKind::Hello),
                length_bytes: 101,
                max_frame_bytes: 100
            }
        ));
        assert_eq!(out, [1, 2]);
        let error = write_frame_with(
            FrameKind::Batch,
            &LIMITS,
            &mut out,
            |out| {
                out.extend_from_slice(&[0; 1000]);
                Ok::<(), postcard::Error>(())
            },
            |source| FrameError::Encode {
                kind: FrameKind::Batch,
                source,
            },
        )
        .unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { .. }));
        assert_eq!(out, [1, 2]);
    }

    #[test]
    fn decoder_reassembles_frames_from_any_chunking() {
        let mut stream = Vec::new();
        for (index, kind) in FrameKind::ALL.into_iter().enumerate() {
            write_frame(kind, &vec![index as u8; index * 7], &LIMITS, &mut stream).unwrap();
        }
        for chunk_bytes in [1, 2, 3, 5, 8, 64, stream.len()] {
            let mut decoder = FrameDecoder::new(LIMITS);
            let mut frames = Vec::new();
            for chunk in stream.chunks(chunk_bytes) {
                decoder.feed(chunk);
                while let Some(frame) = decoder.next_owned_frame().unwrap() {
                    frames.push(frame);
                }
            }
            assert_eq!(
                frames.len(),
                FrameKind::ALL.len(),
                "chunks of {chunk_bytes}"
            );
            for (index, frame) in frames.iter().enumerate() {
                assert_eq!(frame.kind, FrameKind::ALL[index]);
                assert_eq!(frame.payload, vec![index as u8; index * 7]);
            }
            assert_eq!(decoder.buffered_bytes(), 0);
        }
    }

    #[test]
    fn decoder_stays_failed_after_an_error() {
        let mut decoder = FrameDecoder::new(LIMITS);
        decoder.feed(&[0, 0, 0, 1, 0xee]);
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::UnknownKind { kind_byte: 0xee })
        ));
        decoder.feed(&[0, 0, 0, 1, 5]);
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::DecoderFailed)
        ));
        assert!(decoder.is_failed());
    }
}
