//! A real full disk: the buffer lives on a tiny tmpfs that also holds a filler file.
//! When the filesystem fills up the buffer must keep accepting batches in memory
//! (loudly), and when the filler is deleted it must move them back to disk.
//! Needs permission to mount a tmpfs (root); otherwise the test says why and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use tributary_agent::buffer::{
    BatchClass, BatchInfo, BufferConfig, DiskBuffer, Durability, ReplayOrder, Tier,
};

struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    fn mount(path: &Path, size: &str) -> Result<TmpfsMount, String> {
        std::fs::create_dir_all(path)
            .map_err(|error| format!("cannot create {}: {error}", path.display()))?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|error| format!("cannot run mount: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(TmpfsMount {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn payload_for(batch_seq: u64) -> Vec<u8> {
    (0..16 * 1024)
        .map(|index| (batch_seq as usize * 17 + index / 3) as u8)
        .collect()
}

fn info(created_ms: i64) -> BatchInfo {
    BatchInfo {
        class: BatchClass::Raw,
        created_ms,
        oldest_event_ms: created_ms,
        reading_count: 100,
    }
}

#[test]
fn full_filesystem_degrades_to_memory_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("tmpfs");
    let mount = match TmpfsMount::mount(&mount_point, "6m") {
        Ok(mount) => mount,
        Err(reason) => {
            println!("skipping the real full-disk test: {reason}");
            return;
        }
    };
    let filler = mount.path.join("filler");
    std::fs::write(&filler, vec![0u8; 3 * 1024 * 1024]).unwrap();
    let config = BufferConfig {
        max_buffer_bytes: 64 * 1024 * 1024,
        memory_only_max_bytes: 1024 * 1024,
        storage_retry_interval_ms: 1_000,
        seq_block_size: 1_000_000,
        ..BufferConfig::at(mount.path.join("buffer"))
    };
    let buffer = DiskBuffer::open(config.clone()).unwrap();

    let mut durable = Vec::new();
    let mut now_ms = 0;
    let mut degraded = false;
    for _ in 0..2_000 {
        now_ms += 10;
        let batch_seq = buffer.allocate_seq().unwrap();
        let receipt = buffer
            .append(batch_seq, info(now_ms), &payload_for(batch_seq))
            .unwrap();
        if receipt.tier == Tier::Memory {
            degraded = true;
            break;
        }
        match buffer.flush() {
            Ok(Durability::Durable) => durable.push(batch_seq),
            Ok(other) => panic!("unexpected durability {other:?}"),
            Err(error) => {
                println!("flush failed as the disk filled: {error}");
                degraded = true;
                break;
            }
        }
    }
    assert!(degraded, "the 6 MiB filesystem never filled up");
    assert!(
        !durable.is_empty(),
        "nothing fit on the filesystem before it filled"
    );
    assert!(buffer.is_memory_only());
    let stats = buffer.stats(now_ms);
    assert!(stats.memory_only);
    assert!(stats.storage_errors >= 1);

    // Still accepting, in memory.
    let mut in_memory = Vec::new();
    for _ in 0..5 {
        now_ms += 10;
        let batch_seq = buffer.allocate_seq().unwrap();
        assert_eq!(
            buffer
                .append(batch_seq, info(now_ms), &payload_for(batch_seq))
                .unwrap()
                .tier,
            Tier::Memory
        );
        in_memory.push(batch_seq);
    }

    // Space returns; the next retry moves the memory batches back to disk.
    std::fs::remove_file(&filler).unwrap();
    // sled's IO threads may still hold the failed database's directory lock for a
    // moment, so a retry can find it busy; the buffer simply retries on its interval.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut attempts = 0;
    loop {
        now_ms += 1_000;
        attempts += 1;
        if buffer.retry_storage(now_ms) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "storage did not recover after space was freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    println!("storage recovered after {attempts} retry attempts");
    assert_eq!(buffer.flush().unwrap(), Durability::Durable);
    let stats = buffer.stats(now_ms);
    assert!(!stats.memory_only);
    assert_eq!(stats.memory_batches, 0);
    assert_eq!(stats.storage_recoveries, 1);

    drop(buffer);
    let reopened = DiskBuffer::open(config).unwrap();
    let stored: Vec<(u64, Vec<u8>)> = reopened
        .replay(ReplayOrder::OldestFirst)
        .map(|item| {
            let batch = item.unwrap();
            (batch.batch_seq, batch.payload)
        })
        .collect();
    for batch_seq in durable.iter().chain(in_memory.iter()) {
        let (_, payload) = stored
            .iter()
            .find(|(seq, _)| seq == batch_seq)
            .unwrap_or_else(|| panic!("batch {batch_seq} lost across the full-disk episode"));
        assert_eq!(payload, &payload_for(*batch_seq));
    }
    assert!(reopened.verify().unwrap().is_clean());
    println!(
        "{} durable batches before the disk filled, {} moved back from memory",
        durable.len(),
        in_memory.len()
    );
}
