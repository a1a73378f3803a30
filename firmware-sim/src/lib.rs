//! Simulated sensor fleets, fault injection and the ground-truth ledger.

pub mod fleet;
pub mod signal;
