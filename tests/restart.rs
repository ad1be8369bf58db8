//! Exact per-job bills through what a production node does every week: an agent restart
//! in the middle of running jobs, against a real Slurm (prolog and epilog), mosquitto and
//! influxd. Simulated GPUs draw constant power, so each job's truth is power × the time
//! between the start and end instants its prolog and epilog recorded.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use nodewatt_tests::*;

const DB: &str = "nodewatt_restart";
const WATTS: f64 = 400.0;

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `key=value` lines of a registry file.
fn registry_file(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn usage(cfg: &ConfigFile, by: &str, from: u64, to: u64) -> Vec<serde_json::Value> {
    let (from, to) = (rfc3339(from), rfc3339(to));
    let args = [
        "usage", "--by", by, "--format", "json", "--from", &from, "--to", &to,
    ];
    let v: serde_json::Value = serde_json::from_str(&collector_cli(cfg, &args)).unwrap();
    v.as_array().unwrap().clone()
}

fn row<'a>(rows: &'a [serde_json::Value], key: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["key"] == key)
        .unwrap_or_else(|| panic!("no row {key} in {rows:?}"))
}

#[test]
fn a_restart_mid_job_bills_each_job_exactly_once() {
    let slurm = Slurm::start();
    let Stack {
        mq,
        db,
        collector_cfg,
        collector,
    } = Stack::start("restart", DB);
    let state = tempfile::tempdir().unwrap();
    // Totals every 60 s (the default): only the stop can send them before the jobs end.
    let text = agent_config("lab", "node-r", "100ms", mq.port, &[WATTS; 4]).replace(
        "[agent]\n",
        &format!(
            "[agent]\nstate_file = {:?}\n",
            state.path().join("agent-state.json")
        ),
    ) + &format!("[jobs]\ndir = {:?}\n", slurm.jobs);
    let a = config_file("agent.toml", &text);
    let t_begin = nodewatt_common::now_ms();
    let mut agent = start_agent(&a, 1_000_000);
    std::thread::sleep(Duration::from_millis(500));

    let jobs = [
        (
            slurm.sbatch(&["--account=proj-r1", "--gres=gpu:2", "--wrap", "sleep 15"]),
            "proj-r1",
            2.0,
        ),
        (
            slurm.sbatch(&["--account=proj-r2", "--gres=gpu:1", "--wrap", "sleep 15"]),
            "proj-r2",
            1.0,
        ),
    ];
    let files: Vec<_> = jobs
        .iter()
        .map(|(id, _, _)| slurm.jobs.join(format!("{id}.job")))
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || files.iter().all(|f| f.exists())),
        "prolog wrote no registry files"
    );

    // Mid-job: a package upgrade restarts the agent, 3 s down.
    std::thread::sleep(Duration::from_secs(5));
    agent.stop_cleanly();
    let first_log = agent.log();
    assert!(
        first_log.contains("saved counters and job totals"),
        "{first_log}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let mut agent = start_agent(&a, 1_000_000);

    // Both jobs end; the epilog records their end instants.
    let ended = wait_until(Duration::from_secs(40), || {
        files
            .iter()
            .all(|f| registry_file(f).contains_key("end_ms"))
    });
    assert!(ended, "epilog recorded no end:\n{}", agent.log());
    for (id, _, _) in &jobs {
        let done = wait_until(Duration::from_secs(20), || {
            db.rows(
                DB,
                &format!("SELECT ended FROM job_total WHERE job = '{id}'"),
            )
            .iter()
            .any(|(_, r)| r["ended"] == true)
        });
        assert!(
            done,
            "no final total for {id}:\n{}\n{}",
            agent.log(),
            collector.log()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    agent.stop_cleanly();
    assert!(
        agent.log().contains("resumed the previous run"),
        "{}",
        agent.log()
    );
    let t_end = nodewatt_common::now_ms();
    let last_seq = || db.scalar(DB, "SELECT LAST(seq) FROM agent WHERE node = 'node-r'");
    // Stored through the last sample (the stop's): the count stops growing.
    let mut seen = -1.0;
    wait_until(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = last_seq();
        std::mem::replace(&mut seen, now) == now
    });
    let (from, to) = (t_begin - 60_000, t_end + 60_000);
    let by_job = usage(&collector_cfg, "job", from, to);
    let by_project = usage(&collector_cfg, "project", from, to);
    for ((id, project, gpus), file) in jobs.iter().zip(&files) {
        let f = registry_file(file);
        let start: u64 = f["start_ms"].parse().unwrap();
        let end: u64 = f["end_ms"].parse().unwrap();
        let truth_uj = WATTS * gpus * (end - start) as f64 * 1000.0;
        // One total per job and node, across the restart.
        let points = db.rows(
            DB,
            &format!("SELECT energy_gpu_uj, since_ms FROM job_total WHERE job = '{id}'"),
        );
        assert_eq!(points.len(), 1, "job {id}: {points:?}");
        let job_uj = row(&by_job, id)["energy_uj"].as_f64().unwrap();
        let job_gpu_uj = row(&by_job, id)["gpu_kwh"].as_f64().unwrap() * 3.6e12;
        let project_gpu_uj = row(&by_project, project)["gpu_kwh"].as_f64().unwrap() * 3.6e12;
        eprintln!(
            "job {id} ({project}, {gpus} GPUs, {} ms): truth {truth_uj} µJ, job total {job_gpu_uj:.0} µJ, \
             project usage {project_gpu_uj:.0} µJ",
            end - start
        );
        // Within 1 % of a 15 s job on these GPUs.
        let tolerance = 0.01 * WATTS * gpus * 15.0 * 1e6;
        assert!((job_gpu_uj - truth_uj).abs() <= tolerance, "job {id}");
        assert!(
            (project_gpu_uj - truth_uj).abs() <= tolerance,
            "project {project}"
        );
        assert!(job_uj >= job_gpu_uj);
    }

    // Every joule the counters rose by, first sample to last, across the restart, is in
    // some project's bill (idle included).
    let mut rise_uj = 0.0;
    for gpu in 0..4 {
        let q = |f: &str| {
            db.scalar(
                DB,
                &format!("SELECT {f}(energy_mj) FROM gpu WHERE node = 'node-r' AND gpu = '{gpu}'"),
            )
        };
        rise_uj += (q("LAST") - q("FIRST")) * 1000.0;
    }
    let billed_gpu_uj: f64 = by_project
        .iter()
        .map(|r| r["gpu_kwh"].as_f64().unwrap() * 3.6e12)
        .sum();
    let billed = || {
        db.scalar(
            DB,
            "SELECT SUM(energy_gpu_uj) FROM usage WHERE node = 'node-r'",
        )
    };
    // The last samples may still be on their way through the collector.
    wait_until(Duration::from_secs(20), || billed() == rise_uj);
    let billed_exact = billed();
    eprintln!("counters rose {rise_uj} µJ; usage sums to {billed_exact} µJ");
    assert_eq!(billed_exact, rise_uj, "the restart's gap is in the bills");
    assert!((billed_gpu_uj - rise_uj).abs() < 10.0);
}
