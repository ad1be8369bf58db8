//! The shipped broker configuration (config/mosquitto.conf, only its file paths and ports
//! changed) with the logins and the ACL file that scripts/broker-users.sh writes, against the
//! real mosquitto: who may log in, with which client id, and publish or subscribe where.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nodewatt_tests::*;
use rumqttc::{
    Client, Connection, Event, MqttOptions, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
};
use tempfile::TempDir;

/// The cluster named in the example config/mosquitto.acl and config/agent.toml.
const CLUSTER: &str = "mycluster";
const DB: &str = "nodewatt_broker_auth";
const GROUP: &str = "ingest";

/// mosquitto running the shipped config, with the logins and the ACL file broker-users.sh
/// made for these nodes of `cluster` and the default collector login.
struct Broker {
    /// First, so that mosquitto stops before its directory goes.
    proc: Proc,
    dir: TempDir,
    certs: Certs,
    /// The loopback listener (plain), for the collectors and raw clients.
    port: u16,
    /// The TLS listener, for the agents.
    tls_port: u16,
    cluster: String,
}

/// Runs broker-users.sh for these nodes with these options, its output in `dir`/users.
fn broker_users(dir: &Path, nodes: &[&str], args: &[&str]) {
    broker_users_in(dir, CLUSTER, nodes, args);
}

/// [`broker_users`] for a cluster, with umask 022: the script's files must be private
/// whatever the umask.
fn broker_users_in(dir: &Path, cluster: &str, nodes: &[&str], args: &[&str]) {
    std::fs::write(dir.join("nodes"), nodes.join("\n") + "\n").unwrap();
    let out = Command::new("bash")
        .args(["-c", r#"umask 022 && exec bash "$@""#, "bash"])
        .arg(repo().join("scripts/broker-users.sh"))
        .args(["--cluster", cluster])
        .args(args)
        .arg("--out")
        .arg(dir.join("users"))
        .arg(dir.join("nodes"))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "broker-users.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Broker {
    fn start(nodes: &[&str]) -> Broker {
        Broker::start_with(nodes, &[], |_| {})
    }

    /// broker-users.sh with `args`; `edit` changes the plugin's file it made, before
    /// mosquitto reads it.
    fn start_with(
        nodes: &[&str],
        args: &[&str],
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Broker {
        Broker::start_in(CLUSTER, nodes, args, edit)
    }

    /// [`Broker::start_with`] for the nodes of `cluster`.
    fn start_in(
        cluster: &str,
        nodes: &[&str],
        args: &[&str],
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        broker_users_in(d, cluster, nodes, args);
        let json = d.join("users/dynamic-security.json");
        let mut dynsec = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        edit(&mut dynsec);
        std::fs::write(&json, dynsec.to_string()).unwrap();

        let certs = Certs::new();
        let (port, tls_port) = (free_port(), free_port());
        let path = |p: PathBuf| p.display().to_string();
        let mut conf = std::fs::read_to_string(repo().join("config/mosquitto.conf")).unwrap();
        for (from, to) in [
            (
                "listener 8883\n",
                format!("listener {tls_port} 127.0.0.1\n"),
            ),
            (
                "listener 1883 127.0.0.1\n",
                format!("listener {port} 127.0.0.1\n"),
            ),
            ("/var/lib/mosquitto/", format!("{}/", d.display())),
            (
                "/etc/mosquitto/nodewatt-dynsec.json",
                path(d.join("users/dynamic-security.json")),
            ),
            (
                "/etc/mosquitto/nodewatt.acl",
                path(d.join("users/nodewatt.acl")),
            ),
            ("/etc/mosquitto/certs/ca.pem", path(certs.path("ca.pem"))),
            (
                "/etc/mosquitto/certs/broker.pem",
                path(certs.path("server.pem")),
            ),
            (
                "/etc/mosquitto/certs/broker.key",
                path(certs.path("server.key")),
            ),
        ] {
            // Each exactly once: a changed shipped file fails here, not silently. The
            // `plugin` line stays as shipped, so these tests prove that mosquitto finds it.
            assert_eq!(conf.matches(from).count(), 1, "{from} in mosquitto.conf");
            conf = conf.replace(from, &to);
        }
        let proc = start_mosquitto_config(d, &conf, port);
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                tls_port
            ))
            .is_ok()),
            "no TLS listener: {}",
            proc.log()
        );
        Broker {
            proc,
            dir,
            certs,
            port,
            tls_port,
            cluster: cluster.to_string(),
        }
    }

    fn password_file(&self, user: &str) -> PathBuf {
        self.dir.path().join("users/passwords").join(user)
    }

    fn password(&self, user: &str) -> String {
        std::fs::read_to_string(self.password_file(user))
            .unwrap()
            .trim_end()
            .to_string()
    }

    /// An agent's config for `node`: TLS, the password file the script made, no username.
    fn agent_config(&self, node: &str) -> ConfigFile {
        let text = agent_config(&self.cluster, node, "50ms", self.tls_port, &[200.0])
            // No username: with a password file the agent logs in as its node name.
            + &format!(
                "password_file = {:?}\n[mqtt.tls]\nca_file = {:?}\n",
                self.password_file(node),
                self.certs.path("ca.pem")
            );
        config_file("agent.toml", &text)
    }

    /// A collector logged in as `collector`, in the share group, subscribed.
    fn collector(&self, id: &str, db: &Influxd) -> (ConfigFile, Proc) {
        let login = format!(
            "[mqtt]\nusername = \"collector\"\npassword_file = {:?}\n",
            self.password_file("collector")
        );
        let text = collector_config(id, self.port, &db.url(), DB)
            .replace(
                "[collector]\n",
                &format!("[collector]\nshare_group = \"{GROUP}\"\n"),
            )
            .replace("[mqtt]\n", &login);
        let cfg = config_file("collector.toml", &text);
        let c = start_collector(&cfg);
        wait_subscribed(&c);
        (cfg, c)
    }
}

/// The agent's preflight logs in as the agent (the only client id its login may use).
fn check_logs_in(cfg: &ConfigFile, node: &str) {
    let out = agent_run(cfg, &["check"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("accepted the login as user {node}")),
        "{said}"
    );
}

fn agent_id(node: &str) -> String {
    format!("nodewatt-agent-{CLUSTER}-{node}")
}

/// [`valid_sample`] of this cluster, with its topic.
fn sample(node: &str, seq: u64) -> (String, Vec<u8>) {
    (
        format!("nodewatt/v1/{CLUSTER}/{node}/sample"),
        valid_sample(CLUSTER, node, seq).to_json().into_bytes(),
    )
}

/// Logs in with this client id; the connection once the broker accepted, or how it refused.
fn login(
    port: u16,
    id: &str,
    user: Option<(&str, &str)>,
    clean: bool,
) -> Result<(Client, Connection), String> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(clean);
    if let Some((u, p)) = user {
        opts.set_credentials(u, p);
    }
    let (client, mut conn) = Client::new(opts, 100);
    loop {
        match conn.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((client, conn)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no answer".into()),
        }
    }
}

/// The next packet of a kind `f` picks, within 10 s.
fn next<T>(conn: &mut Connection, mut f: impl FnMut(Packet) -> Option<T>) -> T {
    loop {
        match conn.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(Event::Incoming(p))) => {
                if let Some(t) = f(p) {
                    return t;
                }
            }
            Ok(Ok(_)) => {}
            other => panic!("connection: {other:?}"),
        }
    }
}

/// Publishes with QoS 1 as `id`, waiting for the broker's acknowledgements (mosquitto
/// acknowledges what the ACL refuses, and drops it).
fn publish_as(port: u16, id: &str, user: (&str, &str), messages: &[(String, Vec<u8>)]) {
    publish_raw_with(port, id, Some(user), messages)
}

/// Subscribes to `filters` at once; the broker's answer to each.
fn subscribe(
    client: &Client,
    conn: &mut Connection,
    filters: &[String],
) -> Vec<SubscribeReasonCode> {
    client
        .subscribe_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        )
        .unwrap();
    next(conn, |p| match p {
        Packet::SubAck(s) => Some(s.return_codes),
        _ => None,
    })
}

fn count(db: &Influxd, node: &str) -> f64 {
    db.scalar(
        DB,
        &format!("SELECT COUNT(seq) FROM agent WHERE node = '{node}'"),
    )
}

/// How often a collector has connected to the broker (1: it was never pushed off).
fn connects(c: &Proc) -> usize {
    c.log().matches("connected to the MQTT broker").count()
}

#[test]
fn the_shipped_broker_refuses_anonymous_logins_node_subscriptions_and_forged_topics() {
    let mq = Broker::start(&["node-a", "node-b"]);
    let db = Influxd::start();
    let (_cfg, collector) = mq.collector("c1", &db);
    let (a, b) = (mq.password("node-a"), mq.password("node-b"));
    let node_a = ("node-a", a.as_str());

    let refused = |id: &str, user: Option<(&str, &str)>| {
        let r = login(mq.port, id, user, true).map(|_| ());
        assert!(
            r.as_ref().is_err_and(|e| e.contains("NotAuthorized")),
            "{id} {user:?}: {r:?}"
        );
    };
    refused("anonymous", None);
    // Another node's password.
    refused(&agent_id("node-a"), Some(("node-a", &b)));
    // A node's login is pinned to its agent's client id: it cannot end another node's
    // session, and `nodewatt-agent check` cannot use an id of its own.
    refused(&agent_id("node-b"), Some(node_a));
    refused(&format!("nodewatt-check-{CLUSTER}-node-a"), Some(node_a));

    // No subscription at all, so none in the collectors' share group, where a member
    // that may not read the topic would swallow its share of the messages.
    let (client, mut conn) = login(mq.port, &agent_id("node-a"), Some(node_a), true).unwrap();
    let filters = [
        format!("$share/{GROUP}/nodewatt/v1/+/+/sample"),
        "nodewatt/v1/#".to_string(),
        "#".to_string(),
    ];
    let codes = subscribe(&client, &mut conn, &filters);
    assert_eq!(codes, vec![SubscribeReasonCode::Failure; 3], "{filters:?}");
    // Stay in the group if it got in: every sample must still reach the collector.
    let own: Vec<_> = (0..20).map(|i| sample("node-b", i)).collect();
    publish_as(mq.port, &agent_id("node-b"), ("node-b", &b), &own);

    // node-a writes one sample as node-b, a request to the plugin's control topic to
    // create a login for itself, and last its own sample: once that is stored, the others
    // would have been (the broker passes on one client's messages in order).
    let intruder =
        br#"{"commands":[{"command":"createClient","username":"intruder","password":"pw"}]}"#;
    publish_as(
        mq.port,
        &agent_id("node-a"),
        node_a,
        &[
            sample("node-b", 100),
            (
                "$CONTROL/dynamic-security/v1".to_string(),
                intruder.to_vec(),
            ),
            sample("node-a", 100),
        ],
    );
    let arrived = wait_until(Duration::from_secs(20), || {
        count(&db, "node-b") >= 20.0 && count(&db, "node-a") >= 1.0
    });
    assert!(arrived, "{}", collector.log());
    drop(client);
    assert_eq!((count(&db, "node-a"), count(&db, "node-b")), (1.0, 20.0));
    assert!(db
        .rows(
            DB,
            "SELECT seq FROM agent WHERE node = 'node-b' AND seq = 100"
        )
        .is_empty());
    refused("intruder", Some(("intruder", "pw")));
    assert_eq!(connects(&collector), 1, "{}", collector.log());
}

#[test]
fn a_node_cannot_take_the_collectors_client_id_nor_its_queued_messages() {
    let mq = Broker::start(&["node-a"]);
    let db = Influxd::start();
    let (cfg, mut collector) = mq.collector("c1", &db);
    let a = mq.password("node-a");
    let node_a = ("node-a", a.as_str());
    let take_over = || {
        for clean in [true, false] {
            let r = login(mq.port, "nodewatt-collector-c1", Some(node_a), clean).map(|_| ());
            assert!(
                r.as_ref().is_err_and(|e| e.contains("NotAuthorized")),
                "clean session {clean}: {r:?}"
            );
        }
    };

    // While the collector is connected: it stays connected and keeps receiving.
    take_over();
    let first: Vec<_> = (0..5).map(|i| sample("node-a", i)).collect();
    publish_as(mq.port, &agent_id("node-a"), node_a, &first);
    let arrived = wait_until(Duration::from_secs(20), || count(&db, "node-a") == 5.0);
    assert!(arrived, "{}", collector.log());
    assert_eq!(connects(&collector), 1, "{}", collector.log());

    // While it is away: what the broker queues for its session is all delivered later.
    collector.stop_cleanly();
    let queued: Vec<_> = (5..15).map(|i| sample("node-a", i)).collect();
    publish_as(mq.port, &agent_id("node-a"), node_a, &queued);
    take_over();
    let collector = start_collector(&cfg);
    wait_subscribed(&collector);
    let arrived = wait_until(Duration::from_secs(20), || count(&db, "node-a") == 15.0);
    assert!(
        arrived,
        "{} of 15: {}",
        count(&db, "node-a"),
        collector.log()
    );
}

#[test]
fn agents_publish_with_logins_from_the_script_to_collectors_sharing_a_group() {
    let nodes = ["gpu001", "gpu002"];
    let mq = Broker::start(&nodes);
    let db = Influxd::start();
    // Two collectors share the one collector login and the group, each with its own id
    // and persistent session.
    let (c1cfg, c1) = mq.collector("c1", &db);
    let (_c2cfg, c2) = mq.collector("c2", &db);
    // The collector's preflight logs in and is allowed its subscriptions.
    let said = collector_cli(&c1cfg, &["check", "--strict"]);
    assert!(
        said.contains("accepted the login as user collector and the subscriptions"),
        "{said}"
    );

    let agents: Vec<_> = nodes
        .iter()
        .map(|node| {
            let cfg = mq.agent_config(node);
            check_logs_in(&cfg, node);
            let agent = start_agent(&cfg, 20);
            (cfg, agent)
        })
        .collect();
    for (_cfg, mut agent) in agents {
        agent.wait_success(Duration::from_secs(60));
    }
    let arrived = wait_until(Duration::from_secs(30), || {
        nodes.iter().all(|n| count(&db, n) == 20.0)
    });
    assert!(arrived, "{}\n{}\n{}", c1.log(), c2.log(), mq.proc.log());
    assert_eq!((connects(&c1), connects(&c2)), (1, 1));
}

#[test]
fn a_cluster_not_named_in_the_example_acl_reaches_every_collector_login() {
    // The newcomer's fleet: its own cluster name, and a second collector login. With the
    // example ACL (cluster mycluster) the broker acknowledged and dropped every sample, and
    // the agent's check and the collector's were content.
    let cluster = "c1";
    let node = "gpu001";
    let mq = Broker::start_in(
        cluster,
        &[node],
        &["--collector", "collector", "--collector", "ingest2"],
        |_| {},
    );
    let db = Influxd::start();
    let (_cfg, collector) = mq.collector("c1", &db);
    // The second login reads every cluster's samples, like the first.
    let pw = mq.password("ingest2");
    let (reader, mut conn) = login(mq.port, "reader", Some(("ingest2", &pw)), true).unwrap();
    reader
        .subscribe("nodewatt/v1/+/+/sample", QoS::AtLeastOnce)
        .unwrap();
    let codes = next(&mut conn, |p| match p {
        Packet::SubAck(s) => Some(s.return_codes),
        _ => None,
    });
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    let cfg = mq.agent_config(node);
    check_logs_in(&cfg, node);
    start_agent(&cfg, 20).wait_success(Duration::from_secs(60));
    let arrived = wait_until(Duration::from_secs(30), || count(&db, node) == 20.0);
    assert!(
        arrived,
        "{} of 20 stored: {}\n{}",
        count(&db, node),
        collector.log(),
        mq.proc.log()
    );
    let topic = format!("nodewatt/v1/{cluster}/{node}/sample");
    for i in 0..20 {
        let got = next(&mut conn, |p| match p {
            Packet::Publish(p) => Some(p.topic),
            _ => None,
        });
        assert_eq!(got, topic, "sample {i} to ingest2");
    }
}

#[test]
fn the_collectors_check_names_the_subscriptions_the_broker_refuses() {
    let sample_topic = "nodewatt/v1/+/+/sample";
    let status_topic = "nodewatt/v1/+/+/status";
    // The collector's login may connect with any client id, but a role of its own denies
    // these subscriptions: first all of nodewatt's, then only the status topics.
    for (deny, refused) in [
        ("nodewatt/v1/#", vec![sample_topic, status_topic]),
        (status_topic, vec![status_topic]),
    ] {
        let mq = Broker::start_with(&["node-a"], &[], |j| {
            j["roles"].as_array_mut().unwrap().push(serde_json::json!({
                "rolename": "collector-no-read",
                "acls": [{"acltype": "subscribePattern", "topic": deny, "allow": false}],
            }));
            let collector = j["clients"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|c| c["username"] == "collector")
                .unwrap();
            collector["roles"] = serde_json::json!([{"rolename": "collector-no-read"}]);
        });
        let db = Influxd::start();
        let text = collector_config("c1", mq.port, &db.url(), DB).replace(
            "[mqtt]\n",
            &format!(
                "[mqtt]\nusername = \"collector\"\npassword_file = {:?}\n",
                mq.password_file("collector")
            ),
        );
        let cfg = config_file("collector.toml", &text);
        let out = collector_run(&cfg, &["check", "--strict"]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{deny}: {said}");
        let want = format!(
            "broker     PROBLEM      MQTT broker mqtt://127.0.0.1:{} refused the subscription to {refused:?}:",
            mq.port
        );
        assert!(said.contains(&want), "{deny}: {want:?} in\n{said}");
        // The only problem: InfluxDB is there, and a SUBACK comes only after a login.
        assert_eq!(said.matches("PROBLEM").count(), 1, "{deny}: {said}");
    }
}

/// The rules of an ACL file: its lines without comments and blank lines.
fn acl_rules(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn the_example_acl_is_what_the_script_writes_for_the_example_cluster() {
    let example = std::fs::read_to_string(repo().join("config/mosquitto.acl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    broker_users(dir.path(), &["node-a"], &[]);
    let written = std::fs::read_to_string(dir.path().join("users/nodewatt.acl")).unwrap();
    assert_eq!(acl_rules(&written), acl_rules(&example), "{written}");

    // Another cluster and collector logins: each gets its block, and only those.
    broker_users_in(
        dir.path(),
        "c1",
        &["node-a"],
        &["--collector", "ingest", "--collector", "ingest2"],
    );
    let written = std::fs::read_to_string(dir.path().join("users/nodewatt.acl")).unwrap();
    assert_eq!(
        acl_rules(&written),
        [
            "pattern write nodewatt/v1/c1/%u/sample",
            "pattern write nodewatt/v1/c1/%u/status",
            "user ingest",
            "topic read nodewatt/v1/#",
            "user ingest2",
            "topic read nodewatt/v1/#",
        ],
        "{written}"
    );
}

/// Every file under `dir` is 0600 and every directory 0700; the files' paths.
fn private_files(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            assert_eq!(format!("{mode:o}"), "700", "{}", path.display());
            files.extend(private_files(&path));
        } else {
            assert_eq!(format!("{mode:o}"), "600", "{}", path.display());
            files.push(path);
        }
    }
    files
}

/// The nodes with an add/node-<node>/mosquitto_rr under `users`, sorted.
fn pending(users: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(users.join("add")) else {
        return Vec::new();
    };
    let mut nodes: Vec<String> = dir
        .map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("node-")
                .expect("add/node-<node>")
                .to_string()
        })
        .collect();
    nodes.sort();
    nodes
}

/// The recipe in docs/deployment.md ("Broker logins") that applies add/, run as written
/// for these files and this port: whether it succeeded, and what it said.
fn apply_pending(users: &Path, port: u16) -> (bool, String) {
    let doc = std::fs::read_to_string(repo().join("docs/deployment.md")).unwrap();
    let recipes: Vec<_> = doc
        .split("  ```sh\n")
        .skip(1)
        .map(|b| b.split("  ```\n").next().unwrap())
        .filter(|b| b.contains("mosquitto_rr"))
        .collect();
    assert_eq!(recipes.len(), 1, "{recipes:?}");
    let mut script: String = recipes[0]
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l).to_string() + "\n")
        .collect();
    for (from, to) in [
        ("/srv/nodewatt-broker/", format!("{}/", users.display())),
        ("-p 1883 ", format!("-p {port} ")),
    ] {
        assert_eq!(script.matches(from).count(), 1, "{from} in {script}");
        script = script.replace(from, &to);
    }
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[test]
fn the_files_to_add_a_node_fit_mosquitto_rr_with_the_longest_names() {
    // mosquitto_rr reads each line of its options file into 1024 bytes (newline and NUL
    // included) and takes the rest of a longer one for options.
    let dir = tempfile::tempdir().unwrap();
    let [cluster, node, admin] = ['c', 'n', 'a'].map(|c| c.to_string().repeat(64));
    broker_users_in(dir.path(), &cluster, &[&node], &["--admin", &admin]);
    broker_users_in(
        dir.path(),
        &cluster,
        &[&node, &"m".repeat(64), "x"],
        &["--admin", &admin, "--add"],
    );
    let users = dir.path().join("users");
    assert_eq!(pending(&users), ["m".repeat(64), "x".to_string()]);
    let text = std::fs::read_to_string(
        users
            .join("add")
            .join(format!("node-{}", "m".repeat(64)))
            .join("mosquitto_rr"),
    )
    .unwrap();
    let longest = text.lines().map(str::len).max().unwrap();
    assert!(text.len() < 1024 && longest + 1 < 1023, "{longest}: {text}");
    assert!(
        text.contains(&format!("nodewatt-agent-{cluster}-{}", "m".repeat(64))),
        "{text}"
    );
}

#[test]
fn nodes_added_with_the_admin_login_can_publish_without_a_broker_restart() {
    let admin = "nodewatt-admin";
    let mq = Broker::start_with(&["node-a"], &["--admin", admin], |_| {});
    let users = mq.dir.path().join("users");
    let db = Influxd::start();
    let (_cfg, collector) = mq.collector("c1", &db);

    // The admin login changes logins and nothing else: no share group, no samples, not
    // even as a node named after it, which the ACL file's patterns would allow. Nor does
    // the collectors' login publish.
    let pw = mq.password(admin);
    let (client, mut conn) = login(mq.port, "any-admin-id", Some((admin, &pw)), true).unwrap();
    let filters = [
        format!("$share/{GROUP}/nodewatt/v1/+/+/sample"),
        "nodewatt/v1/#".to_string(),
    ];
    let codes = subscribe(&client, &mut conn, &filters);
    assert_eq!(codes, vec![SubscribeReasonCode::Failure; 2], "{filters:?}");
    drop(client);
    publish_as(
        mq.port,
        "any-admin-id",
        (admin, &pw),
        &[sample("node-a", 7), sample(admin, 7)],
    );
    let c = mq.password("collector");
    publish_as(
        mq.port,
        "any-collector-id",
        ("collector", &c),
        &[sample("collector", 7)],
    );
    // After those, through the one collector: when it is stored, they would be.
    let a = mq.password("node-a");
    publish_as(
        mq.port,
        &agent_id("node-a"),
        ("node-a", &a),
        &[sample("node-a", 2)],
    );
    let arrived = wait_until(Duration::from_secs(20), || count(&db, "node-a") == 1.0);
    assert!(arrived, "{}", collector.log());
    assert_eq!((count(&db, admin), count(&db, "collector")), (0.0, 0.0));

    // Nodes in two runs, the first run's not applied yet: a later run keeps them. One
    // name of 64 characters, and one that starts with a dot, which `*` skips.
    let long = "l".repeat(64);
    let first = ["node-a", "node-b", "node-c", "node-d", "node-e"];
    let mut all = first.to_vec();
    all.extend(["node-f", "node-g", "node-h", ".node-i", &long]);
    broker_users(mq.dir.path(), &first, &["--admin", admin, "--add"]);
    let b_file = users.join("add/node-node-b/mosquitto_rr");
    let b_options = std::fs::read_to_string(&b_file).unwrap();
    broker_users(mq.dir.path(), &all, &["--admin", admin, "--add"]);
    assert_eq!(mq.password("node-a"), a, "an existing password is kept");
    let mut added: Vec<String> = all[1..].iter().map(|n| n.to_string()).collect();
    added.sort();
    assert_eq!(pending(&users), added);
    assert_eq!(std::fs::read_to_string(&b_file).unwrap(), b_options);
    let files = private_files(&users);
    // Passwords, the admin's and the collectors' too; add/; dynamic-security.json and
    // nodewatt.acl.
    assert_eq!(files.len(), all.len() + 2 + 9 + 2, "{files:?}");

    // One fails, its admin password wrong: the recipe says so, keeps it, applies the rest.
    let c_file = users.join("add/node-node-c/mosquitto_rr");
    let wrong = std::fs::read_to_string(&c_file)
        .unwrap()
        .replace(&pw, "not-the-password");
    std::fs::write(&c_file, wrong).unwrap();
    let (ok, said) = apply_pending(&users, mq.port);
    assert!(ok, "{said}");
    assert_eq!(pending(&users), ["node-c"], "{said}");
    assert!(said.contains("Connection error: Not authorized"), "{said}");
    assert!(said.contains("node-node-c/: not added: \n"), "{said}");

    // A run with --add rewrites it with the current passwords. An options file applied
    // already is refused, and kept.
    broker_users(mq.dir.path(), &all, &["--admin", admin, "--add"]);
    std::fs::create_dir(users.join("add/node-node-b")).unwrap();
    std::fs::write(&b_file, &b_options).unwrap();
    let (ok, said) = apply_pending(&users, mq.port);
    assert!(ok, "{said}");
    assert_eq!(pending(&users), ["node-b"], "{said}");
    assert!(
        said.contains(
            r#"node-node-b/: not added: {"responses":[{"command":"createClient","error":"Client already exists"}]}"#
        ),
        "{said}"
    );
    // A node no longer listed loses its pending file.
    let without_b: Vec<_> = all.iter().copied().filter(|n| *n != "node-b").collect();
    broker_users(mq.dir.path(), &without_b, &["--admin", admin, "--add"]);
    assert!(pending(&users).is_empty());
    let (ok, said) = apply_pending(&users, mq.port);
    assert!(ok && said.is_empty(), "{said}");

    // The new nodes, like a node from the file: their agent's client id only, no
    // subscriptions, their own topics.
    let b = mq.password("node-b");
    let node_b = ("node-b", b.as_str());
    let r = login(mq.port, "nodewatt-check-node-b", Some(node_b), true).map(|_| ());
    assert!(
        r.as_ref().is_err_and(|e| e.contains("NotAuthorized")),
        "{r:?}"
    );
    let (client, mut conn) = login(mq.port, &agent_id("node-b"), Some(node_b), true).unwrap();
    client.subscribe("nodewatt/v1/#", QoS::AtLeastOnce).unwrap();
    let codes = next(&mut conn, |p| match p {
        Packet::SubAck(s) => Some(s.return_codes),
        _ => None,
    });
    assert_eq!(codes, vec![SubscribeReasonCode::Failure]);
    drop(client);
    for node in &all[1..] {
        let pw = mq.password(node);
        publish_as(
            mq.port,
            &agent_id(node),
            (node, &pw),
            // The forgery first: when the node's own is stored, it would have been.
            &[sample("node-a", 1), sample(node, 1)],
        );
    }
    let arrived = wait_until(Duration::from_secs(20), || {
        all[1..].iter().all(|n| count(&db, n) == 1.0)
    });
    let counts: Vec<_> = all.iter().map(|n| (n, count(&db, n))).collect();
    assert!(arrived, "{counts:?} {}", collector.log());
    // No forged sample, neither the nodes' nor the admin's.
    for node in &all {
        assert_eq!(count(&db, node), 1.0, "{node}");
    }
    assert_eq!((count(&db, admin), count(&db, "collector")), (0.0, 0.0));
}

/// broker-users.sh with these arguments and this node list, its output in `dir`/users.
fn broker_users_run(dir: &Path, list: &str, args: &[&str]) -> std::process::Output {
    std::fs::write(dir.join("nodes"), list).unwrap();
    Command::new("bash")
        .arg(repo().join("scripts/broker-users.sh"))
        .args(args)
        .arg("--out")
        .arg(dir.join("users"))
        .arg(dir.join("nodes"))
        .output()
        .expect("bash runs")
}

/// Every name becomes a login, a topic level and a file name: the script refuses what
/// cannot be one, and a list it cannot use, with the line and the rule, before it writes
/// anything. A list with comments, blanks and CRLF line ends is read as meant.
#[test]
fn broker_users_refuses_bad_names_and_lists_before_writing_anything() {
    let c = &["--cluster", CLUSTER][..];
    let rule = "must be 1-64 of A-Z a-z 0-9 . _ - (not . or ..)";
    let long = "n".repeat(65);
    let cases: Vec<(String, Vec<&str>, i32, String)> = vec![
        (
            "n1\nn 2\n".into(),
            c.to_vec(),
            1,
            format!(":2: node n 2: {rule}"),
        ),
        (
            "n1\nrack/n2\n".into(),
            c.to_vec(),
            1,
            format!(":2: node rack/n2: {rule}"),
        ),
        ("n+\n".into(), c.to_vec(), 1, format!(":1: node n+: {rule}")),
        (
            "n#1\n".into(),
            c.to_vec(),
            1,
            format!(":1: node n#1: {rule}"),
        ),
        ("..\n".into(), c.to_vec(), 1, format!(":1: node ..: {rule}")),
        (
            format!("{long}\n"),
            c.to_vec(),
            1,
            format!(":1: node {long}: {rule}"),
        ),
        (
            "n1\nn2\nn1\n".into(),
            c.to_vec(),
            1,
            ":3: node n1 listed twice".into(),
        ),
        (
            "# none yet\n\n".into(),
            c.to_vec(),
            1,
            "no node names".into(),
        ),
        (
            "n1\ncollector\n".into(),
            c.to_vec(),
            1,
            "collector collector is also listed as a node".into(),
        ),
        (
            "n1\n".into(),
            [c, &["--admin", "n1"]].concat(),
            1,
            "admin n1 is also a node or collector login".into(),
        ),
        (
            "n1\n".into(),
            [c, &["--add"]].concat(),
            1,
            "--add needs --admin".into(),
        ),
        (
            "n1\n".into(),
            vec!["--cluster", "my cluster"],
            1,
            format!("cluster my cluster: {rule}"),
        ),
        ("n1\n".into(), vec![], 2, "usage: ".into()),
        (
            "n1\n".into(),
            [c, &["--nodes"]].concat(),
            1,
            "unknown option --nodes".into(),
        ),
    ];
    for (list, args, code, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let out = broker_users_run(dir.path(), &list, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{list:?} {args:?}: {err}");
        assert!(err.contains(&says), "{list:?} {args:?}: {err}");
        assert!(
            !dir.path().join("users").exists(),
            "{list:?} {args:?}: wrote files"
        );
    }

    // Comments, blank lines, blanks around names and CRLF line ends.
    let dir = tempfile::tempdir().unwrap();
    let out = broker_users_run(dir.path(), "# rack 1\r\n  n1  \r\n\r\nn2 # gpu\r\n", c);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut made: Vec<String> = std::fs::read_dir(dir.path().join("users/passwords"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    made.sort();
    assert_eq!(made, ["collector", "n1", "n2"]);
}
