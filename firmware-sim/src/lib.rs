//! Simulated sensor fleets, fault injection and the ground-truth ledger.
