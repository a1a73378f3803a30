//! Measurement behind the producer settings in `docs/kafka.md` (ignored by default; run
//! `cargo test --release -p tributary-collector --test log_kafka_measure -- --ignored --nocapture`).
//!
//! For each (`linger_ms`, `batch_size_bytes`) pair: a flood of 5 KB records (throughput,
//! and enqueue-to-ack latency under load), then sequential single appends (ack latency
//! of a lone batch, which is what an agent waits for on a quiet link).

mod log_kafka_support;

use std::time::{Duration, Instant};

use log_kafka_support::{connect, fresh_topic, record};
use tributary_collector::log::kafka::KafkaLogConfig;
use tributary_collector::log::DurableLog;

const RECORD_BYTES: usize = 5 * 1024;
const FLOOD_RECORDS: usize = 6000;
const IN_FLIGHT: usize = 2000;
const LONE_APPENDS: usize = 100;

/// Incompressible bytes, like the already-compressed batches ingest writes.
fn payload(seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..RECORD_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted
        .get(index)
        .map(|value| value.as_secs_f64() * 1000.0)
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand, see docs/kafka.md"]
async fn measure_producer_settings() {
    let settings = [
        (0u32, 64 * 1024u32),
        (5, 64 * 1024),
        (5, 1024 * 1024),
        (20, 1024 * 1024),
    ];
    for (linger_ms, batch_size_bytes) in settings {
        let Some((brokers, topic)) = fresh_topic("measure", 4).await else {
            return;
        };
        let log = connect(KafkaLogConfig {
            linger_ms,
            batch_size_bytes,
            ..KafkaLogConfig::new(&brokers, &topic)
        })
        .await;
        let payloads: Vec<Vec<u8>> = (0..64).map(payload).collect();

        let started = Instant::now();
        let mut latencies = Vec::with_capacity(FLOOD_RECORDS);
        let mut in_flight = std::collections::VecDeque::new();
        for index in 0..FLOOD_RECORDS {
            let agent_id = format!("measure-agent-{}", index % 50);
            let value = payloads[index % payloads.len()].clone();
            let enqueued = Instant::now();
            let acknowledgement = log
                .enqueue(record(&agent_id, index as u64, value))
                .await
                .expect("enqueue");
            in_flight.push_back((enqueued, tokio::spawn(acknowledgement)));
            while in_flight.len() >= IN_FLIGHT {
                if let Some((enqueued, handle)) = in_flight.pop_front() {
                    handle.await.expect("task").expect("ack");
                    latencies.push(enqueued.elapsed());
                }
            }
        }
        for (enqueued, handle) in in_flight {
            handle.await.expect("task").expect("ack");
            latencies.push(enqueued.elapsed());
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort();

        let mut lone = Vec::with_capacity(LONE_APPENDS);
        for index in 0..LONE_APPENDS {
            let value = payloads[index % payloads.len()].clone();
            let started = Instant::now();
            log.append(record("lone-agent", index as u64, value))
                .await
                .expect("append");
            lone.push(started.elapsed());
        }
        lone.sort();
        println!(
            "{{\"linger_ms\": {linger_ms}, \"batch_size_bytes\": {batch_size_bytes}, \"records_per_s\": {:.0}, \"mb_per_s\": {:.1}, \"flood_p50_ms\": {:.1}, \"flood_p99_ms\": {:.1}, \"lone_p50_ms\": {:.2}, \"lone_p99_ms\": {:.2}}}",
            FLOOD_RECORDS as f64 / elapsed,
            (FLOOD_RECORDS * RECORD_BYTES) as f64 / elapsed / 1e6,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            percentile(&lone, 0.5),
            percentile(&lone, 0.99),
        );
    }
}
