//! The scenario file: what the stand-in's GPUs report, and when they misbehave.
//!
//! Every table denies unknown keys, so a typo fails `nvmlInit` instead of silently
//! leaving a default in place. See README.md for the format.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

/// Exported functions that act on one GPU (by handle, or by index for
/// `nvmlDeviceGetHandleByIndex_v2`, or through a GPM sample for `nvmlGpmMetricsGet`).
/// These are the names `not_supported` and `failing` may list.
pub const GPU_FUNCTIONS: &[&str] = &[
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetFieldValues",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetViolationStatus",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlDeviceRegisterEvents",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceIsMigDeviceHandle",
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
    "nvmlDeviceGetAttributes_v2",
    "nvmlDeviceGetGpuInstanceProfileInfo",
    "nvmlGpmQueryDeviceSupport",
    "nvmlGpmSampleGet",
    "nvmlGpmMigSampleGet",
    "nvmlGpmMetricsGet",
];

/// The most MIG devices one GPU can have (nvmlDeviceGetMaxMigDeviceCount on an A100/H100).
pub const MAX_MIG_DEVICES: usize = 7;
/// Device handles carry the GPU index in 8 bits.
pub const MAX_GPUS: usize = 255;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default = "default_driver_version")]
    pub driver_version: String,
    #[serde(default)]
    pub init_error: Option<InitError>,
    #[serde(default, rename = "gpu")]
    pub gpus: Vec<GpuSpec>,
}

fn default_driver_version() -> String {
    "550.54.15".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitError {
    /// NVML_ERROR_DRIVER_NOT_LOADED (9)
    DriverNotLoaded,
    /// NVML_ERROR_NO_PERMISSION (4)
    NoPermission,
    /// NVML_ERROR_UNKNOWN (999)
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSpec {
    pub uuid: String,
    pub name: String,
    /// Absent: "00000000:XX:00.0" with XX = 0x19 + the GPU's index.
    pub pci_bus_id: Option<String>,
    pub power_w: f64,
    pub energy_start_mj: u64,
    pub power_limit_w: f64,
    pub temp_c: u32,
    pub mem_temp_c: u32,
    pub util_gpu: u32,
    pub util_memory: u32,
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    pub sm_clock_mhz: u32,
    pub mem_clock_mhz: u32,
    pub clocks_event_reasons: u64,
    pub ecc_corrected: u64,
    pub ecc_uncorrected: u64,
    pub pids: Vec<u32>,
    pub power_capped_fraction: f64,
    pub thermal_fraction: f64,
    pub not_supported: Vec<String>,
    pub failing: Vec<String>,
    pub reload_at_ms: Option<u64>,
    pub lost_at_ms: Option<u64>,
    pub hang_at_ms: Option<u64>,
    pub hang_for_ms: u64,
    #[serde(rename = "event")]
    pub events: Vec<EventSpec>,
    pub gpm: Option<GpmSpec>,
    pub mig: Vec<MigSpec>,
    /// Slices of the largest GPU instance profile (7 on an A100 or H100, 4 on an A30).
    pub mig_slices: u32,
}

impl Default for GpuSpec {
    fn default() -> Self {
        GpuSpec {
            uuid: String::new(),
            name: "NVIDIA H100 80GB HBM3".to_string(),
            pci_bus_id: None,
            power_w: 100.0,
            energy_start_mj: 0,
            power_limit_w: 700.0,
            temp_c: 45,
            mem_temp_c: 50,
            util_gpu: 80,
            util_memory: 30,
            mem_total_bytes: 85_899_345_920,
            mem_used_bytes: 1_073_741_824,
            sm_clock_mhz: 1980,
            mem_clock_mhz: 2619,
            clocks_event_reasons: 0,
            ecc_corrected: 0,
            ecc_uncorrected: 0,
            pids: Vec::new(),
            power_capped_fraction: 0.0,
            thermal_fraction: 0.0,
            not_supported: Vec::new(),
            failing: Vec::new(),
            reload_at_ms: None,
            lost_at_ms: None,
            hang_at_ms: None,
            hang_for_ms: 2000,
            events: Vec::new(),
            gpm: None,
            mig: Vec::new(),
            mig_slices: 7,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    pub at_ms: u64,
    #[serde(rename = "type")]
    pub kind: EventKind,
    #[serde(default)]
    pub data: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Xid,
    SingleBitEcc,
    DoubleBitEcc,
    Pstate,
    Clock,
    PowerSource,
}

impl EventKind {
    /// The nvmlEventType* bit.
    pub fn mask(self) -> u64 {
        use nvml_wrapper_sys::bindings as b;
        u64::from(match self {
            EventKind::Xid => b::nvmlEventTypeXidCriticalError,
            EventKind::SingleBitEcc => b::nvmlEventTypeSingleBitEccError,
            EventKind::DoubleBitEcc => b::nvmlEventTypeDoubleBitEccError,
            EventKind::Pstate => b::nvmlEventTypePState,
            EventKind::Clock => b::nvmlEventTypeClock,
            EventKind::PowerSource => b::nvmlEventTypePowerSourceChange,
        })
    }
}

/// GPM metric values; an absent one answers NOT_SUPPORTED in its result slot.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpmSpec {
    pub graphics_util: Option<f64>,
    pub sm_util: Option<f64>,
    pub sm_occupancy: Option<f64>,
    pub integer_util: Option<f64>,
    pub any_tensor_util: Option<f64>,
    pub dfma_tensor_util: Option<f64>,
    pub hmma_tensor_util: Option<f64>,
    pub imma_tensor_util: Option<f64>,
    pub dram_bw_util: Option<f64>,
    pub fp64_util: Option<f64>,
    pub fp32_util: Option<f64>,
    pub fp16_util: Option<f64>,
    pub pcie_tx_per_sec: Option<f64>,
    pub pcie_rx_per_sec: Option<f64>,
    pub nvlink_total_rx_per_sec: Option<f64>,
    pub nvlink_total_tx_per_sec: Option<f64>,
}

impl GpmSpec {
    /// The value for an NVML_GPM_METRIC_* id, if the scenario gives one.
    pub fn metric(&self, id: u32) -> Option<f64> {
        match id {
            1 => self.graphics_util,
            2 => self.sm_util,
            3 => self.sm_occupancy,
            4 => self.integer_util,
            5 => self.any_tensor_util,
            6 => self.dfma_tensor_util,
            7 => self.hmma_tensor_util,
            9 => self.imma_tensor_util,
            10 => self.dram_bw_util,
            11 => self.fp64_util,
            12 => self.fp32_util,
            13 => self.fp16_util,
            20 => self.pcie_tx_per_sec,
            21 => self.pcie_rx_per_sec,
            60 => self.nvlink_total_rx_per_sec,
            61 => self.nvlink_total_tx_per_sec,
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigSpec {
    pub uuid: String,
    pub gpu_instance_id: u32,
    #[serde(default)]
    pub compute_instance_id: u32,
    #[serde(default = "default_slices")]
    pub slices: u32,
    #[serde(default = "default_mig_memory_mb")]
    pub memory_mb: u64,
    #[serde(default)]
    pub mem_used_bytes: u64,
    /// Processes inside this instance (also listed, with instance ids, on the parent).
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default)]
    pub gpm: Option<GpmSpec>,
    /// The instance exists from this time on (created while the agent runs).
    #[serde(default)]
    pub from_ms: u64,
    /// The instance is destroyed at this time (a MIG reconfiguration between jobs).
    #[serde(default)]
    pub until_ms: Option<u64>,
}

impl MigSpec {
    /// Whether the instance exists `now_ns` after nvmlInit.
    pub fn exists(&self, now_ns: u64) -> bool {
        let ms = now_ns / 1_000_000;
        ms >= self.from_ms && self.until_ms.is_none_or(|u| ms < u)
    }
}

fn default_slices() -> u32 {
    3
}

fn default_mig_memory_mb() -> u64 {
    40192
}

/// A PCI bus id "DDDDDDDD:BB:DD.F" split into domain, bus and device.
pub fn parse_pci_bus_id(s: &str) -> Option<(u32, u32, u32)> {
    let (domain, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let hex = |p: &str, max_len: usize| {
        if p.is_empty() || p.len() > max_len {
            return None;
        }
        u32::from_str_radix(p, 16).ok()
    };
    hex(function, 1)?;
    Some((hex(domain, 8)?, hex(bus, 2)?, hex(device, 2)?))
}

impl Scenario {
    /// Parses and checks a scenario; the error is one line, fit for stderr.
    pub fn from_toml(text: &str) -> Result<Scenario, String> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        scenario.check()?;
        Ok(scenario)
    }

    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        Scenario::from_toml(&text)
    }

    /// The bus id of GPU `index`, given or defaulted.
    pub fn pci_bus_id(&self, index: usize) -> String {
        match self.gpus.get(index).and_then(|g| g.pci_bus_id.clone()) {
            Some(id) => id,
            None => format!("00000000:{:02X}:00.0", 0x19 + index),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.driver_version.len() >= 80 {
            return Err("driver_version is longer than 79 bytes".into());
        }
        if self.gpus.len() > MAX_GPUS {
            return Err(format!("at most {MAX_GPUS} [[gpu]] tables"));
        }
        let mut uuids = HashSet::new();
        for (i, g) in self.gpus.iter().enumerate() {
            let at = |what: String| format!("gpu[{i}]: {what}");
            if g.uuid.is_empty() {
                return Err(at("uuid is required".into()));
            }
            if g.uuid.len() >= 96 || g.name.len() >= 96 {
                return Err(at("uuid and name must be shorter than 96 bytes".into()));
            }
            if !uuids.insert(g.uuid.clone()) {
                return Err(at(format!("uuid {} is used twice", g.uuid)));
            }
            let bus_id = self.pci_bus_id(i);
            if parse_pci_bus_id(&bus_id).is_none() {
                return Err(at(format!(
                    "pci_bus_id {bus_id:?} is not of the form 00000000:19:00.0"
                )));
            }
            for (what, v) in [("power_w", g.power_w), ("power_limit_w", g.power_limit_w)] {
                if !(0.0..4_000_000.0).contains(&v) {
                    return Err(at(format!("{what} must be between 0 and 4000000")));
                }
            }
            for (what, v) in [
                ("power_capped_fraction", g.power_capped_fraction),
                ("thermal_fraction", g.thermal_fraction),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    return Err(at(format!("{what} must be between 0 and 1")));
                }
            }
            if g.mem_used_bytes > g.mem_total_bytes {
                return Err(at("mem_used_bytes exceeds mem_total_bytes".into()));
            }
            for name in g.not_supported.iter().chain(&g.failing) {
                if !GPU_FUNCTIONS.contains(&name.as_str()) {
                    return Err(at(format!(
                        "{name:?} in not_supported/failing is not an exported function \
                         that takes a GPU (see README.md)"
                    )));
                }
            }
            if g.mig.len() > MAX_MIG_DEVICES {
                return Err(at(format!("at most {MAX_MIG_DEVICES} [[gpu.mig]] tables")));
            }
            if !(1..=8).contains(&g.mig_slices) {
                return Err(at("mig_slices must be 1 to 8".into()));
            }
            let mut instances = HashSet::new();
            for (j, m) in g.mig.iter().enumerate() {
                if m.uuid.is_empty() || m.uuid.len() >= 96 {
                    return Err(at(format!("mig[{j}]: uuid must be 1 to 95 bytes")));
                }
                if !uuids.insert(m.uuid.clone()) {
                    return Err(at(format!("mig[{j}]: uuid {} is used twice", m.uuid)));
                }
                if !instances.insert(m.gpu_instance_id) {
                    return Err(at(format!(
                        "mig[{j}]: gpu_instance_id {} is used twice",
                        m.gpu_instance_id
                    )));
                }
                if m.until_ms.is_some_and(|u| u <= m.from_ms) {
                    return Err(at(format!("mig[{j}]: until_ms must be after from_ms")));
                }
                if m.mem_used_bytes > m.memory_mb.saturating_mul(1 << 20) {
                    return Err(at(format!("mig[{j}]: mem_used_bytes exceeds memory_mb")));
                }
            }
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_gpu_takes_defaults() {
        let s = Scenario::from_toml("[[gpu]]\nuuid = \"GPU-1\"\n").unwrap();
        assert_eq!(s.driver_version, "550.54.15");
        assert_eq!(s.init_error, None);
        let g = &s.gpus[0];
        assert_eq!(g.power_w, 100.0);
        assert_eq!(g.energy_start_mj, 0);
        assert_eq!(g.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(g.hang_for_ms, 2000);
        assert_eq!(s.pci_bus_id(0), "00000000:19:00.0");
    }

    #[test]
    fn full_example_parses() {
        let text = r#"
driver_version = "535.1.2"
init_error = "no_permission"
[[gpu]]
uuid = "GPU-a"
pci_bus_id = "00000001:3B:00.0"
not_supported = ["nvmlDeviceGetFieldValues"]
failing = ["nvmlDeviceGetClockInfo"]
reload_at_ms = 500
[[gpu.event]]
at_ms = 200
type = "xid"
data = 79
[gpu.gpm]
sm_util = 60.0
[[gpu.mig]]
uuid = "MIG-a"
gpu_instance_id = 1
[gpu.mig.gpm]
sm_util = 90.0
"#;
        let s = Scenario::from_toml(text).unwrap();
        assert_eq!(s.init_error, Some(InitError::NoPermission));
        let g = &s.gpus[0];
        assert_eq!(g.events[0].kind, EventKind::Xid);
        assert_eq!(g.events[0].kind.mask(), 8);
        assert_eq!(g.gpm.as_ref().unwrap().metric(2), Some(60.0));
        assert_eq!(g.gpm.as_ref().unwrap().metric(3), None);
        assert_eq!(g.mig[0].slices, 3);
        assert_eq!(g.mig[0].gpm.as_ref().unwrap().sm_util, Some(90.0));
        assert_eq!(parse_pci_bus_id(&s.pci_bus_id(0)), Some((1, 0x3b, 0)));
    }

    #[test]
    fn mistakes_are_refused_in_one_line() {
        for (text, needle) in [
            ("[[gpu]]\nuuid = \"a\"\npowr_w = 3.0\n", "unknown field"),
            ("[[gpu]]\nname = \"x\"\n", "uuid is required"),
            (
                "[[gpu]]\nuuid = \"a\"\nfailing = [\"nvmlDeviceGetClock\"]\n",
                "not an exported function",
            ),
            (
                "[[gpu]]\nuuid = \"a\"\npci_bus_id = \"19:00.0\"\n",
                "pci_bus_id",
            ),
            (
                "[[gpu]]\nuuid = \"a\"\n[[gpu.event]]\nat_ms = 1\ntype = \"fire\"\n",
                "unknown variant",
            ),
            ("init_error = \"nope\"\n", "unknown variant"),
            (
                "[[gpu]]\nuuid = \"a\"\n[[gpu]]\nuuid = \"a\"\n",
                "used twice",
            ),
        ] {
            let err = Scenario::from_toml(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn bus_ids_parse() {
        assert_eq!(parse_pci_bus_id("00000000:19:00.0"), Some((0, 0x19, 0)));
        assert_eq!(parse_pci_bus_id("0000:AF:1f.3"), Some((0, 0xaf, 0x1f)));
        assert_eq!(parse_pci_bus_id("0000:AF:1f"), None);
        assert_eq!(parse_pci_bus_id("0000:AFF:00.0"), None);
    }
}
