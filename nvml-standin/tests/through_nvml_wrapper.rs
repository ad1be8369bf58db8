//! The stand-in as the agent sees it: libnvml_standin.so loaded by nvml-wrapper 0.13, and
//! every value read back through the wrapper's own API.
//!
//! Each test copies the library into its own temporary directory, next to its own
//! scenario, so each gets a separate instance of the library and the tests can run in
//! parallel in one process.

use std::ffi::c_uint;
use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PerformancePolicy, TemperatureSensor,
};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::gpm::gpm_metrics_get;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::Nvml;
use tempfile::TempDir;

/// libnvml_standin.so as cargo built it: next to the test executable (in deps/) or one
/// directory up.
fn built_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("test executable directory");
    let candidates = [deps.to_path_buf(), deps.join("..")];
    for dir in &candidates {
        let p = dir.join("libnvml_standin.so");
        if p.exists() {
            return p;
        }
    }
    panic!("libnvml_standin.so not found in {candidates:?}");
}

/// A private copy of the library, with `scenario` beside it.
struct Standin {
    dir: TempDir,
    lib: PathBuf,
}

impl Standin {
    fn new(scenario: &str) -> Standin {
        assert!(
            std::env::var_os("NVML_STANDIN_SCENARIO").is_none(),
            "unset NVML_STANDIN_SCENARIO: these tests put a scenario next to each library copy"
        );
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(built_library(), &lib).unwrap();
        let s = Standin { dir, lib };
        s.write_scenario(scenario);
        s
    }

    fn write_scenario(&self, scenario: &str) {
        std::fs::write(self.dir.path().join("nvml-standin.toml"), scenario).unwrap();
    }

    fn init(&self) -> Result<Nvml, NvmlError> {
        Nvml::builder().lib_path(self.lib.as_os_str()).init()
    }
}

const MS: f64 = 1e-3;

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

const VALUES: &str = r#"
driver_version = "550.54.15"

[[gpu]]
uuid = "GPU-00000000-0000-0000-0000-000000000001"
name = "NVIDIA H100 80GB HBM3"
pci_bus_id = "00000000:19:00.0"
power_w = 350.0
energy_start_mj = 1000000
power_limit_w = 700.0
temp_c = 45
mem_temp_c = 50
util_gpu = 80
util_memory = 30
mem_total_bytes = 85899345920
mem_used_bytes = 1073741824
sm_clock_mhz = 1980
mem_clock_mhz = 2619
clocks_event_reasons = 4
ecc_corrected = 3
ecc_uncorrected = 1
pids = [1234, 5678]
power_capped_fraction = 0.5
thermal_fraction = 0.25

[[gpu]]
uuid = "GPU-00000000-0000-0000-0000-000000000002"
name = "NVIDIA A100-SXM4-40GB"
pci_bus_id = "00000002:3B:00.0"
power_w = 100.0
energy_start_mj = 1000000000
reload_at_ms = 0
not_supported = ["nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage"]
failing = ["nvmlDeviceGetClockInfo"]
"#;

#[test]
fn the_wrapper_reads_exactly_the_scenario() {
    let standin = Standin::new(VALUES);
    let before_init = Instant::now();
    let nvml = standin.init().unwrap();
    let after_init = Instant::now();

    assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");
    assert_eq!(nvml.device_count().unwrap(), 2);
    assert!(matches!(
        nvml.device_by_index(2).map(|_| ()),
        Err(NvmlError::InvalidArg)
    ));
    let d = nvml.device_by_index(0).unwrap();
    assert_eq!(
        d.uuid().unwrap(),
        "GPU-00000000-0000-0000-0000-000000000001"
    );
    assert_eq!(d.name().unwrap(), "NVIDIA H100 80GB HBM3");
    let pci = d.pci_info().unwrap();
    assert_eq!(pci.bus_id, "00000000:19:00.0");
    assert_eq!((pci.domain, pci.bus, pci.device), (0, 0x19, 0));
    assert_eq!(d.power_usage().unwrap(), 350_000);
    assert_eq!(d.enforced_power_limit().unwrap(), 700_000);
    assert_eq!(d.temperature(TemperatureSensor::Gpu).unwrap(), 45);

    let fields = d.field_values_for(&[FieldId(82), FieldId(83)]).unwrap();
    let mem_temp = fields[0].as_ref().unwrap();
    assert_eq!(mem_temp.field, FieldId(82));
    assert!(matches!(mem_temp.value, Ok(SampleValue::U32(50))));
    assert!(mem_temp.timestamp.abs_diff(micros_now() as i64) < 10_000_000);
    assert!(matches!(
        fields[1].as_ref().unwrap().value,
        Err(NvmlError::NotSupported)
    ));

    let u = d.utilization_rates().unwrap();
    assert_eq!((u.gpu, u.memory), (80, 30));
    let m = d.memory_info().unwrap();
    assert_eq!(
        (m.total, m.used, m.free, m.reserved),
        (
            85_899_345_920,
            1_073_741_824,
            85_899_345_920 - 1_073_741_824,
            0
        )
    );
    assert_eq!(d.clock_info(Clock::SM).unwrap(), 1980);
    assert_eq!(d.clock_info(Clock::Memory).unwrap(), 2619);
    assert_eq!(
        d.current_throttle_reasons().unwrap(),
        ThrottleReasons::SW_POWER_CAP
    );
    assert_eq!(
        d.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate)
            .unwrap(),
        3
    );
    assert_eq!(
        d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)
            .unwrap(),
        1
    );
    assert_eq!(d.running_compute_processes_count().unwrap(), 2);
    let procs = d.running_compute_processes().unwrap();
    assert_eq!(
        procs.iter().map(|p| p.pid).collect::<Vec<_>>(),
        [1234, 5678]
    );
    assert_eq!(procs[0].used_gpu_memory, UsedGpuMemory::Used(536_870_912));
    assert_eq!(procs[0].gpu_instance_id, None);

    // Counters that grow with time since nvmlInit.
    sleep(Duration::from_millis(200));
    let call_start = Instant::now();
    let energy = d.total_energy_consumption().unwrap();
    let power = d.violation_status(PerformancePolicy::Power).unwrap();
    let thermal = d.violation_status(PerformancePolicy::Thermal).unwrap();
    let call_end = Instant::now();
    let at_least = (call_start - after_init).as_secs_f64();
    let at_most = (call_end - before_init).as_secs_f64();
    let energy_s = (energy - 1_000_000) as f64 / 350_000.0;
    assert!(
        (at_least - MS..=at_most + MS).contains(&energy_s),
        "energy {energy} mJ is {energy_s} s of 350 W, not within [{at_least}, {at_most}]"
    );
    for (v, fraction) in [(&power, 0.5), (&thermal, 0.25)] {
        let s = v.violation_time as f64 / 1e9 / fraction;
        assert!(
            (at_least - MS..=at_most + MS).contains(&s),
            "{v:?}: {s} s, not within [{at_least}, {at_most}]"
        );
        assert!(
            v.reference_time.abs_diff(micros_now()) < 10_000_000,
            "{v:?}"
        );
    }
    let later = d.total_energy_consumption().unwrap();
    assert!(later >= energy);

    // The second GPU: defaults, a reload at time zero, unsupported and failing calls.
    let d1 = nvml.device_by_index(1).unwrap();
    assert_eq!(d1.pci_info().unwrap().bus_id, "00000002:3B:00.0");
    assert_eq!(d1.pci_info().unwrap().domain, 2);
    assert_eq!(d1.temperature(TemperatureSensor::Gpu).unwrap(), 45);
    let e1 = d1.total_energy_consumption().unwrap();
    assert!(e1 < 1_000_000, "reloaded at 0 ms: counts from 0, not {e1}");
    assert!(matches!(d1.power_usage(), Err(NvmlError::NotSupported)));
    assert!(matches!(
        d1.field_values_for(&[FieldId(82)]),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(d1.clock_info(Clock::SM), Err(NvmlError::Unknown)));
    assert!(d1.running_compute_processes().unwrap().is_empty());
    assert!(matches!(d1.mig_mode(), Ok(m) if m.current == 0 && m.pending == 0));
    assert_eq!(d1.mig_device_count().unwrap(), 0);
    assert!(!d1.gpm_support().unwrap());
    assert!(matches!(d1.gpm_sample(), Err(NvmlError::NotSupported)));
}

#[test]
fn a_gpu_falls_off_the_bus() {
    let standin = Standin::new(
        r#"
[[gpu]]
uuid = "GPU-lost"
lost_at_ms = 300
[[gpu.mig]]
uuid = "MIG-lost"
gpu_instance_id = 1
[[gpu]]
uuid = "GPU-fine"
"#,
    );
    let nvml = standin.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();
    let mig = d.mig_device_by_index(0).unwrap();
    assert_eq!(d.power_usage().unwrap(), 100_000);
    assert_eq!(mig.uuid().unwrap(), "MIG-lost");

    sleep(Duration::from_millis(350));
    assert!(matches!(d.power_usage(), Err(NvmlError::GpuLost)));
    assert!(matches!(d.uuid(), Err(NvmlError::GpuLost)));
    assert!(matches!(mig.uuid(), Err(NvmlError::GpuLost)));
    assert!(matches!(
        nvml.device_by_index(0).map(|_| ()),
        Err(NvmlError::GpuLost)
    ));
    assert_eq!(nvml.device_by_index(1).unwrap().uuid().unwrap(), "GPU-fine");
}

#[test]
fn a_hung_gpu_blocks_one_call_once() {
    let standin = Standin::new(
        r#"
[[gpu]]
uuid = "GPU-hangs"
hang_at_ms = 0
hang_for_ms = 400
[[gpu]]
uuid = "GPU-fine"
"#,
    );
    let nvml = standin.init().unwrap();
    let t = Instant::now();
    assert_eq!(nvml.device_by_index(1).unwrap().uuid().unwrap(), "GPU-fine");
    assert!(t.elapsed() < Duration::from_millis(300));

    let t = Instant::now();
    let d = nvml.device_by_index(0).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert_eq!(d.uuid().unwrap(), "GPU-hangs");
    assert!(t.elapsed() < Duration::from_millis(300), "hangs only once");
}

#[test]
fn an_xid_event_is_delivered_once() {
    let standin = Standin::new(
        r#"
[[gpu]]
uuid = "GPU-a"
[[gpu.event]]
at_ms = 50
type = "clock"
[[gpu.event]]
at_ms = 200
type = "xid"
data = 79
[[gpu]]
uuid = "GPU-b"
[[gpu.event]]
at_ms = 10
type = "xid"
data = 13
"#,
    );
    let nvml = standin.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();
    let six = EventTypes::SINGLE_BIT_ECC_ERROR
        | EventTypes::DOUBLE_BIT_ECC_ERROR
        | EventTypes::PSTATE_CHANGE
        | EventTypes::CRITICAL_XID_ERROR
        | EventTypes::CLOCK_CHANGE
        | EventTypes::POWER_SOURCE_CHANGE;
    assert_eq!(d.supported_event_types().unwrap(), six);

    let set = nvml.create_event_set().unwrap();
    let set = d
        .register_events(EventTypes::CRITICAL_XID_ERROR, set)
        .unwrap();
    let t = Instant::now();
    let event = set.wait(5_000).unwrap();
    assert_eq!(event.event_type, EventTypes::CRITICAL_XID_ERROR);
    assert_eq!(event.event_data, Some(XidError::Value(79)));
    assert_eq!(event.device.uuid().unwrap(), "GPU-a");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Neither again, nor the clock event (not registered), nor GPU-b's (not registered).
    let t = Instant::now();
    assert!(matches!(set.wait(100), Err(NvmlError::Timeout)));
    assert!(t.elapsed() >= Duration::from_millis(100));

    // A second set sees the same event again; unsupported types are refused.
    let other = nvml.create_event_set().unwrap();
    let other = d.register_events(six, other).unwrap();
    let first = other.wait(1_000).unwrap();
    assert_eq!(first.event_type, EventTypes::CLOCK_CHANGE);
    assert_eq!(first.event_data, None);
    assert_eq!(
        other.wait(1_000).unwrap().event_data,
        Some(XidError::Value(79))
    );
    let refused = nvml.create_event_set().unwrap();
    let err = d
        .register_events(EventTypes::MIG_CONFIG_CHANGE, refused)
        .unwrap_err();
    assert!(matches!(err.error, NvmlError::NotSupported), "{err:?}");
}

const MIG: &str = r#"
[[gpu]]
uuid = "GPU-00000000-0000-0000-0000-000000000001"
pids = [100]
[gpu.gpm]
sm_util = 60.0
sm_occupancy = 40.0
any_tensor_util = 50.0
dram_bw_util = 30.0
pcie_tx_per_sec = 100.0
pcie_rx_per_sec = 200.0
nvlink_total_rx_per_sec = 300.0
nvlink_total_tx_per_sec = 400.0
[[gpu.mig]]
uuid = "MIG-00000000-0000-0000-0000-000000000011"
gpu_instance_id = 1
compute_instance_id = 0
slices = 3
memory_mb = 40192
mem_used_bytes = 1073741824
pids = [200]
[gpu.mig.gpm]
sm_util = 90.0
[[gpu.mig]]
uuid = "MIG-00000000-0000-0000-0000-000000000012"
gpu_instance_id = 5
compute_instance_id = 2
slices = 1
memory_mb = 9856
"#;

#[test]
fn mig_devices_answer_for_themselves() {
    let standin = Standin::new(MIG);
    let nvml = standin.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();
    let mode = d.mig_mode().unwrap();
    assert_eq!((mode.current, mode.pending), (1, 1));
    assert_eq!(d.mig_device_count().unwrap(), 7);
    assert!(!d.mig_is_mig_device_handle().unwrap());
    assert!(matches!(
        d.mig_device_by_index(2).map(|_| ()),
        Err(NvmlError::NotFound)
    ));
    // GPU instance profiles up to the GPU's 7 slices; the largest is the whole GPU.
    let full = d.profile_info(4).unwrap();
    assert_eq!((full.id, full.slice_count, full.instance_count), (4, 7, 1));
    assert_eq!(d.profile_info(2).unwrap().slice_count, 3);
    assert!(matches!(d.profile_info(5), Err(NvmlError::NotSupported)));
    assert!(matches!(d.profile_info(99), Err(NvmlError::InvalidArg)));

    let mig = d.mig_device_by_index(0).unwrap();
    assert!(mig.mig_is_mig_device_handle().unwrap());
    assert_eq!(
        mig.uuid().unwrap(),
        "MIG-00000000-0000-0000-0000-000000000011"
    );
    assert_eq!(mig.name().unwrap(), "NVIDIA H100 80GB HBM3 MIG 3g.40gb");
    let a = mig.attributes().unwrap();
    assert_eq!(a.gpu_instance_slice_count, 3);
    assert_eq!(a.compute_instance_slice_count, 3);
    assert_eq!(a.memory_size_mb, 40192);
    let m = mig.memory_info().unwrap();
    assert_eq!((m.total, m.used), (40192 << 20, 1 << 30));
    assert!(matches!(mig.power_usage(), Err(NvmlError::NotSupported)));
    assert!(matches!(
        mig.total_energy_consumption(),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        mig.temperature(TemperatureSensor::Gpu),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        mig.clock_info(Clock::SM),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        mig.violation_status(PerformancePolicy::Power),
        Err(NvmlError::NotSupported)
    ));
    assert_eq!(
        mig.mig_parent_device().unwrap().uuid().unwrap(),
        "GPU-00000000-0000-0000-0000-000000000001"
    );
    assert!(matches!(
        d.attributes().map(|_| ()),
        Err(NvmlError::NotSupported)
    ));

    let procs = mig.running_compute_processes().unwrap();
    assert_eq!(procs.len(), 1);
    assert_eq!(
        (
            procs[0].pid,
            procs[0].gpu_instance_id,
            procs[0].compute_instance_id
        ),
        (200, Some(1), Some(0))
    );
    let all: Vec<u32> = d
        .running_compute_processes()
        .unwrap()
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(all, [100, 200]);

    // Not wrapped by nvml-wrapper: called through its symbol table.
    let lib = nvml.lib();
    let gpu_instance_id = *lib.nvmlDeviceGetGpuInstanceId.as_ref().unwrap();
    let compute_instance_id = *lib.nvmlDeviceGetComputeInstanceId.as_ref().unwrap();
    let second = d.mig_device_by_index(1).unwrap();
    let mut id: c_uint = 0;
    unsafe {
        assert_eq!(gpu_instance_id(mig.handle(), &mut id), 0);
        assert_eq!(id, 1);
        assert_eq!(gpu_instance_id(second.handle(), &mut id), 0);
        assert_eq!(id, 5);
        assert_eq!(compute_instance_id(second.handle(), &mut id), 0);
        assert_eq!(id, 2);
        // NVML_ERROR_INVALID_ARGUMENT on a whole GPU and on a null pointer.
        assert_eq!(gpu_instance_id(d.handle(), &mut id), 2);
        assert_eq!(gpu_instance_id(mig.handle(), std::ptr::null_mut()), 2);
    }
}

#[test]
fn gpm_metrics_come_from_the_scenario() {
    let standin = Standin::new(MIG);
    let nvml = standin.init().unwrap();
    let d = nvml.device_by_index(0).unwrap();
    assert!(d.gpm_support().unwrap());

    let first = d.gpm_sample().unwrap();
    sleep(Duration::from_millis(10));
    let second = d.gpm_sample().unwrap();
    let ids = [
        GpmMetricId::SmUtil,
        GpmMetricId::SmOccupancy,
        GpmMetricId::AnyTensorUtil,
        GpmMetricId::DramBwUtil,
        GpmMetricId::PcieTxPerSec,
        GpmMetricId::PcieRxPerSec,
        GpmMetricId::NvlinkTotalRxPerSec,
        GpmMetricId::NvlinkTotalTxPerSec,
        GpmMetricId::Fp64Util,
    ];
    let got = gpm_metrics_get(&nvml, &first, &second, &ids).unwrap();
    let values: Vec<f64> = got[..8].iter().map(|r| r.as_ref().unwrap().value).collect();
    assert_eq!(values, [60.0, 40.0, 50.0, 30.0, 100.0, 200.0, 300.0, 400.0]);
    let sm = got[0].as_ref().unwrap();
    assert_eq!(sm.metric_id, GpmMetricId::SmUtil);
    assert_eq!(sm.metric_info.unit, "%");
    assert!(matches!(got[8], Err(NvmlError::NotSupported)));

    // Out of order, or from different instances: refused.
    assert!(matches!(
        gpm_metrics_get(&nvml, &second, &first, &ids),
        Err(NvmlError::InvalidArg)
    ));
    let mig_first = d.gpm_mig_sample(1).unwrap();
    assert!(matches!(
        gpm_metrics_get(&nvml, &first, &mig_first, &ids),
        Err(NvmlError::InvalidArg)
    ));
    let mig_second = d.gpm_mig_sample(1).unwrap();
    let got = gpm_metrics_get(
        &nvml,
        &mig_first,
        &mig_second,
        &[GpmMetricId::SmUtil, GpmMetricId::SmOccupancy],
    )
    .unwrap();
    assert_eq!(got[0].as_ref().unwrap().value, 90.0);
    assert!(matches!(got[1], Err(NvmlError::NotSupported)));

    assert!(matches!(d.gpm_mig_sample(5), Err(NvmlError::NotSupported)));
    assert!(matches!(d.gpm_mig_sample(9), Err(NvmlError::NotFound)));
    first.free().unwrap();
}

#[test]
fn init_error_fails_init() {
    for (init_error, expected) in [
        ("driver_not_loaded", "DriverNotLoaded"),
        ("no_permission", "NoPermission"),
        ("unknown", "Unknown"),
    ] {
        let standin = Standin::new(&format!(
            "init_error = \"{init_error}\"\n[[gpu]]\nuuid = \"GPU-a\"\n"
        ));
        let err = standin.init().map(|_| ()).unwrap_err();
        assert_eq!(format!("{err:?}"), expected);
    }
}

#[test]
fn an_unusable_scenario_fails_init() {
    for bad in [
        "[[gpu]\nuuid = \"GPU-a\"\n",
        "[[gpu]]\nuuid = \"GPU-a\"\npower = 3.0\n",
    ] {
        let standin = Standin::new(bad);
        assert!(matches!(
            standin.init().map(|_| ()),
            Err(NvmlError::DriverNotLoaded)
        ));
    }
    let standin = Standin::new("");
    std::fs::remove_file(standin.dir.path().join("nvml-standin.toml")).unwrap();
    assert!(matches!(
        standin.init().map(|_| ()),
        Err(NvmlError::DriverNotLoaded)
    ));
    // Once the file is right, the same library initialises.
    standin.write_scenario("[[gpu]]\nuuid = \"GPU-a\"\n");
    assert_eq!(standin.init().unwrap().device_count().unwrap(), 1);
}

#[test]
fn init_is_reference_counted_and_shutdown_resets() {
    let standin = Standin::new("driver_version = \"1.0\"\n[[gpu]]\nuuid = \"GPU-a\"\n");
    let first = standin.init().unwrap();
    standin.write_scenario("driver_version = \"2.0\"\n[[gpu]]\nuuid = \"GPU-a\"\n");
    let second = standin.init().unwrap();
    assert_eq!(second.sys_driver_version().unwrap(), "1.0");
    first.shutdown().unwrap();
    assert_eq!(second.device_count().unwrap(), 1, "one init is still open");
    second.shutdown().unwrap();
    let third = standin.init().unwrap();
    assert_eq!(
        third.sys_driver_version().unwrap(),
        "2.0",
        "re-read after shutdown"
    );
}

/// What nvml-wrapper never shows: calls before init, bad handles and pointers, struct
/// versions, the sizing protocol, and handles outliving an nvmlShutdown.
#[test]
fn raw_calls_check_state_and_arguments() {
    use nvml_wrapper_sys::bindings::{nvmlDevice_t, nvmlMemory_v2_t, nvmlProcessInfo_t, NvmlLib};
    use std::ffi::CStr;
    use std::mem::{size_of, zeroed};
    use std::ptr::{null_mut, without_provenance_mut};

    let standin = Standin::new("[[gpu]]\nuuid = \"GPU-a\"\npids = [7, 8, 9]\n");
    unsafe {
        let lib = NvmlLib::new(&standin.lib).unwrap();
        let mut count: c_uint = 0;
        assert_eq!(lib.nvmlDeviceGetCount_v2(&mut count), 1, "uninitialized");
        assert_eq!(lib.nvmlShutdown(), 1, "uninitialized");
        let lost = CStr::from_ptr(lib.nvmlErrorString(15));
        assert_eq!(lost.to_str().unwrap(), "GPU is lost");

        assert_eq!(lib.nvmlInit_v2(), 0);
        assert_eq!(lib.nvmlDeviceGetCount_v2(&mut count), 0);
        assert_eq!(count, 1);
        assert_eq!(lib.nvmlDeviceGetCount_v2(null_mut()), 2);
        let mut d: nvmlDevice_t = null_mut();
        assert_eq!(lib.nvmlDeviceGetHandleByIndex_v2(0, &mut d), 0);
        assert!(!d.is_null());

        let mut mw: c_uint = 0;
        assert_eq!(lib.nvmlDeviceGetPowerUsage(d, null_mut()), 2);
        assert_eq!(lib.nvmlDeviceGetPowerUsage(null_mut(), &mut mw), 2);
        assert_eq!(
            lib.nvmlDeviceGetPowerUsage(without_provenance_mut(0x1234), &mut mw),
            2
        );

        let mut name = [0 as std::ffi::c_char; 3];
        assert_eq!(
            lib.nvmlDeviceGetUUID(d, name.as_mut_ptr(), 3),
            7,
            "insufficient size"
        );

        let mut mem: nvmlMemory_v2_t = zeroed();
        mem.version = 1;
        assert_eq!(
            lib.nvmlDeviceGetMemoryInfo_v2(d, &mut mem),
            25,
            "version mismatch"
        );
        mem.version = (size_of::<nvmlMemory_v2_t>() | 2 << 24) as u32;
        assert_eq!(lib.nvmlDeviceGetMemoryInfo_v2(d, &mut mem), 0);

        let mut n: c_uint = 0;
        assert_eq!(
            lib.nvmlDeviceGetComputeRunningProcesses_v3(d, &mut n, null_mut()),
            7
        );
        assert_eq!(n, 3);
        let mut infos: [nvmlProcessInfo_t; 3] = zeroed();
        n = 2;
        assert_eq!(
            lib.nvmlDeviceGetComputeRunningProcesses_v3(d, &mut n, infos.as_mut_ptr()),
            7
        );
        assert_eq!(n, 3);
        assert_eq!(
            lib.nvmlDeviceGetComputeRunningProcesses_v3(d, &mut n, infos.as_mut_ptr()),
            0
        );
        assert_eq!(infos.map(|p| p.pid), [7, 8, 9]);

        assert_eq!(lib.nvmlShutdown(), 0);
        assert_eq!(
            lib.nvmlDeviceGetPowerUsage(d, &mut mw),
            1,
            "uninitialized again"
        );
        assert_eq!(lib.nvmlInit_v2(), 0);
        assert_eq!(
            lib.nvmlDeviceGetPowerUsage(d, &mut mw),
            2,
            "a handle from before"
        );
        let mut fresh: nvmlDevice_t = null_mut();
        assert_eq!(lib.nvmlDeviceGetHandleByIndex_v2(0, &mut fresh), 0);
        assert_eq!(lib.nvmlDeviceGetPowerUsage(fresh, &mut mw), 0);
        assert_eq!(mw, 100_000);
        assert_eq!(lib.nvmlShutdown(), 0);
    }
}
