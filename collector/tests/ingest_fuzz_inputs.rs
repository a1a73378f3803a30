//! Replays the `ingest_stream` fuzz target's seeds and regressions under plain
//! `cargo test`, through the same driver the fuzzer runs (`fuzz/src/ingest_drive.rs`,
//! included by path) and the collector's own `ingest::decide` module.
//!
//! - `fuzz/corpus_seed/ingest_stream/*`: valid sessions; each must be welcomed and get
//!   at least one ack, and the test checks the answers each seed was made to provoke.
//! - `fuzz/regressions/ingest_stream/*`: crashes the fuzzer found (after the fix) and
//!   hand-made edges; none may panic. Names starting with `closed_` must end in a
//!   protocol-violation close, `rejected_` must not be welcomed.
//!
//! The seeds are built by [`seeds`] below. After a wire-format change rewrite them with
//! `TRIBUTARY_WRITE_FUZZ_SEEDS=1 cargo test -p tributary-collector --test ingest_fuzz_inputs`.

mod decide {
    pub use tributary_collector::ingest::decide::*;
}
#[path = "../../fuzz/src/ingest_drive.rs"]
mod ingest_drive;

use std::fs;
use std::path::{Path, PathBuf};

use ingest_drive::{ingest_stream, layout, Answer, FUZZ_AGENT_ID, FUZZ_TOKEN};
use tributary_collector::ingest::decide::HelloDecision;
use tributary_protocol::frame::{FrameKind, FrameLimits};
use tributary_protocol::session::{Backlog, Hello, Message, NackReason, PROTOCOL_VERSION};
use tributary_protocol::{
    encode_batch, Batch, Reading, SeriesDef, SeriesKey, Summary, WindowSummary,
};

const TARGET: &str = "ingest_stream";

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(kind: &str) -> Vec<(String, Vec<u8>)> {
    let directory = fuzz_dir().join(kind).join(TARGET);
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

fn hello_frame(agent_id: &str, token: &str) -> Vec<u8> {
    Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: agent_id.to_owned(),
        token: token.to_owned(),
        agent_version: "fuzz".to_owned(),
        backlog: Backlog::default(),
    })
    .encode_to_vec(&FrameLimits::DEFAULT)
    .expect("hello encodes")
}

fn batch(agent_id: &str, batch_seq: u64, with_definitions: bool, summaries: bool) -> Vec<u8> {
    let start_ms = 1_700_000_000_000i64;
    let series: Vec<SeriesDef> = (0..2u32)
        .map(|id| SeriesDef {
            id,
            key: SeriesKey::new(format!("dev-{id}"), "temperature_c").with_tags([("site", "a")]),
        })
        .collect();
    let readings = series
        .iter()
        .flat_map(|definition| {
            (0..20i64).map(move |second| Reading {
                series: definition.id,
                time_ms: start_ms + second * 1000,
                value: 20.0 + second as f64 * 0.25,
                flags: 0,
            })
        })
        .collect();
    let summaries = if summaries {
        let mut summary = Summary::from_reading(start_ms, 21.0);
        summary.observe(start_ms + 1000, 22.5);
        vec![WindowSummary {
            series: 1,
            window_start_ms: start_ms,
            window_ms: 10_000,
            summary,
        }]
    } else {
        Vec::new()
    };
    let batch = Batch {
        agent_id: agent_id.to_owned(),
        batch_seq,
        created_ms: start_ms + 30_000,
        series: if with_definitions { series } else { Vec::new() },
        readings,
        summaries,
    };
    Message::Batch(encode_batch(&batch))
        .encode_to_vec(&FrameLimits::DEFAULT)
        .expect("batch encodes")
}

/// The answer kinds a seed is made to provoke, in order: `A` ack, `U` unknown-series
/// nack (retryable), `T` too-large nack, `M` malformed nack.
fn answer_codes(answers: &[Answer]) -> String {
    answers
        .iter()
        .map(|answer| match answer {
            Answer::Ack(_) => 'A',
            Answer::Nack(nack) => match nack.reason {
                NackReason::UnknownSeries if nack.retryable => 'U',
                NackReason::TooLarge => 'T',
                NackReason::Malformed => 'M',
                _ => '?',
            },
        })
        .collect()
}

/// (file name, input, expected answer codes, expected records written).
fn seeds() -> Vec<(&'static str, Vec<u8>, &'static str, usize)> {
    let hello = hello_frame(FUZZ_AGENT_ID, FUZZ_TOKEN);
    let mut oversized_header = (1u32 << 20).to_be_bytes().to_vec();
    oversized_header.push(FrameKind::Batch.as_byte());
    oversized_header.extend_from_slice(&[0; 32]);
    let mut truncated = batch(FUZZ_AGENT_ID, 9, true, false);
    truncated.truncate(truncated.len() / 2);
    let garbage = Message::Batch(b"T\x01 not a batch".to_vec())
        .encode_to_vec(&FrameLimits::DEFAULT)
        .expect("frame");
    vec![
        (
            "resend_and_dictionary.bin",
            layout(
                0,
                &hello,
                &[
                    batch(FUZZ_AGENT_ID, 1, true, false),
                    batch(FUZZ_AGENT_ID, 2, false, true),
                    batch(FUZZ_AGENT_ID, 1, true, false),
                ],
            ),
            "AAA",
            2,
        ),
        (
            "unknown_series_then_definitions.bin",
            layout(
                2 << 1,
                &hello,
                &[
                    batch(FUZZ_AGENT_ID, 5, false, false),
                    batch(FUZZ_AGENT_ID, 5, true, false),
                ],
            ),
            "UA",
            1,
        ),
        (
            "bad_streams_then_a_batch.bin",
            layout(
                1 << 1,
                &hello,
                &[
                    oversized_header,
                    truncated,
                    garbage,
                    batch("gw-other", 3, true, false),
                    batch(FUZZ_AGENT_ID, 4, true, true),
                ],
            ),
            "TMMMA",
            1,
        ),
    ]
}

/// Hand-made edges: (file name, input).
fn regressions() -> Vec<(&'static str, Vec<u8>)> {
    let hello = hello_frame(FUZZ_AGENT_ID, FUZZ_TOKEN);
    vec![
        (
            "rejected_wrong_token.bin",
            layout(0, &hello_frame(FUZZ_AGENT_ID, "nope"), &[]),
        ),
        ("rejected_shutting_down.bin", layout(1, &hello, &[])),
        (
            "rejected_batch_on_hello_stream.bin",
            layout(0, &batch(FUZZ_AGENT_ID, 1, true, false), &[]),
        ),
        (
            "closed_unknown_frame_kind.bin",
            layout(0, &hello, &[vec![0, 0, 0, 2, 0x7f, 0]]),
        ),
        (
            "closed_hello_on_batch_stream.bin",
            layout(6 << 1, &hello, std::slice::from_ref(&hello)),
        ),
        (
            "truncated_hello.bin",
            layout(0, &hello[..hello.len() - 4], &[]),
        ),
        (
            "empty_streams.bin",
            layout(0, &hello, &[Vec::new(), Vec::new()]),
        ),
    ]
}

/// Rewrites the seeds and hand-made regressions when `TRIBUTARY_WRITE_FUZZ_SEEDS` is
/// set; once per test process, before any test reads them.
fn write_inputs_if_asked() {
    static WRITE: std::sync::Once = std::sync::Once::new();
    WRITE.call_once(|| {
        if std::env::var_os("TRIBUTARY_WRITE_FUZZ_SEEDS").is_none() {
            return;
        }
        let write = |kind: &str, name: &str, bytes: &[u8]| {
            let directory = fuzz_dir().join(kind).join(TARGET);
            fs::create_dir_all(&directory).expect("create fuzz input directory");
            fs::write(directory.join(name), bytes).expect("write fuzz input");
        };
        for (name, bytes, _, _) in seeds() {
            write("corpus_seed", name, &bytes);
        }
        for (name, bytes) in regressions() {
            write("regressions", name, &bytes);
        }
    });
}

#[test]
fn ingest_stream_seeds_are_welcomed_and_answered_as_designed() {
    write_inputs_if_asked();
    let built = seeds();
    for (name, bytes) in inputs("corpus_seed") {
        let run = ingest_stream(&bytes);
        assert!(
            matches!(run.hello, Some(HelloDecision::Accept(_))),
            "seed {name}: hello not accepted: {:?}",
            run.hello
        );
        assert!(run.violation.is_none(), "seed {name}: {:?}", run.violation);
        let codes = answer_codes(&run.answers);
        assert!(codes.contains('A'), "seed {name}: no ack in {codes}");
        if let Some((_, _, expected, records)) = built.iter().find(|seed| seed.0 == name) {
            assert_eq!(
                (codes.as_str(), run.records.len()),
                (*expected, *records),
                "seed {name} no longer gets the answers it was made for; after a wire-format change rewrite the seeds with TRIBUTARY_WRITE_FUZZ_SEEDS=1"
            );
        }
    }
}

#[test]
fn ingest_stream_regressions_do_not_panic() {
    write_inputs_if_asked();
    for (name, bytes) in inputs("regressions") {
        let run = ingest_stream(&bytes);
        if name.starts_with("closed_") {
            assert!(run.violation.is_some(), "regression {name}: {run:?}");
        }
        if name.starts_with("rejected_") {
            assert!(
                !matches!(run.hello, Some(HelloDecision::Accept(_))),
                "regression {name} was welcomed"
            );
        }
    }
}

/// The randomized counterpart of the fuzzer under `cargo test`: mutated seeds (byte
/// flips, truncation, splices) must never panic the decisions.
#[test]
fn mutated_seeds_never_panic() {
    write_inputs_if_asked();
    let seeds: Vec<Vec<u8>> = inputs("corpus_seed")
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for case in 0..400u64 {
        let mut input = seeds[(next() as usize) % seeds.len()].clone();
        match case % 3 {
            0 => {
                for _ in 0..1 + next() % 4 {
                    let position = (next() as usize) % input.len();
                    input[position] ^= (next() as u8) | 1;
                }
            }
            1 => input.truncate((next() as usize) % input.len()),
            _ => {
                let other = &seeds[(next() as usize) % seeds.len()];
                let from = (next() as usize) % other.len();
                let at = (next() as usize) % input.len();
                input.splice(at..at, other[from..].iter().copied());
            }
        }
        let _ = ingest_stream(&input);
    }
}
