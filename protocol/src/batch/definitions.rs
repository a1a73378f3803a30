//! The compact series definitions of batch format 3: interned strings, reference columns,
//! one zstd frame.
//!
//! Why: a session's first batches carry the key of every series the agent has (see
//! [`super::dictionary`]), and so does every record the collector writes to its log (each is
//! made self-contained). Formats 1 and 2 spelled each key out in postcard: about 37-45 bytes
//! per series, 45 KB for a 1,000-series gateway, which `bench e2e` measured at about 1.5
//! bytes per reading of its 30 s live phase, a third of everything the agent sent. Keys are
//! highly repetitive (a fleet is devices x metrics x a few tag values), so this codec writes
//! every distinct string once and each definition as small indices into that table, one
//! column per field so the same kinds of numbers sit together, and compresses the lot.
//!
//! Layout (all integers LEB128 varints, the id deltas zigzag):
//!
//! ```text
//! compression (0 none, 1 zstd) · raw_bytes · payload (raw_bytes of raw, compressed or not)
//! raw: string_count · strings (length, UTF-8 bytes) in order of first use
//!      ids_bytes · id column: each id minus the previous one (the first minus 0)
//!      devices_bytes · device column: string index
//!      metrics_bytes · metric column: string index
//!      tag_counts_bytes · tag count column
//!      tag column (the rest): name index, value index
//! ```
//!
//! An empty list of definitions is zero bytes. Definitions keep their order and their tags
//! theirs, so any `SeriesDef` list round-trips exactly. Decoding is untrusted-input safe:
//! sizes are checked against [`BatchLimits`] before anything is allocated or decompressed,
//! every index against the table, and the bytes of keys the references may expand to are
//! capped (a 1-byte reference to a long string must not multiply memory).

use std::collections::HashMap;

use super::varint::{self, Reader};
use super::{check_limit, BatchError, BatchLimits, COMPRESSION_NONE, COMPRESSION_ZSTD};
use crate::model::{SeriesDef, SeriesId, SeriesKey};

/// The zstd level of the definitions frame: the body's. The collector compresses the
/// definitions of every batch it logs, and higher levels gained little on a fleet's 1,000
/// definitions (level 9: 473 bytes, level 3: 558, of 7 KB of string table and columns).
const DEFINITIONS_ZSTD_LEVEL: i32 = super::DEFAULT_ZSTD_LEVEL;

/// Appends `series` in the compact layout.
pub(crate) fn encode(series: &[SeriesDef], out: &mut Vec<u8>) {
    if series.is_empty() {
        return;
    }
    let mut table = StringTable::default();
    let (mut ids, mut devices, mut metrics, mut tag_counts, mut tags) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut previous_id: SeriesId = 0;
    for definition in series {
        // Written as a wrapping 32-bit difference, read back the same way: any order works.
        varint::write_i64(
            &mut ids,
            i64::from(definition.id.wrapping_sub(previous_id) as i32),
        );
        previous_id = definition.id;
        table.write_index(&definition.key.device_id, &mut devices);
        table.write_index(&definition.key.metric, &mut metrics);
        varint::write_u64(&mut tag_counts, definition.key.tags.len() as u64);
        for (name, value) in &definition.key.tags {
            table.write_index(name, &mut tags);
            table.write_index(value, &mut tags);
        }
    }
    let mut raw = Vec::with_capacity(table.strings.len() + ids.len() * 5 + 16);
    varint::write_u64(&mut raw, table.indices.len() as u64);
    raw.extend_from_slice(&table.strings);
    for column in [&ids, &devices, &metrics, &tag_counts] {
        varint::write_u64(&mut raw, column.len() as u64);
        raw.extend_from_slice(column);
    }
    raw.extend_from_slice(&tags);

    match zstd::bulk::compress(&raw, DEFINITIONS_ZSTD_LEVEL) {
        Ok(compressed) if compressed.len() < raw.len() => {
            out.push(COMPRESSION_ZSTD);
            varint::write_u64(out, raw.len() as u64);
            out.extend_from_slice(&compressed);
        }
        // Tiny lists (a new series mid-session) do not gain from a zstd frame.
        _ => {
            out.push(COMPRESSION_NONE);
            varint::write_u64(out, raw.len() as u64);
            out.extend_from_slice(&raw);
        }
    }
}

/// Distinct strings in order of first use: their encoding, and each one's index.
#[derive(Default)]
struct StringTable<'a> {
    indices: HashMap<&'a str, u64>,
    strings: Vec<u8>,
}

impl<'a> StringTable<'a> {
    /// Writes the index of `text` to `column`, adding it to the table if it is new.
    fn write_index(&mut self, text: &'a str, column: &mut Vec<u8>) {
        let next = self.indices.len() as u64;
        let index = *self.indices.entry(text).or_insert_with(|| {
            varint::write_u64(&mut self.strings, text.len() as u64);
            self.strings.extend_from_slice(text.as_bytes());
            next
        });
        varint::write_u64(column, index);
    }
}

/// Decodes `count` definitions from the compact layout. Never panics; allocates only
/// within `limits`.
pub(crate) fn decode(
    bytes: &[u8],
    count: usize,
    limits: &BatchLimits,
) -> Result<Vec<SeriesDef>, BatchError> {
    let mismatch = || BatchError::DefinitionsMismatch {
        declared: count as u64,
        bytes: bytes.len() as u64,
    };
    if count == 0 {
        return if bytes.is_empty() {
            Ok(Vec::new())
        } else {
            Err(mismatch())
        };
    }
    let mut reader = Reader::new(bytes, "series definitions");
    let compression = reader.read_u8()?;
    let raw_bytes = reader.read_usize()?;
    check_limit("series definition bytes", raw_bytes, limits.max_body_bytes)?;
    let payload = reader.remaining();
    let decompressed;
    let raw: &[u8] = match compression {
        COMPRESSION_NONE => payload,
        COMPRESSION_ZSTD => {
            // The declared size was checked against the limit; zstd fails past it.
            decompressed = zstd::bulk::decompress(payload, raw_bytes).map_err(|source| {
                BatchError::Decompress {
                    declared_bytes: raw_bytes as u64,
                    source,
                }
            })?;
            &decompressed
        }
        code => return Err(BatchError::UnknownCompression { code }),
    };
    if raw.len() != raw_bytes {
        return Err(BatchError::DefinitionsSizeMismatch {
            declared_bytes: raw_bytes as u64,
            actual_bytes: raw.len() as u64,
        });
    }

    let mut raw = Reader::new(raw, "series definition strings");
    let string_count = raw.read_usize()?;
    // Every string takes at least its length byte: bounds the table by the input present.
    if string_count > raw.remaining().len() {
        return Err(mismatch());
    }
    let mut strings: Vec<&str> = Vec::with_capacity(string_count);
    for index in 0..string_count {
        let length = raw.read_usize()?;
        let text = std::str::from_utf8(raw.take(length)?).map_err(|_| {
            BatchError::DefinitionStringNotUtf8 {
                index: index as u64,
            }
        })?;
        strings.push(text);
    }
    let mut column = |name: &'static str| -> Result<Reader<'_>, BatchError> {
        let length = raw.read_usize()?;
        Ok(Reader::new(raw.take(length)?, name))
    };
    let mut ids = column("series definition id column")?;
    let mut devices = column("series definition device column")?;
    let mut metrics = column("series definition metric column")?;
    let mut tag_counts = column("series definition tag count column")?;
    let mut tags = Reader::new(raw.remaining(), "series definition tag column");
    // Every definition takes at least one byte in each column: bounds the allocation.
    if count > ids.remaining().len() {
        return Err(mismatch());
    }

    let mut key_bytes = 0usize;
    let mut resolve = |reader: &mut Reader<'_>| -> Result<String, BatchError> {
        let index = reader.read_u64()?;
        let text = usize::try_from(index)
            .ok()
            .and_then(|index| strings.get(index))
            .ok_or(BatchError::DefinitionStringOutOfRange {
                index,
                strings: strings.len() as u64,
            })?;
        key_bytes = key_bytes.saturating_add(text.len());
        check_limit("series key bytes", key_bytes, limits.max_body_bytes)?;
        Ok((*text).to_owned())
    };
    let mut series = Vec::with_capacity(count);
    let mut previous_id: SeriesId = 0;
    for _ in 0..count {
        let delta = ids.read_i64()?;
        let delta = i32::try_from(delta).map_err(|_| mismatch())?;
        let id = previous_id.wrapping_add(delta as u32);
        previous_id = id;
        let device_id = resolve(&mut devices)?;
        let metric = resolve(&mut metrics)?;
        let tag_count = tag_counts.read_usize()?;
        // Two index bytes at least per tag.
        if tag_count > tags.remaining().len() / 2 {
            return Err(mismatch());
        }
        let mut key_tags = Vec::with_capacity(tag_count);
        for _ in 0..tag_count {
            let name = resolve(&mut tags)?;
            let value = resolve(&mut tags)?;
            key_tags.push((name, value));
        }
        series.push(SeriesDef {
            id,
            key: SeriesKey {
                device_id,
                metric,
                tags: key_tags,
            },
        });
    }
    for leftover in [&ids, &devices, &metrics, &tag_counts, &tags] {
        if !leftover.is_empty() {
            return Err(BatchError::TrailingBytes {
                section: leftover.column(),
                count: leftover.remaining().len() as u64,
            });
        }
    }
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_past_the_table_are_an_error() {
        // One string, a definition whose metric points at string #5.
        let mut raw = Vec::new();
        varint::write_u64(&mut raw, 1);
        varint::write_u64(&mut raw, 1);
        raw.push(b'x');
        for column in [[0u8], [0], [5], [0]] {
            varint::write_u64(&mut raw, 1);
            raw.extend_from_slice(&column);
        }
        let mut out = vec![COMPRESSION_NONE];
        varint::write_u64(&mut out, raw.len() as u64);
        out.extend_from_slice(&raw);
        assert!(matches!(
            decode(&out, 1, &BatchLimits::default()),
            Err(BatchError::DefinitionStringOutOfRange {
                index: 5,
                strings: 1
            })
        ));
    }

    #[test]
    fn references_cannot_multiply_memory_past_the_limit() {
        // A 1,000-byte string referenced by 1,000 definitions: 2 MB of keys from ~5 KB.
        let long = "d".repeat(1_000);
        let series: Vec<SeriesDef> = (0..1_000)
            .map(|id| SeriesDef {
                id,
                key: SeriesKey::new(long.clone(), long.clone()),
            })
            .collect();
        let mut out = Vec::new();
        encode(&series, &mut out);
        let limits = BatchLimits {
            max_body_bytes: 100_000,
            ..BatchLimits::default()
        };
        assert!(matches!(
            decode(&out, series.len(), &limits),
            Err(BatchError::OverLimit {
                what: "series key bytes",
                ..
            })
        ));
    }
}
