//! The agent binary end to end on the fixture tree: golden `once` output, `check`, `run`
//! and configuration errors.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodewatt_wire::Sample;

const BIN: &str = env!("CARGO_BIN_EXE_nodewatt-agent");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("agent runs")
}

/// Read durations are the only non-deterministic part of a fixed-clock sample.
fn normalise(mut s: Sample) -> Sample {
    for src in &mut s.sources {
        src.read_us = 0;
    }
    s
}

/// golden.toml with the fixture's job registry trusted for whoever runs the test (the
/// registry accepts files of one owner only; production uses root).
fn golden_config() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("golden.toml")).unwrap();
    let node = fixtures().join("node");
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let text = text
        .replace("\"node/sys\"", &format!("{:?}", node.join("sys")))
        .replace("\"node/proc\"", &format!("{:?}", node.join("proc")))
        .replace(
            "\"node/run/nodewatt/jobs\"",
            &format!("{:?}", node.join("run/nodewatt/jobs")),
        )
        .replace("owner_uid = 0", &format!("owner_uid = {me}"));
    let path = dir.path().join("golden.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Set NODEWATT_UPDATE_GOLDEN=1 to rewrite tests/golden/once.json after an intended change.
#[test]
fn once_matches_golden_file() {
    let (_dir, config) = golden_config();
    let out = agent(&[
        "once",
        "--config",
        config.to_str().unwrap(),
        "--pretty",
        "--fake-time-ms",
        "1763700000500",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sample = normalise(Sample::from_json(&out.stdout).expect("once prints a valid sample"));
    // Error texts name files; keep the checkout's location out of the golden file.
    let actual = (serde_json::to_string_pretty(&sample).unwrap() + "\n")
        .replace(fixtures().to_str().unwrap(), "<fixtures>");

    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/once.json");
    if std::env::var_os("NODEWATT_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&golden)
        .expect("golden file exists (NODEWATT_UPDATE_GOLDEN=1 creates it)");
    assert_eq!(
        actual,
        expected,
        "once output differs from {}; if intended, rerun with NODEWATT_UPDATE_GOLDEN=1",
        golden.display()
    );

    // What the golden file must show, independent of its exact bytes.
    assert_eq!(sample.node, "fixture-node", "node name from the host name");
    assert_eq!(
        sample.ts_ms, 1_763_700_002_000,
        "second aligned tick after the start"
    );
    assert_eq!(sample.seq, 0);
    let names: Vec<&str> = sample.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["simulated", "cpu", "rapl", "hwmon", "thermal"]);
    assert!(sample.sources.iter().all(|s| s.ok));
    assert_eq!(sample.gpus.len(), 2);
    assert_eq!(sample.rapl.len(), 5);
    assert_eq!(sample.hwmon.len(), 10);
    assert_eq!(sample.thermal.len(), 2);
    assert_eq!(sample.cpu.as_ref().unwrap().jobs.len(), 2);
    // GPU 0 belongs to job 1001 of proj-a; GPU 1 to nobody.
    let a = sample.usage.iter().find(|u| u.project == "proj-a").unwrap();
    assert_eq!(a.job.as_deref(), Some("1001"));
    assert_eq!(a.amounts.gpu_uj, 350_000_000);
    let idle = sample.usage.iter().find(|u| u.project == "_idle").unwrap();
    assert_eq!(idle.amounts.gpu_uj, 100_000_000);
    assert_eq!(sample.accounting.unwrap().jobs, 2);
}

#[test]
fn once_is_one_json_line_by_default() {
    let (_dir, config) = golden_config();
    let out = agent(&[
        "once",
        "-c",
        config.to_str().unwrap(),
        "--fake-time-ms",
        "1000",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1);
    Sample::from_json(text.as_bytes()).unwrap();
}

/// A slurm.conf in `dir` whose Prolog and Epilog are wrappers that run the shipped
/// scripts (config/slurm/) with NODEWATT_JOBS_DIR=`jobs`, as docs/slurm.md shows.
fn slurm_conf(dir: &Path, jobs: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/slurm");
    for hook in ["prolog", "epilog"] {
        let wrapper = dir.join(format!("site-{hook}"));
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nNODEWATT_JOBS_DIR={} exec {}\n",
                jobs.display(),
                shipped.join(hook).display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let conf = dir.join("slurm.conf");
    std::fs::write(
        &conf,
        format!(
            "ClusterName=fixture\nProlog={}\nEpilog={}\n",
            dir.join("site-prolog").display(),
            dir.join("site-epilog").display()
        ),
    )
    .unwrap();
    conf
}

fn check_with_slurm(config: &Path, slurm_conf: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["check", "--strict", "--config"])
        .arg(config)
        .env("SLURM_CONF", slurm_conf)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn check_lists_sources_devices_and_reasons() {
    let (dir, config) = golden_config();
    let jobs = fixtures().join("node/run/nodewatt/jobs");
    let (code, text) = check_with_slurm(&config, &slurm_conf(dir.path(), &jobs));
    assert_eq!(code, Some(0), "{text}");
    for want in [
        "cluster fixture, node fixture-node, interval 1s",
        "simulated  ok           SIMULATED: 2 GPUs, 0 RAPL domains (not real hardware)",
        "cpu        ok           4 CPUs; cgroup v2",
        "2 job cgroups",
        "rapl       ok           5 domains: intel-rapl:0 package-0, intel-rapl:0:0 core, intel-rapl:0:1 dram, intel-rapl:1 package-1, intel-rapl:2 psys",
        "hwmon      ok           7 chips: 5 temperature, 2 fan, 1 power, 2 energy sensors",
        "thermal    ok           2 zones: acpitz, x86_pkg_temp",
        "jobs       ok           2 jobs in ",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/slurm");
    for hook in ["prolog", "epilog"] {
        let want = format!(
            "{hook:<10} ok           {} writes to {}",
            shipped.join(hook).display(),
            jobs.display()
        );
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
}

/// The prolog writes one directory, the agent reads another: nothing would ever be
/// billed to a job, so --strict fails and says which to change.
#[test]
fn check_fails_when_the_prolog_writes_elsewhere_or_slurm_is_not_found() {
    let (dir, config) = golden_config();
    let elsewhere = dir.path().join("other-jobs");
    let (code, text) = check_with_slurm(&config, &slurm_conf(dir.path(), &elsewhere));
    assert_eq!(code, Some(1), "{text}");
    let want = format!(
        "writes to {}, but [jobs] dir is {}: set [jobs] dir, or NODEWATT_JOBS_DIR in a wrapper",
        elsewhere.display(),
        fixtures().join("node/run/nodewatt/jobs").display()
    );
    assert!(text.contains(&want), "missing {want:?} in:\n{text}");

    let (code, text) = check_with_slurm(&config, &dir.path().join("no-slurm.conf"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("prolog     PROBLEM      SLURM_CONF names ")
            && text.contains("which is not a file"),
        "{text}"
    );
}

#[test]
fn check_strict_fails_when_a_source_is_unavailable() {
    // A sys root with no powercap, hwmon or thermal classes.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sys")).unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\ncluster = \"c\"\nnode = \"n\"\nsys_root = \"sys\"\nproc_root = {:?}\n[nvml]\nenabled = false\n",
            fixtures().join("node/proc")
        ),
    )
    .unwrap();
    let loose = agent(&["check", "-c", cfg.to_str().unwrap()]);
    assert!(loose.status.success());
    let strict = agent(&["check", "-c", cfg.to_str().unwrap(), "--strict"]);
    assert_eq!(strict.status.code(), Some(1));
    let text = String::from_utf8(strict.stdout).unwrap();
    assert!(
        text.contains("rapl       UNAVAILABLE  no powercap zones"),
        "{text}"
    );
}

#[test]
fn config_errors_name_the_problem_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[agent]\ncluster = \"c\"\nintervall = \"1s\"\n").unwrap();
    let out = agent(&["once", "-c", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("unknown field `intervall`"), "{err}");
    assert!(err.contains("agent.toml"), "{err}");

    let out = agent(&["check", "-c", "/nonexistent/agent.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("cannot read config"));

    std::fs::write(
        &cfg,
        "[agent]\ncluster = \"c\"\nnode = \"n\"\nsys_root = \"/nonexistent\"\n",
    )
    .unwrap();
    let out = agent(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("agent.sys_root /nonexistent is not a directory"),
        "{err}"
    );
}

/// `run` at a 20 ms interval: consecutive sequence numbers on consecutive aligned ticks.
#[test]
fn run_emits_aligned_consecutive_samples() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    let golden = std::fs::read_to_string(fixtures().join("golden.toml")).unwrap();
    let node = fixtures().join("node");
    let text = golden
        .replace("interval = \"1s\"", "interval = \"20ms\"")
        .replace("\"node/sys\"", &format!("{:?}", node.join("sys")))
        .replace("\"node/proc\"", &format!("{:?}", node.join("proc")));
    std::fs::write(&cfg, text).unwrap();

    let mut child = Command::new(BIN)
        .args(["run", "-c", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 10 && started.elapsed() < Duration::from_secs(30) {
        let line = lines.next().expect("agent keeps running").unwrap();
        samples.push(Sample::from_json(line.as_bytes()).unwrap());
    }
    child.kill().unwrap();
    child.wait().unwrap();

    assert_eq!(samples.len(), 10);
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s.seq, i as u64);
        assert_eq!(s.ts_ms % 20, 0, "aligned to the interval");
        assert_eq!(s.interval_ms, 20);
    }
    // A loaded machine may skip a tick, never repeat or reorder one.
    assert!(samples.windows(2).all(|w| w[1].ts_ms > w[0].ts_ms));
    // Simulated energy advances exactly as power x elapsed time (350 W = 350 mJ/ms).
    let (a, b) = (&samples[0], &samples[9]);
    let de = b.gpus[0].energy_mj.unwrap() - a.gpus[0].energy_mj.unwrap();
    assert_eq!(de, 350 * (b.ts_ms - a.ts_ms));
    // From the second sample on, CPU utilisation and RAPL power are rates.
    assert!(samples[1].rapl.iter().all(|d| d.power_w == Some(0.0)));
}

#[test]
fn check_names_what_would_cost_money_before_it_does() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\ncluster = \"mycluster\"\nnode = \"n\"\nsys_root = {sys:?}\nproc_root = {proc:?}\n\
             state_file = \"/nonexistent/state.json\"\n[nvml]\nenabled = false\n\
             [jobs]\ndir = \"jobs-not-there\"\n[outbox]\nspool_dir = \"/nonexistent/spool\"\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n",
            sys = fixtures().join("node/sys"),
            proc = fixtures().join("node/proc"),
        ),
    )
    .unwrap();
    let out = agent(&["check", "-c", cfg.to_str().unwrap(), "--strict"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    for want in [
        "cluster    PROBLEM      cluster is the example's placeholder \"mycluster\"",
        "jobs       PROBLEM      job registry ",
        "jobs-not-there does not exist",
        "state      PROBLEM      agent.state_file: cannot write in /nonexistent",
        "spool      PROBLEM      outbox.spool_dir: cannot write in /nonexistent",
        &format!("broker     PROBLEM      MQTT broker mqtt://127.0.0.1:{port}: "),
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

/// `run --stdout` stops on SIGTERM as it does with a broker: a last sample, billed up to
/// the stop, with every running job's total (totals are otherwise sent each minute), and
/// exit 0.
#[test]
fn stdout_mode_stops_with_a_last_sample_carrying_running_jobs_totals() {
    let (dir, golden) = golden_config();
    let cfg = dir.path().join("fast.toml");
    let text = std::fs::read_to_string(&golden)
        .unwrap()
        .replace("interval = \"1s\"", "interval = \"100ms\"");
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--stdout", "-c", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut samples = Vec::new();
    for _ in 0..3 {
        let line = lines.next().expect("a sample").unwrap();
        samples.push(Sample::from_json(line.as_bytes()).unwrap());
    }
    // Running totals ride only on a sample that crosses a totals boundary (every 60 s).
    let minute = |s: &Sample| s.ts_ms / 60_000;
    assert!(samples[0].job_totals.is_empty());
    for w in samples.windows(2) {
        if minute(&w[0]) == minute(&w[1]) {
            assert!(w[1].job_totals.is_empty(), "{:?}", w[1].job_totals);
        }
    }
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let rest: Vec<Sample> = lines
        .map(|l| Sample::from_json(l.unwrap().as_bytes()).unwrap())
        .collect();
    assert!(child.wait().unwrap().success());
    let last = rest.last().expect("a last sample at the stop");
    let jobs: Vec<&str> = last.job_totals.iter().map(|t| t.job.as_str()).collect();
    assert!(jobs.contains(&"1001"), "{jobs:?}");
}
