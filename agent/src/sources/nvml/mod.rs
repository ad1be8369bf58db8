//! NVIDIA GPUs through NVML (nvml-wrapper, which loads libnvidia-ml at run time).
//!
//! NVML calls block, sometimes for long (a GPU falling off the bus), so they run on a
//! dedicated thread that owns the library handle. Each sample sends that thread a request
//! and waits at most `timeout`; a stuck call costs that sample its GPU readings, never the
//! other sources or the sampling rhythm.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

use nodewatt_wire::{Gpu, Sample};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use super::{Inventory, Source, SourceError, TickMs};

mod events;
mod gpu;
mod span;

use events::Events;
use gpu::GpuReader;
pub use gpu::GPM_MIN_SPAN_MS;

/// Initialising NVML on a node with many GPUs and persistence mode off takes seconds.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What the source is told at start-up.
#[derive(Debug, Clone)]
pub struct NvmlOptions {
    /// The library to load; the loader's search for `libnvidia-ml.so.1` when `None`.
    pub library: Option<PathBuf>,
    /// How long one sample waits for the NVML thread.
    pub timeout: Duration,
    /// Read the PIDs of compute processes.
    pub processes: bool,
}

/// One sample's request to the NVML thread: its tick, and the tick before it (for values
/// over the span between them).
#[derive(Debug, Clone, Copy)]
struct Request {
    at: TickMs,
    prev_tick: Option<TickMs>,
}

struct Worker {
    requests: SyncSender<Request>,
    responses: Receiver<(TickMs, Vec<Gpu>)>,
    /// A request is outstanding from an earlier sample that timed out.
    busy: bool,
}

pub struct NvmlSource {
    worker: Option<Worker>,
    unavailable: Option<String>,
    /// Identity of each GPU found at start-up, reported as `stalled` when NVML hangs.
    gpus: Vec<Gpu>,
    /// What was found beyond the GPUs (GPM, events), and what is missing, for `check`.
    notes: Vec<String>,
    problems: Vec<String>,
    timeout: Duration,
    prev_tick: Option<TickMs>,
}

/// What the NVML thread reports once it has started.
struct Found {
    gpus: Vec<Gpu>,
    notes: Vec<String>,
    problems: Vec<String>,
}

type InitReply = Result<Found, String>;

/// Operator-facing reason for an NVML failure at start-up.
pub fn explain_init_error(e: &NvmlError, library: &str) -> String {
    match e {
        NvmlError::LibloadingError(inner) => format!(
            "NVML unavailable: cannot load {library} (no NVIDIA driver on this node?): {inner}"
        ),
        NvmlError::DriverNotLoaded => {
            "NVML unavailable: the NVIDIA kernel driver is not loaded".to_string()
        }
        NvmlError::NoPermission => {
            "NVML unavailable: permission denied (check access to /dev/nvidia*)".to_string()
        }
        NvmlError::FailedToLoadSymbol(inner) => {
            format!("NVML unavailable: {library} is not an NVML library: {inner}")
        }
        other => format!("NVML unavailable: {other}"),
    }
}

impl NvmlSource {
    pub fn start(opts: NvmlOptions) -> NvmlSource {
        let (init_tx, init_rx) = mpsc::sync_channel::<InitReply>(1);
        let (req_tx, req_rx) = mpsc::sync_channel::<Request>(1);
        let (resp_tx, resp_rx) = mpsc::sync_channel(1);
        let timeout = opts.timeout;
        let spawned = std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || worker_main(opts, init_tx, req_rx, resp_tx));
        let mut src = NvmlSource {
            worker: None,
            unavailable: None,
            gpus: Vec::new(),
            notes: Vec::new(),
            problems: Vec::new(),
            timeout,
            prev_tick: None,
        };
        if let Err(e) = spawned {
            src.unavailable = Some(format!("NVML unavailable: cannot start its thread: {e}"));
            return src;
        }
        match init_rx.recv_timeout(INIT_TIMEOUT) {
            Ok(Ok(found)) => {
                src.gpus = found.gpus;
                src.notes = found.notes;
                src.problems = found.problems;
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

    /// The GPUs found at start-up, marked as not answering, for a sample NVML missed.
    fn stalled(&self, out: &mut Sample) {
        out.gpus.extend(self.gpus.iter().map(|g| Gpu {
            stalled: true,
            ..g.clone()
        }));
    }
}

fn worker_main(
    opts: NvmlOptions,
    init: SyncSender<InitReply>,
    requests: Receiver<Request>,
    responses: SyncSender<(TickMs, Vec<Gpu>)>,
) {
    let mut builder = Nvml::builder();
    let library = match &opts.library {
        Some(p) => {
            builder.lib_path(p.as_os_str());
            p.display().to_string()
        }
        None => "libnvidia-ml.so.1".to_string(),
    };
    let nvml = match builder.init() {
        Ok(n) => n,
        Err(e) => {
            let _ = init.send(Err(explain_init_error(&e, &library)));
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
    let mut readers = Vec::new();
    let mut problems = Vec::new();
    for index in 0..count {
        match nvml.device_by_index(index) {
            Ok(d) => readers.push(GpuReader::new(&nvml, d, index, &mut problems)),
            Err(e) => problems.push(format!("GPU {index} unusable: {e}")),
        }
    }
    let mut events = Events::register(&nvml, &readers, &[]);
    let gpm = readers.iter().filter(|r| r.has_gpm()).count();
    let mut notes = vec![format!("GPM on {gpm} of {} GPUs", readers.len())];
    let mig: usize = readers.iter().map(GpuReader::mig_devices).sum();
    if mig > 0 {
        notes.push(format!("{mig} MIG devices"));
    }
    if let Some(why) = &events.unavailable {
        problems.push(why.clone());
    }
    if events.counting() {
        notes.push("XID and ECC events counted".into());
    }
    let found = Found {
        gpus: readers.iter().map(|r| r.ident.clone()).collect(),
        notes,
        problems,
    };
    if init.send(Ok(found)).is_err() {
        return;
    }
    let mut counts = vec![Vec::new(); readers.len()];
    let mut lost = vec![false; readers.len()];
    let mut said = None;
    // Ends when the source is dropped (its sender closes).
    while let Ok(req) = requests.recv() {
        if let Err(e) = events.drain(&mut counts) {
            // A lost GPU makes NVML fail the whole set: the others are registered again.
            if matches!(e, NvmlError::GpuLost) {
                drop(events);
                events = Events::register(&nvml, &readers, &lost);
            }
            let why = format!("GPU events: {e}");
            if said.as_ref() != Some(&why) {
                tracing::warn!("{why}");
                said = Some(why);
            }
        }
        let gpus: Vec<Gpu> = readers
            .iter_mut()
            .zip(counts.iter_mut())
            .zip(lost.iter_mut())
            .map(|((r, c), lost)| {
                let mut g = r.read(&nvml, req.at, req.prev_tick, opts.processes);
                for e in std::mem::take(c) {
                    nodewatt_wire::count_event(&mut g.events, e.kind, e.code, e.count);
                }
                *lost = g.lost;
                g
            })
            .collect();
        if responses.send((req.at, gpus)).is_err() {
            return;
        }
    }
}

impl Source for NvmlSource {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn inventory(&self) -> Inventory {
        let names: Vec<String> = self
            .gpus
            .iter()
            .map(|g| format!("{} {} {}", g.index, g.model, g.uuid))
            .collect();
        Inventory {
            devices: self.gpus.len() as u32,
            summary: match names.len() {
                0 => "no GPUs".to_string(),
                n => format!("{n} GPUs: {}; {}", names.join("; "), self.notes.join("; ")),
            },
            problems: self.problems.clone(),
            unavailable: self.unavailable.clone(),
        }
    }

    fn read(&mut self, at: TickMs, out: &mut Sample) -> Result<u32, SourceError> {
        // The previous tick counts as the start of this span only if its reading came in
        // time: a late one was taken at some unknown instant after its tick.
        let prev_tick = self.prev_tick.take();
        let Some(w) = self.worker.as_mut() else {
            return Err(SourceError(self.unavailable.clone().unwrap_or_default()));
        };
        let mut late = None;
        if w.busy {
            // Collect the late answer to the earlier request, if it has come by now. Its
            // readings are stale; its events are not, and are counted in this sample.
            match w.responses.try_recv() {
                Ok((_, gpus)) => {
                    w.busy = false;
                    late = Some(gpus);
                }
                Err(TryRecvError::Disconnected) => return Err(self.stopped()),
                Err(TryRecvError::Empty) => {
                    self.stalled(out);
                    return Err(SourceError(
                        "NVML is still stuck in an earlier call; GPU readings skipped".into(),
                    ));
                }
            }
        }
        let result = match w.requests.try_send(Request { at, prev_tick }) {
            Ok(()) => match w.responses.recv_timeout(self.timeout) {
                Ok((_, gpus)) => Ok(gpus),
                Err(RecvTimeoutError::Timeout) => {
                    w.busy = true;
                    Err(SourceError(format!(
                        "NVML did not answer within {} ms; GPU readings skipped",
                        self.timeout.as_millis()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => Err(self.stopped()),
            },
            Err(TrySendError::Full(_)) => Err(SourceError("NVML thread is busy".into())),
            Err(TrySendError::Disconnected(_)) => Err(self.stopped()),
        };
        let first = out.gpus.len();
        let result = match result {
            Ok(gpus) => {
                self.prev_tick = Some(at);
                let n = gpus.len() as u32;
                out.gpus.extend(gpus);
                Ok(n)
            }
            Err(e) => {
                if self.worker.is_some() {
                    self.stalled(out);
                }
                Err(e)
            }
        };
        for old in late.into_iter().flatten() {
            if let Some(g) = out.gpus[first..]
                .iter_mut()
                .find(|g| g.index == old.index && g.uuid == old.uuid)
            {
                for e in old.events {
                    nodewatt_wire::count_event(&mut g.events, e.kind, e.code, e.count);
                }
            }
        }
        result
    }
}

impl NvmlSource {
    /// The NVML thread is gone (it panicked): said once, for good.
    fn stopped(&mut self) -> SourceError {
        self.worker = None;
        self.unavailable = Some("NVML thread has stopped".into());
        SourceError("NVML thread has stopped".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_errors_are_explained() {
        let lib = "libnvidia-ml.so.1";
        assert!(explain_init_error(&NvmlError::DriverNotLoaded, lib).contains("kernel driver"));
        assert!(explain_init_error(&NvmlError::NoPermission, lib).contains("/dev/nvidia"));
        let e = NvmlError::FailedToLoadSymbol("nvmlInit_v2: undefined symbol".into());
        let why = explain_init_error(&e, "/opt/x.so");
        assert!(why.contains("/opt/x.so is not an NVML library"), "{why}");
    }

    /// A worker that answers each request only when the test lets it, standing in for
    /// the NVML thread (whose calls can hang when a GPU falls off the bus).
    fn gated_source(timeout_ms: u64) -> (NvmlSource, SyncSender<()>) {
        let (req_tx, req_rx) = mpsc::sync_channel::<Request>(1);
        let (resp_tx, resp_rx) = mpsc::sync_channel(1);
        let (gate_tx, gate_rx) = mpsc::sync_channel::<()>(8);
        std::thread::spawn(move || {
            while let Ok(Request { at, .. }) = req_rx.recv() {
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
            gpus: vec![Gpu {
                index: 0,
                uuid: "GPU-x".into(),
                ..Gpu::default()
            }],
            notes: Vec::new(),
            problems: Vec::new(),
            timeout: Duration::from_millis(timeout_ms),
            prev_tick: None,
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
        // Each says which GPUs went unanswered.
        let mut s = crate::testutil::empty_sample();
        let err = src.read(2, &mut s).unwrap_err().to_string();
        assert!(err.contains("did not answer within 50 ms"), "{err}");
        assert_eq!(s.gpus.len(), 1);
        assert!(s.gpus[0].stalled && s.gpus[0].power_w.is_none());
        // (This answer comes from the path that neither sends nor waits.)
        let mut s = crate::testutil::empty_sample();
        let err = src.read(3, &mut s).unwrap_err().to_string();
        assert!(err.contains("still stuck"), "{err}");
        assert!(s.gpus.len() == 1 && s.gpus[0].stalled);

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
        let mut s = crate::testutil::empty_sample();

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
        let mut src = NvmlSource::start(NvmlOptions {
            library: None,
            timeout: Duration::from_secs(5),
            processes: true,
        });
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
