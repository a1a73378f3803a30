//! The agent's Debian package, built with cargo-deb from `[package.metadata.deb]` in
//! `agent/Cargo.toml`, and inspected: control fields, every file with its mode and owner, the
//! maintainer scripts (system user, dialout, systemd snippets merged in), the unit through
//! `systemd-analyze verify`, and the packaged binary itself: it runs, accepts the packaged
//! example config, and its footprint (size, idle RSS) is printed as one JSON line for
//! docs/operating.md and checked against a gateway's budget.
//!
//! Building the package means a release build of the agent: `cargo deb` reuses the target
//! directory, so after the first build this test takes seconds. cargo-deb comes from
//! `deploy/dev/packaging-deps.sh`; without it the test fails in CI and is skipped elsewhere.

mod packaging_support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use packaging_support::*;

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Builds the package (incrementally) and returns the .deb's path. `TRIBUTARY_AGENT_DEB=PATH`
/// inspects a package built before instead (to iterate on this test while the agent changes).
fn build_package() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TRIBUTARY_AGENT_DEB") {
        return Some(PathBuf::from(path));
    }
    let have_cargo_deb = Command::new(cargo())
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !require_tool(
        have_cargo_deb,
        "cargo-deb",
        "run deploy/dev/packaging-deps.sh",
    ) {
        return None;
    }
    let started = Instant::now();
    let stdout = run_ok(
        Command::new(cargo())
            .args(["deb", "-p", "tributary-agent", "--locked", "--strip"])
            .env("CARGO_TARGET_DIR", target_dir())
            .current_dir(repo_root()),
    );
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| line.ends_with(".deb"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("cargo deb printed no .deb path:\n{stdout}"));
    println!(
        "built {} in {:.1} s",
        deb.display(),
        started.elapsed().as_secs_f64()
    );
    Some(deb)
}

fn status_field_kib(pid: u32, field: &str) -> u64 {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn the_debian_package_holds_what_a_gateway_needs() {
    let Some(deb) = build_package() else { return };

    // Control fields.
    let info = run_ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for expected in [
        "Package: tributary-agent",
        "Section: net",
        "Priority: optional",
        "Maintainer: Tributary maintainers",
    ] {
        assert!(
            info.contains(expected),
            "control lacks `{expected}`:\n{info}"
        );
    }
    let depends = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("no Depends:\n{info}"));
    assert!(
        depends.contains("adduser"),
        "postinst uses adduser: {depends}"
    );
    assert!(
        depends.contains("libc6"),
        "$auto found the libc dependency: {depends}"
    );

    // Files, modes and owners (`dpkg-deb --contents` is `tar -tv`).
    let contents = run_ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let entry = |path: &str| -> (String, String) {
        let line = contents
            .lines()
            .find(|line| {
                line.ends_with(&format!(" ./{path}")) || line.ends_with(&format!(" {path}"))
            })
            .unwrap_or_else(|| panic!("the package lacks {path}:\n{contents}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields[0].to_owned(), fields[1].to_owned())
    };
    let unit_path = [
        "lib/systemd/system/tributary-agent.service",
        "usr/lib/systemd/system/tributary-agent.service",
    ]
    .into_iter()
    .find(|path| contents.contains(&format!(" ./{path}\n")))
    .unwrap_or_else(|| panic!("no unit in the package:\n{contents}"));
    for (path, mode) in [
        ("usr/bin/tributary-agent", "-rwxr-xr-x"),
        ("etc/tributary/agent.example.toml", "-rw-r--r--"),
        (unit_path, "-rw-r--r--"),
        (
            "usr/share/tributary-agent/restart-backoff.conf",
            "-rw-r--r--",
        ),
        (
            "usr/share/doc/tributary-agent/edge-install.md",
            "-rw-r--r--",
        ),
    ] {
        let (actual_mode, owner) = entry(path);
        assert_eq!(actual_mode, mode, "{path}");
        assert!(
            owner == "0/0" || owner == "root/root",
            "{path} owned by {owner}"
        );
    }
    assert!(
        !contents.contains("etc/tributary/agent.toml"),
        "the real config is the operator's: the package ships only the example"
    );

    // Maintainer scripts: ours, with cargo-deb's systemd snippets merged at #DEBHELPER#.
    let scratch = tempfile::tempdir().expect("temp dir");
    let control = scratch.path().join("control");
    run_ok(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(&deb)
            .arg(&control),
    );
    let postinst = read(&control.join("postinst"));
    let postrm = read(&control.join("postrm"));
    let conffiles = read(&control.join("conffiles"));
    assert!(postinst.contains("adduser --system --group --home /var/lib/tributary"));
    assert!(postinst.contains("adduser tributary dialout"));
    assert!(
        postinst.contains("deb-systemd-helper"),
        "unit enabled:\n{postinst}"
    );
    assert!(
        postrm.contains("rm -rf /var/lib/tributary"),
        "purge removes the buffer"
    );
    assert!(conffiles.contains("/etc/tributary/agent.example.toml"));
    for script in ["postinst", "postrm", "prerm"] {
        let path = control.join(script);
        if !path.exists() {
            continue;
        }
        let text = read(&path);
        assert!(
            !text.contains("#DEBHELPER#"),
            "{script}: token not replaced"
        );
        assert_eq!(mode_of(&path) & 0o111, 0o111, "{script} is executable");
        run_ok(Command::new("sh").arg("-n").arg(&path));
    }

    // The packaged files themselves.
    let data = scratch.path().join("data");
    run_ok(
        Command::new("dpkg-deb")
            .arg("--extract")
            .arg(&deb)
            .arg(&data),
    );
    let binary = data.join("usr/bin/tributary-agent");
    let version = run_ok(Command::new(&binary).arg("--version"));
    assert!(version.starts_with("tributary-agent "), "{version}");
    run_ok(
        Command::new(&binary)
            .args(["check-config", "--config"])
            .arg(data.join("etc/tributary/agent.example.toml")),
    );
    let unit_text = read(&data.join(unit_path));
    assert_eq!(
        unit_text,
        read(&repo_root().join("deploy/systemd/tributary-agent.service")),
        "the package ships the repository's unit unchanged"
    );
    if require_tool(
        have_program("systemd-analyze", "--version"),
        "systemd-analyze",
        "apt-get install systemd",
    ) {
        systemd_verify(&unit_text, "/usr/bin/tributary-agent", &binary);
    }

    measure_footprint(&deb, &binary);
}

/// Binary size and idle RSS of the packaged (release, stripped) agent: started with a serial
/// source whose port is missing and an unreachable collector, so it idles the way a gateway
/// does while waiting for sensors and network.
fn measure_footprint(deb: &Path, binary: &Path) {
    let scratch = tempfile::tempdir().expect("temp dir");
    let metrics_address = format!("127.0.0.1:{}", free_port());
    let config = scratch.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"agent_id = "footprint"
[collector]
address = "127.0.0.1:{collector_port}"
cert_fingerprint_sha256 = "{fingerprint}"
token = "footprint-token"
[buffer]
path = "{buffer}"
[metrics]
listen_address = "{metrics_address}"
[[sources]]
name = "serial"
[sources.serial]
path = "{tty}"
"#,
            collector_port = free_port(),
            fingerprint = "00".repeat(32),
            buffer = scratch.path().join("buffer").display(),
            tty = scratch.path().join("ttyUSB-missing").display(),
        ),
    )
    .expect("config");
    let mut child = Command::new(binary)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the packaged agent");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        if let Some(body) = http_get(&metrics_address, "/metrics") {
            if body.contains("200 OK") {
                break body;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            let _ = child
                .stderr
                .take()
                .map(|mut pipe| pipe.read_to_string(&mut stderr));
            panic!("the agent exited with {status} before serving /metrics:\n{stderr}");
        }
        assert!(
            Instant::now() < deadline,
            "no /metrics on {metrics_address} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(metrics.contains("tributary_"), "{metrics}");
    let rss_kib = status_field_kib(pid, "VmRSS");
    let peak_kib = status_field_kib(pid, "VmHWM");
    let threads = status_field_kib(pid, "Threads");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "the agent stops cleanly on SIGTERM: {exit}");

    let binary_bytes = std::fs::metadata(binary).expect("binary").len();
    let deb_bytes = std::fs::metadata(deb).expect("deb").len();
    println!(
        "{}",
        serde_json::json!({
            "bench": "agent_footprint",
            "binary_bytes": binary_bytes,
            "deb_bytes": deb_bytes,
            "idle_rss_kib": rss_kib,
            "idle_peak_rss_kib": peak_kib,
            "threads": threads,
            "arch": std::env::consts::ARCH,
        })
    );
    // A gateway's budget (docs/operating.md): the unit's MemoryHigh is 96 MiB.
    assert!(
        binary_bytes < 32 * 1024 * 1024,
        "binary of {binary_bytes} bytes"
    );
    assert!(rss_kib < 48 * 1024, "idle RSS {rss_kib} KiB");
}
