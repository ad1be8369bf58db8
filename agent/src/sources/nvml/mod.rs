//! NVIDIA GPUs through NVML (nvml-wrapper, which loads libnvidia-ml at run time).
//!
//! NVML calls block, sometimes for long (a GPU falling off the bus), so they run on a
//! dedicated thread that owns the library handle. Each sample sends that thread a request
//! and waits at most `timeout`; a stuck call costs that sample its GPU readings, never the
//! other sources or the sampling rhythm.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use nodewatt_wire::{Gpu, Sample};
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::{Device, Nvml};

use super::{Inventory, Source, SourceError, TickMs};

/// NVML_FI_DEV_MEMORY_TEMP: HBM temperature, only available through field values.
const FI_DEV_MEMORY_TEMP: u32 = 82;
/// Initialising NVML on a node with many GPUs and persistence mode off takes seconds.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

struct Worker {
    requests: SyncSender<TickMs>,
    responses: Receiver<(TickMs, Vec<Gpu>)>,
    /// A request is outstanding from an earlier sample that timed out.
    busy: bool,
}

pub struct NvmlSource {
    worker: Option<Worker>,
    unavailable: Option<String>,
    /// "index model uuid" per GPU, found at start-up.
    devices: Vec<String>,
    timeout: Duration,
}

/// What the NVML thread reports once it has started.
type InitReply = Result<Vec<String>, String>;

/// Operator-facing reason for an NVML failure at start-up.
pub fn explain_init_error(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(inner) => format!(
            "NVML unavailable: cannot load libnvidia-ml.so.1 (no NVIDIA driver on this node?): {inner}"
        ),
        NvmlError::DriverNotLoaded => {
            "NVML unavailable: the NVIDIA kernel driver is not loaded".to_string()
        }
        NvmlError::NoPermission => {
            "NVML unavailable: permission denied (check access to /dev/nvidia*)".to_string()
        }
        other => format!("NVML unavailable: {other}"),
    }
}

impl NvmlSource {
    pub fn start(timeout: Duration, processes: bool) -> NvmlSource {
        let (init_tx, init_rx) = mpsc::sync_channel::<InitReply>(1);
        let (req_tx, req_rx) = mpsc::sync_channel::<TickMs>(1);
        let (resp_tx, resp_rx) = mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || worker_main(init_tx, req_rx, resp_tx, processes));
        let mut src = NvmlSource {
            worker: None,
            unavailable: None,
            devices: Vec::new(),
            timeout,
        };
        if let Err(e) = spawned {
            src.unavailable = Some(format!("NVML unavailable: cannot start its thread: {e}"));
            return src;
        }
        match init_rx.recv_timeout(INIT_TIMEOUT) {
            Ok(Ok(devices)) => {
                src.devices = devices;
                src.worker = Some(Worker {
                    requests: req_tx,
                    responses: resp_rx,
                    busy: false,
                });
            }
            Ok(Err(why)) => src.unavailable = Some(why),
            Err(_) => {
                src.unavailable = Some(format!(
                    "NVML unavailable: initialisation did not finish within {}s",
                    INIT_TIMEOUT.as_secs()
                ))
            }
        }
        src
    }
}

fn worker_main(
    init: SyncSender<InitReply>,
    requests: Receiver<TickMs>,
    responses: SyncSender<(TickMs, Vec<Gpu>)>,
    processes: bool,
) {
    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            let _ = init.send(Err(explain_init_error(&e)));
            return;
        }
    };
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => {
            let _ = init.send(Err(format!("NVML unavailable: cannot count GPUs: {e}")));
            return;
        }
    };
    let mut devices: Vec<(Device<'_>, Gpu)> = Vec::new();
    let mut names = Vec::new();
    for index in 0..count {
        match nvml.device_by_index(index) {
            Ok(d) => {
                let ident = identity(&d, index);
                names.push(format!("{} {} {}", index, ident.model, ident.uuid));
                devices.push((d, ident));
            }
            Err(e) => names.push(format!("{index} unusable: {e}")),
        }
    }
    if init.send(Ok(names)).is_err() {
        return;
    }
    // Ends when the source is dropped (its sender closes).
    while let Ok(at) = requests.recv() {
        let gpus = devices
            .iter()
            .map(|(d, ident)| read_gpu(d, ident.clone(), processes))
            .collect();
        if responses.send((at, gpus)).is_err() {
            return;
        }
    }
}

/// Static identity, read once: UUID, PCI bus id and model never change while loaded.
fn identity(d: &Device<'_>, index: u32) -> Gpu {
    let clean = |r: Result<String, NvmlError>, fallback: &str| {
        crate::sysfs::clean_name(&r.unwrap_or_default(), fallback)
    };
    Gpu {
        index,
        uuid: clean(d.uuid(), &format!("GPU-unknown-{index}")),
        pci_bus_id: clean(d.pci_info().map(|p| p.bus_id), "unknown"),
        model: clean(d.name(), "unknown"),
        ..Gpu::default()
    }
}

/// Keeps a value; "not supported" is silently absent, any other failure is named in `errors`.
pub fn field<T>(errors: &mut Vec<String>, name: &str, r: Result<T, NvmlError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported) => None,
        Err(e) => {
            errors.push(format!("{name}: {e}"));
            None
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

fn read_gpu(d: &Device<'_>, mut g: Gpu, processes: bool) -> Gpu {
    let e = &mut g.errors;
    g.power_w = field(e, "power", d.power_usage()).map(|mw| f64::from(mw) / 1000.0);
    g.energy_mj = field(e, "energy", d.total_energy_consumption());
    g.temp_c = field(e, "temperature", d.temperature(TemperatureSensor::Gpu)).map(f64::from);
    g.mem_temp_c = field(e, "memory_temperature", memory_temp(d));
    if let Some(u) = field(e, "utilization", d.utilization_rates()) {
        g.util_pct = Some(f64::from(u.gpu));
        g.mem_util_pct = Some(f64::from(u.memory));
    }
    if let Some(m) = field(e, "memory_info", d.memory_info()) {
        g.mem_used_bytes = Some(m.used);
        g.mem_total_bytes = Some(m.total);
    }
    g.sm_clock_mhz = field(e, "sm_clock", d.clock_info(Clock::SM));
    g.mem_clock_mhz = field(e, "memory_clock", d.clock_info(Clock::Memory));
    g.clock_event_reasons =
        field(e, "clock_event_reasons", d.current_throttle_reasons()).map(|r| r.bits());
    g.ecc_corrected = field(
        e,
        "ecc_corrected",
        d.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate),
    );
    g.ecc_uncorrected = field(
        e,
        "ecc_uncorrected",
        d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate),
    );
    if processes {
        if let Some(ps) = field(e, "processes", d.running_compute_processes()) {
            g.pids = ps.iter().map(|p| p.pid).collect();
        }
    }
    g
}

impl Source for NvmlSource {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn inventory(&self) -> Inventory {
        Inventory {
            devices: self.devices.len() as u32,
            summary: match self.devices.len() {
                0 => "no GPUs".to_string(),
                n => format!("{n} GPUs: {}", self.devices.join("; ")),
            },
            problems: Vec::new(),
            unavailable: self.unavailable.clone(),
        }
    }

    fn read(&mut self, at: TickMs, out: &mut Sample) -> Result<u32, SourceError> {
        let Some(w) = self.worker.as_mut() else {
            return Err(SourceError(self.unavailable.clone().unwrap_or_default()));
        };
        if w.busy {
            // Collect the late answer to the earlier request, if it has come by now.
            match w.responses.try_recv() {
                Ok(_) => w.busy = false,
                Err(_) => {
                    return Err(SourceError(
                        "NVML is still stuck in an earlier call; GPU readings skipped".into(),
                    ))
                }
            }
        }
        match w.requests.try_send(at) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(SourceError("NVML thread is busy".into()));
            }
            Err(TrySendError::Disconnected(_)) => {
                self.worker = None;
                self.unavailable = Some("NVML thread has stopped".into());
                return Err(SourceError("NVML thread has stopped".into()));
            }
        }
        match w.responses.recv_timeout(self.timeout) {
            Ok((_, gpus)) => {
                let n = gpus.len() as u32;
                out.gpus.extend(gpus);
                Ok(n)
            }
            Err(RecvTimeoutError::Timeout) => {
                w.busy = true;
                Err(SourceError(format!(
                    "NVML did not answer within {} ms; GPU readings skipped",
                    self.timeout.as_millis()
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.worker = None;
                self.unavailable = Some("NVML thread has stopped".into());
                Err(SourceError("NVML thread has stopped".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_fields_are_absent_other_failures_named() {
        let mut errors = Vec::new();
        assert_eq!(field(&mut errors, "power", Ok(5u32)), Some(5));
        assert_eq!(
            field::<u32>(&mut errors, "ecc", Err(NvmlError::NotSupported)),
            None
        );
        assert!(errors.is_empty());
        assert_eq!(
            field::<u32>(&mut errors, "power", Err(NvmlError::GpuLost)),
            None
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("power: "), "{errors:?}");
    }

    #[test]
    fn field_values_convert_to_f64() {
        assert_eq!(sample_value_f64(&SampleValue::U32(71)), 71.0);
        assert_eq!(sample_value_f64(&SampleValue::I64(-3)), -3.0);
        assert_eq!(sample_value_f64(&SampleValue::F64(1.5)), 1.5);
        assert_eq!(sample_value_f64(&SampleValue::U64(9)), 9.0);
    }

    #[test]
    fn init_errors_are_explained() {
        assert!(explain_init_error(&NvmlError::DriverNotLoaded).contains("kernel driver"));
        assert!(explain_init_error(&NvmlError::NoPermission).contains("/dev/nvidia"));
    }

    /// A worker that answers each request only when the test lets it, standing in for
    /// the NVML thread (whose calls can hang when a GPU falls off the bus).
    fn gated_source(timeout_ms: u64) -> (NvmlSource, SyncSender<()>) {
        let (req_tx, req_rx) = mpsc::sync_channel::<TickMs>(1);
        let (resp_tx, resp_rx) = mpsc::sync_channel(1);
        let (gate_tx, gate_rx) = mpsc::sync_channel::<()>(8);
        std::thread::spawn(move || {
            while let Ok(at) = req_rx.recv() {
                if gate_rx.recv().is_err() {
                    return;
                }
                let gpu = Gpu {
                    index: 0,
                    uuid: "GPU-x".into(),
                    ..Gpu::default()
                };
                if resp_tx.send((at, vec![gpu])).is_err() {
                    return;
                }
            }
        });
        let src = NvmlSource {
            worker: Some(Worker {
                requests: req_tx,
                responses: resp_rx,
                busy: false,
            }),
            unavailable: None,
            devices: vec!["0 test GPU-x".into()],
            timeout: Duration::from_millis(timeout_ms),
        };
        (src, gate_tx)
    }

    #[test]
    fn a_stuck_call_costs_samples_their_gpus_not_the_agent() {
        let (mut src, gate) = gated_source(50);
        let mut s = crate::testutil::empty_sample();
        gate.send(()).unwrap();
        assert_eq!(src.read(1, &mut s).unwrap(), 1);

        // NVML hangs: this sample times out, the next one does not queue another call.
        let err = src.read(2, &mut s).unwrap_err().to_string();
        assert!(err.contains("did not answer within 50 ms"), "{err}");
        // (This answer comes from the path that neither sends nor waits.)
        let err = src.read(3, &mut s).unwrap_err().to_string();
        assert!(err.contains("still stuck"), "{err}");

        // It recovers once the hung call returns: the late answer is discarded and fresh
        // readings are taken.
        gate.send(()).unwrap();
        gate.send(()).unwrap();
        let mut fresh = None;
        for at in 4..1_000 {
            let mut s = crate::testutil::empty_sample();
            match src.read(at, &mut s) {
                Ok(n) => {
                    fresh = Some((n, s.gpus.len()));
                    break;
                }
                Err(e) => assert!(e.0.contains("still stuck"), "{e}"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(fresh, Some((1, 1)), "one GPU, only the fresh readings");

        // The thread is gone: said once, for good.
        drop(gate);
        let _ = src.read(5, &mut s);
        let err = src.read(6, &mut s).unwrap_err().to_string();
        assert!(err.contains("NVML thread has stopped"), "{err}");
    }

    /// On a machine without the NVIDIA driver (CI), the source says so clearly and the
    /// sample carries the reason; on a GPU machine it finds at least one GPU.
    #[test]
    fn starts_on_any_machine() {
        let mut src = NvmlSource::start(Duration::from_secs(5), true);
        let inv = src.inventory();
        let mut s = crate::testutil::empty_sample();
        match &inv.unavailable {
            Some(why) => {
                assert!(why.starts_with("NVML unavailable: "), "{why}");
                let err = src.read(0, &mut s).unwrap_err().to_string();
                assert_eq!(&err, why);
                assert!(s.gpus.is_empty());
            }
            None => {
                let n = src.read(0, &mut s).unwrap();
                assert_eq!(n, inv.devices);
                assert!(s.gpus.iter().all(|g| !g.uuid.is_empty() && !g.simulated));
            }
        }
    }
}
