//! Exact per-job bills through what a production node does every week: an agent restart
//! in the middle of running jobs, against a real Slurm (prolog and epilog), mosquitto and
//! influxd. Simulated GPUs draw constant power, so each job's truth is power × the time
//! between the start and end instants its prolog and epilog recorded.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use nodewatt_tests::*;

const DB: &str = "nodewatt_restart";
const WATTS: f64 = 400.0;

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

/// The `late_ms` an agent logged for `job` on its lines containing `what`, summed.
fn late_ms(log: &str, job: &str, what: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(what) && l.contains(&format!(" job={job} ")))
        .filter_map(|l| {
            l.split("late_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// How the agent is interrupted in the middle of the jobs.
#[derive(Clone, Copy, PartialEq)]
enum Interruption {
    /// SIGTERM, 3 s down, started again (a package upgrade).
    Restart,
    /// The broker goes away; 2 s later the agent is SIGKILLed; it starts again 2 s later
    /// and the broker comes back after another second.
    KillDuringOutage,
}

/// Two Slurm jobs of 15 s on 2 and 1 of four 400 W GPUs, the agent interrupted 5 s in;
/// then each job's bill is checked against power × its recorded time, and the bills of
/// all projects against the counters' rise.
/// `cadence` goes into `[agent]` (coarser publishing than sampling).
fn jobs_through(interruption: Interruption, node: &str, cadence: &str) {
    let slurm = Slurm::start();
    let Stack {
        mut mq,
        db,
        collector_cfg,
        collector,
    } = Stack::start(node, DB);
    let state = tempfile::tempdir().unwrap();
    // Totals every 60 s (the default): only the stop can send them before the jobs end.
    let text = agent_config("lab", node, "100ms", mq.port, &[WATTS; 4]).replace(
        "[agent]\n",
        &format!(
            "[agent]\nstate_file = {:?}\n{cadence}",
            state.path().join("agent-state.json")
        ),
    ) + &format!(
        "[jobs]\ndir = {:?}\n[outbox]\nspool_dir = {:?}\n",
        slurm.jobs,
        state.path().join("spool")
    );
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

    std::thread::sleep(Duration::from_secs(5));
    let agent = match interruption {
        Interruption::Restart => {
            agent.stop_cleanly();
            let log = agent.log();
            assert!(log.contains("saved counters and job totals"), "{log}");
            // Totals go out every 60 s: only the stop can have sent these, 5 s in.
            for (id, _, _) in &jobs {
                let sent = wait_until(Duration::from_secs(10), || {
                    db.rows(
                        DB,
                        &format!(
                            "SELECT until_ms FROM job_total WHERE job = '{id}' AND ended = false"
                        ),
                    )
                    .len()
                        == 1
                });
                assert!(sent, "no running total for {id} at the stop:\n{log}");
            }
            std::thread::sleep(Duration::from_secs(3));
            (start_agent(&a, 1_000_000), log)
        }
        Interruption::KillDuringOutage => {
            mq.stop();
            std::thread::sleep(Duration::from_secs(2));
            agent.kill();
            std::thread::sleep(Duration::from_secs(2));
            let again = start_agent(&a, 1_000_000);
            std::thread::sleep(Duration::from_secs(1));
            mq.restart();
            (again, agent.log())
        }
    };
    let (mut agent, first_log) = agent;

    // Both jobs end; the epilog records their end instants.
    let ended = wait_until(Duration::from_secs(40), || {
        files
            .iter()
            .all(|f| registry_file(f).contains_key("end_ms"))
    });
    assert!(ended, "epilog recorded no end:\n{}", agent.log());
    for (id, _, _) in &jobs {
        let done = wait_until(Duration::from_secs(30), || {
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
    let q_node = format!("node = '{node}'");
    let last_seq = || db.scalar(DB, &format!("SELECT LAST(seq) FROM agent WHERE {q_node}"));
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
        // Billed from its file's appearance to its end's: the agent logs how late each
        // was seen (a slow prolog or epilog under load); within 2 ms of power after that.
        let logs = format!("{first_log}\n{}", agent.log());
        let (late_start, late_end) = (
            late_ms(&logs, id, "taken up"),
            late_ms(&logs, id, "end seen"),
        );
        let billable_uj = truth_uj + WATTS * gpus * (late_end as f64 - late_start as f64) * 1000.0;
        eprintln!(
            "  seen late: start {late_start} ms, end {late_end} ms: billable {billable_uj} µJ"
        );
        let tolerance = WATTS * gpus * 2.0 * 1000.0;
        assert!(
            (job_gpu_uj - billable_uj).abs() <= tolerance,
            "job {id}\nfirst agent:\n{first_log}\nagent:\n{}",
            agent.log()
        );
        assert!(
            (project_gpu_uj - billable_uj).abs() <= tolerance,
            "project {project}"
        );
        // The job's total and its project's per-interval usage agree (one job each).
        let project_uj = row(&by_project, project)["energy_uj"].as_f64().unwrap();
        assert_eq!(job_uj, project_uj, "job {id}");
    }

    // Every joule the counters rose by, first sample to last, across the interruption,
    // is in some project's bill (idle included). The first `gpu` point carries the
    // counter of its last sample: with telemetry folded over several samples, its own
    // delta is what the counter rose before it (0 to 4 samples here, by the start's phase).
    let mut rise_uj = 0.0;
    for gpu in 0..4 {
        let where_gpu = format!("{q_node} AND gpu = '{gpu}'");
        let q = |f: &str| {
            db.scalar(
                DB,
                &format!("SELECT {f}(energy_mj) FROM gpu WHERE {where_gpu}"),
            )
        };
        let first = db.rows(
            DB,
            // With energy_mj too: InfluxDB skips rows where every selected field is null.
            &format!(
                "SELECT energy_mj, energy_delta_mj FROM gpu WHERE {where_gpu} ORDER BY time LIMIT 1"
            ),
        );
        let before_first = first
            .first()
            .and_then(|(_, r)| r["energy_delta_mj"].as_f64())
            .unwrap_or(0.0);
        rise_uj += (q("LAST") - q("FIRST") + before_first) * 1000.0;
    }
    let billed_gpu_uj: f64 = by_project
        .iter()
        .map(|r| r["gpu_kwh"].as_f64().unwrap() * 3.6e12)
        .sum();
    let billed = || {
        db.scalar(
            DB,
            &format!("SELECT SUM(energy_gpu_uj) FROM usage WHERE {q_node}"),
        )
    };
    let billed_exact = billed();
    eprintln!("counters rose {rise_uj} µJ; usage sums to {billed_exact} µJ");
    assert_eq!(
        billed_exact, rise_uj,
        "the interruption's gap is in the bills"
    );
    assert!((billed_gpu_uj - rise_uj).abs() < 10.0);
}

#[test]
fn a_restart_mid_job_bills_each_job_exactly_once() {
    jobs_through(Interruption::Restart, "node-r", "");
}

#[test]
fn a_kill_during_a_broker_outage_loses_nothing_and_bills_each_job_exactly_once() {
    jobs_through(Interruption::KillDuringOutage, "node-k", "");
}

/// With usage published every 2 s, the kill loses a usage window that was sampled but not
/// sent: the spooled state carries it, and the restarted agent publishes it.
#[test]
fn a_kill_with_coarse_cadences_loses_no_unpublished_usage() {
    jobs_through(
        Interruption::KillDuringOutage,
        "node-kc",
        "telemetry_interval = \"500ms\"\nusage_interval = \"2s\"\n",
    );
}

/// Writes a registry file as the prolog and epilog do: aside, then renamed into place.
fn write_job(dir: &Path, id: &str, lines: &str) {
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, lines).unwrap();
    std::fs::rename(tmp, dir.join(format!("{id}.job"))).unwrap();
}

fn job_text(id: &str, project: &str, user: &str, gpus: &str, start_ms: u64) -> String {
    format!("job={id}\nproject={project}\nuser={user}\ngpus={gpus}\nstart_ms={start_ms}\n")
}

/// A private registry on tmpfs (where two changes within one timestamp tick leave the
/// directory's mtime unchanged), and an agent config billing from it.
fn tmpfs_registry_agent(
    node: &str,
    interval: &str,
    mq_port: u16,
) -> (tempfile::TempDir, ConfigFile) {
    use std::os::unix::fs::PermissionsExt;
    let registry = tempfile::tempdir_in("/dev/shm").unwrap();
    std::fs::set_permissions(registry.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let text = agent_config("lab", node, interval, mq_port, &[WATTS; 4])
        + &format!(
            "[jobs]\ndir = {:?}\nowner_uid = {me}\ntotals_interval = \"1s\"\n",
            registry.path()
        );
    (registry, config_file("agent.toml", &text))
}

#[test]
fn jobs_ending_in_the_same_millisecond_a_registry_blip_and_domain_users_bill_exactly() {
    let Stack {
        mq,
        db,
        collector_cfg,
        collector,
    } = Stack::start("races", DB);
    let (registry, a) = tmpfs_registry_agent("node-q", "20ms", mq.port);
    let t_begin = nodewatt_common::now_ms();
    let mut agent = start_agent(&a, 1_000_000);
    std::thread::sleep(Duration::from_millis(300));

    // Pairs of jobs that start together and end in the same millisecond, back to back;
    // the users are AD/SSSD names. One pair lives through a registry blip.
    let dir = registry.path();
    let mut truth = Vec::new();
    for k in 0..30u64 {
        let (x, y) = (format!("{}", 1000 + 2 * k), format!("{}", 1001 + 2 * k));
        let start = nodewatt_common::now_ms();
        let user = format!("user{k}@corp.example");
        write_job(dir, &x, &job_text(&x, "proj-x", &user, "0", start));
        write_job(
            dir,
            &y,
            &job_text(&y, "proj-y", "jane.doe@corp.example", "1,2", start),
        );
        std::thread::sleep(Duration::from_millis(40 + (k * 37) % 110));
        if k == 10 {
            use std::os::unix::fs::PermissionsExt;
            // Untrusted for a moment (writable by others): jobs must not end.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            std::thread::sleep(Duration::from_millis(150));
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        let end = nodewatt_common::now_ms();
        write_job(
            dir,
            &x,
            &(job_text(&x, "proj-x", &user, "0", start) + &format!("end_ms={end}\n")),
        );
        write_job(
            dir,
            &y,
            &(job_text(&y, "proj-y", "jane.doe@corp.example", "1,2", start)
                + &format!("end_ms={end}\n")),
        );
        truth.push((x, 1.0, start, end));
        truth.push((y, 2.0, start, end));
        std::thread::sleep(Duration::from_millis(25));
    }
    // Generous: a loaded machine delivers the 20 ms samples slowly; nothing is lost.
    let all_final = wait_until(Duration::from_secs(90), || {
        db.scalar(
            DB,
            "SELECT COUNT(energy_gpu_uj) FROM job_total WHERE node = 'node-q' AND ended = true",
        ) == truth.len() as f64
    });
    assert!(
        all_final,
        "not every job's final total:\n{}\n{}",
        agent.log(),
        collector.log()
    );
    agent.stop_cleanly();
    assert!(
        agent.log().contains("not trusted"),
        "the blip was seen:\n{}",
        agent.log()
    );

    let mut exact = 0;
    let mut worst_ms: f64 = 0.0;
    for (id, gpus, start, end) in &truth {
        let rows = db.rows(
            DB,
            &format!("SELECT energy_gpu_uj, until_ms FROM job_total WHERE job = '{id}' AND node = 'node-q'"),
        );
        assert_eq!(rows.len(), 1, "one total for job {id}: {rows:?}");
        let got = rows[0].1["energy_gpu_uj"].as_f64().unwrap();
        let want = WATTS * gpus * (end - start) as f64 * 1000.0;
        let off_ms = (got - want) / (WATTS * gpus * 1000.0);
        worst_ms = worst_ms.max(off_ms.abs());
        exact += usize::from(got == want);
        // The epilog's end is seen at the next sample at the latest; if it lands just
        // after a sample read the registry, that sample bills up to 1 ms of it. A file
        // that lands later than that (a paused machine) is billed up to the sample that
        // saw it, and the agent says by how much.
        let log = agent.log();
        let late = (late_ms(&log, id, "end seen") + late_ms(&log, id, "taken up")) as f64;
        assert!(
            off_ms.abs() <= 2.0 + late,
            "job {id}: {got} µJ, power x time {want} µJ; late edges logged: {late} ms"
        );
    }
    eprintln!(
        "{exact} of {} jobs billed exactly power x time; worst {worst_ms} ms of power off",
        truth.len()
    );

    let t_end = nodewatt_common::now_ms();
    let users = usage(&collector_cfg, "user", t_begin - 60_000, t_end + 60_000);
    let jane = row(&users, "jane.doe@corp.example");
    let want: f64 = truth
        .iter()
        .filter(|t| t.1 == 2.0)
        .map(|(_, g, s, e)| WATTS * g * (e - s) as f64 * 1000.0)
        .sum();
    let got = jane["gpu_kwh"].as_f64().unwrap() * 3.6e12;
    assert!(
        (got - want).abs() <= WATTS * 2.0 * 30.0 * 2.0 * 1000.0,
        "{got} vs {want}"
    );
}

#[test]
fn two_thousand_jobs_on_one_node_are_published_and_all_billed() {
    let Stack {
        mq,
        db,
        collector_cfg,
        collector,
    } = Stack::start("many", DB);
    let (registry, a) = tmpfs_registry_agent("node-m", "500ms", mq.port);
    let t_begin = nodewatt_common::now_ms();
    let start = t_begin - 1_000;
    // 2,000 jobs of 40 users in 20 projects (CPU-only, as on a shared node); four hold
    // a GPU each.
    let write_all = |end: Option<u64>| {
        for i in 0..2_000u32 {
            let gpus = if i < 4 { i.to_string() } else { String::new() };
            let id = format!("{}", 50_000 + i);
            let mut text = job_text(
                &id,
                &format!("proj-{}", i % 20),
                &format!("u{}@corp.example", i % 40),
                &gpus,
                start,
            );
            if let Some(end) = end {
                text += &format!("end_ms={end}\n");
            }
            write_job(registry.path(), &id, &text);
        }
    };
    write_all(None);
    let mut agent = start_agent(&a, 1_000_000);
    std::thread::sleep(Duration::from_secs(4));
    let end = nodewatt_common::now_ms();
    write_all(Some(end));
    let all_final = wait_until(Duration::from_secs(60), || {
        db.scalar(
            DB,
            "SELECT COUNT(energy_gpu_uj) FROM job_total WHERE node = 'node-m' AND ended = true",
        ) == 2_000.0
    });
    let stored = db.scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'node-m'");
    assert!(
        all_final,
        "{stored} samples stored; final totals missing:\n{}\n{}",
        agent.log(),
        collector.log()
    );
    agent.stop_cleanly();
    let log = collector.log();
    let last_health = log
        .lines()
        .rev()
        .find(|l| l.contains("health"))
        .unwrap_or("");
    assert!(last_health.contains(" rejected=0 "), "{log}");

    // The GPU jobs: their time on the node since the agent's first sample, exactly.
    let first = db
        .rows(DB, "SELECT FIRST(seq) FROM agent WHERE node = 'node-m'")
        .first()
        .and_then(|(_, r)| r["time"].as_u64())
        .unwrap();
    for i in 0..4 {
        let id = 50_000 + i;
        let got = db.scalar(
            DB,
            &format!("SELECT SUM(energy_gpu_uj) FROM job_total WHERE job = '{id}'"),
        );
        assert_eq!(
            got,
            WATTS * (end - first) as f64 * 1000.0,
            "job {id}: end {end}, first sample {first}\n{}",
            agent.log()
        );
    }
    let t_end = nodewatt_common::now_ms();
    let projects = usage(&collector_cfg, "project", t_begin - 60_000, t_end + 60_000);
    let by_jobs = usage(&collector_cfg, "job", t_begin - 60_000, t_end + 60_000);
    assert_eq!(by_jobs.len(), 2_000);
    assert!(projects.len() >= 20, "{projects:?}");
    assert!(projects.iter().all(|r| r["key"] != "_unattributed"));
}
