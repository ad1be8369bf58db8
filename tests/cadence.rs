//! Precision apart from volume, end to end: an agent that samples every 50 ms but
//! publishes telemetry every 250 ms and usage every second bills jobs exactly (to the
//! microjoule, from the recorded edges), attributes every joule the counters measured, and
//! writes a fraction of the points. Real mosquitto, collector and influxd.

use nodewatt_common::now_ms;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodewatt_tests::*;

const DB: &str = "nodewatt_cadence";

fn write_job(dir: &Path, id: &str, project: &str, gpu: u32, start_ms: u64, end_ms: Option<u64>) {
    let mut text =
        format!("job={id}\nproject={project}\nuser=u{id}\ngpus={gpu}\nstart_ms={start_ms}\n");
    if let Some(end) = end_ms {
        text.push_str(&format!("end_ms={end}\n"));
    }
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(format!("{id}.job"))).unwrap();
}

/// How often the agent skipped ticks, and how many in all, from its log.
fn skipped(log: &str) -> (u64, u64) {
    log.lines()
        .filter(|l| l.contains("ticks skipped"))
        .filter_map(|l| {
            l.split("skipped=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .fold((0, 0), |(n, all), k| (n + 1, all + k))
}

fn int(db: &Influxd, q: &str) -> u64 {
    db.scalar(DB, q) as u64
}

#[test]
fn coarse_cadences_bill_exactly_with_fewer_points() {
    let Stack {
        mq, db, collector, ..
    } = Stack::start("cadence", DB);
    let registry = tempfile::tempdir().unwrap();
    std::fs::set_permissions(registry.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let text = agent_config("lab", "coarse", "50ms", mq.port, &[300.0, 500.0]).replace(
        "interval = \"50ms\"\n",
        "interval = \"50ms\"\ntelemetry_interval = \"250ms\"\nusage_interval = \"1s\"\n",
    ) + &format!(
        "[jobs]\ndir = {:?}\nowner_uid = {me}\ntotals_interval = \"1s\"\n",
        registry.path()
    );
    let cfg = config_file("agent.toml", &text);

    // Job 101 on GPU 0 starts after the agent's first samples and ends, with its end
    // recorded as the epilog does; job 102 on GPU 1 is still running at the stop.
    let t0 = now_ms();
    let a_start = t0 + 700;
    write_job(registry.path(), "101", "proj-a", 0, a_start, None);
    let mut agent = Proc::spawn(
        "agent",
        Command::new(bin("nodewatt-agent"))
            .args(["run", "--config"])
            .arg(&cfg.path)
            .env("RUST_LOG", "info"),
        cfg.dir.path().join("agent.log"),
    );
    std::thread::sleep(Duration::from_millis(1_500));
    let b_start = now_ms();
    write_job(registry.path(), "102", "proj-b", 1, b_start, None);
    std::thread::sleep(Duration::from_millis(1_300));
    let a_end = now_ms();
    write_job(registry.path(), "101", "proj-a", 0, a_start, Some(a_end));
    std::thread::sleep(Duration::from_millis(1_400));
    agent.stop_cleanly();

    // The agent marks itself offline after its last message.
    let done = wait_until(Duration::from_secs(30), || {
        db.rows(
            DB,
            "SELECT LAST(online) FROM node_status WHERE node = 'coarse'",
        )
        .first()
        .is_some_and(|(_, r)| r["last"] == false)
    });
    assert!(done, "{}\n{}", agent.log(), collector.log());
    assert_eq!(
        int(&db, "SELECT SUM(rejected) FROM nodewatt_collector"),
        0,
        "{}",
        collector.log()
    );

    // Jobs: exactly power × (end − start), to the microjoule.
    let total = |job: &str| -> (u64, u64) {
        let rows = db.rows(
            DB,
            &format!(
                "SELECT LAST(energy_gpu_uj), LAST(until_ms) FROM job_total WHERE job = '{job}'"
            ),
        );
        let r = &rows.first().expect("a job total").1;
        (r["last"].as_u64().unwrap(), r["last_1"].as_u64().unwrap())
    };
    let (a_uj, a_until) = total("101");
    assert_eq!(a_until, a_end);
    assert_eq!(a_uj, 300_000 * (a_end - a_start), "job 101");
    let (b_uj, b_until) = total("102");
    assert_eq!(
        b_uj,
        500_000 * (b_until - b_start),
        "job 102, up to the stop"
    );

    // Usage: each project's sum is its job's total; all owners together are what the
    // GPU counters measured.
    let project = |p: &str| {
        int(
            &db,
            &format!("SELECT SUM(energy_gpu_uj) FROM usage WHERE project = '{p}'"),
        )
    };
    assert_eq!(project("proj-a"), a_uj);
    assert_eq!(project("proj-b"), b_uj);
    let measured = int(&db, "SELECT SUM(energy_delta_mj) FROM gpu") * 1000;
    assert_eq!(int(&db, "SELECT SUM(energy_gpu_uj) FROM usage"), measured);
    // The usage points cover the same time as the telemetry.
    assert_eq!(
        int(
            &db,
            "SELECT SUM(span_ms) FROM usage WHERE project = '_idle'"
        ),
        int(&db, "SELECT SUM(span_ms) FROM agent")
    );

    // Volume: about one usage point per owner and second, one GPU point per GPU and
    // 250 ms, where per-sample publishing would write one every 50 ms. Usage is also
    // published at the three job edges and the stop, and telemetry with it.
    let run_ms = int(&db, "SELECT SUM(span_ms) FROM agent");
    let idle_points = int(
        &db,
        "SELECT COUNT(energy_uj) FROM usage WHERE project = '_idle'",
    );
    let gpu_points = int(&db, "SELECT COUNT(power_w) FROM gpu WHERE gpu = '0'");
    // A loaded machine can make the agent skip ticks (it logs each time): a window whose
    // closing tick was skipped closes at the next tick, off the grid, and may take the
    // next window with it.
    let (skips, skipped_ticks) = skipped(&agent.log());
    eprintln!(
        "{run_ms} ms: {idle_points} _idle usage points, {gpu_points} points of GPU 0; \
         {skips} times {skipped_ticks} ticks skipped"
    );
    assert!(
        idle_points <= run_ms / 1_000 + 1 + 4 + skips,
        "{idle_points}"
    );
    assert!(gpu_points <= run_ms / 250 + 1 + 4 + skips, "{gpu_points}");
    let lost = skips + skipped_ticks * 50 / 250;
    assert!(gpu_points + lost + 1 >= run_ms / 250, "{gpu_points}");
    // Off the one-second grid only at job edges, the stop and skipped ticks.
    let off_grid = db
        .rows(DB, "SELECT energy_uj FROM usage WHERE project = '_idle'")
        .iter()
        .filter(|(_, r)| r["time"].as_u64().unwrap() % 1_000 != 0)
        .count() as u64;
    assert!(
        off_grid <= 4 + skips,
        "{off_grid} usage points off the grid\n{}",
        agent.log()
    );
    // Folded telemetry: the mean power is exact, the maximum kept.
    let power = db.rows(
        DB,
        "SELECT MEAN(power_w), MAX(power_max_w) FROM gpu WHERE gpu = '1'",
    );
    let r = &power.first().unwrap().1;
    assert!((r["mean"].as_f64().unwrap() - 500.0).abs() < 1e-9);
    assert_eq!(r["max"].as_f64(), Some(500.0));
}
