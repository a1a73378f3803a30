//! The series registry: stable, compact [`SeriesId`]s for series keys, persisted.
//!
//! Batches name series by id and carry the key beside it; the collector learns the mapping
//! per session and refuses an id redefined to another key. So an id, once used in a batch
//! that may still be buffered, must never be given to another key, across restarts too.
//! The registry therefore writes every new assignment to a sled tree, and the run loop
//! flushes that tree *before* it flushes the buffer that holds batches using the new id.
//! Ids are dense (0, 1, 2, ...), assigned in first-seen order.
//!
//! Every reading is looked up here, so the lookup is built for speed: the key is hashed
//! once with a fast seeded hash (foldhash: per-process random seed, so sensors cannot aim
//! collisions), the 64-bit hash finds the id, and the stored definition confirms the key.
//! Lookups take a borrowed [`SeriesKeyRef`] (the parsed message's text), so a reading of a
//! known series allocates nothing; an owned key is built only for a new series.
//! Each key is held once, in its [`SeriesDef`], which batches borrow while they are
//! encoded (see [`SeriesRegistry::take_definitions`]) instead of cloning 10k keys a second.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};

use thiserror::Error;
use tributary_protocol::model::{SeriesDef, SeriesId, SeriesKey};

use super::window::SeriesIdMap;
use crate::source::SeriesKeyRef;

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

/// A map keyed by a 64-bit hash that is already well mixed (passed through as is).
type HashToId = HashMap<u64, SeriesId, std::hash::BuildHasherDefault<PassThroughHasher>>;

#[derive(Debug, Default, Clone, Copy)]
struct PassThroughHasher(u64);

impl std::hash::Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// Read access to the persisted assignments from another task: the shipper attaches the
/// definitions a session still needs to batches the buffer holds without them.
///
/// Reads go to the sled tree the registry writes (a new assignment is visible at once, in
/// this process), so the shipper needs no lock on the pipeline's registry and holds no copy
/// of the keys.
#[derive(Debug, Clone)]
pub struct RegistryReader {
    tree: sled::Tree,
}

impl RegistryReader {
    /// The definition of `id`, or `None` if no key was ever assigned it.
    pub fn definition(&self, id: SeriesId) -> Result<Option<SeriesDef>, RegistryError> {
        let Some(value) =
            self.tree
                .get(id.to_be_bytes())
                .map_err(|source| RegistryError::Storage {
                    operation: "reading a series definition",
                    source,
                })?
        else {
            return Ok(None);
        };
        let key: SeriesKey =
            serde_json::from_slice(&value).map_err(|error| RegistryError::Corrupt {
                id: id.to_string(),
                reason: error.to_string(),
            })?;
        Ok(Some(SeriesDef { id, key }))
    }
}

/// Series keys and their ids, optionally backed by a sled tree.
#[derive(Debug, Default)]
pub struct SeriesRegistry {
    hasher: foldhash::fast::RandomState,
    /// Id of the first key registered with each hash.
    by_hash: HashToId,
    /// Keys whose hash an earlier, different key already has (astronomically rare).
    collided: HashMap<SeriesKey, SeriesId>,
    /// Definitions by id (ids are dense).
    definitions: Vec<SeriesDef>,
    /// Definitions lent out by `take_definitions`, by id, until they are restored.
    lent: SeriesIdMap<()>,
    tree: Option<sled::Tree>,
}

impl SeriesRegistry {
    /// A registry that forgets everything on restart (tests, benchmarks).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads the assignments stored in `tree` and persists new ones there.
    pub fn open(tree: sled::Tree) -> Result<Self, RegistryError> {
        let mut registry = Self::default();
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
            if id as usize != registry.definitions.len() {
                return Err(RegistryError::Corrupt {
                    id: id.to_string(),
                    reason: format!("ids are not dense: expected {}", registry.definitions.len()),
                });
            }
            registry.insert(series_key, id);
        }
        registry.tree = Some(tree);
        Ok(registry)
    }

    pub fn len(&self) -> usize {
        self.definitions.len()
    }

    /// A reader of the persisted assignments for other tasks; `None` for an in-memory
    /// registry (whose batches must then carry their definitions).
    pub fn reader(&self) -> Option<RegistryReader> {
        self.tree.clone().map(|tree| RegistryReader { tree })
    }

    /// Whether assignments are persisted (see [`SeriesRegistry::reader`]).
    pub fn is_persistent(&self) -> bool {
        self.tree.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.definitions.is_empty()
    }

    /// One hash for a key whether it is owned or borrowed: its strings in order (each
    /// ends in 0xff, a byte UTF-8 never holds, so the sequence is unambiguous).
    fn hash_key(&self, key: SeriesKeyRef<'_>) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        key.device_id.hash(&mut hasher);
        key.metric.hash(&mut hasher);
        for (name, value) in key.tags() {
            name.hash(&mut hasher);
            value.hash(&mut hasher);
        }
        hasher.finish()
    }

    fn lookup(&self, key: SeriesKeyRef<'_>, hash: u64) -> Option<SeriesId> {
        let id = *self.by_hash.get(&hash)?;
        match self.definitions.get(id as usize) {
            Some(definition) if key.matches(&definition.key) => Some(id),
            // A 64-bit hash shared with another key: astronomically rare, so the owned key
            // this lookup needs is no cost worth avoiding.
            _ => self.collided.get(&key.to_key()).copied(),
        }
    }

    fn insert(&mut self, key: SeriesKey, id: SeriesId) {
        let hash = self.hash_key(SeriesKeyRef::from(&key));
        match self.by_hash.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(key.clone(), id);
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(id);
            }
        }
        self.definitions.push(SeriesDef { id, key });
    }

    /// The id of `key`, assigning (and persisting, unflushed) the next one if it is new.
    pub fn intern(&mut self, key: &SeriesKey) -> Result<SeriesId, RegistryError> {
        self.intern_ref(SeriesKeyRef::from(key))
    }

    /// [`SeriesRegistry::intern`] for a borrowed key: allocates only for a new series.
    pub fn intern_ref(&mut self, key: SeriesKeyRef<'_>) -> Result<SeriesId, RegistryError> {
        debug_assert!(
            self.lent.is_empty(),
            "interning while definitions are lent out"
        );
        let hash = self.hash_key(key);
        if let Some(id) = self.lookup(key, hash) {
            return Ok(id);
        }
        let id =
            SeriesId::try_from(self.definitions.len()).map_err(|_| RegistryError::Exhausted {
                limit: u64::from(SeriesId::MAX),
            })?;
        let key = key.to_key();
        if let Some(tree) = &self.tree {
            let value = serde_json::to_vec(&key).map_err(|error| RegistryError::Corrupt {
                id: id.to_string(),
                reason: error.to_string(),
            })?;
            tree.insert(id.to_be_bytes(), value)
                .map_err(|source| RegistryError::Storage {
                    operation: "adding a series",
                    source,
                })?;
        }
        self.insert(key, id);
        Ok(id)
    }

    pub fn key(&self, id: SeriesId) -> Option<&SeriesKey> {
        self.definitions
            .get(id as usize)
            .map(|definition| &definition.key)
    }

    /// Definitions for `ids` (unknown ids are skipped), cloned.
    pub fn definitions(&self, ids: &[SeriesId]) -> Vec<SeriesDef> {
        ids.iter()
            .filter_map(|id| self.definitions.get(*id as usize).cloned())
            .collect()
    }

    /// Moves the definitions of `ids` out (unknown and repeated ids are skipped), for
    /// encoding a batch without cloning every key; hand them back with
    /// [`SeriesRegistry::restore_definitions`] before the next `intern`.
    pub(crate) fn take_definitions(&mut self, ids: &[SeriesId]) -> Vec<SeriesDef> {
        let mut taken = Vec::with_capacity(ids.len());
        for id in ids {
            if self.lent.contains_key(id) {
                continue;
            }
            if let Some(definition) = self.definitions.get_mut(*id as usize) {
                let key = std::mem::replace(&mut definition.key, SeriesKey::new("", ""));
                self.lent.insert(*id, ());
                taken.push(SeriesDef { id: *id, key });
            }
        }
        taken
    }

    /// Gives back definitions taken with [`SeriesRegistry::take_definitions`].
    pub(crate) fn restore_definitions(&mut self, definitions: Vec<SeriesDef>) {
        for definition in definitions {
            if self.lent.remove(&definition.id).is_some() {
                if let Some(slot) = self.definitions.get_mut(definition.id as usize) {
                    slot.key = definition.key;
                }
            }
        }
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

    #[test]
    fn borrowed_and_owned_keys_find_the_same_series() {
        use crate::source::{KeyPieces, ParsedReadings, ReadingSink};
        let mut registry = SeriesRegistry::in_memory();
        let owned = SeriesKey::new("dev-1", "env.temp").with_tags([("site", "a"), ("floor", "2")]);
        let mut parsed = ParsedReadings::new();
        parsed.push_reading(
            KeyPieces {
                device_id: "dev-1",
                metric_prefix: "env",
                metric_name: "temp",
                tag_groups: [&[("site", "a")], &[("floor", "2")]],
            },
            None,
            1.0,
        );
        parsed.push_reading(
            KeyPieces {
                device_id: "dev-1",
                metric_prefix: "env",
                metric_name: "temp",
                tag_groups: [&[("site", "b")], &[("floor", "2")]],
            },
            None,
            1.0,
        );
        let first = parsed.get(0).expect("first").key;
        let second = parsed.get(1).expect("second").key;
        assert_eq!(registry.intern_ref(first).expect("intern"), 0);
        assert_eq!(registry.intern(&owned).expect("intern"), 0);
        assert_eq!(registry.intern_ref(second).expect("intern"), 1);
        assert_eq!(registry.intern_ref(first).expect("intern"), 0);
        assert_eq!(registry.key(0), Some(&owned));
        assert_eq!(registry.len(), 2);
    }

    #[test]
    fn lent_definitions_come_back_and_ids_stay() {
        let mut registry = SeriesRegistry::in_memory();
        let keys: Vec<SeriesKey> = (0..5)
            .map(|index| SeriesKey::new(format!("dev-{index}"), "temp").with_tags([("site", "a")]))
            .collect();
        for (index, key) in keys.iter().enumerate() {
            assert_eq!(registry.intern(key).expect("intern"), index as SeriesId);
        }
        let lent = registry.take_definitions(&[3, 1, 3, 99]);
        assert_eq!(
            lent.iter()
                .map(|definition| definition.id)
                .collect::<Vec<_>>(),
            vec![3, 1],
            "repeated and unknown ids are skipped"
        );
        assert_eq!(lent[0].key, keys[3]);
        registry.restore_definitions(lent);
        assert_eq!(registry.definitions(&[1, 3]).len(), 2);
        for (index, key) in keys.iter().enumerate() {
            assert_eq!(registry.key(index as SeriesId), Some(key));
            assert_eq!(registry.intern(key).expect("intern"), index as SeriesId);
        }
        assert_eq!(registry.len(), 5);
    }
}
