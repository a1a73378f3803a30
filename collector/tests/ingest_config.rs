//! The documented example config parses, and mistakes produce messages that name the field.

use std::path::Path;

use tributary_collector::config::CollectorConfig;

#[test]
fn the_example_config_parses_and_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("collector.example.toml");
    let config = CollectorConfig::load(&path).unwrap();
    assert_eq!(config.ingest.listen_address.port(), 4433);
    assert_eq!(config.ingest.max_in_flight_batches_per_agent, 16);
    assert_eq!(
        config.log_config().directory,
        Path::new("/var/lib/tributary-collector/log")
    );
}

#[test]
fn unknown_fields_and_bad_values_are_named() {
    let error = CollectorConfig::parse(
        "state_dir = \"/tmp/x\"\n[ingest]\nmax_inflight = 3\n",
        Path::new("c.toml"),
    )
    .unwrap_err();
    assert!(error.to_string().contains("max_inflight"), "{error}");
    let error = CollectorConfig::parse(
        "state_dir = \"/tmp/x\"\n[ingest]\nkeep_alive_interval_ms = 70000\nidle_timeout_ms = 60000\n",
        Path::new("c.toml"),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("ingest.idle_timeout_ms"),
        "{error}"
    );
    let config = CollectorConfig::parse("state_dir = \"/tmp/x\"\n", Path::new("c.toml")).unwrap();
    assert_eq!(config.log_config().directory, Path::new("/tmp/x/log"));
}
