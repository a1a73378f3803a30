//! The thin layer over sled: one tree per batch class (so "oldest raw batch" is a
//! `pop_min` rather than a scan), a meta tree for the sequence reservation, and a
//! fault hook so tests can make the disk fail on demand.
//!
//! sled poisons a database after an IO error (every later operation returns the
//! same error), so the buffer never tries to limp on with a `Storage` that failed: it
//! drops it and later opens a fresh one. Nothing outside this module holds sled
//! handles across calls, which is what makes the reopen possible (sled locks the
//! directory while any handle is alive).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sled::IVec;

use super::config::{BufferConfig, FsyncPolicy};
use super::entry::{encode_key, BatchClass};

const RAW_TREE: &str = "batches_raw";
const SUMMARY_TREE: &str = "batches_summary";
const META_TREE: &str = "meta";
const SEQ_RESERVED_KEY: &str = "next_seq_reserved";

/// Makes the buffer's storage fail as a full disk would (`ENOSPC`), for testing the
/// memory-only fallback without filling a real disk. Shared by clones.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    fail_storage: Arc<AtomicBool>,
}

impl FaultInjector {
    /// While `true`, every write, flush and open of the storage fails.
    pub fn fail_storage(&self, fail: bool) {
        self.fail_storage.store(fail, Ordering::SeqCst);
    }

    pub(crate) fn check(&self, operation: &str) -> sled::Result<()> {
        if self.fail_storage.load(Ordering::SeqCst) {
            return Err(sled::Error::Io(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("injected storage fault while {operation}"),
            )));
        }
        Ok(())
    }
}

pub(crate) struct Storage {
    db: sled::Db,
    trees: [sled::Tree; 2],
    meta: sled::Tree,
    faults: FaultInjector,
}

impl Storage {
    pub fn open(config: &BufferConfig, faults: &FaultInjector) -> sled::Result<Storage> {
        faults.check("opening")?;
        let background_flush_ms = match config.fsync {
            FsyncPolicy::Os { interval_ms } => Some(interval_ms.max(1)),
            // The buffer flushes explicitly; a background flusher would only add fsyncs.
            FsyncPolicy::EveryBatch | FsyncPolicy::Group { .. } => None,
        };
        let db = crate::sled_open::open(
            &sled::Config::new()
                .path(&config.path)
                .cache_capacity(config.cache_capacity_bytes)
                .flush_every_ms(background_flush_ms),
        )?;
        let raw = db.open_tree(RAW_TREE)?;
        let summary = db.open_tree(SUMMARY_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        Ok(Storage {
            db,
            trees: [raw, summary],
            meta,
            faults: faults.clone(),
        })
    }

    pub fn tree(&self, class: BatchClass) -> &sled::Tree {
        &self.trees[class.index()]
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn insert(
        &self,
        class: BatchClass,
        batch_seq: u64,
        value: &[u8],
    ) -> sled::Result<Option<IVec>> {
        self.faults.check("inserting a batch")?;
        self.tree(class).insert(encode_key(batch_seq), value)
    }

    pub fn remove(&self, class: BatchClass, batch_seq: u64) -> sled::Result<Option<IVec>> {
        self.faults.check("removing a batch")?;
        self.tree(class).remove(encode_key(batch_seq))
    }

    pub fn pop_oldest(&self, class: BatchClass) -> sled::Result<Option<(IVec, IVec)>> {
        self.faults.check("dropping the oldest batch")?;
        self.tree(class).pop_min()
    }

    pub fn flush(&self) -> sled::Result<usize> {
        self.faults.check("flushing")?;
        self.db.flush()
    }

    pub fn faults(&self) -> &FaultInjector {
        &self.faults
    }

    pub fn seq_reserved(&self) -> sled::Result<u64> {
        let stored = self.meta.get(SEQ_RESERVED_KEY)?;
        Ok(stored
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Persists the reservation durably before any number below it is handed out.
    pub fn reserve_seq(&self, reserved_through: u64) -> sled::Result<()> {
        self.faults.check("reserving sequence numbers")?;
        self.meta
            .insert(SEQ_RESERVED_KEY, &reserved_through.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }
}
