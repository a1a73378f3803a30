//! The shipper against a real collector ingest over QUIC on loopback, with a real
//! embedded log and a real sled buffer.

mod ship_support;

use std::time::Duration;

use ship_support::*;
use tributary_agent::ship::ShipError;
use tributary_protocol::session::RejectReason;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_batch_is_acked_written_once_and_removed_from_the_buffer() {
    let state = temp_dir();
    let collector = start_collector(
        state.path(),
        loopback_any_port(),
        tokens_for(&["gw-1".to_owned()]),
    );
    let buffer_dir = temp_dir();
    let buffer = open_buffer(buffer_dir.path());
    let seqs = fill_buffer(&buffer, "gw-1", 40, 8, 500);
    let handle = ship_all(
        ship_config("gw-1", collector.address, &collector.fingerprint),
        &buffer,
    )
    .await;

    let stats = handle.stats();
    assert_eq!(
        stats
            .batches_acked
            .load(std::sync::atomic::Ordering::Relaxed),
        40
    );
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let records = all_records(&collector.log);
    assert_eq!(records.len(), 40, "one record per batch");
    let mut logged: Vec<u64> = records
        .iter()
        .map(|record| record.headers.batch_seq)
        .collect();
    logged.sort_unstable();
    assert_eq!(logged, seqs);
    for record in &records {
        assert_eq!(record.headers.agent_id, "gw-1");
        assert_eq!(
            record.headers.protocol_version,
            tributary_protocol::session::PROTOCOL_VERSION
        );
        // The shipper sent most batches without definitions.
        assert_self_contained(record, 500);
    }
    let agent = collector.fleet.agent("gw-1").unwrap();
    assert_eq!(agent.batches_acked, 40);
    assert_eq!(agent.readings_acked, 40 * 500);
    // Stripping definitions worked: later batches were smaller on the wire than stored.
    assert!(
        collector
            .metrics
            .acks
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 40
    );
    collector.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_a_hard_error_with_the_collectors_reason() {
    let state = temp_dir();
    let collector = start_collector(
        state.path(),
        loopback_any_port(),
        tokens_for(&["gw-1".to_owned()]),
    );
    let buffer_dir = temp_dir();
    let mut config = ship_config("gw-1", collector.address, &collector.fingerprint);
    config.token = "not-the-token".to_owned();
    let (_handle, task) = spawn_shipper(config, open_buffer(buffer_dir.path()));
    let error = tokio::time::timeout(DEADLINE, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    match &error {
        ShipError::Rejected {
            reason: RejectReason::Unauthorized,
            message,
            ..
        } => assert!(message.contains("wrong token"), "{message}"),
        other => panic!("expected an unauthorized reject, got {other}"),
    }
    assert!(error.is_fatal());

    let mut config = ship_config("gw-unknown", collector.address, &collector.fingerprint);
    config.token = TOKEN.to_owned();
    let buffer_dir = temp_dir();
    let (_handle, task) = spawn_shipper(config, open_buffer(buffer_dir.path()));
    let error = tokio::time::timeout(DEADLINE, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("not in the collector's tokens file"),
        "{error}"
    );
    assert_eq!(
        collector
            .metrics
            .hellos_rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    collector.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pinned_fingerprint_fails_with_both_fingerprints_named() {
    let state = temp_dir();
    let collector = start_collector(
        state.path(),
        loopback_any_port(),
        tokens_for(&["gw-1".to_owned()]),
    );
    let buffer_dir = temp_dir();
    let pinned = "ab".repeat(32);
    let (_handle, task) = spawn_shipper(
        ship_config("gw-1", collector.address, &pinned),
        open_buffer(buffer_dir.path()),
    );
    let error = tokio::time::timeout(DEADLINE, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    match &error {
        ShipError::FingerprintMismatch {
            presented,
            pinned: configured,
            ..
        } => {
            assert_eq!(presented, &collector.fingerprint);
            assert_eq!(configured, &pinned);
        }
        other => panic!("expected a fingerprint mismatch, got {other}"),
    }
    assert!(
        error.to_string().contains("server_fingerprint_sha256"),
        "{error}"
    );
    collector.server.shutdown().await;
}

/// Upgrades in either order, from the agent's side: this (newer) agent against a collector
/// that offers only protocol 1 or 2 (`max_protocol_version`, as an operator pins it while a
/// rollback is possible, and as an older collector answers) sends every batch in the batch
/// format that version carries, although its buffer holds the newest format; the log then
/// holds only batches the older build reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_protocol_collector_gets_batches_in_its_format() {
    use tributary_protocol::batch::{batch_format_version, format_version_for_protocol};
    use tributary_protocol::session::PROTOCOL_VERSION;
    for offered in 1..PROTOCOL_VERSION {
        let state = temp_dir();
        let config = tributary_collector::ingest::IngestConfig {
            max_protocol_version: Some(offered),
            ..ingest_config(loopback_any_port())
        };
        let collector =
            start_collector_with(state.path(), config, tokens_for(&["gw-1".to_owned()]));
        let buffer_dir = temp_dir();
        let buffer = open_buffer(buffer_dir.path());
        let seqs = fill_buffer(&buffer, "gw-1", 6, 8, 100);
        ship_all(
            ship_config("gw-1", collector.address, &collector.fingerprint),
            &buffer,
        )
        .await;

        let records = all_records(&collector.log);
        assert_eq!(
            records.len(),
            seqs.len(),
            "protocol {offered}: one record per batch"
        );
        for record in &records {
            assert_eq!(record.headers.protocol_version, offered);
            assert_eq!(
                batch_format_version(&record.value).unwrap(),
                format_version_for_protocol(offered),
                "protocol {offered}: the batch must be in the format that version carries"
            );
            assert_self_contained(record, 100);
        }
        collector.server.shutdown().await;
    }
}
