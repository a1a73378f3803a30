//! The readings of one message or line, with their series keys' text held once.
//!
//! Every reading names its series by device, metric and tags. The aggregator needs only the
//! series id, which the registry finds from those strings; an owned `SeriesKey` per reading
//! (five allocations, then dropped after one lookup) was half of the parse cost in
//! `bench agent` (`docs/benchmarks.md`). So a [`ParsedReadings`] keeps the key text of all
//! of a message's readings in one string, with spans into it, and hands out borrowed
//! [`SeriesKeyRef`]s; the registry allocates a `SeriesKey` only for a series it has never
//! seen. A message costs three allocations however many readings it holds.
//!
//! Parsers write through the [`ReadingSink`] trait, which a plain `Vec<ParsedReading>`
//! (owned keys: simple to compare in tests and tools) implements as well.
//!
//! The containers themselves are recycled: a shell takes one from its [`ReadingsPool`], fills
//! it and sends it to the pipeline, and when the pipeline drops it after ingesting, its
//! emptied buffers go back to that pool. Three allocations and three frees per message (on
//! two threads: the shell's malloc, the pipeline's free) were the largest single cost left
//! in parsing a plain-number message (`docs/benchmarks.md`, "Session 6").

use std::sync::{Arc, Mutex};

use tributary_protocol::model::SeriesKey;

/// One value parsed from a source, with an owned key: what tests and tools compare.
///
/// The hot path keeps readings in a [`ParsedReadings`] instead (see the module docs);
/// `time_ms` is the event time the device reported, if it reported one; the pipeline passes it
/// through [`super::plausible_time`] (or uses the receive time when it is `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedReading {
    pub key: SeriesKey,
    pub time_ms: Option<i64>,
    pub value: f64,
}

/// A series key as a parser finds it: in pieces, not yet joined or sorted.
#[derive(Debug, Clone, Copy)]
pub struct KeyPieces<'a> {
    pub device_id: &'a str,
    /// The metric is `metric_prefix.metric_name`, or whichever of the two is not empty (a
    /// topic's `{metric}` and a payload's field name).
    pub metric_prefix: &'a str,
    pub metric_name: &'a str,
    /// Tags in the order found (topic, then payload); stored sorted by name, the last value
    /// winning on a repeated name, as [`SeriesKey::with_tags`] does.
    pub tag_groups: [&'a [(&'a str, &'a str)]; 2],
}

impl KeyPieces<'_> {
    /// Whether the joined metric name is empty (a reading without a metric is rejected).
    pub fn metric_is_empty(&self) -> bool {
        self.metric_prefix.is_empty() && self.metric_name.is_empty()
    }

    fn joined_metric(&self) -> String {
        match (self.metric_prefix.is_empty(), self.metric_name.is_empty()) {
            (false, false) => format!("{}.{}", self.metric_prefix, self.metric_name),
            (false, true) => self.metric_prefix.to_owned(),
            (true, _) => self.metric_name.to_owned(),
        }
    }

    fn tags(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tag_groups.into_iter().flatten().copied()
    }
}

/// Where parsers put readings. A message is parsed as a whole or not at all, so a parser
/// must be able to take back what it appended ([`ReadingSink::truncate_readings`]).
pub trait ReadingSink {
    fn reading_count(&self) -> usize;
    /// Drops readings from index `count` on.
    fn truncate_readings(&mut self, count: usize);
    /// Sets the event time of every reading from index `first_index` on.
    fn set_time_from(&mut self, first_index: usize, time_ms: Option<i64>);
    fn push_reading(&mut self, key: KeyPieces<'_>, time_ms: Option<i64>, value: f64);
}

impl ReadingSink for Vec<ParsedReading> {
    fn reading_count(&self) -> usize {
        self.len()
    }

    fn truncate_readings(&mut self, count: usize) {
        self.truncate(count);
    }

    fn set_time_from(&mut self, first_index: usize, time_ms: Option<i64>) {
        if let Some(readings) = self.get_mut(first_index..) {
            for reading in readings {
                reading.time_ms = time_ms;
            }
        }
    }

    fn push_reading(&mut self, key: KeyPieces<'_>, time_ms: Option<i64>, value: f64) {
        self.push(ParsedReading {
            key: SeriesKey::new(key.device_id, key.joined_metric()).with_tags(key.tags()),
            time_ms,
            value,
        });
    }
}

/// Byte range of a string in [`ParsedReadings::text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn of<'t>(&self, text: &'t str) -> &'t str {
        text.get(self.start..self.end).unwrap_or_default()
    }
}

/// A tag's name and value.
type TagSpan = (Span, Span);

#[derive(Debug, Clone, Copy)]
struct Entry {
    device: Span,
    metric: Span,
    /// Index range in [`ParsedReadings::tags`], sorted by name.
    tags: Span,
    time_ms: Option<i64>,
    value: f64,
}

/// The readings of one message or line; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct ParsedReadings {
    text: String,
    tags: Vec<TagSpan>,
    entries: Vec<Entry>,
    /// The pool this container's buffers return to when it is dropped (a clone returns to
    /// the same pool); `None` for a container made with [`ParsedReadings::new`].
    home: Option<ReadingsPool>,
}

impl Drop for ParsedReadings {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            home.put_back(self);
        }
    }
}

/// Emptied [`ParsedReadings`] waiting to be filled again (see the module docs).
///
/// Cloning gives another handle to the same pool. The pool keeps at most
/// [`ReadingsPool::MAX_IDLE_CONTAINERS`] idle containers, and none whose buffers grew past
/// [`ReadingsPool::MAX_IDLE_CONTAINER_BYTES`] for an unusually large message, so what it holds
/// stays a few KiB; every container in flight (at most the pipeline queue's length) exists
/// without a pool as well.
#[derive(Debug, Clone, Default)]
pub struct ReadingsPool {
    idle: Arc<Mutex<Vec<ParsedReadings>>>,
}

impl ReadingsPool {
    /// Idle containers kept; the pipeline drains its queue faster than a shell fills it, so
    /// a shell rarely finds more than one or two waiting.
    pub const MAX_IDLE_CONTAINERS: usize = 32;
    /// A container whose buffers grew past this (in bytes) is freed instead of kept.
    pub const MAX_IDLE_CONTAINER_BYTES: usize = 16 * 1024;

    pub fn new() -> Self {
        Self::default()
    }

    /// An empty container that returns to this pool when dropped: a recycled one if one is
    /// idle, a new one (allocating on first use) otherwise.
    pub fn take(&self) -> ParsedReadings {
        let recycled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut readings = recycled.unwrap_or_default();
        readings.home = Some(self.clone());
        readings
    }

    /// Containers idle in the pool now.
    pub fn idle_containers(&self) -> usize {
        self.idle.lock().map_or(0, |idle| idle.len())
    }

    fn put_back(&self, readings: &mut ParsedReadings) {
        let buffer_bytes = readings.text.capacity()
            + readings.tags.capacity() * std::mem::size_of::<TagSpan>()
            + readings.entries.capacity() * std::mem::size_of::<Entry>();
        if buffer_bytes > Self::MAX_IDLE_CONTAINER_BYTES {
            return;
        }
        let mut emptied = ParsedReadings {
            text: std::mem::take(&mut readings.text),
            tags: std::mem::take(&mut readings.tags),
            entries: std::mem::take(&mut readings.entries),
            home: None,
        };
        emptied.clear();
        // A poisoned lock (a panic elsewhere while holding it) only costs the recycling.
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < Self::MAX_IDLE_CONTAINERS {
                idle.push(emptied);
            }
        }
    }
}

impl ParsedReadings {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&mut self) {
        self.text.clear();
        self.tags.clear();
        self.entries.clear();
    }

    pub fn get(&self, index: usize) -> Option<ReadingRef<'_>> {
        self.entries.get(index).map(|entry| self.view(entry))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = ReadingRef<'_>> + '_ {
        self.entries.iter().map(|entry| self.view(entry))
    }

    /// The readings with owned keys.
    pub fn to_vec(&self) -> Vec<ParsedReading> {
        self.iter()
            .map(|reading| reading.to_owned_reading())
            .collect()
    }

    /// Appends a reading whose key is already whole.
    pub fn push(&mut self, key: SeriesKeyRef<'_>, time_ms: Option<i64>, value: f64) {
        let device = self.device_span(key.device_id);
        let metric = self.push_text(key.metric);
        let tags_start = self.tags.len();
        for (name, tag_value) in key.tags() {
            let name = self.push_text(name);
            let tag_value = self.push_text(tag_value);
            self.tags.push((name, tag_value));
        }
        self.push_entry(device, metric, tags_start, time_ms, value);
    }

    /// Records a reading whose text is written: its tags are those from `tags_start` on.
    fn push_entry(
        &mut self,
        device: Span,
        metric: Span,
        tags_start: usize,
        time_ms: Option<i64>,
        value: f64,
    ) {
        let tags = Span {
            start: tags_start,
            end: self.tags.len(),
        };
        self.entries.push(Entry {
            device,
            metric,
            tags,
            time_ms,
            value,
        });
    }

    fn view<'s>(&'s self, entry: &Entry) -> ReadingRef<'s> {
        ReadingRef {
            key: SeriesKeyRef {
                device_id: entry.device.of(&self.text),
                metric: entry.metric.of(&self.text),
                tags: TagsRef::Spans {
                    text: &self.text,
                    spans: self
                        .tags
                        .get(entry.tags.start..entry.tags.end)
                        .unwrap_or_default(),
                },
            },
            time_ms: entry.time_ms,
            value: entry.value,
        }
    }

    fn push_text(&mut self, text: &str) -> Span {
        let start = self.text.len();
        self.text.push_str(text);
        Span {
            start,
            end: self.text.len(),
        }
    }

    /// The previous reading's device span when it is the same device (every reading of a
    /// message usually is), otherwise the device copied in.
    fn device_span(&mut self, device_id: &str) -> Span {
        match self.entries.last() {
            Some(last) if last.device.of(&self.text) == device_id => last.device,
            _ => self.push_text(device_id),
        }
    }
}

impl ReadingSink for ParsedReadings {
    fn reading_count(&self) -> usize {
        self.entries.len()
    }

    fn truncate_readings(&mut self, count: usize) {
        let Some(first_dropped) = self.entries.get(count).copied() else {
            return;
        };
        // Each reading's text and tags come after the previous reading's (a shared device span
        // points backwards, never forwards), so dropping the tail frees from the first dropped
        // reading's earliest own byte on.
        let text_end = if count > 0
            && self.entries.get(count - 1).map(|entry| entry.device) == Some(first_dropped.device)
        {
            first_dropped.metric.start
        } else {
            first_dropped.device.start
        };
        self.entries.truncate(count);
        self.tags.truncate(first_dropped.tags.start);
        self.text.truncate(text_end);
    }

    fn set_time_from(&mut self, first_index: usize, time_ms: Option<i64>) {
        if let Some(entries) = self.entries.get_mut(first_index..) {
            for entry in entries {
                entry.time_ms = time_ms;
            }
        }
    }

    fn push_reading(&mut self, key: KeyPieces<'_>, time_ms: Option<i64>, value: f64) {
        // Room for the whole key at once: a message's first reading then costs one
        // allocation per container instead of a `String` grown piece by piece (none at all
        // for a container recycled through a `ReadingsPool`). The tag groups are walked as
        // two plain slices: a flattened iterator over them cost more than the tags' text.
        let mut tag_bytes = 0;
        let mut tag_count = 0;
        for group in key.tag_groups {
            tag_count += group.len();
            for (name, tag_value) in group {
                tag_bytes += name.len() + tag_value.len();
            }
        }
        self.text.reserve(
            key.device_id.len() + key.metric_prefix.len() + 1 + key.metric_name.len() + tag_bytes,
        );
        self.tags.reserve(tag_count);
        self.entries.reserve(1);
        let device = self.device_span(key.device_id);
        let metric_start = self.text.len();
        self.text.push_str(key.metric_prefix);
        if !key.metric_prefix.is_empty() && !key.metric_name.is_empty() {
            self.text.push('.');
        }
        self.text.push_str(key.metric_name);
        let metric = Span {
            start: metric_start,
            end: self.text.len(),
        };
        let tags_start = self.tags.len();
        for group in key.tag_groups {
            for (name, tag_value) in group {
                self.push_tag(tags_start, name, tag_value);
            }
        }
        self.push_entry(device, metric, tags_start, time_ms, value);
    }
}

impl ParsedReadings {
    /// Adds a tag to the reading whose tags start at `tags_start`, keeping them sorted by
    /// name; a repeated name takes the new value.
    fn push_tag(&mut self, tags_start: usize, name: &str, tag_value: &str) {
        let own_tags = self.tags.get(tags_start..).unwrap_or_default();
        // Tags usually come in name order (one tag, or a template's tags): append then.
        let in_order = own_tags
            .last()
            .is_none_or(|(last, _)| last.of(&self.text) < name);
        let position = if in_order {
            Err(own_tags.len())
        } else {
            own_tags.binary_search_by(|(existing, _)| existing.of(&self.text).cmp(name))
        };
        let tag_value = self.push_text(tag_value);
        match position {
            Ok(index) => {
                if let Some(slot) = self.tags.get_mut(tags_start + index) {
                    slot.1 = tag_value;
                }
            }
            Err(index) => {
                let name = self.push_text(name);
                self.tags.insert(tags_start + index, (name, tag_value));
            }
        }
    }
}

impl From<Vec<ParsedReading>> for ParsedReadings {
    fn from(readings: Vec<ParsedReading>) -> Self {
        let mut parsed = Self::new();
        for reading in &readings {
            parsed.push(
                SeriesKeyRef::from(&reading.key),
                reading.time_ms,
                reading.value,
            );
        }
        parsed
    }
}

impl PartialEq for ParsedReadings {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

/// One reading of a [`ParsedReadings`], borrowing its key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadingRef<'a> {
    pub key: SeriesKeyRef<'a>,
    pub time_ms: Option<i64>,
    pub value: f64,
}

impl ReadingRef<'_> {
    pub fn to_owned_reading(&self) -> ParsedReading {
        ParsedReading {
            key: self.key.to_key(),
            time_ms: self.time_ms,
            value: self.value,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum TagsRef<'a> {
    Owned(&'a [(String, String)]),
    Spans { text: &'a str, spans: &'a [TagSpan] },
}

/// A series key borrowed from a [`ParsedReadings`] or a [`SeriesKey`]: what the series
/// registry looks up. Tags are sorted by name with unique names, as in a `SeriesKey`.
#[derive(Debug, Clone, Copy)]
pub struct SeriesKeyRef<'a> {
    pub device_id: &'a str,
    pub metric: &'a str,
    tags: TagsRef<'a>,
}

impl<'a> SeriesKeyRef<'a> {
    /// Tag (name, value) pairs, sorted by name.
    pub fn tags(&self) -> Tags<'a> {
        Tags {
            tags: self.tags,
            index: 0,
        }
    }

    /// The owned key (allocates: for a series seen for the first time).
    pub fn to_key(&self) -> SeriesKey {
        SeriesKey {
            device_id: self.device_id.to_owned(),
            metric: self.metric.to_owned(),
            tags: self
                .tags()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
        }
    }

    /// Whether `key` is this key.
    pub fn matches(&self, key: &SeriesKey) -> bool {
        self.device_id == key.device_id
            && self.metric == key.metric
            && self.tags().len() == key.tags.len()
            && self
                .tags()
                .zip(&key.tags)
                .all(|((name, value), (key_name, key_value))| {
                    name == key_name && value == key_value
                })
    }
}

/// The tags of a [`SeriesKeyRef`], sorted by name.
#[derive(Debug, Clone)]
pub struct Tags<'a> {
    tags: TagsRef<'a>,
    index: usize,
}

impl<'a> Iterator for Tags<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let tag = match self.tags {
            TagsRef::Owned(tags) => tags
                .get(self.index)
                .map(|(name, value)| (name.as_str(), value.as_str())),
            TagsRef::Spans { text, spans } => spans
                .get(self.index)
                .map(|(name, value)| (name.of(text), value.of(text))),
        }?;
        self.index += 1;
        Some(tag)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let total = match self.tags {
            TagsRef::Owned(tags) => tags.len(),
            TagsRef::Spans { spans, .. } => spans.len(),
        };
        let left = total.saturating_sub(self.index);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Tags<'_> {}

impl<'a> From<&'a SeriesKey> for SeriesKeyRef<'a> {
    fn from(key: &'a SeriesKey) -> Self {
        Self {
            device_id: &key.device_id,
            metric: &key.metric,
            tags: TagsRef::Owned(&key.tags),
        }
    }
}

impl PartialEq for SeriesKeyRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.device_id == other.device_id
            && self.metric == other.metric
            && self.tags().len() == other.tags().len()
            && self.tags().zip(other.tags()).all(|(a, b)| a == b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces<'a>(
        device_id: &'a str,
        metric_prefix: &'a str,
        metric_name: &'a str,
        topic_tags: &'a [(&'a str, &'a str)],
        payload_tags: &'a [(&'a str, &'a str)],
    ) -> KeyPieces<'a> {
        KeyPieces {
            device_id,
            metric_prefix,
            metric_name,
            tag_groups: [topic_tags, payload_tags],
        }
    }

    /// Both sinks receive the same pushes and must agree reading for reading.
    fn push_both(
        compact: &mut ParsedReadings,
        owned: &mut Vec<ParsedReading>,
        key: KeyPieces<'_>,
        value: f64,
    ) {
        compact.push_reading(key, None, value);
        owned.push_reading(key, None, value);
    }

    #[test]
    fn keys_are_joined_and_tags_sorted_like_series_keys() {
        let mut compact = ParsedReadings::new();
        let mut owned = Vec::new();
        let topic_tags = [("site", "b"), ("floor", "2"), ("site", "c")];
        let payload_tags = [("unit", "C"), ("floor", "3")];
        push_both(
            &mut compact,
            &mut owned,
            pieces("d", "env", "temp", &topic_tags, &payload_tags),
            1.0,
        );
        push_both(
            &mut compact,
            &mut owned,
            pieces("d", "", "hum", &[], &[]),
            2.0,
        );
        push_both(
            &mut compact,
            &mut owned,
            pieces("e", "env", "", &topic_tags, &[]),
            3.0,
        );
        assert_eq!(compact.to_vec(), owned);
        let first = compact.get(0).expect("first reading");
        assert_eq!(first.key.metric, "env.temp");
        assert_eq!(
            first.key.tags().collect::<Vec<_>>(),
            [("floor", "3"), ("site", "c"), ("unit", "C")]
        );
        assert!(first.key.matches(&owned[0].key));
        assert!(!first.key.matches(&owned[1].key));
        assert_eq!(ParsedReadings::from(owned.clone()), compact);
    }

    #[test]
    fn truncating_takes_back_exactly_the_dropped_readings() {
        let tags = [("site", "a")];
        for keep in 0..4 {
            let mut compact = ParsedReadings::new();
            let mut owned = Vec::new();
            // Readings 0-1 share a device span, 2 has its own, 3 shares 2's.
            push_both(
                &mut compact,
                &mut owned,
                pieces("d1", "m", "", &tags, &[]),
                0.0,
            );
            push_both(
                &mut compact,
                &mut owned,
                pieces("d1", "n", "", &tags, &[]),
                1.0,
            );
            push_both(
                &mut compact,
                &mut owned,
                pieces("d2", "m", "", &[], &[]),
                2.0,
            );
            push_both(
                &mut compact,
                &mut owned,
                pieces("d2", "n", "", &tags, &[]),
                3.0,
            );
            compact.truncate_readings(keep);
            owned.truncate_readings(keep);
            assert_eq!(compact.to_vec(), owned, "kept {keep}");
            // What follows is stored as if the dropped readings had never been pushed.
            push_both(
                &mut compact,
                &mut owned,
                pieces("d3", "x", "", &tags, &[]),
                9.0,
            );
            assert_eq!(compact.to_vec(), owned, "kept {keep}, then one more");
            let fresh = ParsedReadings::from(owned.clone());
            assert_eq!(
                compact.text.len(),
                fresh.text.len(),
                "kept {keep}: text reclaimed"
            );
            assert_eq!(
                compact.tags.len(),
                fresh.tags.len(),
                "kept {keep}: tags reclaimed"
            );
        }
    }

    #[test]
    fn event_times_are_set_from_an_index_on() {
        let mut compact = ParsedReadings::new();
        for value in 0..3 {
            compact.push_reading(pieces("d", "m", "", &[], &[]), None, f64::from(value));
        }
        compact.set_time_from(1, Some(7));
        let times: Vec<Option<i64>> = compact.iter().map(|reading| reading.time_ms).collect();
        assert_eq!(times, [None, Some(7), Some(7)]);
    }

    #[test]
    fn dropped_containers_return_emptied_to_their_pool() {
        let pool = ReadingsPool::new();
        let mut first = pool.take();
        first.push_reading(
            pieces("device-1", "temperature", "", &[("site", "a")], &[]),
            None,
            1.0,
        );
        let copy = first.clone();
        drop(first);
        assert_eq!(pool.idle_containers(), 1);
        drop(copy);
        assert_eq!(
            pool.idle_containers(),
            2,
            "a clone returns to the same pool"
        );
        let recycled = pool.take();
        assert!(recycled.is_empty());
        assert!(recycled.text.capacity() > 0, "the buffers are reused");
        assert_eq!(pool.idle_containers(), 1);
        // Containers made without a pool never join one.
        drop(ParsedReadings::new());
        assert_eq!(pool.idle_containers(), 1);
    }

    #[test]
    fn the_pool_keeps_few_and_small_containers() {
        let pool = ReadingsPool::new();
        let mut large = pool.take();
        let long_device = "d".repeat(ReadingsPool::MAX_IDLE_CONTAINER_BYTES);
        large.push_reading(pieces(&long_device, "m", "", &[], &[]), None, 1.0);
        drop(large);
        assert_eq!(pool.idle_containers(), 0, "an oversized container is freed");
        let many: Vec<ParsedReadings> = (0..ReadingsPool::MAX_IDLE_CONTAINERS + 5)
            .map(|_| pool.take())
            .collect();
        drop(many);
        assert_eq!(pool.idle_containers(), ReadingsPool::MAX_IDLE_CONTAINERS);
    }
}
