//! The shipper through collector restarts, address changes, and beside many others.

mod ship_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ship_support::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// Restarts ingest on the same address; the old socket may take a moment to be released.
async fn restart_on(state: &std::path::Path, address: SocketAddr, agents: &[String]) -> Collector {
    let started = tokio::time::Instant::now();
    loop {
        match try_start_collector(state, ingest_config(address), tokens_for(agents)) {
            Ok(collector) => return collector,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => panic!("cannot restart the collector on {address}: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_crash_mid_stream_loses_nothing_and_duplicates_collapse_by_sequence() {
    let state = temp_dir();
    let agents = vec!["gw-crash".to_owned()];
    let collector = start_collector(state.path(), loopback_any_port(), tokens_for(&agents));
    let address = collector.address;
    let buffer_dir = temp_dir();
    let buffer = open_buffer(buffer_dir.path());
    let seqs = fill_buffer(&buffer, "gw-crash", 120, 8, 400);
    let mut config = ship_config("gw-crash", address, &collector.fingerprint);
    // Slow the drain so the crash lands in the middle of it.
    config.backlog_max_bytes_per_second = Some(60_000);
    let (handle, task) = spawn_shipper(config, buffer.clone());
    let stats = handle.stats().clone();
    wait_for("some batches acked", DEADLINE, || {
        stats.batches_acked.load(Ordering::Relaxed) >= 10
    })
    .await;
    assert!(
        buffered(&buffer) > 0,
        "the crash must come before the drain ends"
    );

    let Collector { server, log, .. } = collector;
    server.kill().await;
    drop(log);
    let collector = restart_on(state.path(), address, &agents).await;

    wait_for("every batch acked after the restart", DEADLINE, || {
        buffered(&buffer) == 0
    })
    .await;
    assert!(
        stats.reconnects.load(Ordering::Relaxed) >= 1,
        "the agent reconnected"
    );
    handle.stop();
    task.await.unwrap().unwrap();

    let records = all_records(&collector.log);
    let by_key = records_by_key(&records);
    let logged: BTreeSet<u64> = by_key.keys().map(|(_, seq)| *seq).collect();
    assert_eq!(
        logged,
        seqs.iter().copied().collect::<BTreeSet<u64>>(),
        "every batch is in the log"
    );
    // Written twice only if the crash came between the durable write and the ack:
    // at most the batches in flight at that moment.
    let written_twice = by_key.values().filter(|count| **count > 1).count();
    assert!(written_twice <= 8, "{written_twice} batches written twice");
    assert!(by_key.values().all(|count| *count <= 2));
    collector.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_survives_a_change_of_the_agents_address() {
    let state = temp_dir();
    let collector = start_collector(
        state.path(),
        loopback_any_port(),
        tokens_for(&["gw-mobile".to_owned()]),
    );
    let buffer_dir = temp_dir();
    let buffer = open_buffer(buffer_dir.path());
    fill_buffer(&buffer, "gw-mobile", 60, 4, 300);
    let mut config = ship_config("gw-mobile", collector.address, &collector.fingerprint);
    config.backlog_max_bytes_per_second = Some(40_000);
    let (handle, task) = spawn_shipper(config, buffer.clone());
    let stats = handle.stats().clone();
    wait_for("some batches acked", DEADLINE, || {
        stats.batches_acked.load(Ordering::Relaxed) >= 5
    })
    .await;
    assert!(buffered(&buffer) > 0, "the move must come mid-stream");
    let old_address = handle.local_address().unwrap();

    // Cellular handover: the gateway's UDP socket changes under the session.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let new_address = socket.local_addr().unwrap();
    handle.rebind(socket).unwrap();
    // Live data produced after the move goes over the migrated session too.
    fill_buffer(&buffer, "gw-mobile", 5, 4, 300);
    handle.wake();

    wait_for("every batch acked", DEADLINE, || buffered(&buffer) == 0).await;
    assert_eq!(stats.sessions.load(Ordering::Relaxed), 1, "no new session");
    assert_eq!(stats.reconnects.load(Ordering::Relaxed), 0, "no reconnect");
    assert_eq!(stats.batches_acked.load(Ordering::Relaxed), 65);
    assert_ne!(old_address.port(), new_address.port());
    let agent = collector.fleet.agent("gw-mobile").unwrap();
    assert_eq!(
        agent.remote_address, new_address,
        "the collector sees the new address"
    );
    assert_eq!(all_records(&collector.log).len(), 65);
    handle.stop();
    task.await.unwrap().unwrap();
    collector.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_at_once() {
    let state = temp_dir();
    let agents: Vec<String> = (0..50).map(|index| format!("gw-{index:03}")).collect();
    let collector = start_collector(state.path(), loopback_any_port(), tokens_for(&agents));
    let mut buffer_dirs = Vec::new();
    let mut buffers = Vec::new();
    let mut handles = Vec::new();
    for agent in &agents {
        let directory = temp_dir();
        let buffer = open_buffer(directory.path());
        fill_buffer(&buffer, agent, 6, 4, 200);
        let (handle, task) = spawn_shipper(
            ship_config(agent, collector.address, &collector.fingerprint),
            buffer.clone(),
        );
        buffer_dirs.push(directory);
        buffers.push(buffer);
        handles.push((handle, task));
    }
    wait_for("every agent's buffer drained", DEADLINE, || {
        buffers.iter().all(|buffer| buffered(buffer) == 0)
    })
    .await;
    assert_eq!(collector.fleet.connected_count(), 50);
    for (handle, task) in handles {
        handle.stop();
        task.await.unwrap().unwrap();
    }
    let by_key = records_by_key(&all_records(&collector.log));
    assert_eq!(by_key.len(), 50 * 6);
    assert!(
        by_key.values().all(|count| *count == 1),
        "no batch written twice without a crash"
    );
    collector.server.shutdown().await;
}
