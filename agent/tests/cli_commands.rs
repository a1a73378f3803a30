//! The binary as a user runs it: `check-config` messages, `buffer inspect|verify`, and
//! `run` serving /metrics and stopping cleanly on SIGTERM.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{agent_config, free_port, spawn_agent, terminate, wait_for_metrics};
use tributary_agent::buffer::{BatchClass, BatchInfo, BufferConfig, DiskBuffer};

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tributary-agent"))
}

fn run_agent_command(arguments: &[&str]) -> Output {
    agent()
        .args(arguments)
        .output()
        .expect("run tributary-agent")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_config_accepts_the_example() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.toml");
    let output = run_agent_command(&[
        "check-config",
        "--config",
        example.to_str().expect("utf-8 path"),
    ]);
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(
        text(&output.stdout).contains("OK (3 source(s)"),
        "{}",
        text(&output.stdout)
    );
}

#[test]
fn check_config_lists_every_problem_with_its_field_path() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("agent.toml");
    std::fs::write(
        &path,
        r#"
agent_id = "gw 1"
[collector]
address = "collector:4433"
cert_fingerprint_sha256 = "00"
token = "t"
[buffer]
max_buffer_bytes = 10
[[sources]]
name = "tty"
[sources.serial]
path = "/dev/ttyUSB0"
baud_rate = 12345
[sources.aggregation]
window_ms = 5
raw = { policy = "every_nth", n = 0 }
"#,
    )
    .expect("write config");
    let output = run_agent_command(&[
        "check-config",
        "--config",
        path.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    for field in [
        "agent_id:",
        "buffer.max_buffer_bytes:",
        "sources[0].serial.baud_rate: 12345 is not a standard rate",
        "sources[0].aggregation.window_ms:",
        "sources[0].aggregation.raw.n:",
    ] {
        assert!(stderr.contains(field), "missing `{field}` in:\n{stderr}");
    }
}

#[test]
fn check_config_points_at_syntax_errors_and_unknown_fields() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("agent.toml");
    std::fs::write(
        &path,
        "agent_id = \"gw\"\n[collector]\naddress = \"c:1\"\nadress = \"typo\"\n",
    )
    .expect("write config");
    let output = run_agent_command(&[
        "check-config",
        "--config",
        path.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("agent.toml:4:1") && stderr.contains("adress"),
        "{stderr}"
    );

    let output = run_agent_command(&["check-config", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("cannot read config file /nonexistent/agent.toml"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn buffer_inspect_and_verify() {
    let directory = tempfile::tempdir().expect("tempdir");
    let buffer_path = directory.path().join("buffer");
    {
        let buffer = DiskBuffer::open(BufferConfig::at(&buffer_path)).expect("open buffer");
        for class in [BatchClass::Raw, BatchClass::Raw, BatchClass::Summary] {
            let seq = buffer.allocate_seq().expect("seq");
            let info = BatchInfo {
                class,
                created_ms: 1_000 + seq as i64,
                oldest_event_ms: 900,
                reading_count: 10,
            };
            buffer.append(seq, info, b"payload bytes").expect("append");
        }
        buffer.flush().expect("flush");
    }
    let path_argument = buffer_path.to_str().expect("utf-8 path");
    let output = run_agent_command(&["buffer", "inspect", "--path", path_argument]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("raw") && line.contains("batches        2")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("summary") && line.contains("batches        1")),
        "{stdout}"
    );
    let output = run_agent_command(&["buffer", "verify", "--path", path_argument]);
    assert!(output.status.success(), "{}", text(&output.stdout));
    assert!(text(&output.stdout).contains("all entries intact"));

    {
        let buffer = DiskBuffer::open(BufferConfig::at(&buffer_path)).expect("reopen buffer");
        buffer
            .write_raw_entry_for_test(BatchClass::Raw, &77u64.to_be_bytes(), b"garbage")
            .expect("corrupt");
        buffer.flush().expect("flush");
    }
    let output = run_agent_command(&["buffer", "verify", "--path", path_argument]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stdout));
    assert!(
        text(&output.stdout).contains("bad entry: seq 77 in raw"),
        "{}",
        text(&output.stdout)
    );

    let output = run_agent_command(&["buffer", "inspect", "--path", "/nonexistent/buffer"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("no buffer at /nonexistent/buffer"),
        "{}",
        text(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_metrics_and_stops_on_sigterm() {
    let directory = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config_path = directory.path().join("agent.toml");
    std::fs::write(
        &config_path,
        agent_config(
            "gw-cli",
            &directory.path().join("buffer"),
            port,
            &format!(
                r#"
[[sources]]
name = "missing-tty"
[sources.serial]
path = "{}"
reconnect_interval_ms = 50
"#,
                directory.path().join("no-such-tty").display()
            ),
        ),
    )
    .expect("write config");
    let mut child = spawn_agent(&config_path, Stdio::piped());
    let mut metrics = String::new();
    wait_for_metrics(
        port,
        &mut child,
        Duration::from_secs(30),
        "/metrics",
        |text| {
            metrics = text.to_owned();
            true
        },
    )
    .await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("tributary_agent_source_connected{source=\"missing-tty\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tributary_agent_buffer_batches 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tributary_agent_ship_connected 0"),
        "the shipper's counters are exported: {metrics}"
    );
    let status = terminate(&mut child, Duration::from_secs(20)).await;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("pipeline stopped"), "{stderr}");
}
