//! scripts/quickstart.sh as a new user runs it, on private ports and in a temp directory,
//! with the workspace's debug binaries (NODEWATT_DEMO_BIN, so no release build) and
//! Debian's mosquitto and influxd. It must fail loudly, naming what failed, and never
//! leave anything running behind: every test stops the demo in a drop guard.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use nodewatt_tests::{bin, free_port};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/quickstart.sh")
}

/// A demo directory and its ports; `stop` runs when dropped.
struct Demo {
    tmp: tempfile::TempDir,
    mqtt_port: u16,
    influx_port: u16,
    /// The directory of the workspace's debug nodewatt-agent and nodewatt-collector.
    bin_dir: PathBuf,
}

/// What a run of the script printed (stdout, then stderr) and whether it succeeded.
struct Run {
    ok: bool,
    text: String,
}

impl Demo {
    fn new() -> Demo {
        let mqtt_port = free_port();
        // influxd also binds the HTTP port + 2 (its RPC port).
        let influx_port = loop {
            let p = free_port();
            if p < 65500
                && ![p, p + 2].contains(&mqtt_port)
                && TcpListener::bind(("127.0.0.1", p + 2)).is_ok()
            {
                break p;
            }
        };
        bin("nodewatt-collector"); // refuses a stale one
        Demo {
            tmp: tempfile::tempdir().unwrap(),
            mqtt_port,
            influx_port,
            bin_dir: bin("nodewatt-agent").parent().unwrap().to_path_buf(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("demo")
    }

    fn run(&self, arg: &str, env: &[(&str, &str)]) -> Run {
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(script())
            .arg(arg)
            .env("NODEWATT_DEMO_DIR", self.dir())
            .env("NODEWATT_DEMO_MQTT_PORT", self.mqtt_port.to_string())
            .env("NODEWATT_DEMO_INFLUX_PORT", self.influx_port.to_string())
            .env("NODEWATT_DEMO_BIN", &self.bin_dir)
            // A test never installs packages.
            .env("NODEWATT_DEMO_NO_INSTALL", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("bash runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "quickstart.sh {arg}: {} after {:.1} s",
            out.status,
            started.elapsed().as_secs_f64()
        );
        Run {
            ok: out.status.success(),
            text,
        }
    }

    /// Pids in the script's pid files.
    fn pids(&self) -> Vec<(String, i32)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir().join("run"))
            .into_iter()
            .flatten()
        {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "pid") {
                let pid = std::fs::read_to_string(&p).unwrap().trim().parse().unwrap();
                out.push((p.file_stem().unwrap().to_string_lossy().into_owned(), pid));
            }
        }
        out
    }

    /// Live processes whose command line names the demo directory: everything the script
    /// starts (its servers' and agents' configs are in it).
    fn live(&self) -> Vec<(i32, String)> {
        let dir = self.dir().to_string_lossy().into_owned();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(pid) = name.parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&dir) && alive(pid) {
                out.push((pid, cmd));
            }
        }
        out
    }
}

impl Drop for Demo {
    /// The script's `stop`, then SIGKILL for anything it missed. Never panics: this runs
    /// while a failed test unwinds.
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .env("NODEWATT_DEMO_DIR", self.dir())
            .stdin(Stdio::null())
            .output();
        for (pid, cmd) in self.live() {
            eprintln!("left running after stop, killed: {pid} {cmd}");
            // SAFETY: plain kill(2) of a process this test started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Running, not a zombie that nobody reaped yet.
fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z'))
}

#[test]
fn a_taken_mqtt_port_is_named_and_nothing_starts() {
    let demo = Demo::new();
    let _held = TcpListener::bind(("127.0.0.1", demo.mqtt_port)).unwrap();
    let run = demo.run("start", &[("NODEWATT_DEMO_WAIT", "15")]);
    let text = &run.text;
    assert!(!run.ok, "succeeded with its MQTT port taken:\n{text}");
    assert!(
        text.contains(&format!("port {}", demo.mqtt_port))
            && text.contains("NODEWATT_DEMO_MQTT_PORT"),
        "does not name the port and the variable to change:\n{text}"
    );
    if Path::new("/usr/bin/ss").exists() || Path::new("/bin/ss").exists() {
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "does not say who holds the port:\n{text}"
        );
    }
    assert!(!text.contains("started"), "{text}");
    assert_eq!(demo.live(), Vec::<(i32, String)>::new(), "{text}");
}

#[test]
fn b_a_missing_server_is_named_and_nothing_starts() {
    let demo = Demo::new();
    let run = demo.run(
        "start",
        &[
            ("NODEWATT_DEMO_MOSQUITTO", "/nonexistent"),
            ("NODEWATT_DEMO_WAIT", "15"),
        ],
    );
    let text = &run.text;
    assert!(!run.ok, "succeeded without mosquitto:\n{text}");
    assert!(
        text.contains("mosquitto") && text.contains("/nonexistent"),
        "does not name mosquitto:\n{text}"
    );
    assert!(!text.contains("started"), "{text}");
    assert_eq!(demo.live(), Vec::<(i32, String)>::new(), "{text}");
    assert!(
        demo.pids().iter().all(|(_, pid)| !alive(*pid)),
        "{:?}",
        demo.pids()
    );
}

#[test]
fn c_starts_bills_three_projects_and_stops_everything() {
    let demo = Demo::new();
    let run = demo.run("start", &[("NODEWATT_DEMO_WAIT", "15")]);
    let text = &run.text;
    assert!(run.ok, "failed:\n{text}");
    let kwh = total_kwh(text);
    assert!(kwh > 0.0, "zero bill:\n{text}");
    for project in ["climate", "llm-pretrain", "vision"] {
        assert!(
            text.lines().any(|l| l.starts_with(project)),
            "{project} is not billed:\n{text}"
        );
    }
    assert!(text.contains("scripts/quickstart.sh stop"), "{text}");
    // The demo's agent keeps its state and spool under the demo, never in an installed
    // agent's /var/lib/nodewatt.
    let local = std::fs::read_to_string(demo.dir().join("config/agent-local.toml")).unwrap();
    let installed: Vec<&str> = local
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("/var/lib/nodewatt"))
        .collect();
    assert!(installed.is_empty(), "{installed:?}");
    assert!(
        text.contains("docs/dashboards.md") && !text.contains("add an InfluxDB"),
        "Grafana: the provisioning recipe, not the UI:\n{text}"
    );

    let pids = demo.pids();
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    for name in [
        "mosquitto",
        "influxd",
        "collector",
        "agent-local",
        "agent-sim001",
        "agent-sim002",
        "agent-sim003",
        "scenario",
    ] {
        assert!(names.contains(&name), "no pid file of {name}: {names:?}");
    }
    let status = demo.run("status", &[]);
    assert!(
        status.text.contains("running  collector"),
        "{}",
        status.text
    );

    // A second start while all runs reuses every part (no second copy of anything) and
    // bills again.
    let again = demo.run("start", &[("NODEWATT_DEMO_WAIT", "1")]);
    assert!(again.ok, "failed:\n{}", again.text);
    for (name, pid) in &pids {
        assert!(
            again
                .text
                .contains(&format!("{name} already running (pid {pid})")),
            "{name} not reused:\n{}",
            again.text
        );
    }
    assert_eq!(demo.pids(), pids);
    assert!(total_kwh(&again.text) >= kwh, "{}", again.text);

    let stop = demo.run("stop", &[]);
    assert!(stop.ok, "{}", stop.text);
    let left: Vec<_> = pids.iter().filter(|(_, pid)| alive(*pid)).collect();
    assert!(left.is_empty(), "still running after stop: {left:?}");
    assert_eq!(demo.live(), Vec::<(i32, String)>::new());
    let status = demo.run("status", &[]);
    assert!(!status.text.contains("running "), "{}", status.text);

    // A start after a stop keeps the data: its bill holds the first run's energy too.
    let after = demo.run("start", &[("NODEWATT_DEMO_WAIT", "1")]);
    assert!(after.ok, "failed:\n{}", after.text);
    assert!(after.text.contains("started influxd"), "{}", after.text);
    assert!(total_kwh(&after.text) >= kwh, "{}", after.text);
    let stop = demo.run("stop", &[]);
    assert!(stop.ok, "{}", stop.text);
    assert_eq!(demo.live(), Vec::<(i32, String)>::new());

    let clean = demo.run("clean", &[]);
    assert!(clean.ok && !demo.dir().exists(), "{}", clean.text);
}

/// The kWh of the TOTAL row of the bill a start printed.
fn total_kwh(text: &str) -> f64 {
    let total = text
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .unwrap_or_else(|| panic!("no TOTAL row:\n{text}"));
    total.split_whitespace().nth(1).unwrap().parse().unwrap()
}
