//! Redelivery records: nothing acknowledged is lost, and nothing is counted twice.
//!
//! The acknowledgement chain (`run.rs`) sends a QoS 1 PUBACK only once a message's readings
//! are durable. That leaves a window: a kill -9 after the group commit that made a message
//! durable and before its PUBACK reached the sender. The sender then redelivers the message
//! (a resumed session resends every unacknowledged QoS 1 message) and, without this module,
//! the agent would ingest it a second time: its readings counted twice, in raw rows and in
//! the edge summaries.
//!
//! So every QoS 1 message that goes into a group commit leaves a *record*: (source, session,
//! packet id) -> (hash of topic and payload, the journal sequence number after its readings).
//! The record is written to the `redelivery` tree of the state database just before the
//! journal block holding the message's last reading, so the commit's state flush makes both
//! durable together; sled recovers a prefix of its writes, so a durable journal block implies
//! its records are durable. The reverse (a record whose readings were lost) is caught at
//! start: a record naming a journal sequence number the journal never reached is deleted.
//! The embedded broker removes a record (at the next commit) once its PUBACK has been written
//! to the client's socket. Subscribe mode keeps it: rumqttc reports a PUBACK as written when
//! it is in rumqttc's buffer, and a kill right after still makes the broker resend (a crash
//! test under load showed it); DUP = 1 plus the same content keep a stale record from
//! matching, and the broker's reuse of the packet id replaces it (at most 65,535 per session).
//!
//! A message arriving on a resumed session that matches a durable record of an *earlier*
//! connection (same packet id and same topic + payload hash; in subscribe mode also DUP = 1)
//! is acknowledged without being ingested, counted in
//! `tributary_agent_redeliveries_skipped_total`, and its record dropped. A new message that
//! reuses the packet id with other content is ingested (the hash differs). Records are capped
//! per agent (a record replacing one of the same packet id always fits); past the cap a
//! message is simply not recorded (counted in `redelivery_records_not_kept_total`): a crash
//! may then duplicate it, never lose it.
//!
//! Pairing: the pipeline sees a message only as a [`PipelineInput`]. Each shell queues the
//! message's record on its source's queue and sends the input under one per-source lock, so
//! the queue order is the channel order, and the pipeline takes one queued record per
//! acknowledged input of that source ([`RedeliveryLog::ingested`]).
//!
//! Layout: one tree entry per *bucket*, (source, session, high byte of the packet id) ->
//! up to 256 records of (low byte, hash, journal sequence number), rewritten whole when one
//! of its records changes. A sled insert costs about 15,000 instructions, more than the rest
//! of a message's path through the agent, and a broker numbers a session's messages in
//! sequence, so a commit of a thousand messages writes four or five buckets instead of a
//! thousand entries. An entry is the whole state of its packet ids, so a removal needs no
//! tombstone. (Entries of one record each, the first layout, are converted at load.)
//!
//! Cost: a subscribe session keeps up to 65,535 records, so nothing done per message or per
//! group commit walks them all. A message costs one key allocation (shared by the record and
//! the commit's lists) and a few hash lookups; a commit touches only the buckets changed and
//! the records written since the last commit (`Inner::written_not_durable`). Only a session
//! restart (once per connection) and the load at start scan every record.
//!
//! Test-only fault: `TRIBUTARY_AGENT_FAULT_ABORT_AFTER_ACKS=N` aborts the process right after
//! the first durable commit that brings the acknowledgements released to N or more, before
//! they are handed to the shells (the durable-but-unacknowledged state of a kill -9).

use std::collections::{HashMap, VecDeque};

// Records and buckets are looked up for every QoS 1 message: a fast hash, seeded per
// process (keys hold client ids, which a client chooses).
use foldhash::fast::RandomState;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::aggregate::SourceIndex;
use crate::run::PipelineInput;

/// Records kept at most (all sources). One record is about 100 bytes of memory.
pub const MAX_RECORDS: usize = 65_536;
/// The environment variable of the test-only fault (see the module docs).
pub const FAULT_ABORT_AFTER_ACKS: &str = "TRIBUTARY_AGENT_FAULT_ABORT_AFTER_ACKS";
/// Connection id of records loaded at start: never the current connection of anyone.
const LOADED: u64 = u64::MAX;
/// A record in the first layout (one entry per record): hash, journal sequence number.
const VALUE_BYTES: usize = 16;
/// A record in a bucket entry: low byte of the packet id, hash, journal sequence number.
const BUCKET_RECORD_BYTES: usize = 17;

/// A record's tree key (source name, 0, session, 0, packet id), shared rather than copied
/// between the record, its pending write and the commit's list.
type Key = Arc<[u8]>;

/// The identity and content hash of one QoS 1 message, as a shell sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageId {
    key: Key,
    hash: u64,
    connection: u64,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    hash: u64,
    /// The journal sequence number after the message's readings.
    end_seq: u64,
    connection: u64,
    /// Written to the tree (flushed by the next commit).
    written: bool,
    /// Flushed by a commit that succeeded: its readings are durable, so it may be matched.
    durable: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Per source, the records of acknowledged inputs sent and not yet ingested (`None`:
    /// not recorded, past the cap).
    queued: Vec<VecDeque<Option<MessageId>>>,
    records: HashMap<Key, Record, RandomState>,
    /// Per bucket key (a record key without its last byte), the records it holds.
    buckets: HashMap<Key, Bucket, RandomState>,
    /// Buckets changed since the last write, each once (`Bucket::dirty`): rewritten (or
    /// removed, if empty) just before the next journal block.
    dirty: Vec<Key>,
    /// Records not yet written (ingested since the last write); a key whose record was
    /// since removed or already written is skipped.
    unwritten: Vec<Key>,
    /// Records written since the last commit (that succeeded or failed): every record that
    /// is written and not durable is here, so a commit touches only these, not all records.
    /// A key whose record was since replaced or removed is skipped.
    written_not_durable: Vec<Key>,
    acks_released: u64,
}

/// Which packet ids (low bytes) of a bucket hold a record.
#[derive(Debug)]
struct Bucket {
    /// Its key in `Inner::buckets` (shared with `Inner::dirty`).
    key: Key,
    present: [u64; 4],
    dirty: bool,
}

impl Bucket {
    fn new(key: Key) -> Self {
        Self {
            key,
            present: [0; 4],
            dirty: false,
        }
    }

    fn set(&mut self, low: u8, present: bool) {
        let (word, bit) = (usize::from(low / 64), low % 64);
        if let Some(word) = self.present.get_mut(word) {
            if present {
                *word |= 1 << bit;
            } else {
                *word &= !(1 << bit);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.present.iter().all(|word| *word == 0)
    }

    /// `low` set present or not; with `dirty`, marked (once, listed in `dirty_buckets`) to
    /// be rewritten at the next write.
    fn update(&mut self, low: Option<(u8, bool)>, dirty: bool, dirty_buckets: &mut Vec<Key>) {
        if let Some((low, present)) = low {
            self.set(low, present);
        }
        if dirty && !self.dirty {
            self.dirty = true;
            dirty_buckets.push(Arc::clone(&self.key));
        }
    }

    /// The low bytes present, ascending.
    fn lows(&self) -> impl Iterator<Item = u8> + '_ {
        (0u8..=255).filter(move |low| {
            self.present
                .get(usize::from(low / 64))
                .is_some_and(|word| word & (1 << (low % 64)) != 0)
        })
    }
}

impl Inner {
    /// Updates the bucket of key `bucket_key` (added if missing): `low` set present or not,
    /// and with `dirty` marked to be rewritten at the next write.
    ///
    /// One hash lookup when the bucket exists (every message but one in 256 of a session):
    /// this runs for every QoS 1 message.
    fn update_bucket(&mut self, bucket_key: &[u8], low: Option<(u8, bool)>, dirty: bool) {
        if let Some(bucket) = self.buckets.get_mut(bucket_key) {
            bucket.update(low, dirty, &mut self.dirty);
            return;
        }
        let key = Key::from(bucket_key);
        let mut bucket = Bucket::new(Arc::clone(&key));
        bucket.update(low, dirty, &mut self.dirty);
        self.buckets.insert(key, bucket);
    }

    /// Adds or replaces the record of `key`; `dirty`: its bucket must be rewritten.
    fn place(&mut self, key: Key, record: Record, dirty: bool) {
        if let Some((&low, bucket_key)) = key.split_last() {
            self.update_bucket(bucket_key, Some((low, true)), dirty);
            self.records.insert(key, record);
        }
    }

    /// Removes the record of `key` (its bucket is rewritten at the next write).
    fn remove(&mut self, key: &[u8]) {
        if self.records.remove(key).is_none() {
            return;
        }
        if let Some((&low, bucket_key)) = key.split_last() {
            self.update_bucket(bucket_key, Some((low, false)), true);
        }
    }

    /// Adds the dirty buckets' entries (their whole present state) to `batch`.
    fn write_buckets(&self, batch: &mut sled::Batch) {
        let mut lookup = Vec::new();
        let mut value = Vec::new();
        for bucket_key in &self.dirty {
            let Some(bucket) = self.buckets.get(bucket_key) else {
                continue;
            };
            value.clear();
            for low in bucket.lows() {
                lookup.clear();
                lookup.extend_from_slice(bucket_key);
                lookup.push(low);
                if let Some(record) = self.records.get(&lookup[..]) {
                    value.push(low);
                    value.extend_from_slice(&record.hash.to_be_bytes());
                    value.extend_from_slice(&record.end_seq.to_be_bytes());
                }
            }
            if value.is_empty() {
                batch.remove(&bucket_key[..]);
            } else {
                batch.insert(&bucket_key[..], &value[..]);
            }
        }
    }

    /// After the dirty buckets were written: nothing is dirty, empty buckets go.
    fn buckets_written(&mut self) {
        for bucket_key in std::mem::take(&mut self.dirty) {
            if let Some(bucket) = self.buckets.get_mut(&bucket_key) {
                bucket.dirty = false;
                if bucket.is_empty() {
                    self.buckets.remove(&bucket_key);
                }
            }
        }
    }
}

/// The records of one agent (all its MQTT sources), shared by the shells and the pipeline.
#[derive(Debug)]
pub struct RedeliveryLog {
    tree: sled::Tree,
    source_names: Vec<String>,
    inner: Mutex<Inner>,
    send_locks: Vec<tokio::sync::Mutex<()>>,
    skipped: Vec<AtomicU64>,
    not_kept: AtomicU64,
    write_errors: AtomicU64,
    max_records: usize,
    abort_after_acks: Option<u64>,
}

/// 64-bit FNV-1a of the topic length, topic and payload: stable across runs and versions.
pub fn message_hash(topic: &[u8], payload: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let length = (topic.len() as u64).to_be_bytes();
    for byte in length.iter().chain(topic).chain(payload) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// One allocation of the exact size (the iterator knows its length).
fn record_key(source_name: &str, session: &str, pkid: u16) -> Key {
    let separator = std::iter::once(0u8);
    source_name
        .bytes()
        .chain(separator.clone())
        .chain(session.bytes())
        .chain(separator)
        .chain(pkid.to_be_bytes())
        .collect()
}

fn session_prefix(source_name: &str, session: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(source_name.len() + session.len() + 2);
    key.extend_from_slice(source_name.as_bytes());
    key.push(0);
    key.extend_from_slice(session.as_bytes());
    key.push(0);
    key
}

impl RedeliveryLog {
    /// Opens the `redelivery` tree of `state_db` for the sources named `source_names` (in
    /// config order). Records are loaded by [`RedeliveryLog::load`].
    pub fn open(state_db: &sled::Db, source_names: Vec<String>) -> sled::Result<Self> {
        Self::with_limit(state_db, source_names, MAX_RECORDS)
    }

    /// [`RedeliveryLog::open`] with another cap on the records kept.
    pub fn with_limit(
        state_db: &sled::Db,
        source_names: Vec<String>,
        max_records: usize,
    ) -> sled::Result<Self> {
        let sources = source_names.len();
        let abort_after_acks = std::env::var(FAULT_ABORT_AFTER_ACKS)
            .ok()
            .and_then(|value| value.trim().parse().ok());
        Ok(Self {
            tree: state_db.open_tree("redelivery")?,
            inner: Mutex::new(Inner {
                queued: (0..sources).map(|_| VecDeque::new()).collect(),
                ..Inner::default()
            }),
            send_locks: (0..sources).map(|_| tokio::sync::Mutex::new(())).collect(),
            skipped: (0..sources).map(|_| AtomicU64::new(0)).collect(),
            source_names,
            not_kept: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            max_records,
            abort_after_acks,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Loads the records of the previous run. `journal_next_seq` is the journal sequence
    /// number the reopened journal continues from: a record naming a later one belongs to
    /// readings that never became durable and is deleted (durably, before any new reading
    /// could reach its sequence number). Returns how many records were kept.
    pub fn load(&self, journal_next_seq: u64) -> sled::Result<usize> {
        let mut inner = self.lock();
        let mut batch = sled::Batch::default();
        let mut changed = false;
        let loaded = |hash: &[u8], end_seq: &[u8]| Record {
            hash: u64::from_be_bytes(hash.try_into().unwrap_or_default()),
            end_seq: u64::from_be_bytes(end_seq.try_into().unwrap_or_default()),
            connection: LOADED,
            written: true,
            durable: true,
        };
        for entry in self.tree.iter() {
            let (key, value) = entry?;
            let known_source = self
                .source_names
                .iter()
                .any(|name| key.starts_with(name.as_bytes()) && key.get(name.len()) == Some(&0));
            if known_source && value.len() == VALUE_BYTES && key.len() >= 2 {
                // The first layout: moved into its bucket (rewritten below).
                batch.remove(&key);
                changed = true;
                let (hash, end_seq) = value.split_at(8);
                let record = loaded(hash, end_seq);
                if record.end_seq <= journal_next_seq && inner.records.len() < self.max_records {
                    inner.place(Key::from(key.as_ref()), record, true);
                }
            } else if known_source && !value.is_empty() && value.len() % BUCKET_RECORD_BYTES == 0 {
                let mut dropped = false;
                for chunk in value.chunks_exact(BUCKET_RECORD_BYTES) {
                    let (low, rest) = chunk.split_at(1);
                    let (hash, end_seq) = rest.split_at(8);
                    let record = loaded(hash, end_seq);
                    if record.end_seq <= journal_next_seq && inner.records.len() < self.max_records
                    {
                        let record_key: Key = key.iter().chain(low).copied().collect();
                        inner.place(record_key, record, false);
                    } else {
                        dropped = true;
                    }
                }
                if dropped {
                    // Rewritten without the dropped records (or removed if none is left).
                    inner.update_bucket(&key, None, true);
                }
            } else {
                batch.remove(key);
                changed = true;
            }
        }
        if changed || !inner.dirty.is_empty() {
            inner.write_buckets(&mut batch);
            self.tree.apply_batch(batch)?;
            self.tree.flush()?;
            inner.buckets_written();
        }
        Ok(inner.records.len())
    }

    /// The identity of message `pkid` of `session` (a client id) on `connection` of
    /// `source`.
    pub fn message_id(
        &self,
        source: SourceIndex,
        session: &str,
        connection: u64,
        pkid: u16,
        topic: &[u8],
        payload: &[u8],
    ) -> MessageId {
        let name = self.source_names.get(source).map_or("", String::as_str);
        MessageId {
            key: record_key(name, session, pkid),
            hash: message_hash(topic, payload),
            connection,
        }
    }

    /// If `message` is a redelivery of a durable message of an earlier connection, drops
    /// its record, counts it and returns true: acknowledge it without ingesting.
    pub fn take_redelivery(&self, source: SourceIndex, message: &MessageId) -> bool {
        let mut inner = self.lock();
        let matches = inner.records.get(&message.key).is_some_and(|record| {
            record.durable && record.hash == message.hash && record.connection != message.connection
        });
        if matches {
            inner.remove(&message.key);
            if let Some(counter) = self.skipped.get(source) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        matches
    }

    /// Hands one message's readings to the pipeline; an acknowledged input (with
    /// `durable`) gets `message` recorded when the pipeline ingests it. Err: the pipeline
    /// is gone (shutdown).
    pub async fn send(
        &self,
        pipeline: &mpsc::Sender<PipelineInput>,
        input: PipelineInput,
        message: Option<MessageId>,
    ) -> Result<(), ()> {
        let source = input.source;
        let Some(send_lock) = self
            .send_locks
            .get(source)
            .filter(|_| input.durable.is_some())
        else {
            return pipeline.send(input).await.map_err(|_| ());
        };
        let _ordered = send_lock.lock().await;
        {
            let mut inner = self.lock();
            let room = inner.records.len() + inner.queued.iter().map(VecDeque::len).sum::<usize>()
                < self.max_records;
            let entry = match message {
                // A packet id already recorded for this session is replaced, not added.
                Some(message) if room || inner.records.contains_key(&message.key) => Some(message),
                Some(_) => {
                    self.not_kept.fetch_add(1, Ordering::Relaxed);
                    None
                }
                None => None,
            };
            if let Some(queue) = inner.queued.get_mut(source) {
                queue.push_back(entry);
            }
        }
        pipeline.send(input).await.map_err(|_| ())
    }

    /// Pipeline: an acknowledged input of `source` was ingested; its readings' journal
    /// sequence numbers are all below `journal_next_seq`.
    pub fn ingested(&self, source: SourceIndex, journal_next_seq: u64) {
        let mut inner = self.lock();
        let Some(Some(message)) = inner.queued.get_mut(source).and_then(VecDeque::pop_front) else {
            return;
        };
        let record = Record {
            hash: message.hash,
            end_seq: journal_next_seq,
            connection: message.connection,
            written: false,
            durable: false,
        };
        inner.place(Arc::clone(&message.key), record, true);
        inner.unwritten.push(message.key);
    }

    /// Pipeline: writes the pending records and removals, just before a journal block (the
    /// commit's state flush makes them durable with it).
    pub fn write_pending(&self) {
        let mut inner = self.lock();
        if inner.dirty.is_empty() {
            return; // A record not yet written has its bucket dirty.
        }
        let mut batch = sled::Batch::default();
        inner.write_buckets(&mut batch);
        let applied = self.tree.apply_batch(batch);
        let unwritten = std::mem::take(&mut inner.unwritten);
        match applied {
            Ok(()) => {
                inner.buckets_written();
                let Inner {
                    records,
                    written_not_durable,
                    ..
                } = &mut *inner;
                for key in unwritten {
                    if let Some(record) = records.get_mut(&key).filter(|record| !record.written) {
                        record.written = true;
                        written_not_durable.push(key);
                    }
                }
            }
            Err(error) => {
                // Not recorded: a crash may duplicate these messages, never lose them. The
                // buckets stay dirty: the next write brings the tree up to date.
                self.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "cannot write redelivery records; a crash before their PUBACKs may count those messages twice");
                for key in unwritten {
                    if inner
                        .records
                        .get(&key)
                        .is_some_and(|record| !record.written)
                    {
                        inner.remove(&key);
                    }
                }
            }
        }
    }

    /// Pipeline: a commit made everything written so far durable and releases `acks`
    /// acknowledgements next.
    pub fn committed(&self, acks: u64) {
        let mut inner = self.lock();
        let Inner {
            records,
            written_not_durable,
            ..
        } = &mut *inner;
        for key in written_not_durable.drain(..) {
            // A record replaced since it was written is not written yet: it waits.
            if let Some(record) = records.get_mut(&key).filter(|record| record.written) {
                record.durable = true;
            }
        }
        inner.acks_released += acks;
        if let Some(limit) = self.abort_after_acks {
            if acks > 0 && inner.acks_released >= limit {
                eprintln!(
                    "{FAULT_ABORT_AFTER_ACKS}={limit}: aborting after a durable commit, before its {acks} acknowledgements"
                );
                std::process::abort();
            }
        }
    }

    /// Pipeline: a commit failed and its acknowledgements are dropped: forget the records
    /// not yet made durable (their readings may not be; the senders resend them).
    pub fn commit_failed(&self) {
        let mut inner = self.lock();
        let Inner {
            written_not_durable,
            unwritten,
            ..
        } = &mut *inner;
        // Every record not durable is written since the last commit or not written yet.
        let candidates: Vec<Key> = written_not_durable
            .drain(..)
            .chain(unwritten.iter().cloned())
            .collect();
        for key in candidates {
            if inner
                .records
                .get(&key)
                .is_some_and(|record| !record.durable)
            {
                inner.remove(&key);
            }
        }
    }

    /// Shell: the PUBACK of `message` (or of `pkid` of that session) was handed to the
    /// transport; its record goes at the next commit.
    pub fn acknowledged(&self, message: &MessageId) {
        let mut inner = self.lock();
        if inner
            .records
            .get(&message.key)
            .is_some_and(|record| record.durable)
        {
            inner.remove(&message.key);
        }
    }

    /// Shell: `session` of `source` starts on `connection` without a stored session
    /// ("session present = 0"): nothing of earlier connections will be resent, so their
    /// records go.
    pub fn session_restarted(&self, source: SourceIndex, session: &str, connection: u64) {
        let name = self.source_names.get(source).map_or("", String::as_str);
        let prefix = session_prefix(name, session);
        let mut inner = self.lock();
        let stale: Vec<Key> = inner
            .records
            .iter()
            .filter(|(key, record)| {
                record.durable
                    && record.connection != connection
                    && key.len() == prefix.len() + 2
                    && key.starts_with(&prefix)
            })
            .map(|(key, _)| Arc::clone(key))
            .collect();
        for key in stale {
            inner.remove(&key);
        }
    }

    /// Records held (in memory and in the tree).
    pub fn records(&self) -> usize {
        self.lock().records.len()
    }

    /// Redeliveries skipped for `source`.
    pub fn skipped(&self, source: SourceIndex) -> u64 {
        self.skipped
            .get(source)
            .map_or(0, |counter| counter.load(Ordering::Relaxed))
    }

    /// Prometheus text for `/metrics`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "# TYPE tributary_agent_redeliveries_skipped_total counter"
        );
        for (name, counter) in self.source_names.iter().zip(&self.skipped) {
            let _ = writeln!(
                text,
                "tributary_agent_redeliveries_skipped_total{{source=\"{name}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            (
                "tributary_agent_redelivery_records",
                "gauge",
                self.records() as u64,
            ),
            (
                "tributary_agent_redelivery_records_not_kept_total",
                "counter",
                self.not_kept.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_redelivery_write_errors_total",
                "counter",
                self.write_errors.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, value) in gauges {
            let _ = writeln!(text, "# TYPE {name} {kind}\n{name} {value}");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log over a temporary database, and a runtime to send through.
    fn log() -> (sled::Db, RedeliveryLog, tokio::runtime::Runtime) {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("temporary database");
        let log = RedeliveryLog::open(&db, vec!["mqtt".to_owned()]).expect("open log");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        (db, log, runtime)
    }

    /// Sends message `pkid` (connection 1) as an acknowledged input and ingests it.
    fn ingest(log: &RedeliveryLog, runtime: &tokio::runtime::Runtime, pkid: u16, payload: &[u8]) {
        let (pipeline, mut inputs) = mpsc::channel(1);
        let (durable, _receiver) = tokio::sync::oneshot::channel();
        let input = PipelineInput {
            source: 0,
            readings: Default::default(),
            receive_ms: 0,
            durable: Some(durable),
        };
        let message = log.message_id(0, "sensor", 1, pkid, b"t", payload);
        runtime
            .block_on(log.send(&pipeline, input, Some(message)))
            .expect("send");
        runtime.block_on(inputs.recv()).expect("input");
        log.ingested(0, u64::from(pkid));
    }

    /// Whether message `pkid` would be skipped as a resend on a later connection (and takes
    /// its record if so).
    fn resent(log: &RedeliveryLog, pkid: u16, payload: &[u8]) -> bool {
        log.take_redelivery(0, &log.message_id(0, "sensor", 2, pkid, b"t", payload))
    }

    /// Whether the tree's bucket of `pkid` holds its record.
    fn in_tree(db: &sled::Db, pkid: u16) -> bool {
        let tree = db.open_tree("redelivery").expect("tree");
        let key = record_key("mqtt", "sensor", pkid);
        let (low, bucket_key) = key.split_last().expect("key");
        tree.get(bucket_key)
            .expect("tree read")
            .is_some_and(|value| {
                value
                    .chunks_exact(BUCKET_RECORD_BYTES)
                    .any(|record| record.first() == Some(low))
            })
    }

    /// A commit settles only its own records: earlier ones stay durable through later
    /// commits (the log no longer revisits them), a failed commit forgets only the records
    /// written since the last commit, and a record written while a commit fails without
    /// `commit_failed` (buffer not durable) becomes durable with the next good commit.
    #[test]
    fn redelivery_commits_settle_only_their_own_records() {
        let (db, log, runtime) = log();
        assert_eq!(log.load(0).expect("load"), 0);
        ingest(&log, &runtime, 1, b"a");
        log.write_pending();
        log.committed(1);
        ingest(&log, &runtime, 2, b"b");
        log.write_pending();
        log.committed(1);
        // Written, then its commit fails and forgets it.
        ingest(&log, &runtime, 3, b"c");
        log.write_pending();
        assert!(in_tree(&db, 3));
        log.commit_failed();
        // A commit with nothing written since, then one that fails without forgetting.
        log.committed(0);
        ingest(&log, &runtime, 4, b"d");
        log.write_pending();
        ingest(&log, &runtime, 5, b"e");
        log.write_pending();
        // Ingested but not written when the commit closes: not durable yet.
        ingest(&log, &runtime, 6, b"f");
        log.committed(2);
        assert_eq!(log.records(), 5, "all but the forgotten message 3");
        assert!(!resent(&log, 6, b"f"), "not written before its commit");
        log.write_pending();
        assert!(
            !in_tree(&db, 3),
            "the forgotten record's removal was written"
        );
        log.committed(1);
        for (pkid, payload) in [(1, b"a"), (2, b"b"), (4, b"d"), (5, b"e"), (6, b"f")] {
            assert!(resent(&log, pkid, payload), "message {pkid} is durable");
        }
        assert!(!resent(&log, 3, b"c"), "message 3 was forgotten");
        assert_eq!(log.records(), 0);
    }

    /// A record replaced (the packet id reused) after it was written and before the commit
    /// stays not durable through that commit; a failed commit then drops the replacement,
    /// and the durable records of earlier commits stay.
    #[test]
    fn redelivery_replaced_record_waits_for_its_own_commit() {
        let (db, log, runtime) = log();
        assert_eq!(log.load(0).expect("load"), 0);
        ingest(&log, &runtime, 1, b"a");
        log.write_pending();
        log.committed(1);
        ingest(&log, &runtime, 2, b"old");
        log.write_pending();
        ingest(&log, &runtime, 2, b"new");
        log.committed(1);
        assert!(!resent(&log, 2, b"old"), "replaced");
        assert!(!resent(&log, 2, b"new"), "not written before the commit");
        log.commit_failed();
        log.write_pending();
        assert!(!in_tree(&db, 2));
        assert!(in_tree(&db, 1));
        assert_eq!(log.records(), 1);
        assert!(resent(&log, 1, b"a"));
    }

    /// 300 records of one session take two tree entries (buckets of 256 packet ids), and a
    /// restart loads them back from those entries, without the record removed since.
    #[test]
    fn redelivery_records_share_bucket_entries_and_reload() {
        let (db, log, runtime) = log();
        assert_eq!(log.load(0).expect("load"), 0);
        for pkid in 1..=300u16 {
            ingest(&log, &runtime, pkid, &pkid.to_be_bytes());
        }
        log.write_pending();
        log.committed(300);
        assert!(resent(&log, 5, &5u16.to_be_bytes()));
        log.write_pending();
        let tree = db.open_tree("redelivery").expect("tree");
        assert_eq!(tree.len(), 2, "one entry per 256 packet ids");
        // A restart: the journal reached seq 200, so records ending past it are dropped.
        let restarted = RedeliveryLog::open(&db, vec!["mqtt".to_owned()]).expect("open");
        assert_eq!(restarted.load(200).expect("load"), 199, "pkids 1-200 but 5");
        assert!(
            !resent(&restarted, 5, &5u16.to_be_bytes()),
            "removed before"
        );
        assert!(resent(&restarted, 6, &6u16.to_be_bytes()));
        assert!(resent(&restarted, 200, &200u16.to_be_bytes()));
        assert!(
            !resent(&restarted, 201, &201u16.to_be_bytes()),
            "past the journal"
        );
        assert!(!in_tree(&db, 201), "dropped from the tree at load");
        assert_eq!(tree.len(), 1, "the second bucket held only dropped records");
    }

    /// Entries of the first layout (one per record) are moved into buckets at load; those
    /// past the journal and of unknown sources are deleted.
    #[test]
    fn redelivery_load_converts_single_record_entries() {
        let (db, log, _runtime) = log();
        let tree = db.open_tree("redelivery").expect("tree");
        let old_entry = |pkid: u16, payload: &[u8], end_seq: u64| {
            let mut value = message_hash(b"t", payload).to_be_bytes().to_vec();
            value.extend_from_slice(&end_seq.to_be_bytes());
            tree.insert(&record_key("mqtt", "sensor", pkid)[..], value)
                .expect("insert");
        };
        old_entry(7, b"21.5", 10);
        old_entry(8, b"22.0", 20);
        tree.insert(
            &record_key("gone", "sensor", 7)[..],
            &[0u8; VALUE_BYTES][..],
        )
        .expect("insert");
        assert_eq!(log.load(15).expect("load"), 1);
        assert_eq!(tree.len(), 1, "one bucket, nothing else");
        assert!(in_tree(&db, 7));
        assert!(!in_tree(&db, 8));
        assert!(!resent(&log, 8, b"22.0"));
        assert!(resent(&log, 7, b"21.5"));
    }
}
