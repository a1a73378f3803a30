//! The embedded store on its own: everything survives a reopen; a real kill -9 of a child
//! process in the middle of writes loses nothing it reported flushed, and never shows a
//! checkpoint without the rows written before it; retention deletes exactly what is older
//! than each retention; a store from a newer format is refused.

mod store_support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tributary_collector::store::schema::SeriesSelector;
use tributary_collector::store::{
    Checkpoint, EmbeddedStore, EmbeddedStoreConfig, LastSeenRow, Queries, RawReadingRow, Store,
    StoreError,
};

use store_support::{answers, apply, generate, DAY_MS, HOUR_MS, MINUTE_MS, RESOLUTIONS_MS, T0};

fn config(directory: &std::path::Path) -> EmbeddedStoreConfig {
    EmbeddedStoreConfig::new(directory.join("store"), RESOLUTIONS_MS.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_after_drop_keeps_everything() {
    let directory = tempfile::tempdir().expect("tempdir");
    let ops = generate(7);
    let mut store = EmbeddedStore::open(config(directory.path())).expect("open");
    apply(&mut store, &ops).await;
    let before = answers(&Queries::from(store.reader())).await;
    assert!(before.raw[0].1.len() >= 40, "the sequence wrote rows");
    let checkpoint = store.load_checkpoint("processor", 0).await.expect("load");
    drop(store);

    let mut reopened = EmbeddedStore::open(config(directory.path())).expect("reopen");
    assert_eq!(answers(&Queries::from(reopened.reader())).await, before);
    assert_eq!(
        reopened
            .load_checkpoint("processor", 0)
            .await
            .expect("load"),
        checkpoint
    );
    // Writing the whole sequence again (a replay from offset 0) changes no answer.
    apply(&mut reopened, &ops).await;
    assert_eq!(answers(&Queries::from(reopened.reader())).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unflushed_writes_are_not_visible_and_a_reader_reads_while_writing() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut store = EmbeddedStore::open(config(directory.path())).expect("open");
    let queries = Queries::from(store.reader());
    assert_eq!(queries.resolutions_ms(), &RESOLUTIONS_MS);
    store.write_raw_readings(vec![raw_row(1, 0, T0, 1.0)], T0);
    let selection = [selector()];
    assert!(queries
        .raw_range(&selection, 0, i64::MAX)
        .await
        .expect("read")
        .is_empty());
    assert!(!store.flush_due(T0 + 999));
    assert!(store.flush_due(T0 + 1_000), "age-based flush");
    store.flush().await.expect("flush");
    assert_eq!(
        queries
            .raw_range(&selection, 0, i64::MAX)
            .await
            .expect("read")
            .len(),
        1
    );
}

fn selector() -> SeriesSelector {
    SeriesSelector {
        device_id: "d1".into(),
        metric: "temperature_c".into(),
        tags: String::new(),
    }
}

fn raw_row(batch_seq: u64, position: u32, time_ms: i64, value: f64) -> RawReadingRow {
    RawReadingRow {
        agent_id: "gw-crash".into(),
        batch_seq,
        position,
        device_id: "d1".into(),
        metric: "temperature_c".into(),
        tags: String::new(),
        time_ms,
        value,
        flags: 0,
    }
}

const CHILD_DIRECTORY_VARIABLE: &str = "TRIBUTARY_STORE_CRASH_CHILD_DIRECTORY";
const ROWS_PER_FLUSH: u32 = 200;

/// The child: writes batches of rows plus a checkpoint per flush until killed, printing
/// `flushed N` after each flush returned. Does nothing when run as an ordinary test.
#[test]
fn crash_child_writes_until_killed() {
    let Ok(directory) = std::env::var(CHILD_DIRECTORY_VARIABLE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut store =
            EmbeddedStore::open(config(directory.as_ref())).expect("child opens the store");
        // Continue after the checkpoint the previous child left, as a consumer would.
        let mut batch_seq = store
            .load_checkpoint("crash", 0)
            .await
            .expect("load")
            .map_or(0, |checkpoint| checkpoint.next_offset);
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let rows = (0..ROWS_PER_FLUSH)
                .map(|position| {
                    raw_row(
                        batch_seq,
                        position,
                        T0 + batch_seq as i64 * 1_000 + i64::from(position),
                        batch_seq as f64,
                    )
                })
                .collect();
            store.write_raw_readings(rows, T0);
            store.write_last_seen(
                vec![LastSeenRow {
                    kind: "agent".into(),
                    agent_id: "gw-crash".into(),
                    device_id: String::new(),
                    metric: String::new(),
                    tags: String::new(),
                    last_seen_ms: batch_seq,
                }],
                T0,
            );
            store.write_checkpoint(Checkpoint {
                group: "crash".into(),
                partition: 0,
                next_offset: batch_seq + 1,
                engine_state: batch_seq.to_be_bytes().to_vec(),
            });
            store.flush().await.expect("child flush");
            let mut out = std::io::stdout().lock();
            writeln!(out, "flushed {batch_seq}").expect("print");
            out.flush().expect("flush stdout");
            batch_seq += 1;
        }
    });
}

/// Runs the child until it reported `kill_after` flushes, kills it with SIGKILL, and returns
/// the batch sequence numbers it reported flushed.
fn run_child_and_kill(directory: &std::path::Path, kill_after: usize) -> Vec<u64> {
    let executable = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(executable)
        .args([
            "--exact",
            "crash_child_writes_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIRECTORY_VARIABLE, directory)
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
    let parse = |line: &str| line.strip_prefix("flushed ")?.trim().parse::<u64>().ok();
    let mut reported = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while reported.len() < kill_after {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) => reported.extend(parse(&line)),
            Err(_) => {
                let _ = child.kill();
                panic!("child reported only {} flushes in time", reported.len());
            }
        }
    }
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap child");
    reader.join().expect("reader thread");
    reported.extend(lines.try_iter().filter_map(|line| parse(&line)));
    reported
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_writes_loses_nothing_flushed() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut all_reported: Vec<u64> = Vec::new();
    for kill_after in [15usize, 1, 30] {
        all_reported.extend(run_child_and_kill(directory.path(), kill_after));
        let store = EmbeddedStore::open(config(directory.path())).expect("reopen after kill -9");
        let queries = Queries::from(store.reader());
        let rows = queries
            .raw_range(&[selector()], 0, i64::MAX)
            .await
            .expect("read back");
        let checkpoint = store
            .load_checkpoint("crash", 0)
            .await
            .expect("load")
            .expect("a checkpoint was flushed");
        // Atomic flushes: the rows are exactly the batches before the checkpoint, whole.
        let next_offset = checkpoint.next_offset;
        assert_eq!(
            rows.len() as u64,
            next_offset * u64::from(ROWS_PER_FLUSH),
            "every batch before the checkpoint, whole, and nothing after it"
        );
        assert_eq!(checkpoint.engine_state, (next_offset - 1).to_be_bytes());
        for report in &all_reported {
            assert!(
                *report < next_offset,
                "batch {report} was reported flushed but the checkpoint is at {next_offset}"
            );
        }
        for (expected_seq, chunk) in rows.chunks(ROWS_PER_FLUSH as usize).enumerate() {
            let expected_seq = expected_seq as u64;
            assert!(chunk
                .iter()
                .enumerate()
                .all(|(position, row)| row.batch_seq == expected_seq
                    && row.position as usize == position
                    && row.value == expected_seq as f64));
        }
        let agents = store.reader().list_devices().await.expect("devices").len();
        assert_eq!(agents, 0, "only agent sightings were written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_what_is_older() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut config = config(directory.path());
    config.raw_retention_ms = Some(2 * DAY_MS);
    config.rollup_retention_ms = Some(3 * DAY_MS);
    config.late_retention_ms = None;
    let mut store = EmbeddedStore::open(config).expect("open");
    let ops = generate(11);
    apply(&mut store, &ops).await;
    let queries = Queries::from(store.reader());
    let before = answers(&queries).await;
    let everything = store_support::series_keys()
        .iter()
        .map(store_support::selector)
        .collect::<Vec<_>>();

    // Nothing is old enough yet.
    let report = store.enforce_retention(T0 + DAY_MS).expect("retention");
    assert_eq!(report, Default::default());
    assert_eq!(answers(&queries).await, before);

    // At T0 + 2 days + 2 min: raw rows before T0 + 2 min go, and windows starting before
    // T0 - 1 day + 2 min (the hour window of T0 - 1 day); each row by its own time.
    let mut now_ms = T0 + 2 * DAY_MS + 2 * MINUTE_MS;
    let mut windows_kept = 0;
    for round in 0..2 {
        let raw_cutoff_ms = now_ms - 2 * DAY_MS;
        let rollup_cutoff_ms = now_ms - 3 * DAY_MS;
        let raw_before = queries
            .raw_range(&everything, 0, i64::MAX)
            .await
            .expect("raw");
        let mut windows_before = Vec::new();
        for resolution_ms in RESOLUTIONS_MS {
            windows_before.push(
                queries
                    .rollup_range(resolution_ms, &everything, 0, i64::MAX)
                    .await
                    .expect("rollups"),
            );
        }
        // The second round through the handle a periodic task would hold.
        let report = if round == 0 {
            store.enforce_retention(now_ms)
        } else {
            store.retention().enforce_retention_async(now_ms).await
        }
        .expect("retention");

        let raw_expected: Vec<RawReadingRow> = raw_before
            .iter()
            .filter(|row| row.time_ms >= raw_cutoff_ms)
            .cloned()
            .collect();
        assert!(
            raw_expected.len() < raw_before.len(),
            "round {round}: something expired"
        );
        assert_eq!(
            queries
                .raw_range(&everything, 0, i64::MAX)
                .await
                .expect("raw"),
            raw_expected,
            "round {round}: exactly the raw rows older than the cutoff went"
        );
        assert_eq!(
            report.raw_rows_deleted as usize,
            raw_before.len() - raw_expected.len()
        );
        let mut rollups_deleted = 0;
        for (resolution_ms, before) in RESOLUTIONS_MS.iter().zip(windows_before) {
            let expected: Vec<_> = before
                .iter()
                .filter(|row| row.window_start_ms >= rollup_cutoff_ms)
                .cloned()
                .collect();
            rollups_deleted += before.len() - expected.len();
            windows_kept += expected.len();
            assert_eq!(
                queries
                    .rollup_range(*resolution_ms, &everything, 0, i64::MAX)
                    .await
                    .expect("rollups"),
                expected,
                "round {round}: exactly the {resolution_ms} ms windows older than the cutoff went"
            );
        }
        assert_eq!(report.rollup_rows_deleted as usize, rollups_deleted);
        assert!(rollups_deleted > 0, "round {round}: some windows expired");
        assert_eq!(report.late_rows_deleted, 0);
        let after = answers(&queries).await;
        assert_eq!(after.late, before.late, "late rows are kept (no retention)");
        assert_eq!(after.devices, before.devices, "last-seen never expires");
        assert_eq!(after.series, before.series);
        assert_eq!(
            store.enforce_retention(now_ms).expect("again"),
            Default::default(),
            "idempotent"
        );
        // A day and an hour later, the rest of the first day's windows expire too.
        now_ms += DAY_MS + HOUR_MS;
    }
    assert!(windows_kept > 0, "recent windows were kept");
}

#[test]
fn a_newer_format_is_refused_with_what_to_do() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("store");
    drop(EmbeddedStore::open(EmbeddedStoreConfig::new(&path, vec![60_000])).expect("create"));
    {
        let db = tributary_collector::sled_open::open(&sled::Config::new().path(&path))
            .expect("open with sled");
        let tree = db.open_tree("tributary_store").expect("tree");
        tree.insert(b"Mformat", &99u32.to_be_bytes())
            .expect("insert");
        db.flush().expect("flush");
    }
    match EmbeddedStore::open(EmbeddedStoreConfig::new(&path, vec![60_000])) {
        Err(error @ StoreError::EmbeddedFormatTooNew { found: 99, .. }) => {
            assert!(
                error.to_string().contains("upgrade the collector"),
                "{error}"
            );
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a newer format was opened"),
    }
}

#[test]
fn a_second_open_of_the_same_directory_is_refused_with_the_path() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("store");
    let _first = EmbeddedStore::open(EmbeddedStoreConfig::new(&path, vec![60_000])).expect("open");
    match EmbeddedStore::open(EmbeddedStoreConfig::new(&path, vec![60_000])) {
        Err(error @ StoreError::Embedded { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains(&path.display().to_string())
                    && message.contains("no other collector has the store open"),
                "{message}"
            );
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("two writers opened one store"),
    }
}
