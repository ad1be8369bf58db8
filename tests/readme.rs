//! The README's commands, run as a newcomer would paste them: every command of every `sh`
//! block is run (against private servers, with the shipped configs pointed at them) or
//! named here with the test that covers it, so the README cannot drift from the product.

use std::process::{Command, Stdio};
use std::time::Duration;

use nodewatt_tests::*;

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).unwrap()
}

/// The commands of the README's `sh` blocks: continuation lines joined, comments and
/// blank lines dropped.
fn sh_commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut cmd = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let line = match line.find(" #") {
            Some(i) if !line[..i].contains('\'') => &line[..i],
            _ => line,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => cmd.push_str(head),
            None => {
                cmd.push_str(line);
                out.push(std::mem::take(&mut cmd));
            }
        }
    }
    out
}

/// What the test does with a command.
enum How {
    /// Covered elsewhere (named).
    Elsewhere(&'static str),
    /// Started in the background, stopped at the end as the README says (`kill %1 %2`).
    Background,
    Sleep(u64),
    /// Run to completion through bash; the check gets (exit status, stdout + stderr).
    Run,
    /// A pipeline stopped with Ctrl-C after a few seconds.
    Interrupt,
}

fn how(cmd: &str) -> How {
    if cmd.starts_with("scripts/quickstart.sh") {
        How::Elsewhere("tests/quickstart.rs runs the quickstart, its failures included")
    } else if cmd.starts_with("sudo apt-get install") {
        How::Elsewhere("the servers it installs are the ones every test here starts")
    } else if cmd == "cargo build --release" {
        How::Elsewhere("the tests run the debug build of the same sources; .ci/run builds the release packages")
    } else if cmd == "cargo test --workspace" {
        How::Elsewhere("the README's test command: this test is one of them, run by .ci/run")
    } else if let Some(s) = cmd.strip_prefix("sleep ") {
        How::Sleep(s.trim().parse().unwrap())
    } else if cmd.ends_with('&') {
        How::Background
    } else if cmd.contains("run --stdout") {
        How::Interrupt
    } else {
        How::Run
    }
}

struct Sandbox {
    dir: tempfile::TempDir,
    subs: Vec<(String, String)>,
}

impl Sandbox {
    fn new(mq: &Mosquitto, db: &Influxd) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let uid = unsafe { libc::getuid() };
        let read = |name: &str| std::fs::read_to_string(repo().join("config").join(name)).unwrap();
        let mqtt_port = format!("[mqtt]\nport = {}\n", mq.port);
        // The shipped configs, pointed at the private servers and a private job registry.
        let jobs = d.join("jobs");
        std::fs::create_dir(&jobs).unwrap();
        let registry =
            format!("\n[jobs]\ndir = {jobs:?}\nowner_uid = {uid}\ntotals_interval = \"1s\"\n");
        let sim = read("agent-simulated.toml")
            .replace("port = 1883", &format!("port = {}", mq.port))
            + &registry;
        let collector = read("collector.toml")
            .replace("127.0.0.1:8086", &format!("127.0.0.1:{}", db.port))
            .replacen("[mqtt]\n", &mqtt_port, 1);
        let agent = read("agent.toml")
            .replace("/var/lib/nodewatt", &d.join("state").display().to_string())
            .replace("\"/run/nodewatt/jobs\"", &format!("{jobs:?}"))
            .replace("owner_uid = 0", &format!("owner_uid = {uid}"))
            .replacen("[mqtt]\n", &mqtt_port, 1);
        std::fs::create_dir(d.join("state")).unwrap();
        let mut subs = vec![
            (
                "./target/release/".to_string(),
                format!("{}/", bin("nodewatt-agent").parent().unwrap().display()),
            ),
            (
                "http://127.0.0.1:8086".into(),
                format!("http://127.0.0.1:{}", db.port),
            ),
        ];
        for (name, text) in [
            ("agent-simulated.toml", sim),
            ("collector.toml", collector),
            ("agent.toml", agent),
        ] {
            let path = d.join(name);
            std::fs::write(&path, text).unwrap();
            subs.push((format!("config/{name}"), path.display().to_string()));
        }
        Sandbox { dir, subs }
    }

    fn rewrite(&self, cmd: &str) -> String {
        let mut c = cmd.to_string();
        for (from, to) in &self.subs {
            c = c.replace(from, to);
        }
        c
    }

    fn bash(&self, cmd: &str) -> Command {
        let mut c = Command::new("bash");
        c.args(["-c", cmd]).current_dir(self.dir.path());
        c
    }
}

/// What each command run must show, by a piece of the command.
fn expect(cmd: &str, ok: bool, said: &str) {
    let want: &[&str] = if cmd.starts_with("curl") {
        &["\"name\":\"gpu\"", "\"last\""]
    } else if cmd.contains("agent check") {
        &["config ", "cpu "]
    } else if cmd.contains("agent once") {
        &["\"schema\"", "\"cpu\""]
    } else if cmd.contains("collector usage") {
        &["key,"]
    } else if cmd.contains("collector rollup") {
        &["rolled up"]
    } else if cmd.contains("collector report") {
        &["wrote job-1234.md"]
    } else {
        panic!("the README has a command this test does not know what to expect of: {cmd}")
    };
    assert!(ok, "{cmd}: failed:\n{said}");
    for w in want {
        assert!(said.contains(w), "{cmd}: {w:?} not in:\n{said}");
    }
}

#[test]
fn every_readme_command_works_as_written() {
    let mq = Mosquitto::start();
    let db = Influxd::start();
    let sandbox = Sandbox::new(&mq, &db);
    // The job the README's report asks for, running on the simulated node.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    std::fs::write(
        sandbox.dir.path().join("jobs/1234.job"),
        format!("job=1234\nproject=climate\nuser=ana\ngpus=0,1\ncpus=8\nstart_ms={now_ms}\n"),
    )
    .unwrap();

    let commands = sh_commands(&readme());
    assert!(commands.len() >= 10, "{commands:#?}");
    let mut background = Vec::new();
    let mut ran = 0;
    for cmd in &commands {
        let line = sandbox.rewrite(cmd);
        match how(cmd) {
            How::Elsewhere(why) => eprintln!("not run here: {cmd}: {why}"),
            How::Sleep(s) => std::thread::sleep(Duration::from_secs(s)),
            How::Background => {
                let n = background.len();
                background.push(Proc::spawn(
                    "readme",
                    sandbox
                        .bash(&format!("exec {}", line.trim_end_matches('&')))
                        .env("RUST_LOG", "info"),
                    sandbox.dir.path().join(format!("background-{n}.log")),
                ));
            }
            How::Run => {
                let out = sandbox.bash(&line).output().unwrap();
                let said = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                expect(cmd, out.status.success(), &said);
                ran += 1;
            }
            How::Interrupt => {
                // Ctrl-C in a terminal signals the whole pipeline.
                let mut child = sandbox.bash(&line);
                std::os::unix::process::CommandExt::process_group(&mut child, 0);
                let child = child
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                std::thread::sleep(Duration::from_secs(4));
                unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
                let out = child.wait_with_output().unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success()
                        && stdout.contains("valid samples")
                        && stdout.contains("0 invalid lines"),
                    "{cmd}: after Ctrl-C, {:?}:\n{stdout}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                ran += 1;
            }
        }
    }
    assert!(ran >= 7, "only {ran} commands run");
    // `kill %1 %2`: SIGTERM, a clean stop.
    for mut p in background {
        assert!(p.running(), "{}", p.log());
        unsafe { libc::kill(p.pid(), libc::SIGTERM) };
        let status = p.wait(Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?}\n{}",
            p.log()
        );
    }
}

/// Every `nodewatt-agent X` and `nodewatt-collector X` the README names anywhere is a
/// command the binary has.
#[test]
fn every_command_the_readme_names_exists() {
    let text = readme();
    let mut seen = 0;
    for binary in ["nodewatt-agent", "nodewatt-collector"] {
        for (i, _) in text.match_indices(&format!("{binary} ")) {
            let word: String = text[i + binary.len() + 1..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase())
                .collect();
            if word.is_empty() {
                continue;
            }
            let out = Command::new(bin(binary))
                .args([&word, "--help"])
                .output()
                .unwrap();
            assert!(out.status.success(), "README names `{binary} {word}`");
            seen += 1;
        }
    }
    assert!(seen >= 8, "{seen}");
}

#[test]
fn sh_blocks_are_read_as_commands() {
    let text = "x\n```sh\n# c\na --b \\\n  --c  # say\n\nd 'e # f'\n```\n```toml\nno\n```\n";
    assert_eq!(sh_commands(text), ["a --b --c", "d 'e # f'"]);
}
