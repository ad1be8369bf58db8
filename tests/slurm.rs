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
    slurm.command("scancel", &[&long]);
    assert!(
        wait_until(Duration::from_secs(30), || ended(&long_file)),
        "cancelled job has no end"
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
