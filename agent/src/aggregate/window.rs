//! Per-series event-time tumbling windows and the raw-forwarding policy of one source.
//!
//! Sans-IO: every call takes the processing time (`now_ms`) as an argument, so tests drive
//! the engine with any clock they like. A window `[start, start + window_ms)` stays open
//! while readings for it may still arrive: it closes when the series' event-time watermark
//! (the largest event time seen minus `allowed_disorder_ms`) reaches its end, or when the
//! series has been silent for `idle_timeout_ms` of processing time (a sensor that stopped
//! reporting must not hold its last window open forever).
//!
//! A reading later than the watermark is not dropped: its window is opened again as a
//! fresh, partial summary and closed at once. Summaries are mergeable, so the collector
//! folds the partial into the earlier one exactly; the reading is counted as late.
//!
//! Every reading may carry a journal sequence number (the MQTT acknowledgement chain's
//! write-ahead journal, see `run.rs`); a window remembers the smallest one it holds so the
//! journal can be truncated exactly below everything still open.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use tributary_protocol::model::{Reading, SeriesId, WindowSummary};
use tributary_protocol::Summary;

use crate::config::RawPolicy;

/// Journal sequence number of a reading that is not journaled.
pub const NOT_JOURNALED: u64 = u64::MAX;

/// How one source's readings are windowed and forwarded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowConfig {
    pub window_ms: u64,
    /// How far behind the newest event time of a series a reading may arrive and still
    /// land in its (still open) window.
    pub allowed_disorder_ms: i64,
    /// Processing time of silence after which a series' open windows are closed.
    pub idle_timeout_ms: i64,
    /// Processing time of silence after which a series with no open window is forgotten
    /// entirely (watermark, raw-policy state): bounded memory with many short-lived series.
    /// A series that speaks again starts afresh (its first reading is forwarded raw).
    pub series_evict_after_ms: i64,
    pub raw: RawPolicy,
}

/// Default disorder allowance: sensors behind one broker rarely reorder by more.
pub const DEFAULT_ALLOWED_DISORDER_MS: i64 = 2_000;
/// Default silence after which an idle series' state is evicted.
pub const DEFAULT_SERIES_EVICT_AFTER_MS: i64 = 600_000;

impl WindowConfig {
    /// The defaults for a configured window width and raw policy: 2 s of disorder, and a
    /// silent series closes its windows after one window width plus the disorder.
    pub fn new(window_ms: u64, raw: RawPolicy) -> Self {
        let window_ms = window_ms.max(1);
        let allowed_disorder_ms = DEFAULT_ALLOWED_DISORDER_MS;
        let idle_timeout_ms = i64::try_from(window_ms)
            .unwrap_or(i64::MAX)
            .saturating_add(allowed_disorder_ms);
        Self {
            window_ms,
            allowed_disorder_ms,
            idle_timeout_ms,
            series_evict_after_ms: DEFAULT_SERIES_EVICT_AFTER_MS.max(idle_timeout_ms),
            raw,
        }
    }

    /// These settings with another disorder allowance; the idle timeout follows (one window
    /// width plus the disorder) unless set explicitly afterwards.
    pub fn with_allowed_disorder_ms(mut self, allowed_disorder_ms: i64) -> Self {
        self.allowed_disorder_ms = allowed_disorder_ms.max(0);
        self.idle_timeout_ms = self
            .window_width_ms()
            .saturating_add(self.allowed_disorder_ms);
        self.series_evict_after_ms = self.series_evict_after_ms.max(self.idle_timeout_ms);
        self
    }

    fn window_width_ms(&self) -> i64 {
        i64::try_from(self.window_ms.max(1)).unwrap_or(i64::MAX)
    }

    /// Start of the window holding `time_ms` (windows are aligned to the Unix epoch).
    pub fn window_start_ms(&self, time_ms: i64) -> i64 {
        time_ms - time_ms.rem_euclid(self.window_width_ms())
    }
}

/// A closed window, ready for a summary batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedWindow {
    pub summary: WindowSummary,
    /// Smallest journal sequence number of the readings in it ([`NOT_JOURNALED`] if none).
    pub min_journal_seq: u64,
}

/// A raw reading the policy forwards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardedReading {
    pub reading: Reading,
    pub journal_seq: u64,
}

/// Where [`WindowAggregator`] puts what it produces; the caller drains it into batches.
#[derive(Debug, Default)]
pub struct AggregateOutput {
    pub raw: Vec<ForwardedReading>,
    pub closed: Vec<ClosedWindow>,
}

impl AggregateOutput {
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty() && self.closed.is_empty()
    }
}

/// Counters of one aggregator (exported as metrics by the shell).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggregatorCounters {
    pub readings_in: u64,
    /// Readings that arrived after their window had closed (emitted as partial summaries).
    pub late_readings: u64,
    /// Non-finite values refused (parsers already reject them; kept as a guard).
    pub non_finite_values: u64,
    pub raw_forwarded: u64,
    pub windows_closed: u64,
    /// Idle series whose state was dropped (see [`WindowConfig::series_evict_after_ms`]).
    pub series_evicted: u64,
}

#[derive(Debug)]
struct OpenWindow {
    start_ms: i64,
    summary: Summary,
    min_journal_seq: u64,
}

impl OpenWindow {
    /// A window with nothing in it yet (also what an unused inline slot holds: no heap).
    fn empty(start_ms: i64) -> Self {
        Self {
            start_ms,
            summary: Summary::empty(),
            min_journal_seq: NOT_JOURNALED,
        }
    }
}

/// Windows a series holds without an allocation of their own.
const INLINE_WINDOWS: usize = 2;

/// The open windows of one series, oldest first: the first [`INLINE_WINDOWS`] in the
/// series' own state, any further ones in `spill`.
///
/// Why two inline: windows are aligned to the epoch, so every series holds its previous
/// window open beside the current one for the disorder allowance after each boundary (2 s
/// of every 10 s with the defaults), at the same moment as every other series. A series
/// with one window inline would allocate a second one for all 10k series at once, right
/// when the closing burst peaks. Three or more open (late readings reopening old windows,
/// a disorder allowance wider than a window) are rare and spill to a vector.
#[derive(Debug)]
struct OpenWindows {
    inline: [OpenWindow; INLINE_WINDOWS],
    inline_len: usize,
    /// Windows after the inline ones; empty (and unallocated) unless all inline slots are used.
    spill: Vec<OpenWindow>,
}

impl OpenWindows {
    fn new() -> Self {
        Self {
            inline: [OpenWindow::empty(0), OpenWindow::empty(0)],
            inline_len: 0,
            spill: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.inline_len + self.spill.len()
    }

    fn is_empty(&self) -> bool {
        self.inline_len == 0
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = &OpenWindow> {
        self.inline
            .get(..self.inline_len)
            .unwrap_or_default()
            .iter()
            .chain(self.spill.iter())
    }

    #[inline]
    fn first(&self) -> Option<&OpenWindow> {
        // The spill is only used when the inline slots are full.
        if self.inline_len > 0 {
            self.inline.first()
        } else {
            None
        }
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut OpenWindow> {
        if index < self.inline_len {
            self.inline.get_mut(index)
        } else {
            self.spill.get_mut(index - INLINE_WINDOWS)
        }
    }

    fn get(&self, index: usize) -> Option<&OpenWindow> {
        if index < self.inline_len {
            self.inline.get(index)
        } else {
            self.spill.get(index - INLINE_WINDOWS)
        }
    }

    /// The window starting at `start_ms`, opened (in start order) if it is not open yet;
    /// the bool says whether it was opened.
    #[inline]
    fn find_or_open(&mut self, start_ms: i64) -> (Option<&mut OpenWindow>, bool) {
        // Most readings land in the newest window, most often inline.
        if self.spill.is_empty() {
            if let Some(newest) = self.inline_len.checked_sub(1) {
                if self
                    .inline
                    .get(newest)
                    .is_some_and(|window| window.start_ms == start_ms)
                {
                    return (self.inline.get_mut(newest), false);
                }
            }
        }
        let length = self.len();
        // Search backwards for the last window starting at or before `start_ms`.
        let at_or_before = self
            .iter()
            .rev()
            .position(|window| window.start_ms <= start_ms)
            .map(|from_newest| length - 1 - from_newest);
        let index = match at_or_before {
            Some(index)
                if self
                    .get(index)
                    .is_some_and(|window| window.start_ms == start_ms) =>
            {
                return (self.get_mut(index), false);
            }
            Some(index) => index + 1,
            None => 0,
        };
        self.insert(index, OpenWindow::empty(start_ms));
        (self.get_mut(index), true)
    }

    /// Inserts `window` at `index` (at most `len()`), keeping the inline slots filled first.
    fn insert(&mut self, index: usize, window: OpenWindow) {
        if index >= INLINE_WINDOWS {
            let position = (index - INLINE_WINDOWS).min(self.spill.len());
            // Rare: grow one window at a time (152 bytes each).
            if self.spill.len() == self.spill.capacity() {
                self.spill.reserve_exact(1);
            }
            self.spill.insert(position, window);
            return;
        }
        if self.inline_len == INLINE_WINDOWS {
            // The last inline window moves to the front of the spill to make room.
            let Some(last) = self.inline.last_mut() else {
                return;
            };
            let displaced = std::mem::replace(last, window);
            if let Some(shifted) = self.inline.get_mut(index..) {
                shifted.rotate_right(1);
            }
            if self.spill.len() == self.spill.capacity() {
                self.spill.reserve_exact(1);
            }
            self.spill.insert(0, displaced);
        } else {
            let end = self.inline_len;
            if let Some(slot) = self.inline.get_mut(end) {
                *slot = window;
            }
            if let Some(shifted) = self.inline.get_mut(index..=end) {
                shifted.rotate_right(1);
            }
            self.inline_len += 1;
        }
    }

    /// Takes the oldest window out.
    fn pop_first(&mut self) -> Option<OpenWindow> {
        if self.inline_len == 0 {
            return None;
        }
        let first = self.inline.first_mut()?;
        let window = std::mem::replace(first, OpenWindow::empty(0));
        self.inline.rotate_left(1);
        self.inline_len -= 1;
        if !self.spill.is_empty() {
            let next = self.spill.remove(0);
            if let Some(slot) = self.inline.get_mut(self.inline_len) {
                *slot = next;
                self.inline_len += 1;
            }
            if self.spill.is_empty() {
                // Give the rare spill's room back rather than keep it for every series
                // that ever had three windows open.
                self.spill = Vec::new();
            }
        }
        Some(window)
    }
}

/// Hashes a [`SeriesId`] with one multiplication. Ids are dense numbers the registry
/// assigns (not attacker-chosen), so no keyed hash is needed against collisions; SipHash
/// per reading was a measurable share of the hot path. The multiplication spreads the ids
/// into the high bits, which the hash table uses for its control bytes.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SeriesIdHasher(u64);

impl Hasher for SeriesIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.0 = (self.0 ^ u64::from(value)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by series id, hashed with [`SeriesIdHasher`].
pub(crate) type SeriesIdMap<V> = HashMap<SeriesId, V, BuildHasherDefault<SeriesIdHasher>>;

#[derive(Debug)]
struct SeriesState {
    series: SeriesId,
    open: OpenWindows,
    max_event_ms: i64,
    last_arrival_ms: i64,
    readings_seen: u64,
    last_forwarded_value: Option<f64>,
}

/// The windows and raw policy of every series of one source.
///
/// Memory (`docs/agent.md`, "Memory"): the series' states sit side by side in one vector,
/// each with room for two open windows inline, and a map from series id to position holds
/// 8 bytes a series. A hash map holding the states themselves kept over a third of its
/// slots empty (it doubles at 7/8 full) and every slot was touched; the vector's spare room
/// past its length is never written, and for a large vector glibc maps it lazily, so it
/// costs address space, not memory (1.5 MiB less at `bench agent`'s peak with 10k series,
/// `docs/benchmarks.md`, "Session 7: window state and the closing burst").
#[derive(Debug)]
pub struct WindowAggregator {
    config: WindowConfig,
    /// Position in `states` of each tracked series.
    positions: SeriesIdMap<u32>,
    states: Vec<SeriesState>,
    counters: AggregatorCounters,
    open_windows: usize,
}

impl WindowAggregator {
    pub fn new(config: WindowConfig) -> Self {
        Self {
            config,
            positions: SeriesIdMap::default(),
            states: Vec::new(),
            counters: AggregatorCounters::default(),
            open_windows: 0,
        }
    }

    pub fn config(&self) -> &WindowConfig {
        &self.config
    }

    pub fn counters(&self) -> AggregatorCounters {
        self.counters
    }

    /// Windows currently open over all series.
    pub fn open_windows(&self) -> usize {
        self.open_windows
    }

    /// Smallest journal sequence number held by an open window ([`NOT_JOURNALED`] if none).
    pub fn min_open_journal_seq(&self) -> u64 {
        self.states
            .iter()
            .flat_map(|state| state.open.iter())
            .map(|window| window.min_journal_seq)
            .min()
            .unwrap_or(NOT_JOURNALED)
    }

    /// Takes one reading that arrived at processing time `now_ms`: forwards it raw if the
    /// policy says so, adds it to its window, and closes the windows the series' watermark
    /// has passed.
    pub fn observe(
        &mut self,
        reading: Reading,
        journal_seq: u64,
        now_ms: i64,
        out: &mut AggregateOutput,
    ) {
        self.observe_with(reading, journal_seq, now_ms, true, out);
    }

    /// [`WindowAggregator::observe`], with raw forwarding suppressed when `allow_raw` is
    /// false: replaying the journal after a restart must not forward again readings whose
    /// raw batch was already durable.
    pub fn observe_with(
        &mut self,
        reading: Reading,
        journal_seq: u64,
        now_ms: i64,
        allow_raw: bool,
        out: &mut AggregateOutput,
    ) {
        if !reading.value.is_finite() {
            self.counters.non_finite_values += 1;
            return;
        }
        self.counters.readings_in += 1;
        let config = self.config;
        let position = match self.positions.get(&reading.series) {
            Some(position) => *position as usize,
            None => self.track(reading.series, now_ms),
        };
        let Some(state) = self.states.get_mut(position) else {
            // Unreachable: positions and states are kept in step.
            return;
        };
        state.last_arrival_ms = now_ms;
        state.readings_seen += 1;

        let forward = match config.raw {
            RawPolicy::All => true,
            RawPolicy::None => false,
            RawPolicy::EveryNth { n } => (state.readings_seen - 1) % u64::from(n.max(1)) == 0,
            RawPolicy::Deadband { threshold } => match state.last_forwarded_value {
                None => true,
                Some(last) => (reading.value - last).abs() > threshold,
            },
        };
        if forward && allow_raw {
            state.last_forwarded_value = Some(reading.value);
            self.counters.raw_forwarded += 1;
            out.raw.push(ForwardedReading {
                reading,
                journal_seq,
            });
        }

        let watermark_before = watermark(state.max_event_ms, config.allowed_disorder_ms);
        let start_ms = config.window_start_ms(reading.time_ms);
        let end_ms = start_ms.saturating_add(config.window_width_ms());
        if end_ms <= watermark_before {
            self.counters.late_readings += 1;
        }
        let (window, opened) = state.open.find_or_open(start_ms);
        let Some(window) = window else {
            // Unreachable: the window was found or opened just above.
            return;
        };
        self.open_windows += usize::from(opened);
        window.summary.observe(reading.time_ms, reading.value);
        window.min_journal_seq = window.min_journal_seq.min(journal_seq);
        state.max_event_ms = state.max_event_ms.max(reading.time_ms);

        let watermark_now = watermark(state.max_event_ms, config.allowed_disorder_ms);
        let closed = close_windows_ending_by(state, &config, watermark_now, out);
        self.open_windows -= closed;
        self.counters.windows_closed += closed as u64;
    }

    /// Closes the windows of series silent for `idle_timeout_ms` of processing time, and
    /// forgets series silent for `series_evict_after_ms` whose windows are all closed.
    pub fn poll(&mut self, now_ms: i64, out: &mut AggregateOutput) {
        let config = self.config;
        let mut closed_total = 0;
        let mut evicted = 0u64;
        let mut position = 0;
        while let Some(state) = self.states.get_mut(position) {
            let silent_ms = now_ms.saturating_sub(state.last_arrival_ms);
            if !state.open.is_empty() && silent_ms >= config.idle_timeout_ms {
                closed_total += close_windows_ending_by(state, &config, i64::MAX, out);
            }
            if state.open.is_empty() && silent_ms >= config.series_evict_after_ms {
                self.untrack(position);
                evicted += 1;
            } else {
                position += 1;
            }
        }
        if evicted > 0 && self.states.len() < self.states.capacity() / 4 {
            // Most series went away: give back the room they held (in place, no copy).
            self.states.shrink_to(self.states.len() * 2);
            self.positions.shrink_to(self.states.len() * 2);
        }
        self.open_windows -= closed_total;
        self.counters.windows_closed += closed_total as u64;
        self.counters.series_evicted += evicted;
    }

    /// Series whose state is held (open windows or recent activity).
    pub fn tracked_series(&self) -> usize {
        self.states.len()
    }

    /// Closes every open window (shutdown).
    pub fn close_all(&mut self, out: &mut AggregateOutput) {
        let config = self.config;
        let mut closed_total = 0;
        for state in &mut self.states {
            closed_total += close_windows_ending_by(state, &config, i64::MAX, out);
        }
        self.open_windows -= closed_total;
        self.counters.windows_closed += closed_total as u64;
    }
}

impl WindowAggregator {
    /// Starts tracking `series` (first reading, or first since it was evicted); returns
    /// its position in `states`.
    #[inline(never)]
    fn track(&mut self, series: SeriesId, now_ms: i64) -> usize {
        let position = self.states.len();
        // Positions fit in u32: series ids are u32, and one state per id.
        self.positions.insert(series, position as u32);
        self.states.push(SeriesState {
            series,
            open: OpenWindows::new(),
            max_event_ms: i64::MIN,
            last_arrival_ms: now_ms,
            readings_seen: 0,
            last_forwarded_value: None,
        });
        position
    }

    /// Forgets the series at `position`: the last state moves into its place.
    fn untrack(&mut self, position: usize) {
        if position >= self.states.len() {
            return;
        }
        let removed = self.states.swap_remove(position);
        self.positions.remove(&removed.series);
        if let Some(moved) = self.states.get(position) {
            self.positions.insert(moved.series, position as u32);
        }
    }
}

fn watermark(max_event_ms: i64, allowed_disorder_ms: i64) -> i64 {
    if max_event_ms == i64::MIN {
        i64::MIN
    } else {
        max_event_ms.saturating_sub(allowed_disorder_ms)
    }
}

/// Closes (in start order) the windows of one series whose end is at or before `watermark_ms`;
/// `i64::MAX` closes them all. Returns how many closed.
fn close_windows_ending_by(
    state: &mut SeriesState,
    config: &WindowConfig,
    watermark_ms: i64,
    out: &mut AggregateOutput,
) -> usize {
    let width_ms = config.window_width_ms();
    let window_ms = u32::try_from(config.window_ms).unwrap_or(u32::MAX);
    let mut closed = 0;
    // Most readings close nothing: the oldest window's end answers that, without a drain
    // set up (about 70 instructions a reading in `bench agent`).
    while state
        .open
        .first()
        .is_some_and(|window| window.start_ms.saturating_add(width_ms) <= watermark_ms)
    {
        let Some(window) = state.open.pop_first() else {
            break;
        };
        out.closed.push(ClosedWindow {
            summary: WindowSummary {
                series: state.series,
                window_start_ms: window.start_ms,
                window_ms,
                summary: window.summary,
            },
            min_journal_seq: window.min_journal_seq,
        });
        closed += 1;
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(series: SeriesId, time_ms: i64, value: f64) -> Reading {
        Reading {
            series,
            time_ms,
            value,
            flags: 0,
        }
    }

    #[test]
    fn closes_on_watermark_and_idle_timeout() {
        let config = WindowConfig {
            window_ms: 1_000,
            allowed_disorder_ms: 100,
            idle_timeout_ms: 5_000,
            series_evict_after_ms: 60_000,
            raw: RawPolicy::None,
        };
        let mut aggregator = WindowAggregator::new(config);
        let mut out = AggregateOutput::default();
        aggregator.observe(reading(1, 10, 1.0), NOT_JOURNALED, 0, &mut out);
        aggregator.observe(reading(1, 1_050, 2.0), NOT_JOURNALED, 0, &mut out);
        assert!(
            out.closed.is_empty(),
            "watermark 950 has not reached the end 1000"
        );
        aggregator.observe(reading(1, 990, 3.0), NOT_JOURNALED, 0, &mut out);
        aggregator.observe(reading(1, 1_100, 4.0), NOT_JOURNALED, 0, &mut out);
        assert_eq!(out.closed.len(), 1);
        assert_eq!(out.closed[0].summary.summary.count, 2);
        assert_eq!(out.closed[0].summary.window_start_ms, 0);
        aggregator.poll(4_999, &mut out);
        assert_eq!(out.closed.len(), 1);
        aggregator.poll(5_000, &mut out);
        assert_eq!(out.closed.len(), 2);
        assert_eq!(out.closed[1].summary.summary.count, 2);
        assert_eq!(aggregator.open_windows(), 0);
    }

    #[test]
    fn late_reading_becomes_a_partial_summary() {
        let config = WindowConfig {
            window_ms: 1_000,
            allowed_disorder_ms: 0,
            idle_timeout_ms: 5_000,
            series_evict_after_ms: 60_000,
            raw: RawPolicy::None,
        };
        let mut aggregator = WindowAggregator::new(config);
        let mut out = AggregateOutput::default();
        aggregator.observe(reading(1, 500, 1.0), 7, 0, &mut out);
        aggregator.observe(reading(1, 2_500, 1.0), 8, 0, &mut out);
        aggregator.observe(reading(1, 600, 5.0), 9, 0, &mut out);
        assert_eq!(aggregator.counters().late_readings, 1);
        let starts: Vec<(i64, u64, u64)> = out
            .closed
            .iter()
            .map(|closed| {
                (
                    closed.summary.window_start_ms,
                    closed.summary.summary.count,
                    closed.min_journal_seq,
                )
            })
            .collect();
        assert_eq!(starts, vec![(0, 1, 7), (0, 1, 9)]);
        assert_eq!(aggregator.min_open_journal_seq(), 8);
    }

    #[test]
    fn idle_series_are_evicted_once_their_windows_closed() {
        let config = WindowConfig {
            window_ms: 1_000,
            allowed_disorder_ms: 0,
            idle_timeout_ms: 2_000,
            series_evict_after_ms: 10_000,
            raw: RawPolicy::Deadband { threshold: 1.0 },
        };
        let mut aggregator = WindowAggregator::new(config);
        let mut out = AggregateOutput::default();
        for series in 0..100 {
            aggregator.observe(reading(series, 10, 5.0), NOT_JOURNALED, 0, &mut out);
        }
        aggregator.observe(reading(500, 10, 5.0), NOT_JOURNALED, 9_000, &mut out);
        aggregator.poll(9_999, &mut out);
        assert_eq!(
            aggregator.tracked_series(),
            101,
            "closed but not yet evicted"
        );
        assert_eq!(aggregator.open_windows(), 1);
        aggregator.poll(10_000, &mut out);
        assert_eq!(aggregator.tracked_series(), 1);
        assert_eq!(aggregator.counters().series_evicted, 100);
        // A series that speaks again starts afresh: its first reading is forwarded.
        out.raw.clear();
        aggregator.observe(reading(0, 20_000, 5.0), NOT_JOURNALED, 20_000, &mut out);
        assert_eq!(out.raw.len(), 1);
    }

    #[test]
    fn two_open_windows_stay_inline_and_more_spill() {
        let mut aggregator = WindowAggregator::new(WindowConfig::new(10_000, RawPolicy::None));
        let mut out = AggregateOutput::default();
        let mut most_open = 0;
        for second in 0..35 {
            aggregator.observe(reading(1, second * 1_000, 1.0), NOT_JOURNALED, 0, &mut out);
            let state = aggregator.states.first().expect("the series is tracked");
            most_open = most_open.max(state.open.len());
            assert_eq!(state.open.spill.capacity(), 0, "second {second}");
        }
        // The disorder allowance holds the previous window open beside the current one.
        assert_eq!(most_open, 2);
        assert_eq!(out.closed.len(), 3);

        // Windows opened in any order come out in start order, through the spill and back.
        let mut windows = OpenWindows::new();
        for start_ms in [30, 10, 50, 20, 40, 0] {
            let (window, opened) = windows.find_or_open(start_ms);
            assert!(opened);
            assert_eq!(window.map(|window| window.start_ms), Some(start_ms));
        }
        let (_, opened) = windows.find_or_open(20);
        assert!(!opened, "an open window is found, not opened again");
        let starts: Vec<i64> = windows.iter().map(|window| window.start_ms).collect();
        assert_eq!(starts, vec![0, 10, 20, 30, 40, 50]);
        assert_eq!(windows.spill.len(), 4);
        let mut popped = Vec::new();
        while let Some(window) = windows.pop_first() {
            popped.push(window.start_ms);
        }
        assert_eq!(popped, vec![0, 10, 20, 30, 40, 50]);
        assert_eq!(
            windows.spill.capacity(),
            0,
            "the spill's room is given back"
        );
    }

    #[test]
    fn a_series_state_stays_small() {
        // Two 152-byte windows inline and the series' own state: `docs/agent.md`, "Memory".
        assert_eq!(std::mem::size_of::<OpenWindow>(), 152);
        assert!(
            std::mem::size_of::<SeriesState>() <= 384,
            "{} bytes",
            std::mem::size_of::<SeriesState>()
        );
    }

    #[test]
    fn evicting_series_keeps_positions_in_step() {
        let config = WindowConfig {
            window_ms: 1_000,
            allowed_disorder_ms: 0,
            idle_timeout_ms: 1_000,
            series_evict_after_ms: 3_000,
            raw: RawPolicy::None,
        };
        let mut aggregator = WindowAggregator::new(config);
        let mut out = AggregateOutput::default();
        for series in 0..300 {
            aggregator.observe(reading(series, 10, 1.0), NOT_JOURNALED, 0, &mut out);
        }
        // Every third series speaks again later; the others are evicted around them.
        for series in (0..300).step_by(3) {
            aggregator.observe(reading(series, 2_010, 2.0), NOT_JOURNALED, 2_000, &mut out);
        }
        aggregator.poll(3_500, &mut out);
        assert_eq!(aggregator.tracked_series(), 100);
        assert_eq!(aggregator.positions.len(), 100);
        for (position, state) in aggregator.states.iter().enumerate() {
            assert_eq!(
                aggregator.positions.get(&state.series),
                Some(&(position as u32))
            );
            assert_eq!(state.series % 3, 0);
        }
        assert!(aggregator.states.capacity() <= 256, "room given back");
        aggregator.observe(reading(3, 2_500, 5.0), NOT_JOURNALED, 3_600, &mut out);
        aggregator.close_all(&mut out);
        let three: Vec<(i64, u64)> = out
            .closed
            .iter()
            .filter(|closed| closed.summary.series == 3)
            .map(|closed| (closed.summary.window_start_ms, closed.summary.summary.count))
            .collect();
        assert_eq!(three, vec![(0, 1), (2_000, 1), (2_000, 1)]);
    }

    /// FNV-1a over text: a fingerprint that does not depend on the standard library's hasher.
    fn fnv1a(hash: &mut u64, text: &str) {
        for byte in text.bytes() {
            *hash = (*hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Hashes and drains what the engine emitted. Windows closed by `poll` or `close_all`
    /// (`across_series`) are hashed in (series, start) order: the order in which those
    /// visit series is the storage's, and no consumer depends on it.
    fn fingerprint(hash: &mut u64, out: &mut AggregateOutput, across_series: bool) {
        for forwarded in out.raw.drain(..) {
            fnv1a(hash, &format!("{forwarded:?}"));
        }
        if across_series {
            out.closed
                .sort_by_key(|closed| (closed.summary.series, closed.summary.window_start_ms));
        }
        for closed in out.closed.drain(..) {
            fnv1a(hash, &format!("{closed:?}"));
        }
    }

    /// Everything the engine emits for a deterministic stream (disorder within and beyond
    /// the allowance, negative, zero and wide-ranging values, idle closes, evictions, a
    /// shutdown) is pinned by a fingerprint taken before the open windows' representation
    /// changed (session 7): a change of storage must not change one bit of the output.
    #[test]
    fn output_is_bit_identical_to_the_pinned_fingerprint() {
        let config = WindowConfig {
            window_ms: 1_000,
            allowed_disorder_ms: 300,
            idle_timeout_ms: 2_500,
            series_evict_after_ms: 6_000,
            raw: RawPolicy::Deadband { threshold: 0.5 },
        };
        let mut aggregator = WindowAggregator::new(config);
        let mut out = AggregateOutput::default();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        for step in 0..20_000i64 {
            let random = next();
            // Series come and go: the upper ids speak only in some stretches.
            let series = (random % 40) as u32 + if (step / 3_000) % 2 == 0 { 0 } else { 20 };
            let now_ms = step * 3;
            let jitter_ms = ((random >> 8) % 700) as i64;
            let late_ms = if (random >> 20) % 50 == 0 { 2_000 } else { 0 };
            let time_ms = now_ms - jitter_ms - late_ms;
            let value = match (random >> 30) % 6 {
                0 => 0.0,
                1 => -(((random >> 36) % 1_000) as f64) / 10.0,
                2 => ((random >> 36) % 100_000) as f64 * 1e3,
                3 => 1e-9 * ((random >> 36) % 7) as f64,
                _ => 20.0 + ((random >> 36) % 50) as f64 / 100.0,
            };
            aggregator.observe(
                reading(series, time_ms, value),
                step as u64,
                now_ms,
                &mut out,
            );
            fingerprint(&mut hash, &mut out, false);
            if step % 97 == 0 {
                aggregator.poll(now_ms, &mut out);
                fingerprint(&mut hash, &mut out, true);
                fnv1a(
                    &mut hash,
                    &format!(
                        "{} {} {} {:?}",
                        aggregator.open_windows(),
                        aggregator.tracked_series(),
                        aggregator.min_open_journal_seq(),
                        aggregator.counters()
                    ),
                );
            }
        }
        aggregator.close_all(&mut out);
        fingerprint(&mut hash, &mut out, true);
        fnv1a(&mut hash, &format!("{:?}", aggregator.counters()));
        let counters = aggregator.counters();
        assert!(counters.late_readings > 100, "{counters:?}");
        assert!(counters.series_evicted > 10, "{counters:?}");
        assert!(counters.windows_closed > 1_000, "{counters:?}");
        assert_eq!(hash, 0x477c_f379_16b1_9342, "output fingerprint changed");
    }

    #[test]
    fn raw_policies() {
        let run = |raw: RawPolicy, values: &[f64]| -> Vec<f64> {
            let mut aggregator = WindowAggregator::new(WindowConfig::new(10_000, raw));
            let mut out = AggregateOutput::default();
            for (index, value) in values.iter().enumerate() {
                aggregator.observe(reading(1, index as i64, *value), NOT_JOURNALED, 0, &mut out);
            }
            out.raw
                .iter()
                .map(|forwarded| forwarded.reading.value)
                .collect()
        };
        let values = [1.0, 1.2, 1.6, 1.7, 0.9, 5.0];
        assert_eq!(run(RawPolicy::All, &values), values.to_vec());
        assert!(run(RawPolicy::None, &values).is_empty());
        assert_eq!(
            run(RawPolicy::EveryNth { n: 2 }, &values),
            vec![1.0, 1.6, 0.9]
        );
        assert_eq!(
            run(RawPolicy::Deadband { threshold: 0.5 }, &values),
            vec![1.0, 1.6, 0.9, 5.0]
        );
    }
}
