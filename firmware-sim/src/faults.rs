//! Fault injection settings: each fault is switched on by name and has fixed, documented
//! parameters, so a fault scenario is one command-line word and reproducible from its seed.

use std::str::FromStr;

use thiserror::Error;

/// Which faults are on, and their parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Chance per message that it is sent twice in a row.
    pub duplicate_probability: f64,
    /// Chance per message that it is held back and sent after the next `reorder_delay_ticks`
    /// ticks' messages (out-of-order delivery).
    pub reorder_probability: f64,
    pub reorder_delay_ticks: u64,
    /// Every `clock_skew_every`-th device (1-based device index multiple) runs its clock off by
    /// `clock_skew_ms` (alternating ahead and behind); within the agent's 5-minute future bound.
    pub clock_skew_every: Option<usize>,
    pub clock_skew_ms: i64,
    /// Every `unset_clock_every`-th device reports milliseconds since boot (times near 1970).
    pub unset_clock_every: Option<usize>,
    /// Chance per device and tick that one malformed message is sent as well.
    pub malformed_probability: f64,
    /// Chance per serial line that a noise line and a bad-checksum line are written before it.
    pub serial_garbage_probability: f64,
    /// Ticks come `burst_factor` times as often from `burst_start_fraction` of the run for
    /// `burst_duration_fraction` of it.
    pub burst: bool,
    pub burst_factor: u32,
    pub burst_start_fraction: f64,
    pub burst_duration_fraction: f64,
    /// Drop and reconnect the MQTT client this often.
    pub disconnect_interval_ms: Option<i64>,
}

impl Default for FaultConfig {
    /// No faults.
    fn default() -> Self {
        Self {
            duplicate_probability: 0.0,
            reorder_probability: 0.0,
            reorder_delay_ticks: 3,
            clock_skew_every: None,
            clock_skew_ms: 90_000,
            unset_clock_every: None,
            malformed_probability: 0.0,
            serial_garbage_probability: 0.0,
            burst: false,
            burst_factor: 10,
            burst_start_fraction: 1.0 / 3.0,
            burst_duration_fraction: 0.2,
            disconnect_interval_ms: None,
        }
    }
}

/// The fault names accepted by `--faults`.
pub const FAULT_NAMES: [&str; 8] = [
    "duplicates",
    "reorder",
    "clock-skew",
    "unset-clock",
    "malformed",
    "serial-garbage",
    "burst",
    "disconnects",
];

#[derive(Debug, Error, PartialEq)]
pub enum FaultError {
    #[error("unknown fault `{name}`; known faults: {}", FAULT_NAMES.join(", "))]
    UnknownFault { name: String },
}

impl FromStr for FaultConfig {
    type Err = FaultError;

    /// A comma-separated list of [`FAULT_NAMES`], or `all`, or empty for none.
    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut config = FaultConfig::default();
        for name in list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            let names: Vec<&str> = if name == "all" {
                FAULT_NAMES.to_vec()
            } else {
                vec![name]
            };
            for name in names {
                match name {
                    "duplicates" => config.duplicate_probability = 0.03,
                    "reorder" => config.reorder_probability = 0.05,
                    "clock-skew" => config.clock_skew_every = Some(5),
                    "unset-clock" => config.unset_clock_every = Some(7),
                    "malformed" => config.malformed_probability = 0.03,
                    "serial-garbage" => config.serial_garbage_probability = 0.1,
                    "burst" => config.burst = true,
                    "disconnects" => config.disconnect_interval_ms = Some(2000),
                    other => {
                        return Err(FaultError::UnknownFault {
                            name: other.to_owned(),
                        })
                    }
                }
            }
        }
        Ok(config)
    }
}

impl FaultConfig {
    /// The device's clock offset in ms (0 unless the clock-skew fault picks it).
    pub fn clock_skew_of(&self, device_index: usize) -> i64 {
        match self.clock_skew_every {
            Some(every) if every > 0 && (device_index + 1) % every == 0 => {
                if (device_index + 1) / every % 2 == 0 {
                    -self.clock_skew_ms
                } else {
                    self.clock_skew_ms
                }
            }
            _ => 0,
        }
    }

    /// Whether the device's clock was never set.
    pub fn has_unset_clock(&self, device_index: usize) -> bool {
        matches!(self.unset_clock_every, Some(every) if every > 0 && (device_index + 1) % every == 0)
    }

    /// Offsets (ms from the start) of every tick of a run of `duration_ms` at `interval_ms`,
    /// with the burst applied: the run's schedule, bounded by its duration.
    pub fn tick_offsets_ms(&self, duration_ms: i64, interval_ms: i64) -> Vec<i64> {
        let interval_ms = interval_ms.max(1);
        let factor = i64::from(self.burst_factor.max(1));
        let burst_start_ms = (duration_ms as f64 * self.burst_start_fraction) as i64;
        let burst_end_ms =
            burst_start_ms + (duration_ms as f64 * self.burst_duration_fraction) as i64;
        let mut offsets = Vec::new();
        let mut offset_ms = 0;
        while offset_ms < duration_ms {
            offsets.push(offset_ms);
            let in_burst = self.burst && offset_ms >= burst_start_ms && offset_ms < burst_end_ms;
            offset_ms += if in_burst {
                (interval_ms / factor).max(1)
            } else {
                interval_ms
            };
        }
        offsets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_switch_faults_on_and_unknown_names_are_rejected() {
        let none: FaultConfig = "".parse().unwrap();
        assert_eq!(none, FaultConfig::default());
        let some: FaultConfig = "duplicates, burst".parse().unwrap();
        assert!(
            some.duplicate_probability > 0.0 && some.burst && some.disconnect_interval_ms.is_none()
        );
        let all: FaultConfig = "all".parse().unwrap();
        assert!(all.disconnect_interval_ms.is_some() && all.unset_clock_every.is_some());
        assert!(matches!(
            "dupes".parse::<FaultConfig>(),
            Err(FaultError::UnknownFault { .. })
        ));
    }

    #[test]
    fn burst_packs_ten_times_the_ticks_into_its_window() {
        let calm = FaultConfig::default().tick_offsets_ms(10_000, 100);
        assert_eq!(calm.len(), 100);
        let bursty: FaultConfig = "burst".parse().unwrap();
        let offsets = bursty.tick_offsets_ms(10_000, 100);
        // 20 % of the run at 10x: 80 normal ticks + 200 burst ticks, give or take the edges.
        assert!(
            (275..=285).contains(&offsets.len()),
            "{} ticks",
            offsets.len()
        );
        assert!(offsets.windows(2).all(|pair| pair[1] > pair[0]));
        assert!(offsets.iter().all(|offset| *offset < 10_000));
    }

    #[test]
    fn skew_and_unset_clock_pick_distinct_devices() {
        let config: FaultConfig = "clock-skew,unset-clock".parse().unwrap();
        assert_eq!(config.clock_skew_of(4), 90_000);
        assert_eq!(config.clock_skew_of(9), -90_000);
        assert_eq!(config.clock_skew_of(0), 0);
        assert!(config.has_unset_clock(6) && !config.has_unset_clock(5));
    }
}
