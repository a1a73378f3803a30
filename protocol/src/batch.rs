//! The batch: what an agent ships to the collector, in a compact columnar encoding.
//!
//! A batch is self-contained except for series keys: its readings and summaries
//! name series by agent-assigned ids, and carries definitions only for the ids the
//! receiver may not know in this session (see [`dictionary`]). No value depends on
//! an earlier batch, because batches are retried, reordered and replayed from disk.
//!
//! Wire layout (all integers LEB128 varints, signed ones zigzag):
//!
//! ```text
//! 'T' FORMAT_VERSION
//! agent_id (length, UTF-8) · batch_seq · created_ms
//! definitions_bytes · series_count · series definitions
//!     format 3: interned strings and reference columns in their own zstd frame
//!               (see [`definitions`]; zero bytes when there are none)
//!     formats 1 and 2: postcard, one after the other, uncompressed
//! reading_count · run_count · summary_count · compression (0 none, 1 zstd) · body_bytes
//! body (compressed unless that did not help):
//!     formats 2, 3: heads_bytes · summary heads · summary_values_bytes · summary values
//!               sketches_bytes · summary sketches            (see [`summaries`])
//!     format 1: summaries_bytes · summaries (postcard each)
//!     runs_bytes · run column · times_bytes · timestamp column
//!     values_bytes · value column · flag column (the rest)
//! ```
//!
//! Format versions: 2 differs from 1 only in how summaries are encoded (compact columns
//! instead of postcard, about 5x smaller); 3 (written by default) differs from 2 only in
//! how series definitions are encoded (interned strings in a zstd frame instead of
//! postcard, about 100x smaller for a real fleet; the body is byte for byte the same, so
//! moving a batch between 2 and 3 rewrites only its envelope). Every version from
//! [`OLDEST_FORMAT_VERSION`] up decodes, because agent buffers and collector logs hold
//! batches written by older builds; [`BatchEncoder::set_format_version`] and
//! [`transcode_batch`] write the older format for a peer that only reads that
//! ([`format_version_for_protocol`]).
//!
//! The definitions sit outside the compressed body so that an agent can store a
//! batch once and attach the definitions a session needs at send time
//! ([`replace_series_definitions`]). All counts and sizes come before the data
//! they describe, so the decoder checks them against [`BatchLimits`] before it
//! allocates or decompresses anything. Why the columns look the way they do, and
//! the measurements behind it, is in `docs/benchmarks.md` and [`readings`].
//!
//! Readings come back in canonical order: sorted by series, then time (stable, so
//! readings with equal series and time keep their relative order). Values
//! round-trip bit-exact, including negative zero, infinities and NaN payloads.

mod definitions;
pub mod dictionary;
mod readings;
mod summaries;
pub mod varint;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use dictionary::{
    series_ids_used, DictionaryError, ReceiverSessionDictionary, SenderSessionDictionary,
};

use crate::model::{Reading, SeriesDef, SeriesId, WindowSummary};
use readings::{EncodedColumns, ReadingColumns};
use summaries::{EncodedSummaryColumns, SummaryColumns};
use varint::Reader;

const MAGIC: u8 = b'T';
/// Version of the batch wire layout this build writes; bumped on any incompatible change.
pub const FORMAT_VERSION: u8 = 3;
/// The oldest batch layout this build still decodes (and can write, for old peers).
pub const OLDEST_FORMAT_VERSION: u8 = 1;

/// The batch format a session of the given protocol version carries: protocol 1 peers
/// read batch format 1 only; protocol 2 introduced format 2 (compact summaries), protocol 3
/// format 3 (compact series definitions).
pub fn format_version_for_protocol(protocol_version: u16) -> u8 {
    match protocol_version {
        0 | 1 => OLDEST_FORMAT_VERSION,
        2 => 2,
        _ => FORMAT_VERSION,
    }
}
const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;
/// The zstd level [`encode_batch`] uses; chosen by measurement (docs/benchmarks.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// One shipment from an agent: readings and window summaries, plus the series
/// definitions the receiver may not know yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub agent_id: String,
    /// Increases monotonically per agent and never repeats: the idempotency key
    /// all the way to storage.
    pub batch_seq: u64,
    pub created_ms: i64,
    /// Definitions for the series ids the receiver may not know in this session.
    pub series: Vec<SeriesDef>,
    pub readings: Vec<Reading>,
    pub summaries: Vec<WindowSummary>,
}

impl Batch {
    /// Sorts readings into the order the decoder returns them in.
    pub fn sort_readings(&mut self) {
        self.readings
            .sort_by_key(|reading| (reading.series, reading.time_ms));
    }
}

/// Upper bounds the decoder enforces on untrusted input before allocating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLimits {
    pub max_encoded_bytes: usize,
    /// Decompressed body size.
    pub max_body_bytes: usize,
    pub max_agent_id_bytes: usize,
    pub max_series: usize,
    pub max_readings: usize,
    pub max_summaries: usize,
}

impl Default for BatchLimits {
    /// Room for a 10-minute backlog batch of 1000 series at 1 Hz (600k readings).
    fn default() -> Self {
        Self {
            max_encoded_bytes: 32 << 20,
            max_body_bytes: 64 << 20,
            max_agent_id_bytes: 256,
            max_series: 100_000,
            max_readings: 1_000_000,
            max_summaries: 1_000_000,
        }
    }
}

/// What was wrong with a batch's bytes.
#[derive(Debug, Error)]
pub enum BatchError {
    #[error("batch is truncated: the input ended while reading the {section}")]
    Truncated { section: &'static str },
    #[error("not a Tributary batch: first byte is {found:#04x}, expected {expected:#04x} ('T')")]
    BadMagic { found: u8, expected: u8 },
    #[error(
        "batch format version {found} is not supported (this build reads versions 1 to \
         {supported}); upgrade the receiver or downgrade the sender"
    )]
    UnsupportedVersion { found: u8, supported: u8 },
    #[error("batch declares {declared} {what}, limit is {limit}")]
    OverLimit {
        what: &'static str,
        declared: u64,
        limit: u64,
    },
    #[error("varint in the {section} is longer than 64 bits")]
    VarintOverflow { section: &'static str },
    #[error("agent id is not valid UTF-8")]
    AgentIdNotUtf8,
    #[error("could not decode {section} #{index}: {source}")]
    Postcard {
        section: &'static str,
        index: u64,
        source: postcard::Error,
    },
    #[error("batch uses unknown compression {code} (known: 0 none, 1 zstd)")]
    UnknownCompression { code: u8 },
    #[error("could not decompress the batch body (declared {declared_bytes} bytes): {source}")]
    Decompress {
        declared_bytes: u64,
        source: std::io::Error,
    },
    #[error("batch body is {actual_bytes} bytes after decompression, but the header declares {declared_bytes}")]
    BodySizeMismatch {
        declared_bytes: u64,
        actual_bytes: u64,
    },
    #[error("{count} unexpected bytes after the {section}")]
    TrailingBytes { section: &'static str, count: u64 },
    #[error(
        "batch declares {declared_readings} readings, but a run of {run_length} follows \
         {already_decoded} decoded readings (run lengths must be positive and add up to the count)"
    )]
    RunLengthsMismatch {
        declared_readings: u64,
        run_length: u64,
        already_decoded: u64,
    },
    #[error(
        "batch declares {declared} series definitions in {bytes} bytes, but they parse differently"
    )]
    DefinitionsMismatch { declared: u64, bytes: u64 },
    #[error("series definitions are {actual_bytes} bytes after decompression, but the batch declares {declared_bytes}")]
    DefinitionsSizeMismatch {
        declared_bytes: u64,
        actual_bytes: u64,
    },
    #[error(
        "a series definition refers to string #{index}, but the batch's definitions hold \
         {strings} strings; the encoding is corrupt"
    )]
    DefinitionStringOutOfRange { index: u64, strings: u64 },
    #[error("string #{index} of the batch's series definitions is not valid UTF-8")]
    DefinitionStringNotUtf8 { index: u64 },
    #[error("batch declares {runs} runs for {readings} readings; runs cannot outnumber readings")]
    TooManyRuns { runs: u64, readings: u64 },
    #[error("series id {value} in the run column does not fit in 32 bits")]
    SeriesIdOutOfRange { value: u64 },
    #[error("unknown value mode {mode:#04x} in the run column")]
    UnknownValueMode { mode: u8 },
    #[error("unknown value mode {mode:#04x} in the summary heads column")]
    UnknownSummaryMode { mode: u8 },
    #[error(
        "summary #{index}: its {field} does not fit the field's range; the encoding is corrupt"
    )]
    SummaryOutOfRange { index: u64, field: &'static str },
    #[error("summary #{index}: its quantile sketch is invalid: {source}")]
    SummarySketch {
        index: u64,
        source: crate::sketch::SketchError,
    },
    #[error(
        "flag column points {gap} past the previous flag, beyond the batch's {readings} readings"
    )]
    FlagIndexOutOfRange { gap: u64, readings: u64 },
}

/// The envelope fields, readable without decompressing the body (for example to
/// deduplicate on `(agent_id, batch_seq)` before doing any work).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    pub agent_id: String,
    pub batch_seq: u64,
    pub created_ms: i64,
    pub series_count: usize,
    pub reading_count: usize,
    pub summary_count: usize,
}

/// Encodes batches, reusing its column buffers and zstd context between calls.
pub struct BatchEncoder {
    zstd_level: i32,
    format_version: u8,
    summary_columns: SummaryColumns,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    columns: ReadingColumns,
    sorted: Vec<Reading>,
    body: Vec<u8>,
    compressed: Vec<u8>,
}

impl Default for BatchEncoder {
    fn default() -> Self {
        Self::new(DEFAULT_ZSTD_LEVEL)
    }
}

impl BatchEncoder {
    pub fn new(zstd_level: i32) -> Self {
        Self {
            zstd_level,
            format_version: FORMAT_VERSION,
            summary_columns: SummaryColumns::default(),
            // If zstd cannot set up a context (out of memory), batches go uncompressed.
            compressor: zstd::bulk::Compressor::new(zstd_level).ok(),
            columns: ReadingColumns::default(),
            sorted: Vec::new(),
            body: Vec::new(),
            compressed: Vec::new(),
        }
    }

    pub fn zstd_level(&self) -> i32 {
        self.zstd_level
    }

    /// Writes batch format `format_version` from now on (the default is [`FORMAT_VERSION`];
    /// an older one for a peer that reads only that, see [`format_version_for_protocol`]).
    pub fn set_format_version(&mut self, format_version: u8) -> Result<(), BatchError> {
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&format_version) {
            return Err(BatchError::UnsupportedVersion {
                found: format_version,
                supported: FORMAT_VERSION,
            });
        }
        self.format_version = format_version;
        Ok(())
    }

    pub fn format_version(&self) -> u8 {
        self.format_version
    }

    /// Encodes `batch`, appending to `out`.
    pub fn encode_into(&mut self, batch: &Batch, out: &mut Vec<u8>) {
        let readings: &[Reading] = if readings::is_canonical(&batch.readings) {
            &batch.readings
        } else {
            self.sorted.clear();
            self.sorted.extend_from_slice(&batch.readings);
            self.sorted
                .sort_by_key(|reading| (reading.series, reading.time_ms));
            &self.sorted
        };
        let run_count = readings::encode(readings, batch.created_ms, &mut self.columns);

        self.body.clear();
        if self.format_version >= 2 {
            summaries::encode(
                &batch.summaries,
                batch.created_ms,
                &mut self.summary_columns,
            );
            for column in [
                &self.summary_columns.heads,
                &self.summary_columns.values,
                &self.summary_columns.sketches,
            ] {
                varint::write_u64(&mut self.body, column.len() as u64);
                self.body.extend_from_slice(column);
            }
        } else {
            let mut summaries = Vec::new();
            for summary in &batch.summaries {
                append_postcard(&mut summaries, summary);
            }
            varint::write_u64(&mut self.body, summaries.len() as u64);
            self.body.extend_from_slice(&summaries);
        }
        let body = &mut self.body;
        for column in [
            &self.columns.runs,
            &self.columns.times,
            &self.columns.values,
        ] {
            varint::write_u64(body, column.len() as u64);
            body.extend_from_slice(column);
        }
        body.extend_from_slice(&self.columns.flags);

        let mut compression = COMPRESSION_NONE;
        if let Some(compressor) = self.compressor.as_mut() {
            self.compressed.clear();
            self.compressed
                .reserve(zstd::zstd_safe::compress_bound(self.body.len()));
            if compressor
                .compress_to_buffer(&self.body[..], &mut self.compressed)
                .is_ok()
                && self.compressed.len() < self.body.len()
            {
                compression = COMPRESSION_ZSTD;
            }
        }

        write_envelope_start(out, batch, self.format_version);
        write_definitions(out, &batch.series, self.format_version);
        varint::write_u64(out, readings.len() as u64);
        varint::write_u64(out, run_count as u64);
        varint::write_u64(out, batch.summaries.len() as u64);
        out.push(compression);
        varint::write_u64(out, self.body.len() as u64);
        if compression == COMPRESSION_ZSTD {
            out.extend_from_slice(&self.compressed);
        } else {
            out.extend_from_slice(&self.body);
        }
    }

    pub fn encode(&mut self, batch: &Batch) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(batch, &mut out);
        out
    }
}

/// Encodes a batch with the default settings. For many batches, keep a
/// [`BatchEncoder`] to reuse its buffers.
pub fn encode_batch(batch: &Batch) -> Vec<u8> {
    BatchEncoder::default().encode(batch)
}

/// Encodes `batch` in an older (or the current) batch format, for a session that negotiated
/// an older protocol version; an unsupported version is an error.
pub fn encode_batch_as(batch: &Batch, format_version: u8) -> Result<Vec<u8>, BatchError> {
    let mut encoder = BatchEncoder::default();
    encoder.set_format_version(format_version)?;
    Ok(encoder.encode(batch))
}

fn append_postcard<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    // Serialising our own plain data types into a Vec cannot fail.
    if let Ok(bytes) = postcard::to_stdvec(value) {
        out.extend_from_slice(&bytes);
    }
}

fn write_envelope_start(out: &mut Vec<u8>, batch: &Batch, format_version: u8) {
    out.push(MAGIC);
    out.push(format_version);
    varint::write_u64(out, batch.agent_id.len() as u64);
    out.extend_from_slice(batch.agent_id.as_bytes());
    varint::write_u64(out, batch.batch_seq);
    varint::write_i64(out, batch.created_ms);
}

fn write_definitions(out: &mut Vec<u8>, series: &[SeriesDef], format_version: u8) {
    let mut definitions = Vec::new();
    if format_version >= 3 {
        definitions::encode(series, &mut definitions);
    } else {
        for def in series {
            append_postcard(&mut definitions, def);
        }
    }
    varint::write_u64(out, definitions.len() as u64);
    varint::write_u64(out, series.len() as u64);
    out.extend_from_slice(&definitions);
}

fn check_limit(what: &'static str, declared: usize, limit: usize) -> Result<(), BatchError> {
    if declared > limit {
        return Err(BatchError::OverLimit {
            what,
            declared: declared as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}

/// The envelope up to and including the series definitions' raw bytes.
struct EnvelopeStart<'a> {
    format_version: u8,
    agent_id: &'a str,
    batch_seq: u64,
    created_ms: i64,
    series_count: usize,
    definitions: &'a [u8],
}

fn read_envelope_start<'a>(
    reader: &mut Reader<'a>,
    limits: &BatchLimits,
) -> Result<EnvelopeStart<'a>, BatchError> {
    let magic = reader.read_u8()?;
    if magic != MAGIC {
        return Err(BatchError::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    let version = reader.read_u8()?;
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(BatchError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let agent_id_bytes = reader.read_usize()?;
    check_limit("agent id bytes", agent_id_bytes, limits.max_agent_id_bytes)?;
    let agent_id = std::str::from_utf8(reader.take(agent_id_bytes)?)
        .map_err(|_| BatchError::AgentIdNotUtf8)?;
    let batch_seq = reader.read_u64()?;
    let created_ms = reader.read_i64()?;
    let definitions_bytes = reader.read_usize()?;
    let series_count = reader.read_usize()?;
    check_limit("series definitions", series_count, limits.max_series)?;
    let definitions = reader.take(definitions_bytes)?;
    Ok(EnvelopeStart {
        format_version: version,
        agent_id,
        batch_seq,
        created_ms,
        series_count,
        definitions,
    })
}

struct Counts {
    reading_count: usize,
    run_count: usize,
    summary_count: usize,
    compression: u8,
    body_bytes: usize,
}

fn read_counts(reader: &mut Reader<'_>, limits: &BatchLimits) -> Result<Counts, BatchError> {
    let reading_count = reader.read_usize()?;
    check_limit("readings", reading_count, limits.max_readings)?;
    let run_count = reader.read_usize()?;
    if run_count > reading_count {
        return Err(BatchError::TooManyRuns {
            runs: run_count as u64,
            readings: reading_count as u64,
        });
    }
    let summary_count = reader.read_usize()?;
    check_limit("summaries", summary_count, limits.max_summaries)?;
    let compression = reader.read_u8()?;
    if compression != COMPRESSION_NONE && compression != COMPRESSION_ZSTD {
        return Err(BatchError::UnknownCompression { code: compression });
    }
    let body_bytes = reader.read_usize()?;
    check_limit("body bytes", body_bytes, limits.max_body_bytes)?;
    Ok(Counts {
        reading_count,
        run_count,
        summary_count,
        compression,
        body_bytes,
    })
}

fn decode_definitions(
    start: &EnvelopeStart<'_>,
    limits: &BatchLimits,
) -> Result<Vec<SeriesDef>, BatchError> {
    let (bytes, count) = (start.definitions, start.series_count);
    if start.format_version >= 3 {
        return definitions::decode(bytes, count, limits);
    }
    let mismatch = || BatchError::DefinitionsMismatch {
        declared: count as u64,
        bytes: bytes.len() as u64,
    };
    // Every definition takes at least three bytes (id, two string lengths), which
    // bounds the allocation by the input actually present.
    if count > bytes.len() / 3 {
        return Err(mismatch());
    }
    let mut series = Vec::with_capacity(count);
    let mut rest = bytes;
    for index in 0..count {
        let (def, remaining) = postcard::take_from_bytes::<SeriesDef>(rest).map_err(|source| {
            BatchError::Postcard {
                section: "series definition",
                index: index as u64,
                source,
            }
        })?;
        series.push(def);
        rest = remaining;
    }
    if !rest.is_empty() {
        return Err(mismatch());
    }
    Ok(series)
}

fn check_encoded_size(bytes: &[u8], limits: &BatchLimits) -> Result<(), BatchError> {
    check_limit("encoded bytes", bytes.len(), limits.max_encoded_bytes)
}

/// Reads the envelope without decompressing the body.
pub fn decode_batch_header(bytes: &[u8], limits: &BatchLimits) -> Result<BatchHeader, BatchError> {
    check_encoded_size(bytes, limits)?;
    let mut reader = Reader::new(bytes, "envelope");
    let start = read_envelope_start(&mut reader, limits)?;
    let counts = read_counts(&mut reader, limits)?;
    Ok(BatchHeader {
        agent_id: start.agent_id.to_owned(),
        batch_seq: start.batch_seq,
        created_ms: start.created_ms,
        series_count: start.series_count,
        reading_count: counts.reading_count,
        summary_count: counts.summary_count,
    })
}

/// Bytes of the series definitions an encoded batch carries (their postcard encoding,
/// without the two counts in front), read from the envelope alone: lets a sender account
/// for what the session dictionary costs on the wire apart from the data.
pub fn series_definitions_bytes(bytes: &[u8], limits: &BatchLimits) -> Result<usize, BatchError> {
    check_encoded_size(bytes, limits)?;
    let mut reader = Reader::new(bytes, "envelope");
    Ok(read_envelope_start(&mut reader, limits)?.definitions.len())
}

/// Decodes an untrusted batch. Never panics; allocates only within `limits`.
/// For many batches, keep a [`BatchDecoder`] to reuse its zstd context and buffer.
pub fn decode_batch(bytes: &[u8], limits: &BatchLimits) -> Result<Batch, BatchError> {
    BatchDecoder::new().decode(bytes, limits)
}

/// Decodes batches, reusing its zstd context and body buffer between calls (a
/// fresh zstd context per 1 s batch costs more than decoding its readings).
#[derive(Default)]
pub struct BatchDecoder {
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    body: Vec<u8>,
}

impl BatchDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes an untrusted batch. Never panics; allocates only within `limits`.
    pub fn decode(&mut self, bytes: &[u8], limits: &BatchLimits) -> Result<Batch, BatchError> {
        check_encoded_size(bytes, limits)?;
        let mut reader = Reader::new(bytes, "envelope");
        let start = read_envelope_start(&mut reader, limits)?;
        let counts = read_counts(&mut reader, limits)?;
        let body = self.body(&counts, reader.remaining())?;
        decode_body(start, &counts, body, limits)
    }

    /// The definitions an encoded batch carries and the series ids it uses, without
    /// decoding its timestamps and values (only the run column, and the summaries,
    /// are read). What a sender needs to attach definitions at send time to batches
    /// stored without them. Never panics; allocates only within `limits`.
    pub fn series_usage(
        &mut self,
        bytes: &[u8],
        limits: &BatchLimits,
    ) -> Result<SeriesUsage, BatchError> {
        check_encoded_size(bytes, limits)?;
        let mut reader = Reader::new(bytes, "envelope");
        let start = read_envelope_start(&mut reader, limits)?;
        let counts = read_counts(&mut reader, limits)?;
        let body = self.body(&counts, reader.remaining())?;
        if counts.summary_count > 0 {
            // Summary batches are small next to raw ones: decoded whole, so this reader
            // follows whatever the summary encoding is.
            let batch = decode_body(start, &counts, body, limits)?;
            let used = series_ids_used(&batch);
            return Ok(SeriesUsage {
                defined: batch.series,
                used,
            });
        }
        if body.len() != counts.body_bytes {
            return Err(BatchError::BodySizeMismatch {
                declared_bytes: counts.body_bytes as u64,
                actual_bytes: body.len() as u64,
            });
        }
        let defined = decode_definitions(&start, limits)?;
        let mut body_reader = Reader::new(body, "body");
        // The (empty) summary sections before the runs: one in format 1, three after.
        let summary_sections = if bytes.get(1).is_some_and(|version| *version >= 2) {
            3
        } else {
            1
        };
        for _ in 0..summary_sections {
            let section_bytes = body_reader.read_usize()?;
            body_reader.take(section_bytes)?;
        }
        let runs_bytes = body_reader.read_usize()?;
        let mut runs = Reader::new(body_reader.take(runs_bytes)?, "run column");
        // A run takes at least three bytes: bounds the allocation by the input present.
        if counts.run_count > runs_bytes / 3 {
            return Err(BatchError::Truncated {
                section: "reading columns",
            });
        }
        let mut used = Vec::with_capacity(counts.run_count);
        let mut series: u64 = 0;
        let mut readings = 0usize;
        for _ in 0..counts.run_count {
            series = series.wrapping_add(runs.read_u64()?);
            let series_id = SeriesId::try_from(series)
                .map_err(|_| BatchError::SeriesIdOutOfRange { value: series })?;
            let length = runs.read_usize()?;
            runs.read_u8()?;
            if length == 0 || length > counts.reading_count - readings {
                return Err(BatchError::RunLengthsMismatch {
                    declared_readings: counts.reading_count as u64,
                    run_length: length as u64,
                    already_decoded: readings as u64,
                });
            }
            readings += length;
            used.push(series_id);
        }
        used.sort_unstable();
        used.dedup();
        Ok(SeriesUsage { defined, used })
    }

    /// The batch body: `payload` itself, or decompressed into the reused buffer.
    fn body<'a>(&'a mut self, counts: &Counts, payload: &'a [u8]) -> Result<&'a [u8], BatchError> {
        if counts.compression != COMPRESSION_ZSTD {
            return Ok(payload);
        }
        let decompressor = match self.decompressor.as_mut() {
            Some(decompressor) => decompressor,
            None => self
                .decompressor
                .insert(zstd::bulk::Decompressor::new().map_err(|source| {
                    BatchError::Decompress {
                        declared_bytes: counts.body_bytes as u64,
                        source,
                    }
                })?),
        };
        self.body.clear();
        // The declared size was checked against the limit; zstd writes at most
        // the buffer's capacity and fails past it.
        self.body.reserve_exact(counts.body_bytes);
        decompressor
            .decompress_to_buffer(payload, &mut self.body)
            .map_err(|source| BatchError::Decompress {
                declared_bytes: counts.body_bytes as u64,
                source,
            })?;
        Ok(&self.body)
    }
}

/// What [`BatchDecoder::series_usage`] reads from an encoded batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SeriesUsage {
    /// The definitions the batch carries (none for a batch stored without them).
    pub defined: Vec<SeriesDef>,
    /// The ids its readings and summaries use, sorted and deduplicated.
    pub used: Vec<SeriesId>,
}

fn decode_body(
    start: EnvelopeStart<'_>,
    counts: &Counts,
    body: &[u8],
    limits: &BatchLimits,
) -> Result<Batch, BatchError> {
    if body.len() != counts.body_bytes {
        return Err(BatchError::BodySizeMismatch {
            declared_bytes: counts.body_bytes as u64,
            actual_bytes: body.len() as u64,
        });
    }

    let mut body_reader = Reader::new(body, "body");
    let summary_columns = if start.format_version >= 2 {
        let heads_bytes = body_reader.read_usize()?;
        let heads = body_reader.take(heads_bytes)?;
        let values_bytes = body_reader.read_usize()?;
        let values = body_reader.take(values_bytes)?;
        let sketches_bytes = body_reader.read_usize()?;
        let sketches = body_reader.take(sketches_bytes)?;
        Ok(EncodedSummaryColumns {
            heads,
            values,
            sketches,
        })
    } else {
        let summaries_bytes = body_reader.read_usize()?;
        Err(body_reader.take(summaries_bytes)?)
    };
    let runs_bytes = body_reader.read_usize()?;
    let runs = body_reader.take(runs_bytes)?;
    let times_bytes = body_reader.read_usize()?;
    let times = body_reader.take(times_bytes)?;
    let values_bytes = body_reader.read_usize()?;
    let values = body_reader.take(values_bytes)?;
    let flags = body_reader.remaining();

    // Each reading costs at least one byte of timestamp or value column beyond
    // its run, which caps what a small body can make us allocate.
    let minimum_column_bytes = counts.reading_count.saturating_sub(counts.run_count);
    if times.len() < minimum_column_bytes || runs.len() < counts.run_count.saturating_mul(3) {
        return Err(BatchError::Truncated {
            section: "reading columns",
        });
    }
    let series = decode_definitions(&start, limits)?;

    let summaries = match summary_columns {
        Ok(columns) => {
            let mut summaries = Vec::new();
            summaries::decode(
                columns,
                counts.summary_count,
                start.created_ms,
                &mut summaries,
            )?;
            summaries
        }
        Err(postcard_section) => decode_postcard_summaries(postcard_section, counts.summary_count)?,
    };
    let mut readings = Vec::with_capacity(counts.reading_count);
    readings::decode(
        EncodedColumns {
            runs,
            times,
            values,
            flags,
        },
        counts.run_count,
        counts.reading_count,
        start.created_ms,
        &mut readings,
    )?;

    Ok(Batch {
        agent_id: start.agent_id.to_owned(),
        batch_seq: start.batch_seq,
        created_ms: start.created_ms,
        series,
        readings,
        summaries,
    })
}

/// Format 1 summaries: postcard, one after the other.
fn decode_postcard_summaries(
    section: &[u8],
    summary_count: usize,
) -> Result<Vec<WindowSummary>, BatchError> {
    if section.len() < summary_count {
        return Err(BatchError::Truncated {
            section: "summaries",
        });
    }
    let mut summaries = Vec::with_capacity(summary_count);
    let mut rest = section;
    for index in 0..summary_count {
        let (summary, remaining) =
            postcard::take_from_bytes::<WindowSummary>(rest).map_err(|source| {
                BatchError::Postcard {
                    section: "summary",
                    index: index as u64,
                    source,
                }
            })?;
        summaries.push(summary);
        rest = remaining;
    }
    if !rest.is_empty() {
        return Err(BatchError::TrailingBytes {
            section: "summaries",
            count: rest.len() as u64,
        });
    }

    Ok(summaries)
}

/// Re-encodes an encoded batch with different series definitions, copying the
/// (compressed) body untouched. Lets an agent store a batch once and attach, at
/// send time, the definitions the current session still needs.
pub fn replace_series_definitions(
    encoded: &[u8],
    series: &[SeriesDef],
    limits: &BatchLimits,
) -> Result<Vec<u8>, BatchError> {
    check_encoded_size(encoded, limits)?;
    let mut reader = Reader::new(encoded, "envelope");
    let start = read_envelope_start(&mut reader, limits)?;
    Ok(rewrite_envelope(
        &start,
        series,
        start.format_version,
        reader.remaining(),
    ))
}

/// The envelope of `start` in `format_version` with `series` as its definitions, then
/// `rest` (the counts and the body) copied untouched.
fn rewrite_envelope(
    start: &EnvelopeStart<'_>,
    series: &[SeriesDef],
    format_version: u8,
    rest: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(rest.len() + 64 + series.len() * 32);
    out.push(MAGIC);
    out.push(format_version);
    varint::write_u64(&mut out, start.agent_id.len() as u64);
    out.extend_from_slice(start.agent_id.as_bytes());
    varint::write_u64(&mut out, start.batch_seq);
    varint::write_i64(&mut out, start.created_ms);
    write_definitions(&mut out, series, format_version);
    out.extend_from_slice(rest);
    out
}

/// The batch format an encoded batch is written in, from its first two bytes.
pub fn batch_format_version(encoded: &[u8]) -> Result<u8, BatchError> {
    let mut reader = Reader::new(encoded, "envelope");
    let magic = reader.read_u8()?;
    if magic != MAGIC {
        return Err(BatchError::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    reader.read_u8()
}

/// Re-encodes `encoded` in batch format `format_version` (same content, same series
/// definitions). For a sender whose stored batches are in another format than the one the
/// session's peer reads (see [`batch_format_version`] to tell whether that is needed).
/// Between formats 2 and 3 only the definitions differ, so only the envelope is rewritten
/// (the compressed body is copied); to or from format 1 the batch is decoded and encoded.
pub fn transcode_batch(
    encoded: &[u8],
    format_version: u8,
    limits: &BatchLimits,
) -> Result<Vec<u8>, BatchError> {
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&format_version) {
        return Err(BatchError::UnsupportedVersion {
            found: format_version,
            supported: FORMAT_VERSION,
        });
    }
    check_encoded_size(encoded, limits)?;
    let mut reader = Reader::new(encoded, "envelope");
    let start = read_envelope_start(&mut reader, limits)?;
    if start.format_version >= 2 && format_version >= 2 {
        let series = decode_definitions(&start, limits)?;
        return Ok(rewrite_envelope(
            &start,
            &series,
            format_version,
            reader.remaining(),
        ));
    }
    encode_batch_as(&decode_batch(encoded, limits)?, format_version)
}
