//! docs/dashboards.md's Grafana provisioning recipe, followed as far as it goes without
//! Grafana: its commands (taken from the doc between its markers, so doc and test cannot
//! drift) run into a temporary root, and what they leave there must be what Grafana needs:
//! a datasource whose uid every dashboard names, InfluxQL on the chosen database, and the
//! five dashboards in the provider's path, each with its own uid.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use nodewatt_tests::repo;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

const BEGIN: &str = "<!-- provisioning recipe:";
const END: &str = "<!-- end of provisioning recipe -->";
const URL: &str = "http://influx.test:18086";
const DB: &str = "energy_test";

/// The shell commands of the recipe's one fenced block.
fn recipe() -> String {
    let doc = std::fs::read_to_string(repo().join("docs/dashboards.md")).unwrap();
    let start = doc
        .find(BEGIN)
        .expect("recipe's begin marker in docs/dashboards.md");
    let end = start + doc[start..].find(END).expect("recipe's end marker");
    let part = &doc[start..end];
    let fences: Vec<usize> = part.match_indices("```").map(|(i, _)| i).collect();
    assert_eq!(fences.len(), 2, "one fenced block between the markers");
    let block = &part[fences[0]..fences[1]];
    block.split_once('\n').unwrap().1.to_string()
}

/// The recipe for a root directory: the system paths under `root`, our URL and database,
/// no service restart. Panics on any other absolute path, so the test cannot write to
/// the real system.
fn under_root(recipe: &str, root: &Path) -> String {
    let root = root.to_str().unwrap();
    let mut out = String::new();
    let (mut url, mut db, mut restart) = (false, false, false);
    for line in recipe.lines() {
        let line = if line.starts_with("influx_url=") {
            url = true;
            format!("influx_url={URL}")
        } else if line.starts_with("influx_db=") {
            db = true;
            format!("influx_db={DB}")
        } else if line.trim() == "systemctl restart grafana-server" {
            restart = true;
            format!(": {line}")
        } else {
            line.replace("/etc/grafana", &format!("{root}/etc/grafana"))
                .replace("/var/lib/grafana", &format!("{root}/var/lib/grafana"))
        };
        if !line.trim_start().starts_with('#') {
            for word in line.split_whitespace() {
                let value = word.rsplit('=').next().unwrap();
                for w in [word, value] {
                    let w = w.trim_start_matches(['\'', '"']);
                    assert!(
                        !w.starts_with('/') || w.starts_with(root),
                        "recipe line names a path outside the test's root: {line}"
                    );
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    assert!(url && db, "the recipe sets influx_url= and influx_db=");
    assert!(restart, "the recipe restarts grafana-server");
    out
}

fn yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut docs =
        YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{}: one YAML document", path.display());
    docs.remove(0)
}

fn text<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {y:?}"))
}

/// Every `datasource` in a dashboard (panels, their targets, templating), with where.
fn datasources<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "datasource" {
                    out.push((at.clone(), v));
                } else {
                    datasources(v, format!("{at}.{k}"), out);
                }
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                datasources(v, format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_recipe_provisions_the_datasource_and_all_dashboards() {
    let root = tempfile::tempdir().unwrap();
    let script = under_root(&recipe(), root.path());
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the recipe failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let etc = root.path().join("etc/grafana/provisioning");

    // The datasource: one, InfluxQL, at our URL and database.
    let ds_file = yaml(&etc.join("datasources/nodewatt.yaml"));
    let list = ds_file["datasources"]
        .as_vec()
        .expect("datasources: a list");
    assert_eq!(list.len(), 1, "one datasource");
    let ds = &list[0];
    let uid = text(&ds["uid"], "datasource uid");
    assert_eq!(text(&ds["type"], "type"), "influxdb");
    assert_eq!(text(&ds["access"], "access"), "proxy");
    assert_eq!(text(&ds["url"], "url"), URL);
    assert_eq!(
        text(&ds["jsonData"]["version"], "jsonData.version"),
        "InfluxQL"
    );
    assert_eq!(text(&ds["jsonData"]["dbName"], "jsonData.dbName"), DB);
    assert_eq!(text(&ds["database"], "database"), DB);

    // The provider: its path holds the five dashboards, as copied.
    let providers = yaml(&etc.join("dashboards/nodewatt.yaml"));
    let providers = providers["providers"].as_vec().expect("providers: a list");
    assert_eq!(providers.len(), 1, "one provider");
    assert_eq!(text(&providers[0]["type"], "provider type"), "file");
    let path = text(&providers[0]["options"]["path"], "options.path");
    let dir = root.path().join(path.trim_start_matches('/'));
    let names = |d: &Path| -> BTreeSet<String> {
        std::fs::read_dir(d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect()
    };
    let copied = names(&dir);
    assert_eq!(
        copied,
        names(&repo().join("dashboards")),
        "dashboards in {path}"
    );
    assert_eq!(copied.len(), 5, "{copied:?}");

    let mut uids = BTreeSet::new();
    for name in &copied {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        // Exported-for-sharing placeholders (${DS_...}) only resolve on import in the UI.
        assert!(!text.contains("${DS_"), "{name}: a datasource placeholder");
        let d: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let dash_uid = d["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no uid"));
        assert!(
            uids.insert(dash_uid.to_string()),
            "{name}: uid {dash_uid} is not unique"
        );
        let mut refs = Vec::new();
        datasources(&d, String::new(), &mut refs);
        for part in ["panels", "targets", "templating"] {
            assert!(
                refs.iter().any(|(at, _)| at.contains(part)),
                "{name}: no datasource in {part}"
            );
        }
        for (at, ds) in refs {
            assert_eq!(ds["uid"], uid, "{name}{at}: datasource {ds}");
            assert_eq!(ds["type"], "influxdb", "{name}{at}: datasource {ds}");
        }
    }
}
