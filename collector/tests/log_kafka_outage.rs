//! Kafka stopped for a while under the Kafka durable log, against the real broker.
//!
//! What must hold (issue 4, "Kafka stopped for a while"): appends made while the broker
//! is down wait (or fail retryably, never lose anything), resume by themselves when it
//! is back, and afterwards every acknowledged record is in the log exactly once: the
//! idempotent producer keeps librdkafka's internal retries from writing duplicates.
//!
//! This test stops and restarts the shared dev Kafka (`services.sh stop/start kafka`);
//! a guard restarts it even if an assertion fails midway.

mod log_kafka_support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log_kafka_support::{connect, fresh_topic, record};
use tokio::time::Instant;
use tributary_collector::log::kafka::{KafkaLog, KafkaLogConfig};
use tributary_collector::log::{AppendReceipt, AppendRecord, DurableLog, LogError};
use tributary_tests::services::{service_env, SERVICES_SCRIPT};

const AGENTS: usize = 3;
const BATCHES_BEFORE_OUTAGE: u64 = 10;
const BATCHES_DURING_OUTAGE: u64 = 30;

fn run_services(script: &str, action: &str) {
    let output = Command::new(script)
        .args([action, "kafka"])
        .output()
        .unwrap_or_else(|error| panic!("run {script} {action} kafka: {error}"));
    assert!(
        output.status.success(),
        "{script} {action} kafka failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stdout).trim());
}

/// Restarts Kafka when dropped while it is stopped, so a failing assertion never leaves
/// the shared broker down for the other tests.
struct KafkaRestartGuard {
    script: String,
    stopped: bool,
}

impl Drop for KafkaRestartGuard {
    fn drop(&mut self) {
        if self.stopped {
            run_services(&self.script, "start");
        }
    }
}

type Acknowledgement =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<AppendReceipt, LogError>> + Send>>;

async fn enqueue(log: &KafkaLog, record: AppendRecord) -> Result<Acknowledgement, LogError> {
    let acknowledgement = log.enqueue(record).await?;
    Ok(Box::pin(acknowledgement))
}

fn value(agent_id: &str, batch_seq: u64, attempt: u32) -> String {
    format!("{agent_id}/{batch_seq}/attempt-{attempt}/").repeat(50)
}

/// Appends batches `from..to` of one agent, pipelined in order; any batch whose append
/// fails (it must be retryable) is appended again with the next attempt number, as an
/// agent resends after a retryable nack. Returns the acknowledged value per batch.
async fn append_batches(
    log: KafkaLog,
    agent_id: String,
    from: u64,
    to: u64,
    acknowledged: Arc<AtomicUsize>,
) -> BTreeMap<u64, String> {
    let mut pending = Vec::new();
    for batch_seq in from..to {
        let payload = value(&agent_id, batch_seq, 0);
        let acknowledgement = enqueue(&log, record(&agent_id, batch_seq, payload.clone())).await;
        pending.push((batch_seq, payload, acknowledgement));
    }
    let mut acked = BTreeMap::new();
    for (batch_seq, mut payload, mut acknowledgement) in pending {
        let mut attempt = 0;
        loop {
            let result = match acknowledgement {
                Ok(future) => future.await,
                Err(error) => Err(error),
            };
            match result {
                Ok(_) => break,
                Err(error) => {
                    assert!(error.is_retryable(), "{agent_id}/{batch_seq}: a non-retryable error while Kafka was away: {error}");
                    eprintln!("{agent_id}/{batch_seq} attempt {attempt}: retryable: {error}");
                    attempt += 1;
                    payload = value(&agent_id, batch_seq, attempt);
                    acknowledgement =
                        enqueue(&log, record(&agent_id, batch_seq, payload.clone())).await;
                }
            }
        }
        acknowledged.fetch_add(1, Ordering::SeqCst);
        acked.insert(batch_seq, payload);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_wait_while_kafka_is_stopped_and_resume_with_nothing_lost_or_doubled() {
    let Some((brokers, topic)) = fresh_topic("outage", 2).await else {
        return;
    };
    let Some(script) = service_env(SERVICES_SCRIPT) else {
        return;
    };
    let config = KafkaLogConfig {
        delivery_timeout_ms: 300_000,
        ..KafkaLogConfig::new(&brokers, &topic)
    };
    let log = connect(config).await;
    let agent_ids: Vec<String> = (0..AGENTS)
        .map(|agent| format!("outage-agent-{agent}"))
        .collect();
    let acknowledged = Arc::new(AtomicUsize::new(0));

    let mut expected: BTreeMap<(String, u64), String> = BTreeMap::new();
    for agent_id in &agent_ids {
        let acked = append_batches(
            log.clone(),
            agent_id.clone(),
            0,
            BATCHES_BEFORE_OUTAGE,
            Arc::clone(&acknowledged),
        )
        .await;
        expected.extend(
            acked
                .into_iter()
                .map(|(batch_seq, payload)| ((agent_id.clone(), batch_seq), payload)),
        );
    }

    let mut guard = KafkaRestartGuard {
        script: script.clone(),
        stopped: true,
    };
    let stop_script = script.clone();
    tokio::task::spawn_blocking(move || run_services(&stop_script, "stop"))
        .await
        .expect("stop kafka");

    let acknowledged_before_outage = acknowledged.load(Ordering::SeqCst);
    let mut agents = tokio::task::JoinSet::new();
    for agent_id in &agent_ids {
        let (log, agent_id, acknowledged) =
            (log.clone(), agent_id.clone(), Arc::clone(&acknowledged));
        agents.spawn(async move {
            let acked = append_batches(
                log,
                agent_id.clone(),
                BATCHES_BEFORE_OUTAGE,
                BATCHES_BEFORE_OUTAGE + BATCHES_DURING_OUTAGE,
                acknowledged,
            )
            .await;
            (agent_id, acked)
        });
    }
    // Nothing can be acknowledged while the broker is down: watch for a few seconds.
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        assert_eq!(
            acknowledged.load(Ordering::SeqCst),
            acknowledged_before_outage,
            "an append was acknowledged while Kafka was stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let start_script = script.clone();
    tokio::task::spawn_blocking(move || run_services(&start_script, "start"))
        .await
        .expect("start kafka");
    guard.stopped = false;

    let deadline = Instant::now() + Duration::from_secs(240);
    while let Some(joined) = tokio::time::timeout_at(deadline, agents.join_next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "appends did not resume within 240 s of the restart: {} acknowledged",
                acknowledged.load(Ordering::SeqCst)
            )
        })
    {
        let (agent_id, acked) = joined.unwrap_or_else(|error| panic!("agent task: {error}"));
        expected.extend(
            acked
                .into_iter()
                .map(|(batch_seq, payload)| ((agent_id.clone(), batch_seq), payload)),
        );
    }
    assert_eq!(
        expected.len(),
        AGENTS * (BATCHES_BEFORE_OUTAGE + BATCHES_DURING_OUTAGE) as usize
    );

    // Read everything back: every acknowledged value exactly once, no value twice.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for partition in 0..log.partition_count() {
        let range = log
            .offset_range(partition)
            .await
            .expect("offset range after restart");
        let mut next = range.earliest;
        while next < range.next {
            assert!(
                Instant::now() < deadline,
                "reading partition {partition} back did not finish before the deadline"
            );
            for record in log
                .read(partition, next, 256 * 1024)
                .await
                .expect("read after restart")
            {
                next = record.offset + 1;
                let text = String::from_utf8(record.value.to_vec()).expect("values are text");
                *counts.entry(text).or_default() += 1;
            }
        }
    }
    for ((agent_id, batch_seq), payload) in &expected {
        assert_eq!(
            counts.get(payload).copied(),
            Some(1),
            "{agent_id}/{batch_seq} (acknowledged) is in the log exactly once"
        );
    }
    let doubled: Vec<_> = counts
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(text, count)| (&text[..40.min(text.len())], *count))
        .collect();
    assert!(doubled.is_empty(), "records written twice: {doubled:?}");
    eprintln!(
        "outage: {} acknowledged, stats {:?}",
        expected.len(),
        log.stats()
    );
}
