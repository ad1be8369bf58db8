//! The agent's NVML source end to end through the real library boundary: the agent binary
//! loads the repo's stand-in libnvidia-ml (`nvml-standin`, which exports NVML's C API with
//! its real structs and return codes) through `[nvml] library`, and each test gives it a
//! scenario: every field, unsupported and failing calls, a driver reload, a hang, a lost
//! GPU, XID events, GPM and init failures.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodewatt_wire::{GpuEventKind, Sample};

const BIN: &str = env!("CARGO_BIN_EXE_nodewatt-agent");

/// The stand-in library, built by cargo as this package's dev-dependency.
fn standin_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps, deps.parent().unwrap()]
        .iter()
        .map(|d| d.join("libnvml_standin.so"))
        .find(|p| p.exists())
        .expect("libnvml_standin.so is built with the agent's tests (dev-dependency)")
}

/// A private copy of the stand-in with its scenario beside it (so tests run in parallel,
/// each with its own library instance), and an agent config that loads it.
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn node(scenario: &str, interval: &str, extra: &str) -> Node {
    // The agent's own timeout (half the interval) is for nodes; a loaded test machine can
    // hold the NVML thread past 50 ms, and a stalled sample has no readings. Only the tests
    // of a hang set theirs.
    let extra = if extra.contains("timeout") {
        extra.to_string()
    } else {
        format!("timeout = \"10s\"\n{extra}")
    };
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(standin_library(), &lib).unwrap();
    std::fs::write(dir.path().join("nvml-standin.toml"), scenario).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ncluster = \"c\"\nnode = \"n1\"\ninterval = \"{interval}\"\n\
             [nvml]\nlibrary = {lib:?}\n{extra}\n\
             [cpu]\nenabled = false\n[rapl]\nenabled = false\n[hwmon]\nenabled = false\n\
             [thermal]\nenabled = false\n"
        ),
    )
    .unwrap();
    Node { dir, config }
}

impl Node {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn agent(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .env_remove("NVML_STANDIN_SCENARIO")
            .output()
            .expect("agent runs")
    }

    /// `run` on stdout for `count` samples.
    fn run(&self, count: usize) -> Vec<Sample> {
        let mut child = Command::new(BIN)
            .args(["run", "--stdout", "--config"])
            .arg(&self.config)
            .env_remove("NVML_STANDIN_SCENARIO")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Lines are read on a thread, so an agent that stops printing fails the test
        // after a minute instead of hanging it.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line.unwrap()).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut samples = Vec::new();
        while samples.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                break;
            };
            samples.push(Sample::from_json(line.as_bytes()).unwrap());
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(samples.len(), count);
        samples
    }
}

const GPU0: &str = "GPU-00000000-0000-0000-0000-000000000001";
const GPU1: &str = "GPU-00000000-0000-0000-0000-000000000002";
const MIG_OLD: &str = "MIG-00000000-0000-0000-0000-000000000011";
const MIG_NEW: &str = "MIG-00000000-0000-0000-0000-000000000013";
/// The instance beside the job's in the MIG billing scenarios.
const MIG_OTHER: &str = "MIG-00000000-0000-0000-0000-000000000012";

fn nvml_status(s: &Sample) -> &nodewatt_wire::SourceStatus {
    s.sources.iter().find(|x| x.name == "nvml").unwrap()
}

#[test]
fn every_field_is_read_through_the_library() {
    let n = node(
        &format!(
            r#"
[[gpu]]
uuid = "{GPU0}"
name = "NVIDIA H100 80GB HBM3"
pci_bus_id = "00000000:19:00.0"
power_w = 350.0
energy_start_mj = 5000000
power_limit_w = 700.0
temp_c = 45
mem_temp_c = 52
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
power_capped_fraction = 1.0
thermal_fraction = 0.5
[gpu.gpm]
sm_util = 60.0
sm_occupancy = 40.0
any_tensor_util = 50.0
dram_bw_util = 30.0
pcie_tx_per_sec = 100.0
pcie_rx_per_sec = 200.0
nvlink_total_rx_per_sec = 300.0
nvlink_total_tx_per_sec = 400.0

[[gpu]]
uuid = "{GPU1}"
name = "NVIDIA A100-SXM4-40GB"
pci_bus_id = "00000000:3B:00.0"
power_w = 100.0
not_supported = ["nvmlDeviceGetFieldValues", "nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetViolationStatus"]
failing = ["nvmlDeviceGetClockInfo"]
"#
        ),
        "100ms",
        "",
    );
    let samples = n.run(10);
    for s in &samples {
        assert!(nvml_status(s).ok, "{:?}", s.sources);
        assert_eq!(nvml_status(s).devices, 2);
    }
    let last = &samples[9];
    let (g, a) = (&last.gpus[0], &last.gpus[1]);
    assert_eq!((g.index, g.uuid.as_str()), (0, GPU0));
    assert_eq!(g.model, "NVIDIA H100 80GB HBM3");
    assert_eq!(g.pci_bus_id, "00000000:19:00.0");
    assert_eq!(g.power_w, Some(350.0));
    assert_eq!(g.power_limit_w, Some(700.0));
    assert_eq!(g.temp_c, Some(45.0));
    assert_eq!(g.mem_temp_c, Some(52.0));
    assert_eq!((g.util_pct, g.mem_util_pct), (Some(80.0), Some(30.0)));
    assert_eq!(g.mem_total_bytes, Some(85_899_345_920));
    assert_eq!(g.mem_used_bytes, Some(1_073_741_824));
    assert_eq!((g.sm_clock_mhz, g.mem_clock_mhz), (Some(1980), Some(2619)));
    assert_eq!(g.clock_event_reasons, Some(4));
    assert_eq!((g.ecc_corrected, g.ecc_uncorrected), (Some(3), Some(1)));
    assert_eq!(g.pids, vec![1234, 5678]);
    assert!(g.errors.is_empty() && !g.lost && !g.stalled, "{g:?}");
    // The energy counter rose by exactly what the deltas say, at 350 W.
    let e: Vec<u64> = samples
        .iter()
        .map(|s| s.gpus[0].energy_mj.unwrap())
        .collect();
    assert!(e[0] >= 5_000_000);
    for (w, s) in e.windows(2).zip(&samples[1..]) {
        assert_eq!(s.gpus[0].energy_delta_mj, Some(w[1] - w[0]));
    }
    // NVML's counters run on the real clock and each read comes some time after its tick:
    // tens of ms on a loaded machine, and one loaded run read a 100 ms span as 1680 W. A
    // span's watts and capped time say little alone; over the whole run they show the
    // units (mJ, not J or µJ) and which counter is which: 350 W, power-capped all along,
    // thermally half the time. Each span's capped time is clamped to the span.
    let run_ms: u64 = samples[1..].iter().map(|s| s.span_ms).sum();
    let watts = (e[e.len() - 1] - e[0]) as f64 / run_ms as f64;
    assert!((watts - 350.0).abs() < 175.0, "{watts} W over {run_ms} ms");
    let (mut power, mut thermal) = (0, 0);
    for s in &samples[1..] {
        let g = &s.gpus[0];
        let p = g.power_capped_ms.expect("capped time over every span");
        let t = g.thermal_capped_ms.expect("thermal time over every span");
        assert!(
            p <= s.span_ms && t <= s.span_ms,
            "{p}, {t} of {}",
            s.span_ms
        );
        (power, thermal) = (power + p, thermal + t);
    }
    assert!(power * 2 >= run_ms, "power-capped {power} of {run_ms} ms");
    assert!(
        thermal * 4 >= run_ms && thermal * 4 <= run_ms * 3,
        "thermal {thermal} of {run_ms} ms"
    );
    assert_eq!(samples[0].gpus[0].power_capped_ms, None, "no span yet");
    // GPM from the second sample on: the scenario's values, units as NVML's.
    assert!(samples[0].gpus[0].gpm.is_empty());
    let m = g.gpm;
    assert_eq!(m.sm_active_pct, Some(60.0));
    assert_eq!(m.sm_occupancy_pct, Some(40.0));
    assert_eq!(m.tensor_active_pct, Some(50.0));
    assert_eq!(m.dram_bw_pct, Some(30.0));
    assert_eq!(
        (m.pcie_tx_mibps, m.pcie_rx_mibps),
        (Some(100.0), Some(200.0))
    );
    assert_eq!(
        (m.nvlink_tx_mibps, m.nvlink_rx_mibps),
        (Some(400.0), Some(300.0))
    );

    // The other GPU: unsupported is absent without a word, a failing call is named.
    assert_eq!(a.uuid, GPU1);
    assert_eq!(a.power_w, Some(100.0));
    assert_eq!(a.mem_temp_c, None);
    assert_eq!((a.ecc_corrected, a.ecc_uncorrected), (None, None));
    assert_eq!((a.power_capped_ms, a.thermal_capped_ms), (None, None));
    assert_eq!((a.sm_clock_mhz, a.mem_clock_mhz), (None, None));
    assert!(a.gpm.is_empty(), "no GPM on this GPU");
    assert_eq!(a.errors.len(), 2, "{:?}", a.errors);
    assert!(
        a.errors.iter().all(|e| e.contains("clock: ")),
        "{:?}",
        a.errors
    );
}

#[test]
fn a_driver_reload_restarts_the_counter_and_no_delta_spans_it() {
    let n = node(
        &format!(
            "[[gpu]]\nuuid = \"{GPU0}\"\npower_w = 400.0\nenergy_start_mj = 900000000\n\
             reload_at_ms = 2000\n"
        ),
        "100ms",
        "",
    );
    // 2 s after the library loads: past a start-up slowed by a loaded machine, and well
    // inside the 3.5 s the samples span.
    let samples = n.run(35);
    let e: Vec<u64> = samples
        .iter()
        .map(|s| s.gpus[0].energy_mj.unwrap())
        .collect();
    let reset = e
        .windows(2)
        .position(|w| w[1] < w[0])
        .expect("the counter reset")
        + 1;
    assert!(e[reset] < 900_000_000);
    for (i, s) in samples.iter().enumerate().skip(1) {
        let d = s.gpus[0].energy_delta_mj;
        if i == reset {
            assert_eq!(d, None, "no delta across the reload");
        } else {
            assert_eq!(d, Some(e[i] - e[i - 1]), "sample {i}");
        }
    }
}

#[test]
fn a_hung_call_marks_gpus_stalled_then_readings_resume() {
    let n = node(
        &format!(
            "[[gpu]]\nuuid = \"{GPU0}\"\npower_w = 300.0\nhang_at_ms = 500\nhang_for_ms = 1000\n\
             [[gpu]]\nuuid = \"{GPU1}\"\npower_w = 300.0\n"
        ),
        "100ms",
        "timeout = \"50ms\"",
    );
    let started = Instant::now();
    let samples = n.run(30);
    // The agent kept its rhythm through the hang.
    assert!(started.elapsed() < Duration::from_secs(10));
    let stalled: Vec<&Sample> = samples.iter().filter(|s| !nvml_status(s).ok).collect();
    assert!(
        stalled.len() >= 5,
        "about 10 samples within the 1 s hang: {}",
        stalled.len()
    );
    for s in &stalled {
        let why = nvml_status(s).error.as_deref().unwrap();
        assert!(
            why.contains("did not answer within 50 ms") || why.contains("still stuck"),
            "{why}"
        );
        assert_eq!(s.gpus.len(), 2, "both GPUs said, as not answering");
        assert!(s.gpus.iter().all(|g| g.stalled && g.power_w.is_none()));
    }
    // After it, fresh readings of both GPUs.
    let last = samples.last().unwrap();
    assert!(nvml_status(last).ok);
    assert!(last
        .gpus
        .iter()
        .all(|g| !g.stalled && g.power_w == Some(300.0)));
}

#[test]
fn a_lost_gpu_is_said_once_per_sample_and_the_others_go_on() {
    let n = node(
        &format!(
            "[[gpu]]\nuuid = \"{GPU0}\"\npower_w = 300.0\nlost_at_ms = 600\n\
             [[gpu]]\nuuid = \"{GPU1}\"\npower_w = 200.0\n"
        ),
        "100ms",
        "",
    );
    let samples = n.run(15);
    let last = samples.last().unwrap();
    let (lost, ok) = (&last.gpus[0], &last.gpus[1]);
    assert!(lost.lost);
    assert_eq!((lost.power_w, lost.energy_mj), (None, None));
    assert!(lost.errors.is_empty(), "said by `lost`: {:?}", lost.errors);
    assert!(!ok.lost && ok.power_w == Some(200.0) && ok.energy_delta_mj.is_some());
    assert!(!samples[0].gpus[0].lost, "answering before");
}

/// The XID at 700 ms is taken from NVML's queue by the very request that then hangs: its
/// answer comes late and its readings are dropped, its events are not.
#[test]
fn every_xid_counts_by_code_none_lost_in_a_hang() {
    let n = node(
        &format!(
            r#"
[[gpu]]
uuid = "{GPU0}"
hang_at_ms = 700
hang_for_ms = 500
[[gpu.event]]
at_ms = 300
type = "xid"
data = 79
[[gpu.event]]
at_ms = 350
type = "xid"
data = 79
[[gpu.event]]
at_ms = 700
type = "xid"
data = 48
[[gpu.event]]
at_ms = 900
type = "double_bit_ecc"
data = 0
[[gpu.event]]
at_ms = 950
type = "pstate"
data = 0
[[gpu]]
uuid = "{GPU1}"
[[gpu.event]]
at_ms = 400
type = "xid"
data = 31
"#
        ),
        "100ms",
        "timeout = \"50ms\"",
    );
    let samples = n.run(25);
    let mut counts = std::collections::BTreeMap::new();
    for s in &samples {
        for g in &s.gpus {
            for e in &g.events {
                *counts.entry((g.index, e.kind, e.code)).or_insert(0) += e.count;
            }
        }
    }
    let want = [
        ((0, GpuEventKind::Xid, 79), 2),
        ((0, GpuEventKind::Xid, 48), 1),
        ((0, GpuEventKind::DoubleBitEcc, 0), 1),
        ((1, GpuEventKind::Xid, 31), 1),
    ];
    assert_eq!(
        counts,
        want.into_iter().collect(),
        "pstate changes are not counted"
    );
}

#[test]
fn init_failures_are_explained_and_the_agent_runs_on() {
    let n = node("init_error = \"driver_not_loaded\"\n", "100ms", "");
    let out = n.agent(&["check"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("the NVIDIA kernel driver is not loaded"),
        "{text}"
    );

    let n = node("", "100ms", "");
    std::fs::remove_file(n.path().join("libnvidia-ml.so.1")).unwrap();
    let out = n.agent(&["check"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("cannot load"), "{text}");
    assert!(
        text.contains("libnvidia-ml.so.1"),
        "names the library: {text}"
    );
    let samples = n.run(2);
    assert!(samples
        .iter()
        .all(|s| !nvml_status(s).ok && s.gpus.is_empty()));
}

#[test]
fn check_names_the_gpus_gpm_and_events() {
    let n = node(
        &format!(
            "[[gpu]]\nuuid = \"{GPU0}\"\nname = \"NVIDIA H100 80GB HBM3\"\n[gpu.gpm]\nsm_util = 1.0\n\
             [[gpu]]\nuuid = \"{GPU1}\"\n"
        ),
        "100ms",
        "",
    );
    let out = n.agent(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("0 NVIDIA H100 80GB HBM3 {GPU0}")),
        "{text}"
    );
    assert!(text.contains("GPM on 1 of 2 GPUs"), "{text}");
    assert!(text.contains("XID and ECC events counted"), "{text}");
}

#[test]
fn mig_devices_are_found_with_their_memory_and_gpm() {
    let n = node(
        &format!(
            r#"
[[gpu]]
uuid = "{GPU0}"
power_w = 500.0
[gpu.gpm]
sm_util = 70.0
[[gpu.mig]]
uuid = "MIG-00000000-0000-0000-0000-000000000011"
gpu_instance_id = 1
compute_instance_id = 0
slices = 3
memory_mb = 40192
mem_used_bytes = 1073741824
[gpu.mig.gpm]
sm_util = 90.0
any_tensor_util = 80.0
[[gpu.mig]]
uuid = "MIG-00000000-0000-0000-0000-000000000012"
gpu_instance_id = 2
slices = 4
memory_mb = 40192
"#
        ),
        "200ms",
        "",
    );
    let out = n.agent(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("2 MIG devices"), "{text}");

    let samples = n.run(3);
    let g = &samples[2].gpus[0];
    assert!(g.errors.is_empty(), "{:?}", g.errors);
    assert_eq!(g.power_w, Some(500.0), "power is the whole GPU's");
    assert_eq!(g.gpm.sm_active_pct, Some(70.0));
    assert_eq!(g.mig.len(), 2);
    let (a, b) = (&g.mig[0], &g.mig[1]);
    assert_eq!(a.uuid, "MIG-00000000-0000-0000-0000-000000000011");
    assert_eq!(
        (a.gpu_instance_id, a.compute_instance_id, a.slices),
        (1, 0, Some(3))
    );
    assert_eq!(a.mem_total_bytes, Some(40192 << 20));
    assert_eq!(a.mem_used_bytes, Some(1 << 30));
    assert_eq!(a.gpm.sm_active_pct, Some(90.0));
    assert_eq!(a.gpm.tensor_active_pct, Some(80.0));
    assert_eq!(a.gpm.dram_bw_pct, None, "not measured: absent, not 0");
    assert_eq!((b.gpu_instance_id, b.slices), (2, Some(4)));
    assert!(b.gpm.is_empty(), "this instance has no GPM");
}

/// A job registry holding job `id` of proj-mig on one MIG device, started 10 s ago, and
/// the `[jobs]` config that reads it.
fn mig_job(id: &str, mig_uuid: &str) -> (tempfile::TempDir, String) {
    let jobs = tempfile::tempdir().unwrap();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let start_ms = nodewatt_common::now_ms() - 10_000;
    std::fs::write(
        jobs.path().join(format!("{id}.job")),
        format!("job={id}\nproject=proj-mig\nuser=alice\ngpus={mig_uuid}\nstart_ms={start_ms}\n"),
    )
    .unwrap();
    let config = format!("[jobs]\ndir = {:?}\nowner_uid = {me}\n", jobs.path());
    (jobs, config)
}

/// The job's usage in `s`, for a 3-slice instance at 90 % SM activity beside a 2-slice
/// one at 30 % on a 7-slice GPU: 2700/3300 of the GPU's energy and 3/7 of the span.
fn assert_share_of_3_slices_at_90(s: &Sample, job: nodewatt_wire::Amounts) {
    let delta_uj = s.gpus[0].energy_delta_mj.unwrap() * 1000;
    assert!(delta_uj > 0);
    let share = delta_uj as f64 * 2700.0 / 3300.0;
    assert!(
        (job.gpu_uj as f64 - share).abs() <= 1.0,
        "{job:?} vs {share}"
    );
    let slices = s.span_ms as f64 * 3.0 / 7.0;
    assert!((job.gpu_ms as f64 - slices).abs() <= 1.0, "{job:?}");
}

#[test]
fn a_job_holding_a_mig_instance_is_billed_its_share_of_the_gpu() {
    let (_jobs, jobs_config) = mig_job("7", MIG_OLD);
    // Instance 1: 3 slices at 90 % SM activity; instance 2: 2 slices at 30 %; 2 of the 7
    // slices unheld. Energy goes 2700 : 600, time 3 : 2 : 2 (idle).
    let n = node(
        &format!(
            r#"
[[gpu]]
uuid = "{GPU0}"
power_w = 700.0
mig_slices = 7
[[gpu.mig]]
uuid = "{MIG_OLD}"
gpu_instance_id = 1
slices = 3
[gpu.mig.gpm]
sm_util = 90.0
any_tensor_util = 50.0
[[gpu.mig]]
uuid = "{MIG_OTHER}"
gpu_instance_id = 2
slices = 2
[gpu.mig.gpm]
sm_util = 30.0
"#
        ),
        "200ms",
        &jobs_config,
    );
    let samples = n.run(5);
    assert_eq!(samples[4].gpus[0].mig_slices, Some(7));
    // From the third sample on, both instances have a GPM span.
    for s in &samples[2..] {
        let job = s.usage.iter().find(|u| u.job.as_deref() == Some("7"));
        let job = job.expect("the job is billed").amounts;
        let idle = s
            .usage
            .iter()
            .find(|u| u.project == "_idle")
            .unwrap()
            .amounts;
        let delta_uj = s.gpus[0].energy_delta_mj.unwrap() * 1000;
        assert_eq!(job.gpu_uj + idle.gpu_uj, delta_uj, "conserved");
        assert_eq!(job.gpu_ms + idle.gpu_ms, s.span_ms);
        assert_share_of_3_slices_at_90(s, job);
        // Its instance's tensor cores were busy half the time; neither instance idle.
        assert_eq!(job.gpu_tensor_us, job.gpu_ms * 500);
        assert_eq!((job.gpu_idle_uj, idle.gpu_tensor_us), (0, 0));
    }
}

/// MIG instances are destroyed and created between jobs while the agent runs: at 2 s
/// (well after a start slowed by a loaded machine) instance 1 goes and instance 3, the
/// job's, comes. The agent reads the layout again as soon as a device stops answering,
/// and bills the job its share from then on.
#[test]
fn a_mig_instance_created_while_running_is_found_and_billed() {
    let (_jobs, jobs_config) = mig_job("8", MIG_NEW);
    let n = node(
        &format!(
            r#"
[[gpu]]
uuid = "{GPU0}"
power_w = 700.0
mig_slices = 7
[[gpu.mig]]
uuid = "{MIG_OLD}"
gpu_instance_id = 1
slices = 3
until_ms = 2000
[gpu.mig.gpm]
sm_util = 90.0
[[gpu.mig]]
uuid = "{MIG_OTHER}"
gpu_instance_id = 2
slices = 2
[gpu.mig.gpm]
sm_util = 30.0
[[gpu.mig]]
uuid = "{MIG_NEW}"
gpu_instance_id = 3
slices = 3
from_ms = 2000
[gpu.mig.gpm]
sm_util = 90.0
"#
        ),
        "200ms",
        &jobs_config,
    );
    let samples = n.run(25);
    let has = |s: &Sample, uuid: &str| s.gpus[0].mig.iter().any(|m| m.uuid == uuid);
    let job = |s: &Sample| {
        s.usage
            .iter()
            .find(|u| u.job.as_deref() == Some("8"))
            .map(|u| u.amounts)
            .unwrap_or_default()
    };
    let k = samples
        .iter()
        .position(|s| has(s, MIG_NEW))
        .expect("the new instance was found");
    assert!(k >= 2, "not there at the start");
    // The sample that found the old instance gone, then the new layout.
    let gone = &samples[k - 1].gpus[0];
    assert!(has(&samples[k - 1], MIG_OLD), "{gone:?}");
    assert!(
        gone.errors
            .iter()
            .any(|e| e.starts_with("mig 1 memory_info")),
        "{:?}",
        gone.errors
    );
    for s in &samples[k..] {
        assert!(!has(s, MIG_OLD) && s.gpus[0].mig.len() == 2);
        assert_eq!(s.gpus[0].mig_slices, Some(7));
    }
    // Nothing for the job before its instance existed; its share once it has a GPM span.
    for s in &samples[1..k] {
        assert_eq!(job(s).gpu_uj, 0);
    }
    for s in &samples[k + 1..] {
        assert_share_of_3_slices_at_90(s, job(s));
    }
}

#[test]
fn a_mig_layout_past_the_gpus_slices_is_said_and_not_sent() {
    // Instances of 3 and 2 slices on a GPU whose largest profile has 4 slices.
    let n = node(
        &format!(
            r#"
[[gpu]]
uuid = "{GPU0}"
mig_slices = 4
[[gpu.mig]]
uuid = "MIG-00000000-0000-0000-0000-000000000011"
gpu_instance_id = 1
slices = 3
[[gpu.mig]]
uuid = "MIG-00000000-0000-0000-0000-000000000012"
gpu_instance_id = 2
slices = 2
"#
        ),
        "200ms",
        "",
    );
    let out = n.agent(&["check"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(
            "MIG slices of the GPU unknown (profiles say Some(4), instances hold Some(5))"
        ),
        "{text}"
    );
    let samples = n.run(2);
    let g = &samples[1].gpus[0];
    assert_eq!(
        (g.mig.len(), g.mig_slices),
        (2, None),
        "the wire would refuse 5 of 4"
    );
}
