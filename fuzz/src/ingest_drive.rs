//! Drives the collector's sans-IO ingest decisions (`collector/src/ingest/decide.rs`,
//! reached as `crate::decide`) the way the QUIC shell does, with arbitrary bytes and
//! no sockets: a hello stream, then batch streams, each fed in uneven chunks.
//!
//! Shared by the `ingest_stream` fuzz target and by `collector/tests/ingest_fuzz_inputs.rs`
//! (which includes this file by path), so seeds and regressions replay exactly the
//! fuzzed code. Panics are the findings: every check below is an invariant of ingest.
//!
//! Input layout (so the fuzzer can shape sessions):
//! - byte 0: bit 0 = the collector is shutting down; bits 1..=3 pick the chunking;
//! - then segments `[u16 big-endian length][bytes]`, the first the hello stream, each
//!   next one a batch stream (a length past the end takes what is left).

use std::collections::HashSet;
use std::sync::Mutex;

use tributary_protocol::batch::{series_ids_used, ReceiverSessionDictionary};
use tributary_protocol::frame::{FrameDecoder, FrameLimits};
use tributary_protocol::session::{Ack, Message, Nack};
use tributary_protocol::{decode_batch, BatchLimits};

use crate::decide::{
    admit_batch, decide_batch_stream, decide_hello, prepare_batch, HelloDecision, ReadProgress,
    StreamDecision, StreamFrameReader, HELLO_FRAME_LIMITS,
};

/// The agent the fuzzed session authenticates as.
pub const FUZZ_AGENT_ID: &str = "gw-fuzz";
pub const FUZZ_TOKEN: &str = "fuzz-token";

/// Small limits, so the fuzzer reaches them with short inputs.
pub const FUZZ_MAX_FRAME_BYTES: u32 = 16 * 1024;
pub const FUZZ_MAX_SESSION_SERIES: usize = 64;

/// Chunk-size patterns the streams are fed in, cycled; picked by byte 0.
const CHUNKINGS: [&[usize]; 8] = [
    &[65_536],
    &[1],
    &[3, 17, 64, 2, 4096],
    &[7],
    &[5, 1, 1, 300],
    &[1024],
    &[2, 9000],
    &[13, 4, 256],
];

/// What the shell would have sent on one batch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ack(u64),
    Nack(Nack),
}

/// What a fuzzed session came to.
#[derive(Debug, Default)]
pub struct IngestRun {
    /// The hello decision (`None`: the input ended inside the hello).
    pub hello: Option<HelloDecision>,
    /// One answer per batch stream that got one.
    pub answers: Vec<Answer>,
    /// Records the shell would have appended to the log: (batch_seq, value).
    pub records: Vec<(u64, Vec<u8>)>,
    /// Why the connection was closed for a protocol violation, if it was.
    pub violation: Option<String>,
}

/// The limits the shell derives from its config (same shape as `server.rs`).
pub fn fuzz_batch_limits() -> BatchLimits {
    BatchLimits {
        max_encoded_bytes: FUZZ_MAX_FRAME_BYTES as usize,
        max_series: 256,
        max_readings: 20_000,
        max_summaries: 2_000,
        ..BatchLimits::default()
    }
}

pub fn fuzz_frame_limits() -> FrameLimits {
    FrameLimits {
        max_frame_bytes: FUZZ_MAX_FRAME_BYTES,
        max_control_frame_bytes: FrameLimits::DEFAULT.max_control_frame_bytes,
    }
}

/// Builds an input in the layout [`ingest_stream`] reads.
pub fn layout(flags: u8, hello: &[u8], streams: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![flags];
    for segment in std::iter::once(hello).chain(streams.iter().map(Vec::as_slice)) {
        let length = u16::try_from(segment.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&segment[..usize::from(length)]);
    }
    out
}

fn segments(data: &[u8]) -> Vec<&[u8]> {
    let mut rest = data;
    let mut out = Vec::new();
    while rest.len() >= 2 {
        let length = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let take = length.min(rest.len());
        out.push(&rest[..take]);
        rest = &rest[take..];
    }
    out
}

/// Feeds one stream in chunks until `decide` decides, or to its end. Checks that the
/// reader never holds more than one frame plus one chunk.
fn read_stream<D>(
    bytes: &[u8],
    chunking: &[usize],
    limits: FrameLimits,
    mut decide: impl FnMut(ReadProgress) -> Option<D>,
) -> Option<D> {
    let mut reader = StreamFrameReader::new(limits);
    if let Some(decision) = decide(ReadProgress::NeedMore) {
        return Some(decision);
    }
    let largest_chunk = chunking.iter().copied().max().unwrap_or(1);
    let bound = limits.max_frame_bytes as usize + 5 + largest_chunk;
    let mut position = 0;
    let mut index = 0;
    while position < bytes.len() {
        let size = chunking[index % chunking.len()]
            .max(1)
            .min(bytes.len() - position);
        index += 1;
        let progress = reader.feed(&bytes[position..position + size]);
        position += size;
        assert!(
            reader.buffered_bytes() <= bound,
            "the reader holds {} bytes, over one frame plus one chunk ({bound})",
            reader.buffered_bytes()
        );
        if let Some(decision) = decide(progress) {
            return Some(decision);
        }
    }
    decide(reader.finish())
}

/// Every answer the shell sends must encode as a frame the agent can decode back.
fn check_answer_encodes(message: &Message) {
    let bytes = match message.encode_to_vec(&FrameLimits::DEFAULT) {
        Ok(bytes) => bytes,
        Err(error) => panic!("answer {message:?} does not encode: {error}"),
    };
    let mut decoder = FrameDecoder::new(FrameLimits::DEFAULT);
    decoder.feed(&bytes);
    match decoder.next_owned_frame() {
        Ok(Some(frame)) => match Message::decode(frame.as_ref()) {
            Ok(again) => assert_eq!(&again, message, "answer changed through encoding"),
            Err(error) => panic!("answer {message:?} does not decode back: {error}"),
        },
        other => panic!("answer {message:?} is not one whole frame: {other:?}"),
    }
}

/// Runs one session through the ingest decisions. Panics on a broken invariant.
pub fn ingest_stream(data: &[u8]) -> IngestRun {
    let mut run = IngestRun::default();
    let Some((&flags, rest)) = data.split_first() else {
        return run;
    };
    let shutting_down = flags & 1 == 1;
    let chunking = CHUNKINGS[usize::from((flags >> 1) & 7)];
    let streams = segments(rest);
    let Some((hello_bytes, batch_streams)) = streams.split_first() else {
        return run;
    };

    let hello = read_stream(hello_bytes, chunking, HELLO_FRAME_LIMITS, |progress| {
        decide_hello(progress, shutting_down, |hello| {
            if hello.agent_id == FUZZ_AGENT_ID && hello.token == FUZZ_TOKEN {
                Ok(())
            } else {
                Err(format!(
                    "agent {:?} or its token is not known",
                    hello.agent_id
                ))
            }
        })
    });
    run.hello = hello.clone();
    match hello {
        Some(HelloDecision::Accept(hello)) => {
            assert!(!shutting_down, "a hello was accepted while shutting down");
            assert_eq!(hello.agent_id, FUZZ_AGENT_ID, "accepted an unknown agent");
        }
        Some(HelloDecision::Reject(reject)) => {
            check_answer_encodes(&Message::Reject(reject));
            return run;
        }
        _ => return run,
    }

    let batch_limits = fuzz_batch_limits();
    let dictionary = Mutex::new(ReceiverSessionDictionary::new(FUZZ_MAX_SESSION_SERIES));
    let mut acked: HashSet<u64> = HashSet::new();
    for stream in batch_streams {
        let decision = read_stream(stream, chunking, fuzz_frame_limits(), decide_batch_stream);
        let answer = match decision {
            None => unreachable!("a finished stream always gets a decision"),
            Some(StreamDecision::Violation(problem)) => {
                run.violation = Some(problem);
                return run;
            }
            Some(StreamDecision::Nack(nack)) => Answer::Nack(nack),
            Some(StreamDecision::Batch(payload)) => {
                process(&payload, &batch_limits, &dictionary, &mut acked, &mut run)
            }
        };
        match &answer {
            Answer::Ack(batch_seq) => check_answer_encodes(&Message::Ack(Ack {
                batch_seq: *batch_seq,
            })),
            Answer::Nack(nack) => check_answer_encodes(&Message::Nack(nack.clone())),
        }
        run.answers.push(answer);
    }
    run
}

/// The shell's per-batch order: admit, duplicate check, prepare, append, ack.
fn process(
    payload: &[u8],
    batch_limits: &BatchLimits,
    dictionary: &Mutex<ReceiverSessionDictionary>,
    acked: &mut HashSet<u64>,
    run: &mut IngestRun,
) -> Answer {
    let batch_seq = match admit_batch(payload, FUZZ_AGENT_ID, batch_limits) {
        Ok(batch_seq) => batch_seq,
        Err(nack) => return Answer::Nack(nack),
    };
    if acked.contains(&batch_seq) {
        return Answer::Ack(batch_seq);
    }
    let prepared = match prepare_batch(payload, batch_seq, dictionary, batch_limits) {
        Ok(prepared) => prepared,
        Err(nack) => {
            assert_eq!(nack.batch_seq, batch_seq, "nack names another batch");
            return Answer::Nack(nack);
        }
    };
    assert_eq!(prepared.batch_seq, batch_seq);
    // The record must be self-contained: it decodes alone, belongs to the session's
    // agent, and defines every series it uses.
    let record = match decode_batch(&prepared.record_value, batch_limits) {
        Ok(record) => record,
        Err(error) => panic!("the log record of batch {batch_seq} does not decode: {error}"),
    };
    assert_eq!(record.agent_id, FUZZ_AGENT_ID);
    assert_eq!(record.batch_seq, batch_seq);
    assert_eq!(record.readings.len() as u64, prepared.readings);
    assert_eq!(record.summaries.len() as u64, prepared.summaries);
    for id in series_ids_used(&record) {
        assert!(
            record.series.iter().any(|definition| definition.id == id),
            "the log record of batch {batch_seq} uses series {id} without defining it"
        );
    }
    run.records.push((batch_seq, prepared.record_value));
    acked.insert(batch_seq);
    Answer::Ack(batch_seq)
}
