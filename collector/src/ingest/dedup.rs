//! Recognising resent batches: per-agent sequence windows, persisted.
//!
//! Why: an agent resends a batch whenever it did not see the ack (link dropped,
//! collector restarted between the durable write and the ack). Writing it again is
//! harmless for correctness (the processor deduplicates exactly on (agent, seq)) but
//! wastes log space and processor work, so ingest recognises the common case cheaply.
//!
//! A [`SequenceWindow`] is plain bookkeeping: every sequence below `next_expected` was
//! acked, and a bounded set remembers acked sequences above it (batches arrive out of
//! order: several are in flight, live data goes out before the backlog). The agent may
//! leave permanent gaps (its buffer drops the oldest batches when full, and skips the
//! rest of a reserved sequence block after a restart), so `next_expected` can stall;
//! the set then keeps only the newest `max_tracked` sequences. Forgetting is always
//! safe: a forgotten sequence is written again and deduplicated downstream. Claiming a
//! sequence is a duplicate when it is not would lose data, so the window never guesses.
//!
//! [`DedupStore`] persists windows in a sled tree next to the log. A window is saved
//! only after the batch's log write was durable, and sled flushes in the background:
//! after a crash the persisted window may miss the latest acks (those batches are
//! written again if resent), but it never holds a sequence that is not in the log.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Acked sequence numbers of one agent, as far as ingest remembers them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceWindow {
    /// Every sequence below this was acked.
    next_expected: u64,
    /// Acked sequences at or above `next_expected`.
    above: BTreeSet<u64>,
    #[serde(skip, default = "default_max_tracked")]
    max_tracked: usize,
}

fn default_max_tracked() -> usize {
    4096
}

impl Default for SequenceWindow {
    fn default() -> Self {
        SequenceWindow::new(default_max_tracked())
    }
}

impl SequenceWindow {
    /// An empty window remembering at most `max_tracked` sequences above the
    /// contiguous prefix.
    pub fn new(max_tracked: usize) -> Self {
        SequenceWindow {
            next_expected: 0,
            above: BTreeSet::new(),
            max_tracked: max_tracked.max(1),
        }
    }

    /// Whether `batch_seq` is known to have been acked already.
    pub fn is_duplicate(&self, batch_seq: u64) -> bool {
        batch_seq < self.next_expected || self.above.contains(&batch_seq)
    }

    /// Records that `batch_seq` is durable and acked.
    pub fn record_acked(&mut self, batch_seq: u64) {
        if batch_seq < self.next_expected {
            return;
        }
        self.above.insert(batch_seq);
        while self.above.remove(&self.next_expected) {
            self.next_expected += 1;
        }
        while self.above.len() > self.max_tracked {
            self.above.pop_first();
        }
    }

    /// Every sequence below this was acked.
    pub fn next_expected(&self) -> u64 {
        self.next_expected
    }

    /// Sequences remembered above the contiguous prefix.
    pub fn tracked_above(&self) -> usize {
        self.above.len()
    }

    fn with_max_tracked(mut self, max_tracked: usize) -> Self {
        self.max_tracked = max_tracked.max(1);
        while self.above.len() > self.max_tracked {
            self.above.pop_first();
        }
        self
    }
}

#[derive(Debug, Error)]
pub enum DedupError {
    #[error("cannot open the duplicate-detection state at {path}: {source}; check the state directory (permissions, space) or delete that directory to forget which batches were acked (resent batches are then written again and deduplicated downstream)")]
    Open { path: PathBuf, source: sled::Error },
    #[error("cannot persist the acked sequences of agent {agent_id}: {source}")]
    Write {
        agent_id: String,
        source: sled::Error,
    },
}

/// Sequence windows of all agents, persisted in a sled database.
#[derive(Clone)]
pub struct DedupStore {
    tree: sled::Db,
    max_tracked: usize,
}

impl std::fmt::Debug for DedupStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DedupStore")
            .field("max_tracked", &self.max_tracked)
            .finish_non_exhaustive()
    }
}

impl DedupStore {
    /// Opens (or creates) the store in `directory`.
    pub fn open(directory: &Path, max_tracked: usize) -> Result<Self, DedupError> {
        let config = sled::Config::new()
            .path(directory)
            .cache_capacity(8 * 1024 * 1024)
            .flush_every_ms(Some(200));
        let tree = crate::sled_open::open(&config).map_err(|source| DedupError::Open {
            path: directory.to_path_buf(),
            source,
        })?;
        Ok(DedupStore { tree, max_tracked })
    }

    /// The persisted window of `agent_id`, or an empty one. A damaged entry is
    /// treated as empty (safe: it only costs rewrites of resent batches).
    pub fn load(&self, agent_id: &str) -> SequenceWindow {
        let stored = match self.tree.get(agent_id.as_bytes()) {
            Ok(Some(bytes)) => postcard::from_bytes::<SequenceWindow>(&bytes).ok(),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(agent_id, %error, "cannot read the acked sequences; starting with an empty window");
                None
            }
        };
        stored
            .unwrap_or_default()
            .with_max_tracked(self.max_tracked)
    }

    /// Persists `window` for `agent_id` (flushed in the background).
    pub fn save(&self, agent_id: &str, window: &SequenceWindow) -> Result<(), DedupError> {
        let bytes = postcard::to_stdvec(window).unwrap_or_default();
        self.tree
            .insert(agent_id.as_bytes(), bytes)
            .map(|_| ())
            .map_err(|source| DedupError::Write {
                agent_id: agent_id.to_owned(),
                source,
            })
    }

    /// Flushes everything saved so far (on shutdown).
    pub fn flush(&self) -> Result<(), DedupError> {
        self.tree
            .flush()
            .map(|_| ())
            .map_err(|source| DedupError::Write {
                agent_id: "*".to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_acks_close_the_prefix() {
        let mut window = SequenceWindow::new(16);
        window.record_acked(2);
        window.record_acked(0);
        assert_eq!(window.next_expected(), 1);
        assert!(window.is_duplicate(0) && window.is_duplicate(2));
        assert!(!window.is_duplicate(1) && !window.is_duplicate(3));
        window.record_acked(1);
        assert_eq!(window.next_expected(), 3);
        assert_eq!(window.tracked_above(), 0);
    }

    #[test]
    fn a_permanent_gap_keeps_only_the_newest_sequences_and_never_invents_acks() {
        let mut window = SequenceWindow::new(4);
        for seq in 10..20 {
            window.record_acked(seq);
        }
        assert_eq!(window.next_expected(), 0);
        assert_eq!(window.tracked_above(), 4);
        assert!(window.is_duplicate(19) && window.is_duplicate(16));
        assert!(
            !window.is_duplicate(15),
            "forgotten: written again, never claimed"
        );
        assert!(!window.is_duplicate(3));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn never_claims_an_unacked_sequence(acks in proptest::collection::vec(0u64..200, 0..300), probe in 0u64..220) {
            let mut window = SequenceWindow::new(32);
            for seq in &acks {
                window.record_acked(*seq);
            }
            if window.is_duplicate(probe) {
                prop_assert!(acks.contains(&probe));
            }
            if let Some(highest) = acks.iter().max() {
                prop_assert!(window.is_duplicate(*highest), "the highest ack is always remembered");
            }
        }
    }

    #[test]
    fn windows_survive_reopening() {
        let directory = tempfile::tempdir().unwrap();
        {
            let store = DedupStore::open(directory.path(), 64).unwrap();
            let mut window = store.load("gw-1");
            window.record_acked(0);
            window.record_acked(5);
            store.save("gw-1", &window).unwrap();
            store.flush().unwrap();
        }
        let store = DedupStore::open(directory.path(), 64).unwrap();
        let window = store.load("gw-1");
        assert!(window.is_duplicate(0) && window.is_duplicate(5) && !window.is_duplicate(1));
        assert_eq!(store.load("gw-2"), SequenceWindow::new(64));
    }
}
