//! Live data first: batches appended during a session go out at once while a capped
//! backlog drain is still far from done.

mod ship_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use ship_support::*;
use tributary_agent::buffer::{DiskBuffer, ReplayOrder};

fn is_buffered(buffer: &DiskBuffer, batch_seq: u64) -> bool {
    buffer
        .replay_range(
            ReplayOrder::OldestFirst,
            batch_seq.checked_sub(1),
            Some(batch_seq + 1),
        )
        .next()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_batches_overtake_a_capped_backlog() {
    let state = temp_dir();
    let collector = start_collector(
        state.path(),
        loopback_any_port(),
        tokens_for(&["gw-live".to_owned()]),
    );
    let buffer_dir = temp_dir();
    let buffer = open_buffer(buffer_dir.path());
    let backlog = fill_buffer(&buffer, "gw-live", 100, 4, 300);
    let mut config = ship_config("gw-live", collector.address, &collector.fingerprint);
    // About one backlog batch every few hundred ms: the drain takes far longer than
    // the test waits for the live batches.
    config.backlog_max_bytes_per_second = Some(4_000);
    let (handle, task) = spawn_shipper(config, buffer.clone());
    let stats = handle.stats().clone();
    wait_for(
        "the session to start draining",
        Duration::from_secs(30),
        || stats.batches_acked.load(Ordering::Relaxed) >= 1,
    )
    .await;

    let live = fill_buffer(&buffer, "gw-live", 3, 4, 300);
    handle.wake();
    wait_for("the live batches acked", Duration::from_secs(30), || {
        live.iter().all(|seq| !is_buffered(&buffer, *seq))
    })
    .await;
    let backlog_left = backlog
        .iter()
        .filter(|seq| is_buffered(&buffer, **seq))
        .count();
    assert!(
        backlog_left > 50,
        "live data waited for the backlog: only {backlog_left} backlog batches left"
    );
    // The backlog drains oldest first: past the oldest batch still buffered, at most
    // the in-flight window can have been acked out of order.
    let first_left = backlog
        .iter()
        .position(|seq| is_buffered(&buffer, *seq))
        .unwrap();
    let acked_beyond = backlog[first_left..]
        .iter()
        .filter(|seq| !is_buffered(&buffer, **seq))
        .count();
    assert!(
        acked_beyond <= 8,
        "{acked_beyond} backlog batches acked beyond the oldest still buffered"
    );
    handle.stop();
    task.await.unwrap().unwrap();
    collector.server.shutdown().await;
}
