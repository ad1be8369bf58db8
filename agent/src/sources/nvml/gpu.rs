//! One GPU read through NVML: every field, with what it needs from the previous reading
//! (violation counters, the last GPM sample). Runs on the NVML thread only.

use nodewatt_wire::{Gpm, Gpu, MigDevice};
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PerformancePolicy, TemperatureSensor,
};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::gpm::{gpm_metrics_get, GpmSample};
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::{Device, Nvml};

use super::span::{self, advance_ms, Reading};
use super::TickMs;

/// NVML_FI_DEV_MEMORY_TEMP: HBM temperature, only available through field values.
const FI_DEV_MEMORY_TEMP: u32 = 82;

/// GPM metrics asked for, in the order of [`nodewatt_wire::Gpm::fields_mut`].
const GPM_METRICS: [GpmMetricId; 8] = [
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::DramBwUtil,
    GpmMetricId::PcieTxPerSec,
    GpmMetricId::PcieRxPerSec,
    GpmMetricId::NvlinkTotalTxPerSec,
    GpmMetricId::NvlinkTotalRxPerSec,
];

/// GPM metrics are averages between two samples; closer samples say little and cost a
/// sample each, so at faster intervals one GPM span covers several agent samples.
pub const GPM_MIN_SPAN_MS: u64 = 100;

/// How often the MIG layout is read again: instances are destroyed and created while the
/// agent runs (between jobs), and a job on an instance the agent does not know is billed
/// nothing. A MIG device that answers as destroyed, or names another UUID (NVML may reuse
/// a handle), has the layout read at the next sample.
pub const MIG_RESCAN_MS: u64 = 10_000;

/// Whether the MIG layout last read at `last` is read again at `at`: every
/// [`MIG_RESCAN_MS`], when one of its devices is `gone`, and after the clock stepped back.
fn mig_due(last: TickMs, at: TickMs, gone: bool) -> bool {
    gone || at < last || at - last >= MIG_RESCAN_MS
}

pub struct GpuReader<'n> {
    device: Device<'n>,
    /// Identity, read once: UUID, PCI bus id and model never change while loaded.
    pub ident: Gpu,
    /// `None` where the GPU has no GPM (before Hopper, or a driver without it).
    gpm: GpmState<'n>,
    power_capped: Option<Reading>,
    thermal_capped: Option<Reading>,
    mig: Vec<MigReader<'n>>,
    /// The tick the MIG layout was last read at (`None`: at start, before any tick).
    mig_read_at: Option<TickMs>,
    /// MIG devices (UUIDs) that answered as destroyed or reused: the layout is read at
    /// the next sample.
    mig_gone: Vec<String>,
    /// Such devices whose reading of the layout found it unchanged: until the next
    /// periodic reading their answers are their errors, not a reason to read the layout
    /// on every sample.
    mig_gone_unchanged: Vec<String>,
    /// What the last reading of the layout could not use, said when it changes.
    mig_problems: Vec<String>,
}

/// Where one GPU's readings go, and whether a call said the GPU is gone.
struct Fields<'a> {
    g: &'a mut Gpu,
}

impl Fields<'_> {
    /// Keeps a value. "Not supported" (and a function this driver's library lacks) is
    /// silently absent; a lost GPU is said once by `lost`; any other failure is named in
    /// `errors`.
    fn take<T>(&mut self, name: &str, r: Result<T, NvmlError>) -> Option<T> {
        self.take_in("", name, r)
    }

    /// [`Fields::take`] for a part of the GPU (`what`: e.g. `"mig 1 "`); the error's name
    /// is only put together when there is an error.
    fn take_in<T>(&mut self, what: &str, name: &str, r: Result<T, NvmlError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => None,
            Err(NvmlError::GpuLost) => {
                self.g.lost = true;
                None
            }
            Err(e) => {
                self.g.errors.push(format!("{what}{name}: {e}"));
                None
            }
        }
    }
}

pub fn sample_value_f64(v: &SampleValue) -> f64 {
    match *v {
        SampleValue::F64(x) => x,
        SampleValue::U32(x) => f64::from(x),
        SampleValue::U64(x) => x as f64,
        SampleValue::I64(x) => x as f64,
    }
}

fn memory_temp(d: &Device<'_>) -> Result<f64, NvmlError> {
    let mut values = d.field_values_for(&[FieldId(FI_DEV_MEMORY_TEMP)])?;
    let sample: FieldValueSample = values.pop().ok_or(NvmlError::NotSupported)??;
    Ok(sample_value_f64(&sample.value?))
}

impl<'n> GpuReader<'n> {
    pub fn new(
        nvml: &'n Nvml,
        device: Device<'n>,
        index: u32,
        problems: &mut Vec<String>,
    ) -> GpuReader<'n> {
        let clean = |r: Result<String, NvmlError>, fallback: &str| {
            crate::sysfs::clean_name(&r.unwrap_or_default(), fallback)
        };
        let mut ident = Gpu {
            index,
            uuid: clean(device.uuid(), &format!("GPU-unknown-{index}")),
            pci_bus_id: clean(device.pci_info().map(|p| p.bus_id), "unknown"),
            model: clean(device.name(), "unknown"),
            ..Gpu::default()
        };
        let has_gpm = matches!(device.gpm_support(), Ok(true));
        let mut mig_problems = Vec::new();
        let mig = find_mig(nvml, &device, has_gpm, &mut mig_problems);
        problems.extend(mig_problems.iter().cloned());
        ident.mig_slices = mig_slices(&device, &mig, problems);
        GpuReader {
            device,
            ident,
            gpm: has_gpm.then_some(None),
            power_capped: None,
            thermal_capped: None,
            mig,
            mig_read_at: None,
            mig_gone: Vec::new(),
            mig_gone_unchanged: Vec::new(),
            mig_problems,
        }
    }

    /// Reads the MIG layout again; a changed one replaces the old (instances that stayed
    /// keep their GPM baseline) and is logged, as are new problems.
    fn reread_mig(&mut self, nvml: &'n Nvml, at: TickMs) {
        self.mig_read_at = Some(at);
        let gone = std::mem::take(&mut self.mig_gone);
        let index = self.ident.index;
        let mut problems = Vec::new();
        let mut found = find_mig(nvml, &self.device, self.gpm.is_some(), &mut problems);
        let same = found.len() == self.mig.len()
            && found.iter().zip(&self.mig).all(|(a, b)| a.ident == b.ident);
        self.mig_gone_unchanged = if same { gone } else { Vec::new() };
        if !same {
            for new in &mut found {
                if let Some(old) = self.mig.iter_mut().find(|o| o.ident == new.ident) {
                    new.gpm = old.gpm.take();
                }
            }
            let mut slice_problems = Vec::new();
            self.ident.mig_slices = mig_slices(&self.device, &found, &mut slice_problems);
            let names = |m: &[MigReader<'_>]| {
                if m.is_empty() {
                    return "none".to_string();
                }
                let v: Vec<String> = m
                    .iter()
                    .map(|m| {
                        format!(
                            "{} (GPU instance {})",
                            m.ident.uuid, m.ident.gpu_instance_id
                        )
                    })
                    .collect();
                v.join(", ")
            };
            tracing::info!(
                "GPU {index}: MIG layout changed from {} to {}",
                names(&self.mig),
                names(&found)
            );
            for p in slice_problems {
                tracing::warn!("GPU {index}: {p}");
            }
            self.mig = found;
        }
        if problems != self.mig_problems {
            for p in &problems {
                tracing::warn!("GPU {index}: {p}");
            }
            self.mig_problems = problems;
        }
    }

    pub fn device(&self) -> &Device<'n> {
        &self.device
    }

    pub fn has_gpm(&self) -> bool {
        self.gpm.is_some()
    }

    pub fn mig_devices(&self) -> usize {
        self.mig.len()
    }

    /// All fields at tick `at`; `prev_tick` is the sample before, for per-span values.
    pub fn read(
        &mut self,
        nvml: &'n Nvml,
        at: TickMs,
        prev_tick: Option<TickMs>,
        processes: bool,
    ) -> Gpu {
        let mut g = self.ident.clone();
        let d = &self.device;
        let mut f = Fields { g: &mut g };
        // The first call tells whether the GPU is there: a lost one answers each call
        // after a wait, and one word says it all.
        let power = f.take("power", d.power_usage());
        if f.g.lost {
            self.forget();
            return g;
        }
        f.g.power_w = power.map(|mw| f64::from(mw) / 1000.0);
        f.g.energy_mj = f.take("energy", d.total_energy_consumption());
        f.g.power_limit_w = match f.take("power_limit", d.enforced_power_limit()) {
            Some(mw) if mw <= 10_000_000 => Some(f64::from(mw) / 1000.0),
            Some(mw) => {
                f.g.errors
                    .push(format!("power_limit: {mw} mW is not a board's"));
                None
            }
            None => None,
        };
        f.g.temp_c = f
            .take("temperature", d.temperature(TemperatureSensor::Gpu))
            .map(f64::from);
        f.g.mem_temp_c = f.take("memory_temperature", memory_temp(d));
        if let Some(u) = f.take("utilization", d.utilization_rates()) {
            f.g.util_pct = Some(f64::from(u.gpu));
            f.g.mem_util_pct = Some(f64::from(u.memory));
        }
        if let Some(m) = f.take("memory_info", d.memory_info()) {
            f.g.mem_used_bytes = Some(m.used);
            f.g.mem_total_bytes = Some(m.total);
        }
        f.g.sm_clock_mhz = f.take("sm_clock", d.clock_info(Clock::SM));
        f.g.mem_clock_mhz = f.take("memory_clock", d.clock_info(Clock::Memory));
        f.g.clock_event_reasons = f
            .take("clock_event_reasons", d.current_throttle_reasons())
            .map(|r| r.bits());
        f.g.ecc_corrected = f.take(
            "ecc_corrected",
            d.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate),
        );
        f.g.ecc_uncorrected = f.take(
            "ecc_uncorrected",
            d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate),
        );
        if processes {
            if let Some(ps) = f.take("processes", d.running_compute_processes()) {
                f.g.pids = ps.iter().map(|p| p.pid).collect();
            }
        }
        let power_capped = f.take("power_capped", d.violation_status(PerformancePolicy::Power));
        let thermal_capped = f.take(
            "thermal_capped",
            d.violation_status(PerformancePolicy::Thermal),
        );
        for (reading, last, out) in [
            (
                power_capped,
                &mut self.power_capped,
                &mut f.g.power_capped_ms,
            ),
            (
                thermal_capped,
                &mut self.thermal_capped,
                &mut f.g.thermal_capped_ms,
            ),
        ] {
            let cur = reading.map(|v| Reading {
                at,
                ns: v.violation_time,
                ref_us: v.reference_time,
            });
            *out = cur.and_then(|c| advance_ms(*last, prev_tick, c));
            *last = cur;
        }
        f.g.gpm = read_gpm(nvml, || d.gpm_sample(), &mut self.gpm, at, "", &mut f);
        let last = *self.mig_read_at.get_or_insert(at);
        if mig_due(last, at, !self.mig_gone.is_empty()) {
            self.reread_mig(nvml, at);
        }
        let d = &self.device;
        // `g` was copied from `ident` before the layout may have been read again.
        f.g.mig_slices = self.ident.mig_slices;
        for m in &mut self.mig {
            let mut ident = m.ident.clone();
            let mem = m.device.memory_info();
            // A handle to a destroyed instance answers as no device; NVML may reuse a
            // handle for a new instance, which then names another UUID.
            let gone = matches!(mem, Err(NvmlError::InvalidArg | NvmlError::NotFound))
                || m.device
                    .uuid()
                    .is_ok_and(|u| crate::sysfs::clean_name(&u, "MIG-unknown") != m.ident.uuid);
            if gone && !self.mig_gone_unchanged.contains(&m.ident.uuid) {
                self.mig_gone.push(m.ident.uuid.clone());
            }
            if let Some(mem) = f.take_in(&m.what, "memory_info", mem) {
                ident.mem_used_bytes = Some(mem.used);
                ident.mem_total_bytes = Some(mem.total);
            }
            let gi = ident.gpu_instance_id;
            ident.gpm = read_gpm(
                nvml,
                || d.gpm_mig_sample(gi),
                &mut m.gpm,
                at,
                &m.what,
                &mut f,
            );
            f.g.mig.push(ident);
        }
        if g.lost {
            self.forget();
        }
        nodewatt_wire::cap_errors(&mut g.errors);
        g
    }

    /// A lost GPU's per-span baselines are void: its counters may restart.
    fn forget(&mut self) {
        self.power_capped = None;
        self.thermal_capped = None;
        for state in std::iter::once(&mut self.gpm).chain(self.mig.iter_mut().map(|m| &mut m.gpm)) {
            if let Some(last) = state.as_mut() {
                *last = None;
            }
        }
    }
}

/// The last GPM sample of a GPU or GPU instance and its tick; `None` where there is no
/// GPM at all.
type GpmState<'n> = Option<Option<(TickMs, GpmSample<'n>)>>;

/// The metrics between the kept GPM sample and a new one, once the kept one is at least
/// [`GPM_MIN_SPAN_MS`] old; keeps the new one for the next span. `what` prefixes errors.
fn read_gpm<'n>(
    nvml: &'n Nvml,
    take: impl FnOnce() -> Result<GpmSample<'n>, NvmlError>,
    state: &mut GpmState<'n>,
    at: TickMs,
    what: &str,
    f: &mut Fields<'_>,
) -> Gpm {
    let mut out = Gpm::default();
    let Some(last) = state.as_mut() else {
        return out;
    };
    // (A clock stepped back past the kept sample takes a new one as the baseline.)
    if last
        .as_ref()
        .is_some_and(|(t, _)| at >= *t && at - *t < GPM_MIN_SPAN_MS)
    {
        return out;
    }
    let stepped_back = last.as_ref().is_some_and(|(t, _)| at < *t);
    let Some(now) = f.take_in(what, "gpm_sample", take()) else {
        *last = None;
        return out;
    };
    if let Some((_, before)) = last.take().filter(|_| !stepped_back) {
        let results = f.take_in(
            what,
            "gpm",
            gpm_metrics_get(nvml, &before, &now, &GPM_METRICS),
        );
        let names = Gpm::default().fields();
        for ((slot, result), (name, _)) in out
            .fields_mut()
            .into_iter()
            .zip(results.into_iter().flatten())
            .zip(names)
        {
            let m = match result {
                Ok(m) => m.value,
                Err(NvmlError::NotSupported) => continue,
                Err(e) => {
                    f.g.errors.push(format!("{what}gpm {name}: {e}"));
                    continue;
                }
            };
            *slot = match name.ends_with("_pct") {
                true => span::percent(m),
                false => span::rate(m),
            };
            if slot.is_none() {
                f.g.errors
                    .push(format!("{what}gpm {name}: {m} is out of range"));
            }
        }
    }
    *last = Some((at, now));
    out
}

/// One MIG device of a GPU: its identity, found at start, and its GPU instance's GPM.
pub struct MigReader<'n> {
    device: Device<'n>,
    ident: MigDevice,
    /// How its errors are named: `mig <gpu instance> `.
    what: String,
    gpm: GpmState<'n>,
}

/// The GPU instance (or, with `compute`, the compute instance) of a MIG device:
/// nvml-wrapper 0.13 does not wrap these two calls.
fn instance_id(nvml: &Nvml, d: &Device<'_>, compute: bool) -> Result<u32, NvmlError> {
    let lib = nvml.lib();
    let f = match compute {
        false => lib.nvmlDeviceGetGpuInstanceId.as_ref(),
        true => lib.nvmlDeviceGetComputeInstanceId.as_ref(),
    }
    .map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let mut id = 0;
    // SAFETY: a valid MIG device handle and a pointer to a c_uint, as nvml.h declares.
    nvml_wrapper::error::nvml_try(unsafe { f(d.handle(), &mut id) })?;
    Ok(id)
}

/// The MIG devices of a GPU in MIG mode, in NVML's order; none otherwise. Problems are
/// said in `problems`.
fn find_mig<'n>(
    nvml: &'n Nvml,
    parent: &Device<'n>,
    has_gpm: bool,
    problems: &mut Vec<String>,
) -> Vec<MigReader<'n>> {
    if !matches!(parent.mig_mode(), Ok(m) if m.current == 1) {
        return Vec::new();
    }
    let mut found = Vec::new();
    for i in 0..parent.mig_device_count().unwrap_or(0) {
        let d = match parent.mig_device_by_index(i) {
            Ok(d) => d,
            Err(NvmlError::NotFound) => continue,
            Err(e) => {
                problems.push(format!("MIG device {i}: {e}"));
                continue;
            }
        };
        let (Ok(uuid), Ok(gi)) = (d.uuid(), instance_id(nvml, &d, false)) else {
            problems.push(format!("MIG device {i}: no UUID or GPU instance"));
            continue;
        };
        let ci = instance_id(nvml, &d, true).unwrap_or(0);
        let attrs = d.attributes().ok();
        found.push(MigReader {
            what: format!("mig {gi} "),
            ident: MigDevice {
                uuid: crate::sysfs::clean_name(&uuid, "MIG-unknown"),
                gpu_instance_id: gi,
                compute_instance_id: ci,
                slices: attrs.map(|a| a.gpu_instance_slice_count),
                ..MigDevice::default()
            },
            device: d,
            gpm: has_gpm.then_some(None),
        });
    }
    found
}

/// Slices of the whole GPU in MIG mode: the largest GPU instance profile it supports
/// (read with the MIG layout when it changes). `None`, with the problem said, when no profile
/// answers or its instances would hold more than that.
fn mig_slices(
    device: &Device<'_>,
    mig: &[MigReader<'_>],
    problems: &mut Vec<String>,
) -> Option<u32> {
    if mig.is_empty() {
        return None;
    }
    // Profiles 0-6 are nvml.h's 1, 2, 3, 4, 7, 8 and 6-slice profiles; later ids are
    // variants (REV, GFX, media engines) of these sizes.
    let total = (0..=6)
        .filter_map(|p| device.profile_info(p).ok())
        .map(|info| info.slice_count)
        .max();
    let layout: Vec<MigDevice> = mig.iter().map(|m| m.ident.clone()).collect();
    match (total, nodewatt_wire::slices_held(&layout)) {
        (Some(total), Some(held))
            if held <= total && total as usize <= nodewatt_wire::check::MAX_MIG =>
        {
            Some(total)
        }
        (total, held) => {
            problems.push(format!(
                "MIG slices of the GPU unknown (profiles say {total:?}, instances hold {held:?}): \
                 its MIG devices share its energy without an idle part"
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mig_layout_is_read_again_every_10_s_at_once_when_a_device_is_gone() {
        let t = 1_763_700_000_000;
        assert!(!mig_due(t, t, false));
        assert!(!mig_due(t, t + MIG_RESCAN_MS - 1, false));
        assert!(mig_due(t, t + MIG_RESCAN_MS, false));
        assert!(mig_due(t, t + 100, true), "a destroyed instance");
        assert!(mig_due(t, t - 100, false), "the clock stepped back");
    }

    #[test]
    fn field_values_convert_to_f64() {
        assert_eq!(sample_value_f64(&SampleValue::U32(71)), 71.0);
        assert_eq!(sample_value_f64(&SampleValue::I64(-3)), -3.0);
        assert_eq!(sample_value_f64(&SampleValue::F64(1.5)), 1.5);
        assert_eq!(sample_value_f64(&SampleValue::U64(9)), 9.0);
    }

    #[test]
    fn unsupported_fields_are_absent_lost_said_once_other_failures_named() {
        let mut g = Gpu::default();
        let mut f = Fields { g: &mut g };
        assert_eq!(f.take("power", Ok(5u32)), Some(5));
        assert_eq!(f.take::<u32>("ecc", Err(NvmlError::NotSupported)), None);
        assert_eq!(
            f.take::<u32>("gpm", Err(NvmlError::FailedToLoadSymbol("x".into()))),
            None
        );
        assert!(f.g.errors.is_empty() && !f.g.lost);
        assert_eq!(f.take::<u32>("power", Err(NvmlError::GpuLost)), None);
        assert!(f.g.lost && f.g.errors.is_empty());
        assert_eq!(f.take::<u32>("clock", Err(NvmlError::Unknown)), None);
        assert_eq!(f.g.errors.len(), 1);
        assert!(f.g.errors[0].starts_with("clock: "), "{:?}", f.g.errors);
    }
}
