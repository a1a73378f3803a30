//! The series registry: stable, compact [`SeriesId`]s for series keys, persisted.
//!
//! Batches name series by id and carry the key beside it; the collector learns the mapping
//! per session and refuses an id redefined to another key. So an id, once used in a batch
//! that may still be buffered, must never be given to another key, across restarts too.
//! The registry therefore writes every new assignment to a sled tree before any batch or
//! journal block that uses it: [`SeriesRegistry::write_pending`] runs at the start of each
//! commit, before the journal block and the state flush, and the run loop flushes the state
//! *before* it flushes the buffer that holds batches using the new ids. Ids are dense
//! (0, 1, 2, ...), assigned in first-seen order.
//!
//! Every reading is looked up here, so the lookup is built for speed: the key is hashed
//! once with a fast seeded hash (foldhash: per-process random seed, so sensors cannot aim
//! collisions), the 64-bit hash finds the id, and the stored key confirms it. Lookups take
//! a borrowed [`SeriesKeyRef`] (the parsed message's text), so a reading of a known series
//! allocates nothing.
//!
//! Memory is the other constraint (a gateway holds 10k series in a few MiB): each key is
//! held once, *packed* in one allocation (its strings, each after its length), about 60
//! bytes per series where an owned [`SeriesKey`] took five allocations and ~250 bytes. An
//! owned key is built only when a batch must carry definitions (the state could not be
//! flushed) or for a reader.
//!
//! # On disk (the `series` tree of the agent state)
//!
//! New ids are stored in *blocks* of [`BLOCK_SERIES`] consecutive ids, one tree entry per
//! block (key `b'B'` + block number, big endian; value: the block's first id, then each
//! packed key after its length), rewritten whole as the block fills, like the acknowledgement
//! journal. One sled insert and JSON per series was ~17,500 instructions and a tree entry each.
//! Registries written by builds before this one hold one entry per id (4-byte big-endian id
//! -> JSON key); they still open, and their ids stay where they are (blocks continue after
//! them). A build older than this one refuses a state holding blocks ("key is 5 bytes"), so a
//! rollback must move the state and buffer directories aside (`docs/agent-buffer.md`).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

use thiserror::Error;
use tributary_protocol::batch::varint;
use tributary_protocol::model::{SeriesDef, SeriesId, SeriesKey};

use crate::source::SeriesKeyRef;

/// Ids per stored block.
pub const BLOCK_SERIES: usize = 256;
/// First byte of a block's tree key (legacy single-id keys are 4 bytes long).
const BLOCK_KEY_PREFIX: u8 = b'B';

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

/// Appends `length` as LEB128 (one byte below 128, which every usual key field is).
fn put_length(bytes: &mut Vec<u8>, length: usize) {
    varint::write_u64(bytes, length as u64);
}

/// Reads LEB128 lengths and the byte strings they announce; `None` at any malformation.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn length(&mut self) -> Option<usize> {
        let mut value = 0usize;
        for (index, byte) in self.bytes.iter().enumerate().take(5) {
            value |= usize::from(byte & 0x7f) << (7 * index);
            if byte & 0x80 == 0 {
                self.bytes = self.bytes.get(index + 1..)?;
                return Some(value);
            }
        }
        None
    }

    fn text(&mut self) -> Option<&'a [u8]> {
        let length = self.length()?;
        let text = self.bytes.get(..length)?;
        self.bytes = self.bytes.get(length..)?;
        Some(text)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.text()?.to_vec()).ok()
    }
}

/// A series key in one allocation: device, metric, tag count, then each tag's name and
/// value, every string after its LEB128 length.
#[derive(Debug)]
struct PackedKey(Box<[u8]>);

impl PackedKey {
    fn pack(key: SeriesKeyRef<'_>) -> Self {
        let mut size = key.device_id.len() + key.metric.len() + 3;
        for (name, value) in key.tags() {
            size += name.len() + value.len() + 2;
        }
        let mut bytes = Vec::with_capacity(size);
        let mut put = |text: &str| {
            put_length(&mut bytes, text.len());
            bytes.extend_from_slice(text.as_bytes());
        };
        put(key.device_id);
        put(key.metric);
        let tags = key.tags();
        put_length(&mut bytes, tags.len());
        for (name, value) in tags {
            put_length(&mut bytes, name.len());
            bytes.extend_from_slice(name.as_bytes());
            put_length(&mut bytes, value.len());
            bytes.extend_from_slice(value.as_bytes());
        }
        Self(bytes.into_boxed_slice())
    }

    /// Whether `key` is this key (no allocation: the per-reading check).
    fn matches(&self, key: SeriesKeyRef<'_>) -> bool {
        let mut cursor = Cursor { bytes: &self.0 };
        let tags = key.tags();
        cursor.text() == Some(key.device_id.as_bytes())
            && cursor.text() == Some(key.metric.as_bytes())
            && cursor.length() == Some(tags.len())
            && tags.into_iter().all(|(name, value)| {
                cursor.text() == Some(name.as_bytes()) && cursor.text() == Some(value.as_bytes())
            })
    }

    /// The owned key; `None` if the bytes are not a packed key (only possible for bytes
    /// read from disk).
    fn to_key(&self) -> Option<SeriesKey> {
        let mut cursor = Cursor { bytes: &self.0 };
        let device_id = cursor.string()?;
        let metric = cursor.string()?;
        let tag_count = cursor.length()?;
        // Each tag takes at least two bytes: a hostile count cannot make us reserve much.
        let mut tags = Vec::with_capacity(tag_count.min(cursor.bytes.len() / 2));
        for _ in 0..tag_count {
            tags.push((cursor.string()?, cursor.string()?));
        }
        cursor.bytes.is_empty().then_some(SeriesKey {
            device_id,
            metric,
            tags,
        })
    }
}

fn block_key(block: usize) -> [u8; 5] {
    let number = u32::try_from(block).unwrap_or(u32::MAX).to_be_bytes();
    [BLOCK_KEY_PREFIX, number[0], number[1], number[2], number[3]]
}

/// A stored block's first id and a cursor over its packed keys, or why the value cannot be
/// a block.
fn open_block(value: &[u8]) -> Result<(SeriesId, Cursor<'_>), String> {
    let first_bytes: [u8; 4] = value
        .get(..4)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| format!("value is {} bytes, shorter than its first id", value.len()))?;
    let cursor = Cursor {
        bytes: value.get(4..).unwrap_or_default(),
    };
    Ok((SeriesId::from_be_bytes(first_bytes), cursor))
}

/// The ids and keys of one stored block, in order.
fn decode_block(
    block_key: &[u8],
    value: &[u8],
) -> Result<Vec<(SeriesId, SeriesKey)>, RegistryError> {
    let corrupt = |reason: String| RegistryError::Corrupt {
        id: format!("block {block_key:?}"),
        reason,
    };
    let (mut id, mut cursor) = open_block(value).map_err(corrupt)?;
    let mut entries = Vec::new();
    while !cursor.bytes.is_empty() {
        let packed = cursor
            .text()
            .ok_or_else(|| corrupt(format!("entry for id {id} is cut short")))?;
        let key = PackedKey(packed.into())
            .to_key()
            .ok_or_else(|| corrupt(format!("entry for id {id} is not a series key")))?;
        entries.push((id, key));
        id = id
            .checked_add(1)
            .ok_or_else(|| corrupt("ids run past the largest series id".to_string()))?;
    }
    Ok(entries)
}

/// The key of `id` in a stored block, decoding only that entry (the shipper looks ids up
/// one by one, up to every series of the fleet when a session starts).
fn find_in_block(
    block_key: &[u8],
    value: &[u8],
    id: SeriesId,
) -> Result<Option<SeriesKey>, RegistryError> {
    let corrupt = |reason: String| RegistryError::Corrupt {
        id: format!("{id} in block {block_key:?}"),
        reason,
    };
    let (first, mut cursor) = open_block(value).map_err(corrupt)?;
    let Some(position) = id.checked_sub(first) else {
        return Ok(None);
    };
    for _ in 0..position {
        if cursor.bytes.is_empty() {
            return Ok(None);
        }
        cursor
            .text()
            .ok_or_else(|| corrupt("an earlier entry is cut short".to_string()))?;
    }
    if cursor.bytes.is_empty() {
        return Ok(None);
    }
    let packed = cursor
        .text()
        .ok_or_else(|| corrupt("the entry is cut short".to_string()))?;
    PackedKey(packed.into())
        .to_key()
        .map(Some)
        .ok_or_else(|| corrupt("the entry is not a series key".to_string()))
}

fn decode_legacy(key: &[u8], value: &[u8]) -> Result<(SeriesId, SeriesKey), RegistryError> {
    let id_bytes: [u8; 4] = key.try_into().map_err(|_| RegistryError::Corrupt {
        id: format!("{key:?}"),
        reason: format!(
            "key is {} bytes, expected 4 (one id) or 5 (a block)",
            key.len()
        ),
    })?;
    let id = SeriesId::from_be_bytes(id_bytes);
    let series_key: SeriesKey =
        serde_json::from_slice(value).map_err(|error| RegistryError::Corrupt {
            id: id.to_string(),
            reason: error.to_string(),
        })?;
    Ok((id, series_key))
}

/// Read access to the persisted assignments from another task: the shipper attaches the
/// definitions a session still needs to batches the buffer holds without them.
///
/// Reads go to the sled tree the registry writes (an assignment is visible once
/// [`SeriesRegistry::write_pending`] stored it, which every commit does before it appends
/// batches), so the shipper needs no lock on the pipeline's registry and holds no copy of
/// the keys.
#[derive(Debug, Clone)]
pub struct RegistryReader {
    tree: sled::Tree,
}

impl RegistryReader {
    /// The definition of `id`, or `None` if no key was ever assigned it.
    pub fn definition(&self, id: SeriesId) -> Result<Option<SeriesDef>, RegistryError> {
        let storage = |source| RegistryError::Storage {
            operation: "reading a series definition",
            source,
        };
        let key = block_key(id as usize / BLOCK_SERIES);
        if let Some(value) = self.tree.get(key).map_err(storage)? {
            if let Some(key) = find_in_block(&key, &value, id)? {
                return Ok(Some(SeriesDef { id, key }));
            }
        }
        // Stored by an older build, one entry per id.
        let Some(value) = self.tree.get(id.to_be_bytes()).map_err(storage)? else {
            return Ok(None);
        };
        let (_, key) = decode_legacy(&id.to_be_bytes(), &value)?;
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
    /// Keys by id (ids are dense), packed.
    keys: Vec<PackedKey>,
    /// Ids below this are stored one per entry by an older build (never rewritten).
    legacy_count: usize,
    /// Ids below this are stored. An atomic so that the commit can store the new ones
    /// through the shared reference the aggregation stage hands out.
    stored_count: AtomicUsize,
    tree: Option<sled::Tree>,
}

impl SeriesRegistry {
    /// A registry that forgets everything on restart (tests, benchmarks).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads the assignments stored in `tree` (blocks, and single entries of older builds)
    /// and persists new ones there.
    pub fn open(tree: sled::Tree) -> Result<Self, RegistryError> {
        let mut entries = Vec::new();
        let mut legacy_count = 0;
        for entry in tree.iter() {
            let (key, value) = entry.map_err(|source| RegistryError::Storage {
                operation: "loading",
                source,
            })?;
            if key.len() == block_key(0).len() && key.first() == Some(&BLOCK_KEY_PREFIX) {
                entries.extend(decode_block(&key, &value)?);
            } else {
                entries.push(decode_legacy(&key, &value)?);
                legacy_count += 1;
            }
        }
        entries.sort_unstable_by_key(|(id, _)| *id);
        let mut registry = Self::default();
        for (id, series_key) in entries {
            if id as usize != registry.keys.len() {
                return Err(RegistryError::Corrupt {
                    id: id.to_string(),
                    reason: format!("ids are not dense: expected {}", registry.keys.len()),
                });
            }
            let hash = registry.hash_key(SeriesKeyRef::from(&series_key));
            registry.insert(
                PackedKey::pack(SeriesKeyRef::from(&series_key)),
                hash,
                || series_key.clone(),
            );
        }
        registry.legacy_count = legacy_count;
        registry.stored_count = AtomicUsize::new(registry.keys.len());
        registry.tree = Some(tree);
        Ok(registry)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
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
        self.keys.is_empty()
    }

    /// Whether ids were assigned that [`SeriesRegistry::write_pending`] has not stored yet
    /// (batches using them must carry their definitions).
    pub fn has_unstored(&self) -> bool {
        self.tree.is_some() && self.stored_count.load(Ordering::Acquire) < self.keys.len()
    }

    /// Stores the ids assigned since the last call, in blocks (unflushed: the commit's
    /// state flush makes them durable). Call it before writing anything that uses the new
    /// ids (journal blocks, batches). On failure they stay pending for the next call.
    pub fn write_pending(&self) -> Result<(), RegistryError> {
        let Some(tree) = &self.tree else {
            return Ok(());
        };
        let stored = self.stored_count.load(Ordering::Acquire);
        let total = self.keys.len();
        if stored >= total {
            // Nothing new: without this, a partly filled last block was written again at
            // every journal block and commit.
            return Ok(());
        }
        let mut block = stored / BLOCK_SERIES;
        while block * BLOCK_SERIES < total {
            let first = (block * BLOCK_SERIES).max(self.legacy_count);
            let end = ((block + 1) * BLOCK_SERIES).min(total);
            let keys = self.keys.get(first..end).unwrap_or_default();
            let mut value =
                Vec::with_capacity(4 + keys.iter().map(|key| key.0.len() + 2).sum::<usize>());
            value.extend_from_slice(&u32::try_from(first).unwrap_or(u32::MAX).to_be_bytes());
            for key in keys {
                put_length(&mut value, key.0.len());
                value.extend_from_slice(&key.0);
            }
            tree.insert(block_key(block), value)
                .map_err(|source| RegistryError::Storage {
                    operation: "storing new series",
                    source,
                })?;
            block += 1;
        }
        self.stored_count.store(total, Ordering::Release);
        Ok(())
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
        match self.keys.get(id as usize) {
            Some(stored) if stored.matches(key) => Some(id),
            // A 64-bit hash shared with another key: astronomically rare, so the owned key
            // this lookup needs is no cost worth avoiding.
            _ => self.collided.get(&key.to_key()).copied(),
        }
    }

    /// Adds the next id; `owned` builds the owned key, needed only on a hash collision.
    fn insert(&mut self, key: PackedKey, hash: u64, owned: impl FnOnce() -> SeriesKey) {
        let id = SeriesId::try_from(self.keys.len()).unwrap_or(SeriesId::MAX);
        match self.by_hash.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(owned(), id);
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(id);
            }
        }
        self.keys.push(key);
    }

    /// The id of `key`, assigning the next one if it is new (stored by the next
    /// [`SeriesRegistry::write_pending`]).
    pub fn intern(&mut self, key: &SeriesKey) -> Result<SeriesId, RegistryError> {
        self.intern_ref(SeriesKeyRef::from(key))
    }

    /// [`SeriesRegistry::intern`] for a borrowed key: allocates only for a new series.
    pub fn intern_ref(&mut self, key: SeriesKeyRef<'_>) -> Result<SeriesId, RegistryError> {
        let hash = self.hash_key(key);
        if let Some(id) = self.lookup(key, hash) {
            return Ok(id);
        }
        let id = SeriesId::try_from(self.keys.len()).map_err(|_| RegistryError::Exhausted {
            limit: u64::from(SeriesId::MAX),
        })?;
        self.insert(PackedKey::pack(key), hash, || key.to_key());
        Ok(id)
    }

    /// The key of `id` (built: keys are held packed).
    pub fn key(&self, id: SeriesId) -> Option<SeriesKey> {
        self.keys.get(id as usize).and_then(PackedKey::to_key)
    }

    /// Definitions for `ids` (unknown ids are skipped).
    pub fn definitions(&self, ids: &[SeriesId]) -> Vec<SeriesDef> {
        ids.iter()
            .filter_map(|id| self.key(*id).map(|key| SeriesDef { id: *id, key }))
            .collect()
    }

    /// Definitions of `ids` (unknown and repeated ids are skipped) for encoding a batch
    /// that must carry them (rare: the state could not be flushed, or an in-memory
    /// registry); hand them back with [`SeriesRegistry::restore_definitions`].
    pub(crate) fn take_definitions(&mut self, ids: &[SeriesId]) -> Vec<SeriesDef> {
        let mut seen = vec![false; self.keys.len()];
        let mut taken = Vec::with_capacity(ids.len().min(self.keys.len()));
        for id in ids {
            match seen.get_mut(*id as usize) {
                Some(seen) if !*seen => *seen = true,
                _ => continue,
            }
            if let Some(key) = self.key(*id) {
                taken.push(SeriesDef { id: *id, key });
            }
        }
        taken
    }

    /// Gives back definitions taken with [`SeriesRegistry::take_definitions`] (they are
    /// copies of the packed keys, so this only frees them).
    pub(crate) fn restore_definitions(&mut self, definitions: Vec<SeriesDef>) {
        drop(definitions);
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
            assert!(registry.has_unstored());
            registry.write_pending().expect("write");
            assert!(!registry.has_unstored());
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
        assert_eq!(registry.key(0), Some(first.clone()));
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
        assert_eq!(registry.key(0), Some(owned.clone()));
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
            assert_eq!(registry.key(index as SeriesId).as_ref(), Some(key));
            assert_eq!(registry.intern(key).expect("intern"), index as SeriesId);
        }
        assert_eq!(registry.len(), 5);
    }

    fn many_keys(count: usize, site: &str) -> Vec<SeriesKey> {
        (0..count)
            .map(|index| {
                SeriesKey::new(format!("dev-{index}"), "env.temp").with_tags([("site", site)])
            })
            .collect()
    }

    #[test]
    fn blocks_store_every_id_and_a_reader_finds_each() {
        let directory = tempfile::tempdir().expect("tempdir");
        let keys = many_keys(BLOCK_SERIES * 2 + 10, "a");
        {
            let db = sled::open(directory.path()).expect("open");
            let mut registry =
                SeriesRegistry::open(db.open_tree("series").expect("tree")).expect("registry");
            let reader = registry.reader().expect("persistent");
            // Written in several commits, the last block partly each time.
            for chunk in keys.chunks(100) {
                for key in chunk {
                    registry.intern(key).expect("intern");
                }
                assert_eq!(
                    reader
                        .definition(registry.len() as SeriesId - 1)
                        .expect("read"),
                    None,
                    "not stored before write_pending"
                );
                registry.write_pending().expect("write");
            }
            for (index, key) in keys.iter().enumerate() {
                let definition = reader
                    .definition(index as SeriesId)
                    .expect("read")
                    .expect("stored");
                assert_eq!(&definition.key, key);
            }
            assert_eq!(
                reader.definition(keys.len() as SeriesId).expect("read"),
                None
            );
            assert_eq!(
                db.open_tree("series").expect("tree").len(),
                3,
                "one entry per block of {BLOCK_SERIES}"
            );
            db.flush().expect("flush");
        }
        let db = sled::open(directory.path()).expect("reopen");
        let mut registry =
            SeriesRegistry::open(db.open_tree("series").expect("tree")).expect("registry");
        assert_eq!(registry.len(), keys.len());
        for (index, key) in keys.iter().enumerate() {
            assert_eq!(registry.intern(key).expect("intern"), index as SeriesId);
        }
    }

    #[test]
    fn a_registry_of_an_older_build_opens_and_grows_in_blocks() {
        let directory = tempfile::tempdir().expect("tempdir");
        let old_keys = many_keys(300, "old");
        let new_keys = many_keys(300, "new");
        {
            // The layout older builds wrote: one entry per id, the key as JSON.
            let db = sled::open(directory.path()).expect("open");
            let tree = db.open_tree("series").expect("tree");
            for (index, key) in old_keys.iter().enumerate() {
                tree.insert(
                    (index as SeriesId).to_be_bytes(),
                    serde_json::to_vec(key).expect("json"),
                )
                .expect("insert");
            }
            db.flush().expect("flush");
        }
        {
            let db = sled::open(directory.path()).expect("open");
            let mut registry =
                SeriesRegistry::open(db.open_tree("series").expect("tree")).expect("registry");
            assert_eq!(registry.len(), old_keys.len());
            for (index, key) in new_keys.iter().enumerate() {
                assert_eq!(
                    registry.intern(key).expect("intern"),
                    (old_keys.len() + index) as SeriesId
                );
            }
            registry.write_pending().expect("write");
            let reader = registry.reader().expect("persistent");
            for (index, key) in old_keys.iter().chain(&new_keys).enumerate() {
                let definition = reader
                    .definition(index as SeriesId)
                    .expect("read")
                    .expect("stored");
                assert_eq!(&definition.key, key, "id {index}");
            }
            db.flush().expect("flush");
        }
        let db = sled::open(directory.path()).expect("reopen");
        let mut registry =
            SeriesRegistry::open(db.open_tree("series").expect("tree")).expect("registry");
        assert_eq!(registry.len(), old_keys.len() + new_keys.len());
        for (index, key) in old_keys.iter().chain(&new_keys).enumerate() {
            assert_eq!(registry.intern(key).expect("intern"), index as SeriesId);
            assert_eq!(registry.key(index as SeriesId).as_ref(), Some(key));
        }
    }

    #[test]
    fn a_damaged_block_is_reported_not_a_panic() {
        let directory = tempfile::tempdir().expect("tempdir");
        let db = sled::open(directory.path()).expect("open");
        let tree = db.open_tree("series").expect("tree");
        for value in [
            vec![0u8, 0],                                         // shorter than the first id
            vec![0, 0, 0, 0, 9, 1, 2],                            // an entry cut short
            vec![0, 0, 0, 0, 2, 1, 0xff],                         // not UTF-8
            vec![0, 0, 0, 0, 4, 1, b'd', 1, b'm'],                // no tag count
            vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // a length too long
        ] {
            tree.insert(block_key(0), value.clone()).expect("insert");
            let error = SeriesRegistry::open(tree.clone()).expect_err("damaged");
            assert!(
                matches!(error, RegistryError::Corrupt { .. }),
                "{value:?}: {error}"
            );
            let reader = RegistryReader { tree: tree.clone() };
            assert!(reader.definition(0).is_err(), "{value:?}");
        }
    }

    #[test]
    fn packed_keys_match_only_their_own_key() {
        let key = SeriesKey::new("dev-1", "temp").with_tags([("site", "a"), ("zone", "b")]);
        let packed = PackedKey::pack(SeriesKeyRef::from(&key));
        assert!(packed.matches(SeriesKeyRef::from(&key)));
        assert_eq!(packed.to_key().as_ref(), Some(&key));
        for other in [
            SeriesKey::new("dev-1", "temp"),
            SeriesKey::new("dev-1", "temp").with_tags([("site", "a")]),
            SeriesKey::new("dev-1", "temp").with_tags([("site", "a"), ("zone", "c")]),
            SeriesKey::new("dev-1", "tem").with_tags([("site", "a"), ("zone", "b")]),
            SeriesKey::new("dev-1t", "emp").with_tags([("site", "a"), ("zone", "b")]),
        ] {
            assert!(!packed.matches(SeriesKeyRef::from(&other)), "{other:?}");
        }
        let long = SeriesKey::new("d".repeat(70_000), "m");
        let packed = PackedKey::pack(SeriesKeyRef::from(&long));
        assert!(packed.matches(SeriesKeyRef::from(&long)));
        assert_eq!(packed.to_key(), Some(long));
    }
}
