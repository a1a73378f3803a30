//! A mergeable quantile sketch (DDSketch) at 1% relative accuracy, written by hand.
//!
//! Why a sketch: dashboards want p50/p99 of a series over any time range, and the
//! answer must be computable from the per-window summaries the agents ship, without the
//! raw readings. DDSketch gives relative-error guarantees and merges by adding bucket
//! counts, so merging is exact, associative and commutative.
//!
//! How it works: a value `v > 0` falls into bucket `i` when `L(v) * 35` lies in
//! `(i - 1, i]`, where `L` approximates `log2` (the cubic interpolation of the exponent
//! and mantissa bits used by DDSketch's `CubicallyInterpolatedMapping`). Between two
//! bucket boundaries `ln v` grows by at most `0.7 / 35 = 0.02`, so the harmonic mean of a
//! bucket's bounds is within 0.99997% of every value in it. The mapping uses only IEEE
//! addition and multiplication (no `libm` logarithm), so it is fast (a few ns) and an
//! ARM agent and an x86 collector put every value in exactly the same bucket.
//!
//! Negative values go to a second store indexed by their magnitude; zeros (and
//! magnitudes below `f64::MIN_POSITIVE`, the subnormals) are counted apart.
//!
//! Memory bound: each store covers at most [`MAX_BUCKETS_PER_STORE`] consecutive bucket
//! indices (a dense `Vec<u64>`), so a sketch never holds more than
//! `2 * 2048 * 8 B = 32 KiB` of counts, whatever it is fed. When a store would span more,
//! its lowest buckets (the magnitudes closest to zero) are collapsed into the lowest
//! bucket it keeps. A bucket is 0.0192 to 0.02 wide in `ln v`, so 2048 buckets span at least
//! `e^(0.0192 * 2047)`, about 1e17: the accuracy guarantee holds for every magnitude within a
//! factor 1e17 of the largest one;
//! real sensor data spans far less and a 10 s window usually touches a handful of buckets.
//! Collapsing depends only on the multiset of bucket indices (every index below
//! `highest - 2047` ends in bucket `highest - 2047`), so merge stays associative and
//! commutative even when it collapses.
//!
//! Wire form: each store is `(first_index, [(gap, count), ..])` over its non-empty
//! buckets only, so a window with a few distinct values costs a few bytes in postcard
//! (batch format 1, and wherever a sketch is stored on its own). Batch format 2 codes the
//! stores against the buckets of the summary's min and max instead (`batch/summaries.rs`).

use serde::de::Error as _;
use serde::ser::{SerializeSeq, SerializeTuple};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The relative accuracy every quantile answer is guaranteed within (for values in the
/// non-collapsed range, see the module docs). The mapping actually achieves 0.99997%.
pub const RELATIVE_ACCURACY: f64 = 0.01;

/// The most consecutive bucket indices one store (positive or negative) spans.
pub const MAX_BUCKETS_PER_STORE: usize = 2048;

/// Buckets per unit of the approximate `log2`. `0.7 / ln((1 + 0.01) / (1 - 0.01))` is
/// 34.9988; rounding up to 35 narrows the buckets a hair and keeps the bound.
const INDEX_MULTIPLIER: f64 = 35.0;

// Coefficients of the cubic `P(s) = A s^3 + B s^2 + C s`, with `P(0) = 0`, `P(1) = 1`,
// strictly increasing on [0, 1]; `log2(1 + s)` is approximated by `P(s)`.
const CUBIC_A: f64 = 6.0 / 35.0;
const CUBIC_B: f64 = -3.0 / 5.0;
const CUBIC_C: f64 = 10.0 / 7.0;

/// Why a sketch read from the wire was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SketchError {
    #[error(
        "sketch bucket store spans {span_buckets} bucket indices, more than the limit of \
         {max_buckets}; the sender is not a conforming Tributary encoder"
    )]
    TooManyBuckets {
        span_buckets: u64,
        max_buckets: usize,
    },
    #[error(
        "sketch bucket {position} has an invalid gap {gap} (the first gap must be 0 and \
         later gaps at least 1); the encoding is corrupt"
    )]
    InvalidGap { position: usize, gap: u32 },
    #[error("sketch bucket {position} has a zero count; empty buckets are never encoded")]
    ZeroCount { position: usize },
    #[error("sketch bucket index overflows i32 at bucket {position}; the encoding is corrupt")]
    IndexOverflow { position: usize },
}

/// Approximate `log2(value)` for a positive normal `value`, from its bits.
#[inline]
fn approximate_log2(value: f64) -> f64 {
    let bits = value.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mantissa_fraction =
        f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000) - 1.0;
    ((CUBIC_A * mantissa_fraction + CUBIC_B) * mantissa_fraction + CUBIC_C) * mantissa_fraction
        + exponent as f64
}

/// `2^exponent` for exponents in `[-1074 + 64, 1023]`, exactly.
fn power_of_two(exponent: i64) -> f64 {
    if exponent > 1023 {
        f64::INFINITY
    } else if exponent >= -1022 {
        f64::from_bits(((exponent + 1023) as u64) << 52)
    } else {
        // Subnormal result: scale up into the normal range, then down by 2^-64.
        power_of_two(exponent + 64) * f64::from_bits(((1023 - 64) as u64) << 52)
    }
}

/// The inverse of [`approximate_log2`]: `(exponent, 1 + s)` with `value = 2^exponent * (1 + s)`.
fn inverse_approximate_log2(log: f64) -> (i64, f64) {
    let exponent = log.floor();
    let target = log - exponent;
    // P is smooth with 0.74 <= P' <= 1.43 on [0, 1]: Newton converges in a few steps.
    let mut s = target;
    for _ in 0..8 {
        let value = ((CUBIC_A * s + CUBIC_B) * s + CUBIC_C) * s - target;
        let slope = (3.0 * CUBIC_A * s + 2.0 * CUBIC_B) * s + CUBIC_C;
        s = (s - value / slope).clamp(0.0, 1.0);
    }
    (exponent as i64, 1.0 + s)
}

/// The bucket index of a positive normal magnitude.
#[inline]
pub(crate) fn bucket_index(magnitude: f64) -> i32 {
    // A hand-written ceil: `f64::ceil` is a libm call on baseline x86-64 (no SSE4.1).
    // Finite normals give |scaled| < 36000, so `CEIL_OFFSET - scaled` is positive and
    // truncating it is `floor`; `ceil(x) = CEIL_OFFSET - floor(CEIL_OFFSET - x)`. The
    // subtraction may round a value within 1e-11 of a boundary onto it: a deterministic,
    // monotone shift of the boundary that changes no guarantee.
    const CEIL_OFFSET: i32 = 1 << 16;
    let scaled = approximate_log2(magnitude) * INDEX_MULTIPLIER;
    CEIL_OFFSET.wrapping_sub((CEIL_OFFSET as f64 - scaled) as i32)
}

/// The value reported for bucket `index`: the harmonic mean of its bounds, which is
/// within the relative accuracy of both bounds.
fn bucket_value(index: i32) -> f64 {
    let (lower_exponent, lower_significand) =
        inverse_approximate_log2((index as f64 - 1.0) / INDEX_MULTIPLIER);
    let (upper_exponent, upper_significand) =
        inverse_approximate_log2(index as f64 / INDEX_MULTIPLIER);
    let ratio =
        power_of_two(upper_exponent - lower_exponent) * upper_significand / lower_significand;
    let value = power_of_two(lower_exponent) * lower_significand * (2.0 * ratio / (1.0 + ratio));
    value.min(f64::MAX)
}

/// Counts of consecutive bucket indices `[offset, offset + counts.len())`.
///
/// Invariant: empty, or at least one count is non-zero, and `counts.len() <=
/// MAX_BUCKETS_PER_STORE`. The counts may begin and end with zeros (slack): a store that
/// grows through [`BucketStore::merge`] is widened a little beyond what it needs, so the
/// next summaries merged into a window land inside it and are added in place instead of
/// reallocating and shifting the vector each time the window's range creeps outwards.
/// Everything observable (equality, `Debug`, the wire form, bucket iteration, collapsing)
/// goes by the occupied range, from the first to the last non-zero count, so slack never
/// shows. Stores built by [`BucketStore::add`] and decoded from the wire have no slack.
#[derive(Default)]
pub(crate) struct BucketStore {
    offset: i32,
    counts: Vec<u64>,
}

/// Slack, in buckets, added on each side a store grows towards when a merge widens it
/// (at least; a quarter of the occupied span when that is more, so a window fed for
/// hours widens a logarithmic number of times). 8 buckets is 64 bytes.
const MERGE_SLACK_BUCKETS: i64 = 8;

/// By hand so that `clone_from` reuses the target's allocation (the window engine copies
/// running windows into recycled summaries).
impl Clone for BucketStore {
    fn clone(&self) -> Self {
        Self {
            offset: self.offset,
            counts: self.counts.clone(),
        }
    }

    fn clone_from(&mut self, source: &Self) {
        self.offset = source.offset;
        self.counts.clone_from(&source.counts);
    }
}

/// Equal when they hold the same counts at the same indices, whatever their slack.
impl PartialEq for BucketStore {
    fn eq(&self, other: &Self) -> bool {
        self.occupied() == other.occupied()
    }
}

impl Eq for BucketStore {}

/// The occupied range only, as the derived form printed for a store without slack (the
/// engine's output fingerprint reads it).
impl std::fmt::Debug for BucketStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (offset, counts) = self.occupied();
        formatter
            .debug_struct("BucketStore")
            .field("offset", &offset)
            .field("counts", &counts)
            .finish()
    }
}

/// Adds `source` into `target` slot by slot, saturating at `u64::MAX`.
#[inline]
fn add_counts(target: &mut [u64], source: &[u64]) {
    // An edge summary usually spans a few buckets: a plain loop is cheapest there.
    if source.len() < 16 {
        for (slot, count) in target.iter_mut().zip(source) {
            *slot = slot.saturating_add(*count);
        }
        return;
    }
    // Wrapping additions vectorise (saturating ones do not on baseline x86-64). A sum
    // can only wrap when an addend has its top bit set, which no real count has: if one
    // did, undo the wrapping additions and saturate instead.
    let mut top_bits = 0u64;
    for (slot, count) in target.iter_mut().zip(source) {
        top_bits |= *slot | *count;
        *slot = slot.wrapping_add(*count);
    }
    if top_bits >> 63 != 0 {
        for (slot, count) in target.iter_mut().zip(source) {
            *slot = slot.wrapping_sub(*count).saturating_add(*count);
        }
    }
}

impl BucketStore {
    fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    fn total(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |sum, count| sum.saturating_add(*count))
    }

    /// The highest index the dense vector covers (slack included).
    fn covered_highest_index(&self) -> i64 {
        self.offset as i64 + self.counts.len() as i64 - 1
    }

    /// The first non-zero count's index and the counts from it to the last non-zero one;
    /// `(offset, [])` when empty.
    #[inline]
    fn occupied(&self) -> (i32, &[u64]) {
        // Without slack (edge summaries, decoded stores) the whole vector is occupied.
        match (self.counts.first(), self.counts.last()) {
            (None, _) | (_, None) => return (self.offset, &[]),
            (Some(first), Some(last)) if *first != 0 && *last != 0 => {
                return (self.offset, &self.counts)
            }
            _ => {}
        }
        let first = self.counts.iter().position(|count| *count != 0);
        let last = self.counts.iter().rposition(|count| *count != 0);
        match (first, last) {
            (Some(first), Some(last)) => (
                self.offset.wrapping_add(first as i32),
                self.counts.get(first..=last).unwrap_or_default(),
            ),
            _ => (self.offset, &[]),
        }
    }

    #[inline]
    fn add(&mut self, index: i32, count: u64) {
        if count == 0 {
            return;
        }
        let position = index as i64 - self.offset as i64;
        if position >= 0 {
            if let Some(slot) = self.counts.get_mut(position as usize) {
                *slot = slot.saturating_add(count);
                return;
            }
        }
        self.add_slow(index as i64, index as i64, 0, |counts, lowest| {
            let position = (index as i64).max(lowest) - lowest;
            if let Some(slot) = counts.get_mut(position as usize) {
                *slot = slot.saturating_add(count);
            }
        });
    }

    fn merge(&mut self, other: &BucketStore) {
        let (other_offset, other_counts) = other.occupied();
        if other_counts.is_empty() {
            return;
        }
        let other_lowest = other_offset as i64;
        let other_highest = other_lowest + other_counts.len() as i64 - 1;
        // Fast path: `other` lies inside the range `self` covers (the usual case when a
        // window merges small summaries, helped by the slack a merge leaves), so no
        // resizing is needed.
        if !self.is_empty()
            && other_lowest >= self.offset as i64
            && other_highest <= self.covered_highest_index()
        {
            let start = (other_lowest - self.offset as i64) as usize;
            if let Some(target) = self.counts.get_mut(start..start + other_counts.len()) {
                add_counts(target, other_counts);
                return;
            }
        }
        let span = other_counts.len() as i64;
        self.add_slow(other_lowest, other_highest, span, |counts, lowest| {
            for (position, count) in other_counts.iter().enumerate() {
                let index = (other_lowest + position as i64).max(lowest);
                if let Some(slot) = counts.get_mut((index - lowest) as usize) {
                    *slot = slot.saturating_add(*count);
                }
            }
        });
    }

    /// Rebuilds the store to cover `[new_lowest, new_highest]` and its occupied range
    /// (collapsing whatever falls below the kept range into its lowest bucket), then lets
    /// `fill` add counts into the new dense vector, given the index of its first slot.
    /// With `slack_hint > 0` (merges), each side that grows gets slack too (see
    /// [`MERGE_SLACK_BUCKETS`]), as far as the store's bucket limit allows.
    #[inline(never)]
    fn add_slow(
        &mut self,
        new_lowest: i64,
        new_highest: i64,
        slack_hint: i64,
        fill: impl FnOnce(&mut Vec<u64>, i64),
    ) {
        let (old_offset, old_counts) = self.occupied();
        let old_lowest = old_offset as i64;
        let old_highest = old_lowest + old_counts.len() as i64 - 1;
        let (lowest, highest) = if old_counts.is_empty() {
            (new_lowest, new_highest)
        } else {
            (new_lowest.min(old_lowest), new_highest.max(old_highest))
        };
        // Collapsing depends on the occupied range only (never on slack), so that merge
        // stays associative and commutative.
        let lowest = lowest.max(highest - MAX_BUCKETS_PER_STORE as i64 + 1);
        let (mut covered_lowest, mut covered_highest) = (lowest, highest);
        if slack_hint > 0 && !old_counts.is_empty() {
            let mut room = MAX_BUCKETS_PER_STORE as i64 - (highest - lowest + 1);
            let slack = MERGE_SLACK_BUCKETS.max((highest - lowest + 1 + slack_hint) / 4);
            if highest > old_highest {
                let above = slack.min(room);
                covered_highest += above;
                room -= above;
            }
            if lowest < old_lowest {
                covered_lowest -= slack.min(room);
            }
        }
        let length = (covered_highest - covered_lowest + 1) as usize;
        let collapsing = !old_counts.is_empty() && old_lowest < lowest;
        if collapsing {
            // Rare (a store past its bucket limit): rebuilt into a fresh vector.
            let mut counts = vec![0u64; length];
            for (position, count) in old_counts.iter().enumerate() {
                let index = (old_lowest + position as i64).max(lowest);
                if let Some(slot) = counts.get_mut((index - covered_lowest) as usize) {
                    *slot = slot.saturating_add(*count);
                }
            }
            self.counts = counts;
        } else {
            // In place: the occupied counts move to their new position in the same
            // allocation (which grows by doubling, so a store widened bucket by bucket
            // reallocates rarely) and everything around them is zeroed.
            let occupied_length = old_counts.len();
            let source = (old_lowest - self.offset as i64).max(0) as usize;
            let destination = (old_lowest - covered_lowest).max(0) as usize;
            if self.counts.len() < length {
                self.counts.resize(length, 0);
            }
            let end = source.max(destination) + occupied_length;
            if occupied_length > 0 && end <= self.counts.len() {
                self.counts
                    .copy_within(source..source + occupied_length, destination);
            }
            if let Some(below) = self.counts.get_mut(..destination) {
                below.fill(0);
            }
            if let Some(above) = self.counts.get_mut(destination + occupied_length..) {
                above.fill(0);
            }
            self.counts.truncate(length);
        }
        self.offset = covered_lowest as i32;
        fill(&mut self.counts, covered_lowest);
    }

    /// Non-empty buckets as `(index, count)`, lowest index first.
    pub(crate) fn buckets(&self) -> impl DoubleEndedIterator<Item = (i32, u64)> + '_ {
        let offset = self.offset;
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(move |(position, count)| (offset.wrapping_add(position as i32), *count))
    }
}

/// Sparse wire form of a store: the first non-empty index, then `(gap, count)` pairs.
struct SparseBuckets<'a>(&'a BucketStore);

impl Serialize for SparseBuckets<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let non_empty = self.0.counts.iter().filter(|count| **count > 0).count();
        let mut sequence = serializer.serialize_seq(Some(non_empty))?;
        let mut previous = self.0.occupied().0;
        for (index, count) in self.0.buckets() {
            let gap = index.wrapping_sub(previous) as u32;
            previous = index;
            sequence.serialize_element(&(gap, count))?;
        }
        sequence.end()
    }
}

impl Serialize for BucketStore {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(2)?;
        tuple.serialize_element(&self.occupied().0)?;
        tuple.serialize_element(&SparseBuckets(self))?;
        tuple.end()
    }
}

impl BucketStore {
    /// Builds a store from its first non-empty index and `(gap, count)` pairs (first gap
    /// 0, later gaps at least 1, counts at least 1), checking the span before allocating.
    pub(crate) fn from_sparse(
        first_index: i32,
        buckets: &[(u32, u64)],
    ) -> Result<Self, SketchError> {
        if buckets.is_empty() {
            return Ok(BucketStore::default());
        }
        // Validate gaps and the span before allocating the dense vector.
        let mut index = first_index as i64;
        for (position, (gap, count)) in buckets.iter().enumerate() {
            if (position == 0) != (*gap == 0) {
                return Err(SketchError::InvalidGap {
                    position,
                    gap: *gap,
                });
            }
            if *count == 0 {
                return Err(SketchError::ZeroCount { position });
            }
            index += *gap as i64;
            if index > i32::MAX as i64 {
                return Err(SketchError::IndexOverflow { position });
            }
            let span = index - first_index as i64 + 1;
            if span > MAX_BUCKETS_PER_STORE as i64 {
                return Err(SketchError::TooManyBuckets {
                    span_buckets: span as u64,
                    max_buckets: MAX_BUCKETS_PER_STORE,
                });
            }
        }
        let span = (index - first_index as i64 + 1) as usize;
        let mut counts = vec![0u64; span];
        let mut position_in_store = 0usize;
        for (gap, count) in buckets {
            position_in_store += *gap as usize;
            if let Some(slot) = counts.get_mut(position_in_store) {
                *slot = *count;
            }
        }
        Ok(BucketStore {
            offset: first_index,
            counts,
        })
    }
}

/// The `(gap, count)` pairs of a store, refused as soon as the declared length (or the
/// element count) passes [`MAX_BUCKETS_PER_STORE`], so a hostile length allocates nothing.
struct BoundedPairs(Vec<(u32, u64)>);

impl<'de> Deserialize<'de> for BoundedPairs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor;

        impl<'de> serde::de::Visitor<'de> for PairsVisitor {
            type Value = BoundedPairs;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    formatter,
                    "at most {MAX_BUCKETS_PER_STORE} (gap, count) pairs"
                )
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut sequence: A,
            ) -> Result<BoundedPairs, A::Error> {
                let too_many = |declared: usize| {
                    A::Error::custom(SketchError::TooManyBuckets {
                        span_buckets: declared as u64,
                        max_buckets: MAX_BUCKETS_PER_STORE,
                    })
                };
                let declared = sequence.size_hint().unwrap_or(0);
                if declared > MAX_BUCKETS_PER_STORE {
                    return Err(too_many(declared));
                }
                let mut pairs = Vec::with_capacity(declared);
                while let Some(pair) = sequence.next_element::<(u32, u64)>()? {
                    if pairs.len() >= MAX_BUCKETS_PER_STORE {
                        return Err(too_many(pairs.len() + 1));
                    }
                    pairs.push(pair);
                }
                Ok(BoundedPairs(pairs))
            }
        }

        deserializer.deserialize_seq(PairsVisitor)
    }
}

impl<'de> Deserialize<'de> for BucketStore {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // The dense vector is only allocated after the span check in `from_sparse`.
        let (first_index, BoundedPairs(buckets)): (i32, BoundedPairs) =
            Deserialize::deserialize(deserializer)?;
        BucketStore::from_sparse(first_index, &buckets).map_err(D::Error::custom)
    }
}

/// A DDSketch at 1% relative accuracy with bounded memory (see the module docs).
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sketch {
    zero_count: u64,
    positive: BucketStore,
    negative: BucketStore,
}

/// By hand so that `clone_from` reuses the target's bucket vectors.
impl Clone for Sketch {
    fn clone(&self) -> Self {
        Self {
            zero_count: self.zero_count,
            positive: self.positive.clone(),
            negative: self.negative.clone(),
        }
    }

    fn clone_from(&mut self, source: &Self) {
        self.zero_count = source.zero_count;
        self.positive.clone_from(&source.positive);
        self.negative.clone_from(&source.negative);
    }
}

impl Sketch {
    /// An empty sketch.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sketch holding one value.
    pub fn from_value(value: f64) -> Self {
        let mut sketch = Self::new();
        sketch.add(value);
        sketch
    }

    /// Adds one value. Non-finite values are not representable and are ignored
    /// (returns false); callers reject them earlier, see [`crate::summary::check_value`].
    #[inline]
    pub fn add(&mut self, value: f64) -> bool {
        self.add_count(value, 1)
    }

    /// Adds `count` occurrences of `value`; returns false (and adds nothing) for a
    /// non-finite value.
    #[inline]
    pub fn add_count(&mut self, value: f64, count: u64) -> bool {
        if !value.is_finite() {
            return false;
        }
        let magnitude = value.abs();
        if magnitude < f64::MIN_POSITIVE {
            self.zero_count = self.zero_count.saturating_add(count);
        } else if value > 0.0 {
            self.positive.add(bucket_index(magnitude), count);
        } else {
            self.negative.add(bucket_index(magnitude), count);
        }
        true
    }

    /// Adds every count of `other` into `self`.
    pub fn merge(&mut self, other: &Sketch) {
        self.zero_count = self.zero_count.saturating_add(other.zero_count);
        self.positive.merge(&other.positive);
        self.negative.merge(&other.negative);
    }

    /// How many values the sketch holds.
    pub fn count(&self) -> u64 {
        self.zero_count
            .saturating_add(self.positive.total())
            .saturating_add(self.negative.total())
    }

    pub fn is_empty(&self) -> bool {
        self.zero_count == 0 && self.positive.is_empty() && self.negative.is_empty()
    }

    /// The value at quantile `q` in `[0, 1]`: an estimate of the element of rank
    /// `floor(q * (count - 1))` (0-based) in sorted order, within [`RELATIVE_ACCURACY`].
    /// `None` when the sketch is empty or `q` is outside `[0, 1]` (or NaN).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&q) {
            return None;
        }
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q * (total - 1) as f64).floor() as u64;
        // Most negative values first: the negative store from its highest magnitude down.
        let mut seen = 0u64;
        for (index, count) in self.negative.buckets().rev() {
            seen = seen.saturating_add(count);
            if seen > rank {
                return Some(-bucket_value(index));
            }
        }
        seen = seen.saturating_add(self.zero_count);
        if seen > rank {
            return Some(0.0);
        }
        for (index, count) in self.positive.buckets() {
            seen = seen.saturating_add(count);
            if seen > rank {
                return Some(bucket_value(index));
            }
        }
        // Only reachable if counts saturated: answer with the largest value.
        self.positive
            .buckets()
            .next_back()
            .map(|(index, _)| bucket_value(index))
            .or(if self.zero_count > 0 { Some(0.0) } else { None })
            .or_else(|| {
                self.negative
                    .buckets()
                    .next()
                    .map(|(index, _)| -bucket_value(index))
            })
    }

    /// Number of non-empty buckets, for size accounting and tests.
    pub fn bucket_count(&self) -> usize {
        self.positive.buckets().count() + self.negative.buckets().count()
    }

    /// Heap bytes of the bucket counts (the dense vectors' capacity, slack included).
    pub fn heap_bytes(&self) -> usize {
        (self.positive.counts.capacity() + self.negative.counts.capacity()) * 8
    }

    /// Non-empty buckets of the positive and negative stores as `(index, count)`, lowest
    /// index first: for tests and debugging.
    pub fn positive_buckets(&self) -> Vec<(i32, u64)> {
        self.positive.buckets().collect()
    }

    pub fn negative_buckets(&self) -> Vec<(i32, u64)> {
        self.negative.buckets().collect()
    }

    pub fn zero_count(&self) -> u64 {
        self.zero_count
    }

    /// The negative and positive stores, for the batch codec's compact summary form.
    pub(crate) fn stores(&self) -> (&BucketStore, &BucketStore) {
        (&self.negative, &self.positive)
    }

    /// A sketch from parts the batch codec decoded (each store already validated by
    /// [`BucketStore::from_sparse`]).
    pub(crate) fn from_parts(
        zero_count: u64,
        negative: BucketStore,
        positive: BucketStore,
    ) -> Self {
        Self {
            zero_count,
            positive,
            negative,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplier_keeps_the_accuracy_bound() {
        let gamma = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);
        let exact = 0.7 / gamma.ln();
        assert!(INDEX_MULTIPLIER >= exact && INDEX_MULTIPLIER - exact < 0.01);
    }

    #[test]
    fn approximate_log2_is_exact_at_powers_of_two_and_monotone() {
        for exponent in -1022..=1023 {
            assert_eq!(approximate_log2(power_of_two(exponent)), exponent as f64);
        }
        let mut previous = f64::NEG_INFINITY;
        let mut value = 1e-300;
        while value < 1e300 {
            let log = approximate_log2(value);
            assert!(log >= previous, "not monotone at {value}");
            previous = log;
            value *= 1.001;
        }
    }

    #[test]
    fn every_bucket_value_is_within_accuracy_of_its_bounds() {
        for index in (-35700..35800).step_by(7) {
            let (lower_exponent, lower) =
                inverse_approximate_log2((index as f64 - 1.0) / INDEX_MULTIPLIER);
            let (upper_exponent, upper) = inverse_approximate_log2(index as f64 / INDEX_MULTIPLIER);
            let lower = power_of_two(lower_exponent) * lower;
            let upper = power_of_two(upper_exponent) * upper;
            let value = bucket_value(index);
            for bound in [lower, upper] {
                let error = (value - bound).abs() / bound;
                assert!(
                    error <= RELATIVE_ACCURACY + 1e-12,
                    "bucket {index}: {error}"
                );
            }
        }
    }

    #[test]
    fn values_land_in_a_bucket_whose_value_is_close() {
        let mut value = f64::MIN_POSITIVE;
        while value < 1e307 {
            let estimate = bucket_value(bucket_index(value));
            let error = (estimate - value).abs() / value;
            assert!(
                error <= RELATIVE_ACCURACY + 1e-12,
                "{value}: {estimate} ({error})"
            );
            value *= 1.0173;
        }
        assert!(bucket_value(bucket_index(f64::MAX)).is_finite());
    }

    #[test]
    fn collapsing_bounds_memory_and_keeps_high_quantiles() {
        let mut sketch = Sketch::new();
        let mut value = 1e-300;
        while value < 1e300 {
            sketch.add(value);
            sketch.add(-value);
            value *= 1.01;
        }
        assert!(sketch.positive.counts.len() <= MAX_BUCKETS_PER_STORE);
        assert!(sketch.negative.counts.len() <= MAX_BUCKETS_PER_STORE);
        let top = sketch.quantile(1.0).unwrap();
        assert!((top - 1e300).abs() / 1e300 < 0.03, "{top}");
    }

    /// Merging many small sketches into one (what a window does) leaves slack in its
    /// stores; nothing observable may differ from a sketch fed every value directly.
    #[test]
    fn slack_left_by_merges_never_shows() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for spread in [1.001_f64, 1.05, 3.0, 1e6, 1e200] {
            let mut merged = Sketch::new();
            let mut direct = Sketch::new();
            for _ in 0..300 {
                let mut part = Sketch::new();
                for _ in 0..(next() % 12) {
                    let exponent = (next() % 2001) as f64 / 1000.0 - 1.0;
                    let sign = if next() % 5 == 0 { -1.0 } else { 1.0 };
                    let value = sign * 20.0 * spread.powf(exponent);
                    part.add(value);
                    direct.add(value);
                }
                merged.merge(&part);
                assert_eq!(merged, direct, "spread {spread}");
            }
            assert!(merged.positive.counts.len() <= MAX_BUCKETS_PER_STORE);
            assert_eq!(format!("{merged:?}"), format!("{direct:?}"));
            assert_eq!(
                postcard::to_allocvec(&merged).unwrap(),
                postcard::to_allocvec(&direct).unwrap()
            );
            assert_eq!(merged.count(), direct.count());
            for q in [0.0, 0.1, 0.5, 0.99, 1.0] {
                assert_eq!(merged.quantile(q), direct.quantile(q));
            }
        }
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let mut big = Sketch::new();
        big.add_count(1.0, u64::MAX - 1);
        let mut other = Sketch::new();
        other.add_count(1.0, 5);
        other.add_count(2.0, u64::MAX);
        big.merge(&Sketch::from_value(2.0));
        big.merge(&other);
        assert_eq!(big.positive_buckets().len(), 2);
        assert!(big
            .positive_buckets()
            .iter()
            .all(|(_, count)| *count == u64::MAX));
    }

    #[test]
    fn sparse_encoding_is_small_and_round_trips() {
        let mut sketch = Sketch::new();
        for value in [21.5, 21.5, 21.51, 21.6, 21.5, 0.0, -3.0] {
            sketch.add(value);
        }
        let bytes = postcard::to_allocvec(&sketch).unwrap();
        assert!(bytes.len() <= 16, "{} bytes", bytes.len());
        let decoded: Sketch = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, sketch);
    }

    #[test]
    fn decoding_rejects_wide_or_corrupt_stores() {
        let wide = (
            0u64,
            (0i32, vec![(0u32, 1u64), (5000, 1)]),
            (0i32, Vec::<(u32, u64)>::new()),
        );
        let bytes = postcard::to_allocvec(&wide).unwrap();
        assert!(postcard::from_bytes::<Sketch>(&bytes).is_err());
        let zero_gap = (
            0u64,
            (0i32, vec![(0u32, 1u64), (0, 1)]),
            (0i32, Vec::<(u32, u64)>::new()),
        );
        let bytes = postcard::to_allocvec(&zero_gap).unwrap();
        assert!(postcard::from_bytes::<Sketch>(&bytes).is_err());
        let zero_count = (
            0u64,
            (0i32, vec![(0u32, 0u64)]),
            (0i32, Vec::<(u32, u64)>::new()),
        );
        let bytes = postcard::to_allocvec(&zero_count).unwrap();
        assert!(postcard::from_bytes::<Sketch>(&bytes).is_err());
        // A declared pair count over the bound is refused from the length alone (postcard
        // hints the length when the input is long enough to hold it; otherwise the loop
        // stops after the bound).
        let mut many_pairs = vec![0u8, 0, 0x88, 0x27]; // zero count, first index, 5000 pairs
        many_pairs.extend(std::iter::repeat_n(1u8, 10_000));
        assert_eq!(
            postcard::from_bytes::<Sketch>(&many_pairs),
            Err(postcard::Error::SerdeDeCustom)
        );
        let overflow = (
            0u64,
            (i32::MAX, vec![(0u32, 1u64), (1, 1)]),
            (0i32, Vec::<(u32, u64)>::new()),
        );
        let bytes = postcard::to_allocvec(&overflow).unwrap();
        assert!(postcard::from_bytes::<Sketch>(&bytes).is_err());
    }
}
