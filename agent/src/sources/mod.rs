//! Telemetry sources: one file each, behind the [`Source`] trait.
//!
//! A source is built once at start-up (discovery, opening files) and then only reads on
//! every tick. It writes its part of the [`Sample`]; the sampler times each call and
//! records success or failure in `Sample::sources`.

use nodewatt_wire::Sample;

pub mod cpu;
pub mod hwmon;
pub mod nvml;
pub mod rapl;
pub mod simulated;
pub mod thermal;

/// What a source found at start-up, for `check` and the start-up log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// GPUs, domains, sensors or zones found.
    pub devices: u32,
    /// One line on what was found, e.g. "3 domains".
    pub summary: String,
    /// Things present but unusable, each with its reason (e.g. a permission problem).
    pub problems: Vec<String>,
    /// The source cannot work at all on this node (e.g. no NVML library); why.
    pub unavailable: Option<String>,
}

/// A failure of a whole source for one sample: its readings are absent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Time of the sample being taken, Unix milliseconds (aligned to the interval).
pub type TickMs = u64;

pub trait Source: Send {
    fn name(&self) -> &'static str;
    fn inventory(&self) -> Inventory;
    /// Reads the current values into `out`; returns how many devices it reported.
    fn read(&mut self, at: TickMs, out: &mut Sample) -> Result<u32, SourceError>;
}
