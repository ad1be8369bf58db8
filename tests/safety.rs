//! What the pipeline refuses: hostile messages never reach InfluxDB and never stop the
//! collector; agents reach the broker over TLS with a password read from a file.

use std::time::Duration;

use nodewatt_tests::*;
use nodewatt_wire::Sample;

const DB: &str = "nodewatt_safety";

fn good_sample(node: &str, seq: u64) -> Sample {
    valid_sample("lab", node, seq)
}

#[test]
fn hostile_messages_are_rejected_counted_and_never_written() {
    let Stack {
        mq,
        db,
        collector_cfg: _ccfg,
        mut collector,
    } = Stack::start("guard", DB);

    let topic = |node: &str| format!("nodewatt/v1/lab/{node}/sample");
    let json = |s: &Sample| s.to_json().into_bytes();
    let mut newline = good_sample("n1", 1);
    newline.gpus[0].model = "H100\nevil,node=n2 power_w=1".into();
    let mut backslash = good_sample("n1", 2);
    backslash.gpus[0].uuid = "GPU-x\\".into();
    let mut huge_power = good_sample("n1", 3);
    huge_power.gpus[0].power_w = Some(1e9);
    let mut future = good_sample("n1", 4);
    future.ts_ms += 3_600_000;
    let newer = good_sample("n1", 5)
        .to_json()
        .replace("\"schema\":1", "\"schema\":7");
    let messages = vec![
        (topic("n1"), b"not json at all".to_vec()),
        (topic("n1"), newer.into_bytes()),
        (topic("n1"), json(&good_sample("n2", 6))), // payload for another node
        (topic("n1"), json(&newline)),
        (topic("n1"), json(&backslash)),
        (topic("n1"), json(&huge_power)),
        (topic("n1"), json(&future)),
        (topic("n1"), vec![b' '; 300 * 1024]),
        (
            "nodewatt/v1/lab/n1/other".to_string(),
            json(&good_sample("n1", 7)),
        ),
        (topic("n1"), json(&good_sample("n1", 0))), // the only good one
    ];
    publish_raw(mq.port, &messages);

    let counted = wait_until(Duration::from_secs(20), || {
        db.scalar(DB, "SELECT LAST(rejected) FROM nodewatt_collector") >= 8.0
            && db.scalar(DB, "SELECT COUNT(seq) FROM agent") >= 1.0
    });
    assert!(counted, "{}", collector.log());
    let reason = |r: &str| {
        db.scalar(
            DB,
            &format!("SELECT LAST(rejected_{r}) FROM nodewatt_collector"),
        )
    };
    assert_eq!(reason("json"), 1.0);
    assert_eq!(reason("schema"), 1.0);
    assert_eq!(reason("node_mismatch"), 1.0);
    assert_eq!(reason("name"), 2.0);
    assert_eq!(reason("range"), 1.0);
    assert_eq!(reason("timestamp"), 1.0);
    assert_eq!(reason("too_large"), 1.0);
    // The topic filter never delivers the `other` topic.
    assert_eq!(reason("topic"), 0.0);

    // Only the good sample was written; the injected line did not create a point.
    assert_eq!(db.scalar(DB, "SELECT COUNT(seq) FROM agent"), 1.0);
    assert_eq!(db.scalar(DB, "SELECT COUNT(power_w) FROM gpu"), 1.0);
    assert!(db
        .rows(DB, "SELECT * FROM gpu WHERE node = 'n2'")
        .is_empty());
    assert!(collector.running());
    let log = collector.log();
    assert!(
        log.contains("reason=\"name\"") || log.contains("reason=name"),
        "{log}"
    );
    collector.stop_cleanly();
}

#[test]
fn agents_publish_over_tls_with_a_password_from_a_file() {
    let certs = Certs::new();
    let passwd = password_file(certs.dir.path(), &[("node-t", "s3cret-pw")]);
    let tls_port = free_port();
    let extra = format!(
        "allow_anonymous false\npassword_file {}\nlistener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
        passwd.display(),
        certs.path("ca.pem").display(),
        certs.path("server.pem").display(),
        certs.path("server.key").display(),
    );
    std::fs::write(certs.path("pw"), "s3cret-pw\n").unwrap();
    let login = format!(
        "[mqtt]\nusername = \"node-t\"\npassword_file = {:?}\n",
        certs.path("pw")
    );
    let Stack {
        mq: _mq,
        db,
        collector_cfg: _ccfg,
        collector,
    } = Stack::start_with("tls", DB, &extra, |t| t.replace("[mqtt]\n", &login));

    let tls_agent = |password_file: &std::path::Path| {
        agent_config("lab", "node-t", "50ms", tls_port, &[200.0])
            + &format!(
                "username = \"node-t\"\npassword_file = {password_file:?}\n[mqtt.tls]\nca_file = {:?}\n",
                certs.path("ca.pem")
            )
    };

    // A wrong password is refused and retried with backoff; the agent does not crash.
    std::fs::write(certs.path("wrong"), "nope\n").unwrap();
    let bad = config_file("bad.toml", &tls_agent(&certs.path("wrong")));
    let mut refused = start_agent(&bad, 5);
    assert!(
        wait_until(Duration::from_secs(20), || refused
            .log()
            .contains("refused the login as user")),
        "{}",
        refused.log()
    );
    assert!(refused.running());
    refused.stop();

    let good = config_file("good.toml", &tls_agent(&certs.path("pw")));
    let mut agent = start_agent(&good, 20);
    agent.wait_success(Duration::from_secs(60));
    let arrived = wait_until(Duration::from_secs(30), || {
        db.scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'node-t'") == 20.0
    });
    assert!(arrived, "{}", collector.log());
}

/// A broker that requires client certificates: an agent with `client_cert_file` and
/// `client_key_file` gets in, one without is refused and keeps retrying.
#[test]
fn agents_authenticate_with_a_client_certificate() {
    let certs = Certs::new();
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        certs.path("ca.pem").display(),
        certs.path("server.pem").display(),
        certs.path("server.key").display(),
    );
    let Stack {
        mq: _mq,
        db,
        collector_cfg: _ccfg,
        collector,
    } = Stack::start_with("mtls", DB, &extra, |t| t);
    let agent_with = |client: &str| {
        agent_config("lab", "node-c", "50ms", tls_port, &[200.0])
            + &format!("[mqtt.tls]\nca_file = {:?}\n{client}", certs.path("ca.pem"))
    };

    let without = config_file("without.toml", &agent_with(""));
    let mut refused = start_agent(&without, 5);
    let peer = format!("MQTT broker mqtts://127.0.0.1:{tls_port}: ");
    assert!(
        wait_until(Duration::from_secs(20), || refused.log().contains(&peer)),
        "{}",
        refused.log()
    );
    assert!(refused.running());
    refused.stop();

    let client = format!(
        "client_cert_file = {:?}\nclient_key_file = {:?}\n",
        certs.path("client.pem"),
        certs.path("client.key")
    );
    let with = config_file("with.toml", &agent_with(&client));
    start_agent(&with, 10).wait_success(Duration::from_secs(60));
    let arrived = wait_until(Duration::from_secs(30), || {
        db.scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'node-c'") == 10.0
    });
    assert!(arrived, "{}", collector.log());
}
