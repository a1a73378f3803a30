//! The series registry: stable, compact [`SeriesId`]s for series keys, persisted.
//!
//! Batches name series by id and carry the key beside it; the collector learns the mapping
//! per session and refuses an id redefined to another key. So an id, once used in a batch
//! that may still be buffered, must never be given to another key, across restarts too.
//! The registry therefore writes every new assignment to a sled tree, and the run loop
//! flushes that tree *before* it flushes the buffer that holds batches using the new id.
//! Ids are dense (0, 1, 2, ...), assigned in first-seen order.

use std::collections::HashMap;

use thiserror::Error;
use tributary_protocol::model::{SeriesDef, SeriesId, SeriesKey};

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("series registry storage failed while {operation}: {source}; check the disk holding the agent state (buffer.path + \".state\")")]
    Storage {
        operation: &'static str,
        source: sled::Error,
    },
    #[error("series registry entry for id {id} cannot be decoded ({reason}); the state directory is damaged: move it aside to start with fresh series ids")]
    Corrupt { id: String, reason: String },
    #[error(
        "all {limit} series ids are used; the agent sees more distinct series than it can number"
    )]
    Exhausted { limit: u64 },
}

/// Series keys and their ids, optionally backed by a sled tree.
#[derive(Debug, Default)]
pub struct SeriesRegistry {
    ids: HashMap<SeriesKey, SeriesId>,
    keys: Vec<SeriesKey>,
    tree: Option<sled::Tree>,
}

impl SeriesRegistry {
    /// A registry that forgets everything on restart (tests, benchmarks).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads the assignments stored in `tree` and persists new ones there.
    pub fn open(tree: sled::Tree) -> Result<Self, RegistryError> {
        let mut registry = Self {
            tree: None,
            ..Self::default()
        };
        for entry in tree.iter() {
            let (key, value) = entry.map_err(|source| RegistryError::Storage {
                operation: "loading",
                source,
            })?;
            let id_bytes: [u8; 4] =
                key.as_ref()
                    .try_into()
                    .map_err(|_| RegistryError::Corrupt {
                        id: format!("{:?}", key.as_ref()),
                        reason: format!("key is {} bytes, expected 4", key.len()),
                    })?;
            let id = SeriesId::from_be_bytes(id_bytes);
            let series_key: SeriesKey =
                serde_json::from_slice(&value).map_err(|error| RegistryError::Corrupt {
                    id: id.to_string(),
                    reason: error.to_string(),
                })?;
            if id as usize != registry.keys.len() {
                return Err(RegistryError::Corrupt {
                    id: id.to_string(),
                    reason: format!("ids are not dense: expected {}", registry.keys.len()),
                });
            }
            registry.ids.insert(series_key.clone(), id);
            registry.keys.push(series_key);
        }
        registry.tree = Some(tree);
        Ok(registry)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The id of `key`, assigning (and persisting, unflushed) the next one if it is new.
    pub fn intern(&mut self, key: &SeriesKey) -> Result<SeriesId, RegistryError> {
        if let Some(id) = self.ids.get(key) {
            return Ok(*id);
        }
        let id = SeriesId::try_from(self.keys.len()).map_err(|_| RegistryError::Exhausted {
            limit: u64::from(SeriesId::MAX),
        })?;
        if let Some(tree) = &self.tree {
            let value = serde_json::to_vec(key).map_err(|error| RegistryError::Corrupt {
                id: id.to_string(),
                reason: error.to_string(),
            })?;
            tree.insert(id.to_be_bytes(), value)
                .map_err(|source| RegistryError::Storage {
                    operation: "adding a series",
                    source,
                })?;
        }
        self.ids.insert(key.clone(), id);
        self.keys.push(key.clone());
        Ok(id)
    }

    pub fn key(&self, id: SeriesId) -> Option<&SeriesKey> {
        self.keys.get(id as usize)
    }

    /// Definitions for `ids` (unknown ids are skipped).
    pub fn definitions(&self, ids: &[SeriesId]) -> Vec<SeriesDef> {
        ids.iter()
            .filter_map(|id| {
                self.key(*id).map(|key| SeriesDef {
                    id: *id,
                    key: key.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_reopen() {
        let directory = tempfile::tempdir().expect("tempdir");
        let first = SeriesKey::new("dev-1", "temp");
        let second = SeriesKey::new("dev-2", "temp").with_tags([("site", "b")]);
        {
            let db = sled::open(directory.path()).expect("open");
            let mut registry =
                SeriesRegistry::open(db.open_tree("series").expect("tree")).expect("registry");
            assert_eq!(registry.intern(&first).expect("intern"), 0);
            assert_eq!(registry.intern(&second).expect("intern"), 1);
            assert_eq!(registry.intern(&first).expect("intern"), 0);
            db.flush().expect("flush");
        }
        let db = sled::open(directory.path()).expect("reopen");
        let mut registry =
            SeriesRegistry::open(db.open_tree("series").expect("tree")).expect("registry");
        assert_eq!(registry.len(), 2);
        assert_eq!(registry.intern(&second).expect("intern"), 1);
        assert_eq!(
            registry
                .intern(&SeriesKey::new("dev-3", "x"))
                .expect("intern"),
            2
        );
        assert_eq!(registry.key(0), Some(&first));
    }
}
