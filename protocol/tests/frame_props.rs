//! Property tests of the framing layer: whatever the chunking, frames come out as they
//! went in; whatever the bytes, nothing panics and nothing over the limit is buffered.

use proptest::prelude::*;
use tributary_protocol::frame::{
    write_frame, Frame, FrameDecoder, FrameError, FrameKind, FrameLimits,
};

const LIMITS: FrameLimits = FrameLimits {
    max_frame_bytes: 4096,
    max_control_frame_bytes: 256,
};

fn frame() -> impl Strategy<Value = (FrameKind, Vec<u8>)> {
    (prop::sample::select(FrameKind::ALL.to_vec()), any::<bool>()).prop_flat_map(|(kind, large)| {
        let max = if kind.is_control() || !large {
            255
        } else {
            4095
        };
        (Just(kind), prop::collection::vec(any::<u8>(), 0..max))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn frames_survive_any_chunking(
        frames in prop::collection::vec(frame(), 0..12),
        chunk_sizes in prop::collection::vec(1usize..700, 1..20),
    ) {
        let mut stream = Vec::new();
        for (kind, payload) in &frames {
            write_frame(*kind, payload, &LIMITS, &mut stream).unwrap();
        }
        let mut decoder = FrameDecoder::new(LIMITS);
        let mut decoded = Vec::new();
        let mut position = 0;
        let mut next_chunk = 0;
        while position < stream.len() {
            let size = chunk_sizes[next_chunk % chunk_sizes.len()].min(stream.len() - position);
            next_chunk += 1;
            decoder.feed(&stream[position..position + size]);
            position += size;
            while let Some(frame) = decoder.next_frame().unwrap() {
                decoded.push((frame.kind, frame.payload.to_vec()));
            }
            // Never more than one partial frame plus the chunk just fed.
            prop_assert!(decoder.buffered_bytes() <= 4096 + 4 + 700);
        }
        prop_assert_eq!(decoded, frames);
        prop_assert_eq!(decoder.buffered_bytes(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_respect_limits(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..64,
    ) {
        match Frame::check(&bytes, &LIMITS) {
            Ok(Some(length)) => {
                prop_assert!(length <= bytes.len());
                let (frame, used) = Frame::parse(&bytes, &LIMITS).unwrap();
                prop_assert_eq!(used, length);
                prop_assert!(frame.payload.len() < LIMITS.limit_for(frame.kind) as usize);
            }
            Ok(None) => prop_assert!(Frame::parse(&bytes, &LIMITS).is_err()),
            Err(_) => prop_assert!(Frame::parse(&bytes, &LIMITS).is_err()),
        }
        let mut decoder = FrameDecoder::new(LIMITS);
        'feed: for piece in bytes.chunks(chunk) {
            decoder.feed(piece);
            loop {
                match decoder.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
}

#[test]
fn a_truncated_stream_leaves_its_partial_frame_visible() {
    let mut stream = Vec::new();
    write_frame(FrameKind::Batch, &[7; 100], &LIMITS, &mut stream).unwrap();
    let mut decoder = FrameDecoder::new(LIMITS);
    decoder.feed(&stream[..50]);
    assert!(decoder.next_frame().unwrap().is_none());
    assert_eq!(decoder.buffered_bytes(), 50);
    assert!(matches!(
        Frame::parse(&stream[..50], &LIMITS),
        Err(FrameError::Truncated {
            needed_bytes: 105,
            available_bytes: 50
        })
    ));
}
