//! What a billing clerk hands to a customer, against a real influxd holding usage and job
//! totals written exactly as the collector writes them (known instants and energies):
//! a job report's chart spans the job and draws each usage point over the span it
//! covers, sums a job's nodes, spreads a late long span and leaves lost data a gap; an
//! empty period and an unknown job say so.

use std::path::Path;

use nodewatt_tests::*;

const DB: &str = "nodewatt_reports";
const MIN: u64 = 60_000;
/// 1 W for 1 ms.
const UJ_PER_MS_AT_1_W: u64 = 1_000;

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
    let (md, svg) = report(&cfg, "7", out.path());
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
    let (md9, svg9) = report(&cfg, "9", out.path());
    assert!(md9.contains("not job 9 alone"), "{md9}");
    assert!(md9.contains("up to 2 at once"), "{md9}");
    assert!(svg9.contains("not job 9 alone"), "{svg9}");
    assert_eq!(num(&svg9, plot, "data-max-w"), 1000.0, "600 W: {svg9}");
}

/// Writes job `job`'s report into `out`: its Markdown and its SVG chart.
fn report(cfg: &ConfigFile, job: &str, out: &Path) -> (String, String) {
    let md_path = out.join(format!("job-{job}.md"));
    collector_cli(
        cfg,
        &[
            "report",
            "--job",
            job,
            "--output",
            md_path.to_str().unwrap(),
        ],
    );
    let md = std::fs::read_to_string(&md_path).unwrap();
    let svg = std::fs::read_to_string(md_path.with_extension("svg")).unwrap();
    (md, svg)
}

/// The points of every polyline of `class`, in order: one per run of drawn steps.
fn polylines(svg: &str, class: &str) -> Vec<Vec<(f64, f64)>> {
    let element = format!("<polyline class=\"{class}\"");
    svg.match_indices(&element)
        .map(|(at, _)| {
            attr(&svg[at..], &element, "points")
                .split(' ')
                .map(|p| {
                    let (a, b) = p.split_once(',').unwrap();
                    (a.parse().unwrap(), b.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

/// A job's usage points on one node at `w` W of GPU, one per minute on the grid from
/// its start `s` (the first covering (s, next minute]) to its end `u` (on the grid).
fn minutes(node: &str, w: u64, s: u64, u: u64) -> Vec<String> {
    every(node, w, s, u, MIN)
}

/// The same, one point per `interval` ms on its grid.
fn every(node: &str, w: u64, s: u64, u: u64, interval: u64) -> Vec<String> {
    let mut lines = Vec::new();
    let (mut from, mut to) = (s, (s / interval + 1) * interval);
    while to <= u {
        let span = to - from;
        let uj = w * UJ_PER_MS_AT_1_W * span;
        lines.push(usage_line(node, ("proj-a", "alice"), uj, 0, 0, span, 1, to));
        (from, to) = (to, to + interval);
    }
    lines
}

/// The chart's plot: x of an instant over (s, u], y of a power on an axis to `max` W.
fn plot(svg: &str, s: u64, u: u64, max: f64) -> (impl Fn(u64) -> f64, impl Fn(f64) -> f64) {
    let plot = "<rect class=\"plot\"";
    assert_eq!(num(svg, plot, "data-from-ms") as u64, s, "{svg}");
    assert_eq!(num(svg, plot, "data-to-ms") as u64, u, "{svg}");
    assert_eq!(num(svg, plot, "data-max-w"), max, "{svg}");
    let (x0, y0) = (num(svg, plot, "x"), num(svg, plot, "y"));
    let (pw, ph) = (num(svg, plot, "width"), num(svg, plot, "height"));
    (
        move |ms: u64| x0 + (ms - s) as f64 / (u - s) as f64 * pw,
        move |watts: f64| y0 + ph - watts / max * ph,
    )
}

#[test]
fn a_job_on_several_nodes_sums_them_in_its_chart_and_its_totals() {
    let (db, cfg) = setup();
    let t = hour();
    // Job 11 on three nodes, each from its own start: n1 at 300 W from t + 5 s, n3 at
    // 200 W from t + 1 min to t + 4 min, n2 at 500 W from t + 2.5 min; n1 and n2 to
    // t + 6 min.
    let u = t + 6 * MIN;
    let nodes = [
        ("n1", 300, t + 5_000, u),
        ("n2", 500, t + 2 * MIN + 30_000, u),
        ("n3", 200, t + MIN, t + 4 * MIN),
    ];
    let mut lines = Vec::new();
    for (node, w, s, until) in nodes {
        lines.extend(minutes(node, w, s, until));
        lines.push(job_total_line(
            "11",
            node,
            w * UJ_PER_MS_AT_1_W * (until - s),
            s,
            until,
        ));
    }
    write(&db, &lines);
    let out = tempfile::tempdir().unwrap();
    let (md, svg) = report(&cfg, "11", out.path());

    // Totals sum over the nodes: energy and GPU time.
    let joules: u64 = nodes.iter().map(|(_, w, s, u)| w * (u - s) / 1000).sum();
    let gpu_ms: u64 = nodes.iter().map(|(_, _, s, u)| u - s).sum();
    assert!(
        md.contains(&format!(
            "| GPU | {:.6} | {:.3} |",
            joules as f64 / 3.6e6,
            joules as f64
        )),
        "{joules} J: {md}"
    );
    assert!(
        md.contains(&format!(
            "| GPU time | {:.3} GPU-hours |",
            gpu_ms as f64 / 3.6e6
        )),
        "{md}"
    );
    assert!(md.contains("| Nodes | n1, n2, n3 |"), "{md}");
    assert!(md.contains("| GPUs | n1: 0; n2: 0; n3: 0 |"), "{md}");
    assert!(md.contains("the power attributed to job 11 itself"), "{md}");

    // The chart spans the earliest start to the latest end and sums the nodes present
    // in each minute: n2's first half minute adds half its power to that minute.
    let plot = "<rect class=\"plot\"";
    let s = t + 5_000;
    assert_eq!(num(&svg, plot, "data-from-ms") as u64, s, "{svg}");
    assert_eq!(num(&svg, plot, "data-to-ms") as u64, u, "{svg}");
    assert_eq!(num(&svg, plot, "data-max-w"), 1000.0, "{svg}");
    let (x0, y0) = (num(&svg, plot, "x"), num(&svg, plot, "y"));
    let (pw, ph) = (num(&svg, plot, "width"), num(&svg, plot, "height"));
    let x = |ms: u64| x0 + (ms - s) as f64 / (u - s) as f64 * pw;
    let y = |watts: f64| y0 + ph - watts / 1000.0 * ph;
    let gpu = polylines(&svg, "gpu");
    assert_eq!(gpu.len(), 1, "no gap: {svg}");
    let mut want = vec![(x(s), y(300.0)), (x(t + MIN), y(300.0))];
    for (k, watts) in [(1, 500.0), (2, 750.0), (3, 1000.0), (4, 800.0), (5, 800.0)] {
        want.push((x(t + k * MIN), y(watts)));
        want.push((x(t + (k + 1) * MIN), y(watts)));
    }
    assert_eq!(gpu[0].len(), want.len(), "{gpu:?}");
    for (got, want) in gpu[0].iter().zip(&want) {
        assert!(
            (got.0 - want.0).abs() <= 0.1 && (got.1 - want.1).abs() <= 0.1,
            "{got:?} != {want:?}: {gpu:?}"
        );
    }
}

#[test]
fn a_late_long_span_is_drawn_over_the_time_it_covers_and_lost_data_is_a_gap() {
    let (db, cfg) = setup();
    let t = hour();
    // Job 12 on n1 at 400 W from t to t + 16 min. Its agent stopped from t + 3 to
    // t + 8 min and resumed: one point at t + 8 min covers those 5 minutes. Then the
    // node rebooted: nothing measured from t + 10 to t + 13 min, and the next point
    // covers only the minute before it.
    let u = t + 16 * MIN;
    let w = 400 * UJ_PER_MS_AT_1_W;
    let alice = ("proj-a", "alice");
    let mut lines = Vec::new();
    for k in [1, 2, 3, 9, 10, 14, 15, 16] {
        lines.push(usage_line("n1", alice, w * MIN, 0, 0, MIN, 1, t + k * MIN));
    }
    lines.push(usage_line(
        "n1",
        alice,
        w * 5 * MIN,
        0,
        0,
        5 * MIN,
        1,
        t + 8 * MIN,
    ));
    lines.push(job_total_line("12", "n1", w * 13 * MIN, t, u));
    write(&db, &lines);
    let out = tempfile::tempdir().unwrap();
    let (md, svg) = report(&cfg, "12", out.path());

    // 400 W all along, on an axis to 500 W: neither 0 W while the agent was stopped nor
    // 2 kW in the minute its five minutes arrived.
    let plot = "<rect class=\"plot\"";
    assert_eq!(num(&svg, plot, "data-max-w"), 500.0, "{svg}");
    let (x0, y0) = (num(&svg, plot, "x"), num(&svg, plot, "y"));
    let (pw, ph) = (num(&svg, plot, "width"), num(&svg, plot, "height"));
    let x = |ms: u64| x0 + (ms - t) as f64 / (u - t) as f64 * pw;
    let y = |watts: f64| y0 + ph - watts / 500.0 * ph;
    let near =
        |(a, b): (f64, f64), (c, d): (f64, f64)| (a - c).abs() <= 0.1 && (b - d).abs() <= 0.1;
    // Two runs of steps around the three minutes no point covers: a gap, not 0 W.
    let gpu = polylines(&svg, "gpu");
    assert_eq!(gpu.len(), 2, "{gpu:?}\n{svg}");
    for (run, (a, z)) in gpu.iter().zip([(t, t + 10 * MIN), (t + 13 * MIN, u)]) {
        assert!(near(run[0], (x(a), y(400.0))), "{run:?}");
        assert!(near(run[run.len() - 1], (x(z), y(400.0))), "{run:?}");
        assert!(run.iter().all(|p| (p.1 - y(400.0)).abs() <= 0.1), "{run:?}");
    }
    // The gap is shaded and the legend and the Markdown say what it means.
    let gap = "<rect class=\"gap\"";
    assert!(
        (num(&svg, gap, "x") - x(t + 10 * MIN)).abs() <= 0.1,
        "{svg}"
    );
    assert!(
        (num(&svg, gap, "width") - (x(t + 13 * MIN) - x(t + 10 * MIN))).abs() <= 0.1,
        "{svg}"
    );
    assert!(svg.contains(">no data</text>"), "{svg}");
    assert!(md.contains("A gap in the chart"), "{md}");
}

/// A node whose agent died before its job ended: its totals stop at their last send
/// (not ended), its usage a minute later. The job ran on, as its other node saw: the
/// dead node's rest is a gap, not a drop to the other node's power.
#[test]
fn a_node_whose_agent_died_is_a_gap_to_the_job_end_not_a_drop() {
    let (db, cfg) = setup();
    let t = hour();
    let u = t + 10 * MIN;
    let mut lines = minutes("n1", 300, t, u);
    lines.push(job_total_line(
        "13",
        "n1",
        300 * UJ_PER_MS_AT_1_W * 10 * MIN,
        t,
        u,
    ));
    lines.extend(minutes("n2", 500, t, t + 6 * MIN));
    lines.push(
        job_total_line("13", "n2", 500 * UJ_PER_MS_AT_1_W * 5 * MIN, t, t + 5 * MIN)
            .replace("ended=true", "ended=false"),
    );
    write(&db, &lines);
    let out = tempfile::tempdir().unwrap();
    let (md, svg) = report(&cfg, "13", out.path());

    let (x, y) = plot(&svg, t, u, 1000.0);
    let near =
        |(a, b): (f64, f64), (c, d): (f64, f64)| (a - c).abs() <= 0.1 && (b - d).abs() <= 0.1;
    // Both nodes to n2's last point (past its last totals), then nothing of n2.
    let gpu = polylines(&svg, "gpu");
    assert_eq!(gpu.len(), 1, "{gpu:?}\n{svg}");
    let run = &gpu[0];
    assert!(near(run[0], (x(t), y(800.0))), "{run:?}");
    assert!(
        near(run[run.len() - 1], (x(t + 6 * MIN), y(800.0))),
        "{run:?}"
    );
    assert!(run.iter().all(|p| (p.1 - y(800.0)).abs() <= 0.1), "{run:?}");
    let gap = "<rect class=\"gap\"";
    assert!((num(&svg, gap, "x") - x(t + 6 * MIN)).abs() <= 0.1, "{svg}");
    assert!(
        (num(&svg, gap, "width") - (x(u) - x(t + 6 * MIN))).abs() <= 0.1,
        "{svg}"
    );
    assert!(md.contains("A gap in the chart"), "{md}");
}

/// A job on nodes at different usage intervals (10 s and 1 min): over 20 min the steps
/// are 10 s and the slower node's minutes are spread over them; over 5 h they are 2 min
/// (whole minutes, not 80 s), each holding whole points of both, and an outage's point
/// (longer than a step) is spread. The sum is level at 800 W all along.
#[test]
fn a_job_on_nodes_at_different_intervals_is_level() {
    let (db, cfg) = setup();
    let t = hour() - 6 * 3_600_000;
    let outage = (t + 3_600_000, t + 3_600_000 + 10 * MIN);
    for (job, u, step) in [("14", t + 20 * MIN, "10s"), ("15", t + 5 * 3_600_000, "2m")] {
        let mut lines: Vec<String> = every("n1", 300, t, u, 10_000)
            .into_iter()
            .filter(|l| {
                let at: u64 = l.rsplit(' ').next().unwrap().parse().unwrap();
                job == "14" || at <= outage.0 || at > outage.1
            })
            .collect();
        if job == "15" {
            // n1's agent could not publish for 10 min: one point covers them.
            let span = outage.1 - outage.0;
            let uj = 300 * UJ_PER_MS_AT_1_W * span;
            lines.push(usage_line(
                "n1",
                ("proj-a", "alice"),
                uj,
                0,
                0,
                span,
                1,
                outage.1,
            ));
        }
        lines.extend(minutes("n2", 500, t, u));
        for (node, w) in [("n1", 300), ("n2", 500)] {
            lines.push(job_total_line(
                job,
                node,
                w * UJ_PER_MS_AT_1_W * (u - t),
                t,
                u,
            ));
        }
        write(&db, &lines);
        let out = tempfile::tempdir().unwrap();
        let (md, svg) = report(&cfg, job, out.path());
        assert!(
            md.contains(&format!("mean power (W) over each {step} ")),
            "{md}"
        );
        let (x, y) = plot(&svg, t, u, 1000.0);
        let gpu = polylines(&svg, "gpu");
        assert_eq!(gpu.len(), 1, "job {job}: {svg}");
        let run = &gpu[0];
        assert!((run[0].0 - x(t)).abs() <= 0.1, "job {job}: {run:?}");
        assert!(
            (run[run.len() - 1].0 - x(u)).abs() <= 0.1,
            "job {job}: {run:?}"
        );
        assert!(
            run.iter().all(|p| (p.1 - y(800.0)).abs() <= 0.1),
            "job {job}: {run:?}"
        );
    }
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

/// A report's totals are read as a bill's are: a stored value that is not a count is an
/// error naming the job and node, not a 0 in a customer's report; and a project's GPU
/// efficiency is summed per node, so two nodes' idle energy past InfluxDB's signed 64-bit
/// sum is still exact.
#[test]
fn reports_read_their_totals_as_bills_do_never_as_a_silent_0() {
    let (db, cfg) = setup();
    let t = hour();
    // Job 8 on n2: a negative energy (written by something else) beside a sound node.
    let bad = job_total_line("8", "n2", 1_000, t, t + MIN).replace(
        "energy_gpu_uj=1000i,energy_cpu_uj=0i",
        "energy_gpu_uj=1000i,energy_cpu_uj=-5i",
    );
    write(&db, &[job_total_line("8", "n1", 1_000, t, t + MIN), bad]);
    let out = tempfile::tempdir().unwrap();
    let md = out.path().join("job-8.md");
    let run = collector_run(
        &cfg,
        &["report", "--job", "8", "--output", md.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(
        err.contains("energy_cpu_uj for job 8 on node n2 is -5, not a count"),
        "{err}"
    );
    assert!(!md.exists());

    // Two nodes, each 4 points of 1.5e18 µJ of GPU energy, all idle: 1.2e19 µJ together,
    // past 2^63 (a scaled-down year of a large project), while each node's sum fits.
    let part = 1_500_000_000_000_000_000u64;
    let quarter = 15 * MIN;
    let lines: Vec<String> = ["n1", "n2"]
        .iter()
        .flat_map(|node| (1..=4).map(move |k| (node, t + k * quarter)))
        .map(|(node, end)| {
            format!(
                "usage,cluster=c1,node={node},project=proj-big,user=alice energy_gpu_uj={part}i,\
                 energy_cpu_uj=0i,energy_dram_uj=0i,energy_other_uj=0i,energy_uj={part}i,\
                 gpu_ms={quarter}i,cpu_us=0i,energy_gpu_idle_uj={part}i,energy_gpu_capped_uj=0i,\
                 gpu_tensor_us=0i,span_ms={quarter}i,jobs=1i {end}"
            )
        })
        .collect();
    write(&db, &lines);
    let md = out.path().join("proj-big.md");
    collector_cli(
        &cfg,
        &[
            "report",
            "--project",
            "proj-big",
            "--from",
            &rfc3339(t),
            "--to",
            &rfc3339(t + 4 * quarter),
            "--output",
            md.to_str().unwrap(),
        ],
    );
    let text = std::fs::read_to_string(&md).unwrap();
    let kwh = 8.0 * part as f64 / 3.6e12;
    assert!(
        text.contains(&format!(
            "| GPU energy while the GPU ran nothing | {kwh:.6} | kWh | 100.0 % of GPU energy |"
        )),
        "{text}"
    );
}

/// `usage` and `report` against a database that does not exist (a typo in the config, or
/// serve never ran): exit 2 and InfluxDB's own words naming it, never an empty bill.
#[test]
fn billing_a_database_that_does_not_exist_is_an_error_naming_it() {
    let (db, _) = setup();
    let cfg = config_file(
        "collector.toml",
        &format!(
            "[collector]\nid = \"reports\"\n[influxdb]\nurl = \"{}\"\ndatabase = \"nodewatt_typo\"\n",
            db.url()
        ),
    );
    let t = hour();
    let period = ["--from", &rfc3339(t), "--to", &rfc3339(t + MIN)];
    let out = tempfile::tempdir().unwrap();
    let md = out.path().join("p.md");
    for args in [
        [&["usage", "--by", "project"][..], &period].concat(),
        [&["usage", "--by", "job"][..], &period].concat(),
        vec!["report", "--job", "7", "--output", md.to_str().unwrap()],
        [
            &["report", "--project", "p", "--output", md.to_str().unwrap()][..],
            &period,
        ]
        .concat(),
    ] {
        let run = collector_run(&cfg, &args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "InfluxDB at {}: database not found: nodewatt_typo; check [influxdb] database",
                db.url()
            )),
            "{args:?}: {err}"
        );
        assert!(run.stdout.is_empty(), "{args:?}");
        assert!(!md.exists(), "{args:?}");
    }
}
