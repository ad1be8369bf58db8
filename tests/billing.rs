//! Billing end to end: simulated GPUs with known power, jobs of two projects appearing
//! and disappearing in the job registry, real mosquitto and influxd, and the `usage`
//! command's totals checked against the ground truth of the scenario.

use nodewatt_common::now_ms;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use nodewatt_tests::*;

const DB: &str = "nodewatt_billing";

fn write_job(dir: &Path, id: &str, project: &str, user: &str, gpus: &str, start_ms: u64) {
    let text =
        format!("job={id}\nproject={project}\nuser={user}\ngpus={gpus}\nstart_ms={start_ms}\n");
    // Like the prolog: write aside, then rename into place.
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(format!("{id}.job"))).unwrap();
}

fn usage(cfg: &ConfigFile, by: &str, from: u64, to: u64) -> serde_json::Value {
    let (from, to) = (rfc3339(from), rfc3339(to));
    let args = [
        "usage", "--by", by, "--format", "json", "--from", &from, "--to", &to,
    ];
    serde_json::from_str(&collector_cli(cfg, &args)).unwrap()
}

fn field(rows: &serde_json::Value, key: &str, f: &str) -> f64 {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .and_then(|r| r[f].as_f64())
        .unwrap_or(0.0)
}

/// A private influxd (`http`: lines for its `[http]` section) with the database `DB`.
fn influxd_with_db(http: &str) -> Influxd {
    let db = Influxd::start_with("", http);
    db.execute("", &format!("CREATE DATABASE \"{DB}\""))
        .unwrap();
    db
}

/// A collector config billing from `db`; `billing`: lines for its `[billing]` section.
fn billing_config(db: &Influxd, billing: &str) -> ConfigFile {
    config_file(
        "collector.toml",
        &format!(
            "[collector]\nid = \"bill\"\n[influxdb]\nurl = \"{}\"\ndatabase = \"{DB}\"\n\
             [billing]\n{billing}",
            db.url()
        ),
    )
}

#[test]
fn usage_matches_the_scenario_and_adds_up_to_the_hardware() {
    let Stack {
        mq,
        db,
        collector_cfg,
        collector,
    } = Stack::start("billing", DB);
    let registry = tempfile::tempdir().unwrap();
    std::fs::set_permissions(registry.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };

    // GPU 0 at 300 W, GPU 1 at 500 W, RAPL package at 150 W, 50 ms samples for 4 s.
    let text = agent_config("lab", "node-b", "50ms", mq.port, &[300.0, 500.0])
        + &format!(
            "[jobs]\ndir = {:?}\nowner_uid = {me}\ntotals_interval = \"1s\"\n",
            registry.path()
        );
    let a = config_file("agent.toml", &text);

    let t_begin = now_ms();
    write_job(registry.path(), "101", "proj-a", "alice", "0", t_begin);
    let mut agent = start_agent(&a, 80);
    std::thread::sleep(Duration::from_millis(1_000));
    let b_start = now_ms();
    write_job(registry.path(), "102", "proj-b", "bob", "1", b_start);
    std::thread::sleep(Duration::from_millis(1_000));
    let a_end = now_ms();
    std::fs::remove_file(registry.path().join("101.job")).unwrap();
    agent.wait_success(Duration::from_secs(60));
    let t_end = now_ms();

    // Wait for all 80 samples in InfluxDB.
    let all = wait_until(Duration::from_secs(30), || {
        db.scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'node-b'") == 80.0
    });
    assert!(all, "{}", collector.log());
    let (from, to) = (t_begin - 60_000, t_end + 60_000);
    let rows = usage(&collector_cfg, "project", from, to);

    // Each hour the usage points fall in was marked as written into, before them, at
    // the time of the write (what keeps rollups honest; docs/billing.md).
    let points = db.query(DB, "SELECT energy_uj FROM usage WHERE node = 'node-b'");
    let marks = db.query(DB, "SELECT written_ms FROM usage_hour_state");
    let mut hour_ends: Vec<u64> = points["results"][0]["series"][0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[0].as_u64().unwrap().div_ceil(3_600_000) * 3_600_000)
        .collect();
    hour_ends.dedup();
    let marked: Vec<(u64, u64)> = marks["results"][0]["series"][0]["values"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|v| (v[0].as_u64().unwrap(), v[1].as_u64().unwrap()))
        .collect();
    assert!(!hour_ends.is_empty());
    for h in &hour_ends {
        let at = marked.iter().find(|(t, _)| t == h).map(|(_, w)| *w);
        assert!(
            at.is_some_and(|w| w >= t_begin && w <= now_ms()),
            "hour to {h}: marked {at:?}; marks {marked:?}"
        );
    }

    // Exact: everything attributed, idle included, equals what the hardware counted.
    let gpu_uj = db.scalar(
        DB,
        "SELECT SUM(energy_delta_mj) FROM gpu WHERE node = 'node-b'",
    ) * 1000.0;
    let rapl_uj = db.scalar(
        DB,
        "SELECT SUM(energy_delta_uj) FROM rapl WHERE node = 'node-b'",
    );
    let span_ms = db.scalar(DB, "SELECT SUM(span_ms) FROM agent WHERE node = 'node-b'");
    let sum = |f: &str| -> f64 {
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r[f].as_f64().unwrap())
            .sum()
    };
    let uj_per_kwh = 3.6e12;
    assert_eq!(
        sum("energy_uj"),
        gpu_uj + rapl_uj,
        "every joule, to the microjoule"
    );
    assert!((sum("gpu_kwh") * uj_per_kwh - gpu_uj).abs() < 1.0);
    assert!((sum("cpu_kwh") * uj_per_kwh - rapl_uj).abs() < 1.0);
    assert!(
        (sum("gpu_hours") * 3.6e6 - 2.0 * span_ms).abs() < 1e-6,
        "both GPUs, all the time"
    );

    // Against the scenario. Job 101 owned GPU 0 from before the first sample until its
    // file was removed; job 102 owned GPU 1 from its start_ms to the end. The registry is
    // read at each sample, so a removal is seen up to one span late, and a job file that
    // lands just after a sample's registry read loses up to one span: the tolerance is the
    // longest span of that GPU's power, twice (timer jitter). A span is one interval
    // (50 ms), unless a loaded machine made the agent skip ticks: then it is longer.
    let last_tick = db
        .rows(DB, "SELECT LAST(seq) FROM agent WHERE node = 'node-b'")
        .first()
        .and_then(|(_, r)| r["time"].as_u64())
        .unwrap();
    let first_tick = last_tick - span_ms as u64;
    let a_expected_j = 300.0 * a_end.saturating_sub(first_tick.max(t_begin)) as f64 / 1000.0;
    let b_expected_j = 500.0 * (last_tick - b_start) as f64 / 1000.0;
    let a_j = field(&rows, "proj-a", "gpu_kwh") * 3.6e6;
    let b_j = field(&rows, "proj-b", "gpu_kwh") * 3.6e6;
    let longest_s = db.scalar(DB, "SELECT MAX(span_ms) FROM agent WHERE node = 'node-b'") / 1e3;
    eprintln!("proj-a {a_j:.3} J (scenario {a_expected_j:.3} J), proj-b {b_j:.3} J (scenario {b_expected_j:.3} J), longest span {longest_s} s");
    assert!(
        (a_j - a_expected_j).abs() <= 300.0 * longest_s * 2.0,
        "proj-a {a_j} J, expected {a_expected_j} J; longest span {longest_s} s\n{}",
        agent.log()
    );
    assert!(
        (b_j - b_expected_j).abs() <= 500.0 * longest_s * 2.0,
        "proj-b {b_j} J, expected {b_expected_j} J; longest span {longest_s} s\n{}",
        agent.log()
    );
    assert!(
        field(&rows, "_idle", "gpu_kwh") > 0.0,
        "GPU 1 before job 102, GPU 0 after job 101"
    );
    // Job 101's file was removed without a recorded end (no epilog): the span in which
    // it vanished is nobody's for sure.
    assert!(field(&rows, "_unattributed", "gpu_kwh") > 0.0);

    // By user and by job agree with by project.
    let users = usage(&collector_cfg, "user", from, to);
    assert!(
        (field(&users, "alice", "energy_kwh") - field(&rows, "proj-a", "energy_kwh")).abs() < 1e-12
    );
    let jobs = usage(&collector_cfg, "job", from, to);
    let job_a = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "101")
        .expect("job 101 total");
    assert_eq!(job_a["project"], "proj-a");
    assert_eq!(job_a["user"], "alice");
    assert_eq!(
        job_a["energy_uj"].as_u64().unwrap() as f64,
        field(&rows, "proj-a", "energy_uj"),
        "the job's total equals its per-interval usage"
    );
    assert!(jobs.as_array().unwrap().iter().any(|r| r["key"] == "102"));

    // A period that ends before the run bills nothing; CSV is the documented format.
    assert!(usage(&collector_cfg, "project", from, t_begin - 30_000)
        .as_array()
        .unwrap()
        .is_empty());
    let (from_s, to_s) = (rfc3339(from), rfc3339(to));
    let csv = collector_cli(
        &collector_cfg,
        &[
            "usage",
            "--format",
            "csv",
            "--price-per-kwh",
            "0.25",
            "--pue",
            "1.2",
            "--from",
            &from_s,
            "--to",
            &to_s,
        ],
    );
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("key,project,user,energy_uj,energy_kwh,gpu_kwh,cpu_kwh,dram_kwh,other_kwh,gpu_hours,cpu_core_hours,pue,facility_kwh,cost,currency,co2e_kg")
    );
    assert_eq!(
        lines.count(),
        4,
        "proj-a, proj-b, _idle, _unattributed: {csv}"
    );

    // Reports: a job's whole run, and a project over the period.
    let out_dir = tempfile::tempdir().unwrap();
    let report = |args: &[&str], name: &str| -> (String, String) {
        let md = out_dir.path().join(name);
        let md_path = md.to_str().unwrap();
        let mut all = vec![
            "report",
            "--pue",
            "1.2",
            "--co2-g-per-kwh",
            "300",
            "--output",
            md_path,
        ];
        all.extend_from_slice(args);
        collector_cli(&collector_cfg, &all);
        (
            std::fs::read_to_string(&md).unwrap(),
            std::fs::read_to_string(md.with_extension("svg")).unwrap(),
        )
    };
    let (md, svg) = report(&["--job", "101"], "job-101.md");
    if let Some(keep) = std::env::var_os("NODEWATT_KEEP_REPORT") {
        std::fs::write(std::path::Path::new(&keep).with_extension("md"), &md).unwrap();
        std::fs::write(std::path::Path::new(&keep).with_extension("svg"), &svg).unwrap();
    }
    assert!(
        md.starts_with("# Energy report: job 101 (project proj-a)"),
        "{md}"
    );
    let gpu_j = job_a["gpu_kwh"].as_f64().unwrap() * 3.6e6;
    assert!(
        md.contains(&format!("| GPU | {:.6} | {:.3} |", gpu_j / 3.6e6, gpu_j)),
        "{md}"
    );
    assert!(md.contains("| GPU models | Sim H100 |"), "{md}");
    assert!(md.contains("| GPUs | node-b: 0 |"), "{md}");
    // GPU 0 at 300 of 700 W: 43 % busy, 34 % tensor-active (the simulated GPM), never
    // idle or capped. Tensor time is exact (ms × ‰ in µs).
    let row = |md: &str, head: &str| -> String {
        let l = md.lines().find(|l| l.starts_with(head));
        l.unwrap_or_else(|| panic!("no {head:?} in {md}"))
            .to_string()
    };
    let tensor = row(&md, "| Tensor-active GPU time |");
    let pct: f64 = tensor
        .split('|')
        .nth(4)
        .unwrap()
        .trim()
        .trim_end_matches(" % of GPU time")
        .parse()
        .unwrap();
    assert_eq!(pct, 34.0, "{tensor}");
    assert!(
        md.contains(
            "| GPU energy while the GPU ran nothing | 0.000000 | kWh | 0.0 % of GPU energy |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| GPU energy while power- or thermal-capped | 0.000000 | kWh | 0.0 % of GPU energy |"
        ),
        "{md}"
    );
    let per_hour: f64 = row(&md, "| GPU energy per tensor-active GPU-hour |")
        .split('|')
        .nth(2)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // 0.3 kWh per GPU-hour over 34 % of it tensor-active.
    assert!(
        (per_hour - 0.3 / (pct / 100.0)).abs() < 0.001,
        "{per_hour} at {pct} %"
    );
    assert!(md.contains("| Facility (× PUE 1.2) |"), "{md}");
    assert!(md.contains("![Power by device class](job-101.svg)"));
    assert!(svg.contains("<polyline") && svg.trim_end().ends_with("</svg>"));
    // Job 101 ran alone for its project and user: its chart is its own power, over its
    // run (from the start in its registry file).
    assert!(
        md.contains("the power attributed to job 101 itself"),
        "{md}"
    );
    assert!(
        svg.contains(&format!("data-from-ms=\"{t_begin}\"")),
        "{svg}"
    );
    let (md, _) = report(
        &[
            "--project",
            "proj-b",
            "--from",
            &rfc3339(from),
            "--to",
            &rfc3339(to),
        ],
        "proj-b.md",
    );
    assert!(md.contains("| Users | bob |"), "{md}");
    // A project with nothing in the period is an error that says so, and no file.
    let nosuch = out_dir.path().join("nosuch.md");
    let (f, t) = (rfc3339(from), rfc3339(to));
    let args = [
        "report",
        "--project",
        "nosuch",
        "--from",
        &f,
        "--to",
        &t,
        "--output",
        nosuch.to_str().unwrap(),
    ];
    let out = collector_run(&collector_cfg, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no usage recorded for project nosuch"),
        "{err}"
    );
    assert!(!nosuch.exists());
    // GPU 1 at 500 of 700 W: 71 % busy, 57 % tensor-active.
    let tensor = row(&md, "| Tensor-active GPU time |");
    assert!(
        tensor.contains("| 57.0 % of GPU time |") || tensor.contains("| 56.9 % of GPU time |"),
        "{tensor}"
    );
    assert!(md.contains(" CO2e (facility energy × 300"), "{md}");
}

/// `--by job` reads `job_total` points dated (at their job's start) after `from -
/// max_job_length`, not all history: against a real influxd, a job that started longer
/// ago than that is not found (the documented limit), while every job within it is
/// billed exactly, on several nodes and across agent restarts; a longer limit finds it.
#[test]
fn job_bills_read_job_totals_from_max_job_length_before_the_period() {
    let db = influxd_with_db("");
    let day = 86_400_000u64;
    let from = 1_790_812_800_000u64; // 2026-10-01T00:00:00Z
    let to = from + 31 * day;
    // (job, node, project, user, since, until, gpu µJ): points as the collector writes
    // them (collector/src/lineproto.rs), one per job, node and agent run, at since_ms.
    let points: &[(&str, &str, &str, &str, u64, u64, u64)] = &[
        // Started 2 days before the period, still running in it: found.
        (
            "1",
            "n1",
            "proj-a",
            "alice",
            from - 2 * day,
            from + day,
            1_000_000_007,
        ),
        // Started 4 days before the period, ran into it: older than 3 days, not found.
        (
            "2",
            "n1",
            "proj-a",
            "alice",
            from - 4 * day,
            from + 3_600_000,
            2_000_000_011,
        ),
        // Two nodes: both points found and added.
        (
            "3",
            "n1",
            "proj-b",
            "bob",
            from + 5 * day,
            from + 6 * day,
            3_000_000_013,
        ),
        (
            "3",
            "n2",
            "proj-b",
            "bob",
            from + 5 * day,
            from + 6 * day,
            4_000_000_017,
        ),
        // An agent restart: a second point for the same job and node, added.
        (
            "4",
            "n2",
            "proj-a",
            "carol",
            from + 10 * day,
            from + 10 * day + 7_200_000,
            19,
        ),
        (
            "4",
            "n2",
            "proj-a",
            "carol",
            from + 10 * day + 7_200_000,
            from + 11 * day,
            23,
        ),
        // Ended before the period; started after it: not in this bill.
        (
            "5",
            "n1",
            "proj-a",
            "alice",
            from - day,
            from - 3_600_000,
            29,
        ),
        ("6", "n1", "proj-a", "alice", to + 1, to + day, 31),
    ];
    let lines: Vec<String> = points
        .iter()
        .map(|(job, node, project, user, since, until, gpu_uj)| {
            format!(
                "job_total,cluster=c1,job={job},node={node},project={project},user={user} \
                 energy_gpu_uj={gpu_uj}i,energy_cpu_uj=5i,energy_dram_uj=3i,energy_other_uj=2i,\
                 energy_uj={}i,gpu_ms=1000i,cpu_us=7i,start_ms={since}i,until_ms={until}i,\
                 ended=true,gpus=\"0\" {since}",
                gpu_uj + 10
            )
        })
        .collect();
    db.write_lines(DB, None, "ms", lines.join("\n").into_bytes(), false)
        .unwrap();

    let bill = |max_job: &str, project: Option<&str>| -> Vec<(String, u64, u64)> {
        let cfg = billing_config(&db, &format!("max_job_length = \"{max_job}\"\n"));
        let (f, t) = (rfc3339(from), rfc3339(to));
        let mut args = vec![
            "usage", "--by", "job", "--format", "json", "--from", &f, "--to", &t,
        ];
        if let Some(p) = project {
            args.extend(["--project", p]);
        }
        let rows: serde_json::Value = serde_json::from_str(&collector_cli(&cfg, &args)).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["key"].as_str().unwrap().to_string(),
                    r["energy_uj"].as_u64().unwrap(),
                    (r["cpu_core_hours"].as_f64().unwrap() * 3.6e9).round() as u64,
                )
            })
            .collect()
    };
    let e = |gpu_uj: u64| gpu_uj + 10;
    assert_eq!(
        bill("3days", None),
        [
            ("1".to_string(), e(1_000_000_007), 7),
            ("3".to_string(), e(3_000_000_013) + e(4_000_000_017), 14),
            ("4".to_string(), e(19) + e(23), 14),
        ],
        "job 2 started more than 3 days before the period"
    );
    assert_eq!(
        bill("5days", None)
            .iter()
            .map(|r| r.0.as_str())
            .collect::<Vec<_>>(),
        ["1", "2", "3", "4"],
        "a longer max_job_length finds it"
    );
    assert_eq!(
        bill("3days", Some("proj-b")),
        [("3".to_string(), e(3_000_000_013) + e(4_000_000_017), 14)]
    );
}

/// `[http] max-row-limit` cuts InfluxDB 1.x's whole answers (marking only the last
/// series it kept); chunked answers are not cut, so a bill is whole on such a server.
#[test]
fn a_server_with_max_row_limit_still_bills_every_row() {
    let db = influxd_with_db("  max-row-limit = 2");
    let t = 1_790_812_800_000u64; // 2026-10-01T00:00:00Z
    let lines: Vec<String> = (0..5)
        .map(|i| {
            format!(
                "job_total,cluster=c1,job={i},node=n{i},project=p{i},user=u energy_gpu_uj=1i,energy_cpu_uj=0i,\
                 energy_dram_uj=0i,energy_other_uj=0i,energy_uj=1i,gpu_ms=1i,cpu_us=0i,start_ms={}i,until_ms={}i,ended=true,gpus=\"0\" {}\n\
                 usage,cluster=c1,node=n{i},project=p{i},user=u energy_gpu_uj=1i,energy_cpu_uj=0i,energy_dram_uj=0i,\
                 energy_other_uj=0i,energy_uj=1i,gpu_ms=1i,cpu_us=0i,span_ms=1i,jobs=1i {}",
                t + i,
                t + 1000,
                t + i,
                t + 1000 + i
            )
        })
        .collect();
    db.write_lines(DB, None, "ms", lines.join("\n").into_bytes(), false)
        .unwrap();
    let cfg = billing_config(&db, "");
    for by in ["job", "project", "node"] {
        let stdout = collector_cli(
            &cfg,
            &[
                "usage",
                "--by",
                by,
                "--from",
                "2026-09-30",
                "--to",
                "2026-10-02",
                "--format",
                "csv",
            ],
        );
        let key = match by {
            "job" => "",
            "project" => "p",
            _ => "n",
        };
        let keys: Vec<&str> = stdout
            .lines()
            .skip(1)
            .filter_map(|l| l.split(',').next())
            .collect();
        let want: Vec<String> = (0..5).map(|i| format!("{key}{i}")).collect();
        assert_eq!(keys, want, "--by {by}:\n{stdout}");
    }
}

/// Hourly rollups change how fast a bill is, never what it says: against a real influxd,
/// bills read through rollups equal bills read from `usage` alone, for aligned and
/// unaligned periods, one project, and through the cases that must fall back to `usage`:
/// a write into an hour after its rollup, and an hour whose rows are not its rollup's.
#[test]
fn rollups_bill_exactly_what_usage_says_through_late_writes_and_mixed_rows() {
    const H: u64 = 3_600_000;
    let db = influxd_with_db("");
    let from = 1_790_812_800_000u64; // 2026-10-01T00:00:00Z
    let to = from + 6 * H;
    // usage points as the collector writes them, every 15 minutes (an hour's end holds
    // the point stamped on it), three nodes, owners changing over the hours.
    let owners = [
        ("proj-a", "alice"),
        ("proj-a", "bob"),
        ("proj-b", "carol"),
        ("_idle", "_none"),
    ];
    let mut lines = Vec::new();
    let mut n = 0u64;
    let point = |lines: &mut Vec<String>, node: &str, o: usize, t: u64, gpu: u64| {
        let (p, u) = owners[o];
        lines.push(format!(
            "usage,cluster=c1,node={node},project={p},user={u} energy_gpu_uj={gpu}i,energy_cpu_uj={}i,\
             energy_dram_uj=3i,energy_other_uj=5i,energy_uj={}i,gpu_ms=900000i,cpu_us=7i,span_ms=900000i,jobs=1i {t}",
            gpu / 7,
            gpu + gpu / 7 + 8
        ));
    };
    for q in 0..=6 * 4 {
        let t = from + q * 900_000;
        for (i, node) in ["n1", "n2", "n3"].iter().enumerate() {
            n += 1;
            let o = (q as usize / 3 + i) % owners.len();
            point(
                &mut lines,
                node,
                o,
                t,
                1_000_003_000 * (i as u64 + 1) + n * 7919,
            );
            if q % 5 == 0 {
                point(&mut lines, node, (o + 1) % owners.len(), t, 333_331 * n);
            }
        }
    }
    db.write_lines(DB, None, "ms", lines.join("\n").into_bytes(), false)
        .unwrap();

    let cfg = |rollups: bool| billing_config(&db, &format!("rollups = {rollups}\n"));
    let (raw, rolled) = (cfg(false), cfg(true));
    let bill = |c: &ConfigFile, by: &str, a: u64, b: u64, project: Option<&str>| -> String {
        let (f, t) = (rfc3339(a), rfc3339(b));
        let mut args = vec![
            "usage", "--by", by, "--format", "csv", "--from", &f, "--to", &t,
        ];
        if let Some(p) = project {
            args.extend(["--project", p]);
        }
        collector_cli(c, &args)
    };
    let periods = [
        (from, to),
        (from - 17, to + 5),
        (from + H / 2, to - H / 3),
        (from + H, from + 2 * H),
        (from + 10, from + 20),
    ];
    let same_as_raw = |why: &str| {
        for (a, b) in periods {
            for by in ["project", "user", "node"] {
                assert_eq!(
                    bill(&rolled, by, a, b, None),
                    bill(&raw, by, a, b, None),
                    "{why}: --by {by} over ({a}, {b}]"
                );
            }
            for by in ["user", "node"] {
                assert_eq!(
                    bill(&rolled, by, a, b, Some("proj-a")),
                    bill(&raw, by, a, b, Some("proj-a")),
                    "{why}: --project proj-a --by {by} over ({a}, {b}]"
                );
            }
        }
    };
    let before = bill(&raw, "project", from, to, None);
    assert!(
        before.contains("proj-a") && before.contains("proj-b"),
        "{before}"
    );

    // No rollups yet: the same bills.
    same_as_raw("before any rollup");
    let out = collector_cli(
        &rolled,
        &[
            "rollup",
            "--from",
            &rfc3339(from - H),
            "--to",
            &rfc3339(to + H),
        ],
    );
    assert!(
        out.starts_with("rolled up 8 hours (90 usage points)"),
        "{out}"
    );
    let again = collector_cli(
        &rolled,
        &["rollup", "--from", &rfc3339(from), "--to", &rfc3339(to)],
    );
    assert!(
        again.starts_with("rolled up 0 hours") && again.contains("6 already usable"),
        "{again}"
    );
    same_as_raw("rolled up");

    // The rolled-up bill reads the rollups: with one hour's usage deleted it does not
    // change, while a bill from usage does.
    db.execute(
        DB,
        &format!(
            "DELETE FROM \"usage\" WHERE time > {}ms AND time <= {}ms",
            from + 2 * H,
            from + 3 * H
        ),
    )
    .unwrap();
    assert_eq!(
        bill(&rolled, "project", from, to, None),
        before,
        "read from the rollups"
    );
    assert_ne!(bill(&raw, "project", from, to, None), before);
    db.write_lines(DB, None, "ms", lines.join("\n").into_bytes(), false)
        .unwrap();

    // A late point into a rolled-up hour, written as the collector writes: its hour
    // marked first. That hour is read from usage, and the bills stay equal.
    let marker = |hour: u64, at: u64| format!("usage_hour_state written_ms={at}i {hour}");
    let late = "usage,cluster=c1,node=n9,project=proj-b,user=carol energy_gpu_uj=123456789i,energy_cpu_uj=0i,\
                energy_dram_uj=0i,energy_other_uj=0i,energy_uj=123456789i,gpu_ms=1i,cpu_us=0i,span_ms=1i,jobs=1i";
    db.write_lines(
        DB,
        None,
        "ms",
        marker(from + 4 * H, now_ms()).into_bytes(),
        false,
    )
    .unwrap();
    db.write_lines(
        DB,
        None,
        "ms",
        format!("{late} {}", from + 4 * H - 1).into_bytes(),
        false,
    )
    .unwrap();
    assert_ne!(
        bill(&raw, "project", from, to, None),
        before,
        "the late point counts"
    );
    same_as_raw("a late write into a rolled-up hour");
    // `rollup` leaves an hour alone while its writes settle.
    let out = collector_cli(
        &rolled,
        &["rollup", "--from", &rfc3339(from), "--to", &rfc3339(to)],
    );
    assert!(
        out.starts_with("rolled up 0 hours") && out.contains("1 written into in the last"),
        "{out}"
    );
    // Once quiet, rolled up again, and still equal. Quiet is shown with the marker of a
    // write exactly `settle` (10 min) before the first rollup read: that rollup is still
    // not usable, and one made now is.
    let v = db.query(
        DB,
        &format!(
            "SELECT rolled_ms FROM usage_hour_state WHERE time = {}ms",
            from + 4 * H
        ),
    );
    let first_rollup = v["results"][0]["series"][0]["values"][0][1]
        .as_u64()
        .unwrap();
    db.write_lines(
        DB,
        None,
        "ms",
        marker(from + 4 * H, first_rollup - 600_000).into_bytes(),
        false,
    )
    .unwrap();
    same_as_raw("a write settle before the rollup");
    let out = collector_cli(
        &rolled,
        &["rollup", "--from", &rfc3339(from), "--to", &rfc3339(to)],
    );
    assert!(out.starts_with("rolled up 1 hours"), "{out}");
    same_as_raw("rolled up again after the late write");

    // A row of another rollup in an hour (two rollups at once): that hour from usage.
    db.write_lines(
        DB,
        None,
        "ms",
        format!("usage_hourly,cluster=c1,project=proj-a,user=alice energy_gpu_uj=1i,energy_cpu_uj=0i,energy_dram_uj=0i,energy_other_uj=0i,energy_uj=1i,gpu_ms=0i,cpu_us=0i,rolled_ms=1i {}", from + 5 * H)
            .into_bytes(),
        false,
    )
    .unwrap();
    db.write_lines(
        DB,
        None,
        "ms",
        format!("usage_hourly_node,cluster=c1,node=n7 energy_gpu_uj=1i,energy_cpu_uj=0i,energy_dram_uj=0i,energy_other_uj=0i,energy_uj=1i,gpu_ms=0i,cpu_us=0i,rolled_ms=1i {}", from + H)
            .into_bytes(),
        false,
    )
    .unwrap();
    same_as_raw("rows that are not their hour's rollup");
}

/// A run of hours whose rollup fails (here a negative `usage` value written by hand) is
/// named and left to raw reads; the other runs are rolled up all the same.
#[test]
fn a_rollup_failing_for_some_hours_rolls_up_the_others_and_names_them() {
    const H: u64 = 3_600_000;
    let db = influxd_with_db("");
    let from = 1_790_812_800_000u64; // 2026-10-01T00:00:00Z
    let usage = |t: u64, gpu: i64| {
        format!(
            "usage,cluster=c1,node=n1,project=p,user=u energy_gpu_uj={gpu}i,energy_cpu_uj=0i,\
             energy_dram_uj=0i,energy_other_uj=0i,energy_uj={gpu}i,gpu_ms=1i,cpu_us=0i,span_ms=1i,jobs=1i {t}"
        )
    };
    let lines = [usage(from + 900_000, -5), usage(from + 5 * H + 900_000, 7)].join("\n");
    db.write_lines(DB, None, "ms", lines.into_bytes(), false)
        .unwrap();
    let cfg = billing_config(&db, "");
    let rollup = |a: u64, b: u64| {
        collector_run(
            &cfg,
            &["rollup", "--from", &rfc3339(a), "--to", &rfc3339(b)],
        )
    };
    // The middle hour first, so the period's other hours are two runs.
    assert!(rollup(from + 2 * H, from + 3 * H).status.success());
    let out = rollup(from, from + 6 * H);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("rolled up 3 hours") && stdout.contains("1 already usable"),
        "{stdout}"
    );
    assert!(
        stderr.contains("hours not rolled up")
            && stderr.contains(&format!(
                "the hours ending {}..={} ms",
                from + H,
                from + 2 * H
            )),
        "{stderr}"
    );
    let rolled = |h: u64| {
        db.rows(
            DB,
            &format!("SELECT rolled_ms FROM usage_hour_state WHERE time = {h}ms"),
        )
        .first()
        .is_some_and(|(_, r)| r["rolled_ms"].is_number())
    };
    assert!(!rolled(from + H) && !rolled(from + 2 * H));
    assert!((4..=6).all(|k| rolled(from + k * H)));
    assert_eq!(
        db.scalar(DB, "SELECT SUM(energy_gpu_uj) FROM usage_hourly"),
        7.0
    );
    // Hours that have not ended are left for later, not rolled up empty.
    let hour = now_ms() / H * H;
    let out = collector_cli(
        &cfg,
        &[
            "rollup",
            "--from",
            &rfc3339(hour - H),
            "--to",
            &rfc3339(hour + 2 * H),
        ],
    );
    assert!(
        out.contains("rolled up 1 hours") && out.contains("2 not ended yet"),
        "{out}"
    );
}

/// InfluxDB before 1.7.8 marks a series of more than 10,000 values `partial` in a whole
/// (non-chunked) answer: a month's `--by job` over 1,000 nodes was refused for it.
#[test]
fn a_bill_of_more_than_10000_jobs_is_whole() {
    const JOBS: u64 = 10_050;
    let db = influxd_with_db("");
    let t = 1_790_812_800_000u64; // 2026-10-01T00:00:00Z
    let lines: Vec<String> = (0..JOBS)
        .map(|i| {
            format!(
                "job_total,cluster=c1,job={i},node=n1,project=p,user=u energy_gpu_uj={}i,energy_cpu_uj=0i,\
                 energy_dram_uj=0i,energy_other_uj=0i,energy_uj={}i,gpu_ms=1i,cpu_us=0i,start_ms={}i,\
                 until_ms={}i,ended=true,gpus=\"0\" {}",
                i + 1,
                i + 1,
                t + i,
                t + i + 1,
                t + i + 1
            )
        })
        .collect();
    db.write_lines(DB, None, "ms", lines.join("\n").into_bytes(), false)
        .unwrap();
    let cfg = billing_config(&db, "");
    let out = collector_cli(
        &cfg,
        &[
            "usage",
            "--by",
            "job",
            "--format",
            "json",
            "--from",
            "2026-09-30",
            "--to",
            "2026-10-02",
        ],
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len() as u64, JOBS);
    let total: u64 = rows.iter().map(|r| r["energy_uj"].as_u64().unwrap()).sum();
    assert_eq!(total, JOBS * (JOBS + 1) / 2);
}
