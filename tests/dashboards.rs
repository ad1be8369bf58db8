//! Every Grafana panel's query, run against a real InfluxDB after an end-to-end run:
//! each returns data, names only measurements, fields and tags that exist, and the
//! dashboards' uids and datasource agree with the provisioning files.

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nodewatt_tests::*;
use serde_json::Value;

const DB: &str = "nodewatt_dash";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

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

/// What Grafana does before sending a query: macros and variables ("All" is `.*`).
fn substitute(q: &str) -> String {
    q.replace("$timeFilter", "time > now() - 1h")
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

/// Double-quoted identifiers of a query that are not the measurement or an alias.
fn identifiers(q: &str) -> (String, BTreeSet<String>) {
    let parts: Vec<&str> = q.split('"').collect();
    let mut measurement = String::new();
    let mut ids = BTreeSet::new();
    for i in (1..parts.len()).step_by(2) {
        let before = parts[i - 1].trim_end();
        if before.ends_with("FROM") {
            measurement = parts[i].to_string();
        } else if !before.ends_with(" AS") && !before.ends_with("KEY =") {
            ids.insert(parts[i].to_string());
        }
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
    for (file, d) in dashboards() {
        assert!(
            uids.insert(d["uid"].as_str().unwrap().to_string()),
            "{file}: duplicate dashboard uid"
        );
        let mut panel_ids = HashSet::new();
        for var in d["templating"]["list"].as_array().unwrap() {
            if var["type"] == "query" {
                assert_eq!(
                    var["datasource"]["uid"],
                    ds_uid.as_str(),
                    "{file}: variable datasource"
                );
                let q = substitute(var["query"].as_str().unwrap());
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
            for t in p["targets"].as_array().unwrap() {
                queries += 1;
                assert_eq!(t["datasource"]["uid"], ds_uid.as_str(), "{file}: {title}");
                let raw = t["query"].as_str().unwrap();
                assert!(
                    docs.contains(raw),
                    "{title}: query differs from docs/dashboards.md"
                );
                let q = substitute(raw);
                let answer = db.query(DB, &q);
                if !has_data(&answer) {
                    failures.push(format!("{file}: {title}: no data: {q}\n  {answer}"));
                }
                let (m, ids) = identifiers(&q);
                let known: HashSet<String> = keys(&db, &format!("SHOW FIELD KEYS FROM \"{m}\""))
                    .union(&keys(&db, &format!("SHOW TAG KEYS FROM \"{m}\"")))
                    .cloned()
                    .collect();
                assert!(!known.is_empty(), "{title}: measurement {m} does not exist");
                for id in ids {
                    if !known.contains(&id) {
                        failures.push(format!("{file}: {title}: {m} has no field or tag {id:?}"));
                    }
                }
            }
        }
    }
    assert!(queries >= 45, "{queries} queries");
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
