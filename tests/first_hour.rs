//! What a new sysadmin meets first: wrong ports, missing servers, config mistakes and the
//! preflight checks. Every failure must say where and what to check.

use std::process::Command;
use std::time::Duration;

use nodewatt_tests::*;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn start_agent_at(port: u16) -> (ConfigFile, Proc) {
    let cfg = config_file(
        "agent.toml",
        &agent_config("c1", "n1", "1s", port, &[300.0]),
    );
    let p = start_agent(&cfg, 1_000_000);
    (cfg, p)
}

/// Pointed at InfluxDB's HTTP port, the agent said nothing at all: each one-second sample
/// restarted the MQTT connect before it could time out.
#[test]
fn an_agent_pointed_at_a_port_that_is_no_broker_says_so() {
    let db = Influxd::start();
    let (_cfg, agent) = start_agent_at(db.port);
    let peer = format!("MQTT broker mqtt://127.0.0.1:{}", db.port);
    let said = wait_until(Duration::from_secs(20), || {
        agent.log().contains(&peer) && agent.log().contains("no MQTT answer")
    });
    assert!(said, "{}", agent.log());
}

#[test]
fn an_agent_whose_broker_is_down_names_it() {
    let port = free_port();
    let (_cfg, agent) = start_agent_at(port);
    let said = wait_until(Duration::from_secs(10), || {
        agent
            .log()
            .contains(&format!("MQTT broker mqtt://127.0.0.1:{port}: "))
            && agent.log().contains("nothing listens there")
    });
    assert!(said, "{}", agent.log());
}

/// `serve` with neither server there: both named in its log, with what to check.
#[test]
fn a_collector_whose_servers_are_down_names_both() {
    let (mqtt_port, influx_port) = (free_port(), free_port());
    let cfg = config_file(
        "collector.toml",
        &collector_config(
            "down",
            mqtt_port,
            &format!("http://127.0.0.1:{influx_port}"),
            "db",
        ),
    );
    let collector = start_collector(&cfg);
    let said = wait_until(Duration::from_secs(10), || {
        let log = collector.log();
        log.contains(&format!("MQTT broker mqtt://127.0.0.1:{mqtt_port}: "))
            && log.contains(&format!(
                "cannot reach InfluxDB at http://127.0.0.1:{influx_port}: "
            ))
    });
    assert!(said, "{}", collector.log());
}

#[test]
fn checks_find_each_server_and_name_the_missing_ones() {
    let Stack {
        mq,
        db,
        collector_cfg,
        collector: _c,
    } = Stack::start("check", "checkdb");
    // Everything there: --strict passes, one line per server.
    let out = collector_run(&collector_cfg, &["check", "--strict"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for want in [
        format!("broker     ok           mqtt://127.0.0.1:{}", mq.port),
        "influxdb   ok           InfluxDB".into(),
        "database   ok           checkdb exists".into(),
        "write      ok".into(),
        "read       ok           queries allowed".into(),
    ] {
        assert!(said.contains(&want), "{want:?} in\n{said}");
    }
    // A node of its own (the other tests' agents must not count as this one's), with a
    // fleet's login: a password file and no user name, which is the node's name.
    let pw = tempfile::tempdir().unwrap();
    std::fs::write(pw.path().join("mqtt-password"), "secret\n").unwrap();
    let agent_cfg = config_file(
        "agent.toml",
        &(agent_config("c1", "n-check", "1s", mq.port, &[300.0])
            + &format!("password_file = {:?}\n", pw.path().join("mqtt-password"))),
    );
    let out = agent_run(&agent_cfg, &["check"]);
    assert!(
        text(&out).contains(&format!(
            "broker     ok           mqtt://127.0.0.1:{} accepted the login as user n-check",
            mq.port
        )),
        "{}",
        text(&out)
    );

    // With this node's agent running, a login as it would take over its session.
    let mut running = start_agent(&agent_cfg, 1_000_000);
    assert!(wait_until(Duration::from_secs(20), || running
        .log()
        .contains("connected to the MQTT broker")));
    let said = text(&agent_run(&agent_cfg, &["check"]));
    assert!(
        said.contains("accepts connections (login not tried: the agent runs, pid"),
        "{said}"
    );
    // The broker logs a takeover at once, where the agent's reconnect would come later.
    let broker_log = std::fs::read_to_string(mq.dir.path().join("mosquitto.log")).unwrap();
    assert!(
        !broker_log.contains("nodewatt-agent-c1-n-check already connected"),
        "the check took over the agent's session:\n{broker_log}"
    );
    assert!(
        !running.log().contains("again"),
        "the check took over the agent's session:\n{}",
        running.log()
    );
    running.stop();

    // Both servers at wrong ports: named, with what to check, and --strict fails.
    let (mqtt_port, influx_port) = (free_port(), free_port());
    let wrong = config_file(
        "wrong.toml",
        &collector_config(
            "check",
            mqtt_port,
            &format!("http://127.0.0.1:{influx_port}"),
            "checkdb",
        ),
    );
    let out = collector_run(&wrong, &["check", "--strict"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "broker     PROBLEM      MQTT broker mqtt://127.0.0.1:{mqtt_port}: "
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "influxdb   PROBLEM      cannot reach InfluxDB at http://127.0.0.1:{influx_port}: "
        )),
        "{said}"
    );
    let out = collector_run(&wrong, &["check"]);
    assert!(
        out.status.success(),
        "without --strict a check only reports"
    );
    drop(db);
}

/// `usage`, `report` and `rollup` need only `[influxdb]` (and `[billing]`); `serve` says
/// what it misses.
#[test]
fn a_billing_config_needs_only_influxdb() {
    let db = Influxd::start();
    reqwest::blocking::Client::new()
        .post(format!("{}/query?q=CREATE+DATABASE+bills", db.url()))
        .send()
        .unwrap();
    let cfg = config_file(
        "billing.toml",
        &format!("[influxdb]\nurl = \"{}\"\ndatabase = \"bills\"\n", db.url()),
    );
    let out = collector_run(
        &cfg,
        &["usage", "--from", "2026-11-01", "--to", "2026-11-02"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = collector_run(&cfg, &["serve"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("serve needs a [collector] section"),
        "{}",
        text(&out)
    );
}

#[test]
fn config_errors_are_said_once_with_the_file_and_a_human_range() {
    let cfg = config_file("bad.toml", "[agent]\ncluster = \"c\"\ninterval = 5\n");
    let out = agent_run(&cfg, &["check"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert_eq!(said.matches("expected a duration").count(), 1, "{said}");
    assert!(said.contains(&cfg.path.display().to_string()), "{said}");

    let cfg = config_file(
        "fast.toml",
        "[agent]\ncluster = \"c\"\ninterval = \"5ms\"\n",
    );
    let said = text(&agent_run(&cfg, &["check"]));
    assert!(
        said.contains("agent.interval = 5ms is outside 10ms to 1h"),
        "{said}"
    );
    assert!(said.contains(&cfg.path.display().to_string()), "{said}");

    let missing = config_file("x.toml", "");
    std::fs::remove_file(&missing.path).unwrap();
    let said = text(&agent_run(&missing, &["once"]));
    assert_eq!(said.matches("No such file").count(), 1, "{said}");
}

/// Installed binaries need no --config; every command that reads one says so in --help.
#[test]
fn config_has_a_default_path_and_help_everywhere() {
    for (binary, commands, default) in [
        (
            "nodewatt-agent",
            &["run", "once", "check"][..],
            "/etc/nodewatt/agent.toml",
        ),
        (
            "nodewatt-collector",
            &["serve", "check", "usage", "report", "rollup"][..],
            "/etc/nodewatt/collector.toml",
        ),
    ] {
        for c in commands {
            let out = Command::new(bin(binary))
                .args([c, "--help"])
                .output()
                .unwrap();
            let help = String::from_utf8_lossy(&out.stdout).to_string();
            let line = help
                .lines()
                .skip_while(|l| !l.contains("--config <FILE>"))
                .take(3)
                .collect::<Vec<_>>()
                .join(" ");
            assert!(
                line.contains("configuration file") && line.contains(default),
                "{binary} {c}: {line:?}"
            );
        }
        if !std::path::Path::new(default).exists() {
            let out = Command::new(bin(binary)).arg("check").output().unwrap();
            let said = text(&out);
            assert!(
                said.contains(&format!("cannot read config {default}"))
                    && said.contains("--config"),
                "{said}"
            );
        }
    }
}

/// With InfluxDB's authentication on, the collector's user needs rights the check must
/// see: it said "serve creates it" for a user who may not, and passed.
#[test]
fn the_collectors_check_names_the_influxdb_rights_its_user_lacks() {
    let mq = Mosquitto::start();
    let db = Influxd::start_with("", "auth-enabled = true");
    let admin = |q: &str| {
        let url =
            reqwest::Url::parse_with_params(&format!("{}/query", db.url()), &[("q", q)]).unwrap();
        let r = reqwest::blocking::Client::new()
            .post(url)
            .basic_auth("admin", Some("admin-pw"))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{q}: {}", r.text().unwrap());
    };
    // The first user InfluxDB takes without credentials must be an admin.
    admin("CREATE USER admin WITH PASSWORD 'admin-pw' WITH ALL PRIVILEGES");
    admin("CREATE USER nw WITH PASSWORD 'nw-pw'");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("influx-password"), "nw-pw\n").unwrap();
    let cfg = config_file(
        "collector.toml",
        &format!(
            "[collector]\nid = \"rights\"\n[mqtt]\nport = {}\n\
             [influxdb]\nurl = \"{}\"\ndatabase = \"billing\"\nusername = \"nw\"\npassword_file = {:?}\n",
            mq.port,
            db.url(),
            dir.path().join("influx-password")
        ),
    );
    let check = || {
        let out = collector_run(&cfg, &["check", "--strict"]);
        (out.status.code(), text(&out))
    };

    // No database, and a user who may not create one.
    let (code, said) = check();
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("database   PROBLEM      billing does not exist, and serve cannot create it"),
        "{said}"
    );

    // The database, but no rights on it: the user cannot even see it.
    admin("CREATE DATABASE billing");
    let (code, said) = check();
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("database   PROBLEM      billing"), "{said}");
    assert!(
        said.contains("GRANT ALL ON \"billing\" TO \"nw\""),
        "{said}"
    );

    // Writes but no reads.
    admin("GRANT WRITE ON billing TO nw");
    let (code, said) = check();
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("write      ok"), "{said}");
    assert!(said.contains("read       PROBLEM"), "{said}");

    admin("GRANT ALL ON billing TO nw");
    let (code, said) = check();
    assert_eq!(code, Some(0), "{said}");
}
