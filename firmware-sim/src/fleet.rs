//! A simulated fleet: devices that each report ten metrics at 1 Hz.
//!
//! The fleet is the ground truth the codec benchmark, the device simulator and the
//! end-to-end tests share. It is deterministic (one seed, per-device RNG streams,
//! time passed in), so a test can regenerate exactly what was sent. Each device
//! runs a machine (a duty cycle that vibration, power and current follow), sits
//! in a room (temperature, humidity and CO2 drift with a daily cycle), and every so
//! often drops samples (a gap) or reboots (a longer gap on every metric, and its
//! energy counter restarts from zero).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tributary_protocol::{Reading, SeriesDef, SeriesId, SeriesKey};

use crate::signal::{
    adc_12_bit, quantize, standard_normal, DailyCycle, DriftingLevel, DutyCycle, EnergyCounter,
};

/// What each device measures, with the resolution a real sensor reports at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// degC, 0.01 resolution.
    Temperature,
    /// %RH, 0.1 resolution.
    Humidity,
    /// hPa, 0.1 resolution.
    Pressure,
    /// ppm, whole numbers.
    Co2,
    /// RMS vibration in 12-bit ADC counts.
    Vibration,
    /// W, whole numbers.
    Power,
    /// V, 0.1 resolution.
    Voltage,
    /// A, 0.01 resolution.
    Current,
    /// Monotonic Wh counter, reset by reboots.
    Energy,
    /// Radio signal strength in dBm, whole numbers.
    SignalStrength,
}

impl Metric {
    pub const ALL: [Metric; 10] = [
        Metric::Temperature,
        Metric::Humidity,
        Metric::Pressure,
        Metric::Co2,
        Metric::Vibration,
        Metric::Power,
        Metric::Voltage,
        Metric::Current,
        Metric::Energy,
        Metric::SignalStrength,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Temperature => "temperature",
            Metric::Humidity => "humidity",
            Metric::Pressure => "pressure",
            Metric::Co2 => "co2",
            Metric::Vibration => "vibration",
            Metric::Power => "power",
            Metric::Voltage => "voltage",
            Metric::Current => "current",
            Metric::Energy => "energy",
            Metric::SignalStrength => "signal_strength",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Temperature => "degC",
            Metric::Humidity => "%RH",
            Metric::Pressure => "hPa",
            Metric::Co2 => "ppm",
            Metric::Vibration => "adc_counts",
            Metric::Power => "W",
            Metric::Voltage => "V",
            Metric::Current => "A",
            Metric::Energy => "Wh",
            Metric::SignalStrength => "dBm",
        }
    }
}

/// Tunables of a fleet. The defaults describe a plausible factory floor.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    pub sample_interval_ms: i64,
    /// Per-sample timestamp jitter, uniform in `0..=timestamp_jitter_ms`. Zero
    /// models devices that stamp readings from a timer-driven RTC.
    pub timestamp_jitter_ms: i64,
    /// Chance per (device, metric, sample) that a dropout of 5..=120 samples starts.
    pub gap_probability: f64,
    /// Chance per (device, sample) that the device reboots (30..=90 samples of
    /// silence on every metric, energy counter reset).
    pub reboot_probability: f64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            sample_interval_ms: 1000,
            timestamp_jitter_ms: 0,
            gap_probability: 1.0 / 7200.0,
            reboot_probability: 1.0 / 43_200.0,
        }
    }
}

const SITES: [&str; 3] = ["plant-north", "plant-south", "warehouse"];

/// The series id the fleet assigns to a device's metric: `device * 10 + metric`.
pub fn series_id(device_index: usize, metric_index: usize) -> SeriesId {
    (device_index * Metric::ALL.len() + metric_index) as SeriesId
}

/// The key of a device's metric: device `dev-0042`, metric name, site and floor tags.
pub fn series_key(device_index: usize, metric: Metric) -> SeriesKey {
    SeriesKey::new(format!("dev-{device_index:04}"), metric.name()).with_tags([
        ("site", SITES[device_index % SITES.len()].to_string()),
        ("floor", (device_index / SITES.len() % 4).to_string()),
    ])
}

struct Device {
    rng: StdRng,
    phase_offset_ms: i64,
    /// Samples left of a reboot's silence.
    rebooting_samples: u32,
    /// Samples left of each metric's dropout.
    gap_samples: [u32; 10],
    room_temperature: DriftingLevel,
    daily_temperature: DailyCycle,
    humidity: DriftingLevel,
    pressure: DriftingLevel,
    co2: DriftingLevel,
    machine: DutyCycle,
    vibration_running_level: f64,
    vibration_level: f64,
    machine_power_w: f64,
    power_w: f64,
    voltage: DriftingLevel,
    energy: EnergyCounter,
    signal_strength: DriftingLevel,
}

impl Device {
    fn new(seed: u64, device_index: usize, sample_interval_ms: i64) -> Self {
        let mut rng =
            StdRng::seed_from_u64(seed ^ (device_index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let room_mean = rng.random_range(17.0..25.0);
        Self {
            phase_offset_ms: rng.random_range(0..sample_interval_ms.max(1)),
            rebooting_samples: 0,
            gap_samples: [0; 10],
            room_temperature: DriftingLevel::new(room_mean, 0.0005, 0.004),
            daily_temperature: DailyCycle {
                amplitude: rng.random_range(0.5..2.5),
                phase_ms: rng.random_range(0..DailyCycle::DAY_MS),
            },
            humidity: DriftingLevel::new(rng.random_range(35.0..60.0), 0.0005, 0.01),
            pressure: DriftingLevel::new(rng.random_range(1000.0..1025.0), 0.0001, 0.003),
            co2: DriftingLevel::new(rng.random_range(450.0..900.0), 0.001, 0.8),
            machine: DutyCycle {
                running: rng.random_bool(0.7),
                mean_running_steps: 1800.0,
                mean_idle_steps: 600.0,
            },
            vibration_running_level: rng.random_range(300.0..900.0),
            vibration_level: 20.0,
            machine_power_w: rng.random_range(400.0..2500.0),
            power_w: 15.0,
            voltage: DriftingLevel::new(rng.random_range(228.0..233.0), 0.002, 0.05),
            energy: EnergyCounter::default(),
            signal_strength: DriftingLevel::new(rng.random_range(-85.0..-55.0), 0.01, 0.3),
            rng,
        }
    }

    /// Advances one sample period ending at `time_ms` and appends what it reports.
    fn sample(
        &mut self,
        device_index: usize,
        time_ms: i64,
        config: &FleetConfig,
        out: &mut Vec<Reading>,
    ) {
        // The physical world moves on whether or not the device reports.
        let rng = &mut self.rng;
        let temperature = self.room_temperature.step(rng) + self.daily_temperature.at(time_ms);
        let humidity = self.humidity.step(rng) - 0.8 * self.daily_temperature.at(time_ms);
        let pressure = self.pressure.step(rng);
        let co2 = self.co2.step(rng);
        let running = self.machine.step(rng);
        // Vibration and power approach their new level over a few seconds.
        let vibration_target = if running {
            self.vibration_running_level
        } else {
            20.0
        };
        self.vibration_level += (vibration_target - self.vibration_level) * 0.3;
        let power_target = if running { self.machine_power_w } else { 15.0 };
        self.power_w += (power_target - self.power_w) * 0.2;
        let power_w = (self.power_w * (1.0 + 0.01 * standard_normal(rng))).max(0.0);
        let voltage = self.voltage.step(rng);
        self.energy.add_power(power_w, config.sample_interval_ms);
        let signal_strength = self.signal_strength.step(rng);

        if self.rebooting_samples > 0 {
            self.rebooting_samples -= 1;
            return;
        }
        if rng.random_bool(config.reboot_probability.clamp(0.0, 1.0)) {
            self.rebooting_samples = rng.random_range(30..=90);
            self.energy.reset();
            return;
        }

        let jitter_ms = if config.timestamp_jitter_ms > 0 {
            rng.random_range(0..=config.timestamp_jitter_ms)
        } else {
            0
        };
        let reading_time_ms = time_ms + self.phase_offset_ms + jitter_ms;
        let values = [
            quantize(temperature + 0.02 * standard_normal(rng), 2),
            quantize(
                (humidity + 0.05 * standard_normal(rng)).clamp(0.0, 100.0),
                1,
            ),
            quantize(pressure + 0.04 * standard_normal(rng), 1),
            quantize(co2 + 3.0 * standard_normal(rng), 0),
            adc_12_bit(
                self.vibration_level * (1.0 + 0.02 * standard_normal(rng))
                    + 3.0 * standard_normal(rng),
            ),
            quantize(power_w, 0),
            quantize(voltage + 0.1 * standard_normal(rng), 1),
            quantize(power_w / voltage.max(1.0), 2),
            self.energy.reading_wh(),
            quantize(signal_strength + 1.5 * standard_normal(rng), 0),
        ];
        for (metric_index, value) in values.into_iter().enumerate() {
            let gap = &mut self.gap_samples[metric_index];
            if *gap > 0 {
                *gap -= 1;
                continue;
            }
            if rng.random_bool(config.gap_probability.clamp(0.0, 1.0)) {
                *gap = rng.random_range(5..=120);
                continue;
            }
            out.push(Reading {
                series: series_id(device_index, metric_index),
                time_ms: reading_time_ms,
                value,
                flags: 0,
            });
        }
    }
}

/// A deterministic fleet of devices, each reporting [`Metric::ALL`].
pub struct Fleet {
    config: FleetConfig,
    devices: Vec<Device>,
}

impl Fleet {
    /// `devices` devices with the default [`FleetConfig`]; the same seed always
    /// yields the same readings.
    pub fn new(devices: usize, seed: u64) -> Self {
        Self::with_config(devices, seed, FleetConfig::default())
    }

    pub fn with_config(devices: usize, seed: u64, config: FleetConfig) -> Self {
        let devices = (0..devices)
            .map(|index| Device::new(seed, index, config.sample_interval_ms))
            .collect();
        Self { config, devices }
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// Every series the fleet can report, in id order.
    pub fn series(&self) -> Vec<SeriesDef> {
        (0..self.devices.len())
            .flat_map(|device_index| {
                Metric::ALL
                    .iter()
                    .enumerate()
                    .map(move |(metric_index, metric)| SeriesDef {
                        id: series_id(device_index, metric_index),
                        key: series_key(device_index, *metric),
                    })
            })
            .collect()
    }

    /// Advances every device by one sample period starting at `period_start_ms`
    /// and appends the readings they report (timestamps within the period, each
    /// device at its own phase). Call with consecutive periods.
    pub fn sample_period(&mut self, period_start_ms: i64, out: &mut Vec<Reading>) {
        for (device_index, device) in self.devices.iter_mut().enumerate() {
            device.sample(device_index, period_start_ms, &self.config, out);
        }
    }

    /// All readings for `periods` consecutive sample periods from `start_ms`.
    pub fn readings(&mut self, start_ms: i64, periods: usize) -> Vec<Reading> {
        let mut out = Vec::with_capacity(periods * self.devices.len() * Metric::ALL.len());
        for period in 0..periods {
            self.sample_period(
                start_ms + period as i64 * self.config.sample_interval_ms,
                &mut out,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_readings_and_different_seed_differs() {
        let first = Fleet::new(5, 42).readings(1_700_000_000_000, 300);
        let again = Fleet::new(5, 42).readings(1_700_000_000_000, 300);
        let other = Fleet::new(5, 43).readings(1_700_000_000_000, 300);
        assert_eq!(first, again);
        assert_ne!(first, other);
    }

    #[test]
    fn readings_are_quantised_monotonic_and_occasionally_missing() {
        let config = FleetConfig {
            gap_probability: 0.01,
            reboot_probability: 0.0,
            ..FleetConfig::default()
        };
        let readings = Fleet::with_config(10, 7, config).readings(0, 3600);
        let complete = 10 * 10 * 3600;
        assert!(
            readings.len() < complete && readings.len() > complete / 2,
            "{} readings",
            readings.len()
        );
        for reading in &readings {
            let metric = Metric::ALL[reading.series as usize % 10];
            let decimals = match metric {
                Metric::Temperature | Metric::Current => 2,
                Metric::Humidity | Metric::Pressure | Metric::Voltage => 1,
                _ => 0,
            };
            assert_eq!(
                quantize(reading.value, decimals).to_bits(),
                reading.value.to_bits(),
                "{metric:?} {}",
                reading.value
            );
            if metric == Metric::Vibration {
                assert!((0.0..=4095.0).contains(&reading.value));
            }
        }
        for device in 0..10 {
            let energy: Vec<f64> = readings
                .iter()
                .filter(|r| r.series == series_id(device, 8))
                .map(|r| r.value)
                .collect();
            assert!(
                energy.windows(2).all(|pair| pair[1] >= pair[0]),
                "energy of dev {device} decreased without a reboot"
            );
        }
    }

    #[test]
    fn reboots_reset_the_energy_counter() {
        let config = FleetConfig {
            reboot_probability: 1.0 / 600.0,
            gap_probability: 0.0,
            ..FleetConfig::default()
        };
        let readings = Fleet::with_config(20, 3, config).readings(0, 7200);
        let resets = (0..20)
            .map(|device| {
                let energy: Vec<f64> = readings
                    .iter()
                    .filter(|r| r.series == series_id(device, 8))
                    .map(|r| r.value)
                    .collect();
                energy.windows(2).filter(|pair| pair[1] < pair[0]).count()
            })
            .sum::<usize>();
        assert!(
            resets > 0,
            "no energy counter reset in 20 device-hours at a reboot every 10 minutes"
        );
    }

    #[test]
    fn keys_carry_device_metric_and_tags() {
        let series = Fleet::new(43, 1).series();
        assert_eq!(series.len(), 430);
        let def = &series[42 * 10];
        assert_eq!(def.id, 420);
        assert_eq!(def.key.device_id, "dev-0042");
        assert_eq!(def.key.metric, "temperature");
        assert!(def.key.tags.iter().any(|(name, _)| name == "site"));
        assert!(def.key.tags.iter().any(|(name, _)| name == "floor"));
    }
}
