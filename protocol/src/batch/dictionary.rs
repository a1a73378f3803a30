//! Per-session series dictionaries: how batches avoid re-sending series keys.
//!
//! A batch names series by agent-assigned [`SeriesId`]s. The full [`SeriesKey`]
//! (device, metric, tags) travels only while the receiver may not know it in the
//! current session. Batches are retried, reordered and replayed from disk, so the
//! sender counts an id as known only once a batch that defined it was *acked*:
//! until then every batch that uses the id carries its definition again. The
//! receiver learns definitions per session and refuses a batch that uses an id it
//! cannot resolve, naming the id, so the sender can resend with definitions.
//!
//! Both sides are plain bookkeeping (no IO, no clock): the agent and collector
//! call them around their session logic and reset them when a session ends.

use std::collections::{HashMap, HashSet};

use thiserror::Error;

use super::Batch;
use crate::model::{SeriesDef, SeriesId, SeriesKey};

/// Why a batch's series could not be resolved or learnt by the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DictionaryError {
    #[error(
        "batch uses series id {id}, which neither the batch nor this session defines; \
         the sender must resend the batch with that series' definition"
    )]
    UnknownSeries { id: SeriesId },
    #[error(
        "batch redefines series id {id} as {new:?}, but this session already maps it to {known:?}; \
         series ids must stay stable for a session (start a new session after renumbering)"
    )]
    ConflictingDefinition {
        id: SeriesId,
        known: Box<SeriesKey>,
        new: Box<SeriesKey>,
    },
    #[error(
        "session would know {would_know} series, limit is {limit}; raise the limit or split the \
         agent's series over sessions"
    )]
    TooManySeries { would_know: usize, limit: usize },
}

/// The ids a batch refers to (readings and summaries), sorted and deduplicated.
pub fn series_ids_used(batch: &Batch) -> Vec<SeriesId> {
    let mut ids: Vec<SeriesId> = batch
        .readings
        .iter()
        .map(|reading| reading.series)
        .chain(batch.summaries.iter().map(|summary| summary.series))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The sender's view: which series ids the receiver has confirmed knowing in this
/// session.
#[derive(Debug, Clone, Default)]
pub struct SenderSessionDictionary {
    confirmed: HashSet<SeriesId>,
}

impl SenderSessionDictionary {
    pub fn new() -> Self {
        Self::default()
    }

    /// Of the ids a batch uses, those whose definitions the batch must carry.
    pub fn definitions_needed(&self, used_ids: &[SeriesId]) -> Vec<SeriesId> {
        used_ids
            .iter()
            .copied()
            .filter(|id| !self.confirmed.contains(id))
            .collect()
    }

    /// Records that the receiver acked a batch carrying these definitions.
    pub fn confirm(&mut self, defined_ids: impl IntoIterator<Item = SeriesId>) {
        self.confirmed.extend(defined_ids);
    }

    pub fn is_confirmed(&self, id: SeriesId) -> bool {
        self.confirmed.contains(&id)
    }

    /// Forgets everything: call when a session ends (the receiver forgets too).
    pub fn reset(&mut self) {
        self.confirmed.clear();
    }
}

/// The receiver's per-session map from series id to key.
#[derive(Debug, Clone)]
pub struct ReceiverSessionDictionary {
    keys: HashMap<SeriesId, SeriesKey>,
    max_series: usize,
}

impl ReceiverSessionDictionary {
    /// A dictionary that refuses to grow past `max_series` entries, bounding the
    /// memory one session can claim.
    pub fn new(max_series: usize) -> Self {
        Self {
            keys: HashMap::new(),
            max_series,
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key(&self, id: SeriesId) -> Option<&SeriesKey> {
        self.keys.get(&id)
    }

    /// Checks, without changing anything, that the batch's definitions agree with
    /// the session and that every id it uses resolves.
    pub fn check(&self, batch: &Batch) -> Result<(), DictionaryError> {
        let mut new_ids = 0usize;
        for def in &batch.series {
            match self.keys.get(&def.id) {
                Some(known) if *known != def.key => {
                    return Err(DictionaryError::ConflictingDefinition {
                        id: def.id,
                        known: Box::new(known.clone()),
                        new: Box::new(def.key.clone()),
                    })
                }
                Some(_) => {}
                None => new_ids += 1,
            }
        }
        let would_know = self.keys.len() + new_ids;
        if would_know > self.max_series {
            return Err(DictionaryError::TooManySeries {
                would_know,
                limit: self.max_series,
            });
        }
        let mut batch_defined: Vec<SeriesId> = batch.series.iter().map(|def| def.id).collect();
        batch_defined.sort_unstable();
        for id in series_ids_used(batch) {
            if !self.keys.contains_key(&id) && batch_defined.binary_search(&id).is_err() {
                return Err(DictionaryError::UnknownSeries { id });
            }
        }
        Ok(())
    }

    /// Checks the batch, then learns its definitions. On error nothing is learnt.
    pub fn accept(&mut self, batch: &Batch) -> Result<(), DictionaryError> {
        self.check(batch)?;
        for SeriesDef { id, key } in &batch.series {
            self.keys.entry(*id).or_insert_with(|| key.clone());
        }
        Ok(())
    }

    /// Forgets everything: call when the session ends.
    pub fn reset(&mut self) {
        self.keys.clear();
    }
}
