//! Shared by the sim's integration tests: finding Mosquitto the way `tributary-tests` does
//! (environment, then `.services/env`; `CI=true` turns a missing service into a failure), and
//! rebuilding a ledger from what was received with the agent's own parsers.

#![allow(dead_code)]

use std::path::PathBuf;

use tributary_agent::source::ParsedReading;
use tributary_firmware_sim::ledger::{Ledger, SeriesName};

pub fn mqtt_address() -> Option<String> {
    const NAME: &str = "TRIBUTARY_MQTT_ADDR";
    if let Ok(value) = std::env::var(NAME) {
        if !value.is_empty() {
            return Some(value);
        }
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("TRIBUTARY_SERVICES_DIR") {
        candidates.push(PathBuf::from(dir).join("env"));
    }
    candidates.push(repo.join(".services").join("env"));
    for path in &candidates {
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                let line = line.trim().trim_start_matches("export ").trim();
                if let Some(value) = line.strip_prefix(&format!("{NAME}=")) {
                    return Some(value.trim_matches('"').to_owned());
                }
            }
        }
    }
    let ci = std::env::var("CI").is_ok_and(|value| value == "true" || value == "1");
    assert!(
        !ci,
        "CI=true and {NAME} is not configured; run deploy/dev/services.sh up"
    );
    eprintln!("SKIPPED: {NAME} is not set; start the services with `deploy/dev/services.sh up`");
    None
}

pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// 2000-01-01: the agent substitutes earlier device times by its receive time.
pub const MIN_VALID_MS: i64 = 946_684_800_000;

/// Accounts parsed readings the way the sim's ledger does (see `ledger` module docs).
pub fn account(ledger: &mut Ledger, readings: &[ParsedReading]) {
    for reading in readings {
        let series = SeriesName::new(reading.key.device_id.clone(), reading.key.metric.clone());
        match reading.time_ms {
            Some(time_ms) if time_ms >= MIN_VALID_MS => {
                ledger.record(&series, time_ms, reading.value, false)
            }
            _ => ledger.record_receive_timed(&series, reading.value),
        }
    }
}
