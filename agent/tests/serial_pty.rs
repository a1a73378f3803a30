//! The serial shell through a real pseudo-terminal pair: the test writes sensor lines on the
//! master side, the agent reads the slave through a symlink (as it would a
//! `/dev/serial/by-id/...` link). Garbage and bad checksums are counted and skipped; when the
//! "device" is unplugged (master closed, link removed) the agent retries and resumes on a new
//! pty once the link is back.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tributary_agent::config::SerialConfig;
use tributary_agent::metrics::SourceMetrics;
use tributary_agent::run::PipelineInput;
use tributary_agent::source::{crc8, SerialLineOptions};

/// A pty pair: the master (ours) and the slave's path (the agent's).
fn open_pty() -> (std::fs::File, PathBuf) {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let mut name = [0 as libc::c_char; 256];
    // SAFETY: openpty writes two fds and a NUL-terminated name into the buffers we own.
    let result = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            name.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(
        result,
        0,
        "openpty failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: name is NUL-terminated by openpty.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // The agent opens the slave by path; our copy of the slave fd is not needed.
    // SAFETY: slave is a valid fd we own.
    drop(unsafe { OwnedFd::from_raw_fd(slave) });
    // SAFETY: master is a valid fd we own.
    (
        std::fs::File::from(unsafe { OwnedFd::from_raw_fd(master) }),
        PathBuf::from(path),
    )
}

fn line(body: &str) -> String {
    format!("{body} *{:02X}\n", crc8(format!("{body} ").as_bytes()))
}

fn write(master: &mut std::fs::File, text: &str) {
    use std::io::Write;
    master
        .write_all(text.as_bytes())
        .expect("write to pty master");
}

async fn wait_until(limit: Duration, what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn receive_devices(
    receiver: &mut mpsc::Receiver<PipelineInput>,
    count: usize,
) -> Vec<(String, String, f64)> {
    let mut readings = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while readings.len() < count {
        let input = tokio::time::timeout_at(deadline, receiver.recv())
            .await
            .expect("readings within 20 s")
            .expect("channel open");
        assert!(input.durable.is_none(), "serial readings are not journaled");
        readings.extend(
            input
                .readings
                .to_vec()
                .into_iter()
                .map(|reading| (reading.key.device_id, reading.key.metric, reading.value)),
        );
    }
    readings
}

fn link(target: &Path, link: &Path) {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_lines_counts_rejects_and_survives_unplug() {
    let directory = tempfile::tempdir().expect("tempdir");
    let device_link = directory.path().join("ttyUSB-test");
    let (mut master, slave_path) = open_pty();
    link(&slave_path, &device_link);

    let config = SerialConfig {
        path: device_link.clone(),
        baud_rate: 115_200,
        data_bits: 8,
        parity: Default::default(),
        stop_bits: 1,
        flow_control: Default::default(),
        reconnect_interval_ms: 20,
        line: SerialLineOptions::default(),
    };
    let metrics = Arc::new(SourceMetrics::new("tty", "serial"));
    let (sender, mut receiver) = mpsc::channel(64);
    let stop = CancellationToken::new();
    let task = tokio::spawn(tributary_agent::source::serial::run_serial(
        0,
        config,
        Arc::clone(&metrics),
        sender,
        stop.clone(),
    ));

    wait_until(Duration::from_secs(10), "the port to open", || {
        metrics.connected.load(Ordering::Relaxed) == 1
    })
    .await;
    write(&mut master, &line("dev-1 temp=21.5 hum=40"));
    write(&mut master, "complete garbage without structure\n");
    write(&mut master, "dev-1 temp=99 *00\n");
    write(&mut master, &line("dev-2 temp=-3.25"));
    let readings = receive_devices(&mut receiver, 3).await;
    assert_eq!(
        readings,
        vec![
            ("dev-1".to_owned(), "temp".to_owned(), 21.5),
            ("dev-1".to_owned(), "hum".to_owned(), 40.0),
            ("dev-2".to_owned(), "temp".to_owned(), -3.25),
        ]
    );
    let rejected = metrics.rejected();
    assert_eq!(rejected.values().sum::<u64>(), 2, "{rejected:?}");
    assert_eq!(rejected.get("bad_checksum"), Some(&1), "{rejected:?}");

    // Unplug: the device goes away and so does its link.
    drop(master);
    std::fs::remove_file(&device_link).expect("remove link");
    wait_until(
        Duration::from_secs(10),
        "the agent to notice the unplug",
        || metrics.connected.load(Ordering::Relaxed) == 0,
    )
    .await;
    let reconnects_before = metrics.reconnects.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(10),
        "open retries while the device is missing",
        || metrics.reconnects.load(Ordering::Relaxed) >= reconnects_before + 3,
    )
    .await;

    // Plug it back in (a new pty, as a new USB enumeration would give).
    let (mut master, slave_path) = open_pty();
    link(&slave_path, &device_link);
    wait_until(Duration::from_secs(10), "the port to reopen", || {
        metrics.connected.load(Ordering::Relaxed) == 1
    })
    .await;
    write(&mut master, &line("dev-3 temp=7"));
    let readings = receive_devices(&mut receiver, 1).await;
    assert_eq!(readings, vec![("dev-3".to_owned(), "temp".to_owned(), 7.0)]);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serial task stops")
        .expect("no panic");
}
