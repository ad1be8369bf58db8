//! The Slurm prolog and epilog (config/slurm/) against a real single-node Slurm: jobs
//! submitted with an account and GPUs appear in the registry, the agent bills them, and
//! their end is recorded when they end or are cancelled.

use std::time::Duration;

use nodewatt_tests::*;

const DB: &str = "nodewatt_slurm";

#[test]
fn prolog_and_epilog_feed_the_registry_and_the_agent_bills_the_job() {
    let slurm = Slurm::start();
    let Stack {
        mq,
        db,
        collector_cfg,
        collector,
    } = Stack::start("slurm", DB);
    let text = agent_config(
        "lab",
        "node-s",
        "100ms",
        mq.port,
        &[400.0, 400.0, 400.0, 400.0],
    ) + &format!("[jobs]\ndir = {:?}\ntotals_interval = \"1s\"\n", slurm.jobs);
    let a = config_file("agent.toml", &text);

    // Before any job: the registry does not exist yet, and check follows slurm.conf's
    // Prolog (a wrapper that sets NODEWATT_JOBS_DIR) to the shipped script.
    let check = std::process::Command::new(bin("nodewatt-agent"))
        .args(["check", "--strict", "--config"])
        .arg(&a.path)
        .env("SLURM_CONF", slurm.dir.path().join("slurm.conf"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}");
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/slurm");
    for want in [
        format!(
            "prolog     ok           {} writes to {}",
            shipped.join("prolog").canonicalize().unwrap().display(),
            slurm.jobs.display()
        ),
        format!(
            "epilog     ok           {}",
            shipped.join("epilog").canonicalize().unwrap().display()
        ),
        format!(
            "jobs       ok           no jobs yet: the prolog creates {} at the first job",
            slurm.jobs.display()
        ),
    ] {
        assert!(said.contains(&want), "missing {want:?} in:\n{said}");
    }
    // Without SLURM_CONF, check reads the slurm.conf the running slurmd was started with
    // (`-f`): a proc root whose only process is this cluster's slurmd, as others may run.
    let proc = tempfile::tempdir().unwrap();
    let pid = slurm.slurmd_pid().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == pid || !name.bytes().all(|b| b.is_ascii_digit()) {
            std::os::unix::fs::symlink(e.path(), proc.path().join(&name)).unwrap();
        }
    }
    let only_slurmd = config_file(
        "agent-proc.toml",
        &text.replace(
            "[agent]\n",
            &format!("[agent]\nproc_root = {:?}\n", proc.path()),
        ),
    );
    let check = std::process::Command::new(bin("nodewatt-agent"))
        .args(["check", "--config"])
        .arg(&only_slurmd.path)
        .env_remove("SLURM_CONF")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    let want = format!(
        "prolog     ok           {} writes to {}",
        shipped.join("prolog").canonicalize().unwrap().display(),
        slurm.jobs.display()
    );
    assert!(
        said.contains(&want),
        "missing {want:?} in:\n{said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut agent = start_agent(&a, 1_000_000);

    // Slurm lowercases account names; two of the four fake GPUs.
    let job = slurm.sbatch(&["--account=Proj-Slurm", "--gres=gpu:2", "--wrap", "sleep 3"]);
    let file = slurm.jobs.join(format!("{job}.job"));
    assert!(
        wait_until(Duration::from_secs(20), || file.exists()),
        "prolog wrote no registry file"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    for want in [
        format!("job={job}\n"),
        "project=proj-slurm\n".into(),
        "user=root\n".into(),
        "gpus=0,1\n".into(),
    ] {
        assert!(text.contains(&want), "{want:?} missing from:\n{text}");
    }
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (0, 0o644),
            "root-owned, not writable by others"
        );
    }
    let ended = |f: &std::path::Path| {
        std::fs::read_to_string(f).is_ok_and(|t| t.lines().any(|l| l.starts_with("end_ms=")))
    };
    assert!(
        wait_until(Duration::from_secs(30), || ended(&file)),
        "epilog recorded no end"
    );

    // A cancelled job's file disappears too.
    let long = slurm.sbatch(&[
        "--account=proj-cancel",
        "--gres=gpu:1",
        "--wrap",
        "sleep 300",
    ]);
    let long_file = slurm.jobs.join(format!("{long}.job"));
    assert!(wait_until(Duration::from_secs(20), || long_file.exists()));
    // Cancelled once it runs (its prolog done), and again every few seconds while it is
    // still queued: a loaded slurmctld may not take the first request.
    let state = || slurm.command("squeue", &["-h", "-j", &long, "-o", "%T"]);
    assert!(
        wait_until(Duration::from_secs(30), || state().trim() == "RUNNING"),
        "job {long} never ran: {:?}",
        state()
    );
    let mut asked: Option<std::time::Instant> = None;
    let cancelled = wait_until(Duration::from_secs(60), || {
        if ended(&long_file) {
            return true;
        }
        if asked.is_none_or(|at| at.elapsed() > Duration::from_secs(5)) {
            slurm.command("scancel", &[&long]);
            asked = Some(std::time::Instant::now());
        }
        false
    });
    assert!(
        cancelled,
        "cancelled job has no end; squeue says {:?}\n{}",
        state(),
        slurm.logs()
    );

    // The agent sent the job's final total at its end.
    let billed = wait_until(Duration::from_secs(20), || {
        db.rows(
            DB,
            &format!(
                "SELECT ended, gpus, energy_gpu_uj, gpu_ms FROM job_total WHERE job = '{job}'"
            ),
        )
        .first()
        .is_some_and(|(_, r)| r["ended"] == true)
    });
    assert!(
        billed,
        "no final total for job {job}:\n{}\n{}",
        agent.log(),
        collector.log()
    );
    let row = db.rows(
        DB,
        &format!("SELECT ended, gpus, energy_gpu_uj, gpu_ms FROM job_total WHERE job = '{job}'"),
    );
    let r = &row[0].1;
    assert_eq!(r["gpus"], "0,1");
    // About 3 s on two GPUs at 400 W each: 2.4 kJ, give or take the job's start-up.
    let gpu_s = r["gpu_ms"].as_f64().unwrap() / 1000.0;
    let energy_j = r["energy_gpu_uj"].as_f64().unwrap() / 1e6;
    assert!((4.0..=10.0).contains(&gpu_s), "GPU time {gpu_s} s");
    assert!(
        (energy_j - 400.0 * gpu_s).abs() < 1.0,
        "{energy_j} J for {gpu_s} GPU-seconds at 400 W"
    );

    // And the billing command shows the project.
    let now = std::time::SystemTime::now();
    let rfc = |t: std::time::SystemTime| humantime::format_rfc3339(t).to_string();
    let (from, to) = (
        rfc(now - Duration::from_secs(600)),
        rfc(now + Duration::from_secs(60)),
    );
    let csv = collector_cli(
        &collector_cfg,
        &[
            "usage", "--by", "project", "--format", "csv", "--from", &from, "--to", &to,
        ],
    );
    assert!(
        csv.lines().any(|l| l.starts_with("proj-slurm,proj-slurm,")),
        "{csv}"
    );
    agent.stop_cleanly();
}

/// The epilog on its own: it adds the end instant to the job's file, leaves running jobs'
/// files alone however old, and removes ended files after an hour.
#[test]
fn the_epilog_records_the_end_and_removes_ended_files_after_an_hour() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, text: &str, age_min: u64| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        let t = std::time::SystemTime::now() - Duration::from_secs(age_min * 60);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    };
    write("7.job", "job=7\nstart_ms=1\n", 0);
    write("8.job", "job=8\nstart_ms=1\n", 120); // running for two hours
    write("9.job", "job=9\nstart_ms=1\nend_ms=2\n", 120); // ended two hours ago
    write("10.job", "job=10\nstart_ms=1\nend_ms=2\n", 10); // ended ten minutes ago
    let epilog = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/slurm/epilog");
    let before = nodewatt_common::now_ms();
    let status = std::process::Command::new(epilog)
        .env_clear()
        .env("SLURM_JOB_ID", "7")
        .env("NODEWATT_JOBS_DIR", d)
        .status()
        .unwrap();
    assert!(status.success());
    let seven = std::fs::read_to_string(d.join("7.job")).unwrap();
    let end: u64 = seven
        .lines()
        .find_map(|l| l.strip_prefix("end_ms="))
        .expect("end recorded")
        .parse()
        .unwrap();
    assert!((before..=nodewatt_common::now_ms()).contains(&end), "{end}");
    assert!(seven.starts_with("job=7\nstart_ms=1\n"), "{seven}");
    assert!(d.join("8.job").exists(), "a running job's file stays");
    assert!(!d.join("9.job").exists(), "ended over an hour ago: removed");
    assert!(d.join("10.job").exists(), "ended recently: kept");
    // A second run (a retried epilog) records nothing twice.
    std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/slurm/epilog"),
    )
    .env_clear()
    .env("SLURM_JOB_ID", "7")
    .env("NODEWATT_JOBS_DIR", d)
    .status()
    .unwrap();
    let again = std::fs::read_to_string(d.join("7.job")).unwrap();
    assert_eq!(again, seven);
}
