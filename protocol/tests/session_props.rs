//! Round-trip property tests for every session message, through real framing with
//! arbitrary chunking, and robustness of decoding against corrupted frames.

use proptest::prelude::*;
use tributary_protocol::frame::{Frame, FrameDecoder, FrameLimits};
use tributary_protocol::session::{
    Ack, Backlog, Hello, Message, Nack, NackReason, Reject, RejectReason, ServerLimits, Welcome,
    MAX_AGENT_VERSION_BYTES, MAX_MESSAGE_BYTES, MAX_TOKEN_BYTES, PROTOCOL_VERSION,
};

fn text(max_chars: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max_chars).prop_map(|chars| chars.into_iter().collect())
}

fn bounded_text(max_bytes: usize) -> impl Strategy<Value = String> {
    text(max_bytes).prop_map(move |mut value| {
        while value.len() > max_bytes {
            value.pop();
        }
        value
    })
}

fn message() -> impl Strategy<Value = Message> {
    let hello = (
        "[A-Za-z0-9._:-]{1,128}",
        bounded_text(MAX_TOKEN_BYTES),
        bounded_text(MAX_AGENT_VERSION_BYTES),
        any::<u64>(),
        any::<u64>(),
        any::<Option<i64>>(),
    )
        .prop_map(
            |(agent_id, token, agent_version, batches, bytes, oldest_unsent_time_ms)| {
                Message::Hello(Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_id,
                    token,
                    agent_version,
                    backlog: Backlog {
                        batches,
                        bytes,
                        oldest_unsent_time_ms,
                    },
                })
            },
        );
    let welcome = (any::<u64>(), any::<u16>(), any::<i64>(), any::<[u32; 4]>()).prop_map(
        |(session_id, protocol_version, server_time_ms, [frame, series, readings, in_flight])| {
            Message::Welcome(Welcome {
                session_id,
                protocol_version,
                server_time_ms,
                limits: ServerLimits {
                    max_frame_bytes: frame,
                    max_series_per_batch: series,
                    max_readings_per_batch: readings,
                    max_in_flight_batches: in_flight,
                },
            })
        },
    );
    let reject_reason = prop::sample::select(vec![
        RejectReason::UnsupportedProtocolVersion,
        RejectReason::Unauthorized,
        RejectReason::InvalidHello,
        RejectReason::AgentAlreadyConnected,
        RejectReason::Overloaded,
        RejectReason::ShuttingDown,
    ]);
    let reject = (
        reject_reason,
        bounded_text(MAX_MESSAGE_BYTES),
        any::<Option<u32>>(),
    )
        .prop_map(|(reason, message, retry_after_ms)| {
            Message::Reject(Reject {
                reason,
                message,
                retry_after_ms,
            })
        });
    let nack_reason = prop::sample::select(vec![
        NackReason::Malformed,
        NackReason::TooLarge,
        NackReason::UnknownSeries,
        NackReason::SequenceConflict,
        NackReason::Overloaded,
        NackReason::StorageUnavailable,
        NackReason::Internal,
    ]);
    let nack = (
        any::<u64>(),
        nack_reason,
        any::<bool>(),
        bounded_text(MAX_MESSAGE_BYTES),
    )
        .prop_map(|(batch_seq, reason, retryable, message)| {
            Message::Nack(Nack {
                batch_seq,
                reason,
                retryable,
                message,
            })
        });
    prop_oneof![
        hello,
        welcome,
        reject,
        prop::collection::vec(any::<u8>(), 0..2000).prop_map(Message::Batch),
        any::<u64>().prop_map(|batch_seq| Message::Ack(Ack { batch_seq })),
        nack,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    #[test]
    fn every_message_round_trips(messages in prop::collection::vec(message(), 1..6), chunk in 1usize..300) {
        let limits = FrameLimits::DEFAULT;
        let mut stream = Vec::new();
        for message in &messages {
            message.encode(&limits, &mut stream).unwrap();
        }
        let mut decoder = FrameDecoder::new(limits);
        let mut decoded = Vec::new();
        for piece in stream.chunks(chunk) {
            decoder.feed(piece);
            while let Some(frame) = decoder.next_frame().unwrap() {
                decoded.push(Message::decode(frame).unwrap());
            }
        }
        prop_assert_eq!(decoded, messages);
    }

    #[test]
    fn corrupted_frames_fail_cleanly(message in message(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let limits = FrameLimits::DEFAULT;
        let mut bytes = message.encode_to_vec(&limits).unwrap();
        for (index, value) in flips {
            let position = index.index(bytes.len());
            bytes[position] = value;
        }
        if let Ok((frame, _)) = Frame::parse(&bytes, &limits) {
            if let Ok(decoded) = Message::decode(frame) {
                // Whatever decodes must obey the field rules and re-encode.
                prop_assert!(decoded.validate().is_ok());
                prop_assert!(decoded.encode_to_vec(&limits).is_ok());
            }
        }
    }
}
