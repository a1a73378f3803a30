//! `bench codec`: bytes per reading and encode/decode speed of the batch codec.
//!
//! A simulated fleet (100 devices x 10 metrics at 1 Hz, one hour; ten minutes with
//! `--quick`) is cut into batches the way an agent ships it: 1 s of data per batch
//! (live) and 10 min per batch (a backlog after an outage). One session carries
//! the whole run, so the series dictionary is sent once, in the first batch, and
//! its cost is amortised over the session as it would be in production.
//!
//! Baselines, measured on the same readings in the same run:
//! - one JSON message per reading, as a typical MQTT sensor publishes it (topic +
//!   payload bytes, no MQTT framing);
//! - the same JSON objects batched (newline-delimited) and zstd-compressed per batch;
//! - postcard rows (series id, time, value, flags) with the same dictionary, zstd per batch.
//!
//! All baselines use the same zstd level as our encoding. Encode and decode speeds
//! are single-threaded, best of 3 (quick) or 5 repetitions.

mod pco_side;

use anyhow::{ensure, Context};
use serde::Serialize;
use serde_json::{json, Value};
use tributary_firmware_sim::fleet::{Fleet, Metric};
use tributary_protocol::batch::{
    series_ids_used, Batch, BatchDecoder, BatchEncoder, BatchLimits, SenderSessionDictionary,
    DEFAULT_ZSTD_LEVEL,
};
use tributary_protocol::{Reading, SeriesDef, SeriesKey};

use super::{round3, timed, BenchOptions};

const DEVICES: usize = 100;
const SEED: u64 = 2024;
const START_MS: i64 = 1_700_000_000_000;
const FULL_PERIODS: usize = 3600;
const QUICK_PERIODS: usize = 600;

/// The fleet's readings, with where each 1 s sample period starts.
struct Workload {
    series: Vec<SeriesDef>,
    readings: Vec<Reading>,
    period_starts: Vec<usize>,
}

fn workload(periods: usize) -> Workload {
    let mut fleet = Fleet::new(DEVICES, SEED);
    let series = fleet.series();
    let mut readings = Vec::with_capacity(periods * DEVICES * Metric::ALL.len());
    let mut period_starts = Vec::with_capacity(periods + 1);
    for period in 0..periods {
        period_starts.push(readings.len());
        fleet.sample_period(START_MS + period as i64 * 1000, &mut readings);
    }
    period_starts.push(readings.len());
    Workload {
        series,
        readings,
        period_starts,
    }
}

/// Cuts the workload into batches of `periods_per_batch` seconds, attaching
/// definitions the way the sender's session dictionary asks for them (every batch
/// is acked before the next, so only the first carries definitions).
fn batches(workload: &Workload, periods_per_batch: usize) -> Vec<Batch> {
    let mut dictionary = SenderSessionDictionary::new();
    let mut batches = Vec::new();
    let period_count = workload.period_starts.len() - 1;
    for (batch_seq, first_period) in (0..period_count).step_by(periods_per_batch).enumerate() {
        let last_period = (first_period + periods_per_batch).min(period_count);
        let readings = workload.readings
            [workload.period_starts[first_period]..workload.period_starts[last_period]]
            .to_vec();
        let mut batch = Batch {
            agent_id: "gateway-0001".into(),
            batch_seq: batch_seq as u64,
            created_ms: START_MS + last_period as i64 * 1000,
            series: Vec::new(),
            readings,
            summaries: Vec::new(),
        };
        let needed = dictionary.definitions_needed(&series_ids_used(&batch));
        batch.series = needed
            .iter()
            .filter_map(|id| workload.series.get(*id as usize).cloned())
            .collect();
        dictionary.confirm(needed);
        batches.push(batch);
    }
    batches
}

/// A reading as a typical MQTT sensor publishes it.
#[derive(Serialize)]
struct JsonReading<'a> {
    device_id: &'a str,
    metric: &'a str,
    timestamp_ms: i64,
    value: f64,
    unit: &'a str,
}

fn json_reading<'a>(key: &'a SeriesKey, reading: &Reading) -> JsonReading<'a> {
    let unit = Metric::ALL
        .iter()
        .find(|metric| metric.name() == key.metric)
        .map_or("", |metric| metric.unit());
    JsonReading {
        device_id: &key.device_id,
        metric: &key.metric,
        timestamp_ms: reading.time_ms,
        value: reading.value,
        unit,
    }
}

fn tag<'a>(key: &'a SeriesKey, name: &str) -> &'a str {
    key.tags
        .iter()
        .find(|(tag_name, _)| tag_name == name)
        .map_or("", |(_, value)| value.as_str())
}

/// Topic + payload bytes of one MQTT message per reading.
fn json_message_bytes(workload: &Workload) -> anyhow::Result<u64> {
    let topics: Vec<String> = workload
        .series
        .iter()
        .map(|def| {
            format!(
                "factory/{}/floor-{}/{}/{}",
                tag(&def.key, "site"),
                tag(&def.key, "floor"),
                def.key.device_id,
                def.key.metric
            )
        })
        .collect();
    let mut total = 0u64;
    let mut payload = Vec::with_capacity(256);
    for reading in &workload.readings {
        let index = reading.series as usize;
        let (Some(topic), Some(def)) = (topics.get(index), workload.series.get(index)) else {
            anyhow::bail!(
                "reading of series {} that the fleet never defined",
                reading.series
            );
        };
        payload.clear();
        serde_json::to_writer(&mut payload, &json_reading(&def.key, reading))?;
        total += (topic.len() + payload.len()) as u64;
    }
    Ok(total)
}

/// The same JSON objects, newline-delimited per batch, zstd per batch.
fn json_zstd_bytes(workload: &Workload, batches: &[Batch], level: i32) -> anyhow::Result<u64> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    let mut text = Vec::new();
    let mut total = 0u64;
    for batch in batches {
        text.clear();
        for reading in &batch.readings {
            let def = workload
                .series
                .get(reading.series as usize)
                .context("reading of an undefined series")?;
            serde_json::to_writer(&mut text, &json_reading(&def.key, reading))?;
            text.push(b'\n');
        }
        total += compressor.compress(&text)?.len() as u64;
    }
    Ok(total)
}

/// Postcard rows with the same dictionary as ours, zstd per batch.
fn postcard_zstd_bytes(batches: &[Batch], level: i32) -> anyhow::Result<u64> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    let mut total = 0u64;
    for batch in batches {
        total += compressor.compress(&postcard::to_stdvec(batch)?)?.len() as u64;
    }
    Ok(total)
}

fn check_round_trip(batches: &[Batch], decoded: &[Batch]) -> anyhow::Result<()> {
    ensure!(
        batches.len() == decoded.len(),
        "decoded {} batches of {}",
        decoded.len(),
        batches.len()
    );
    for (original, decoded) in batches.iter().zip(decoded) {
        let mut expected = original.clone();
        expected.sort_readings();
        let same = expected.readings.len() == decoded.readings.len()
            && expected
                .readings
                .iter()
                .zip(&decoded.readings)
                .all(|(a, b)| {
                    (a.series, a.time_ms, a.value.to_bits(), a.flags)
                        == (b.series, b.time_ms, b.value.to_bits(), b.flags)
                });
        ensure!(
            same && expected.series == decoded.series,
            "batch {} did not round-trip",
            original.batch_seq
        );
    }
    Ok(())
}

fn measure(
    workload: &Workload,
    label: &str,
    periods_per_batch: usize,
    level: i32,
    repetitions: usize,
    json_message_total: u64,
) -> anyhow::Result<Value> {
    let (line, seconds) = timed(|| -> anyhow::Result<Value> {
        let batches = batches(workload, periods_per_batch);
        let readings = workload.readings.len() as f64;
        let dictionary_bytes: usize = batches
            .iter()
            .flat_map(|batch| &batch.series)
            .map(|def| postcard::to_stdvec(def).map_or(0, |bytes| bytes.len()))
            .sum();

        // Best of several repetitions: the machine is shared, and the fastest run
        // is the one least disturbed by other work.
        let mut encoder = BatchEncoder::new(level);
        let mut encode_seconds = f64::INFINITY;
        let mut encoded = Vec::new();
        for _ in 0..repetitions {
            let (run, seconds) = timed(|| {
                batches
                    .iter()
                    .map(|batch| encoder.encode(batch))
                    .collect::<Vec<_>>()
            });
            encode_seconds = encode_seconds.min(seconds);
            encoded = run;
        }
        let limits = BatchLimits::default();
        let mut decoder = BatchDecoder::new();
        let decoded = encoded
            .iter()
            .map(|bytes| decoder.decode(bytes, &limits))
            .collect::<Result<Vec<_>, _>>()?;
        check_round_trip(&batches, &decoded)?;
        drop(decoded);
        // Timed as a receiver works: decode a batch, hand its readings on, drop it.
        let mut decode_seconds = f64::INFINITY;
        for _ in 0..repetitions {
            let (decoded_readings, seconds) = timed(|| -> anyhow::Result<usize> {
                let mut decoded_readings = 0;
                for bytes in &encoded {
                    decoded_readings += std::hint::black_box(decoder.decode(bytes, &limits)?)
                        .readings
                        .len();
                }
                Ok(decoded_readings)
            });
            ensure!(
                decoded_readings? == workload.readings.len(),
                "decoded a different number of readings"
            );
            decode_seconds = decode_seconds.min(seconds);
        }
        let ours: u64 = encoded.iter().map(|bytes| bytes.len() as u64).sum();

        let json_zstd = json_zstd_bytes(workload, &batches, level)?;
        let postcard_zstd = postcard_zstd_bytes(&batches, level)?;
        let columns = pco_side::measure(&batches, level)?;
        let per_reading = |bytes: u64| round3(bytes as f64 / readings);
        Ok(json!({
            "bench": "codec",
            "batch": label,
            "devices": DEVICES,
            "metrics": Metric::ALL.len(),
            "data_seconds": workload.period_starts.len() - 1,
            "readings": workload.readings.len(),
            "batches": batches.len(),
            "zstd_level": level,
            "repetitions": repetitions,
            "bytes_per_reading": per_reading(ours),
            "dictionary_bytes": dictionary_bytes,
            "encoded_bytes": ours,
            "baseline_json_message_bytes_per_reading": per_reading(json_message_total),
            "baseline_json_zstd_bytes_per_reading": per_reading(json_zstd),
            "baseline_postcard_zstd_bytes_per_reading": per_reading(postcard_zstd),
            "json_message_to_ours_ratio": round3(json_message_total as f64 / ours as f64),
            "encode_readings_per_s": (readings / encode_seconds).round(),
            "decode_readings_per_s": (readings / decode_seconds).round(),
            // Side measurement (issue 2), see `pco_side`: timestamp and value
            // columns alone, without runs, flags, dictionary or envelope.
            "pco_times_bytes_per_reading": per_reading(columns.pco_times_bytes),
            "ours_times_bytes_per_reading": per_reading(columns.ours_times_bytes),
            "pco_values_bytes_per_reading": per_reading(columns.pco_values_bytes),
            "ours_values_bytes_per_reading": per_reading(columns.ours_values_bytes),
            "raw_value_runs": columns.raw_runs,
            "pco_compress_readings_per_s": (readings / columns.pco_compress_seconds).round(),
            "ours_columns_zstd_readings_per_s": (readings / columns.ours_compress_seconds).round(),
        }))
    });
    let mut line = line?;
    line["seconds"] = json!(round3(seconds));
    Ok(line)
}

pub fn run(options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    let periods = if options.quick {
        QUICK_PERIODS
    } else {
        FULL_PERIODS
    };
    let level = options.zstd_level.unwrap_or(DEFAULT_ZSTD_LEVEL);
    let repetitions = if options.quick { 3 } else { 5 };
    let workload = workload(periods);
    let json_message_total = json_message_bytes(&workload)?;
    Ok(vec![
        measure(&workload, "1s", 1, level, repetitions, json_message_total)?,
        measure(
            &workload,
            "10min",
            600,
            level,
            repetitions,
            json_message_total,
        )?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_carry_each_definition_once_and_cover_every_reading() {
        let workload = workload(5);
        let batches = batches(&workload, 2);
        assert_eq!(batches.len(), 3);
        assert_eq!(
            batches
                .iter()
                .map(|batch| batch.readings.len())
                .sum::<usize>(),
            workload.readings.len()
        );
        let defined: usize = batches.iter().map(|batch| batch.series.len()).sum();
        assert!(defined <= workload.series.len() && defined > 0);
        assert!(batches[1].series.len() < batches[0].series.len());
    }
}
