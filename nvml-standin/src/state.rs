//! The pure model: given a scenario and the time since `nvmlInit` (in nanoseconds), what
//! each call answers. No FFI and no clock in here; `lib.rs` supplies both.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nvml_wrapper_sys::bindings as b;

use crate::scenario::{GpmSpec, GpuSpec, MigSpec, Scenario};

/// An nvmlReturn_t.
pub type Code = b::nvmlReturn_t;

pub const SUCCESS: Code = b::nvmlReturn_enum_NVML_SUCCESS;
pub const UNINITIALIZED: Code = b::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
pub const INVALID_ARG: Code = b::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
pub const NOT_SUPPORTED: Code = b::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
pub const NO_PERMISSION: Code = b::nvmlReturn_enum_NVML_ERROR_NO_PERMISSION;
pub const NOT_FOUND: Code = b::nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
pub const INSUFFICIENT_SIZE: Code = b::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
pub const DRIVER_NOT_LOADED: Code = b::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
pub const TIMEOUT: Code = b::nvmlReturn_enum_NVML_ERROR_TIMEOUT;
pub const GPU_IS_LOST: Code = b::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
pub const VERSION_MISMATCH: Code = b::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
pub const UNKNOWN: Code = b::nvmlReturn_enum_NVML_ERROR_UNKNOWN;

/// "No MIG instance" in nvmlProcessInfo_t and nvmlEventData_t.
pub const NO_INSTANCE: u32 = 0xFFFF_FFFF;

const NS_PER_MS: u64 = 1_000_000;
const NS_PER_S: u128 = 1_000_000_000;

/// The six event types the stand-in can deliver (nvmlDeviceGetSupportedEventTypes).
pub const SUPPORTED_EVENTS: u64 = (b::nvmlEventTypeSingleBitEccError
    | b::nvmlEventTypeDoubleBitEccError
    | b::nvmlEventTypePState
    | b::nvmlEventTypeXidCriticalError
    | b::nvmlEventTypeClock
    | b::nvmlEventTypePowerSourceChange) as u64;

/// What a MIG device handle answers; everything else is NOT_SUPPORTED on it, as on a
/// real MIG device (power, energy, temperature, clocks and violations are per GPU).
const MIG_FUNCTIONS: &[&str] = &[
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceIsMigDeviceHandle",
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
    "nvmlDeviceGetAttributes_v2",
];

/// Device handles are tagged integers: 0x4 in bits 28-31, the init generation in bits
/// 16-27, the GPU index in bits 8-15, and 0 (the GPU) or 1 + MIG index in bits 0-7. Never
/// null, never dereferenced, and a handle from before an nvmlShutdown no longer resolves.
const HANDLE_TAG: usize = 0x4000_0000;
const GENERATION_MASK: u32 = 0xFFF;

/// One device as a handle names it: a GPU, or one of its MIG devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevRef {
    pub gpu: usize,
    pub mig: Option<usize>,
}

impl DevRef {
    pub fn gpu(gpu: usize) -> DevRef {
        DevRef { gpu, mig: None }
    }
}

/// Whether a call on a GPU goes ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Proceed,
    Fail(Code),
    /// Block this long (with no lock held), then ask again.
    Hang(Duration),
}

/// A process as nvmlDeviceGetComputeRunningProcesses_v3 lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub used_bytes: u64,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
}

/// An event as nvmlEventSetWait_v2 delivers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub gpu: usize,
    pub event_type: u64,
    pub data: u64,
}

pub struct Model {
    scenario: Scenario,
    generation: u32,
    /// Per GPU: its one hang has happened.
    hang_done: Vec<bool>,
}

impl Model {
    pub fn new(scenario: Scenario, generation: u32) -> Model {
        let hang_done = vec![false; scenario.gpus.len()];
        Model {
            scenario,
            generation: generation & GENERATION_MASK,
            hang_done,
        }
    }

    pub fn driver_version(&self) -> &str {
        &self.scenario.driver_version
    }

    pub fn gpu_count(&self) -> usize {
        self.scenario.gpus.len()
    }

    pub fn gpu(&self, gpu: usize) -> &GpuSpec {
        &self.scenario.gpus[gpu]
    }

    /// The MIG device a handle names, if it names one.
    pub fn mig(&self, d: DevRef) -> Option<&MigSpec> {
        d.mig.and_then(|m| self.gpu(d.gpu).mig.get(m))
    }

    /// The handle for a device (see HANDLE_TAG).
    pub fn handle(&self, d: DevRef) -> usize {
        let slot = d.mig.map_or(0, |m| m + 1);
        HANDLE_TAG | (self.generation as usize) << 16 | d.gpu << 8 | slot
    }

    /// The device a handle names, if it is one of this init's handles.
    pub fn device(&self, handle: usize) -> Option<DevRef> {
        if handle > u32::MAX as usize || handle & !0x0FFF_FFFF != HANDLE_TAG {
            return None;
        }
        if (handle >> 16) as u32 & GENERATION_MASK != self.generation {
            return None;
        }
        let gpu = (handle >> 8) & 0xFF;
        let slot = handle & 0xFF;
        let spec = self.scenario.gpus.get(gpu)?;
        let mig = match slot {
            0 => None,
            s if s <= spec.mig.len() => Some(s - 1),
            _ => return None,
        };
        Some(DevRef { gpu, mig })
    }

    pub fn is_lost(&self, gpu: usize, now_ns: u64) -> bool {
        self.gpu(gpu)
            .lost_at_ms
            .is_some_and(|at| now_ns >= at.saturating_mul(NS_PER_MS))
    }

    /// Lost, hang, not_supported, failing, and the MIG restrictions, in that order, for a
    /// call of `func` on `d` at `now_ns`. A hang is handed out once per GPU.
    pub fn gate(&mut self, func: &str, d: DevRef, now_ns: u64) -> Gate {
        if self.is_lost(d.gpu, now_ns) {
            return Gate::Fail(GPU_IS_LOST);
        }
        let spec = &self.scenario.gpus[d.gpu];
        if let Some(at) = spec.hang_at_ms {
            if !self.hang_done[d.gpu] && now_ns >= at.saturating_mul(NS_PER_MS) {
                self.hang_done[d.gpu] = true;
                return Gate::Hang(Duration::from_millis(spec.hang_for_ms));
            }
        }
        if spec.not_supported.iter().any(|f| f == func) {
            return Gate::Fail(NOT_SUPPORTED);
        }
        if spec.failing.iter().any(|f| f == func) {
            return Gate::Fail(UNKNOWN);
        }
        if d.mig.is_some() && !MIG_FUNCTIONS.contains(&func) {
            return Gate::Fail(NOT_SUPPORTED);
        }
        // A handle to an instance destroyed since (or not created yet) is not a device.
        if self.mig(d).is_some_and(|m| !m.exists(now_ns)) {
            return Gate::Fail(INVALID_ARG);
        }
        Gate::Proceed
    }

    /// Board power in mW, rounded.
    pub fn power_mw(&self, gpu: usize) -> u32 {
        (self.gpu(gpu).power_w * 1000.0).round() as u32
    }

    pub fn power_limit_mw(&self, gpu: usize) -> u32 {
        (self.gpu(gpu).power_limit_w * 1000.0).round() as u32
    }

    /// The energy counter in mJ: start + power * elapsed, or power * (elapsed - reload)
    /// once the driver has reloaded. Integer arithmetic, so it is exact and monotonic
    /// between reloads.
    pub fn energy_mj(&self, gpu: usize, now_ns: u64) -> u64 {
        let spec = self.gpu(gpu);
        let mw = u128::from(self.power_mw(gpu));
        let (base, since_ns) = match spec.reload_at_ms.map(|r| r.saturating_mul(NS_PER_MS)) {
            Some(reload) if now_ns >= reload => (0, now_ns - reload),
            _ => (spec.energy_start_mj, now_ns),
        };
        let added = mw * u128::from(since_ns) / NS_PER_S;
        base.saturating_add(u64::try_from(added).unwrap_or(u64::MAX))
    }

    /// nvmlDeviceGetViolationStatus: time spent throttled by `policy`, in ns.
    pub fn violation_ns(&self, gpu: usize, policy: u32, now_ns: u64) -> Result<u64, Code> {
        let spec = self.gpu(gpu);
        let fraction = match policy {
            b::nvmlPerfPolicyType_enum_NVML_PERF_POLICY_POWER => spec.power_capped_fraction,
            b::nvmlPerfPolicyType_enum_NVML_PERF_POLICY_THERMAL => spec.thermal_fraction,
            0..=5 | 10 | 11 => 0.0,
            _ => return Err(INVALID_ARG),
        };
        Ok((fraction * now_ns as f64) as u64)
    }

    /// Memory (total, used) in bytes of a GPU or a MIG device.
    pub fn memory(&self, d: DevRef) -> (u64, u64) {
        match self.mig(d) {
            Some(m) => (m.memory_mb.saturating_mul(1 << 20), m.mem_used_bytes),
            None => {
                let g = self.gpu(d.gpu);
                (g.mem_total_bytes, g.mem_used_bytes)
            }
        }
    }

    pub fn uuid(&self, d: DevRef) -> &str {
        match self.mig(d) {
            Some(m) => &m.uuid,
            None => &self.gpu(d.gpu).uuid,
        }
    }

    /// The product name; a MIG device's is its parent's plus the profile, as nvidia-smi
    /// shows it ("NVIDIA H100 80GB HBM3 MIG 3g.40gb").
    pub fn name(&self, d: DevRef) -> String {
        let g = self.gpu(d.gpu);
        match self.mig(d) {
            Some(m) => format!(
                "{} MIG {}g.{}gb",
                g.name,
                m.slices,
                m.memory_mb.div_ceil(1024)
            ),
            None => g.name.clone(),
        }
    }

    pub fn pci_bus_id(&self, gpu: usize) -> String {
        self.scenario.pci_bus_id(gpu)
    }

    /// The processes on a GPU (its own, then each MIG device's, with instance ids) or on
    /// one MIG device. Each process gets an equal share of the used memory.
    pub fn processes(&self, d: DevRef, now_ns: u64) -> Vec<Process> {
        fn share(pids: &[u32], used: u64, gi: u32, ci: u32) -> impl Iterator<Item = Process> + '_ {
            let each = used / (pids.len().max(1) as u64);
            pids.iter().map(move |&pid| Process {
                pid,
                used_bytes: each,
                gpu_instance_id: gi,
                compute_instance_id: ci,
            })
        }
        let mig = |m: &MigSpec| {
            share(
                &m.pids,
                m.mem_used_bytes,
                m.gpu_instance_id,
                m.compute_instance_id,
            )
            .collect::<Vec<_>>()
        };
        match self.mig(d) {
            Some(m) => mig(m),
            None => {
                let g = self.gpu(d.gpu);
                let mut all: Vec<Process> =
                    share(&g.pids, g.mem_used_bytes, NO_INSTANCE, NO_INSTANCE).collect();
                for m in g.mig.iter().filter(|m| m.exists(now_ns)) {
                    all.extend(mig(m));
                }
                all
            }
        }
    }

    /// The GPM metrics of a whole GPU (`instance` None) or of one GPU instance:
    /// NOT_FOUND for an unknown instance, NOT_SUPPORTED when it has no [gpm] table.
    pub fn gpm(&self, gpu: usize, instance: Option<u32>, now_ns: u64) -> Result<&GpmSpec, Code> {
        let g = self.gpu(gpu);
        let spec = match instance {
            None => g.gpm.as_ref(),
            Some(id) => g
                .mig
                .iter()
                .find(|m| m.gpu_instance_id == id && m.exists(now_ns))
                .ok_or(NOT_FOUND)?
                .gpm
                .as_ref(),
        };
        spec.ok_or(NOT_SUPPORTED)
    }

    /// nvmlGpmQueryDeviceSupport: GPM on the GPU or on any of its instances.
    pub fn gpm_supported(&self, gpu: usize) -> bool {
        let g = self.gpu(gpu);
        g.gpm.is_some() || g.mig.iter().any(|m| m.gpm.is_some())
    }
}

/// One event set: which GPUs' events it wants, and which it has delivered.
#[derive(Debug, Default)]
pub struct EventSet {
    /// GPU index -> registered event type mask.
    registered: HashMap<usize, u64>,
    /// (GPU index, index into its events) already delivered.
    delivered: HashSet<(usize, usize)>,
}

impl EventSet {
    pub fn register(&mut self, gpu: usize, mask: u64) {
        *self.registered.entry(gpu).or_default() |= mask;
    }

    /// Registered, undelivered events: (at_ms, GPU index, event index), earliest first.
    fn pending(&self, model: &Model) -> Vec<(u64, usize, usize)> {
        let mut out = Vec::new();
        for (&gpu, &mask) in &self.registered {
            for (i, e) in model.gpu(gpu).events.iter().enumerate() {
                if e.kind.mask() & mask != 0 && !self.delivered.contains(&(gpu, i)) {
                    out.push((e.at_ms, gpu, i));
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// The earliest pending event that is due by `now_ns`, now marked delivered.
    pub fn take_due(&mut self, model: &Model, now_ns: u64) -> Option<Event> {
        let &(at_ms, gpu, i) = self.pending(model).first()?;
        if at_ms.saturating_mul(NS_PER_MS) > now_ns {
            return None;
        }
        self.delivered.insert((gpu, i));
        let e = &model.gpu(gpu).events[i];
        Some(Event {
            gpu,
            event_type: e.kind.mask(),
            data: e.data,
        })
    }

    /// When (ns after init) the next pending event falls due, if any is left.
    pub fn next_due_ns(&self, model: &Model) -> Option<u64> {
        self.pending(model)
            .first()
            .map(|&(at_ms, _, _)| at_ms.saturating_mul(NS_PER_MS))
    }
}

/// An opaque nvmlGpmSample_t.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GpmSample {
    pub taken: Option<Taken>,
}

/// What a filled GPM sample records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub gpu: usize,
    /// The GPU instance for nvmlGpmMigSampleGet; None for the whole GPU.
    pub instance: Option<u32>,
    /// Order of sampling within this init: strictly increasing.
    pub seq: u64,
    pub at_ns: u64,
}

/// nvmlGpmMetricsGet: (nvmlReturn, value) per requested metric id. Both samples must be
/// filled, from the same GPU and instance, the second taken after the first.
pub fn gpm_metrics(
    model: &Model,
    first: &GpmSample,
    second: &GpmSample,
    ids: &[u32],
) -> Result<Vec<(Code, f64)>, Code> {
    let (Some(a), Some(b)) = (first.taken, second.taken) else {
        return Err(INVALID_ARG);
    };
    if a.gpu != b.gpu || a.instance != b.instance || b.seq <= a.seq {
        return Err(INVALID_ARG);
    }
    let spec = model.gpm(a.gpu, a.instance, b.at_ns)?;
    Ok(ids
        .iter()
        .map(|&id| match spec.metric(id) {
            Some(v) => (SUCCESS, v),
            None => (NOT_SUPPORTED, 0.0),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = NS_PER_MS;

    fn model(toml: &str) -> Model {
        Model::new(Scenario::from_toml(toml).unwrap(), 7)
    }

    #[test]
    fn energy_counts_from_start_and_restarts_at_reload() {
        let m = model(
            "[[gpu]]\nuuid = \"a\"\npower_w = 350.0\nenergy_start_mj = 1000000\n\
             [[gpu]]\nuuid = \"b\"\npower_w = 350.0\nenergy_start_mj = 1000000\nreload_at_ms = 500\n",
        );
        assert_eq!(m.energy_mj(0, 0), 1_000_000);
        // 350 W for 1 ms = 350 mJ; for 1 ns, still under 1 mJ.
        assert_eq!(m.energy_mj(0, MS), 1_000_350);
        assert_eq!(m.energy_mj(0, 1), 1_000_000);
        assert_eq!(m.energy_mj(0, 2_000 * MS), 1_700_000);
        // Exact over a long run: 350 W for 10 days.
        let ten_days = 10 * 86_400 * 1_000 * MS;
        assert_eq!(
            m.energy_mj(0, ten_days),
            1_000_000 + 350 * 10 * 86_400 * 1_000
        );

        assert_eq!(m.energy_mj(1, 499 * MS), 1_000_000 + 350 * 499);
        assert_eq!(m.energy_mj(1, 500 * MS), 0);
        assert_eq!(m.energy_mj(1, 600 * MS), 35_000);

        let mut last = 0;
        for t in (0..400 * MS).step_by(999_983) {
            let e = m.energy_mj(0, t);
            assert!(e >= last);
            last = e;
        }
    }

    #[test]
    fn power_rounds_to_milliwatts() {
        let m = model("[[gpu]]\nuuid = \"a\"\npower_w = 123.4567\npower_limit_w = 700.0\n");
        assert_eq!(m.power_mw(0), 123_457);
        assert_eq!(m.power_limit_mw(0), 700_000);
    }

    #[test]
    fn a_lost_gpu_and_its_mig_devices_answer_lost() {
        let mut m = model(
            "[[gpu]]\nuuid = \"a\"\nlost_at_ms = 800\n\
             [[gpu.mig]]\nuuid = \"m\"\ngpu_instance_id = 1\n",
        );
        let gpu = DevRef::gpu(0);
        let mig = DevRef {
            gpu: 0,
            mig: Some(0),
        };
        assert_eq!(
            m.gate("nvmlDeviceGetPowerUsage", gpu, 799 * MS),
            Gate::Proceed
        );
        assert_eq!(m.gate("nvmlDeviceGetUUID", mig, 799 * MS), Gate::Proceed);
        for t in [800 * MS, 10_000 * MS] {
            assert_eq!(
                m.gate("nvmlDeviceGetPowerUsage", gpu, t),
                Gate::Fail(GPU_IS_LOST)
            );
            assert_eq!(m.gate("nvmlDeviceGetUUID", mig, t), Gate::Fail(GPU_IS_LOST));
        }
    }

    #[test]
    fn a_hang_happens_once_at_or_after_its_time() {
        let mut m = model(
            "[[gpu]]\nuuid = \"a\"\nhang_at_ms = 300\nhang_for_ms = 2000\n[[gpu]]\nuuid = \"b\"\n",
        );
        let f = "nvmlDeviceGetTemperature";
        assert_eq!(m.gate(f, DevRef::gpu(0), 299 * MS), Gate::Proceed);
        assert_eq!(m.gate(f, DevRef::gpu(1), 400 * MS), Gate::Proceed);
        assert_eq!(
            m.gate(f, DevRef::gpu(0), 450 * MS),
            Gate::Hang(Duration::from_secs(2))
        );
        assert_eq!(m.gate(f, DevRef::gpu(0), 451 * MS), Gate::Proceed);
        assert_eq!(
            m.gate("nvmlDeviceGetName", DevRef::gpu(0), 5_000 * MS),
            Gate::Proceed
        );
    }

    #[test]
    fn not_supported_failing_and_mig_restrictions() {
        let mut m = model(
            "[[gpu]]\nuuid = \"a\"\nnot_supported = [\"nvmlDeviceGetFieldValues\"]\n\
             failing = [\"nvmlDeviceGetClockInfo\"]\n[[gpu.mig]]\nuuid = \"m\"\ngpu_instance_id = 1\n",
        );
        let gpu = DevRef::gpu(0);
        let mig = DevRef {
            gpu: 0,
            mig: Some(0),
        };
        assert_eq!(
            m.gate("nvmlDeviceGetFieldValues", gpu, 0),
            Gate::Fail(NOT_SUPPORTED)
        );
        assert_eq!(
            m.gate("nvmlDeviceGetClockInfo", gpu, 0),
            Gate::Fail(UNKNOWN)
        );
        assert_eq!(m.gate("nvmlDeviceGetPowerUsage", gpu, 0), Gate::Proceed);
        assert_eq!(
            m.gate("nvmlDeviceGetPowerUsage", mig, 0),
            Gate::Fail(NOT_SUPPORTED)
        );
        assert_eq!(m.gate("nvmlDeviceGetMemoryInfo_v2", mig, 0), Gate::Proceed);
        // The parent's failing list applies to its MIG devices too.
        assert_eq!(
            m.gate("nvmlDeviceGetClockInfo", mig, 0),
            Gate::Fail(UNKNOWN)
        );
    }

    #[test]
    fn handles_round_trip_and_stale_ones_do_not_resolve() {
        let m = model(
            "[[gpu]]\nuuid = \"a\"\n[[gpu]]\nuuid = \"b\"\n\
             [[gpu.mig]]\nuuid = \"m\"\ngpu_instance_id = 1\n",
        );
        for d in [
            DevRef::gpu(0),
            DevRef::gpu(1),
            DevRef {
                gpu: 1,
                mig: Some(0),
            },
        ] {
            let h = m.handle(d);
            assert_ne!(h, 0);
            assert_eq!(m.device(h), Some(d));
        }
        assert_eq!(m.device(0), None);
        assert_eq!(
            m.device(m.handle(DevRef::gpu(1)) + 2),
            None,
            "no second MIG device"
        );
        assert_eq!(m.device(m.handle(DevRef::gpu(2))), None, "no third GPU");
        let later = Model::new(m.scenario.clone(), 8);
        assert_eq!(later.device(m.handle(DevRef::gpu(0))), None);
    }

    #[test]
    fn events_come_in_time_order_once_per_set() {
        let m = model(
            r#"
[[gpu]]
uuid = "a"
[[gpu.event]]
at_ms = 300
type = "xid"
data = 79
[[gpu.event]]
at_ms = 100
type = "xid"
data = 13
[[gpu.event]]
at_ms = 50
type = "clock"
[[gpu]]
uuid = "b"
[[gpu.event]]
at_ms = 200
type = "double_bit_ecc"
data = 1
"#,
        );
        let xid = u64::from(b::nvmlEventTypeXidCriticalError);
        let dbe = u64::from(b::nvmlEventTypeDoubleBitEccError);
        let mut set = EventSet::default();
        assert_eq!(set.take_due(&m, u64::MAX), None, "nothing registered");
        set.register(0, xid);
        set.register(1, dbe);
        assert_eq!(
            set.next_due_ns(&m),
            Some(100 * MS),
            "the clock event is not registered"
        );
        assert_eq!(set.take_due(&m, 99 * MS), None);
        let got: Vec<_> = std::iter::from_fn(|| set.take_due(&m, 1_000 * MS)).collect();
        assert_eq!(
            got,
            [
                Event {
                    gpu: 0,
                    event_type: xid,
                    data: 13
                },
                Event {
                    gpu: 1,
                    event_type: dbe,
                    data: 1
                },
                Event {
                    gpu: 0,
                    event_type: xid,
                    data: 79
                },
            ]
        );
        assert_eq!(set.next_due_ns(&m), None);

        // Another set gets its own copy of each event.
        let mut other = EventSet::default();
        other.register(0, SUPPORTED_EVENTS);
        assert_eq!(other.take_due(&m, 60 * MS).map(|e| e.data), Some(0));
        assert_eq!(
            other.take_due(&m, 60 * MS),
            None,
            "the xid at 100 ms is not due"
        );
        assert_eq!(other.next_due_ns(&m), Some(100 * MS));
    }

    #[test]
    fn gpm_metrics_fill_each_slot() {
        let m = model(
            "[[gpu]]\nuuid = \"a\"\n[gpu.gpm]\nsm_util = 60.0\npcie_rx_per_sec = 200.0\n\
             [[gpu.mig]]\nuuid = \"m\"\ngpu_instance_id = 3\n[gpu.mig.gpm]\nsm_util = 90.0\n\
             [[gpu]]\nuuid = \"b\"\n",
        );
        let sample = |seq, instance| GpmSample {
            taken: Some(Taken {
                gpu: 0,
                instance,
                seq,
                at_ns: seq * MS,
            }),
        };
        let got = gpm_metrics(&m, &sample(1, None), &sample(2, None), &[2, 3, 21]).unwrap();
        assert_eq!(
            got,
            [(SUCCESS, 60.0), (NOT_SUPPORTED, 0.0), (SUCCESS, 200.0)]
        );
        let got = gpm_metrics(&m, &sample(1, Some(3)), &sample(2, Some(3)), &[2, 21]).unwrap();
        assert_eq!(got, [(SUCCESS, 90.0), (NOT_SUPPORTED, 0.0)]);

        let empty = GpmSample::default();
        for (a, b) in [
            (sample(1, None), empty),
            (sample(2, None), sample(1, None)),
            (sample(1, None), sample(1, None)),
            (sample(1, None), sample(2, Some(3))),
        ] {
            assert_eq!(gpm_metrics(&m, &a, &b, &[2]), Err(INVALID_ARG));
        }
        assert_eq!(m.gpm(0, Some(4), 0).err(), Some(NOT_FOUND));
        assert_eq!(m.gpm(1, None, 0).err(), Some(NOT_SUPPORTED));
        assert!(m.gpm_supported(0));
        assert!(!m.gpm_supported(1));
    }

    #[test]
    fn violation_time_is_the_fraction_of_time_since_init() {
        let m =
            model("[[gpu]]\nuuid = \"a\"\npower_capped_fraction = 0.25\nthermal_fraction = 0.5\n");
        assert_eq!(m.violation_ns(0, 0, 4_000 * MS), Ok(1_000 * MS));
        assert_eq!(m.violation_ns(0, 1, 4_000 * MS), Ok(2_000 * MS));
        assert_eq!(m.violation_ns(0, 3, 4_000 * MS), Ok(0));
        assert_eq!(m.violation_ns(0, 12, 4_000 * MS), Err(INVALID_ARG));
    }

    #[test]
    fn processes_split_memory_and_carry_instance_ids() {
        let m = model(
            "[[gpu]]\nuuid = \"a\"\npids = [10, 11]\nmem_used_bytes = 1000\n\
             [[gpu.mig]]\nuuid = \"m\"\ngpu_instance_id = 2\ncompute_instance_id = 1\n\
             pids = [20]\nmem_used_bytes = 64\n",
        );
        let p = m.processes(DevRef::gpu(0), 0);
        assert_eq!(p.iter().map(|p| p.pid).collect::<Vec<_>>(), [10, 11, 20]);
        assert_eq!(p[0].used_bytes, 500);
        assert_eq!(p[0].gpu_instance_id, NO_INSTANCE);
        assert_eq!((p[2].gpu_instance_id, p[2].compute_instance_id), (2, 1));
        let p = m.processes(
            DevRef {
                gpu: 0,
                mig: Some(0),
            },
            0,
        );
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].used_bytes, 64);
        assert_eq!(
            m.name(DevRef {
                gpu: 0,
                mig: Some(0)
            }),
            "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
        );
        assert_eq!(
            m.memory(DevRef {
                gpu: 0,
                mig: Some(0)
            }),
            (40192 << 20, 64)
        );
    }

    #[test]
    fn a_mig_instance_answers_only_while_it_exists() {
        let mut m = model(
            "[[gpu]]\nuuid = \"a\"\n\
             [[gpu.mig]]\nuuid = \"old\"\ngpu_instance_id = 1\nuntil_ms = 500\npids = [20]\n[gpu.mig.gpm]\nsm_util = 1.0\n\
             [[gpu.mig]]\nuuid = \"new\"\ngpu_instance_id = 2\nfrom_ms = 500\npids = [30]\n[gpu.mig.gpm]\nsm_util = 1.0\n",
        );
        let (old, new) = (
            DevRef {
                gpu: 0,
                mig: Some(0),
            },
            DevRef {
                gpu: 0,
                mig: Some(1),
            },
        );
        let pids = |m: &Model, t| {
            m.processes(DevRef::gpu(0), t)
                .iter()
                .map(|p| p.pid)
                .collect::<Vec<_>>()
        };
        assert_eq!(m.gate("nvmlDeviceGetUUID", old, 499 * MS), Gate::Proceed);
        assert_eq!(
            m.gate("nvmlDeviceGetUUID", new, 499 * MS),
            Gate::Fail(INVALID_ARG)
        );
        assert_eq!(
            (pids(&m, 499 * MS), m.gpm(0, Some(2), 499 * MS).err()),
            (vec![20], Some(NOT_FOUND))
        );
        assert_eq!(
            m.gate("nvmlDeviceGetUUID", old, 500 * MS),
            Gate::Fail(INVALID_ARG)
        );
        assert_eq!(m.gate("nvmlDeviceGetUUID", new, 500 * MS), Gate::Proceed);
        assert_eq!(
            (pids(&m, 500 * MS), m.gpm(0, Some(1), 500 * MS).err()),
            (vec![30], Some(NOT_FOUND))
        );
        assert!(m.gpm(0, Some(2), 500 * MS).is_ok());
    }
}
