//! kill -9 of a process that appends and flushes in a loop: after reopening, every
//! batch whose flush had returned is present and intact, and no sequence number is
//! reused. The child is this test binary re-executed with an environment variable.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tributary_agent::buffer::{BatchClass, BatchInfo, BufferConfig, DiskBuffer, ReplayOrder};

const CHILD_DIR_ENV: &str = "TRIBUTARY_BUFFER_CRASH_CHILD_DIR";
const FLUSHED_PREFIX: &str = "flushed ";

fn config(dir: &str) -> BufferConfig {
    BufferConfig {
        seq_block_size: 16,
        ..BufferConfig::at(dir)
    }
}

fn payload_for(batch_seq: u64) -> Vec<u8> {
    let bytes = 64 + (batch_seq % 700) as usize;
    (0..bytes)
        .map(|index| (batch_seq.wrapping_mul(131) as usize + index * 7) as u8)
        .collect()
}

fn class_for(batch_seq: u64) -> BatchClass {
    if batch_seq % 4 == 0 {
        BatchClass::Summary
    } else {
        BatchClass::Raw
    }
}

/// The child's body. A no-op unless started by `kill_9_loses_nothing_that_was_flushed`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let buffer = DiskBuffer::open(config(&dir)).expect("child opens the buffer");
    let started = Instant::now();
    let mut stdout = std::io::stdout();
    // Bounded, so an orphaned child cannot run forever if the parent dies first.
    while started.elapsed() < Duration::from_secs(60) {
        let mut group = Vec::new();
        for _ in 0..3 {
            let batch_seq = buffer.allocate_seq().expect("allocate");
            let info = BatchInfo {
                class: class_for(batch_seq),
                created_ms: 1,
                oldest_event_ms: 0,
                reading_count: 5,
            };
            buffer
                .append(batch_seq, info, &payload_for(batch_seq))
                .expect("append");
            group.push(batch_seq);
        }
        buffer.flush().expect("flush");
        for batch_seq in group {
            if writeln!(stdout, "{FLUSHED_PREFIX}{batch_seq}").is_err() {
                return;
            }
        }
        if stdout.flush().is_err() {
            return;
        }
    }
}

#[test]
fn kill_9_loses_nothing_that_was_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let dir_text = dir.path().to_str().unwrap().to_string();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    println!("kill -9 test seed {seed}");
    let mut all_flushed: Vec<u64> = Vec::new();

    for round in 0..3u64 {
        let kill_after_lines = 10 + (seed.wrapping_mul(round + 7) % 400) as usize;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, &dir_text)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel::<u64>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(batch_seq) = line
                    .strip_prefix(FLUSHED_PREFIX)
                    .and_then(|seq| seq.trim().parse().ok())
                {
                    if sender.send(batch_seq).is_err() {
                        break;
                    }
                }
            }
        });

        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < kill_after_lines {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(remaining) {
                Ok(batch_seq) => {
                    all_flushed.push(batch_seq);
                    seen += 1;
                }
                Err(error) => {
                    let _ = child.kill();
                    panic!("round {round}: child stopped reporting after {seen} flushed batches: {error:?}");
                }
            }
        }
        // Child::kill sends SIGKILL on Unix: no destructors, no final flush.
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        all_flushed.extend(receiver.try_iter());

        let buffer = DiskBuffer::open(config(&dir_text)).unwrap();
        let stored: HashMap<u64, _> = buffer
            .replay(ReplayOrder::OldestFirst)
            .map(|item| {
                let batch = item.expect("every stored entry decodes after a crash");
                (batch.batch_seq, batch)
            })
            .collect();
        for batch_seq in &all_flushed {
            let batch = stored.get(batch_seq).unwrap_or_else(|| {
                panic!("round {round}, seed {seed}: flushed batch {batch_seq} lost")
            });
            assert_eq!(
                batch.payload,
                payload_for(*batch_seq),
                "batch {batch_seq} damaged"
            );
            assert_eq!(batch.header.class, class_for(*batch_seq));
        }
        assert!(buffer.verify().unwrap().is_clean());
        let highest_flushed = all_flushed.iter().max().copied().unwrap();
        let highest_stored = stored.keys().max().copied().unwrap();
        let next = buffer.allocate_seq().unwrap();
        assert!(
            next > highest_flushed && next > highest_stored,
            "next seq {next} would reuse a number"
        );
        println!(
            "round {round}: killed after {seen} reported batches; {} flushed so far all present, next seq {next}",
            all_flushed.len()
        );
    }
}
