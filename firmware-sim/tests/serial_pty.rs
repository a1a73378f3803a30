//! The serial device on a real pseudo-terminal: the test opens the printed tty path, reads what
//! the sim writes, checks every line with the agent's line decoder and CRC-8, and rebuilds the
//! ledger from it.

mod common;

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tributary_agent::source::{parse_line, LineDecoder, SerialLineOptions};
use tributary_firmware_sim::format::{crc8, MessageFormat};
use tributary_firmware_sim::ledger::{parse_json_lines, Ledger, LedgerRecord};
use tributary_firmware_sim::run::{run, RunOptions};
use tributary_firmware_sim::sim::SimConfig;
use tributary_firmware_sim::verify::{compare, split_records};

#[test]
fn serial_lines_on_the_pty_match_the_ledger() {
    let suffix = common::unique_suffix();
    let ledger_path = std::env::temp_dir().join(format!("sim-serial-ledger-{suffix}.jsonl"));
    let link = std::env::temp_dir().join(format!("sim-serial-{suffix}"));
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let config = SimConfig {
        devices: 0,
        format: MessageFormat::Json,
        rate_hz: 20.0,
        seed: 5,
        window_ms: 1000,
        faults: "serial-garbage".parse().unwrap(),
        serial: true,
    };
    let options = RunOptions {
        mqtt_address: None,
        qos: 1,
        duration_ms: 1500,
        ledger_path: Some(ledger_path.clone()),
        serial_link: Some(link.clone()),
        client_id: "unused".into(),
        topic_prefix: None,
        drain_timeout: Duration::from_secs(10),
        stop: None,
    };
    let sink = Arc::clone(&received);
    let link_for_check = link.clone();
    let summary = run(config, &options, move |path| {
        assert_eq!(
            std::fs::read_link(&link_for_check).unwrap(),
            path,
            "the symlink points at the tty"
        );
        let mut tty = std::fs::File::open(path).expect("open the pty device");
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(read) = tty.read(&mut chunk) {
                if read == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..read]);
            }
        });
    })
    .expect("sim run");
    let _ = std::fs::remove_file(&link);
    assert!(summary.serial_lines >= 30, "{summary:?}");

    let records = parse_json_lines(&std::fs::read_to_string(&ledger_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&ledger_path);
    let rejected_lines: u64 = records
        .iter()
        .map(|r| {
            if let LedgerRecord::Rejected(r) = r {
                r.count
            } else {
                0
            }
        })
        .sum();
    assert!(rejected_lines > 0, "serial-garbage wrote no bad line");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let newlines = received
            .lock()
            .unwrap()
            .iter()
            .filter(|byte| **byte == b'\n')
            .count() as u64;
        if newlines >= summary.serial_lines {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "read {newlines} of {} lines from the pty",
            summary.serial_lines
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let bytes = received.lock().unwrap().clone();
    let mut decoder = LineDecoder::new(512);
    decoder.push(&bytes);
    let mut observed = Ledger::new(1000).unwrap();
    let mut readings = Vec::new();
    let mut good_lines = 0;
    while let Some(line) = decoder.next_line() {
        let line = line.expect("no line is too long");
        readings.clear();
        match parse_line(line.bytes, &SerialLineOptions::default(), &mut readings) {
            Ok(_) => {
                good_lines += 1;
                let star = line.bytes.iter().rposition(|byte| *byte == b'*').unwrap();
                let written =
                    u8::from_str_radix(std::str::from_utf8(&line.bytes[star + 1..]).unwrap(), 16)
                        .unwrap();
                assert_eq!(written, crc8(&line.bytes[..star]));
                assert!(
                    line.bytes.starts_with(b"dev-0000 temperature="),
                    "{}",
                    String::from_utf8_lossy(line.bytes)
                );
                common::account(&mut observed, &readings);
            }
            Err(error) => observed.record_rejected(&format!("serial/{}", error.reason())),
        }
    }
    assert!(
        bytes.windows(2).filter(|pair| pair == b"\r\n").count() as u64 >= summary.serial_lines,
        "lines end in CRLF"
    );
    assert!(
        good_lines >= 25,
        "{good_lines} good lines in 1.5 s at 20 Hz"
    );

    let rejected: Vec<_> = records
        .iter()
        .filter_map(|r| {
            if let LedgerRecord::Rejected(r) = r {
                Some(r.clone())
            } else {
                None
            }
        })
        .collect();
    let (windows, receive_timed) = split_records(records);
    assert!(receive_timed.is_empty());
    let report = compare(&windows, &[], &observed.windows(), 1e-9);
    assert!(report.is_exact(), "{}", report.render(10));
    assert_eq!(observed.rejected(), rejected);
}
