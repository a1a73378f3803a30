//! The decode paths the fuzz targets exercise. Each function must never panic on any
//! input; it returns `Err` with a description when the input does not decode, so the
//! seed tests can also assert that valid inputs decode.

use tributary_protocol::batch::{decode_batch, encode_batch, BatchLimits};
use tributary_protocol::frame::{FrameDecoder, FrameLimits};
use tributary_protocol::session::Message;

/// Limits small enough that the fuzzer reaches them with short inputs.
pub const FUZZ_FRAME_LIMITS: FrameLimits = FrameLimits {
    max_frame_bytes: 64 * 1024,
    max_control_frame_bytes: 4096,
};

/// Chunk sizes the stream is fed in, cycled: byte-by-byte up to whole frames.
const CHUNK_BYTES: [usize; 6] = [1, 3, 17, 64, 2, 4096];

/// Arbitrary bytes -> incremental frame decoder -> session messages (batch payloads
/// through the batch decoder too). Every message that decodes must re-encode to a frame
/// that decodes to the same message.
pub fn frame_decode(data: &[u8]) -> Result<Vec<Message>, String> {
    let mut decoder = FrameDecoder::new(FUZZ_FRAME_LIMITS);
    let mut messages = Vec::new();
    let mut first_error = None;
    let mut position = 0;
    let mut chunk_index = 0;
    while position < data.len() && first_error.is_none() {
        let size = CHUNK_BYTES[chunk_index % CHUNK_BYTES.len()].min(data.len() - position);
        chunk_index += 1;
        decoder.feed(&data[position..position + size]);
        position += size;
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    first_error = Some(format!("framing: {error}"));
                    break;
                }
            };
            match Message::decode(frame) {
                Ok(message) => {
                    check_reencodes(&message);
                    if let Message::Batch(bytes) = &message {
                        if let Err(error) = batch_decode(bytes) {
                            first_error.get_or_insert(error);
                        }
                    }
                    messages.push(message);
                }
                Err(error) => {
                    first_error.get_or_insert(format!("message: {error}"));
                }
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    if decoder.buffered_bytes() > 0 {
        return Err(format!(
            "stream ends inside a frame ({} bytes left)",
            decoder.buffered_bytes()
        ));
    }
    Ok(messages)
}

fn check_reencodes(message: &Message) {
    let bytes = match message.encode_to_vec(&FUZZ_FRAME_LIMITS) {
        Ok(bytes) => bytes,
        Err(error) => panic!("a decoded message failed to re-encode: {error}"),
    };
    let mut decoder = FrameDecoder::new(FUZZ_FRAME_LIMITS);
    decoder.feed(&bytes);
    match decoder.next_frame() {
        Ok(Some(frame)) => match Message::decode(frame) {
            Ok(again) => assert_eq!(&again, message, "message changed through re-encoding"),
            Err(error) => panic!("a re-encoded message failed to decode: {error}"),
        },
        other => panic!("a re-encoded message is not one whole frame: {other:?}"),
    }
}

/// Arbitrary bytes -> batch decoder with the collector's default limits. A batch that
/// decodes must re-encode and decode again.
pub fn batch_decode(data: &[u8]) -> Result<(), String> {
    let limits = BatchLimits::default();
    let batch = decode_batch(data, &limits).map_err(|error| format!("batch: {error}"))?;
    let again = encode_batch(&batch);
    decode_batch(&again, &limits)
        .map_err(|error| format!("a decoded batch failed to decode after re-encoding: {error}"))?;
    Ok(())
}
