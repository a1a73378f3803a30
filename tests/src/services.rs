//! Finding the real services (Mosquitto, Kafka, ClickHouse, chdb) that `deploy/dev/services.sh up`
//! starts, and running SQL through chdb.
//!
//! Why this exists: tests against real services must behave the same way everywhere. On a
//! developer machine without services a test prints a loud `SKIPPED:` line and passes, so
//! `cargo test` stays usable; in CI (`CI=true`) a missing service is a failure, so a broken
//! `services.sh` can never turn into a green run that tested nothing.
//!
//! Discovery order for each variable: the process environment (what `.ci/run` exports after
//! sourcing the env file), then `$TRIBUTARY_SERVICES_DIR/env`, then `<repo>/.services/env`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// `host:port` of the Mosquitto listener.
pub const MQTT_ADDR: &str = "TRIBUTARY_MQTT_ADDR";
/// Comma-separated Kafka bootstrap servers.
pub const KAFKA_BROKERS: &str = "TRIBUTARY_KAFKA_BROKERS";
/// Kafka version started by the script (informational, for test output).
pub const KAFKA_VERSION: &str = "TRIBUTARY_KAFKA_VERSION";
/// `http://host:port` of the ClickHouse server's HTTP interface.
pub const CLICKHOUSE_URL: &str = "TRIBUTARY_CLICKHOUSE_URL";
/// Path of a Python interpreter that can `import chdb`.
pub const CHDB_PYTHON: &str = "TRIBUTARY_CHDB_PYTHON";
/// Absolute path of `deploy/dev/services.sh`, for fault tests that `stop`/`start` a service.
pub const SERVICES_SCRIPT: &str = "TRIBUTARY_SERVICES_SCRIPT";

/// The repository root (the workspace that contains this crate).
pub fn repo_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// The env files written by `services.sh up`, in the order they are consulted.
pub fn env_file_candidates() -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("TRIBUTARY_SERVICES_DIR") {
        if !dir.is_empty() {
            candidates.push(PathBuf::from(dir).join("env"));
        }
    }
    candidates.push(repo_root().join(".services").join("env"));
    candidates
}

/// Reads `export NAME=VALUE` (or `NAME=VALUE`) from an env file; values are taken verbatim,
/// except for one pair of surrounding quotes.
pub fn read_env_file_value(contents: &str, name: &str) -> Option<String> {
    contents.lines().find_map(|line| {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let (key, value) = line.split_once('=')?;
        if key.trim() != name {
            return None;
        }
        let value = value.trim();
        let unquoted = value
            .strip_prefix('"')
            .and_then(|rest| rest.strip_suffix('"'))
            .or_else(|| {
                value
                    .strip_prefix('\'')
                    .and_then(|rest| rest.strip_suffix('\''))
            })
            .unwrap_or(value);
        (!unquoted.is_empty()).then(|| unquoted.to_string())
    })
}

/// Looks a service variable up without side effects: environment first, then the env files.
pub fn lookup_service_env(name: &str) -> Option<String> {
    if let Ok(value) = std::env::var(name) {
        if !value.is_empty() {
            return Some(value);
        }
    }
    env_file_candidates().into_iter().find_map(|path| {
        let contents = std::fs::read_to_string(path).ok()?;
        read_env_file_value(&contents, name)
    })
}

/// Whether this run is CI, where a missing service must fail the test instead of skipping it.
pub fn running_in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}

/// The value of a service variable (for example [`KAFKA_BROKERS`]) for a test.
///
/// Returns `None` after printing a loud `SKIPPED:` line when the service is not configured and
/// this is not CI; the caller returns early. Panics (fails the test) when `CI=true`.
pub fn service_env(name: &str) -> Option<String> {
    if let Some(value) = lookup_service_env(name) {
        return Some(value);
    }
    let searched: Vec<String> = env_file_candidates()
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    let message = format!(
        "{name} is not set and not found in {}; start the services with `deploy/dev/services.sh up`",
        searched.join(" or ")
    );
    if running_in_ci() {
        panic!("CI=true and a required service is missing: {message}");
    }
    eprintln!("SKIPPED: {} ({message})", test_name());
    None
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("service test")
        .to_string()
}

/// A name fragment unique to this process and moment, for topics and tables that tests create
/// so that reruns and parallel runs never see each other's data.
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0);
    format!("{}_{}", std::process::id(), nanos % 1_000_000_000_000)
}

/// Drops a test's ClickHouse database. Errors are ignored: it is cleanup after a test whose
/// database name is unique, and a server another test is restarting must not fail this one.
pub async fn drop_clickhouse_database(url: &str, database: &str) {
    let client = clickhouse::Client::default()
        .with_url(url)
        .with_validation(false);
    let _ = client
        .query(&format!("DROP DATABASE IF EXISTS {database}"))
        .execute()
        .await;
}

/// Why running SQL through chdb failed.
#[derive(Debug, thiserror::Error)]
pub enum ChdbError {
    /// The interpreter could not be started or fed.
    #[error("could not run {python} with the chdb helper: {error}; check TRIBUTARY_CHDB_PYTHON or rerun deploy/dev/services.sh up")]
    Spawn {
        python: String,
        error: std::io::Error,
    },
    /// The helper exited non-zero; its stderr names the failing statement.
    #[error("chdb helper failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    /// The helper printed something that is not the expected JSON.
    #[error("chdb helper printed unparseable output ({error}): {output}")]
    BadOutput {
        output: String,
        error: serde_json::Error,
    },
}

/// Path of the Python helper that runs SQL statements in a throwaway chdb session.
pub fn chdb_helper_script() -> PathBuf {
    repo_root().join("tests").join("python").join("chdb_run.py")
}

/// Runs `statements` in order in one fresh, persistent chdb session (a temporary directory, so
/// MergeTree tables behave as on a server) and returns, for each statement, its result rows as
/// JSON objects (`JSONEachRow`; empty for DDL and inserts).
pub fn chdb_run(
    python: &str,
    statements: &[&str],
) -> Result<Vec<Vec<serde_json::Value>>, ChdbError> {
    let mut child = Command::new(python)
        .arg(chdb_helper_script())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| ChdbError::Spawn {
            python: python.to_string(),
            error,
        })?;
    let request = serde_json::json!({ "statements": statements }).to_string();
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(request.as_bytes())
            .map_err(|error| ChdbError::Spawn {
                python: python.to_string(),
                error,
            })?;
    }
    let output = child.wait_with_output().map_err(|error| ChdbError::Spawn {
        python: python.to_string(),
        error,
    })?;
    if !output.status.success() {
        return Err(ChdbError::Failed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    serde_json::from_str(&stdout).map_err(|error| ChdbError::BadOutput {
        output: stdout,
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_values_are_found_with_or_without_export_and_quotes() {
        let contents = "# comment\nexport TRIBUTARY_MQTT_ADDR=127.0.0.1:18830\nTRIBUTARY_KAFKA_BROKERS=\"127.0.0.1:19092\"\nexport TRIBUTARY_CHDB_PYTHON=\n";
        assert_eq!(
            read_env_file_value(contents, MQTT_ADDR).as_deref(),
            Some("127.0.0.1:18830")
        );
        assert_eq!(
            read_env_file_value(contents, KAFKA_BROKERS).as_deref(),
            Some("127.0.0.1:19092")
        );
        assert_eq!(read_env_file_value(contents, CHDB_PYTHON), None);
        assert_eq!(read_env_file_value(contents, CLICKHOUSE_URL), None);
        assert_eq!(read_env_file_value(contents, "TRIBUTARY_MQTT"), None);
    }
}
