//! `deploy/edge/install.sh` into a scratch root: install, install again over it (the config an
//! operator edited is kept, nothing is duplicated), uninstall (the buffer stays), uninstall
//! again, purge. And the systemd unit both installs share, through `systemd-analyze verify`.
//!
//! The scratch root gets a minimal /etc (passwd, group, shadow) so `useradd --root` can add the
//! system user there without touching this machine's users. Ownership is checked when the test
//! runs as root (CI does); as another user the script installs without owners and says so.

mod packaging_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use packaging_support::*;

const FINGERPRINT: &str = "5E:9B:0C:21:7A:44:13:C8:F0:2D:6B:93:AA:10:7E:55:C4:21:08:3F:9D:6A:E2:71:B0:4C:58:13:2E:9F:07:D6";
const TOKEN: &str = "tok_0123456789abcdef";

fn install_script() -> PathBuf {
    repo_root().join("deploy/edge/install.sh")
}

/// A root with just enough /etc for useradd: root, and a `dialout` group as on Debian.
fn scratch_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    let etc = root.path().join("etc");
    std::fs::create_dir_all(&etc).expect("mkdir etc");
    std::fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n").expect("passwd");
    std::fs::write(etc.join("group"), "root:x:0:\ndialout:x:20:\n").expect("group");
    std::fs::write(etc.join("shadow"), "root:*:19000:0:99999:7:::\n").expect("shadow");
    std::fs::write(etc.join("gshadow"), "root:*::\ndialout:*::\n").expect("gshadow");
    root
}

fn install(root: &Path, extra: &[&str]) -> std::process::Output {
    let token_dir = tempfile::tempdir().expect("temp dir");
    let token_file = token_dir.path().join("agent.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    let agent = workspace_binary("tributary-agent");
    run(Command::new("bash")
        .arg(install_script())
        .arg("--root")
        .arg(root)
        .arg("--binary")
        .arg(&agent)
        .arg("--token-file")
        .arg(&token_file)
        .args(extra)
        .env_remove("TRIBUTARY_COLLECTOR")
        .env_remove("TRIBUTARY_TOKEN"))
}

fn assert_success(output: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed with {}\n--- stdout\n{stdout}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn passwd_lines(root: &Path, name: &str) -> Vec<String> {
    read(&root.join("etc/passwd"))
        .lines()
        .filter(|line| line.starts_with(&format!("{name}:")))
        .map(str::to_owned)
        .collect()
}

fn owner_of(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::symlink_metadata(path).expect("metadata");
    (metadata.uid(), metadata.gid())
}

#[test]
fn install_twice_then_uninstall_and_purge_a_scratch_root() {
    let scratch = scratch_root();
    let root = scratch.path();
    let first = install(
        root,
        &[
            "--collector",
            "collector.example.com:4433",
            "--fingerprint",
            FINGERPRINT,
            "--agent-id",
            "gw-test-01",
        ],
    );
    let stdout = assert_success(&first, "the first install");
    println!("{stdout}");

    // The tree.
    let binary = root.join("usr/local/bin/tributary-agent");
    let config = root.join("etc/tributary/agent.toml");
    let token = root.join("etc/tributary/agent.token");
    let unit = root.join("etc/systemd/system/tributary-agent.service");
    let wants = root.join("etc/systemd/system/multi-user.target.wants/tributary-agent.service");
    assert_eq!(mode_of(&binary), 0o755);
    assert_eq!(mode_of(&root.join("etc/tributary")), 0o750);
    assert_eq!(mode_of(&config), 0o640, "the config names the token file");
    assert_eq!(mode_of(&token), 0o640, "the token is a secret");
    assert_eq!(read(&token).trim(), TOKEN);
    assert_eq!(mode_of(&root.join("var/lib/tributary")), 0o750);
    assert_eq!(
        std::fs::read_link(&wants).expect("enabled: wants link"),
        PathBuf::from("/etc/systemd/system/tributary-agent.service")
    );
    let unit_text = read(&unit);
    assert!(unit_text.contains(
        "ExecStart=/usr/local/bin/tributary-agent run --config /etc/tributary/agent.toml"
    ));
    assert!(
        !unit_text.contains("/usr/bin/tributary-agent"),
        "every path rewritten:\n{unit_text}"
    );
    assert_unit_hardened(&unit_text);
    systemd_verify(&unit_text, "/usr/local/bin/tributary-agent", &binary);

    // The written config passes the agent's own check and says what was asked for.
    let config_text = read(&config);
    for expected in [
        "agent_id = \"gw-test-01\"",
        "address = \"collector.example.com:4433\"",
        FINGERPRINT,
        "token_file = \"/etc/tributary/agent.token\"",
        "path = \"/var/lib/tributary/buffer\"",
    ] {
        assert!(
            config_text.contains(expected),
            "config lacks `{expected}`:\n{config_text}"
        );
    }
    assert!(
        !config_text.contains(TOKEN),
        "the token stays out of the config"
    );
    run_ok(
        Command::new(&binary)
            .args(["check-config", "--config"])
            .arg(&config),
    );

    if running_as_root() {
        let users = passwd_lines(root, "tributary");
        assert_eq!(users.len(), 1, "{users:?}");
        let fields: Vec<&str> = users[0].split(':').collect();
        assert_eq!(fields[5], "/var/lib/tributary");
        assert_eq!(fields[6], "/usr/sbin/nologin");
        let uid: u32 = fields[2].parse().expect("uid");
        let gid: u32 = fields[3].parse().expect("gid");
        assert!(uid < 1000, "a system user: uid {uid}");
        let dialout = read(&root.join("etc/group"))
            .lines()
            .find(|line| line.starts_with("dialout:"))
            .map(str::to_owned)
            .expect("dialout group");
        assert_eq!(dialout, "dialout:x:20:tributary");
        assert_eq!(owner_of(&root.join("var/lib/tributary")), (uid, gid));
        assert_eq!(
            owner_of(&config),
            (0, gid),
            "root owns, the agent's group reads"
        );
        assert_eq!(owner_of(&token), (0, gid));
        assert_eq!(owner_of(&binary), (0, 0));
    }

    // Again, as after an upgrade: the operator's edit survives, new values are not applied
    // silently, nothing is duplicated.
    std::fs::write(&config, format!("{config_text}# edited by the operator\n")).expect("edit");
    std::fs::create_dir_all(root.join("var/lib/tributary/buffer")).expect("buffer dir");
    std::fs::write(root.join("var/lib/tributary/buffer/db"), b"buffered").expect("buffer");
    let second = install(
        root,
        &[
            "--collector",
            "other.example.com:4433",
            "--fingerprint",
            FINGERPRINT,
        ],
    );
    let stdout = assert_success(&second, "the second install");
    assert!(
        stdout.contains("--collector --fingerprint --token not applied"),
        "{stdout}"
    );
    assert!(read(&config).ends_with("# edited by the operator\n"));
    assert_eq!(read(&token).trim(), TOKEN);
    if running_as_root() {
        assert_eq!(passwd_lines(root, "tributary").len(), 1);
        assert!(read(&root.join("etc/group")).contains("dialout:x:20:tributary\n"));
    }

    // Uninstall: everything but the buffered data (and the user owning it).
    let uninstall = |extra: &[&str]| {
        run(Command::new("bash")
            .arg(install_script())
            .arg("--root")
            .arg(root)
            .arg("--uninstall")
            .args(extra))
    };
    let stdout = assert_success(&uninstall(&[]), "uninstall");
    assert!(stdout.contains("kept the buffered data"), "{stdout}");
    for gone in [&binary, &config, &token, &unit, &wants] {
        assert!(
            !gone.exists() && gone.symlink_metadata().is_err(),
            "{} still there",
            gone.display()
        );
    }
    assert!(!root.join("etc/tributary").exists());
    assert_eq!(read(&root.join("var/lib/tributary/buffer/db")), "buffered");
    if running_as_root() {
        assert_eq!(passwd_lines(root, "tributary").len(), 1);
    }
    // Twice is harmless.
    assert_success(&uninstall(&[]), "a second uninstall");
    // Purge removes the data and the user.
    assert_success(&uninstall(&["--purge"]), "uninstall --purge");
    assert!(!root.join("var/lib/tributary").exists());
    assert!(passwd_lines(root, "tributary").is_empty());
    let groups = read(&root.join("etc/group"));
    assert!(
        groups.contains("dialout:x:20:\n") && !groups.contains("tributary:"),
        "{groups}"
    );
}

#[test]
fn bad_inputs_are_all_reported_and_nothing_is_installed() {
    let scratch = scratch_root();
    let root = scratch.path();
    let output = run(Command::new("bash")
        .arg(install_script())
        .arg("--root")
        .arg(root)
        .args([
            "--collector",
            "collector.example.com",
            "--fingerprint",
            "5E:9B:0C",
        ])
        .args(["--agent-id", "gw 01!"])
        .arg("--binary")
        .arg(root.join("missing-binary"))
        .env_remove("TRIBUTARY_TOKEN")
        .env_remove("TRIBUTARY_COLLECTOR"));
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "nothing was installed; 5 problem(s)",
        "--collector `collector.example.com` is not HOST:PORT",
        "--fingerprint `5E:9B:0C` is not a SHA-256 fingerprint: expected 64 hex digits (':' separators allowed), got 6",
        "--token or --token-file is missing",
        "--agent-id `gw 01!` is not valid",
        "missing-binary does not exist",
    ] {
        assert!(stderr.contains(expected), "stderr lacks `{expected}`:\n{stderr}");
    }
    assert!(!root.join("etc/tributary").exists());
    assert!(!root.join("usr").exists());
    assert!(passwd_lines(root, "tributary").is_empty());

    // An unknown option and a misplaced --purge say what is wrong.
    let output = run(Command::new("bash").arg(install_script()).arg("--colector"));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown option `--colector`"));
    let output = run(Command::new("bash")
        .arg(install_script())
        .args(["--root"])
        .arg(root)
        .arg("--purge"));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--purge only goes with --uninstall"));
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_keeps_its_hardening() {
    if !require_tool(
        have_program("systemd-analyze", "--version"),
        "systemd-analyze",
        "apt-get install systemd",
    ) {
        return;
    }
    let unit_text = read(&repo_root().join("deploy/systemd/tributary-agent.service"));
    assert_unit_hardened(&unit_text);
    let agent = workspace_binary("tributary-agent");
    systemd_verify(&unit_text, "/usr/bin/tributary-agent", &agent);

    // The backoff drop-in only on a systemd that knows its keys (>= 254).
    let version_line = run_ok(Command::new("systemd-analyze").arg("--version"));
    let version: u32 = version_line
        .split_whitespace()
        .nth(1)
        .and_then(|word| word.parse().ok())
        .expect("systemd-analyze --version starts with `systemd N`");
    let dropin =
        read(&repo_root().join("deploy/systemd/tributary-agent.service.d/restart-backoff.conf"));
    assert!(dropin.contains("RestartSteps=") && dropin.contains("RestartMaxDelaySec="));
    if version >= 254 {
        let combined = format!("{unit_text}\n{}", dropin);
        systemd_verify(&combined, "/usr/bin/tributary-agent", &agent);
    } else {
        println!(
            "systemd {version}: the restart-backoff drop-in (systemd >= 254) is not verified here"
        );
    }
}
