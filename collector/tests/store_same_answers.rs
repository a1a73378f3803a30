//! The "same answers whether ClickHouse or embedded" proof: one generated write sequence
//! (retried raw batches, replayed late rows, window versions out of order and repeated,
//! last-seen times going backwards, checkpoints between flushes) goes into the embedded
//! store and into the real ClickHouse server from `deploy/dev/services.sh up` (18.16, the
//! legacy dialect), and every query of [`Queries`] answers identically, rows and order.
//! Also the checkpoint contract on both stores.

mod store_support;

use tributary_collector::store::{
    Checkpoint, ClickHouseStore, EmbeddedStore, EmbeddedStoreConfig, Queries, Store,
};
use tributary_tests::services::{drop_clickhouse_database, service_env, CLICKHOUSE_URL};

use store_support::{answers, apply, clickhouse_config, generate, RESOLUTIONS_MS, T0};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_and_clickhouse_give_the_same_answers() {
    let Some(url) = service_env(CLICKHOUSE_URL) else {
        return;
    };
    let ops = generate(0x5eed_0005);
    let directory = tempfile::tempdir().expect("tempdir");
    let mut embedded = EmbeddedStore::open(EmbeddedStoreConfig::new(
        directory.path().join("store"),
        RESOLUTIONS_MS.to_vec(),
    ))
    .expect("open the embedded store");
    let config = clickhouse_config(&url, "same_answers");
    let database = config.schema.database.clone();
    let mut clickhouse = ClickHouseStore::connect(config, T0)
        .await
        .expect("connect to ClickHouse");

    apply(&mut embedded, &ops).await;
    apply(&mut clickhouse, &ops).await;

    let from_embedded = answers(&Queries::from(embedded.reader())).await;
    let from_clickhouse = answers(&Queries::from(clickhouse.reader())).await;

    // The comparison must be about something: every kind of answer is populated.
    assert_eq!(
        from_embedded.devices.len(),
        4,
        "{:?}",
        from_embedded.devices
    );
    assert_eq!(from_embedded.series.len(), 5);
    assert_eq!(from_embedded.latest_all.len(), 5);
    assert_eq!(
        from_embedded.latest_some.len(),
        2,
        "d4 and d1's temperature"
    );
    assert!(from_embedded.unknown_resolution_refused);
    let first_rollups = &from_embedded.rollups[0].2;
    assert!(first_rollups.len() >= 30, "{}", first_rollups.len());
    assert!(
        first_rollups
            .iter()
            .all(|row| row.is_final == 1 && row.version & (1 << 63) != 0),
        "every window ends at its final version"
    );
    assert!(from_embedded.raw[0].1.len() >= 40);
    assert!(!from_embedded.late[0].2.is_empty());

    // Field by field first, for a readable failure, then everything.
    assert_eq!(from_embedded.devices, from_clickhouse.devices);
    assert_eq!(from_embedded.series, from_clickhouse.series);
    assert_eq!(from_embedded.latest_all, from_clickhouse.latest_all);
    assert_eq!(from_embedded.latest_some, from_clickhouse.latest_some);
    for (embedded_rollups, clickhouse_rollups) in
        from_embedded.rollups.iter().zip(&from_clickhouse.rollups)
    {
        assert_eq!(embedded_rollups, clickhouse_rollups);
    }
    for (embedded_raw, clickhouse_raw) in from_embedded.raw.iter().zip(&from_clickhouse.raw) {
        assert_eq!(embedded_raw, clickhouse_raw);
    }
    assert_eq!(from_embedded.late, from_clickhouse.late);
    assert_eq!(from_embedded, from_clickhouse);

    // Both hold the last checkpoint of each partition written by the sequence.
    for partition in 0..2 {
        let expected = ops.iter().rev().find_map(|op| match op {
            store_support::Op::Checkpoint(checkpoint) if checkpoint.partition == partition => {
                Some(checkpoint.clone())
            }
            _ => None,
        });
        assert_eq!(
            embedded
                .load_checkpoint("processor", partition)
                .await
                .expect("embedded checkpoint"),
            expected
        );
        assert_eq!(
            clickhouse
                .load_checkpoint("processor", partition)
                .await
                .expect("ClickHouse checkpoint"),
            expected
        );
    }

    drop_clickhouse_database(&url, &database).await;
}

/// The checkpoint contract, the same on both stores: nothing before a flush, the latest
/// after it (even when a replay moved the offset backwards), per group and partition,
/// binary state of a few MB intact.
async fn checkpoint_round_trip<S: Store>(store: &mut S) {
    let state: Vec<u8> = (0..3 * 1024 * 1024_u32)
        .map(|index| (index.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let first = Checkpoint {
        group: "processor".into(),
        partition: 3,
        next_offset: 1_000,
        engine_state: state.clone(),
    };
    store.write_checkpoint(first.clone());
    assert_eq!(store.buffered_rows(), 1);
    assert!(store.flush_due(T0), "a lone checkpoint is due at once");
    assert_eq!(
        store.load_checkpoint("processor", 3).await.expect("load"),
        None,
        "not durable before the flush"
    );
    store.flush().await.expect("flush");
    assert_eq!(
        store.load_checkpoint("processor", 3).await.expect("load"),
        Some(first.clone())
    );

    // Two in one flush: the later wins. Then a replay moves the offset back: still the latest.
    let mut second = first.clone();
    second.next_offset = 2_000;
    second.engine_state = b"second".to_vec();
    let mut replayed = first.clone();
    replayed.next_offset = 10;
    replayed.engine_state = Vec::new();
    store.write_checkpoint(second.clone());
    store.write_checkpoint(Checkpoint {
        group: "other-group".into(),
        ..first.clone()
    });
    store.flush().await.expect("flush");
    assert_eq!(
        store.load_checkpoint("processor", 3).await.expect("load"),
        Some(second)
    );
    store.write_checkpoint(replayed.clone());
    store.flush().await.expect("flush");
    assert_eq!(
        store.load_checkpoint("processor", 3).await.expect("load"),
        Some(replayed),
        "the latest write wins, not the highest offset"
    );
    assert_eq!(
        store
            .load_checkpoint("other-group", 3)
            .await
            .expect("load")
            .map(|checkpoint| checkpoint.engine_state == state),
        Some(true)
    );
    assert_eq!(
        store.load_checkpoint("processor", 4).await.expect("load"),
        None
    );
    assert_eq!(
        store.load_checkpoint("processo", 3).await.expect("load"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_round_trip_on_clickhouse() {
    let Some(url) = service_env(CLICKHOUSE_URL) else {
        return;
    };
    let config = clickhouse_config(&url, "checkpoints");
    let database = config.schema.database.clone();
    let mut store = ClickHouseStore::connect(config.clone(), T0)
        .await
        .expect("connect");
    checkpoint_round_trip(&mut store).await;
    // A restarted store keeps counting versions upwards: its first checkpoint wins.
    drop(store);
    let mut restarted = ClickHouseStore::connect(config, T0)
        .await
        .expect("reconnect");
    let after_restart = Checkpoint {
        group: "processor".into(),
        partition: 3,
        next_offset: 5,
        engine_state: b"after restart".to_vec(),
    };
    restarted.write_checkpoint(after_restart.clone());
    restarted.flush().await.expect("flush");
    assert_eq!(
        restarted
            .load_checkpoint("processor", 3)
            .await
            .expect("load"),
        Some(after_restart)
    );
    drop_clickhouse_database(&url, &database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_round_trip_on_the_embedded_store() {
    let directory = tempfile::tempdir().expect("tempdir");
    let config = EmbeddedStoreConfig::new(directory.path().join("store"), vec![60_000]);
    let mut store = EmbeddedStore::open(config.clone()).expect("open");
    checkpoint_round_trip(&mut store).await;
    drop(store);
    let reopened = EmbeddedStore::open(config).expect("reopen");
    assert_eq!(
        reopened
            .load_checkpoint("processor", 3)
            .await
            .expect("load")
            .map(|checkpoint| checkpoint.next_offset),
        Some(10)
    );
}
