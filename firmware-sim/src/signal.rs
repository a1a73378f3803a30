//! Building blocks of realistic sensor signals.
//!
//! Real telemetry is not white noise: it drifts slowly, carries a little
//! measurement noise, is quantised to the resolution the sensor reports (0.01 degC,
//! 0.1 hPa, whole ADC counts), counts monotonically, and steps when the machine it
//! watches changes state. The codec and the aggregator are measured on this data,
//! so its statistics matter more than its physics. Every generator is a plain
//! state machine advanced one sample at a time with an injected RNG: the same seed
//! gives the same signal, with no clock anywhere.

use rand::Rng;

/// A standard normal sample (Box-Muller), to avoid a dependency for one function.
pub fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    // `random::<f64>()` is in [0, 1); shift to (0, 1] so the logarithm is finite.
    let uniform_a: f64 = 1.0 - rng.random::<f64>();
    let uniform_b: f64 = rng.random::<f64>();
    (-2.0 * uniform_a.ln()).sqrt() * (std::f64::consts::TAU * uniform_b).cos()
}

/// Rounds to `decimals` decimal places the way a sensor's text output reads back:
/// the nearest f64 to the decimal number, so `21.53` and not `21.529999999999998`.
/// Negative zero becomes zero: sensors print `0.00`, not `-0.00`.
pub fn quantize(value: f64, decimals: u8) -> f64 {
    let power = 10f64.powi(i32::from(decimals));
    (value * power).round() / power + 0.0
}

/// A level that wanders and is pulled back towards its mean (an Ornstein-Uhlenbeck
/// process sampled at a fixed step): room temperature, barometric pressure, CO2.
#[derive(Debug, Clone)]
pub struct DriftingLevel {
    pub level: f64,
    pub mean: f64,
    /// Fraction of the distance to the mean recovered per step.
    pub reversion_per_step: f64,
    /// Standard deviation of the random change per step.
    pub step_sd: f64,
}

impl DriftingLevel {
    pub fn new(mean: f64, reversion_per_step: f64, step_sd: f64) -> Self {
        Self {
            level: mean,
            mean,
            reversion_per_step,
            step_sd,
        }
    }

    pub fn step<R: Rng + ?Sized>(&mut self, rng: &mut R) -> f64 {
        self.level += (self.mean - self.level) * self.reversion_per_step
            + self.step_sd * standard_normal(rng);
        self.level
    }
}

/// A daily cycle: `amplitude * sin(2 pi (t - phase) / 1 day)`.
#[derive(Debug, Clone, Copy)]
pub struct DailyCycle {
    pub amplitude: f64,
    pub phase_ms: i64,
}

impl DailyCycle {
    pub const DAY_MS: i64 = 86_400_000;

    pub fn at(&self, time_ms: i64) -> f64 {
        let fraction =
            (time_ms - self.phase_ms).rem_euclid(Self::DAY_MS) as f64 / Self::DAY_MS as f64;
        self.amplitude * (std::f64::consts::TAU * fraction).sin()
    }
}

/// A machine that runs and idles: a two-state Markov chain with mean dwell times.
/// Vibration and power follow it, so they step together as on a real line.
#[derive(Debug, Clone)]
pub struct DutyCycle {
    pub running: bool,
    pub mean_running_steps: f64,
    pub mean_idle_steps: f64,
}

impl DutyCycle {
    /// Advances one step; returns whether the machine runs now.
    pub fn step<R: Rng + ?Sized>(&mut self, rng: &mut R) -> bool {
        let mean_dwell = if self.running {
            self.mean_running_steps
        } else {
            self.mean_idle_steps
        };
        if rng.random::<f64>() < 1.0 / mean_dwell.max(1.0) {
            self.running = !self.running;
        }
        self.running
    }
}

/// A 12-bit ADC: clamps to 0..=4095 and reports whole counts.
pub fn adc_12_bit(value: f64) -> f64 {
    value.round().clamp(0.0, 4095.0)
}

/// A monotonic energy counter in whole Wh that integrates power and restarts
/// from zero when the device reboots (as cheap meters without NVRAM do).
#[derive(Debug, Clone, Default)]
pub struct EnergyCounter {
    accumulated_wh: f64,
}

impl EnergyCounter {
    pub fn add_power(&mut self, power_w: f64, step_ms: i64) {
        self.accumulated_wh += power_w.max(0.0) * step_ms as f64 / 3_600_000.0;
    }

    pub fn reset(&mut self) {
        self.accumulated_wh = 0.0;
    }

    pub fn reading_wh(&self) -> f64 {
        self.accumulated_wh.floor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn quantize_gives_the_decimal_a_parser_would() {
        assert_eq!(quantize(21.534_9, 2), 21.53);
        assert_eq!(quantize(1013.249, 1), 1013.2);
        assert_eq!(quantize(-0.004, 2).to_bits(), 0.0f64.to_bits());
    }

    #[test]
    fn drifting_level_stays_near_its_mean() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut level = DriftingLevel::new(20.0, 0.01, 0.05);
        let samples: Vec<f64> = (0..10_000).map(|_| level.step(&mut rng)).collect();
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!((mean - 20.0).abs() < 0.5, "mean {mean}");
        assert!(samples.iter().all(|value| (value - 20.0).abs() < 5.0));
    }

    #[test]
    fn energy_counter_is_monotonic_until_reset() {
        let mut counter = EnergyCounter::default();
        let mut previous = 0.0;
        for _ in 0..7200 {
            counter.add_power(1500.0, 1000);
            assert!(counter.reading_wh() >= previous);
            previous = counter.reading_wh();
        }
        assert!(
            (2999.0..=3000.0).contains(&previous),
            "{previous} Wh after 2 h at 1.5 kW"
        );
        counter.reset();
        assert_eq!(counter.reading_wh(), 0.0);
    }
}
