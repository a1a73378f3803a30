//! A real kill -9 in the middle of appends: nothing reported durable may be lost.
//!
//! The test binary runs itself as the child (switched by an environment variable):
//! the child appends from several concurrent tasks and prints a line for every record
//! the log reported durable. The parent waits until it has seen enough lines, kills
//! the child with SIGKILL at whatever point it is in, reopens the log and checks every
//! reported record is there, exactly once, in order, and that offsets keep growing
//! across crashes. Several rounds reuse the same directory, so recovery also runs on a
//! log that was itself recovered.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tributary_collector::log::{
    AppendRecord, DurableLog, EmbeddedLog, EmbeddedLogConfig, RecordHeaders, SystemClock,
};

const CHILD_DIRECTORY_VARIABLE: &str = "TRIBUTARY_LOG_CRASH_CHILD_DIRECTORY";
const CHILD_ROUND_VARIABLE: &str = "TRIBUTARY_LOG_CRASH_CHILD_ROUND";
const APPENDER_TASKS: u64 = 8;

fn config(directory: &std::path::Path) -> EmbeddedLogConfig {
    let mut config = EmbeddedLogConfig::new(directory);
    // Small segments so that crashes also land around segment rolls.
    config.segment_max_bytes = 256 * 1024;
    config
}

fn value_for(agent_id: &str, batch_seq: u64) -> Bytes {
    let length = 500 + (batch_seq as usize * 997) % 6_000;
    let seed = agent_id.bytes().fold(batch_seq, |acc, b| {
        acc.wrapping_mul(131).wrapping_add(u64::from(b))
    });
    Bytes::from(
        (0..length)
            .map(|i| (seed.wrapping_add(i as u64 * 7)) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// The child: appends until killed. Does nothing when run as an ordinary test.
#[test]
fn crash_child_appends_until_killed() {
    let Ok(directory) = std::env::var(CHILD_DIRECTORY_VARIABLE) else {
        return;
    };
    let round = std::env::var(CHILD_ROUND_VARIABLE).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let log = Arc::new(
            EmbeddedLog::open(config(directory.as_ref()), SystemClock)
                .expect("child opens the log"),
        );
        let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for task in 0..APPENDER_TASKS {
            let log = log.clone();
            let stdout = stdout.clone();
            let agent_id = format!("round{round}-gw{task}");
            tasks.push(tokio::spawn(async move {
                // Bounded so an orphaned child cannot run forever.
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut batch_seq = 0u64;
                while Instant::now() < deadline {
                    let record = AppendRecord {
                        headers: RecordHeaders {
                            agent_id: agent_id.clone(),
                            batch_seq,
                            protocol_version: 1,
                        },
                        value: value_for(&agent_id, batch_seq),
                    };
                    let receipt = log.append(record).await.expect("append");
                    let mut out = stdout.lock().expect("stdout");
                    writeln!(out, "durable {} {} {}", receipt.offset, agent_id, batch_seq)
                        .expect("print");
                    out.flush().expect("flush");
                    batch_seq += 1;
                }
            }));
        }
        for task in tasks {
            task.await.expect("appender");
        }
    });
}

struct Reported {
    offset: u64,
    agent_id: String,
    batch_seq: u64,
}

fn run_child_and_kill(
    directory: &std::path::Path,
    round: u32,
    kill_after_lines: usize,
) -> Vec<Reported> {
    let executable = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(executable)
        .args([
            "--exact",
            "crash_child_appends_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIRECTORY_VARIABLE, directory)
        .env(CHILD_ROUND_VARIABLE, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (lines_sender, lines) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_sender.send(line).is_err() {
                break;
            }
        }
    });
    let mut reported = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let parse = |line: &str| -> Option<Reported> {
        let mut fields = line.strip_prefix("durable ")?.split(' ');
        let offset = fields.next()?.parse().ok()?;
        let agent_id = fields.next()?.to_owned();
        let batch_seq = fields.next()?.parse().ok()?;
        Some(Reported {
            offset,
            agent_id,
            batch_seq,
        })
    };
    while reported.len() < kill_after_lines {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) => reported.extend(parse(&line)),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "child reported only {} durable records before the deadline",
                    reported.len()
                );
            }
        }
    }
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap child");
    reader.join().expect("reader thread");
    // Lines the child printed before it died were reports too.
    reported.extend(lines.try_iter().filter_map(|line| parse(&line)));
    reported
}

#[tokio::test]
async fn kill_9_mid_append_loses_nothing_reported_durable() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut all_reported: Vec<Reported> = Vec::new();
    let mut previous_next_offset = 0u64;
    for (round, kill_after_lines) in [(0u32, 150usize), (1, 40), (2, 300), (3, 1)] {
        let reported = run_child_and_kill(directory.path(), round, kill_after_lines);
        assert!(reported.len() >= kill_after_lines);
        let log =
            EmbeddedLog::open(config(directory.path()), SystemClock).expect("reopen after kill -9");
        let range = log.offset_range(0).await.expect("range");
        assert_eq!(range.earliest, 0);

        // Read everything back with bounded reads.
        let mut by_offset: BTreeMap<u64, (String, u64, Bytes)> = BTreeMap::new();
        let mut next = 0;
        loop {
            let batch = log
                .read(0, next, 256 * 1024)
                .await
                .expect("read after recovery");
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            for record in batch {
                by_offset.insert(
                    record.offset,
                    (
                        record.headers.agent_id,
                        record.headers.batch_seq,
                        record.value,
                    ),
                );
            }
        }
        assert_eq!(next, range.next);
        assert_eq!(
            by_offset.len() as u64,
            range.next,
            "offsets are dense from 0"
        );

        // Exactly once and in order: each (agent, seq) appears once, and each agent's
        // sequence numbers grow with the offset without gaps.
        let mut last_seq_by_agent: HashMap<&str, u64> = HashMap::new();
        for (agent_id, batch_seq, value) in by_offset.values() {
            assert_eq!(
                *value,
                value_for(agent_id, *batch_seq),
                "payload of {agent_id}/{batch_seq} intact"
            );
            let expected = last_seq_by_agent
                .get(agent_id.as_str())
                .map_or(0, |last| last + 1);
            assert_eq!(
                *batch_seq, expected,
                "{agent_id}'s records are in order, once each"
            );
            last_seq_by_agent.insert(agent_id, *batch_seq);
        }

        // Every record reported durable, in this round and earlier ones, is there.
        all_reported.extend(reported);
        for report in &all_reported {
            let found = by_offset.get(&report.offset);
            assert!(
                found.is_some_and(|(agent_id, batch_seq, _)| *agent_id == report.agent_id && *batch_seq == report.batch_seq),
                "record {}/{} reported durable at offset {} is missing after kill -9 in round {round}",
                report.agent_id,
                report.batch_seq,
                report.offset
            );
        }
        // Offsets never go back: this round's records come after everything before.
        let round_prefix = format!("round{round}-");
        let first_of_round = by_offset
            .iter()
            .find(|(_, (agent_id, _, _))| agent_id.starts_with(&round_prefix))
            .map(|(offset, _)| *offset);
        assert!(first_of_round.is_some_and(|offset| offset >= previous_next_offset));
        previous_next_offset = range.next;
    }
}
