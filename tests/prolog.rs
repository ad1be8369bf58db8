//! The Slurm prolog run directly, with the environment slurmd gives it: what it writes in
//! the job registry for whole GPUs and for MIG devices. (`tests/slurm.rs` runs it under a
//! real slurmd, which needs root and cannot give MIG devices.)

use std::path::Path;
use std::process::Command;

fn prolog(jobs: &Path, env: &[(&str, &str)]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/slurm/prolog");
    let out = Command::new("sh")
        .arg(script)
        .env_clear()
        .env("NODEWATT_JOBS_DIR", jobs)
        .env("SLURM_JOB_ID", "42")
        .env("SLURM_JOB_ACCOUNT", "proj-a")
        .env("SLURM_JOB_USER", "alice")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::read_to_string(jobs.join("42.job")).unwrap()
}

fn gpus(file: &str) -> &str {
    file.lines()
        .find_map(|l| l.strip_prefix("gpus="))
        .expect("a gpus line")
}

#[test]
fn whole_gpus_are_slurms_indices() {
    let jobs = tempfile::tempdir().unwrap();
    let env = [("SLURM_JOB_GPUS", "0,1"), ("CUDA_VISIBLE_DEVICES", "0,1")];
    assert_eq!(gpus(&prolog(jobs.path(), &env)), "0,1");
    let env = [("CUDA_VISIBLE_DEVICES", "2")];
    assert_eq!(gpus(&prolog(jobs.path(), &env)), "2", "the fallback");
    assert_eq!(gpus(&prolog(jobs.path(), &[])), "", "no GPUs");
}

#[test]
fn mig_devices_are_their_uuids_not_slurms_gres_indices() {
    let jobs = tempfile::tempdir().unwrap();
    let mig = "MIG-6f2b7c1e-1a2b-5c3d-9e8f-0123456789ab,MIG-0a1b2c3d-4e5f-5061-8273-8495a6b7c8d9";
    let env = [("SLURM_JOB_GPUS", "3,4"), ("CUDA_VISIBLE_DEVICES", mig)];
    let file = prolog(jobs.path(), &env);
    assert_eq!(gpus(&file), mig);
    assert!(file.contains("project=proj-a\n"), "{file}");
    // Old drivers' names hold '/', which no job file may: left out, the job still billed.
    let old = "MIG-GPU-5140a7ed-0000-4000-8000-000000000000/1/0";
    let env = [
        ("SLURM_JOB_GPUS", "3"),
        ("CUDA_VISIBLE_DEVICES", &format!("{old},{}", &mig[..40])),
    ];
    assert_eq!(gpus(&prolog(jobs.path(), &env)), &mig[..40]);
    let env = [("SLURM_JOB_GPUS", "3"), ("CUDA_VISIBLE_DEVICES", old)];
    assert_eq!(gpus(&prolog(jobs.path(), &env)), "");
}
