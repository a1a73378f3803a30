//! The window engine: event-time tumbling rollups with per-agent watermarks, allowed
//! lateness, early (running) emission, exact dedup and a checkpoint.
//!
//! Why it looks like this:
//! - Sans-IO: the engine is fed decoded batches and a `now_ms`, and appends results to
//!   an [`EngineOutput`]. `now_ms` should be the log append time of the record being
//!   processed (and the wall clock only when the consumer has caught up with the log):
//!   then every decision (lateness, idle flush, gap timeout, emission ticks) is a function
//!   of the log, and a replay from a checkpoint reproduces the same output.
//! - Windows belong to the agent that sent their data: window state is keyed by (agent,
//!   series, resolution, window start) and closed by that agent's watermark only, so a
//!   silent agent holds back nothing but its own windows. A series is expected to come
//!   from one agent (its device's gateway); data for one series from two agents makes two
//!   windows with the same storage key, which the `series_shared_between_agents` counter
//!   reports.
//! - A batch is judged as a whole against the watermark as it was before the batch, then
//!   the watermark moves: the order of items inside a batch never matters.
//! - Versions: a result's `version` is the number of readings merged into the window so
//!   far, with [`FINAL_VERSION_BIT`] set on the final emission. Storage keeps the highest
//!   version, so however a crash and replay interleave emissions, a fuller result is never
//!   replaced by an emptier one, and the final result always wins.
//! - Hot path: one hash lookup per item and resolution in a map keyed by small integers
//!   with a fast hasher (skipped when consecutive items hit the same window, as sorted
//!   batches do), summaries updated in place in a slab; no allocation per reading.
//! - Results share the window's summary (`Arc<Summary>`) instead of copying it: a running
//!   emission is a reference count, and the window copies its summary (copy on write,
//!   into a recycled allocation) only if it changes while a result still holds the old
//!   value. The consumer drops its results before the next batch, so that copy is rare.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::mem::size_of;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tributary_protocol::{Batch, SeriesDef, SeriesKey, Summary};

use super::config::{EngineConfig, RollupSource};
use super::hash::FastHashMap;
use super::sequence::{SequenceEffects, SequenceTracker};
use super::ProcessError;

/// Set in [`WindowResult::version`] on a window's final emission.
pub const FINAL_VERSION_BIT: u64 = 1 << 63;

/// One emission of one rollup window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowResult {
    pub agent_id: Arc<str>,
    pub series: Arc<SeriesKey>,
    pub resolution_ms: i64,
    pub window_start_ms: i64,
    /// The window's summary as it was at this emission. Shared with the engine while the
    /// window is open (emitting a running result copies nothing; a window that changes
    /// while a result still holds its summary copies it first, so a result never
    /// changes): read it, or clone the `Summary` to keep a copy of your own.
    pub summary: Arc<Summary>,
    /// Readings merged so far; [`FINAL_VERSION_BIT`] set when `is_final`.
    pub version: u64,
    /// No later emission of this window will follow.
    pub is_final: bool,
}

/// What a refused item was.
#[derive(Debug, Clone, PartialEq)]
pub enum LateItem {
    Reading {
        time_ms: i64,
        value: f64,
    },
    Summary {
        window_start_ms: i64,
        window_ms: u32,
        summary: Summary,
    },
}

impl LateItem {
    /// How many readings the item stands for.
    pub fn readings_worth(&self) -> u64 {
        match self {
            LateItem::Reading { .. } => 1,
            LateItem::Summary { summary, .. } => summary.count,
        }
    }
}

/// Why an item did not go into a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateReason {
    /// Its window had already closed (watermark past end plus allowed lateness, or the
    /// agent's windows were flushed as idle).
    WindowClosed,
    /// Its event time was more than `max_event_time_ahead_ms` after the log time.
    TooFarAhead,
    /// Its value (or a summary field) was not a finite number, or a summary was
    /// inconsistent (min above max).
    Invalid,
    /// Its event time is so extreme that window arithmetic overflows.
    EventTimeOutOfRange,
}

/// An item reported instead of being windowed: rows for the late-data table.
#[derive(Debug, Clone, PartialEq)]
pub struct LateReading {
    pub agent_id: Arc<str>,
    pub batch_seq: u64,
    pub series: Arc<SeriesKey>,
    /// The resolution whose window refused it; `None` when refused before windowing (for
    /// every resolution), see [`LateReason`].
    pub resolution_ms: Option<i64>,
    /// Start of the window it belonged to, when computable.
    pub window_start_ms: Option<i64>,
    pub item: LateItem,
    pub reason: LateReason,
}

/// Where the engine appends what it emits. The caller drains it after each call.
///
/// Reuse one output and [`EngineOutput::clear`] it between calls: results hold their
/// window's summary until they are dropped, and a window that changes while its last
/// result is still held must copy its summary first (copy on write), so clearing before
/// the next call keeps the engine from copying at all. `clear` also keeps the summaries
/// of final results nobody else holds (up to [`MAX_SPARE_SUMMARIES`]): new windows and
/// copies on write reuse their sketch allocations instead of allocating.
#[derive(Debug, Default, Clone)]
pub struct EngineOutput {
    pub results: Vec<WindowResult>,
    pub late: Vec<LateReading>,
    /// Recycled summaries, each held only here (scratch, not part of the output's value).
    spare: Vec<Arc<Summary>>,
}

/// Summaries an [`EngineOutput`] keeps for reuse: enough for the windows a busy batch
/// opens, few enough that the kept sketches stay a small part of the engine's memory.
pub const MAX_SPARE_SUMMARIES: usize = 4_096;

impl PartialEq for EngineOutput {
    fn eq(&self, other: &Self) -> bool {
        self.results == other.results && self.late == other.late
    }
}

impl EngineOutput {
    pub fn clear(&mut self) {
        for result in self.results.drain(..) {
            if self.spare.len() >= MAX_SPARE_SUMMARIES {
                break;
            }
            // Running results share their summary with an open window: only a final
            // result's summary (or one whose window closed since) is free to reuse.
            let mut summary = result.summary;
            // The count first: a plain load, where `get_mut` is an atomic exchange.
            if Arc::strong_count(&summary) == 1 && Arc::get_mut(&mut summary).is_some() {
                self.spare.push(summary);
            }
        }
        self.results.clear();
        self.late.clear();
    }

    /// A copy of `source` held by nobody else, in a recycled summary when one is spare.
    fn copy_of(&mut self, source: &Summary) -> Arc<Summary> {
        let Some(mut shared) = self.spare.pop() else {
            return Arc::new(source.clone());
        };
        let Some(copy) = Arc::get_mut(&mut shared) else {
            // Not reachable (spares are unique when kept); a fresh copy is still right.
            return Arc::new(source.clone());
        };
        // Destructured without `..`: a field added to `Summary` must be copied here too.
        let Summary {
            count,
            sum,
            min,
            max,
            first_time_ms,
            first_value,
            last_time_ms,
            last_value,
            sketch,
        } = source;
        copy.count = *count;
        copy.sum = *sum;
        copy.min = *min;
        copy.max = *max;
        copy.first_time_ms = *first_time_ms;
        copy.first_value = *first_value;
        copy.last_time_ms = *last_time_ms;
        copy.last_value = *last_value;
        copy.sketch.clone_from(sketch);
        shared
    }
}

/// The window summary `summary`, ready to be changed: copied first (into a spare of
/// `out`) if an emitted result still shares it, so that the result keeps the value it
/// was emitted with.
#[inline]
fn writable<'a>(summary: &'a mut Arc<Summary>, out: &mut EngineOutput) -> &'a mut Summary {
    if Arc::strong_count(summary) != 1 {
        *summary = out.copy_of(summary);
    }
    // Unique by now (the engine makes no weak references): no second copy.
    Arc::make_mut(summary)
}

/// What happened to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    Processed,
    /// `(agent_id, batch_seq)` was processed before; nothing changed.
    Duplicate,
}

/// Counters the engine keeps; checkpointed with its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineCounters {
    pub batches_processed: u64,
    pub duplicate_batches: u64,
    /// Readings' worth merged into windows, summed over resolutions.
    pub readings_windowed: u64,
    /// Readings' worth reported late because their window had closed (over resolutions).
    pub readings_late: u64,
    /// Readings' worth refused before windowing (too far ahead, invalid, out of range).
    pub readings_refused: u64,
    /// Items of the input not selected by `rollup_source` (they feed only the raw table).
    pub items_not_rolled_up: u64,
    /// Edge summaries whose window does not divide a resolution or does not start on its
    /// own boundary; they are assigned by their window start.
    pub misaligned_summaries: u64,
    pub windows_opened: u64,
    pub windows_finalised: u64,
    pub windows_flushed_idle: u64,
    pub running_emissions: u64,
    pub sequence_numbers_skipped: u64,
    pub sequence_numbers_assumed_seen: u64,
    pub series_shared_between_agents: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct WindowKey {
    agent: u32,
    series: u32,
    resolution_index: u8,
    window_start_ms: i64,
}

#[derive(Debug, Clone)]
struct WindowSlot {
    key: WindowKey,
    /// Shared with the results emitted since the window last changed.
    summary: Arc<Summary>,
    dirty: bool,
    occupied: bool,
    /// Bumped each time the slot is reused, so that a stale entry in the emission queue
    /// never stands for the slot's next window (emission order must not depend on slot
    /// reuse, which differs after a restore).
    generation: u32,
}

#[derive(Debug)]
struct AgentState {
    id: Arc<str>,
    sequences: SequenceTracker,
    /// Per resolution: every window ending at or before this is closed.
    closed_through_ms: Vec<i64>,
    last_activity_ms: i64,
    /// Per resolution: open windows by start, to close them in order.
    open: Vec<OpenWindows>,
    /// The agent's series ids to engine series numbers, as last resolved. Only a cache
    /// (not checkpointed): every hit is confirmed by comparing the series key, which is
    /// cheaper than hashing it.
    series_cache: FastHashMap<u32, u32>,
    /// The series ids the agent's last processed batch defined, to engine series numbers:
    /// what its items are resolved through.
    batch_series: FastHashMap<u32, u32>,
    /// That batch's definitions in its order, as `(series id, engine number)`, and how
    /// many named a series first seen from another agent. An agent's batches usually
    /// define the same series in the same order (each 10 s batch of a 1,000-series gateway
    /// carries 1,000 definitions): a batch whose definitions match these position by
    /// position (ids equal, keys equal to the interned ones) resolves to `batch_series`
    /// as it is, with one key comparison per definition and no hashing. Not checkpointed.
    batch_definitions: Vec<(u32, u32)>,
    batch_definitions_shared: u64,
}

/// `left == right` for series keys, with the short strings they hold compared inline.
///
/// Why by hand: every batch repeats its series definitions (a 10 s batch of a
/// 1,000-series gateway carries 1,000), and each is confirmed by comparing its key with
/// the interned one; the derived comparison calls `memcmp` for each of a key's five or so
/// strings of 1-16 bytes, which cost as much as windowing the batch's summaries.
#[inline]
fn same_series_key(left: &SeriesKey, right: &SeriesKey) -> bool {
    same_text(&left.device_id, &right.device_id)
        && same_text(&left.metric, &right.metric)
        && left.tags.len() == right.tags.len()
        && left.tags.iter().zip(&right.tags).all(
            |((left_name, left_value), (right_name, right_value))| {
                same_text(left_name, right_name) && same_text(left_value, right_value)
            },
        )
}

/// `left == right`; strings of up to 16 bytes are compared as two (overlapping) words.
#[inline]
fn same_text(left: &str, right: &str) -> bool {
    let (left, right) = (left.as_bytes(), right.as_bytes());
    let length = left.len();
    if length != right.len() {
        return false;
    }
    fn word<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
        bytes.get(at..at + N)?.try_into().ok()
    }
    fn same_words<const N: usize>(left: &[u8], right: &[u8], last: usize) -> Option<bool> {
        Some(
            word::<N>(left, 0)? == word::<N>(right, 0)?
                && word::<N>(left, last)? == word::<N>(right, last)?,
        )
    }
    let same = match length {
        0 => Some(true),
        1..=3 => Some(
            left.first() == right.first()
                && left.get(length / 2) == right.get(length / 2)
                && left.last() == right.last(),
        ),
        4..=7 => same_words::<4>(left, right, length - 4),
        8..=16 => same_words::<8>(left, right, length - 8),
        _ => None,
    };
    same.unwrap_or_else(|| left == right)
}

/// Agent series ids cached per agent before the cache is dropped and rebuilt.
const MAX_CACHED_SERIES_IDS_PER_AGENT: usize = 1 << 20;

/// The engine number of a known series, and whether it came from the agent's cache:
/// from the cache when the key matches, else from the series index.
#[inline]
fn known_series(
    series: &SeriesTable,
    cache: Option<&FastHashMap<u32, u32>>,
    definition: &SeriesDef,
) -> Option<(u32, bool)> {
    if let Some(number) = cache.and_then(|cache| cache.get(&definition.id)) {
        if series
            .keys
            .get(*number as usize)
            .is_some_and(|key| same_series_key(key, &definition.key))
        {
            return Some((*number, true));
        }
    }
    series
        .index
        .get(&definition.key)
        .map(|number| (*number, false))
}

/// How a batch's series definitions were resolved.
enum Resolution {
    /// Nothing to resolve (no item is rolled up).
    Skipped,
    /// The same definitions as the agent's previous batch: `batch_series` holds them.
    Same,
    /// Resolved into the engine's `local_series`: `cache_missed` when the agent's series
    /// cache should learn them, `shared` definitions name another agent's series.
    Resolved { cache_missed: bool, shared: u64 },
}

/// Refuses a batch whose rolled-up items use an id it does not define. For edge summaries,
/// also records each summary's value in `ids` (`summary_series`), so windowing looks none
/// up again.
fn check_items_defined(
    batch: &Batch,
    ids: &FastHashMap<u32, u32>,
    source: RollupSource,
    summary_series: &mut Vec<u32>,
) -> Result<(), ProcessError> {
    let undefined = |series_id: u32| ProcessError::UndefinedSeries {
        agent_id: batch.agent_id.clone(),
        batch_seq: batch.batch_seq,
        series_id,
    };
    summary_series.clear();
    if source == RollupSource::EdgeSummaries {
        let mut last: Option<(u32, u32)> = None;
        for summary in &batch.summaries {
            let number = match last {
                Some((id, number)) if id == summary.series => number,
                _ => {
                    let number = *ids
                        .get(&summary.series)
                        .ok_or_else(|| undefined(summary.series))?;
                    last = Some((summary.series, number));
                    number
                }
            };
            summary_series.push(number);
        }
    } else {
        let mut last_checked = None;
        for reading in &batch.readings {
            if last_checked != Some(reading.series) && !ids.contains_key(&reading.series) {
                return Err(undefined(reading.series));
            }
            last_checked = Some(reading.series);
        }
    }
    Ok(())
}

impl AgentState {
    fn has_open_windows(&self) -> bool {
        self.open.iter().any(|windows| windows.len > 0)
    }
}

/// An agent's open windows of one resolution, grouped by window start: closing takes
/// whole groups from the front, in (start, series) order.
///
/// Why groups and not one ordered map entry per window: an agent's windows of one
/// resolution share a handful of starts, so opening a window is a lookup among those few
/// starts and a push (a `BTreeMap<(start, series), slot>` insert cost about 540
/// instructions and node allocations, a tenth of the edge-summary path); a group's list
/// is sorted by series once, when it closes, and its allocation is kept for a later start.
#[derive(Debug, Clone, Default)]
struct OpenWindows {
    /// `(series, slot)` of the open windows of each start, in opening order.
    by_start: BTreeMap<i64, Vec<(u32, u32)>>,
    /// Emptied lists, kept for the next starts.
    spare_lists: Vec<Vec<(u32, u32)>>,
    /// Open windows over all starts.
    len: usize,
}

/// Emptied lists an [`OpenWindows`] keeps (a few starts are open at a time).
const MAX_SPARE_OPEN_LISTS: usize = 8;

impl OpenWindows {
    fn insert(&mut self, window_start_ms: i64, series: u32, slot: u32) {
        let spare_lists = &mut self.spare_lists;
        self.by_start
            .entry(window_start_ms)
            .or_insert_with(|| spare_lists.pop().unwrap_or_default())
            .push((series, slot));
        self.len += 1;
    }

    fn last_start(&self) -> Option<i64> {
        self.by_start.last_key_value().map(|(start, _)| *start)
    }

    /// Removes the windows starting at or before `last_closed_start_ms`, calling `close`
    /// with each slot in (start, series) order.
    fn close_through(&mut self, last_closed_start_ms: i64, mut close: impl FnMut(u32)) {
        while let Some(entry) = self.by_start.first_entry() {
            if *entry.key() > last_closed_start_ms {
                break;
            }
            let mut list = entry.remove();
            list.sort_unstable_by_key(|(series, _)| *series);
            self.len = self.len.saturating_sub(list.len());
            for (_, slot) in list.drain(..) {
                close(slot);
            }
            if self.spare_lists.len() < MAX_SPARE_OPEN_LISTS {
                self.spare_lists.push(list);
            }
        }
    }
}

#[derive(Debug, Default)]
struct SeriesTable {
    keys: Vec<Arc<SeriesKey>>,
    owners: Vec<u32>,
    index: FastHashMap<Arc<SeriesKey>, u32>,
}

/// The window slab, its index and the running-emission queue.
#[derive(Debug, Default)]
struct WindowStore {
    index: FastHashMap<WindowKey, u32>,
    slots: Vec<WindowSlot>,
    free: Vec<u32>,
    /// `(slot, generation)` of windows that became dirty, in the order they did (may hold
    /// stale entries).
    dirty: Vec<(u32, u32)>,
    /// The slot each (series, resolution) last used, at `series * resolutions +
    /// resolution_index`: a hint confirmed by comparing the slot's key, so most items
    /// (the next summary or reading of a series lands in its current window) skip the
    /// hash lookup. `NO_SLOT` when none. Not checkpointed: slots differ after a restore.
    recent_slot: Vec<u32>,
    resolutions: usize,
    /// The summary of a window nothing went into yet, shared by all of them.
    empty: Arc<Summary>,
}

const NO_SLOT: u32 = u32::MAX;

impl WindowStore {
    /// The slot of `key`, opened (and registered with the agent) if it does not exist.
    #[inline]
    fn slot_for(
        &mut self,
        key: WindowKey,
        agent: &mut AgentState,
        counters: &mut EngineCounters,
    ) -> u32 {
        let recent = (key.series as usize)
            .saturating_mul(self.resolutions)
            .saturating_add(usize::from(key.resolution_index));
        if let Some(hint) = self.recent_slot.get(recent) {
            if self
                .slots
                .get(*hint as usize)
                .is_some_and(|entry| entry.occupied && entry.key == key)
            {
                return *hint;
            }
        }
        let slot = match self.index.entry(key) {
            Entry::Occupied(entry) => *entry.get(),
            Entry::Vacant(entry) => {
                let slot = Self::take_slot(&mut self.slots, &mut self.free, &self.empty, key);
                entry.insert(slot);
                if let Some(open) = agent.open.get_mut(usize::from(key.resolution_index)) {
                    open.insert(key.window_start_ms, key.series, slot);
                }
                counters.windows_opened += 1;
                slot
            }
        };
        if recent >= self.recent_slot.len() && recent < usize::MAX / 2 {
            let length = (recent + 1).next_power_of_two().max(64);
            self.recent_slot.resize(length, NO_SLOT);
        }
        if let Some(hint) = self.recent_slot.get_mut(recent) {
            *hint = slot;
        }
        slot
    }

    /// A slot for the new window `key` (a free one reused, or a new one), not yet in the
    /// index. Takes the fields, not `self`, so the caller can hold an index entry.
    fn take_slot(
        slots: &mut Vec<WindowSlot>,
        free: &mut Vec<u32>,
        empty: &Arc<Summary>,
        key: WindowKey,
    ) -> u32 {
        match free.pop() {
            Some(slot) => {
                if let Some(entry) = slots.get_mut(slot as usize) {
                    entry.key = key;
                    entry.summary = empty.clone();
                    entry.dirty = false;
                    entry.occupied = true;
                    entry.generation = entry.generation.wrapping_add(1);
                }
                slot
            }
            None => {
                slots.push(WindowSlot {
                    key,
                    summary: empty.clone(),
                    dirty: false,
                    occupied: true,
                    generation: 0,
                });
                (slots.len() - 1) as u32
            }
        }
    }

    /// Queues the slot for the next running emission; its summary, to update (through
    /// [`writable`]).
    #[inline]
    fn mark_dirty(&mut self, slot: u32) -> Option<&mut Arc<Summary>> {
        let entry = self.slots.get_mut(slot as usize)?;
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push((slot, entry.generation));
        }
        Some(&mut entry.summary)
    }

    /// Removes a slot, returning its key and summary.
    fn release(&mut self, slot: u32) -> Option<(WindowKey, Arc<Summary>)> {
        let entry = self.slots.get_mut(slot as usize)?;
        if !entry.occupied {
            return None;
        }
        entry.occupied = false;
        entry.dirty = false;
        let summary = std::mem::replace(&mut entry.summary, self.empty.clone());
        let key = entry.key;
        self.index.remove(&key);
        self.free.push(slot);
        Some((key, summary))
    }
}

/// Floor of `time_ms` to a multiple of `resolution_ms`, or `None` on overflow.
#[inline]
fn window_start(time_ms: i64, resolution_ms: i64) -> Option<i64> {
    time_ms.checked_sub(time_ms.rem_euclid(resolution_ms))
}

fn summary_is_valid(summary: &Summary) -> bool {
    summary.sum.is_finite()
        && summary.min.is_finite()
        && summary.max.is_finite()
        && summary.first_value.is_finite()
        && summary.last_value.is_finite()
        && summary.min <= summary.max
}

/// Event-time window engine for the partitions of one log consumer. See the module docs.
///
/// Run one engine per log partition, so that its checkpoint travels with that
/// partition's offset when partitions move between processors.
#[derive(Debug)]
pub struct WindowEngine {
    config: EngineConfig,
    series: SeriesTable,
    agents: Vec<AgentState>,
    agent_index: HashMap<Arc<str>, u32>,
    windows: WindowStore,
    next_tick_ms: Option<i64>,
    counters: EngineCounters,
    /// Scratch: a batch's series ids to engine series numbers while they are resolved
    /// (then swapped into the agent's `batch_series`).
    local_series: FastHashMap<u32, u32>,
    /// Scratch: per edge summary of the batch, its engine series number (resolved once,
    /// while checking that every id is defined).
    summary_series: Vec<u32>,
    /// Scratch: per definition of the batch, its engine number if it was known when
    /// checked, and whether the agent's cache gave it (`resolve_series` looks each up once).
    resolved_series: Vec<Option<(u32, bool)>>,
    /// Scratch: per resolution, the window start of the edge window being windowed.
    edge_window_starts: Vec<Option<i64>>,
}

impl WindowEngine {
    /// An engine with empty state.
    pub fn new(config: EngineConfig) -> Result<Self, ProcessError> {
        config.validate()?;
        let resolutions = config.resolutions_ms.len();
        Ok(Self {
            config,
            series: SeriesTable::default(),
            agents: Vec::new(),
            agent_index: HashMap::new(),
            windows: WindowStore {
                resolutions,
                ..WindowStore::default()
            },
            next_tick_ms: None,
            counters: EngineCounters::default(),
            local_series: FastHashMap::default(),
            summary_series: Vec::new(),
            resolved_series: Vec::new(),
            edge_window_starts: Vec::new(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    /// Windows currently open, over all agents and resolutions.
    pub fn open_windows(&self) -> usize {
        self.windows.index.len()
    }

    /// Series interned so far.
    pub fn series_count(&self) -> usize {
        self.series.keys.len()
    }

    /// The largest event time inside `agent_id`'s contiguous batch-sequence prefix; the
    /// watermark is this minus `out_of_orderness_ms`.
    pub fn agent_prefix_max_event_ms(&self, agent_id: &str) -> Option<i64> {
        let agent = self.agents.get(*self.agent_index.get(agent_id)? as usize)?;
        agent.sequences.prefix_max_event_ms()
    }

    /// Processes one batch read from the log at log time `now_ms`.
    ///
    /// Errors leave the state unchanged (the batch is not recorded as seen): the caller
    /// should report the record and move on (it can never succeed on retry).
    pub fn ingest_batch(
        &mut self,
        batch: &Batch,
        now_ms: i64,
        out: &mut EngineOutput,
    ) -> Result<IngestOutcome, ProcessError> {
        let known_agent = self.agent_index.get(batch.agent_id.as_str()).copied();
        if let Some(agent) = known_agent {
            if self
                .agents
                .get(agent as usize)
                .is_some_and(|state| state.sequences.is_seen(batch.batch_seq))
            {
                self.counters.duplicate_batches += 1;
                return Ok(IngestOutcome::Duplicate);
            }
        } else if self.agents.len() >= self.config.max_agents {
            return Err(ProcessError::TooManyAgents {
                agent_id: batch.agent_id.clone(),
                max_agents: self.config.max_agents,
            });
        }
        let agent = known_agent.unwrap_or(self.agents.len() as u32);
        let uses_summaries = self.config.rollup_source == RollupSource::EdgeSummaries;
        let rolled_up_items = if uses_summaries {
            batch.summaries.len()
        } else {
            batch.readings.len()
        };
        let resolution = if rolled_up_items > 0 {
            self.resolve_series(batch, agent)?
        } else {
            Resolution::Skipped
        };
        let agent = match known_agent {
            Some(agent) => agent,
            None => self.add_agent(&batch.agent_id),
        };
        if let Resolution::Resolved {
            cache_missed,
            shared,
        } = resolution
        {
            if let Some(state) = self.agents.get_mut(agent as usize) {
                if cache_missed {
                    if state.series_cache.len() > MAX_CACHED_SERIES_IDS_PER_AGENT {
                        state.series_cache.clear();
                    }
                    state
                        .series_cache
                        .extend(self.local_series.iter().map(|(id, number)| (*id, *number)));
                }
                std::mem::swap(&mut state.batch_series, &mut self.local_series);
                state.batch_definitions_shared = shared;
                state.batch_definitions.clear();
                state
                    .batch_definitions
                    .extend(batch.series.iter().filter_map(|definition| {
                        state
                            .batch_series
                            .get(&definition.id)
                            .map(|number| (definition.id, *number))
                    }));
            }
        }
        let ignored_items = if uses_summaries {
            batch.readings.len()
        } else {
            batch.summaries.len()
        };
        self.counters.items_not_rolled_up += ignored_items as u64;

        let max_event_ms = if uses_summaries {
            self.window_summaries(batch, agent, now_ms, out)
        } else {
            self.window_readings(batch, agent, now_ms, out)
        };

        let Some(state) = self.agents.get_mut(agent as usize) else {
            return Ok(IngestOutcome::Processed);
        };
        state.last_activity_ms = now_ms;
        let effects = state.sequences.record(
            batch.batch_seq,
            max_event_ms,
            now_ms,
            self.config.max_dedup_intervals_per_agent,
            self.config.max_pending_batches_per_agent,
        );
        self.counters.batches_processed += 1;
        self.after_sequence_change(agent, effects, out);
        self.tick(now_ms, out);
        Ok(IngestOutcome::Processed)
    }

    /// Advances processing time without a batch: runs due gap timeouts, idle flushes and
    /// running emissions. Call it with the wall clock when the consumer is caught up.
    pub fn advance_time(&mut self, now_ms: i64, out: &mut EngineOutput) {
        self.tick(now_ms, out);
    }

    /// Finalises every open window of every agent now (for a clean shutdown of a
    /// processor whose partition is being retired, and for tests).
    pub fn flush_all(&mut self, now_ms: i64, out: &mut EngineOutput) {
        for agent in 0..self.agents.len() as u32 {
            self.flush_agent(agent, now_ms, out);
        }
        self.emit_running(out);
    }

    fn add_agent(&mut self, agent_id: &str) -> u32 {
        let id: Arc<str> = Arc::from(agent_id);
        let number = self.agents.len() as u32;
        let resolutions = self.config.resolutions_ms.len();
        self.agents.push(AgentState {
            id: id.clone(),
            sequences: SequenceTracker::default(),
            closed_through_ms: vec![i64::MIN; resolutions],
            last_activity_ms: i64::MIN,
            open: vec![OpenWindows::default(); resolutions],
            series_cache: FastHashMap::default(),
            batch_series: FastHashMap::default(),
            batch_definitions: Vec::new(),
            batch_definitions_shared: 0,
        });
        self.agent_index.insert(id, number);
        number
    }

    /// Resolves the batch's series ids to engine numbers, interning new series; checks
    /// every used id first so that an error changes nothing. Fills `summary_series` (edge
    /// summaries mode). A batch defining what the agent's previous batch defined resolves
    /// to the agent's `batch_series` as it is ([`Resolution::Same`]); otherwise the ids go
    /// into `local_series`, for the caller to swap into the agent.
    fn resolve_series(&mut self, batch: &Batch, agent: u32) -> Result<Resolution, ProcessError> {
        if let Some(state) = self.agents.get(agent as usize) {
            let same = state.batch_definitions.len() == batch.series.len()
                && batch.series.iter().zip(&state.batch_definitions).all(
                    |(definition, (id, number))| {
                        definition.id == *id
                            && self
                                .series
                                .keys
                                .get(*number as usize)
                                .is_some_and(|key| same_series_key(key, &definition.key))
                    },
                );
            if same {
                check_items_defined(
                    batch,
                    &state.batch_series,
                    self.config.rollup_source,
                    &mut self.summary_series,
                )?;
                self.counters.series_shared_between_agents += state.batch_definitions_shared;
                return Ok(Resolution::Same);
            }
        }
        self.local_series.clear();
        let cache = self
            .agents
            .get(agent as usize)
            .map(|state| &state.series_cache);
        let mut new_series = 0usize;
        self.resolved_series.clear();
        for (position, definition) in batch.series.iter().enumerate() {
            let mut resolved = None;
            if let Some(previous) = self.local_series.insert(definition.id, position as u32) {
                if batch.series.get(previous as usize).map(|def| &def.key) != Some(&definition.key)
                {
                    return Err(ProcessError::ConflictingSeriesDefinition {
                        agent_id: batch.agent_id.clone(),
                        batch_seq: batch.batch_seq,
                        series_id: definition.id,
                    });
                }
            } else {
                resolved = known_series(&self.series, cache, definition);
                if resolved.is_none() {
                    new_series += 1;
                }
            }
            self.resolved_series.push(resolved);
        }
        // Checked against positions: every id of the batch is in `local_series` already.
        check_items_defined(
            batch,
            &self.local_series,
            self.config.rollup_source,
            &mut self.summary_series,
        )?;
        if self.series.keys.len().saturating_add(new_series) > self.config.max_series {
            return Err(ProcessError::TooManySeries {
                agent_id: batch.agent_id.clone(),
                batch_seq: batch.batch_seq,
                max_series: self.config.max_series,
            });
        }
        let mut cache_missed = false;
        let mut shared = 0;
        for (position, definition) in batch.series.iter().enumerate() {
            // Unknown when checked above (new, or a repeated definition): look again, as
            // an earlier definition of this batch may have interned it since.
            let known = match self.resolved_series.get(position).copied().flatten() {
                Some(resolved) => Some(resolved),
                None => known_series(&self.series, cache, definition),
            };
            let number = match known {
                Some((number, from_cache)) => {
                    if self.series.owners.get(number as usize) != Some(&agent) {
                        shared += 1;
                    }
                    cache_missed |= !from_cache;
                    number
                }
                None => {
                    let number = self.series.keys.len() as u32;
                    let key = Arc::new(definition.key.clone());
                    self.series.keys.push(key.clone());
                    self.series.owners.push(agent);
                    self.series.index.insert(key, number);
                    cache_missed = true;
                    number
                }
            };
            self.local_series.insert(definition.id, number);
        }
        // The item check above stored positions; now the numbers are known.
        if self.config.rollup_source == RollupSource::EdgeSummaries {
            for (edge, number) in batch.summaries.iter().zip(self.summary_series.iter_mut()) {
                if let Some(resolved) = self.local_series.get(&edge.series) {
                    *number = *resolved;
                }
            }
        }
        self.counters.series_shared_between_agents += shared;
        Ok(Resolution::Resolved {
            cache_missed,
            shared,
        })
    }

    fn series_key(&self, series: u32) -> Arc<SeriesKey> {
        self.series
            .keys
            .get(series as usize)
            .cloned()
            .unwrap_or_else(|| Arc::new(SeriesKey::new("", "")))
    }

    fn agent_id(&self, agent: u32) -> Arc<str> {
        self.agents
            .get(agent as usize)
            .map(|state| state.id.clone())
            .unwrap_or_else(|| Arc::from(""))
    }

    /// Raw-readings mode: each reading observed into its window at every resolution.
    /// Returns the largest accepted event time.
    fn window_readings(
        &mut self,
        batch: &Batch,
        agent: u32,
        now_ms: i64,
        out: &mut EngineOutput,
    ) -> Option<i64> {
        let horizon_ms = now_ms.saturating_add(self.config.max_event_time_ahead_ms);
        let mut max_event_ms: Option<i64> = None;
        // Last window hit per resolution: (series, window start, slot).
        let mut cache: [Option<(u32, i64, u32)>; 4] = [None; 4];
        let mut last_local: Option<(u32, u32)> = None;
        let state = self.agents.get_mut(agent as usize)?;
        for reading in &batch.readings {
            let series = match last_local {
                Some((local, series)) if local == reading.series => series,
                _ => match state.batch_series.get(&reading.series) {
                    Some(series) => {
                        last_local = Some((reading.series, *series));
                        *series
                    }
                    None => continue, // unreachable: resolve_series checked every id
                },
            };
            let refusal = if !reading.value.is_finite() {
                Some(LateReason::Invalid)
            } else if reading.time_ms > horizon_ms {
                Some(LateReason::TooFarAhead)
            } else {
                None
            };
            if let Some(reason) = refusal {
                self.counters.readings_refused += 1;
                out.late.push(LateReading {
                    agent_id: state.id.clone(),
                    batch_seq: batch.batch_seq,
                    series: self
                        .series
                        .keys
                        .get(series as usize)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(SeriesKey::new("", ""))),
                    resolution_ms: None,
                    window_start_ms: None,
                    item: LateItem::Reading {
                        time_ms: reading.time_ms,
                        value: reading.value,
                    },
                    reason,
                });
                continue;
            }
            max_event_ms =
                Some(max_event_ms.map_or(reading.time_ms, |max| max.max(reading.time_ms)));
            for (resolution_index, resolution_ms) in self.config.resolutions_ms.iter().enumerate() {
                let Some(start_ms) = window_start(reading.time_ms, *resolution_ms) else {
                    // Only i64::MIN-adjacent times overflow; report once per resolution.
                    self.counters.readings_late += 1;
                    out.late.push(LateReading {
                        agent_id: state.id.clone(),
                        batch_seq: batch.batch_seq,
                        series: self
                            .series
                            .keys
                            .get(series as usize)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(SeriesKey::new("", ""))),
                        resolution_ms: Some(*resolution_ms),
                        window_start_ms: None,
                        item: LateItem::Reading {
                            time_ms: reading.time_ms,
                            value: reading.value,
                        },
                        reason: LateReason::EventTimeOutOfRange,
                    });
                    continue;
                };
                let closed_through = state
                    .closed_through_ms
                    .get(resolution_index)
                    .copied()
                    .unwrap_or(i64::MIN);
                if start_ms.saturating_add(*resolution_ms) <= closed_through {
                    self.counters.readings_late += 1;
                    out.late.push(LateReading {
                        agent_id: state.id.clone(),
                        batch_seq: batch.batch_seq,
                        series: self
                            .series
                            .keys
                            .get(series as usize)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(SeriesKey::new("", ""))),
                        resolution_ms: Some(*resolution_ms),
                        window_start_ms: Some(start_ms),
                        item: LateItem::Reading {
                            time_ms: reading.time_ms,
                            value: reading.value,
                        },
                        reason: LateReason::WindowClosed,
                    });
                    continue;
                }
                let cached = cache.get(resolution_index).copied().flatten();
                let slot = match cached {
                    Some((cached_series, cached_start, slot))
                        if cached_series == series && cached_start == start_ms =>
                    {
                        slot
                    }
                    _ => {
                        let key = WindowKey {
                            agent,
                            series,
                            resolution_index: resolution_index as u8,
                            window_start_ms: start_ms,
                        };
                        let slot = self.windows.slot_for(key, state, &mut self.counters);
                        if let Some(entry) = cache.get_mut(resolution_index) {
                            *entry = Some((series, start_ms, slot));
                        }
                        slot
                    }
                };
                if let Some(summary) = self.windows.mark_dirty(slot) {
                    writable(summary, out).observe(reading.time_ms, reading.value);
                    self.counters.readings_windowed += 1;
                }
            }
        }
        max_event_ms
    }

    /// Edge-summaries mode: each summary merged into the window containing its start at
    /// every resolution. Returns the largest accepted event time (a summary's last
    /// possible instant, `start + width - 1`).
    fn window_summaries(
        &mut self,
        batch: &Batch,
        agent: u32,
        now_ms: i64,
        out: &mut EngineOutput,
    ) -> Option<i64> {
        let horizon_ms = now_ms.saturating_add(self.config.max_event_time_ahead_ms);
        let mut max_event_ms: Option<i64> = None;
        let mut edge_window: Option<(i64, u32)> = None;
        let mut edge_misaligned = false;
        let state = self.agents.get_mut(agent as usize)?;
        for (edge, series) in batch.summaries.iter().zip(&self.summary_series) {
            let series = *series;
            if edge.summary.count == 0 {
                continue;
            }
            let event_ms = edge
                .window_start_ms
                .saturating_add(i64::from(edge.window_ms.max(1)) - 1);
            let refusal = if !summary_is_valid(&edge.summary) {
                Some(LateReason::Invalid)
            } else if event_ms > horizon_ms {
                Some(LateReason::TooFarAhead)
            } else {
                None
            };
            let late_item = || LateItem::Summary {
                window_start_ms: edge.window_start_ms,
                window_ms: edge.window_ms,
                summary: edge.summary.clone(),
            };
            let series_key = || {
                self.series
                    .keys
                    .get(series as usize)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(SeriesKey::new("", "")))
            };
            if let Some(reason) = refusal {
                self.counters.readings_refused += edge.summary.count;
                out.late.push(LateReading {
                    agent_id: state.id.clone(),
                    batch_seq: batch.batch_seq,
                    series: series_key(),
                    resolution_ms: None,
                    window_start_ms: None,
                    item: late_item(),
                    reason,
                });
                continue;
            }
            max_event_ms = Some(max_event_ms.map_or(event_ms, |max| max.max(event_ms)));
            // A batch's summaries usually share one edge window (start and width): its
            // alignment and window starts (integer divisions) are worked out once.
            if edge_window != Some((edge.window_start_ms, edge.window_ms)) {
                edge_window = Some((edge.window_start_ms, edge.window_ms));
                let edge_width_ms = i64::from(edge.window_ms);
                edge_misaligned = edge_width_ms == 0
                    || edge.window_start_ms.rem_euclid(edge_width_ms.max(1)) != 0
                    || self
                        .config
                        .resolutions_ms
                        .iter()
                        .any(|resolution_ms| resolution_ms % edge_width_ms.max(1) != 0);
                self.edge_window_starts.clear();
                self.edge_window_starts.extend(
                    self.config
                        .resolutions_ms
                        .iter()
                        .map(|resolution_ms| window_start(edge.window_start_ms, *resolution_ms)),
                );
            }
            let misaligned = edge_misaligned;
            for (resolution_index, resolution_ms) in self.config.resolutions_ms.iter().enumerate() {
                let start_ms = self
                    .edge_window_starts
                    .get(resolution_index)
                    .copied()
                    .flatten();
                let (start_ms, reason) = match start_ms {
                    None => (None, Some(LateReason::EventTimeOutOfRange)),
                    Some(start_ms) => {
                        let closed_through = state
                            .closed_through_ms
                            .get(resolution_index)
                            .copied()
                            .unwrap_or(i64::MIN);
                        if start_ms.saturating_add(*resolution_ms) <= closed_through {
                            (Some(start_ms), Some(LateReason::WindowClosed))
                        } else {
                            (Some(start_ms), None)
                        }
                    }
                };
                match (start_ms, reason) {
                    (Some(start_ms), None) => {
                        let key = WindowKey {
                            agent,
                            series,
                            resolution_index: resolution_index as u8,
                            window_start_ms: start_ms,
                        };
                        let slot = self.windows.slot_for(key, state, &mut self.counters);
                        if let Some(summary) = self.windows.mark_dirty(slot) {
                            if summary.count == 0 {
                                // What merging into an empty summary gives, in a recycled
                                // allocation instead of a fresh clone of the sketch.
                                *summary = out.copy_of(&edge.summary);
                            } else {
                                writable(summary, out).merge(&edge.summary);
                            }
                            self.counters.readings_windowed += edge.summary.count;
                        }
                    }
                    (window_start_ms, reason) => {
                        self.counters.readings_late += edge.summary.count;
                        out.late.push(LateReading {
                            agent_id: state.id.clone(),
                            batch_seq: batch.batch_seq,
                            series: series_key(),
                            resolution_ms: Some(*resolution_ms),
                            window_start_ms,
                            item: late_item(),
                            reason: reason.unwrap_or(LateReason::WindowClosed),
                        });
                    }
                }
            }
            if misaligned {
                self.counters.misaligned_summaries += 1;
            }
        }
        max_event_ms
    }

    /// After the agent's sequence prefix moved: counts, moves the closing frontier to
    /// the watermark and emits the windows it closed.
    fn after_sequence_change(
        &mut self,
        agent: u32,
        effects: SequenceEffects,
        out: &mut EngineOutput,
    ) {
        self.counters.sequence_numbers_assumed_seen += effects.assumed_seen;
        self.counters.sequence_numbers_skipped += effects.skipped;
        let Some(state) = self.agents.get_mut(agent as usize) else {
            return;
        };
        if let Some(prefix_max_ms) = state.sequences.prefix_max_event_ms() {
            let frontier_ms = prefix_max_ms
                .saturating_sub(self.config.out_of_orderness_ms)
                .saturating_sub(self.config.allowed_lateness_ms);
            for closed_through in state.closed_through_ms.iter_mut() {
                *closed_through = (*closed_through).max(frontier_ms);
            }
        }
        self.close_windows(agent, out);
    }

    /// Emits and evicts the agent's windows that end at or before its frontier.
    fn close_windows(&mut self, agent: u32, out: &mut EngineOutput) {
        let Some(state) = self.agents.get_mut(agent as usize) else {
            return;
        };
        for (resolution_index, resolution_ms) in self.config.resolutions_ms.iter().enumerate() {
            let (Some(open), Some(closed_through)) = (
                state.open.get_mut(resolution_index),
                state.closed_through_ms.get(resolution_index),
            ) else {
                continue;
            };
            // Closed iff start + resolution <= closed_through.
            let Some(last_closed_start) = closed_through.checked_sub(*resolution_ms) else {
                continue;
            };
            let windows = &mut self.windows;
            let counters = &mut self.counters;
            let series_keys = &self.series.keys;
            let agent_id = &state.id;
            open.close_through(last_closed_start, |slot| {
                if let Some((key, summary)) = windows.release(slot) {
                    counters.windows_finalised += 1;
                    out.results.push(WindowResult {
                        agent_id: agent_id.clone(),
                        series: series_keys
                            .get(key.series as usize)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(SeriesKey::new("", ""))),
                        resolution_ms: *resolution_ms,
                        window_start_ms: key.window_start_ms,
                        version: summary.count | FINAL_VERSION_BIT,
                        summary,
                        is_final: true,
                    });
                }
            });
        }
    }

    /// Treats the agent as idle: gives up its sequence gaps and finalises every open
    /// window; data for those windows that still arrives is reported late.
    fn flush_agent(&mut self, agent: u32, now_ms: i64, out: &mut EngineOutput) {
        let Some(state) = self.agents.get_mut(agent as usize) else {
            return;
        };
        if !state.has_open_windows() {
            return;
        }
        let effects = state.sequences.skip_all_gaps(now_ms);
        for ((closed_through, open), resolution_ms) in state
            .closed_through_ms
            .iter_mut()
            .zip(&state.open)
            .zip(&self.config.resolutions_ms)
        {
            if let Some(last_start) = open.last_start() {
                *closed_through = (*closed_through).max(last_start.saturating_add(*resolution_ms));
            }
        }
        let before = self.counters.windows_finalised;
        self.after_sequence_change(agent, effects, out);
        self.counters.windows_flushed_idle += self.counters.windows_finalised - before;
    }

    /// Periodic work, at most once per `emit_interval_ms` of log time.
    fn tick(&mut self, now_ms: i64, out: &mut EngineOutput) {
        if self.next_tick_ms.is_some_and(|next| now_ms < next) {
            return;
        }
        self.next_tick_ms = Some(now_ms.saturating_add(self.config.emit_interval_ms));
        for agent in 0..self.agents.len() as u32 {
            let Some(state) = self.agents.get_mut(agent as usize) else {
                continue;
            };
            if state.has_open_windows()
                && now_ms.saturating_sub(state.last_activity_ms) >= self.config.idle_timeout_ms
            {
                self.flush_agent(agent, now_ms, out);
                continue;
            }
            if state.sequences.pending_batches() > 0 {
                let effects = state
                    .sequences
                    .skip_stalled_gap(now_ms, self.config.sequence_gap_timeout_ms);
                if effects != SequenceEffects::default() {
                    self.after_sequence_change(agent, effects, out);
                }
            }
        }
        self.emit_running(out);
    }

    /// Emits every open window that changed since its last emission, in the order they
    /// changed.
    fn emit_running(&mut self, out: &mut EngineOutput) {
        let mut queue = std::mem::take(&mut self.windows.dirty);
        for (slot, generation) in queue.drain(..) {
            let Some(entry) = self.windows.slots.get_mut(slot as usize) else {
                continue;
            };
            if !entry.occupied || !entry.dirty || entry.generation != generation {
                continue;
            }
            entry.dirty = false;
            let key = entry.key;
            let summary = Arc::clone(&entry.summary);
            self.counters.running_emissions += 1;
            out.results.push(WindowResult {
                agent_id: self.agent_id(key.agent),
                series: self.series_key(key.series),
                resolution_ms: self
                    .config
                    .resolutions_ms
                    .get(usize::from(key.resolution_index))
                    .copied()
                    .unwrap_or(0),
                window_start_ms: key.window_start_ms,
                version: summary.count,
                summary,
                is_final: false,
            });
        }
        // Keep the queue's allocation.
        self.windows.dirty = queue;
    }

    /// Approximate heap bytes of the engine's state: window slab and index, per-agent
    /// structures and the series table. Used to document memory per active series.
    pub fn state_bytes(&self) -> usize {
        let index_bytes = self.windows.index.capacity() * (size_of::<(WindowKey, u32)>() + 1);
        let slab_bytes = self.windows.slots.capacity() * size_of::<WindowSlot>()
            + self.windows.free.capacity() * 4
            + self.windows.dirty.capacity() * 4
            + self.windows.recent_slot.capacity() * 4;
        let sketch_bytes: usize = self
            .windows
            .slots
            .iter()
            .filter(|slot| slot.occupied)
            .map(|slot| sketch_heap_bytes(&slot.summary))
            .sum();
        const BTREE_OVERHEAD_PER_ENTRY: usize = 8;
        let agent_bytes: usize = self
            .agents
            .iter()
            .map(|agent| {
                size_of::<AgentState>()
                    + agent.id.len()
                    + agent.closed_through_ms.capacity() * 8
                    + agent.series_cache.capacity() * (size_of::<(u32, u32)>() + 1)
                    + agent.sequences.heap_bytes()
                    + agent
                        .open
                        .iter()
                        .map(|open| {
                            open.len * size_of::<(u32, u32)>()
                                + open.by_start.len()
                                    * (size_of::<(i64, Vec<(u32, u32)>)>()
                                        + BTREE_OVERHEAD_PER_ENTRY)
                        })
                        .sum::<usize>()
            })
            .sum();
        let series_bytes: usize = self
            .series
            .keys
            .iter()
            .map(|key| {
                16 + size_of::<SeriesKey>()
                    + key.device_id.capacity()
                    + key.metric.capacity()
                    + key.tags.capacity() * size_of::<(String, String)>()
                    + key
                        .tags
                        .iter()
                        .map(|(name, value)| name.capacity() + value.capacity())
                        .sum::<usize>()
            })
            .sum::<usize>()
            + self.series.keys.capacity() * size_of::<Arc<SeriesKey>>()
            + self.series.owners.capacity() * 4
            + self.series.index.capacity() * (size_of::<(Arc<SeriesKey>, u32)>() + 1);
        index_bytes + slab_bytes + sketch_bytes + agent_bytes + series_bytes
    }
}

/// Heap bytes of a summary's sketch: its dense bucket vectors span from the lowest to
/// the highest non-empty bucket of each sign, plus the slack merges leave.
fn sketch_heap_bytes(summary: &Summary) -> usize {
    summary.sketch.heap_bytes()
}

// ---------------------------------------------------------------------------------------
// Checkpoint

const CHECKPOINT_MAGIC: [u8; 4] = *b"TRBW";
const CHECKPOINT_FORMAT: u8 = 1;

#[derive(Serialize, Deserialize)]
struct AgentCheckpoint {
    id: String,
    sequences: SequenceTracker,
    closed_through_ms: Vec<i64>,
    last_activity_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct WindowCheckpoint {
    agent: u32,
    series: u32,
    resolution_index: u8,
    window_start_ms: i64,
    summary: Summary,
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    config: EngineConfig,
    series: Vec<(SeriesKey, u32)>,
    agents: Vec<AgentCheckpoint>,
    /// Sorted by (agent, series, resolution, start).
    windows: Vec<WindowCheckpoint>,
    /// Windows awaiting a running emission, in emission order, as indices into `windows`.
    dirty: Vec<u32>,
    next_tick_ms: Option<i64>,
    counters: EngineCounters,
}

impl WindowEngine {
    /// The whole engine state as bytes: dedup state, watermarks, open windows, series
    /// table, emission schedule and counters. Store it atomically together with the log
    /// position of the next record to process (see `docs/processor.md`). Deterministic:
    /// the same state always gives the same bytes.
    pub fn checkpoint(&self) -> Vec<u8> {
        let mut slots: Vec<u32> = self.windows.index.values().copied().collect();
        slots.sort_by_key(|slot| {
            self.windows
                .slots
                .get(*slot as usize)
                .map(|entry| entry.key)
        });
        let mut position_of_slot: FastHashMap<u32, u32> = FastHashMap::default();
        let mut windows = Vec::with_capacity(slots.len());
        for slot in &slots {
            if let Some(entry) = self.windows.slots.get(*slot as usize) {
                position_of_slot.insert(*slot, windows.len() as u32);
                windows.push(WindowCheckpoint {
                    agent: entry.key.agent,
                    series: entry.key.series,
                    resolution_index: entry.key.resolution_index,
                    window_start_ms: entry.key.window_start_ms,
                    summary: Summary::clone(&entry.summary),
                });
            }
        }
        let mut dirty = Vec::new();
        let mut queued = vec![false; windows.len()];
        for (slot, generation) in &self.windows.dirty {
            let Some(entry) = self.windows.slots.get(*slot as usize) else {
                continue;
            };
            if !entry.occupied || !entry.dirty || entry.generation != *generation {
                continue;
            }
            if let Some(position) = position_of_slot.get(slot) {
                if let Some(seen) = queued.get_mut(*position as usize) {
                    if !*seen {
                        *seen = true;
                        dirty.push(*position);
                    }
                }
            }
        }
        let checkpoint = Checkpoint {
            config: self.config.clone(),
            series: self
                .series
                .keys
                .iter()
                .zip(&self.series.owners)
                .map(|(key, owner)| (SeriesKey::clone(key), *owner))
                .collect(),
            agents: self
                .agents
                .iter()
                .map(|agent| AgentCheckpoint {
                    id: agent.id.to_string(),
                    sequences: agent.sequences.clone(),
                    closed_through_ms: agent.closed_through_ms.clone(),
                    last_activity_ms: agent.last_activity_ms,
                })
                .collect(),
            windows,
            dirty,
            next_tick_ms: self.next_tick_ms,
            counters: self.counters.clone(),
        };
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&CHECKPOINT_MAGIC);
        bytes.push(CHECKPOINT_FORMAT);
        // Serialising plain data into a Vec cannot fail; an empty tail would be refused
        // by `restore`, never misread.
        if let Ok(body) = postcard::to_allocvec(&checkpoint) {
            bytes.extend_from_slice(&body);
        }
        bytes
    }

    /// Rebuilds an engine from [`WindowEngine::checkpoint`] bytes. The checkpoint must
    /// have been taken with the same `config`: windows and watermarks mean something
    /// else under other resolutions or lateness.
    pub fn restore(config: EngineConfig, bytes: &[u8]) -> Result<Self, ProcessError> {
        let corrupt = |reason: String| ProcessError::CorruptCheckpoint { reason };
        let body = match bytes {
            [m0, m1, m2, m3, format, body @ ..] if [*m0, *m1, *m2, *m3] == CHECKPOINT_MAGIC => {
                if *format != CHECKPOINT_FORMAT {
                    return Err(corrupt(format!(
                        "format {format}, this build reads format {CHECKPOINT_FORMAT}"
                    )));
                }
                body
            }
            _ => {
                return Err(corrupt(
                    "it does not start with the window-engine checkpoint magic".into(),
                ))
            }
        };
        let checkpoint: Checkpoint =
            postcard::from_bytes(body).map_err(|error| corrupt(error.to_string()))?;
        if checkpoint.config != config {
            return Err(ProcessError::CheckpointConfigMismatch);
        }
        let mut engine = WindowEngine::new(config)?;
        let resolutions = engine.config.resolutions_ms.len();
        if checkpoint.series.len() > engine.config.max_series
            || checkpoint.agents.len() > engine.config.max_agents
        {
            return Err(corrupt(
                "it holds more series or agents than the configured limits".into(),
            ));
        }
        for (key, owner) in checkpoint.series {
            if owner as usize >= checkpoint.agents.len() {
                return Err(corrupt(format!(
                    "series owner {owner} is not a known agent"
                )));
            }
            let number = engine.series.keys.len() as u32;
            let key = Arc::new(key);
            if engine.series.index.insert(key.clone(), number).is_some() {
                return Err(corrupt("a series key is listed twice".into()));
            }
            engine.series.keys.push(key);
            engine.series.owners.push(owner);
        }
        for agent in checkpoint.agents {
            agent
                .sequences
                .validate()
                .map_err(|reason| corrupt(format!("agent {:?}: {reason}", agent.id)))?;
            if agent.closed_through_ms.len() != resolutions {
                return Err(corrupt(format!(
                    "agent {:?} has frontiers for another number of resolutions",
                    agent.id
                )));
            }
            if engine.agent_index.contains_key(agent.id.as_str()) {
                return Err(corrupt(format!("agent {:?} is listed twice", agent.id)));
            }
            let number = engine.add_agent(&agent.id);
            if let Some(state) = engine.agents.get_mut(number as usize) {
                state.sequences = agent.sequences;
                state.closed_through_ms = agent.closed_through_ms;
                state.last_activity_ms = agent.last_activity_ms;
            }
        }
        let mut slots = Vec::with_capacity(checkpoint.windows.len());
        for window in checkpoint.windows {
            if window.series as usize >= engine.series.keys.len()
                || usize::from(window.resolution_index) >= resolutions
            {
                return Err(corrupt(
                    "a window refers to an unknown series or resolution".into(),
                ));
            }
            let key = WindowKey {
                agent: window.agent,
                series: window.series,
                resolution_index: window.resolution_index,
                window_start_ms: window.window_start_ms,
            };
            let Some(state) = engine.agents.get_mut(window.agent as usize) else {
                return Err(corrupt("a window refers to an unknown agent".into()));
            };
            if engine.windows.index.contains_key(&key) {
                return Err(corrupt("a window is listed twice".into()));
            }
            let mut counters = EngineCounters::default();
            let slot = engine.windows.slot_for(key, state, &mut counters);
            if let Some(entry) = engine.windows.slots.get_mut(slot as usize) {
                entry.summary = Arc::new(window.summary);
            }
            slots.push(slot);
        }
        for position in checkpoint.dirty {
            let Some(slot) = slots.get(position as usize) else {
                return Err(corrupt(
                    "the emission queue refers to an unknown window".into(),
                ));
            };
            engine.windows.mark_dirty(*slot);
        }
        engine.next_tick_ms = checkpoint.next_tick_ms;
        engine.counters = checkpoint.counters;
        Ok(engine)
    }
}

#[cfg(test)]
mod tests {
    //! Results share their window's summary: these pin that a result never changes after
    //! it is emitted, whether or not the caller clears the output in between.
    use super::*;
    use tributary_protocol::{Reading, WindowSummary};

    const START_MS: i64 = 1_700_000_000_000;

    #[test]
    fn same_text_agrees_with_string_equality() {
        let texts: Vec<String> = (0..=20)
            .flat_map(|length| {
                let base = "abcdefghijklmnopqrstuvwxyz"[..length].to_string();
                let mut variants = vec![base.clone()];
                for position in 0..length {
                    let mut bytes = base.clone().into_bytes();
                    bytes[position] = b'_';
                    variants.push(String::from_utf8(bytes).unwrap());
                }
                variants
            })
            .chain([
                "é".to_string(),
                "dev-0042".to_string(),
                "dev-0043".to_string(),
            ])
            .collect();
        for left in &texts {
            for right in &texts {
                assert_eq!(same_text(left, right), left == right, "{left:?} {right:?}");
            }
        }
        let key = SeriesKey::new("dev-0042", "power").with_tags([("site", "north")]);
        assert!(same_series_key(&key, &key.clone()));
        let other = SeriesKey::new("dev-0042", "power").with_tags([("site", "south")]);
        assert!(!same_series_key(&key, &other));
        assert!(!same_series_key(&key, &SeriesKey::new("dev-0042", "power")));
    }

    fn batch(batch_seq: u64, readings: &[(i64, f64)], summaries: &[(i64, f64)]) -> Batch {
        Batch {
            agent_id: "gw-1".into(),
            batch_seq,
            created_ms: START_MS,
            series: vec![SeriesDef {
                id: 7,
                key: SeriesKey::new("dev-1", "temperature_c"),
            }],
            readings: readings
                .iter()
                .map(|(time_ms, value)| Reading {
                    series: 7,
                    time_ms: *time_ms,
                    value: *value,
                    flags: 0,
                })
                .collect(),
            summaries: summaries
                .iter()
                .map(|(window_start_ms, value)| WindowSummary {
                    series: 7,
                    window_start_ms: *window_start_ms,
                    window_ms: 10_000,
                    summary: Summary::from_reading(*window_start_ms, *value),
                })
                .collect(),
        }
    }

    fn engine(source: RollupSource) -> WindowEngine {
        let config = EngineConfig {
            resolutions_ms: vec![60_000],
            rollup_source: source,
            ..EngineConfig::default()
        };
        WindowEngine::new(config).expect("the test config is valid")
    }

    /// The running results of the output, as owned copies of their summaries.
    fn running(out: &EngineOutput) -> Vec<(usize, Summary)> {
        out.results
            .iter()
            .enumerate()
            .filter(|(_, result)| !result.is_final)
            .map(|(position, result)| (position, Summary::clone(&result.summary)))
            .collect()
    }

    #[test]
    fn a_held_result_keeps_its_value_while_its_window_changes() {
        for source in [RollupSource::RawReadings, RollupSource::EdgeSummaries] {
            let mut engine = engine(source);
            let mut out = EngineOutput::default();
            let first = batch(0, &[(START_MS, 1.0)], &[(START_MS, 1.0)]);
            engine
                .ingest_batch(&first, START_MS, &mut out)
                .expect("valid batch");
            let emitted = running(&out);
            assert_eq!(emitted.len(), 1, "{source:?}: one running result");
            // Not cleared: the window changes while the first result still holds it.
            let second = batch(1, &[(START_MS + 10_000, 5.0)], &[(START_MS + 10_000, 5.0)]);
            engine
                .ingest_batch(&second, START_MS + 1_000, &mut out)
                .expect("valid batch");
            for (position, summary) in &emitted {
                assert_eq!(&*out.results[*position].summary, summary, "{source:?}");
            }
            let newest = out.results.last().expect("a second running result");
            assert_eq!(newest.summary.count, 2, "{source:?}");
            assert_eq!(out.results[0].summary.count, 1, "{source:?}");
            assert_eq!(newest.summary.max, 5.0, "{source:?}");
            // Cleared: the next change copies nothing and results stay right.
            out.clear();
            let third = batch(2, &[(START_MS + 20_000, 3.0)], &[(START_MS + 20_000, 3.0)]);
            engine
                .ingest_batch(&third, START_MS + 2_000, &mut out)
                .expect("valid batch");
            let newest = out.results.last().expect("a third running result");
            assert_eq!(newest.summary.count, 3, "{source:?}");
            assert_eq!(newest.summary.sum, 9.0, "{source:?}");
            assert_eq!(newest.version, 3, "{source:?}");
        }
    }

    #[test]
    fn final_results_are_recycled_only_when_nobody_holds_them() {
        let mut engine = engine(RollupSource::EdgeSummaries);
        let mut out = EngineOutput::default();
        let first = batch(0, &[], &[(START_MS, 1.0)]);
        engine
            .ingest_batch(&first, START_MS, &mut out)
            .expect("valid batch");
        engine.flush_all(START_MS + 1_000, &mut out);
        let held = out
            .results
            .iter()
            .find(|result| result.is_final)
            .map(|result| result.summary.clone())
            .expect("a final result");
        out.clear();
        assert!(out.spare.is_empty(), "a held summary is not reused");
        assert_eq!(held.count, 1);
        assert_eq!(Arc::strong_count(&held), 1);
    }
}
