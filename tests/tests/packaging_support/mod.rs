//! Shared by the packaging and deployment tests: finding the workspace's binaries, running
//! commands with their output in the failure message, a few file checks, and asking a
//! started binary's HTTP endpoint.
//!
//! Why the binaries are found next to the test executable: this crate cannot depend on the
//! agent's and collector's *binaries* (only on libraries), and building them from inside a test
//! with another feature set would rebuild their dependencies. `cargo test --workspace` builds
//! both binaries (their packages have integration tests), so they sit in the same profile
//! directory as this test; run alone, build them first with
//! `cargo build -p tributary-agent -p tributary-collector`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// `<target>/<profile>`: the test executable lives in `<target>/<profile>/deps/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("the test executable is in <target>/<profile>/deps/")
}

/// `<target>`, shared with cargo-deb's output (`<target>/debian/`).
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .expect("the profile directory is inside the target directory")
}

/// A binary of the workspace built in the same profile as this test.
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} does not exist; build it with `cargo build -p {name}` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

pub fn repo_root() -> PathBuf {
    tributary_tests::services::repo_root()
}

/// Runs a command and returns its output; panics with the command line if it cannot start.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("{} should exist: {error}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

pub fn running_as_root() -> bool {
    run(Command::new("id").arg("-u")).stdout == b"0\n"
}

/// Whether `program` can be found and started (`program --version` or similar exits at all).
pub fn have_program(program: &str, version_argument: &str) -> bool {
    Command::new(program)
        .arg(version_argument)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Fails in CI (a missing tool there is a broken setup); elsewhere prints SKIPPED and
/// returns `false` so the test can return early.
pub fn require_tool(available: bool, what: &str, how_to_get_it: &str) -> bool {
    if available {
        return true;
    }
    let message = format!("{what} is not available; {how_to_get_it}");
    if tributary_tests::services::running_in_ci() {
        panic!("CI=true and {message}");
    }
    eprintln!("SKIPPED: {message}");
    false
}

/// `systemd-analyze verify` on a copy of `unit_text` whose binary paths point at `binary`
/// (verify insists that ExecStart= names an executable). Returns stderr; the unit must pass
/// without any warning.
pub fn systemd_verify(unit_text: &str, installed_binary_path: &str, binary: &Path) -> String {
    let scratch = tempfile::tempdir().expect("temp dir");
    let unit_path = scratch.path().join("tributary-agent.service");
    let text = unit_text.replace(installed_binary_path, &binary.display().to_string());
    std::fs::write(&unit_path, text).expect("write unit copy");
    let output = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .current_dir(scratch.path()));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify rejected the unit ({}):\n{stderr}",
        output.status
    );
    stderr
}

/// The hardening the unit must keep (issue 8): a change that drops one fails here.
pub const REQUIRED_UNIT_SETTINGS: &[&str] = &[
    "User=tributary",
    "SupplementaryGroups=dialout",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet=",
    "MemoryMax=",
    "CPUQuota=",
    "Restart=always",
    "RestartSec=",
    "StartLimitIntervalSec=0",
    "StateDirectory=tributary",
    "ConditionPathExists=/etc/tributary/agent.toml",
];

pub fn assert_unit_hardened(unit_text: &str) {
    let lines: Vec<&str> = unit_text.lines().map(str::trim).collect();
    for setting in REQUIRED_UNIT_SETTINGS {
        assert!(
            lines.iter().any(|line| line.starts_with(setting)),
            "the unit lost `{setting}`:\n{unit_text}"
        );
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// The whole response (head and body) to `GET path`, or `None` while nothing answers.
pub fn http_get(address: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// The status code of `GET path`, or `None` while nothing answers.
pub fn http_status(address: &str, path: &str) -> Option<u16> {
    http_get(address, path)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
