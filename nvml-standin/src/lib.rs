//! A stand-in for NVIDIA's libnvidia-ml.so: the real NVML C functions, struct layouts
//! (nvml-wrapper-sys's bindgen output of nvml.h) and return codes, answered from a
//! scenario file instead of a GPU. See README.md.
//!
//! Every exported function follows NVML's contract: pointer arguments are either null
//! (answered with NVML_ERROR_INVALID_ARGUMENT) or valid for the type they point to, and
//! handles are the ones this library handed out (others are refused). No panic crosses
//! the C boundary: each body runs under `catch_unwind` and a panic answers
//! NVML_ERROR_UNKNOWN.

// The exported names are NVML's, and their safety contract is the C API's (above).
#![allow(non_snake_case, clippy::missing_safety_doc)]

pub mod scenario;
pub mod state;

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, OsStr};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvml_wrapper_sys::bindings::{
    self as b, nvmlDeviceAttributes_t, nvmlDevice_t, nvmlEventData_t, nvmlEventSet_t,
    nvmlFieldValue_t, nvmlGpmMetricsGet_t, nvmlGpmSample_t, nvmlGpmSupport_t, nvmlMemory_v2_t,
    nvmlPciInfo_t, nvmlProcessInfo_t, nvmlReturn_t, nvmlUtilization_t, nvmlViolationTime_t,
};

use scenario::{InitError, Scenario};
use state::*;

/// Names the scenario file; without it, `nvml-standin.toml` next to this library.
pub const SCENARIO_ENV: &str = "NVML_STANDIN_SCENARIO";
pub const SCENARIO_FILE: &str = "nvml-standin.toml";

/// State from a successful nvmlInit until the matching nvmlShutdown.
struct Runtime {
    model: Model,
    /// Time zero of the scenario.
    start: Instant,
    /// The wall clock at time zero, in µs since the epoch: timestamps NVML pairs with a
    /// counter (violation status) are taken from the counter's own instant, as the
    /// driver's are, never from a second read of the clock.
    start_us: u64,
    /// nvmlInit calls not yet matched by nvmlShutdown (NVML reference-counts them).
    inits: u32,
    /// Live event sets and GPM samples, by the address handed out for each.
    event_sets: HashMap<usize, Box<EventSet>>,
    samples: HashMap<usize, Box<GpmSample>>,
    sample_seq: u64,
}

impl Runtime {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn device_handle(&self, d: DevRef) -> nvmlDevice_t {
        ptr::without_provenance_mut(self.model.handle(d))
    }
}

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
/// Counts successful initialisations, so that handles from an earlier one are refused.
static GENERATION: AtomicU32 = AtomicU32::new(0);

fn lock() -> MutexGuard<'static, Option<Runtime>> {
    RUNTIME.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs an exported function's body; a panic becomes NVML_ERROR_UNKNOWN.
fn ffi(body: impl FnOnce() -> nvmlReturn_t) -> nvmlReturn_t {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(UNKNOWN)
}

/// A call that needs nvmlInit but no particular GPU.
fn initialized(body: impl FnOnce(&mut Runtime) -> nvmlReturn_t) -> nvmlReturn_t {
    ffi(|| match lock().as_mut() {
        Some(rt) => body(rt),
        None => UNINITIALIZED,
    })
}

/// A call on one GPU: `target` finds the device (or refuses the arguments), then the
/// scenario's lost / hang / not_supported / failing rules for `func` apply, then `body`
/// answers. A hang sleeps with the lock released, then the rules are asked again.
fn on_gpu(
    func: &'static str,
    target: impl Fn(&Runtime) -> Result<DevRef, nvmlReturn_t>,
    body: impl FnOnce(&mut Runtime, DevRef, u64) -> nvmlReturn_t,
) -> nvmlReturn_t {
    ffi(|| {
        let mut guard = lock();
        loop {
            let Some(rt) = guard.as_mut() else {
                return UNINITIALIZED;
            };
            let d = match target(rt) {
                Ok(d) => d,
                Err(code) => return code,
            };
            let now = rt.now_ns();
            match rt.model.gate(func, d, now) {
                Gate::Proceed => return body(rt, d, now),
                Gate::Fail(code) => return code,
                Gate::Hang(duration) => {
                    drop(guard);
                    std::thread::sleep(duration);
                    guard = lock();
                }
            }
        }
    })
}

/// `on_gpu` for functions whose first argument is a device handle.
fn on_device(
    func: &'static str,
    device: nvmlDevice_t,
    body: impl FnOnce(&mut Runtime, DevRef, u64) -> nvmlReturn_t,
) -> nvmlReturn_t {
    let handle = device.addr();
    on_gpu(
        func,
        move |rt| rt.model.device(handle).ok_or(INVALID_ARG),
        body,
    )
}

/// Writes `value` through `out`, unless it is null.
unsafe fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return INVALID_ARG;
    }
    out.write(value);
    SUCCESS
}

/// Copies `s` and its terminating NUL into a caller's buffer of `len` bytes.
unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> nvmlReturn_t {
    if buf.is_null() {
        return INVALID_ARG;
    }
    if (len as usize) <= s.len() {
        return INSUFFICIENT_SIZE;
    }
    ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
    buf.add(s.len()).write(0);
    SUCCESS
}

/// Copies `s` into a fixed-size C char array, NUL-terminated and truncated to fit.
fn fill_chars<const N: usize>(dst: &mut [c_char; N], s: &str) {
    dst.fill(0);
    for (d, &c) in dst
        .iter_mut()
        .zip(s.as_bytes().iter().take(N.saturating_sub(1)))
    {
        *d = c as c_char;
    }
}

fn micros_since_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------
// Initialisation

/// The path this library was loaded from (dladdr on one of its own functions).
fn own_path() -> Option<PathBuf> {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let addr = own_path as fn() -> Option<PathBuf> as *const c_void;
    // SAFETY: dladdr only reads the address and fills `info`.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the dynamic loader.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(OsStr::from_bytes(name.to_bytes())))
}

fn scenario_path() -> PathBuf {
    if let Some(p) = std::env::var_os(SCENARIO_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let dir = own_path()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
    dir.join(SCENARIO_FILE)
}

fn init() -> nvmlReturn_t {
    ffi(|| {
        let mut guard = lock();
        if let Some(rt) = guard.as_mut() {
            rt.inits = rt.inits.saturating_add(1);
            return SUCCESS;
        }
        let path = scenario_path();
        let scenario = match Scenario::load(&path) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "nvml-standin: no usable scenario at {}: {e}",
                    path.display()
                );
                return DRIVER_NOT_LOADED;
            }
        };
        match scenario.init_error {
            Some(InitError::DriverNotLoaded) => return DRIVER_NOT_LOADED,
            Some(InitError::NoPermission) => return NO_PERMISSION,
            Some(InitError::Unknown) => return UNKNOWN,
            None => {}
        }
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        *guard = Some(Runtime {
            model: Model::new(scenario, generation),
            start: Instant::now(),
            start_us: micros_since_epoch(),
            inits: 1,
            event_sets: HashMap::new(),
            samples: HashMap::new(),
            sample_seq: 0,
        });
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init()
}

/// The flags (NO_GPUS, NO_ATTACH) change nothing here.
#[no_mangle]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init()
}

/// The last shutdown (one per init) drops all state: handles, event sets and samples.
#[no_mangle]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    ffi(|| {
        let mut guard = lock();
        let Some(rt) = guard.as_mut() else {
            return UNINITIALIZED;
        };
        rt.inits -= 1;
        if rt.inits == 0 {
            *guard = None;
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    catch_unwind(|| error_string(result).as_ptr()).unwrap_or(c"Unknown Error".as_ptr())
}

fn error_string(code: nvmlReturn_t) -> &'static CStr {
    match code {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        4 => c"Insufficient Permissions",
        5 => c"Already Initialized",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        8 => c"Insufficient External Power",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        11 => c"Interrupt request issue",
        12 => c"NVML Shared Library Not Found",
        13 => c"Function Not Found",
        14 => c"Corrupted infoROM",
        15 => c"GPU is lost",
        16 => c"GPU requires restart",
        17 => c"The operating system has blocked the request.",
        18 => c"RM has detected an NVML/RM version mismatch.",
        19 => c"In use by another client",
        20 => c"Insufficient Memory",
        21 => c"No data",
        22 => c"The requested vgpu operation is not available on target device, because ECC is enabled",
        23 => c"Insufficient resources for request",
        24 => c"Frequency not supported",
        25 => c"Argument version mismatch",
        26 => c"Deprecated",
        27 => c"Not Ready",
        28 => c"GPU not found",
        29 => c"Invalid state",
        30 => c"Reset type not supported",
        _ => c"Unknown Error",
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    initialized(|rt| put_str(version, length, rt.model.driver_version()))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(deviceCount: *mut c_uint) -> nvmlReturn_t {
    initialized(|rt| put(deviceCount, rt.model.gpu_count() as c_uint))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    on_gpu(
        "nvmlDeviceGetHandleByIndex_v2",
        |rt| {
            let i = index as usize;
            if i < rt.model.gpu_count() && !device.is_null() {
                Ok(DevRef::gpu(i))
            } else {
                Err(INVALID_ARG)
            }
        },
        |rt, d, _| put(device, rt.device_handle(d)),
    )
}

// ---------------------------------------------------------------------------------------
// Identity and readings

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetUUID", device, |rt, d, _| {
        put_str(uuid, length, rt.model.uuid(d))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetName", device, |rt, d, _| {
        put_str(name, length, &rt.model.name(d))
    })
}

/// A MIG device reports its parent's PCI location.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetPciInfo_v3", device, |rt, d, _| {
        let bus_id = rt.model.pci_bus_id(d.gpu);
        let Some((domain, bus, dev)) = scenario::parse_pci_bus_id(&bus_id) else {
            return UNKNOWN;
        };
        // SAFETY: nvmlPciInfo_t is plain old data; all zeroes is a valid value.
        let mut info: nvmlPciInfo_t = std::mem::zeroed();
        fill_chars(&mut info.busId, &bus_id);
        fill_chars(
            &mut info.busIdLegacy,
            &format!("{:04x}:{bus:02x}:{dev:02x}.0", domain & 0xFFFF),
        );
        info.domain = domain;
        info.bus = bus;
        info.device = dev;
        // An H100 SXM5's device and subsystem ids.
        info.pciDeviceId = 0x2330_10DE;
        info.pciSubSystemId = 0x16C1_10DE;
        put(pci, info)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetPowerUsage", device, |rt, d, _| {
        put(power, rt.model.power_mw(d.gpu))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    on_device(
        "nvmlDeviceGetTotalEnergyConsumption",
        device,
        |rt, d, now| put(energy, rt.model.energy_mj(d.gpu, now)),
    )
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetEnforcedPowerLimit", device, |rt, d, _| {
        put(limit, rt.model.power_limit_mw(d.gpu))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensorType: b::nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetTemperature", device, |rt, d, _| {
        if sensorType != b::nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU {
            return INVALID_ARG;
        }
        put(temp, rt.model.gpu(d.gpu).temp_c)
    })
}

/// Only NVML_FI_DEV_MEMORY_TEMP (82) is modelled; every other field id answers
/// NOT_SUPPORTED in its own entry.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    valuesCount: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetFieldValues", device, |rt, d, _| {
        if values.is_null() || valuesCount < 0 {
            return INVALID_ARG;
        }
        let entries = std::slice::from_raw_parts_mut(values, valuesCount as usize);
        let now = i64::try_from(micros_since_epoch()).unwrap_or(i64::MAX);
        for v in entries {
            v.timestamp = now;
            v.latencyUsec = 0;
            if v.fieldId == b::field_id::NVML_FI_DEV_MEMORY_TEMP {
                v.valueType = b::nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT;
                v.value.uiVal = rt.model.gpu(d.gpu).mem_temp_c;
                v.nvmlReturn = SUCCESS;
            } else {
                v.nvmlReturn = NOT_SUPPORTED;
            }
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetUtilizationRates", device, |rt, d, _| {
        let g = rt.model.gpu(d.gpu);
        let u = nvmlUtilization_t {
            gpu: g.util_gpu,
            memory: g.util_memory,
        };
        put(utilization, u)
    })
}

/// The version nvml.h's NVML_STRUCT_VERSION(Memory, 2) gives nvmlMemory_v2_t.
const MEMORY_V2_VERSION: c_uint = (std::mem::size_of::<nvmlMemory_v2_t>() | 2 << 24) as c_uint;

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetMemoryInfo_v2", device, |rt, d, _| {
        if memory.is_null() {
            return INVALID_ARG;
        }
        if (*memory).version != MEMORY_V2_VERSION {
            return VERSION_MISMATCH;
        }
        let (total, used) = rt.model.memory(d);
        let m = &mut *memory;
        m.total = total;
        m.reserved = 0;
        m.used = used;
        m.free = total.saturating_sub(used);
        SUCCESS
    })
}

/// Graphics answers the SM clock (they are one clock on data-centre GPUs); video is not
/// modelled.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    type_: b::nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetClockInfo", device, |rt, d, _| {
        let g = rt.model.gpu(d.gpu);
        let mhz = match type_ {
            b::nvmlClockType_enum_NVML_CLOCK_GRAPHICS | b::nvmlClockType_enum_NVML_CLOCK_SM => {
                g.sm_clock_mhz
            }
            b::nvmlClockType_enum_NVML_CLOCK_MEM => g.mem_clock_mhz,
            b::nvmlClockType_enum_NVML_CLOCK_VIDEO => return NOT_SUPPORTED,
            _ => return INVALID_ARG,
        };
        put(clock, mhz)
    })
}

/// Both names of the clock event (throttle) reasons call.
unsafe fn clocks_event_reasons(
    func: &'static str,
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    on_device(func, device, |rt, d, _| {
        put(reasons, rt.model.gpu(d.gpu).clocks_event_reasons)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    clocksThrottleReasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    clocks_event_reasons(
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        device,
        clocksThrottleReasons,
    )
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: nvmlDevice_t,
    clocksEventReasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    clocks_event_reasons(
        "nvmlDeviceGetCurrentClocksEventReasons",
        device,
        clocksEventReasons,
    )
}

/// Volatile and aggregate counters are the same: the scenario covers one boot.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    errorType: b::nvmlMemoryErrorType_t,
    counterType: b::nvmlEccCounterType_t,
    eccCounts: *mut c_ulonglong,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetTotalEccErrors", device, |rt, d, _| {
        if counterType != b::nvmlEccCounterType_enum_NVML_VOLATILE_ECC
            && counterType != b::nvmlEccCounterType_enum_NVML_AGGREGATE_ECC
        {
            return INVALID_ARG;
        }
        let g = rt.model.gpu(d.gpu);
        let count = match errorType {
            b::nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_CORRECTED => g.ecc_corrected,
            b::nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_UNCORRECTED => g.ecc_uncorrected,
            _ => return INVALID_ARG,
        };
        put(eccCounts, count)
    })
}

/// NVML's sizing protocol: a null or too-small buffer answers INSUFFICIENT_SIZE with
/// `*infoCount` set to the number needed (SUCCESS when there are none).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    infoCount: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    on_device(
        "nvmlDeviceGetComputeRunningProcesses_v3",
        device,
        |rt, d, now| {
            if infoCount.is_null() {
                return INVALID_ARG;
            }
            let procs = rt.model.processes(d, now);
            let room = *infoCount as usize;
            *infoCount = procs.len() as c_uint;
            if procs.is_empty() {
                return SUCCESS;
            }
            if infos.is_null() || room < procs.len() {
                return INSUFFICIENT_SIZE;
            }
            for (i, p) in procs.iter().enumerate() {
                infos.add(i).write(nvmlProcessInfo_t {
                    pid: p.pid,
                    usedGpuMemory: p.used_bytes,
                    gpuInstanceId: p.gpu_instance_id,
                    computeInstanceId: p.compute_instance_id,
                });
            }
            SUCCESS
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetViolationStatus(
    device: nvmlDevice_t,
    perfPolicyType: b::nvmlPerfPolicyType_t,
    violTime: *mut nvmlViolationTime_t,
) -> nvmlReturn_t {
    on_device(
        "nvmlDeviceGetViolationStatus",
        device,
        |rt, d, now| match rt.model.violation_ns(d.gpu, perfPolicyType, now) {
            Ok(ns) => put(
                violTime,
                nvmlViolationTime_t {
                    referenceTime: rt.start_us.saturating_add(now / 1_000),
                    violationTime: ns,
                },
            ),
            Err(code) => code,
        },
    )
}

// ---------------------------------------------------------------------------------------
// Events

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    eventTypes: *mut c_ulonglong,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetSupportedEventTypes", device, |_, _, _| {
        put(eventTypes, SUPPORTED_EVENTS)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    initialized(|rt| {
        if set.is_null() {
            return INVALID_ARG;
        }
        let mut boxed = Box::<EventSet>::default();
        let p: *mut EventSet = &mut *boxed;
        rt.event_sets.insert(p.addr(), boxed);
        put(set, p.cast())
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    eventTypes: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    on_device("nvmlDeviceRegisterEvents", device, |rt, d, _| {
        let Some(es) = rt.event_sets.get_mut(&set.addr()) else {
            return INVALID_ARG;
        };
        if eventTypes & !SUPPORTED_EVENTS != 0 {
            return NOT_SUPPORTED;
        }
        es.register(d.gpu, eventTypes);
        SUCCESS
    })
}

/// Delivers the earliest due, undelivered event of the set's registrations; waits for
/// one to fall due for up to `timeoutms`, then answers TIMEOUT.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeoutms: c_uint,
) -> nvmlReturn_t {
    ffi(|| {
        if data.is_null() {
            return INVALID_ARG;
        }
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeoutms));
        loop {
            let nap = {
                let mut guard = lock();
                let Some(rt) = guard.as_mut() else {
                    return UNINITIALIZED;
                };
                let now = rt.now_ns();
                let Runtime {
                    model, event_sets, ..
                } = rt;
                let Some(es) = event_sets.get_mut(&set.addr()) else {
                    return INVALID_ARG;
                };
                if let Some(e) = es.take_due(model, now) {
                    let event = nvmlEventData_t {
                        device: ptr::without_provenance_mut(model.handle(DevRef::gpu(e.gpu))),
                        eventType: e.event_type,
                        eventData: e.data,
                        gpuInstanceId: NO_INSTANCE,
                        computeInstanceId: NO_INSTANCE,
                    };
                    // SAFETY: checked non-null above; the caller owns the struct.
                    unsafe { data.write(event) };
                    return SUCCESS;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return TIMEOUT;
                }
                let until_due = es.next_due_ns(model).map_or(Duration::MAX, |at| {
                    Duration::from_nanos(at.saturating_sub(now))
                });
                // Short naps, so that a shutdown from another thread is noticed.
                left.min(until_due).min(Duration::from_millis(100))
            };
            std::thread::sleep(nap);
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    initialized(|rt| match rt.event_sets.remove(&set.addr()) {
        Some(_) => SUCCESS,
        None => INVALID_ARG,
    })
}

// ---------------------------------------------------------------------------------------
// MIG

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    currentMode: *mut c_uint,
    pendingMode: *mut c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetMigMode", device, |rt, d, _| {
        if currentMode.is_null() || pendingMode.is_null() {
            return INVALID_ARG;
        }
        let mode = c_uint::from(!rt.model.gpu(d.gpu).mig.is_empty());
        currentMode.write(mode);
        pendingMode.write(mode);
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetMaxMigDeviceCount", device, |rt, d, _| {
        let max = if rt.model.gpu(d.gpu).mig.is_empty() {
            0
        } else {
            scenario::MAX_MIG_DEVICES as c_uint
        };
        put(count, max)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    migDevice: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    on_device(
        "nvmlDeviceGetMigDeviceHandleByIndex",
        device,
        |rt, d, now| {
            let present = rt.model.gpu(d.gpu).mig.get(index as usize);
            if !present.is_some_and(|m| m.exists(now)) {
                return NOT_FOUND;
            }
            let mig = DevRef {
                gpu: d.gpu,
                mig: Some(index as usize),
            };
            put(migDevice, rt.device_handle(mig))
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: nvmlDevice_t,
    isMigDevice: *mut c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceIsMigDeviceHandle", device, |_, d, _| {
        put(isMigDevice, c_uint::from(d.mig.is_some()))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    migDevice: nvmlDevice_t,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    on_device(
        "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
        migDevice,
        |rt, d, _| match d.mig {
            Some(_) => put(device, rt.device_handle(DevRef::gpu(d.gpu))),
            None => INVALID_ARG,
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetGpuInstanceId", device, |rt, d, _| {
        match rt.model.mig(d) {
            Some(m) => put(id, m.gpu_instance_id),
            None => INVALID_ARG,
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    on_device(
        "nvmlDeviceGetComputeInstanceId",
        device,
        |rt, d, _| match rt.model.mig(d) {
            Some(m) => put(id, m.compute_instance_id),
            None => INVALID_ARG,
        },
    )
}

/// Only MIG devices have attributes (as in NVML); engine and SM counts are rough
/// H100-like figures that scale with the slice count.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetAttributes_v2(
    device: nvmlDevice_t,
    attributes: *mut nvmlDeviceAttributes_t,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetAttributes_v2", device, |rt, d, _| {
        let Some(m) = rt.model.mig(d) else {
            return NOT_SUPPORTED;
        };
        let a = nvmlDeviceAttributes_t {
            multiprocessorCount: m.slices.saturating_mul(132) / 7,
            sharedCopyEngineCount: m.slices,
            sharedDecoderCount: m.slices,
            sharedEncoderCount: 0,
            sharedJpegCount: 0,
            sharedOfaCount: 0,
            gpuInstanceSliceCount: m.slices,
            computeInstanceSliceCount: m.slices,
            memorySizeMB: m.memory_mb,
        };
        put(attributes, a)
    })
}

/// GPU instance profiles: each `NVML_GPU_INSTANCE_PROFILE_<n>_SLICE` up to the GPU's
/// `mig_slices` is supported, the larger ones (and the REV/GFX variants) are not.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceProfileInfo(
    device: nvmlDevice_t,
    profile: c_uint,
    info: *mut b::nvmlGpuInstanceProfileInfo_t,
) -> nvmlReturn_t {
    on_device("nvmlDeviceGetGpuInstanceProfileInfo", device, |rt, d, _| {
        let g = rt.model.gpu(d.gpu);
        let slices: c_uint = match profile {
            b::NVML_GPU_INSTANCE_PROFILE_1_SLICE => 1,
            b::NVML_GPU_INSTANCE_PROFILE_2_SLICE => 2,
            b::NVML_GPU_INSTANCE_PROFILE_3_SLICE => 3,
            b::NVML_GPU_INSTANCE_PROFILE_4_SLICE => 4,
            b::NVML_GPU_INSTANCE_PROFILE_7_SLICE => 7,
            b::NVML_GPU_INSTANCE_PROFILE_8_SLICE => 8,
            b::NVML_GPU_INSTANCE_PROFILE_6_SLICE => 6,
            p if p < b::NVML_GPU_INSTANCE_PROFILE_COUNT => return NOT_SUPPORTED,
            _ => return INVALID_ARG,
        };
        if g.mig.is_empty() || slices > g.mig_slices {
            return NOT_SUPPORTED;
        }
        put(
            info,
            b::nvmlGpuInstanceProfileInfo_t {
                id: profile,
                isP2pSupported: 0,
                sliceCount: slices,
                instanceCount: g.mig_slices / slices,
                multiprocessorCount: slices * 132 / g.mig_slices,
                copyEngineCount: slices,
                decoderCount: slices,
                encoderCount: 0,
                jpegCount: slices,
                ofaCount: 0,
                memorySizeMB: u64::from(slices) * 81_559 / u64::from(g.mig_slices),
            },
        )
    })
}

// ---------------------------------------------------------------------------------------
// GPM

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: nvmlDevice_t,
    gpmSupport: *mut nvmlGpmSupport_t,
) -> nvmlReturn_t {
    on_device("nvmlGpmQueryDeviceSupport", device, |rt, d, _| {
        if gpmSupport.is_null() {
            return INVALID_ARG;
        }
        if (*gpmSupport).version != b::NVML_GPM_SUPPORT_VERSION {
            return VERSION_MISMATCH;
        }
        (*gpmSupport).isSupportedDevice = c_uint::from(rt.model.gpm_supported(d.gpu));
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(gpmSample: *mut nvmlGpmSample_t) -> nvmlReturn_t {
    initialized(|rt| {
        if gpmSample.is_null() {
            return INVALID_ARG;
        }
        let mut boxed = Box::<GpmSample>::default();
        let p: *mut GpmSample = &mut *boxed;
        rt.samples.insert(p.addr(), boxed);
        put(gpmSample, p.cast())
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleFree(gpmSample: nvmlGpmSample_t) -> nvmlReturn_t {
    initialized(|rt| match rt.samples.remove(&gpmSample.addr()) {
        Some(_) => SUCCESS,
        None => INVALID_ARG,
    })
}

/// Records which GPU (and instance) a sample is of, and when.
fn take_sample(
    rt: &mut Runtime,
    d: DevRef,
    instance: Option<u32>,
    now: u64,
    sample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    if let Err(code) = rt.model.gpm(d.gpu, instance, now) {
        return code;
    }
    let Some(s) = rt.samples.get_mut(&sample.addr()) else {
        return INVALID_ARG;
    };
    rt.sample_seq += 1;
    s.taken = Some(Taken {
        gpu: d.gpu,
        instance,
        seq: rt.sample_seq,
        at_ns: now,
    });
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleGet(
    device: nvmlDevice_t,
    gpmSample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    on_device("nvmlGpmSampleGet", device, |rt, d, now| {
        take_sample(rt, d, None, now, gpmSample)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmMigSampleGet(
    device: nvmlDevice_t,
    gpuInstanceId: c_uint,
    gpmSample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    on_device("nvmlGpmMigSampleGet", device, |rt, d, now| {
        take_sample(rt, d, Some(gpuInstanceId), now, gpmSample)
    })
}

/// Short name, long name and unit of the metrics the scenario can give.
fn metric_info(id: u32) -> (&'static CStr, &'static CStr, &'static CStr) {
    match id {
        1 => (c"GR_UTIL", c"Graphics utilization", c"%"),
        2 => (c"SM_UTIL", c"SM utilization", c"%"),
        3 => (c"SM_OCCUP", c"SM occupancy", c"%"),
        4 => (c"INTEGER_UTIL", c"Integer utilization", c"%"),
        5 => (c"ANY_TENSOR_UTIL", c"Tensor utilization", c"%"),
        6 => (c"DFMA_TENSOR_UTIL", c"DFMA tensor utilization", c"%"),
        7 => (c"HMMA_TENSOR_UTIL", c"HMMA tensor utilization", c"%"),
        9 => (c"IMMA_TENSOR_UTIL", c"IMMA tensor utilization", c"%"),
        10 => (c"DRAM_BW_UTIL", c"DRAM bandwidth utilization", c"%"),
        11 => (c"FP64_UTIL", c"FP64 utilization", c"%"),
        12 => (c"FP32_UTIL", c"FP32 utilization", c"%"),
        13 => (c"FP16_UTIL", c"FP16 utilization", c"%"),
        20 => (c"PCIE_TX", c"PCIe transmit", c"MiB/sec"),
        21 => (c"PCIE_RX", c"PCIe receive", c"MiB/sec"),
        60 => (c"NVLINK_TOTAL_RX", c"NVLink receive, all links", c"MiB/sec"),
        61 => (
            c"NVLINK_TOTAL_TX",
            c"NVLink transmit, all links",
            c"MiB/sec",
        ),
        _ => (c"", c"", c""),
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmMetricsGet(metricsGet: *mut nvmlGpmMetricsGet_t) -> nvmlReturn_t {
    if metricsGet.is_null() {
        return INVALID_ARG;
    }
    let (sample1, sample2) = ((*metricsGet).sample1.addr(), (*metricsGet).sample2.addr());
    on_gpu(
        "nvmlGpmMetricsGet",
        |rt| match rt.samples.get(&sample1).and_then(|s| s.taken) {
            Some(t) => Ok(DevRef::gpu(t.gpu)),
            None => Err(INVALID_ARG),
        },
        |rt, _, _| {
            // SAFETY: checked non-null above; the caller owns the struct.
            let request = unsafe { &mut *metricsGet };
            if request.version != b::NVML_GPM_METRICS_GET_VERSION {
                return VERSION_MISMATCH;
            }
            let n = request.numMetrics as usize;
            if n > request.metrics.len() {
                return INVALID_ARG;
            }
            let (Some(first), Some(second)) = (rt.samples.get(&sample1), rt.samples.get(&sample2))
            else {
                return INVALID_ARG;
            };
            let metrics = &mut request.metrics[..n];
            let ids: Vec<u32> = metrics.iter().map(|m| m.metricId).collect();
            match gpm_metrics(&rt.model, first, second, &ids) {
                Ok(results) => {
                    for (m, (code, value)) in metrics.iter_mut().zip(results) {
                        let (short, long, unit) = metric_info(m.metricId);
                        m.nvmlReturn = code;
                        m.value = value;
                        m.metricInfo.shortName = short.as_ptr().cast_mut();
                        m.metricInfo.longName = long.as_ptr().cast_mut();
                        m.metricInfo.unit = unit.as_ptr().cast_mut();
                    }
                    SUCCESS
                }
                Err(code) => code,
            }
        },
    )
}
