//! The shipper's bookkeeping as plain state machines: which batches are in flight,
//! which wait for a retry and until when, when to reconnect, and how fast the
//! backlog may drain. Time and randomness come in as arguments, so every decision is
//! unit-tested without a network or a clock (the QUIC shell in `shipper.rs` only
//! feeds events in and carries decisions out).

use std::collections::BTreeMap;

/// Exponential backoff with "equal jitter": the delay for attempt `n` is half of
/// `min(max, min * 2^n)` plus a random part of up to the other half. The fixed half
/// keeps a flapping link from being hammered; the random half spreads a fleet that
/// lost the collector at the same moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min_ms: u64,
    pub max_ms: u64,
}

impl Backoff {
    /// `attempt` counts failures so far (0 for the first retry); `jitter` is uniform in `[0, 1)`.
    pub fn delay_ms(&self, attempt: u32, jitter: f64) -> u64 {
        let ceiling = self
            .min_ms
            .max(1)
            .saturating_mul(1u64 << attempt.min(32))
            .min(self.max_ms.max(self.min_ms));
        let half = ceiling / 2;
        half + (jitter.clamp(0.0, 1.0) * (ceiling - half) as f64) as u64
    }
}

/// When to try connecting again.
#[derive(Debug, Clone)]
pub struct ReconnectSchedule {
    backoff: Backoff,
    failures: u32,
    next_attempt_ms: i64,
}

impl ReconnectSchedule {
    pub fn new(backoff: Backoff) -> Self {
        ReconnectSchedule {
            backoff,
            failures: 0,
            next_attempt_ms: i64::MIN,
        }
    }

    /// Whether a connection attempt may start at `now_ms`.
    pub fn may_connect(&self, now_ms: i64) -> bool {
        now_ms >= self.next_attempt_ms
    }

    pub fn next_attempt_ms(&self) -> i64 {
        self.next_attempt_ms
    }

    /// A connection attempt failed, or a session ended. `at_least_ms` is a delay the
    /// collector asked for (a retryable reject's `retry_after_ms`). Returns the delay.
    pub fn on_failure(&mut self, now_ms: i64, jitter: f64, at_least_ms: u64) -> u64 {
        let delay_ms = self
            .backoff
            .delay_ms(self.failures, jitter)
            .max(at_least_ms);
        self.failures = self.failures.saturating_add(1);
        self.next_attempt_ms = now_ms.saturating_add(delay_ms as i64);
        delay_ms
    }

    /// A session was established: the next failure starts from the minimum again.
    pub fn on_connected(&mut self) {
        self.failures = 0;
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }
}

/// What to do after a nack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackAction {
    /// Send again at `due_ms`; `full_definitions` when the collector lacked series
    /// definitions.
    Retry { due_ms: i64 },
    /// Retrying cannot help: count it and drop the batch from the buffer.
    DeadLetter,
}

/// How the next send of a batch must look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendPlan {
    /// Attach every series definition, not only those the session has not confirmed.
    pub full_definitions: bool,
    /// Earlier attempts of this batch in this session.
    pub attempt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attempts {
    attempts: u32,
    full_definitions: bool,
}

/// In-flight and retrying batches of one session.
#[derive(Debug, Clone)]
pub struct InFlightBook {
    max_in_flight: usize,
    retry: Backoff,
    in_flight: BTreeMap<u64, Attempts>,
    waiting: BTreeMap<u64, (i64, Attempts)>,
}

impl InFlightBook {
    pub fn new(max_in_flight: usize, retry: Backoff) -> Self {
        InFlightBook {
            max_in_flight: max_in_flight.max(1),
            retry,
            in_flight: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// Lowers (or raises) the in-flight cap, e.g. to the collector's announced limit.
    pub fn set_max_in_flight(&mut self, max_in_flight: usize) {
        self.max_in_flight = max_in_flight.max(1);
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_free_slot(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }

    /// Whether the batch is in flight or waiting for a retry (so not to be picked up
    /// again by a replay cursor).
    pub fn is_tracked(&self, batch_seq: u64) -> bool {
        self.in_flight.contains_key(&batch_seq) || self.waiting.contains_key(&batch_seq)
    }

    /// The waiting batch whose retry is due first, if due at `now_ms`.
    pub fn next_due(&self, now_ms: i64) -> Option<u64> {
        self.waiting
            .iter()
            .filter(|(_, (due_ms, _))| *due_ms <= now_ms)
            .min_by_key(|(seq, (due_ms, _))| (*due_ms, **seq))
            .map(|(seq, _)| *seq)
    }

    /// When the earliest waiting retry is due.
    pub fn next_due_ms(&self) -> Option<i64> {
        self.waiting.values().map(|(due_ms, _)| *due_ms).min()
    }

    /// Marks a batch as sent; returns how to send it.
    pub fn start(&mut self, batch_seq: u64) -> SendPlan {
        let attempts = self
            .waiting
            .remove(&batch_seq)
            .map(|(_, attempts)| attempts)
            .unwrap_or(Attempts {
                attempts: 0,
                full_definitions: false,
            });
        self.in_flight.insert(batch_seq, attempts);
        SendPlan {
            full_definitions: attempts.full_definitions,
            attempt: attempts.attempts,
        }
    }

    /// The batch was acked; returns whether it was in flight.
    pub fn on_ack(&mut self, batch_seq: u64) -> bool {
        self.waiting.remove(&batch_seq);
        self.in_flight.remove(&batch_seq).is_some()
    }

    /// The batch was nacked. `unknown_series` asks for a resend with every definition.
    pub fn on_nack(
        &mut self,
        batch_seq: u64,
        retryable: bool,
        unknown_series: bool,
        now_ms: i64,
        jitter: f64,
    ) -> NackAction {
        let previous = self.in_flight.remove(&batch_seq).unwrap_or(Attempts {
            attempts: 0,
            full_definitions: false,
        });
        if !retryable {
            self.waiting.remove(&batch_seq);
            return NackAction::DeadLetter;
        }
        // A missing definition is fixed by the very next send: no need to wait long.
        let delay_ms = if unknown_series && !previous.full_definitions {
            0
        } else {
            self.retry.delay_ms(previous.attempts, jitter)
        };
        let due_ms = now_ms.saturating_add(delay_ms as i64);
        let attempts = Attempts {
            attempts: previous.attempts.saturating_add(1),
            full_definitions: previous.full_definitions || unknown_series,
        };
        self.waiting.insert(batch_seq, (due_ms, attempts));
        NackAction::Retry { due_ms }
    }

    /// The stream failed without an answer (timeout, stream reset): retry with backoff.
    pub fn on_failed(&mut self, batch_seq: u64, now_ms: i64, jitter: f64) -> i64 {
        match self.on_nack(batch_seq, true, false, now_ms, jitter) {
            NackAction::Retry { due_ms } => due_ms,
            NackAction::DeadLetter => now_ms,
        }
    }

    /// The batch no longer exists in the buffer (dropped by the overflow policy).
    pub fn forget(&mut self, batch_seq: u64) {
        self.in_flight.remove(&batch_seq);
        self.waiting.remove(&batch_seq);
    }

    /// The session ended: nothing is in flight any more, nothing waits (the next
    /// session finds every unacked batch again through the buffer).
    pub fn reset(&mut self) {
        self.in_flight.clear();
        self.waiting.clear();
    }
}

/// A byte-rate cap for the backlog drain (live data is never capped).
#[derive(Debug, Clone)]
pub struct DrainRate {
    bytes_per_second: Option<u64>,
    /// Bytes allowed now; negative after a large batch (debt).
    allowance: f64,
    last_ms: Option<i64>,
}

impl DrainRate {
    pub fn new(bytes_per_second: Option<u64>) -> Self {
        DrainRate {
            bytes_per_second: bytes_per_second.filter(|rate| *rate > 0),
            allowance: 0.0,
            last_ms: None,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        let Some(rate) = self.bytes_per_second else {
            return;
        };
        let rate = rate as f64;
        match self.last_ms {
            None => self.allowance = rate,
            Some(last_ms) => {
                let elapsed_ms = now_ms.saturating_sub(last_ms).max(0) as f64;
                self.allowance = (self.allowance + elapsed_ms * rate / 1000.0).min(rate);
            }
        }
        self.last_ms = Some(now_ms.max(self.last_ms.unwrap_or(now_ms)));
    }

    /// `None` if a backlog batch may go now, or when (ms) it may.
    pub fn blocked_until(&mut self, now_ms: i64) -> Option<i64> {
        let rate = self.bytes_per_second? as f64;
        self.refill(now_ms);
        if self.allowance > 0.0 {
            None
        } else {
            Some(now_ms + ((-self.allowance + 1.0) * 1000.0 / rate).ceil() as i64)
        }
    }

    /// Records a backlog batch of `bytes` sent at `now_ms`.
    pub fn spend(&mut self, bytes: u64, now_ms: i64) {
        if self.bytes_per_second.is_some() {
            self.refill(now_ms);
            self.allowance -= bytes as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff {
        min_ms: 100,
        max_ms: 10_000,
    };

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter_and_a_ceiling() {
        assert_eq!(BACKOFF.delay_ms(0, 0.0), 50);
        assert_eq!(BACKOFF.delay_ms(0, 0.999), 99);
        assert_eq!(BACKOFF.delay_ms(3, 0.0), 400);
        assert_eq!(BACKOFF.delay_ms(30, 0.0), 5_000);
        assert!(BACKOFF.delay_ms(30, 0.999) <= 10_000);
        assert_eq!(BACKOFF.delay_ms(u32::MAX, 1.0), 10_000);
    }

    #[test]
    fn reconnects_back_off_until_a_session_is_established() {
        let mut schedule = ReconnectSchedule::new(BACKOFF);
        assert!(schedule.may_connect(0));
        let first = schedule.on_failure(0, 0.0, 0);
        let second = schedule.on_failure(first as i64, 0.0, 0);
        assert!(second > first);
        assert!(!schedule.may_connect(first as i64));
        assert!(schedule.may_connect((first + second) as i64));
        assert_eq!(
            schedule.on_failure(0, 0.0, 7_000),
            7_000,
            "a collector's retry_after is respected"
        );
        schedule.on_connected();
        assert_eq!(schedule.on_failure(0, 0.0, 0), 50);
    }

    #[test]
    fn slots_acks_and_retries() {
        let mut book = InFlightBook::new(2, BACKOFF);
        assert_eq!(
            book.start(7),
            SendPlan {
                full_definitions: false,
                attempt: 0
            }
        );
        book.start(8);
        assert!(!book.has_free_slot());
        assert!(book.on_ack(7));
        assert!(
            !book.on_ack(7),
            "a second ack of the same batch is not counted twice"
        );
        assert!(book.has_free_slot());
        assert_eq!(
            book.on_nack(8, true, false, 1_000, 0.0),
            NackAction::Retry { due_ms: 1_050 }
        );
        assert!(book.is_tracked(8));
        assert_eq!(book.next_due(1_049), None);
        assert_eq!(book.next_due(1_050), Some(8));
        assert_eq!(book.start(8).attempt, 1);
        assert_eq!(
            book.on_nack(8, true, false, 2_000, 0.0),
            NackAction::Retry { due_ms: 2_100 }
        );
    }

    #[test]
    fn unknown_series_resends_at_once_with_every_definition() {
        let mut book = InFlightBook::new(4, BACKOFF);
        book.start(3);
        assert_eq!(
            book.on_nack(3, true, true, 500, 0.9),
            NackAction::Retry { due_ms: 500 }
        );
        assert_eq!(
            book.start(3),
            SendPlan {
                full_definitions: true,
                attempt: 1
            }
        );
        // Still unknown with every definition attached: back off like any retry.
        assert_eq!(
            book.on_nack(3, true, true, 600, 0.0),
            NackAction::Retry { due_ms: 700 }
        );
    }

    #[test]
    fn non_retryable_nacks_dead_letter_and_reset_forgets_everything() {
        let mut book = InFlightBook::new(4, BACKOFF);
        book.start(1);
        book.start(2);
        assert_eq!(
            book.on_nack(1, false, false, 0, 0.0),
            NackAction::DeadLetter
        );
        assert!(!book.is_tracked(1));
        book.on_failed(2, 0, 0.0);
        assert_eq!(book.waiting(), 1);
        book.reset();
        assert_eq!((book.in_flight(), book.waiting()), (0, 0));
    }

    #[test]
    fn the_drain_rate_caps_backlog_bytes_per_second() {
        let mut rate = DrainRate::new(Some(1_000));
        assert_eq!(rate.blocked_until(0), None);
        rate.spend(1_500, 0);
        let until = rate.blocked_until(0).unwrap();
        assert!((500..=502).contains(&until), "{until}");
        assert_eq!(rate.blocked_until(until), None);
        let mut unlimited = DrainRate::new(None);
        unlimited.spend(u64::MAX, 0);
        assert_eq!(unlimited.blocked_until(0), None);
    }
}
