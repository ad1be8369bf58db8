//! The nodewatt wire contract: one JSON message per sample, and the types and checks
//! that every producer and receiver share.
//!
//! Versioning rule: within one `schema` version fields are only ever added, so readers
//! ignore fields they do not know. Removing, renaming or changing the meaning or unit of a
//! field bumps [`SCHEMA_VERSION`]. Units live in the field names (`_w`, `_mj`, `_uj`, `_c`,
//! `_pct`, `_bytes`, `_mhz`, `_us`, `_ms`) so a message can be read without this file.
//!
//! Counters are published raw and cumulative (NVML energy, RAPL energy, /proc/stat ticks,
//! cgroup CPU time) beside per-span deltas, so a lost message loses resolution, never energy.
//!
//! Parse, don't validate: names are typed ([`name`]) and checked while deserialising;
//! [`check::check_sample`] turns a parsed [`Sample`] into a [`check::ValidSample`], the
//! only kind the collector stores.

pub mod check;
pub mod name;
mod sample;
mod topic;

pub use check::{
    check_sample, check_status, invalid, Invalid, Limits, MaxPower, Reason, ValidSample,
};
pub use name::{GpuRef, JobId, NameError, NodeName, Project, User};
pub use sample::*;
pub use topic::{sample_topic, status_topic, Topic, TopicKind, TOPIC_ROOT};
