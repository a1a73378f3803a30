//! Runs every fuzz seed and regression input through the same decode functions the
//! fuzz targets use (`fuzz/src/drive.rs`, included by path), under plain `cargo test`.
//!
//! - `fuzz/corpus_seed/<target>/*`: valid inputs; each must decode.
//! - `fuzz/regressions/<target>/*`: inputs that once crashed or probe an edge (truncated,
//!   oversized length, unknown kind); each must not panic, and those named `invalid_*`
//!   must be refused.
//!
//! Regenerate the seeds and hand-made regressions after a wire-format change with
//! `TRIBUTARY_WRITE_FUZZ_SEEDS=1 cargo test -p tributary-protocol --test fuzz_inputs`.

#[path = "../../fuzz/src/drive.rs"]
mod drive;

use std::fs;
use std::path::{Path, PathBuf};

use tributary_protocol::batch::{encode_batch, Batch};
use tributary_protocol::frame::{write_frame, FrameKind};
use tributary_protocol::session::{
    Ack, Backlog, Hello, Message, Nack, NackReason, Reject, RejectReason, ServerLimits, Welcome,
    PROTOCOL_VERSION,
};
use tributary_protocol::{Reading, SeriesDef, SeriesKey, Summary, WindowSummary};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let directory = fuzz_dir().join(kind).join(target);
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", directory.display()))
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = fs::read(&path)
                .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
            (name, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", directory.display());
    files
}

#[test]
fn frame_decode_seeds_decode() {
    for (name, bytes) in inputs("corpus_seed", "frame_decode") {
        let messages =
            drive::frame_decode(&bytes).unwrap_or_else(|error| panic!("seed {name}: {error}"));
        assert!(!messages.is_empty(), "seed {name} holds no message");
    }
}

#[test]
fn frame_decode_regressions_do_not_panic() {
    for (name, bytes) in inputs("regressions", "frame_decode") {
        let result = drive::frame_decode(&bytes);
        if name.starts_with("invalid_") {
            assert!(result.is_err(), "regression {name} decoded: {result:?}");
        }
    }
}

#[test]
fn batch_decode_seeds_decode() {
    for (name, bytes) in inputs("corpus_seed", "batch_decode") {
        drive::batch_decode(&bytes).unwrap_or_else(|error| panic!("seed {name}: {error}"));
    }
}

#[test]
fn batch_decode_regressions_do_not_panic() {
    for (name, bytes) in inputs("regressions", "batch_decode") {
        let result = drive::batch_decode(&bytes);
        if name.starts_with("invalid_") {
            assert!(result.is_err(), "regression {name} decoded");
        }
    }
}

fn sample_batch(batch_seq: u64, with_definitions: bool, readings_per_series: i64) -> Batch {
    let start_ms = 1_700_000_000_000i64;
    let series: Vec<SeriesDef> = (0..3u32)
        .map(|id| SeriesDef {
            id,
            key: SeriesKey::new(format!("dev-{id}"), "temperature_c")
                .with_tags([("site", "plant-a")]),
        })
        .collect();
    let mut readings = Vec::new();
    for def in &series {
        for second in 0..readings_per_series {
            readings.push(Reading {
                series: def.id,
                time_ms: start_ms + second * 1000,
                value: 21.5 + (second % 7) as f64 * 0.01 + def.id as f64,
                flags: 0,
            });
        }
    }
    let mut summary = Summary::from_reading(start_ms, 21.5);
    for second in 1..10 {
        summary.observe(start_ms + second * 1000, 21.5 + (second % 3) as f64 * 0.01);
    }
    let summaries = vec![WindowSummary {
        series: 0,
        window_start_ms: start_ms,
        window_ms: 10_000,
        summary,
    }];
    Batch {
        agent_id: "gw-0017".into(),
        batch_seq,
        created_ms: start_ms + 60_000,
        series: if with_definitions { series } else { Vec::new() },
        readings,
        summaries,
    }
}

fn frame_of(message: &Message) -> Vec<u8> {
    message
        .encode_to_vec(&drive::FUZZ_FRAME_LIMITS)
        .expect("seed message encodes")
}

fn hello() -> Message {
    Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: "gw-0017".into(),
        token: "s3cret-token".into(),
        agent_version: "0.1.0".into(),
        backlog: Backlog {
            batches: 12,
            bytes: 48_000,
            oldest_unsent_time_ms: Some(1_700_000_000_000),
        },
    })
}

/// The seeds and hand-made regressions on disk are exactly what the current wire format
/// produces (so the fuzzers start from valid inputs); with `TRIBUTARY_WRITE_FUZZ_SEEDS=1`
/// they are rewritten instead, after a format change.
#[test]
fn fuzz_seeds_match_the_current_wire_format() {
    let rewrite = std::env::var_os("TRIBUTARY_WRITE_FUZZ_SEEDS").is_some();
    let write = |kind: &str, target: &str, name: &str, bytes: &[u8]| {
        let directory = fuzz_dir().join(kind).join(target);
        let path = directory.join(name);
        if rewrite {
            fs::create_dir_all(&directory).expect("create fuzz input directory");
            fs::write(&path, bytes).expect("write fuzz input");
            return;
        }
        let on_disk = fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} differs from what the current wire format produces; rewrite the seeds with \
             `TRIBUTARY_WRITE_FUZZ_SEEDS=1 cargo test -p tributary-protocol --test fuzz_inputs`",
            path.display()
        );
    };
    let welcome = Message::Welcome(Welcome {
        session_id: 42,
        protocol_version: PROTOCOL_VERSION,
        server_time_ms: 1_700_000_000_500,
        limits: ServerLimits {
            max_frame_bytes: 16 << 20,
            max_series_per_batch: 100_000,
            max_readings_per_batch: 1_000_000,
            max_in_flight_batches: 8,
        },
    });
    let reject = Message::Reject(Reject::new(
        RejectReason::Overloaded,
        "collector is draining a backlog",
        Some(5_000),
    ));
    let ack = Message::Ack(Ack { batch_seq: 7 });
    let nack = Message::Nack(Nack::new(
        8,
        NackReason::StorageUnavailable,
        true,
        "log unreachable: retry",
    ));
    let batch = encode_batch(&sample_batch(7, true, 10));

    write(
        "corpus_seed",
        "frame_decode",
        "hello.bin",
        &frame_of(&hello()),
    );
    write(
        "corpus_seed",
        "frame_decode",
        "welcome.bin",
        &frame_of(&welcome),
    );
    write(
        "corpus_seed",
        "frame_decode",
        "reject.bin",
        &frame_of(&reject),
    );
    write(
        "corpus_seed",
        "frame_decode",
        "ack_nack.bin",
        &[frame_of(&ack), frame_of(&nack)].concat(),
    );
    let session = [
        frame_of(&hello()),
        frame_of(&welcome),
        frame_of(&Message::Batch(batch.clone())),
        frame_of(&ack),
    ]
    .concat();
    write("corpus_seed", "frame_decode", "session.bin", &session);

    write("corpus_seed", "batch_decode", "three_series.bin", &batch);
    write(
        "corpus_seed",
        "batch_decode",
        "no_definitions.bin",
        &encode_batch(&sample_batch(8, false, 60)),
    );
    let empty = Batch {
        agent_id: "gw-0017".into(),
        batch_seq: 9,
        created_ms: 0,
        series: vec![],
        readings: vec![],
        summaries: vec![],
    };
    write(
        "corpus_seed",
        "batch_decode",
        "empty.bin",
        &encode_batch(&empty),
    );

    let hello_frame = frame_of(&hello());
    write(
        "regressions",
        "frame_decode",
        "invalid_truncated_hello.bin",
        &hello_frame[..hello_frame.len() - 3],
    );
    write(
        "regressions",
        "frame_decode",
        "invalid_oversized_length.bin",
        &[0xff, 0xff, 0xff, 0xff, FrameKind::Batch.as_byte(), 0],
    );
    write(
        "regressions",
        "frame_decode",
        "invalid_control_over_limit.bin",
        &[0, 0, 0x20, 0x01, FrameKind::Hello.as_byte()],
    );
    write(
        "regressions",
        "frame_decode",
        "invalid_unknown_kind.bin",
        &[0, 0, 0, 2, 0x7f, 0],
    );
    write(
        "regressions",
        "frame_decode",
        "invalid_zero_length.bin",
        &[0, 0, 0, 0],
    );
    let mut trailing = Vec::new();
    let mut ack_payload = postcard::to_allocvec(&Ack { batch_seq: 3 }).expect("encode ack");
    ack_payload.push(0);
    write_frame(
        FrameKind::Ack,
        &ack_payload,
        &drive::FUZZ_FRAME_LIMITS,
        &mut trailing,
    )
    .expect("frame");
    write(
        "regressions",
        "frame_decode",
        "invalid_trailing_bytes.bin",
        &trailing,
    );
    let mut future_hello = Vec::new();
    let future_payload = postcard::to_allocvec(&(2u16, "gw-0017", "new layout")).expect("encode");
    write_frame(
        FrameKind::Hello,
        &future_payload,
        &drive::FUZZ_FRAME_LIMITS,
        &mut future_hello,
    )
    .expect("frame");
    write(
        "regressions",
        "frame_decode",
        "invalid_future_hello.bin",
        &future_hello,
    );
    let mut bad_id = Vec::new();
    let bad_id_payload = postcard::to_allocvec(&(
        PROTOCOL_VERSION,
        "../../etc",
        "t",
        "0.1",
        (0u64, 0u64, None::<i64>),
    ))
    .expect("encode");
    write_frame(
        FrameKind::Hello,
        &bad_id_payload,
        &drive::FUZZ_FRAME_LIMITS,
        &mut bad_id,
    )
    .expect("frame");
    write(
        "regressions",
        "frame_decode",
        "invalid_agent_id.bin",
        &bad_id,
    );

    write(
        "regressions",
        "batch_decode",
        "invalid_truncated.bin",
        &batch[..batch.len() / 2],
    );
    write(
        "regressions",
        "batch_decode",
        "invalid_garbage.bin",
        b"not a batch at all",
    );
    write(
        "regressions",
        "batch_decode",
        "invalid_empty_input.bin",
        &[],
    );
    let mut bad_version = batch.clone();
    if let Some(version) = bad_version.get_mut(1) {
        *version = 0xee;
    }
    write(
        "regressions",
        "batch_decode",
        "invalid_version.bin",
        &bad_version,
    );
}
