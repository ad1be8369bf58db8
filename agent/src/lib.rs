//! nodewatt agent: samples node telemetry and emits it as `nodewatt_wire::Sample`s.

pub mod accounting;
pub mod attribution;
pub mod config;
pub mod counter;
pub mod deltas;
pub mod publish;
pub mod registry;
pub mod sampler;
pub mod schedule;
pub mod sources;
pub mod sysfs;

#[cfg(test)]
pub mod testutil;
