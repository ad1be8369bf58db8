//! `nodewatt-collector check`: a preflight of what `serve` and the bills need, each
//! finding on one line, so a sysadmin sees every problem at once rather than the first.

use std::time::Duration;

use nodewatt_common::connection::{login, Peer};
use nodewatt_common::mqtt::MqttConfig;
use rumqttc::{Event, Packet, QoS, SubscribeFilter, SubscribeReasonCode};

use crate::influx::Influx;
use crate::influxql::ident;
use reqwest::StatusCode;

/// One finding: what was checked, and either what is wrong or what was found.
pub struct Finding {
    pub name: &'static str,
    pub result: Result<String, String>,
}

impl Finding {
    fn new(name: &'static str, result: Result<String, String>) -> Finding {
        Finding { name, result }
    }
}

/// The rows of an answer's first series.
fn values(v: &serde_json::Value) -> impl Iterator<Item = &Vec<serde_json::Value>> {
    v["results"][0]["series"][0]["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|row| row.as_array())
}

/// InfluxDB: reachable, the database there (or created by `serve`), writes and queries
/// allowed, and how old the newest stored sample is.
pub async fn influx(influx: &Influx, now_ms: u64) -> Vec<Finding> {
    let (database, create) = (influx.database(), influx.creates_database());
    let mut out = Vec::new();
    match influx.ping().await {
        Ok(v) => out.push(Finding::new("influxdb", Ok(format!("{v} answered")))),
        Err(e) => {
            out.push(Finding::new("influxdb", Err(e)));
            return out;
        }
    }
    // A user sees only the databases it has rights on, so an empty write (which checks
    // the database first, then the right) says what the list cannot.
    let listed = influx
        .query("SHOW DATABASES")
        .await
        .map(|v| values(&v).any(|row| row[0].as_str() == Some(database)));
    let write = influx.probe_write().await;
    let missing = matches!(&write, Err((Some(StatusCode::NOT_FOUND), _)));
    let write = write.map_err(|(_, e)| e);
    let grant = match influx.user() {
        Some(u) => format!("GRANT ALL ON {} TO {}", ident(database), ident(u)),
        None => "set [influxdb] username and password_file".into(),
    };
    let there = matches!(listed, Ok(true)) || write.is_ok();
    let found = if there {
        Ok(format!("{database} exists"))
    } else if missing && create {
        // CREATE DATABASE needs an admin; only admins may list users.
        match influx.query("SHOW USERS").await {
            Ok(_) => Ok(format!(
                "{database} does not exist yet; serve creates it (influxdb.create_database)"
            )),
            Err(e) => Err(format!(
                "{database} does not exist, and serve cannot create it: its user is no admin ({e}); create it as an admin (CREATE DATABASE {}), then {grant}", ident(database)
            )),
        }
    } else if missing {
        Err(format!(
            "{database} does not exist and influxdb.create_database = false: create it, or set it true"
        ))
    } else {
        let why = write.as_ref().err().cloned().unwrap_or_default();
        Err(format!(
            "{database} is not listed to this user and writes are refused ({why}): {grant}"
        ))
    };
    out.push(Finding::new("database", found));
    if there {
        out.push(Finding::new(
            "write",
            write.map(|()| format!("writes to {database} are allowed")),
        ));
        let newest = influx
            .query("SELECT LAST(\"seq\") FROM \"agent\"")
            .await
            .map(|v| values(&v).find_map(|row| row[0].as_u64()));
        out.push(Finding::new(
            "read",
            match newest {
                Ok(Some(ts)) => Ok(format!(
                    "queries allowed; newest sample stored {} ago",
                    humantime::format_duration(Duration::from_secs(
                        now_ms.saturating_sub(ts) / 1000
                    ))
                )),
                Ok(None) => Ok("queries allowed; no sample stored yet".into()),
                Err(e) => Err(e),
            },
        ));
    }
    out
}

/// The broker: reachable, the login accepted, and every topic `serve` subscribes to
/// allowed. A probe with its own client id and a clean session, subscribed without the
/// shared group: it takes over no collector's session and takes no message from one.
pub async fn broker(mqtt: &MqttConfig, client_id: &str, topics: &[String]) -> Finding {
    let peer = Peer::of(mqtt, None);
    let result = async {
        let mut options = mqtt.options(client_id).map_err(|e| e.to_string())?;
        options.set_client_id(client_id.to_string());
        options.set_clean_session(true);
        let (client, mut eventloop) = login(options, &peer, Duration::from_secs(10)).await?;
        let filters = topics
            .iter()
            .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        client
            .try_subscribe_many(filters)
            .map_err(|e| e.to_string())?;
        let suback = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => return Ok(ack.return_codes),
                    Ok(_) => {}
                    Err(e) => return Err(peer.explain(&e)),
                }
            }
        };
        let codes = tokio::time::timeout(Duration::from_secs(10), suback)
            .await
            .unwrap_or_else(|_| Err(format!("MQTT broker {peer}: no SUBACK within 10 s")));
        eventloop.logout(&client, Duration::from_secs(2)).await;
        let refused: Vec<&String> = topics
            .iter()
            .zip(&codes?)
            .filter(|(_, c)| matches!(c, SubscribeReasonCode::Failure))
            .map(|(t, _)| t)
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(format!(
            "MQTT broker {peer} refused the subscription to {refused:?}: the broker must let this user read nodewatt/v1/#"
        ))
    }
    .await;
    let user = match &mqtt.username {
        Some(u) => format!("as user {u}"),
        None => "without a user name".into(),
    };
    Finding::new(
        "broker",
        result.map(|()| format!("{peer} accepted the login {user} and the subscriptions")),
    )
}
