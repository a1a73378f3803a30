//! The simulation core: turns the fleet's readings into what goes on the wire (MQTT messages,
//! serial lines, reconnects), applies the faults, and keeps the ledger in step with exactly what
//! was emitted.
//!
//! Sans-IO: the shell (`run`) asks for the tick schedule, calls [`Simulation::tick`] with each
//! tick's offset when its time comes, and carries out the returned [`Action`]s in order. The
//! ledger is updated when an action is created, so it reflects send order (reordered messages
//! enter it when they are finally released). All randomness comes from the seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thiserror::Error;
use tributary_protocol::Reading;

use crate::faults::FaultConfig;
use crate::fleet::{Fleet, FleetConfig, Metric};
use crate::format::{
    encode_messages, malformed_message, serial_garbage, serial_line, serial_line_with_bad_checksum,
    MessageFormat, MqttMessage,
};
use crate::ledger::{Ledger, LedgerError, SeriesName};

const SITES: [&str; 3] = ["plant-north", "plant-south", "warehouse"];

/// What a run simulates.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// MQTT devices (the serial device, if any, comes on top).
    pub devices: usize,
    pub format: MessageFormat,
    /// Readings per second per device and metric.
    pub rate_hz: f64,
    pub seed: u64,
    pub window_ms: i64,
    pub faults: FaultConfig,
    /// Also play one serial device.
    pub serial: bool,
}

#[derive(Debug, Error)]
pub enum SimError {
    #[error("rate must be between 0.001 and 1000 Hz, got {rate_hz}")]
    BadRate { rate_hz: f64 },
    #[error("at least one device is needed (--devices N or --serial)")]
    NoDevices,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// One thing the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Publish(MqttMessage),
    /// Bytes for the serial device's tty.
    SerialWrite(Vec<u8>),
    /// Drop the MQTT connection (after what was published is acknowledged) and connect again.
    Reconnect,
}

/// A message and the ledger entries it carries: `Some(time)` windowed, `None` receive-timed.
#[derive(Debug, Clone)]
struct Pending {
    message: MqttMessage,
    readings: Vec<(SeriesName, Option<i64>, f64)>,
}

pub struct Simulation {
    config: SimConfig,
    start_ms: i64,
    interval_ms: i64,
    fleet: Fleet,
    rng: StdRng,
    ledger: Ledger,
    tick_index: u64,
    held: Vec<(u64, Pending)>,
    next_disconnect_ms: Option<i64>,
    readings_buffer: Vec<Reading>,
    messages_emitted: u64,
    serial_lines_emitted: u64,
}

/// The site a device sits in (as in the fleet's series tags).
pub fn site_of(device_index: usize) -> &'static str {
    SITES[device_index % SITES.len()]
}

pub fn device_name(device_index: usize) -> String {
    format!("dev-{device_index:04}")
}

impl Simulation {
    /// `start_ms`: wall-clock time of tick offset 0 (the fleet's timestamps start there).
    pub fn new(config: SimConfig, start_ms: i64) -> Result<Self, SimError> {
        if !(0.001..=1000.0).contains(&config.rate_hz) {
            return Err(SimError::BadRate {
                rate_hz: config.rate_hz,
            });
        }
        if config.devices == 0 && !config.serial {
            return Err(SimError::NoDevices);
        }
        let interval_ms = ((1000.0 / config.rate_hz).round() as i64).max(1);
        let fleet_config = FleetConfig {
            sample_interval_ms: interval_ms,
            ..FleetConfig::default()
        };
        let fleet = Fleet::with_config(
            config.devices + usize::from(config.serial),
            config.seed,
            fleet_config,
        );
        Ok(Self {
            rng: StdRng::seed_from_u64(config.seed ^ 0x5eed_fa17),
            ledger: Ledger::new(config.window_ms)?,
            next_disconnect_ms: config
                .faults
                .disconnect_interval_ms
                .filter(|interval| *interval > 0),
            start_ms,
            interval_ms,
            fleet,
            tick_index: 0,
            held: Vec::new(),
            readings_buffer: Vec::new(),
            messages_emitted: 0,
            serial_lines_emitted: 0,
            config,
        })
    }

    pub fn interval_ms(&self) -> i64 {
        self.interval_ms
    }

    /// The run's schedule: tick offsets from the start, bounded by `duration_ms`.
    pub fn tick_offsets_ms(&self, duration_ms: i64) -> Vec<i64> {
        self.config
            .faults
            .tick_offsets_ms(duration_ms, self.interval_ms)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn messages_emitted(&self) -> u64 {
        self.messages_emitted
    }

    pub fn serial_lines_emitted(&self) -> u64 {
        self.serial_lines_emitted
    }

    /// The index of the serial device, if there is one.
    pub fn serial_device_index(&self) -> Option<usize> {
        self.config.serial.then_some(self.config.devices)
    }

    /// One tick at `offset_ms` after the start: every device samples and reports.
    pub fn tick(&mut self, offset_ms: i64) -> Vec<Action> {
        let mut actions = Vec::new();
        if let (Some(next_ms), Some(interval_ms)) = (
            self.next_disconnect_ms,
            self.config.faults.disconnect_interval_ms,
        ) {
            if offset_ms >= next_ms {
                actions.push(Action::Reconnect);
                self.next_disconnect_ms = Some(next_ms + interval_ms);
            }
        }
        let due: Vec<Pending> = {
            let tick_index = self.tick_index;
            let (due, kept): (Vec<_>, Vec<_>) = self
                .held
                .drain(..)
                .partition(|(release, _)| *release <= tick_index);
            self.held = kept;
            due.into_iter().map(|(_, pending)| pending).collect()
        };
        for pending in due {
            self.emit(pending, false, &mut actions);
        }

        let mut readings = std::mem::take(&mut self.readings_buffer);
        readings.clear();
        self.fleet
            .sample_period(self.start_ms + offset_ms, &mut readings);
        let metric_count = Metric::ALL.len();
        let mut start = 0;
        while start < readings.len() {
            let device_index = readings[start].series as usize / metric_count;
            let end = readings[start..]
                .iter()
                .position(|reading| reading.series as usize / metric_count != device_index)
                .map_or(readings.len(), |length| start + length);
            let time_ms = readings[start].time_ms;
            let values: Vec<(&'static str, f64)> = readings[start..end]
                .iter()
                .filter_map(|reading| {
                    Metric::ALL
                        .get(reading.series as usize % metric_count)
                        .map(|m| (m.name(), reading.value))
                })
                .collect();
            self.device_report(device_index, offset_ms, time_ms, &values, &mut actions);
            start = end;
        }
        self.readings_buffer = readings;
        self.tick_index += 1;
        actions
    }

    /// Releases every held-back message (call once after the last tick).
    pub fn finish(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let held = std::mem::take(&mut self.held);
        for (_, pending) in held {
            self.emit(pending, false, &mut actions);
        }
        actions
    }

    fn device_report(
        &mut self,
        device_index: usize,
        offset_ms: i64,
        time_ms: i64,
        values: &[(&'static str, f64)],
        actions: &mut Vec<Action>,
    ) {
        let faults = self.config.faults.clone();
        let unset_clock = faults.has_unset_clock(device_index);
        // A device whose clock was never set counts from boot: the run's start plus a second.
        let device_time_ms = if unset_clock {
            offset_ms + 1000
        } else {
            time_ms + faults.clock_skew_of(device_index)
        };
        let device = device_name(device_index);

        if self.serial_device_index() == Some(device_index) {
            if self
                .rng
                .random_bool(faults.serial_garbage_probability.clamp(0.0, 1.0))
            {
                let noise: Vec<u8> = (0..self.rng.random_range(1..40))
                    .map(|_| self.rng.random::<u8>())
                    .collect();
                actions.push(Action::SerialWrite(serial_garbage(&noise)));
                self.ledger.record_rejected("serial/garbage");
                actions.push(Action::SerialWrite(serial_line_with_bad_checksum(
                    &device,
                    device_time_ms,
                    values,
                )));
                self.ledger.record_rejected("serial/bad_checksum");
            }
            actions.push(Action::SerialWrite(serial_line(
                &device,
                Some(device_time_ms),
                values,
            )));
            self.serial_lines_emitted += 1;
            for (metric, value) in values {
                let series = SeriesName::new(device.clone(), *metric);
                if unset_clock {
                    self.ledger.record_receive_timed(&series, *value);
                } else {
                    self.ledger.record(&series, device_time_ms, *value, false);
                }
            }
            return;
        }

        let format = self.config.format;
        let site = site_of(device_index);
        let time_kept = format.carries_device_time() && !unset_clock;
        let messages = encode_messages(format, site, &device, device_time_ms, values);
        let per_message: Vec<Vec<(SeriesName, Option<i64>, f64)>> =
            if format == MessageFormat::Plain {
                values
                    .iter()
                    .map(|(metric, value)| {
                        vec![(SeriesName::new(device.clone(), *metric), None, *value)]
                    })
                    .collect()
            } else {
                vec![values
                    .iter()
                    .map(|(metric, value)| {
                        (
                            SeriesName::new(device.clone(), format.agent_metric_name(metric)),
                            time_kept.then_some(device_time_ms),
                            *value,
                        )
                    })
                    .collect()]
            };
        for (message, readings) in messages.into_iter().zip(per_message) {
            let pending = Pending { message, readings };
            if self
                .rng
                .random_bool(faults.reorder_probability.clamp(0.0, 1.0))
            {
                self.held
                    .push((self.tick_index + faults.reorder_delay_ticks.max(1), pending));
                continue;
            }
            let duplicate = self
                .rng
                .random_bool(faults.duplicate_probability.clamp(0.0, 1.0));
            if duplicate {
                self.emit(pending.clone(), false, actions);
                self.emit(pending, true, actions);
            } else {
                self.emit(pending, false, actions);
            }
        }
        if self
            .rng
            .random_bool(self.config.faults.malformed_probability.clamp(0.0, 1.0))
        {
            let metric = values.first().map_or("temperature", |(metric, _)| *metric);
            let (message, reason) = malformed_message(format, site, &device, metric);
            actions.push(Action::Publish(message));
            self.messages_emitted += 1;
            self.ledger.record_rejected(&format!("mqtt/{reason}"));
        }
    }

    fn emit(&mut self, pending: Pending, duplicate: bool, actions: &mut Vec<Action>) {
        for (series, time_ms, value) in &pending.readings {
            match time_ms {
                Some(time_ms) => self.ledger.record(series, *time_ms, *value, duplicate),
                None => self.ledger.record_receive_timed(series, *value),
            }
        }
        self.messages_emitted += 1;
        actions.push(Action::Publish(pending.message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(format: MessageFormat, faults: &str) -> SimConfig {
        SimConfig {
            devices: 14,
            format,
            rate_hz: 10.0,
            seed: 7,
            window_ms: 1000,
            faults: faults.parse().unwrap(),
            serial: true,
        }
    }

    fn run(config: SimConfig, duration_ms: i64) -> (Vec<Action>, Ledger) {
        let mut sim = Simulation::new(config, 1_764_284_000_000).unwrap();
        let mut actions = Vec::new();
        for offset in sim.tick_offsets_ms(duration_ms) {
            actions.extend(sim.tick(offset));
        }
        actions.extend(sim.finish());
        (actions, sim.ledger().clone())
    }

    fn windowed_readings_of(ledger: &Ledger, devices: &[&str]) -> u64 {
        ledger
            .windows()
            .iter()
            .filter(|w| devices.contains(&w.device.as_str()))
            .map(|w| w.count)
            .sum()
    }

    #[test]
    fn without_faults_every_reading_is_windowed_once() {
        let (actions, ledger) = run(config(MessageFormat::Json, ""), 3000);
        let fleet_config = FleetConfig {
            sample_interval_ms: 100,
            ..FleetConfig::default()
        };
        let readings = Fleet::with_config(15, 7, fleet_config).readings(1_764_284_000_000, 30);
        assert_eq!(ledger.windowed_reading_count(), readings.len() as u64);
        let device_reports: std::collections::BTreeSet<(u32, i64)> = readings
            .iter()
            .filter(|r| r.series < 140)
            .map(|r| (r.series / 10, r.time_ms))
            .collect();
        let publishes = actions
            .iter()
            .filter(|a| matches!(a, Action::Publish(_)))
            .count();
        assert_eq!(
            publishes,
            device_reports.len(),
            "one JSON message per device per tick"
        );
        let serial = actions
            .iter()
            .filter(|a| matches!(a, Action::SerialWrite(_)))
            .count();
        assert_eq!(serial, 30);
        assert!(ledger.rejected().is_empty() && ledger.receive_timed().is_empty());
    }

    #[test]
    fn duplicates_count_twice_and_reorder_keeps_the_totals() {
        let (clean_actions, clean) = run(config(MessageFormat::Senml, ""), 5000);
        let (actions, faulty) = run(config(MessageFormat::Senml, "duplicates,reorder"), 5000);
        let duplicate_copies: u64 = faulty.windows().iter().map(|w| w.duplicate_copies).sum();
        assert!(duplicate_copies > 0);
        assert_eq!(
            faulty.windowed_reading_count(),
            clean.windowed_reading_count() + duplicate_copies
        );
        let faulty_sum: f64 = faulty.windows().iter().map(|w| w.sum).sum();
        assert!(faulty_sum != clean.windows().iter().map(|w| w.sum).sum::<f64>());
        assert!(actions.len() > clean_actions.len());
        assert_ne!(actions, clean_actions, "reordering changes the send order");
    }

    #[test]
    fn unset_clocks_plain_and_malformed_stay_out_of_windows() {
        let (_, clean) = run(config(MessageFormat::Line, ""), 5000);
        let (actions, ledger) = run(
            config(
                MessageFormat::Line,
                "unset-clock,malformed,serial-garbage,disconnects",
            ),
            5000,
        );
        // Devices 6 and 13 have unset clocks (every 7th).
        let receive_timed: u64 = ledger.receive_timed().iter().map(|r| r.count).sum();
        assert_eq!(
            receive_timed,
            windowed_readings_of(&clean, &["dev-0006", "dev-0013"])
        );
        assert!(receive_timed > 0);
        assert_eq!(windowed_readings_of(&ledger, &["dev-0006", "dev-0013"]), 0);
        assert!(ledger
            .windows()
            .iter()
            .all(|w| w.metric.starts_with("fleet.") || w.device == "dev-0014"));
        let rejected = ledger.rejected();
        assert!(rejected.iter().any(|r| r.reason == "mqtt/not_a_number"));
        assert!(rejected.iter().any(|r| r.reason == "serial/bad_checksum"));
        assert_eq!(
            actions.iter().filter(|a| **a == Action::Reconnect).count(),
            2,
            "at 2 s and 4 s"
        );
        let (_, plain) = run(config(MessageFormat::Plain, ""), 1000);
        let (_, json) = run(config(MessageFormat::Json, ""), 1000);
        let mqtt_devices: Vec<String> = (0..14).map(device_name).collect();
        let mqtt_devices: Vec<&str> = mqtt_devices.iter().map(String::as_str).collect();
        assert_eq!(
            plain.receive_timed().iter().map(|r| r.count).sum::<u64>(),
            windowed_readings_of(&json, &mqtt_devices)
        );
        assert_eq!(
            windowed_readings_of(&plain, &mqtt_devices),
            0,
            "plain payloads carry no device time"
        );
    }
}
