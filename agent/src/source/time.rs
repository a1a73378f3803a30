//! Event times that cannot be right are replaced by the receive time, and flagged.
//!
//! Sensors without a battery-backed clock report 1970 (or 2000) after a reboot until they get
//! NTP; others drift or jump far ahead. Storing those times would put readings in windows that
//! are long closed or not yet open. Instead the agent uses its own receive time and sets
//! [`FLAG_TIME_SUBSTITUTED`] so the substitution stays visible downstream. Times in the past but
//! after the validity floor are kept: a device that was offline legitimately backfills.

use serde::{Deserialize, Serialize};
use tributary_protocol::model::FLAG_TIME_SUBSTITUTED;

/// 2000-01-01T00:00:00Z in ms: earlier device times mean the device's clock was never set.
pub const DEFAULT_MIN_VALID_MS: i64 = 946_684_800_000;
/// How far ahead of the agent's clock a device time may be before it is treated as wrong.
pub const DEFAULT_MAX_FUTURE_MS: i64 = 300_000;

/// Returns the time to use for a reading and its flags: `event_ms` itself when plausible, else
/// `receive_ms` with [`FLAG_TIME_SUBSTITUTED`]. Plausible means `min_valid_ms <= event_ms <=
/// receive_ms + max_future_ms`.
pub fn plausible_time(
    event_ms: i64,
    receive_ms: i64,
    max_future_ms: i64,
    min_valid_ms: i64,
) -> (i64, u8) {
    let latest_ms = receive_ms.saturating_add(max_future_ms.max(0));
    if event_ms < min_valid_ms || event_ms > latest_ms {
        (receive_ms, FLAG_TIME_SUBSTITUTED)
    } else {
        (event_ms, 0)
    }
}

/// The bounds of [`plausible_time`] as configured per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimePolicy {
    pub max_future_ms: i64,
    pub min_valid_ms: i64,
}

impl Default for TimePolicy {
    fn default() -> Self {
        Self {
            max_future_ms: DEFAULT_MAX_FUTURE_MS,
            min_valid_ms: DEFAULT_MIN_VALID_MS,
        }
    }
}

impl TimePolicy {
    /// The time and flags for a reading: the receive time (unflagged) when the device sent no
    /// time, otherwise [`plausible_time`].
    pub fn resolve(&self, event_ms: Option<i64>, receive_ms: i64) -> (i64, u8) {
        match event_ms {
            None => (receive_ms, 0),
            Some(event_ms) => {
                plausible_time(event_ms, receive_ms, self.max_future_ms, self.min_valid_ms)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_764_284_000_123;

    #[test]
    fn keeps_plausible_and_substitutes_the_rest() {
        let policy = TimePolicy::default();
        assert_eq!(
            policy.resolve(Some(NOW_MS - 3_600_000), NOW_MS),
            (NOW_MS - 3_600_000, 0)
        );
        assert_eq!(
            policy.resolve(Some(NOW_MS + 1_000), NOW_MS),
            (NOW_MS + 1_000, 0)
        );
        assert_eq!(
            policy.resolve(Some(12_345), NOW_MS),
            (NOW_MS, FLAG_TIME_SUBSTITUTED)
        );
        assert_eq!(
            policy.resolve(Some(NOW_MS + 86_400_000), NOW_MS),
            (NOW_MS, FLAG_TIME_SUBSTITUTED)
        );
        assert_eq!(policy.resolve(None, NOW_MS), (NOW_MS, 0));
        assert_eq!(
            plausible_time(i64::MAX, i64::MAX, i64::MAX, 0),
            (i64::MAX, 0)
        );
        assert_eq!(
            plausible_time(i64::MIN, 0, 0, DEFAULT_MIN_VALID_MS),
            (0, FLAG_TIME_SUBSTITUTED)
        );
    }
}
