//! Simulated sensor fleets, fault injection and the ground-truth ledger.
//!
//! Data flows fleet -> sim (faults) -> actions for the IO shells, and every emitted reading is
//! accounted in the ledger. `docs/simulator.md` states the ledger's accounting rules.
//! - [`fleet`], [`signal`]: deterministic device signals.
//! - [`format`]: payload and serial line encoders.
//! - [`faults`]: which faults are on.
//! - [`sim`]: the sans-IO simulation core.
//! - [`ledger`]: the ground truth; [`verify`]: comparing it with the store; [`observe`]:
//!   reading the store's windows through the collector's query API.
//! - [`run`], [`serial`]: the IO shells (MQTT publisher, pseudo-terminal).
//! - [`demo`]: `tributary-sim demo`, the whole pipeline from one command.
//! - [`cluster`]: collector and agent processes on loopback, for the demo and end-to-end tests.

pub mod cluster;
pub mod demo;
pub mod faults;
pub mod fleet;
pub mod format;
pub mod ledger;
pub mod observe;
pub mod run;
pub mod serial;
pub mod signal;
pub mod sim;
pub mod verify;
