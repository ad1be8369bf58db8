//! What a billing clerk hands to a customer, against a real influxd holding usage and job
//! totals written exactly as the collector writes them (known instants and energies):
//! a job report's chart spans the job and draws each usage point over the span it
//! covers; an empty period and an unknown job say so.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use nodewatt_tests::*;

const DB: &str = "nodewatt_reports";
const MIN: u64 = 60_000;
/// 1 W for 1 ms.
const UJ_PER_MS_AT_1_W: u64 = 1_000;

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One `usage` point as lineproto.rs writes it: GPU and CPU package energy (µJ), CPU
/// time (µs), the span it covers (ms, ending at `t`) and how many jobs it sums.
#[allow(clippy::too_many_arguments)]
fn usage_line(
    node: &str,
    owner: (&str, &str),
    gpu_uj: u64,
    cpu_uj: u64,
    cpu_us: u64,
    span_ms: u64,
    jobs: u64,
    t: u64,
) -> String {
    let (project, user) = owner;
    format!(
        "usage,cluster=c1,node={node},project={project},user={user} energy_gpu_uj={gpu_uj}i,\
         energy_cpu_uj={cpu_uj}i,energy_dram_uj=0i,energy_other_uj=0i,energy_uj={}i,\
         gpu_ms={span_ms}i,cpu_us={cpu_us}i,energy_gpu_idle_uj=0i,energy_gpu_capped_uj=0i,\
         gpu_tensor_us=0i,span_ms={span_ms}i,jobs={jobs}i {t}",
        gpu_uj + cpu_uj
    )
}

fn job_total_line(job: &str, node: &str, gpu_uj: u64, start: u64, until: u64) -> String {
    format!(
        "job_total,cluster=c1,job={job},node={node},project=proj-a,user=alice \
         energy_gpu_uj={gpu_uj}i,energy_cpu_uj=0i,energy_dram_uj=0i,energy_other_uj=0i,\
         energy_uj={gpu_uj}i,gpu_ms={}i,cpu_us=0i,energy_gpu_idle_uj=0i,\
         energy_gpu_capped_uj=0i,gpu_tensor_us=0i,start_ms={start}i,until_ms={until}i,\
         ended=true,gpus=\"0\" {start}",
        until - start
    )
}

/// A private influxd with the database, and a collector config reading it.
fn setup() -> (Influxd, ConfigFile) {
    let db = Influxd::start();
    db.execute("", &format!("CREATE DATABASE \"{DB}\""))
        .unwrap();
    let cfg = config_file(
        "collector.toml",
        &format!(
            "[collector]\nid = \"reports\"\n[influxdb]\nurl = \"{}\"\ndatabase = \"{DB}\"\n",
            db.url()
        ),
    );
    (db, cfg)
}

fn write(db: &Influxd, lines: &[String]) {
    db.write_lines(DB, None, "ms", lines.join("\n").into_bytes(), false)
        .unwrap();
}

/// An hour boundary two hours ago: usage points are published on the wall-clock grid.
fn hour() -> u64 {
    (nodewatt_common::now_ms() / 3_600_000 - 2) * 3_600_000
}

/// The value of attribute `name` in the first element that starts with `element`.
fn attr(svg: &str, element: &str, name: &str) -> String {
    let at = svg
        .find(element)
        .unwrap_or_else(|| panic!("no {element} in {svg}"));
    let rest = &svg[at..];
    let rest = &rest[..rest.find('>').unwrap()];
    let key = format!(" {name}=\"");
    let v = &rest[rest
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {rest}"))
        + key.len()..];
    v[..v.find('"').unwrap()].to_string()
}

fn num(svg: &str, element: &str, name: &str) -> f64 {
    attr(svg, element, name).parse().unwrap()
}

#[test]
fn job_chart_spans_the_job_and_draws_each_point_over_the_span_it_covers() {
    let (db, cfg) = setup();
    let t = hour();
    let alice = ("proj-a", "alice");
    // Job 7 on n1 from s to its last sample u, its GPU at 400 W (µJ per ms). Usage is
    // published every minute on the grid and at the job's edges (the first sample after
    // its start, t + 11 s; its last, u): each point covers the span before it.
    let (s, u) = (t + 10_345, t + 3 * MIN + 21_000);
    let w = 400 * UJ_PER_MS_AT_1_W;
    let mut lines = vec![
        usage_line(
            "n1",
            alice,
            w * (t + 11_000 - s),
            0,
            0,
            11_000,
            1,
            t + 11_000,
        ),
        usage_line("n1", alice, w * 49_000, 0, 0, 49_000, 1, t + MIN),
        usage_line("n1", alice, w * MIN, 0, 0, MIN, 1, t + 2 * MIN),
        usage_line("n1", alice, w * MIN, 0, 0, MIN, 1, t + 3 * MIN),
        // The job ended at u - 500 ms: the last span holds 20.5 s of it.
        usage_line("n1", alice, w * 20_500, 0, 0, 21_000, 1, u),
        // Another job of alice on n1, after job 7, at 1 kW: not in its chart.
        usage_line(
            "n1",
            alice,
            1_000 * UJ_PER_MS_AT_1_W * MIN,
            0,
            0,
            MIN,
            1,
            t + 5 * MIN,
        ),
    ];
    // What no job used on n1, all along: another project, not in the chart.
    for k in 1..=5 {
        lines.push(usage_line(
            "n1",
            ("_idle", "_none"),
            900 * UJ_PER_MS_AT_1_W * MIN,
            0,
            0,
            MIN,
            0,
            t + k * MIN,
        ));
    }
    let total = w * (u - 500 - s);
    lines.push(job_total_line("7", "n1", total, s, u));
    // Job 9 on n2 shared the node with another job of alice: usage cannot tell them apart.
    let (s9, u9) = (t + 30 * MIN, t + 32 * MIN);
    let w9 = 600 * UJ_PER_MS_AT_1_W * MIN;
    lines.push(usage_line("n2", alice, w9, 0, 0, MIN, 2, s9 + MIN));
    lines.push(usage_line("n2", alice, w9, 0, 0, MIN, 2, u9));
    lines.push(job_total_line("9", "n2", w9, s9, u9));
    write(&db, &lines);

    let out = tempfile::tempdir().unwrap();
    let md_path = out.path().join("job-7.md");
    collector_cli(
        &cfg,
        &[
            "report",
            "--job",
            "7",
            "--output",
            md_path.to_str().unwrap(),
        ],
    );
    let md = std::fs::read_to_string(&md_path).unwrap();
    let svg = std::fs::read_to_string(md_path.with_extension("svg")).unwrap();
    if let Some(keep) = std::env::var_os("NODEWATT_KEEP_REPORT") {
        std::fs::write(Path::new(&keep).with_extension("md"), &md).unwrap();
        std::fs::write(Path::new(&keep).with_extension("svg"), &svg).unwrap();
    }

    // The x axis is the job's span, from its totals.
    let plot = "<rect class=\"plot\"";
    assert_eq!(num(&svg, plot, "data-from-ms") as u64, s, "{svg}");
    assert_eq!(num(&svg, plot, "data-to-ms") as u64, u, "{svg}");
    // Only the job's owner on its node during it: 400 W, on an axis to 500 W (the 1 kW
    // job after it, and _idle, are left out).
    assert_eq!(num(&svg, plot, "data-max-w"), 500.0, "{svg}");
    let (x0, y0) = (num(&svg, plot, "x"), num(&svg, plot, "y"));
    let (pw, ph) = (num(&svg, plot, "width"), num(&svg, plot, "height"));
    let x = |ms: u64| x0 + (ms - s) as f64 / (u - s) as f64 * pw;
    let y = |watts: f64| y0 + ph - watts / 500.0 * ph;
    let points: Vec<(f64, f64)> = attr(&svg, "<polyline class=\"gpu\"", "points")
        .split(' ')
        .map(|p| {
            let (a, b) = p.split_once(',').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    let near =
        |(a, b): (f64, f64), (c, d): (f64, f64)| (a - c).abs() <= 0.1 && (b - d).abs() <= 0.1;
    // Minute buckets (the usage interval) on the wall-clock grid: the first is the job's
    // first span, from its start to t + 1 min, at 400 W; not drawn a minute late.
    assert!(near(points[0], (x(s), y(400.0))), "{points:?}\n{svg}");
    assert!(near(points[1], (x(t + MIN), y(400.0))), "{points:?}");
    assert!(near(points[2], (x(t + MIN), y(400.0))), "{points:?}");
    assert!(near(points[3], (x(t + 2 * MIN), y(400.0))), "{points:?}");
    // The last ends at the job's last sample: 20.5 s of 400 W over 21 s.
    let last = 400.0 * 20.5 / 21.0;
    let n = points.len();
    assert!(near(points[n - 2], (x(t + 3 * MIN), y(last))), "{points:?}");
    assert!(near(points[n - 1], (x(u), y(last))), "{points:?}");
    assert_eq!(n, 8, "four steps: {points:?}");
    // One time label with the date, in UTC; units on both axes; a title saying what.
    let day = &rfc3339(s)[..10];
    assert!(svg.contains(&format!(">time (UTC), {day}</text>")), "{svg}");
    assert!(svg.contains(">power (W)</text>"), "{svg}");
    assert!(
        svg.contains("Job 7: its attributed power by device class"),
        "{svg}"
    );
    assert!(md.contains("the power attributed to job 7 itself"), "{md}");
    assert!(md.contains("mean power (W) over each 1m"), "{md}");

    // Job 9: the chart says plainly that it is not the job alone.
    let md9_path = out.path().join("job-9.md");
    collector_cli(
        &cfg,
        &[
            "report",
            "--job",
            "9",
            "--output",
            md9_path.to_str().unwrap(),
        ],
    );
    let md9 = std::fs::read_to_string(&md9_path).unwrap();
    let svg9 = std::fs::read_to_string(md9_path.with_extension("svg")).unwrap();
    assert!(md9.contains("not job 9 alone"), "{md9}");
    assert!(md9.contains("up to 2 at once"), "{md9}");
    assert!(svg9.contains("not job 9 alone"), "{svg9}");
    assert_eq!(num(&svg9, plot, "data-max-w"), 1000.0, "600 W: {svg9}");
}

#[test]
fn an_empty_job_report_is_an_error_naming_the_job_and_writes_no_file() {
    let (db, cfg) = setup();
    let t = hour();
    write(&db, &[job_total_line("7", "n1", 1_000, t, t + MIN)]);
    let out = tempfile::tempdir().unwrap();
    let md = out.path().join("job-999999.md");
    let run = collector_run(
        &cfg,
        &[
            "report",
            "--job",
            "999999",
            "--output",
            md.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("no usage recorded for job 999999"), "{err}");
    assert!(
        err.contains("usage --by job"),
        "how to find valid ones: {err}"
    );
    assert!(!md.exists() && !md.with_extension("svg").exists());
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn usage_says_what_is_empty_and_why_a_class_is_zero() {
    let (db, cfg) = setup();
    let t = hour();
    // Jobs of proj-a on n1 with no CPU time measured: the CPU packages' energy is all
    // _idle's. No DRAM domain, no power meter anywhere.
    write(
        &db,
        &[
            usage_line("n1", ("proj-a", "alice"), 36_000_000, 0, 0, MIN, 1, t + MIN),
            usage_line("n1", ("_idle", "_none"), 0, 9_000_000, 0, MIN, 0, t + MIN),
        ],
    );
    let (from, to) = (rfc3339(t), rfc3339(t + 2 * MIN));
    let table = collector_cli(&cfg, &["usage", "--from", &from, "--to", &to]);
    // Units on every column.
    for unit in ["(kWh)", "(h)", "(core-h)", "(kg)"] {
        assert!(table.lines().nth(1).unwrap().contains(unit), "{table}");
    }
    assert!(
        table.contains("CPU energy is 0 for every project but _idle: it is shared among jobs"),
        "{table}"
    );
    assert!(
        table.contains("DRAM energy is 0 for every project but _idle: no RAPL dram domain"),
        "{table}"
    );
    assert!(table.contains("no job's CPU time was measured"), "{table}");
    assert!(
        table.contains("other energy is 0 for every project but _idle: no node power meter"),
        "{table}"
    );

    // A period with nothing in it: the table says so; CSV and JSON stay valid, with the
    // hint on stderr; an empty month is a valid bill (exit 0).
    let (ef, et) = ("2020-01-01", "2020-02-01");
    let empty = collector_cli(&cfg, &["usage", "--from", ef, "--to", et]);
    assert!(
        empty.contains("No usage recorded in (2020-01-01T00:00:00Z, 2020-02-01T00:00:00Z] (UTC)"),
        "{empty}"
    );
    assert!(empty.contains("usage --by node"), "{empty}");
    assert!(!empty.contains("TOTAL"), "{empty}");
    let nosuch = collector_cli(
        &cfg,
        &["usage", "--from", &from, "--to", &to, "--project", "nosuch"],
    );
    assert!(nosuch.contains("for project nosuch"), "{nosuch}");
    assert!(nosuch.contains("usage --by project"), "{nosuch}");
    for (format, stdout) in [
        ("csv", "key,project,user,energy_uj,energy_kwh,gpu_kwh,cpu_kwh,dram_kwh,other_kwh,gpu_hours,cpu_core_hours,pue,facility_kwh,cost,currency,co2e_kg\n"),
        ("json", "[]\n"),
    ] {
        let run = collector_run(&cfg, &["usage", "--from", ef, "--to", et, "--format", format]);
        assert!(run.status.success());
        assert_eq!(String::from_utf8_lossy(&run.stdout), stdout);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("No usage recorded in (2020-01-01T00:00:00Z"), "{err}");
    }
}
