//! Every Grafana panel's query, run against a real InfluxDB after an end-to-end run:
//! each returns data, names only measurements, fields and tags that exist, and the
//! dashboards' uids and datasource agree with the provisioning files. Panels that read
//! `"$rp"."<measurement>"` are run on the raw data and again on the 5-minute summaries
//! that config/influxdb/downsampling.influxql's continuous queries make of it; that
//! file's summaries are checked value by value against known raw points.

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nodewatt_tests::*;
use serde_json::Value;

const DB: &str = "nodewatt_dash";

fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(repo().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The downsampling file, for database `db` instead of "nodewatt".
fn downsampling(db: &str) -> String {
    std::fs::read_to_string(repo().join("config/influxdb/downsampling.influxql"))
        .unwrap()
        .replace("\"nodewatt\"", &format!("\"{db}\""))
        .replace(
            "CONTEXT-DATABASE: nodewatt",
            &format!("CONTEXT-DATABASE: {db}"),
        )
}

fn now_ms() -> u64 {
    nodewatt_common::now_ms()
}

/// What Grafana does before sending a query: macros and variables ("All" is `.*`), a
/// time range of the last hour, and `rp` for the retention policy variable.
fn substitute(q: &str, rp: &str) -> String {
    let now = now_ms();
    q.replace("${__to}", &now.to_string())
        .replace("${__from}", &(now - 3_600_000).to_string())
        .replace("$rp_interval", "1s")
        .replace("$rp", rp)
        .replace("$timeFilter", "time > now() - 1h")
        .replace("$__interval_ms", "1000")
        .replace("$__interval", "1s")
        .replace("$cluster", "lab")
        .replace("$node", ".*")
        .replace("$gpu", ".*")
        .replace("$project", ".*")
        .replace("$price_per_kwh", "0.25")
        .replace("$pue", "1.3")
        .replace("$co2_g_per_kwh", "350")
}

/// True if some series has a non-null value besides its time.
fn has_data(v: &Value) -> bool {
    v["results"].as_array().into_iter().flatten().any(|r| {
        r["series"].as_array().into_iter().flatten().any(|s| {
            s["values"].as_array().into_iter().flatten().any(|row| {
                row.as_array()
                    .is_some_and(|cells| cells.iter().skip(1).any(|c| !c.is_null()))
            })
        })
    })
}

/// The measurement a query reads (`"m"`, or `"rp"."m"` as written) and its other
/// double-quoted identifiers that are not aliases.
fn identifiers(q: &str) -> (String, BTreeSet<String>) {
    let parts: Vec<&str> = q.split('"').collect();
    let mut measurement = String::new();
    let mut ids = BTreeSet::new();
    let mut i = 1;
    while i < parts.len() {
        let before = parts[i - 1].trim_end();
        if before.ends_with("FROM") {
            measurement = format!("\"{}\"", parts[i]);
            if parts.get(i + 1) == Some(&".") && i + 2 < parts.len() {
                measurement = format!("\"{}\".\"{}\"", parts[i], parts[i + 2]);
                i += 2;
            }
        } else if !before.ends_with(" AS") && !before.ends_with("KEY =") {
            ids.insert(parts[i].to_string());
        }
        i += 2;
    }
    (measurement, ids)
}

fn keys(db: &Influxd, q: &str) -> HashSet<String> {
    db.rows(DB, q)
        .iter()
        .filter_map(|(_, r)| {
            r.get("fieldKey")
                .or(r.get("tagKey"))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn every_panel_query_returns_data_from_the_documented_schema() {
    let Stack {
        mq,
        db,
        collector_cfg: _c,
        collector,
    } = Stack::start("dash", DB);
    let registry = tempfile::tempdir().unwrap();
    std::fs::set_permissions(registry.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    std::fs::write(
        registry.path().join("77.job"),
        format!("job=77\nproject=proj-dash\nuser=dana\ngpus=0\nstart_ms={now}\n"),
    )
    .unwrap();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let fixture = repo().join("agent/tests/fixtures/node");

    // node-f: the fixture node's sysfs (RAPL, hwmon, thermal, job cgroups), this machine's
    // /proc, a GPU at its TDP (power-capped) and an idle one, and a job on GPU 0.
    let f = format!(
        "[agent]\ncluster = \"lab\"\nnode = \"node-f\"\ninterval = \"100ms\"\nsys_root = {:?}\n\
         [nvml]\nenabled = false\n\
         [jobs]\ndir = {:?}\nowner_uid = {me}\ntotals_interval = \"1s\"\n\
         [simulated]\nenabled = true\n\
         [[simulated.gpu]]\nmodel = \"Sim H100\"\npower_w = 700.0\ntdp_w = 700.0\n\
         [[simulated.gpu]]\nmodel = \"Sim H100\"\npower_w = 0.0\n\
         [mqtt]\nport = {}\n",
        fixture.join("sys"),
        registry.path(),
        mq.port
    );
    // node-g: a node whose sysfs has nothing, so its sources fail (for the failure panel).
    let empty = tempfile::tempdir().unwrap();
    let g = agent_config("lab", "node-g", "100ms", mq.port, &[300.0])
        .replace(
            "[rapl]\nenabled = false\n[hwmon]\nenabled = false\n[thermal]\nenabled = false\n",
            "",
        )
        .replace(
            "[[simulated.rapl]]\nname = \"package-0\"\npower_w = 150.0\n",
            "",
        )
        .replace(
            "interval = \"100ms\"\n",
            &format!("interval = \"100ms\"\nsys_root = {:?}\n", empty.path()),
        );
    let (fc, gc) = (config_file("f.toml", &f), config_file("g.toml", &g));
    let mut agents = [start_agent(&fc, 40), start_agent(&gc, 40)];
    for a in &mut agents {
        a.wait_success(Duration::from_secs(60));
    }
    let arrived = wait_until(Duration::from_secs(30), || {
        db.scalar(DB, "SELECT COUNT(seq) FROM agent") >= 80.0
    });
    assert!(arrived, "{}", collector.log());
    std::thread::sleep(Duration::from_millis(1_500)); // a few more collector health points

    // The downsampling file, and its continuous queries run by hand over the last hour
    // (the CQ service runs them on a schedule; it is off in the test's influxd).
    db.import(&downsampling(DB)).unwrap();
    let now = now_ms();
    let (from, to) = (
        now - now % 300_000 - 3_600_000,
        now - now % 300_000 + 300_000,
    );
    let cqs = db.rows(DB, "SHOW CONTINUOUS QUERIES");
    let mut ran = 0;
    for (_, row) in &cqs {
        let Some(create) = row.get("query").and_then(|q| q.as_str()) else {
            continue;
        };
        if create.contains(&format!(" ON {DB} ")) {
            db.execute(DB, &continuous_query_body(create, from, to))
                .unwrap();
            ran += 1;
        }
    }
    assert_eq!(ran, 5, "{cqs:?}");

    let provisioning =
        std::fs::read_to_string(repo().join("dashboards/provisioning/datasources/nodewatt.yaml"))
            .unwrap();
    let ds_uid = provisioning
        .lines()
        .find_map(|l| l.trim().strip_prefix("uid:"))
        .map(|u| u.trim().to_string())
        .expect("datasource uid in provisioning");

    let docs = std::fs::read_to_string(repo().join("docs/dashboards.md")).unwrap();
    let mut uids = HashSet::new();
    let mut failures = Vec::new();
    let mut queries = 0;
    let mut downsampled = 0;
    for (file, d) in dashboards() {
        assert!(
            uids.insert(d["uid"].as_str().unwrap().to_string()),
            "{file}: duplicate dashboard uid"
        );
        let mut panel_ids = HashSet::new();
        let vars = d["templating"]["list"].as_array().unwrap();
        for var in vars {
            if var["type"] == "query" {
                assert_eq!(
                    var["datasource"]["uid"],
                    ds_uid.as_str(),
                    "{file}: variable datasource"
                );
                let q = substitute(var["query"].as_str().unwrap(), "autogen");
                if !has_data(&db.query(DB, &q)) {
                    failures.push(format!(
                        "{file}: variable {} returns nothing: {q}",
                        var["name"]
                    ));
                }
            }
        }
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap();
            assert!(
                panel_ids.insert(p["id"].as_u64().unwrap()),
                "{file}: duplicate panel id"
            );
            assert_eq!(p["datasource"]["uid"], ds_uid.as_str(), "{file}: {title}");
            assert!(
                docs.contains(&format!("### {title}\n")),
                "{title} is not described in docs/dashboards.md"
            );
            let reads_rp = p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["query"].as_str().unwrap().contains("\"$rp\"."));
            if reads_rp {
                assert_eq!(p["interval"], "$rp_interval", "{file}: {title}");
                for v in ["rp", "rp_interval"] {
                    assert!(
                        vars.iter().any(|x| x["name"] == v),
                        "{file}: {title} needs the variable {v}"
                    );
                }
            }
            for t in p["targets"].as_array().unwrap() {
                queries += 1;
                assert_eq!(t["datasource"]["uid"], ds_uid.as_str(), "{file}: {title}");
                let raw = t["query"].as_str().unwrap();
                assert!(
                    docs.contains(raw),
                    "{title}: query differs from docs/dashboards.md"
                );
                let rps: &[&str] = if raw.contains("\"$rp\".") {
                    downsampled += 1;
                    &["autogen", "downsampled"]
                } else {
                    &["autogen"]
                };
                for rp in rps {
                    let q = substitute(raw, rp);
                    let answer = db.query(DB, &q);
                    if !has_data(&answer) {
                        failures.push(format!("{file}: {title}: no data: {q}\n  {answer}"));
                    }
                    let (m, ids) = identifiers(&q);
                    let known: HashSet<String> = keys(&db, &format!("SHOW FIELD KEYS FROM {m}"))
                        .union(&keys(&db, &format!("SHOW TAG KEYS FROM {m}")))
                        .cloned()
                        .collect();
                    assert!(!known.is_empty(), "{title}: measurement {m} does not exist");
                    for id in ids {
                        if !known.contains(&id) {
                            failures
                                .push(format!("{file}: {title}: {m} has no field or tag {id:?}"));
                        }
                    }
                }
            }
        }
    }
    assert!(downsampled >= 18, "{downsampled} queries read $rp");
    assert!(queries >= 45, "{queries} queries");
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// config/influxdb/downsampling.influxql on a fresh InfluxDB: its continuous queries,
/// run by hand over known raw points, give exact 5-minute sums and the expected means
/// and maxima with every tag kept; the dashboards' variables pick raw data for short
/// ranges and summaries for long ones; nothing touches `usage` or `job_total`, and the
/// retention policy the collector writes to never expires.
#[test]
fn downsampling_summarises_telemetry_and_leaves_billing_alone() {
    let db = Influxd::start();
    let text =
        std::fs::read_to_string(repo().join("config/influxdb/downsampling.influxql")).unwrap();
    db.import(&text).unwrap();
    db.import(&text)
        .expect("applying the file again changes nothing");
    const D: &str = "nodewatt";

    // Two 5-minute buckets of 10 s samples from two GPUs, a CPU, a RAPL domain, a
    // sensor and a thermal zone; and billing points, which must stay where they are.
    let t0: u64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z
    let mut lines = Vec::new();
    for i in 0..60u64 {
        let t = t0 + 10_000 + i * 10_000; // (t0, t0 + 10 min]: the last one opens bucket 3
        for g in 0..2u64 {
            lines.push(format!(
                "gpu,cluster=lab,gpu={g},model=Sim\\ H100,node=n1,uuid=GPU-{g} power_w={}.5,energy_delta_mj={}i,span_ms=10000i,temp_c={},clock_event_reasons={}i,util_pct={},mem_total_bytes=85899345920i {t}",
                100 + i + g,
                1000 * (i + 1) + g,
                40 + i % 7,
                if i == 17 { 8 } else { 1 },
                i % 100,
            ));
        }
        lines.push(format!(
            "cpu,cluster=lab,node=n1 util_pct={},load1=1.5,cores=64i,mem_available_bytes={}i {t}",
            i,
            1_000_000 + i
        ));
        lines.push(format!(
            "rapl,cluster=lab,domain=package-0,node=n1,zone=0 power_w=150,energy_delta_uj={}i,span_ms=10000i {t}",
            1_500_000 + i
        ));
        lines.push(format!(
            "hwmon,chip=acpi,cluster=lab,device=power1,kind=power,node=n1,sensor=power1 value={}.0 {t}",
            200 + i
        ));
        lines.push(format!(
            "thermal,cluster=lab,node=n1,type=x86_pkg_temp,zone=0 temp_c={}.0 {t}",
            50 + i % 10
        ));
        lines.push(format!(
            "usage,cluster=lab,node=n1,project=p,user=alice energy_gpu_uj=7i,energy_cpu_uj=0i,energy_dram_uj=0i,energy_other_uj=0i,energy_uj=7i,gpu_ms=10000i,cpu_us=0i,span_ms=10000i,jobs=1i {t}"
        ));
    }
    lines.push(format!(
        "job_total,cluster=lab,job=1,node=n1,project=p,user=alice energy_gpu_uj=420i,energy_cpu_uj=0i,energy_dram_uj=0i,energy_other_uj=0i,energy_uj=420i,gpu_ms=600000i,cpu_us=0i,start_ms={t0}i,until_ms={}i,ended=true,gpus=\"0\" {t0}",
        t0 + 600_000
    ));
    db.write_lines(D, None, "ms", lines.join("\n").into_bytes(), false)
        .unwrap();

    let cqs = db.rows(D, "SHOW CONTINUOUS QUERIES");
    let mut names = Vec::new();
    for (_, row) in &cqs {
        let (Some(name), Some(create)) = (row["name"].as_str(), row["query"].as_str()) else {
            continue;
        };
        for m in ["usage", "job_total"] {
            assert!(
                !create.contains(&format!(".{m} ")) && !create.contains(&format!("\"{m}\"")),
                "{name} reads {m}: {create}"
            );
        }
        // Two runs over the same window write the same points (as RESAMPLE FOR does).
        for _ in 0..2 {
            db.execute(D, &continuous_query_body(create, t0, t0 + 600_000))
                .unwrap();
        }
        names.push(name.to_string());
    }
    names.sort();
    assert_eq!(
        names,
        ["cpu_5m", "gpu_5m", "hwmon_5m", "rapl_5m", "thermal_5m"]
    );

    // GPU 1, first bucket [t0, t0 + 5 min): samples i = 0..=28 (t0 + 10 s ... t0 + 290 s).
    let rows = db.rows(
        D,
        "SELECT * FROM \"downsampled\".\"gpu\" WHERE \"gpu\" = '1' GROUP BY *",
    );
    assert_eq!(rows.len(), 2, "two buckets: {rows:?}");
    let (tags, first) = &rows[0];
    for (k, v) in [
        ("cluster", "lab"),
        ("node", "n1"),
        ("gpu", "1"),
        ("uuid", "GPU-1"),
        ("model", "Sim H100"),
    ] {
        assert_eq!(tags[k], v, "tag {k} kept");
    }
    assert_eq!(first["time"], t0);
    let n = 29u64;
    let i_sum: u64 = (0..n).sum();
    assert_eq!(first["samples"], n);
    assert_eq!(
        first["energy_delta_mj"],
        (0..n).map(|i| 1000 * (i + 1) + 1).sum::<u64>(),
        "energy is summed exactly"
    );
    assert_eq!(first["span_ms"], n * 10_000);
    let mean_power = (0..n).map(|i| 101.5 + i as f64).sum::<f64>() / n as f64;
    assert!((first["power_w"].as_f64().unwrap() - mean_power).abs() < 1e-9);
    assert_eq!(first["power_w_max"], 101.5 + 28.0);
    assert_eq!(
        first["clock_event_reasons"], 8,
        "the bitmask's maximum (a throttle at i = 17)"
    );
    assert_eq!(first["temp_c_max"], 46.0);
    assert!((first["util_pct"].as_f64().unwrap() - i_sum as f64 / n as f64).abs() < 1e-9);
    assert_eq!(first["mem_total_bytes"], 85_899_345_920u64);
    // Second bucket: i = 29..=58; i = 59 is at t0 + 10 min, outside the window.
    assert_eq!(rows[1].1["samples"], 30);

    // Every joule of the raw data is in the summaries of the window.
    let raw = db.scalar(
        D,
        &format!(
            "SELECT SUM(\"energy_delta_uj\") FROM \"rapl\" WHERE time >= {t0}ms AND time < {}ms",
            t0 + 600_000
        ),
    );
    let summed = db.scalar(
        D,
        "SELECT SUM(\"energy_delta_uj\") FROM \"downsampled\".\"rapl\"",
    );
    assert_eq!(raw, summed);
    assert_eq!(
        db.scalar(
            D,
            "SELECT MIN(\"mem_available_bytes_min\") FROM \"downsampled\".\"cpu\""
        ),
        1_000_000.0
    );
    assert_eq!(
        db.scalar(
            D,
            "SELECT MAX(\"value_max\") FROM \"downsampled\".\"hwmon\""
        ),
        258.0
    );
    assert_eq!(
        db.scalar(
            D,
            "SELECT MAX(\"temp_c_max\") FROM \"downsampled\".\"thermal\""
        ),
        59.0
    );

    // The dashboards' variables: raw data up to 3 days, summaries beyond.
    let pick = |range_ms: u64, field: &str| -> String {
        let to = t0 + 600_000;
        let q = format!(
            "SELECT \"{field}\" FROM \"rp_config\" WHERE \"min_range_ms\" <= {to} - {} AND \"max_range_ms\" > {to} - {}",
            to - range_ms,
            to - range_ms
        );
        let rows = db.rows(D, &q);
        assert_eq!(rows.len(), 1, "{q}: {rows:?}");
        rows[0].1[field].as_str().unwrap().to_string()
    };
    assert_eq!(pick(3_600_000, "rp"), "autogen");
    assert_eq!(pick(3 * 86_400_000 - 1, "rp"), "autogen");
    assert_eq!(pick(3 * 86_400_000, "rp"), "downsampled");
    assert_eq!(pick(90 * 86_400_000, "rp"), "downsampled");
    assert_eq!(pick(90 * 86_400_000, "min_interval"), "5m");
    for (file, d) in dashboards() {
        for var in d["templating"]["list"].as_array().unwrap() {
            if var["name"] == "rp" || var["name"] == "rp_interval" {
                let field = if var["name"] == "rp" {
                    "rp"
                } else {
                    "min_interval"
                };
                assert_eq!(
                    var["query"].as_str().unwrap(),
                    format!("SELECT \"{field}\" FROM \"rp_config\" WHERE \"min_range_ms\" <= ${{__to}} - ${{__from}} AND \"max_range_ms\" > ${{__to}} - ${{__from}}"),
                    "{file}"
                );
            }
        }
    }

    // Billing data: only in the retention policy the collector writes, which never
    // expires; no summary of it exists.
    let rps = db.rows(D, "SHOW RETENTION POLICIES");
    let policy = |name: &str| {
        rps.iter()
            .find(|(_, r)| r["name"] == name)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("no retention policy {name}: {rps:?}"))
    };
    assert_eq!(policy("autogen")["duration"], "0s", "infinite");
    assert_eq!(policy("autogen")["default"], true);
    assert_eq!(policy("downsampled")["duration"], "43800h0m0s");
    assert_eq!(
        db.scalar(D, "SELECT COUNT(\"energy_uj\") FROM \"usage\""),
        60.0
    );
    assert_eq!(
        db.scalar(D, "SELECT SUM(\"energy_uj\") FROM \"job_total\""),
        420.0
    );
    for m in ["usage", "job_total"] {
        assert!(
            db.rows(D, &format!("SELECT * FROM \"downsampled\".\"{m}\""))
                .is_empty(),
            "{m} has no summary"
        );
    }
}
