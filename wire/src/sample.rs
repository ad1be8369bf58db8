//! The sample message and its parts.

use serde::{Deserialize, Serialize};

use crate::name::{label, label_opt, GpuRef, JobId, NodeName, Project, User};

/// Version of the message layout below. See the module docs for what bumps it.
pub const SCHEMA_VERSION: u32 = 1;

/// One sample of one node at one aligned instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Always [`SCHEMA_VERSION`] for messages written by this crate.
    pub schema: u32,
    /// Producer and version, e.g. `nodewatt-agent/0.1.0`.
    #[serde(deserialize_with = "label")]
    pub agent: String,
    pub cluster: NodeName,
    pub node: NodeName,
    /// Sample instant, Unix milliseconds. Aligned to a multiple of `interval_ms`, so all
    /// nodes of a cluster share the same timestamps.
    pub ts_ms: u64,
    /// When this agent process started (Unix ms); with `seq` it identifies a message.
    pub agent_start_ms: u64,
    /// Per agent process, starting at 0 and increasing by one per published sample.
    pub seq: u64,
    pub interval_ms: u64,
    /// Time covered by this sample's `*_delta_*` fields: since the previous sample of this
    /// agent process (0 on the first). Larger than `interval_ms` after skipped ticks or
    /// when the agent merged queued samples during an outage.
    #[serde(default)]
    pub span_ms: u64,
    /// How many earlier samples were folded into this one: samples between publications
    /// (`telemetry_interval`) and samples merged while the agent could not publish. Their
    /// deltas are summed here; gauges are the last reading, with the span's mean or
    /// maximum where a field says so.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub merged: u32,
    /// The agent's outbox when this message was sent (absent when not publishing to MQTT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxStats>,
    /// One entry per enabled source, in a fixed order: what it read, how long it took.
    pub sources: Vec<SourceStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<Gpu>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rapl: Vec<RaplDomain>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hwmon: Vec<HwmonSensor>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thermal: Vec<ThermalZone>,
    /// Energy and time attributed to jobs, one entry per job plus one for the project
    /// `_idle` (what no job owned), over `usage_window` when present, else over this
    /// message's span. The entries sum exactly to the measured energy of each device
    /// class over that time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<Usage>,
    /// Present when `usage` covers another time than this message's span: the agent
    /// publishes usage every `usage_interval`, coarser than its telemetry, so a message
    /// carries usage only at those instants and at job edges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_window: Option<UsageWindow>,
    /// Cumulative usage of jobs, sent every `totals_interval` and when a job ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_totals: Vec<JobTotal>,
    /// State of the job registry and the GPU cross-check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounting: Option<AccountingStats>,
}

/// The project that is billed for what no job used.
pub const IDLE_PROJECT: &str = "_idle";

/// The project billed for energy that some job used but whose job is not known.
pub const UNATTRIBUTED_PROJECT: &str = "_unattributed";

/// The time a message's `usage` covers, `(ts_ms - span_ms, ts_ms]`, and what was measured
/// in it: the entries must sum to these energies exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageWindow {
    pub span_ms: u64,
    pub gpu_uj: u64,
    pub cpu_uj: u64,
    pub dram_uj: u64,
    /// The most GPUs, CPU packages, DRAM domains and cores seen in the window: they bound
    /// what the window can hold (energy, GPU time, CPU time).
    pub gpus: u32,
    pub cpu_packages: u32,
    pub dram_domains: u32,
    pub cores: u32,
}

impl UsageWindow {
    /// The window of two consecutive windows: spans and energies summed, device counts
    /// the larger.
    pub fn add(&mut self, o: &UsageWindow) {
        self.span_ms = self.span_ms.saturating_add(o.span_ms);
        self.gpu_uj = self.gpu_uj.saturating_add(o.gpu_uj);
        self.cpu_uj = self.cpu_uj.saturating_add(o.cpu_uj);
        self.dram_uj = self.dram_uj.saturating_add(o.dram_uj);
        self.gpus = self.gpus.max(o.gpus);
        self.cpu_packages = self.cpu_packages.max(o.cpu_packages);
        self.dram_domains = self.dram_domains.max(o.dram_domains);
        self.cores = self.cores.max(o.cores);
    }

    /// Whether `o` covers the same time and energy (device counts aside).
    pub fn same_measure(&self, o: &UsageWindow) -> bool {
        (self.span_ms, self.gpu_uj, self.cpu_uj, self.dram_uj)
            == (o.span_ms, o.gpu_uj, o.cpu_uj, o.dram_uj)
    }
}

/// Additive usage of one job (or of `_idle`) over a sample's `span_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Scheduler job id; absent for `_idle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
    pub project: Project,
    /// Absent for `_idle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    #[serde(flatten)]
    pub amounts: Amounts,
}

/// Energy by device class (microjoules), GPU time and CPU time. Additive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    #[serde(default)]
    pub gpu_uj: u64,
    /// CPU packages (RAPL `package-*`).
    #[serde(default)]
    pub cpu_uj: u64,
    /// Memory (RAPL `dram`).
    #[serde(default)]
    pub dram_uj: u64,
    /// The rest of the node, from a node power meter when present.
    #[serde(default)]
    pub other_uj: u64,
    /// GPU time: milliseconds summed over GPUs.
    #[serde(default)]
    pub gpu_ms: u64,
    /// CPU time of the job's cgroup, microseconds (core-microseconds).
    #[serde(default)]
    pub cpu_us: u64,
    /// Of `gpu_uj`: spent in spans when the GPU (or MIG instance) ran nothing (activity
    /// under 1 %).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gpu_idle_uj: u64,
    /// Of `gpu_uj`: spent while the GPU was held back by its power or thermal limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gpu_capped_uj: u64,
    /// Of `gpu_ms`, in µs: time any tensor core was busy (GPM; 0 on GPUs without it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gpu_tensor_us: u64,
}

impl Amounts {
    /// Parts larger than their whole: `gpu_idle_uj` or `gpu_capped_uj` over `gpu_uj`,
    /// `gpu_tensor_us` over `gpu_ms` (in µs).
    pub fn part_exceeding(&self) -> Option<String> {
        [
            ("gpu_idle_uj", self.gpu_idle_uj, "gpu_uj", self.gpu_uj),
            ("gpu_capped_uj", self.gpu_capped_uj, "gpu_uj", self.gpu_uj),
            (
                "gpu_tensor_us",
                self.gpu_tensor_us,
                "gpu_ms × 1000",
                self.gpu_ms.saturating_mul(1000),
            ),
        ]
        .into_iter()
        .find(|(_, part, _, whole)| part > whole)
        .map(|(p, part, w, whole)| format!("{p} = {part} is more than {w} = {whole}"))
    }

    pub fn add(&mut self, o: &Amounts) {
        self.gpu_idle_uj = self.gpu_idle_uj.saturating_add(o.gpu_idle_uj);
        self.gpu_capped_uj = self.gpu_capped_uj.saturating_add(o.gpu_capped_uj);
        self.gpu_tensor_us = self.gpu_tensor_us.saturating_add(o.gpu_tensor_us);
        self.gpu_uj = self.gpu_uj.saturating_add(o.gpu_uj);
        self.cpu_uj = self.cpu_uj.saturating_add(o.cpu_uj);
        self.dram_uj = self.dram_uj.saturating_add(o.dram_uj);
        self.other_uj = self.other_uj.saturating_add(o.other_uj);
        self.gpu_ms = self.gpu_ms.saturating_add(o.gpu_ms);
        self.cpu_us = self.cpu_us.saturating_add(o.cpu_us);
    }

    pub fn energy_uj(&self) -> u64 {
        self.gpu_uj
            .saturating_add(self.cpu_uj)
            .saturating_add(self.dram_uj)
            .saturating_add(self.other_uj)
    }
}

/// A job's usage on this node since `since_ms` (the job's start, or this agent process's
/// start if later). Updated in place: the newest message for a (job, node, since_ms) holds
/// the total; summing over `since_ms` values covers agent restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTotal {
    pub job: JobId,
    pub project: Project,
    pub user: User,
    pub start_ms: u64,
    pub since_ms: u64,
    /// The last sample included.
    pub until_ms: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ended: bool,
    /// GPUs the job held on this node (indices or UUIDs, as the scheduler gave them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuRef>,
    #[serde(flatten)]
    pub amounts: Amounts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountingStats {
    /// Jobs in the registry.
    pub jobs: u32,
    /// Registry files ignored since start (not root-owned, writable by others, malformed).
    pub rejected_files: u64,
    /// GPU processes of a job that does not own that GPU, seen since start.
    pub foreign_gpu_processes: u64,
    /// Registry reads that failed (directory unreadable, untrusted, or gone while jobs
    /// were known) since start; the jobs known before were kept.
    #[serde(default)]
    pub registry_errors: u64,
}

/// The agent's delivery state, stamped on each message as it is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxStats {
    /// Samples waiting for a PubAck, this one included.
    pub len: u32,
    /// Merges since the agent started (samples folded together because the outbox was full).
    pub merges: u64,
    /// Connections to the broker lost since the agent started.
    pub reconnects: u64,
}

/// How one source fared in this sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    #[serde(deserialize_with = "label")]
    pub name: String,
    /// False when the source failed as a whole (its readings are absent from this sample).
    pub ok: bool,
    /// Wall time spent reading this source, microseconds.
    pub read_us: u64,
    /// Devices (GPUs, RAPL domains, sensors, zones) it reported.
    pub devices: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One GPU. Fields the device does not support are absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    /// NVML index (or the simulated device's index).
    pub index: u32,
    #[serde(deserialize_with = "label")]
    pub uuid: String,
    #[serde(deserialize_with = "label")]
    pub pci_bus_id: String,
    #[serde(deserialize_with = "label")]
    pub model: String,
    /// True for devices of the `simulated` source; absent (false) for real hardware.
    #[serde(default, skip_serializing_if = "is_false")]
    pub simulated: bool,
    /// Board power draw, watts: the reading, or the mean over the span when the message
    /// folds several samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    /// The highest power reading over the span (present when samples were folded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_max_w: Option<f64>,
    /// Energy since the driver loaded, millijoules (cumulative; resets on driver reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_mj: Option<u64>,
    /// Energy over `span_ms`, millijoules; absent on the first sample and after a reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_delta_mj: Option<u64>,
    /// The last reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_c: Option<f64>,
    /// The highest reading over the span (present when samples were folded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_max_c: Option<f64>,
    /// HBM/memory temperature, where the device reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_temp_c: Option<f64>,
    /// Utilisation, mean over the span when samples were folded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub util_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_util_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_clock_mhz: Option<u32>,
    /// NVML clock event (throttle) reason bitmask; see [`clock_event_reason_names`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_event_reasons: Option<u64>,
    /// Aggregate (lifetime) ECC error counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_corrected: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected: Option<u64>,
    /// PIDs of running compute processes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    /// The power limit the board is held to now, watts (NVML's enforced limit: the
    /// lowest of the operator's, the driver's and the board's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_limit_w: Option<f64>,
    /// Time the clocks were held down by the power cap over `span_ms`, milliseconds
    /// (NVML's violation counter); absent on the first reading and after a gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_capped_ms: Option<u64>,
    /// Same for the thermal limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thermal_capped_ms: Option<u64>,
    /// Hardware efficiency metrics (NVML GPM, Hopper and later): means over the GPM span
    /// that ended at this sample (at least 100 ms, so at short intervals some samples
    /// have none), absent where the GPU does not measure them.
    #[serde(default, skip_serializing_if = "Gpm::is_empty")]
    pub gpm: Gpm,
    /// Critical events over `span_ms`, counted by kind and code (XID 79 twice: one entry,
    /// count 2). Never a last value: every event counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<GpuEvents>,
    /// MIG instances of this GPU (MIG mode on), as found at the agent's start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mig: Vec<MigDevice>,
    /// Slices of the whole GPU in MIG mode (its largest GPU instance profile: 7 on an A100
    /// or H100): slices no GPU instance holds are idle capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_slices: Option<u32>,
    /// NVML says the GPU has fallen off the bus: its readings are absent.
    #[serde(default, skip_serializing_if = "is_false")]
    pub lost: bool,
    /// NVML did not answer within `nvml.timeout`: this sample has no readings of it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stalled: bool,
    /// Fields that failed for a reason other than "not supported", as `field: reason`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Gpu {
    /// Slices held by its GPU instances ([`slices_held`]).
    pub fn mig_slices_held(&self) -> Option<u32> {
        slices_held(&self.mig)
    }
}

/// Slices held by the GPU instances of these MIG devices, each counted once however many
/// compute instances it has; `None` when a device did not say its slices.
pub fn slices_held(mig: &[MigDevice]) -> Option<u32> {
    let mut seen: Vec<u32> = Vec::with_capacity(mig.len());
    let mut held = 0u32;
    for m in mig {
        if !seen.contains(&m.gpu_instance_id) {
            seen.push(m.gpu_instance_id);
            held = held.saturating_add(m.slices?);
        }
    }
    Some(held)
}

/// One MIG device: a compute instance inside a GPU instance of a GPU. NVML gives no
/// power or energy per instance; those are the parent GPU's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigDevice {
    #[serde(deserialize_with = "label")]
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    /// GPU slices of its GPU instance (of 7 on an H100 or A100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slices: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_total_bytes: Option<u64>,
    /// GPM of its GPU instance over the span.
    #[serde(default, skip_serializing_if = "Gpm::is_empty")]
    pub gpm: Gpm,
}

/// GPM metrics of one GPU over one span: percentages of time or capacity, and link
/// throughput in MiB/s (NVML's units).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Gpm {
    /// Share of time SMs had at least one warp resident (NVML_GPM_METRIC_SM_UTIL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_active_pct: Option<f64>,
    /// Resident warps as a share of the SMs' maximum (NVML_GPM_METRIC_SM_OCCUPANCY).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_occupancy_pct: Option<f64>,
    /// Share of time any tensor core was busy (NVML_GPM_METRIC_ANY_TENSOR_UTIL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_active_pct: Option<f64>,
    /// DRAM bandwidth used as a share of the peak (NVML_GPM_METRIC_DRAM_BW_UTIL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dram_bw_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_tx_mibps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_rx_mibps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvlink_tx_mibps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvlink_rx_mibps: Option<f64>,
}

impl Gpm {
    pub fn is_empty(&self) -> bool {
        *self == Gpm::default()
    }

    /// Each metric with its name, in a fixed order (for writers and checks).
    pub fn fields(&self) -> [(&'static str, Option<f64>); 8] {
        [
            ("sm_active_pct", self.sm_active_pct),
            ("sm_occupancy_pct", self.sm_occupancy_pct),
            ("tensor_active_pct", self.tensor_active_pct),
            ("dram_bw_pct", self.dram_bw_pct),
            ("pcie_tx_mibps", self.pcie_tx_mibps),
            ("pcie_rx_mibps", self.pcie_rx_mibps),
            ("nvlink_tx_mibps", self.nvlink_tx_mibps),
            ("nvlink_rx_mibps", self.nvlink_rx_mibps),
        ]
    }

    /// Mutable access in the same order as [`Gpm::fields`].
    pub fn fields_mut(&mut self) -> [&mut Option<f64>; 8] {
        [
            &mut self.sm_active_pct,
            &mut self.sm_occupancy_pct,
            &mut self.tensor_active_pct,
            &mut self.dram_bw_pct,
            &mut self.pcie_tx_mibps,
            &mut self.pcie_rx_mibps,
            &mut self.nvlink_tx_mibps,
            &mut self.nvlink_rx_mibps,
        ]
    }
}

/// Kinds of GPU events the agent counts (NVML event types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuEventKind {
    /// An XID error; `code` is the XID.
    Xid,
    /// A double-bit (uncorrectable) ECC error.
    DoubleBitEcc,
    /// A single-bit (corrected) ECC error.
    SingleBitEcc,
    /// A kind this version does not know (from a newer agent), or the events beyond
    /// [`MAX_GPU_EVENTS`] kinds and codes.
    #[serde(other)]
    Other,
}

impl GpuEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuEventKind::Xid => "xid",
            GpuEventKind::DoubleBitEcc => "double_bit_ecc",
            GpuEventKind::SingleBitEcc => "single_bit_ecc",
            GpuEventKind::Other => "other",
        }
    }
}

/// How many events of one kind and code a GPU raised over a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuEvents {
    pub kind: GpuEventKind,
    /// The XID for `xid`; 0 for the others.
    pub code: u64,
    pub count: u64,
}

/// Kinds and codes of events one GPU reports per message (XIDs are below 256).
pub const MAX_GPU_EVENTS: usize = 256;
/// Failed fields named per GPU and message.
pub const MAX_GPU_ERRORS: usize = 32;

/// Adds `count` events of `kind` and `code` to `list`, one entry per kind and code. A
/// list that is full counts a new kind and code as `other` (code 0), so it stays within
/// [`MAX_GPU_EVENTS`] and no event goes uncounted.
pub fn count_event(list: &mut Vec<GpuEvents>, kind: GpuEventKind, code: u64, count: u64) {
    let (kind, code) = match list.iter().any(|e| e.kind == kind && e.code == code) {
        false if list.len() >= MAX_GPU_EVENTS - 1 => (GpuEventKind::Other, 0),
        _ => (kind, code),
    };
    match list.iter_mut().find(|e| e.kind == kind && e.code == code) {
        Some(e) => e.count = e.count.saturating_add(count),
        None => list.push(GpuEvents { kind, code, count }),
    }
}

/// Keeps at most [`MAX_GPU_ERRORS`] errors, the last one saying how many were left out.
pub fn cap_errors(errors: &mut Vec<String>) {
    if errors.len() > MAX_GPU_ERRORS {
        let more = errors.len() - (MAX_GPU_ERRORS - 1);
        errors.truncate(MAX_GPU_ERRORS - 1);
        errors.push(format!("and {more} more"));
    }
}

/// Node CPU and memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cpu {
    /// Online logical CPUs (per-CPU lines in /proc/stat).
    pub cores: u32,
    /// Cumulative /proc/stat "cpu" line, in USER_HZ ticks (`ticks_per_s`).
    pub ticks: CpuTicks,
    pub ticks_per_s: u64,
    /// Busy share of all CPUs since the previous sample; absent on the first sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub util_pct: Option<f64>,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub mem_total_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_available_bytes: Option<u64>,
    /// Job cgroups found on this node (Slurm layout, cgroup v1 or v2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobCpu>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTicks {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

/// CPU time of one job's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCpu {
    /// Scheduler job id, from the cgroup directory name (`job_<id>`).
    pub job: JobId,
    /// Cgroup path relative to the cgroup root.
    pub cgroup: String,
    /// Cumulative CPU time of the job's cgroup, microseconds.
    pub cpu_usage_us: u64,
}

/// One powercap (RAPL) domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RaplDomain {
    /// Zone directory name, e.g. `intel-rapl:0:1`.
    #[serde(deserialize_with = "label")]
    pub zone: String,
    /// Domain name from the zone's `name` file, e.g. `package-0`, `dram`, `psys`.
    #[serde(deserialize_with = "label")]
    pub name: String,
    /// Parent zone for subzones (`intel-rapl:0` for `intel-rapl:0:1`).
    #[serde(
        default,
        deserialize_with = "label_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub parent: Option<String>,
    /// Raw counter, microjoules; wraps to 0 after `max_energy_range_uj`. Absent if unreadable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_uj: Option<u64>,
    pub max_energy_range_uj: u64,
    /// Wrap-corrected energy over `span_ms`, microjoules; absent on the first sample and
    /// after a reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_delta_uj: Option<u64>,
    /// Mean power since the previous sample, from the wrap-corrected counter delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    /// `value` in degrees Celsius.
    Temp,
    /// `value` in RPM.
    Fan,
    /// `value` in watts.
    Power,
    /// `energy_uj`: cumulative microjoules.
    Energy,
}

/// One hwmon sensor channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HwmonSensor {
    /// Driver name from the chip's `name` file, e.g. `coretemp`, `power_meter`.
    #[serde(deserialize_with = "label")]
    pub chip: String,
    /// The chip's parent device, stable across reboots, e.g. `platform/coretemp.0`;
    /// `hwmonN` for a chip with no device.
    #[serde(deserialize_with = "label")]
    pub device: String,
    /// Channel, e.g. `temp1`, `fan2`, `power1`, `energy1`.
    #[serde(deserialize_with = "label")]
    pub sensor: String,
    #[serde(
        default,
        deserialize_with = "label_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub label: Option<String>,
    pub kind: SensorKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_uj: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One thermal zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThermalZone {
    /// e.g. `thermal_zone0`.
    #[serde(deserialize_with = "label")]
    pub zone: String,
    /// The zone's `type` file, e.g. `x86_pkg_temp`, `acpitz`.
    #[serde(rename = "type", deserialize_with = "label")]
    pub zone_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_c: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// NVML clock event reason bits (`nvmlClocksEventReason*`, formerly "throttle reasons").
pub const CLOCK_EVENT_REASONS: &[(u64, &str)] = &[
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// Names of the reasons set in an NVML clock event bitmask; unknown bits are named `bit_N`.
pub fn clock_event_reason_names(mask: u64) -> Vec<String> {
    (0..64)
        .map(|bit| 1u64 << bit)
        .filter(|b| mask & b != 0)
        .map(
            |b| match CLOCK_EVENT_REASONS.iter().find(|(v, _)| *v == b) {
                Some((_, name)) => (*name).to_string(),
                None => format!("bit_{}", b.trailing_zeros()),
            },
        )
        .collect()
}

/// Retained on the status topic: `online` when the agent connects, `offline` as its last
/// will (connection lost) or when it stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub online: bool,
    #[serde(
        default,
        deserialize_with = "label_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub agent: Option<String>,
    /// When the status was set (absent in the last will, which is written at connect time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<u64>,
    #[serde(
        default,
        deserialize_with = "label_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a nodewatt sample: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported schema version {found} (this build reads version {SCHEMA_VERSION})")]
    Schema { found: u64 },
}

impl Sample {
    /// A sample with its envelope set and no readings yet.
    pub fn new(
        agent: &str,
        cluster: NodeName,
        node: NodeName,
        interval_ms: u64,
        agent_start_ms: u64,
    ) -> Sample {
        Sample {
            schema: SCHEMA_VERSION,
            agent: agent.to_string(),
            cluster,
            node,
            ts_ms: 0,
            agent_start_ms,
            seq: 0,
            interval_ms,
            span_ms: 0,
            merged: 0,
            outbox: None,
            sources: Vec::new(),
            gpus: Vec::new(),
            cpu: None,
            rapl: Vec::new(),
            hwmon: Vec::new(),
            thermal: Vec::new(),
            usage: Vec::new(),
            usage_window: None,
            job_totals: Vec::new(),
            accounting: None,
        }
    }

    /// Parses a message, checking the schema version before the body so that a newer
    /// agent's message is reported as such rather than as a confusing field error.
    pub fn from_json(bytes: &[u8]) -> Result<Sample, WireError> {
        #[derive(Deserialize)]
        struct Version {
            schema: u64,
        }
        let v: Version = serde_json::from_slice(bytes)?;
        if v.schema != u64::from(SCHEMA_VERSION) {
            return Err(WireError::Schema { found: v.schema });
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    pub fn to_json(&self) -> String {
        // Serialising plain structs of numbers and strings cannot fail.
        serde_json::to_string(self).expect("sample serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Sample {
        let name = |n: &str| NodeName::new(n).unwrap();
        let mut s = Sample::new(
            "nodewatt-agent/test",
            name("c"),
            name("n1"),
            1000,
            1_699_999_999_000,
        );
        s.ts_ms = 1_700_000_000_000;
        s.seq = 7;
        s
    }

    #[test]
    fn round_trips_and_omits_empty_parts() {
        let s = minimal();
        let json = s.to_json();
        assert_eq!(
            json,
            r#"{"schema":1,"agent":"nodewatt-agent/test","cluster":"c","node":"n1","ts_ms":1700000000000,"agent_start_ms":1699999999000,"seq":7,"interval_ms":1000,"span_ms":0,"sources":[]}"#
        );
        assert_eq!(Sample::from_json(json.as_bytes()).unwrap(), s);
    }

    #[test]
    fn rejects_other_schema_versions_by_name() {
        let json = minimal()
            .to_json()
            .replace(r#""schema":1"#, r#""schema":2"#);
        let err = Sample::from_json(json.as_bytes()).unwrap_err();
        assert!(matches!(err, WireError::Schema { found: 2 }), "{err}");
        assert!(err.to_string().contains("version 2"));
    }

    #[test]
    fn ignores_unknown_fields_within_a_version() {
        let json = minimal()
            .to_json()
            .replace(r#""seq":7"#, r#""seq":7,"added_later":true"#);
        assert_eq!(Sample::from_json(json.as_bytes()).unwrap().seq, 7);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            Sample::from_json(b"{\"schema\":1"),
            Err(WireError::Json(_))
        ));
        assert!(Sample::from_json(b"\xff\xfe").is_err());
    }

    #[test]
    fn event_and_error_lists_stay_within_their_limits() {
        let mut list = Vec::new();
        for code in 0..1_000 {
            count_event(&mut list, GpuEventKind::Xid, code, 2);
        }
        assert_eq!(list.len(), MAX_GPU_EVENTS);
        assert_eq!(
            list.iter().map(|e| e.count).sum::<u64>(),
            2_000,
            "none uncounted"
        );
        assert_eq!(list.last().unwrap().kind, GpuEventKind::Other);
        // Known entries still count as themselves.
        count_event(&mut list, GpuEventKind::Xid, 7, 1);
        assert_eq!(list[7].count, 3);
        let mut errors: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
        cap_errors(&mut errors);
        assert_eq!(errors.len(), MAX_GPU_ERRORS);
        assert_eq!(errors.last().unwrap(), "and 9 more");
        // A newer agent's event kind is read as `other`, not a rejected message.
        let e: GpuEvents =
            serde_json::from_str(r#"{"kind":"nvlink_down","code":3,"count":1}"#).unwrap();
        assert_eq!(e.kind, GpuEventKind::Other);
    }

    #[test]
    fn names_clock_event_reasons() {
        assert_eq!(
            clock_event_reason_names(0x4 | 0x40 | (1 << 20)),
            vec!["sw_power_cap", "hw_thermal_slowdown", "bit_20"]
        );
        assert!(clock_event_reason_names(0).is_empty());
    }
}
