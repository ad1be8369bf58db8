//! nodewatt agent: samples node telemetry and emits it as `nodewatt_wire::Sample`s.

pub mod accounting;
pub mod attribution;
pub mod cadence;
pub mod config;
pub mod counter;
pub mod deltas;
pub mod procs;
pub mod publish;
pub mod sampler;
pub mod schedule;
pub mod sources;
pub mod state;
pub mod sysfs;

#[cfg(test)]
pub mod testutil;
