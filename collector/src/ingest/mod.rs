//! The collector's pipeline: MQTT messages in, validated and encoded into batches, written
//! to InfluxDB, and only then acknowledged, in order.
//!
//! At-least-once from broker to database: the MQTT session is persistent (clean session
//! off, stable client id), acks are manual and sent only after the batch holding the
//! message was accepted. If the collector dies, the broker redelivers what was not
//! acknowledged; a message written twice overwrites itself (same series and timestamp).
//! The ordering rules live in [`pipeline`], a state machine without I/O; `serve` only
//! moves bytes between it, the broker and InfluxDB.

pub mod pipeline;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nodewatt_common::backoff::{Backoff, Retry};
use nodewatt_common::{now_ms, sleep_until};
use nodewatt_wire::TOPIC_ROOT;
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS, SubscribeFilter};
use tokio::time::Instant;

use crate::billing::rollup;
use crate::config::{CollectorConfig, Config};
use crate::influx::{Influx, WriteError};
use crate::lineproto::encode_status;
use crate::stats::Stats;
use crate::validate::{Admitted, Gate, Reason};
use pipeline::{Action, Outcome, Pipeline, Report};

/// The largest packet MQTT can carry (remaining length 268,435,455 plus header). The
/// collector accepts anything the broker delivers and rejects oversized payloads itself
/// (counted, acknowledged): a packet over the client's own limit would drop the
/// connection, and the broker would redeliver it on every reconnect, forever.
const MQTT_MAX_PACKET: usize = 268_435_460;

/// How long the start waits for InfluxDB to create the database.
const STARTUP_DB_WAIT: Duration = Duration::from_secs(3);

/// How long a stop may take: the write in flight and one more try per held batch.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Logs a rejected message at most once per reason per 10 s, with the count in between.
struct RejectLog {
    last: [Option<Instant>; Reason::ALL.len()],
    suppressed: [u64; Reason::ALL.len()],
}

impl RejectLog {
    fn new() -> Self {
        RejectLog {
            last: [None; Reason::ALL.len()],
            suppressed: [0; Reason::ALL.len()],
        }
    }
    fn log(&mut self, reason: Reason, topic: &str, detail: &str) {
        let i = reason as usize;
        let due = self.last[i].is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            tracing::warn!(
                reason = reason.as_str(),
                topic,
                suppressed = self.suppressed[i],
                "message rejected: {detail}"
            );
            self.last[i] = Some(Instant::now());
            self.suppressed[i] = 0;
        } else {
            self.suppressed[i] += 1;
        }
    }
}

pub fn subscriptions(share_group: Option<&str>) -> Vec<String> {
    let prefix = share_group.map_or(String::new(), |g| format!("$share/{g}/"));
    ["sample", "status"]
        .iter()
        .map(|k| format!("{prefix}{TOPIC_ROOT}/+/+/{k}"))
        .collect()
}

/// Writes a batch; where InfluxDB refuses it (400: a line it will not take; 413: too
/// large), halves it until the refused lines are alone, counts and drops only those, and
/// writes the rest. Rewriting lines InfluxDB already took (a 1.x partial write) is
/// harmless: same series and time overwrite. A failure worth retrying is returned.
///
/// Before each request, `hours` (those its `usage` points end in) are marked as written
/// into, in a request of its own that must succeed first: a rollup read before this
/// write can then never pass for complete (`billing::rollup`).
async fn write_splitting(influx: Arc<Influx>, body: Bytes, hours: Vec<u64>) -> Outcome {
    let mut refused = 0;
    let mut todo: Vec<&[u8]> = vec![&body];
    let mut marks = Vec::new();
    while let Some(part) = todo.pop() {
        if !hours.is_empty() {
            marks.clear();
            let now = now_ms();
            for h in &hours {
                rollup::written_line(&mut marks, *h, now);
            }
            match influx.write(&marks).await {
                Ok(()) => {}
                // Marks are at their hour's end, after every point of it: usage in an
                // hour past the retention policy is dropped too.
                Err(WriteError::Refused { message }) if beyond_retention(&message) => {}
                Err(e) => return Outcome::Failed(format!("marking hours written into: {e}")),
            }
        }
        match influx.write(part).await {
            Ok(()) => {}
            Err(WriteError::Refused { message, .. }) => {
                let lines = part
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .count();
                if lines <= 1 {
                    refused += 1;
                    let shown = String::from_utf8_lossy(&part[..part.len().min(300)]);
                    tracing::error!("InfluxDB refused a point, dropped: {message}; line: {shown}");
                    continue;
                }
                let (a, b) = split_lines(part);
                todo.push(b);
                todo.push(a);
            }
            Err(WriteError::Retry(e)) => return Outcome::Failed(e),
        }
    }
    Outcome::Written { refused }
}

/// InfluxDB 1.x's answer to points older than the retention policy keeps (the others
/// of the request are written).
fn beyond_retention(message: &str) -> bool {
    message.contains("points beyond retention policy")
}

/// Splits line protocol near its middle, at a line end.
fn split_lines(body: &[u8]) -> (&[u8], &[u8]) {
    let mid = body.len() / 2;
    let cut = body[mid..]
        .iter()
        .position(|b| *b == b'\n')
        .map(|i| mid + i + 1)
        .filter(|c| *c < body.len())
        .or_else(|| body[..mid].iter().rposition(|b| *b == b'\n').map(|i| i + 1))
        .unwrap_or(body.len());
    body.split_at(cut)
}

type Write = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// How often `serve` looks for hours to roll up, how far back, and how many at most per
/// look (a backlog is caught up over the next looks, never in one long burst).
const ROLLUP_EVERY: Duration = Duration::from_secs(60);
const ROLLUP_LOOKBACK_MS: u64 = 400 * 86_400_000;
const ROLLUP_MAX_HOURS: usize = 60;

/// Keeps the hourly rollups of `usage` current: the hours written into and quiet for
/// `billing.rollup_settle` are rolled up, oldest first. Bills never depend on it: an hour
/// without a usable rollup is read from `usage` itself.
async fn keep_rollups(cfg: Config) {
    let mut icfg = cfg.influxdb.clone();
    icfg.timeout = cfg.billing.query_timeout;
    let influx = match Influx::new(&icfg) {
        Ok(i) => i,
        Err(e) => return tracing::warn!("rollups off: {e}"),
    };
    let settle = cfg.rollup_settle().as_millis() as u64;
    let mut every = tokio::time::interval(ROLLUP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        every.tick().await;
        let due = match rollup::due_hours(&influx, now_ms(), ROLLUP_LOOKBACK_MS, settle).await {
            Ok(due) => due,
            Err(e) => {
                if !failing {
                    tracing::warn!("usage rollup failed: {e}; trying again each minute");
                }
                failing = true;
                continue;
            }
        };
        let now = &due[..due.len().min(ROLLUP_MAX_HOURS)];
        let r = rollup::roll_hours(&influx, now).await;
        let (hours, points, left) = (r.done.hours, r.done.points, due.len() - now.len());
        if hours > 0 {
            tracing::info!(hours, points, left, "rolled up usage");
        }
        if let Some(e) = r.failed.first().filter(|_| !failing) {
            // Those hours stay due and are read from `usage` until a rollup succeeds.
            tracing::warn!(
                runs = r.failed.len(),
                "usage rollup failed: {e}; trying again each minute"
            );
        }
        failing = !r.failed.is_empty();
    }
}

/// Runs until `shutdown` resolves; then writes what it holds and acknowledges it, within
/// [`STOP_TIMEOUT`].
pub async fn serve(
    cfg: Config,
    me: CollectorConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let influx = Arc::new(Influx::new(&cfg.influxdb)?);
    let mqtt = cfg.mqtt.clone().unwrap_or_default();
    let mut options = mqtt.options(&format!("nodewatt-collector-{}", me.id))?;
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MQTT_MAX_PACKET, 64 * 1024);
    // Acks must never wait on a full request channel.
    let (client, eventloop) = AsyncClient::new(options, cfg.batch.max_pending_messages + 1024);
    let mut conn = nodewatt_common::connection::Connection::new(eventloop);
    let peer = nodewatt_common::connection::Peer::of(&mqtt, None);

    // Bounded: an InfluxDB that accepts connections and never answers must not hold up
    // reading from the broker (writes create the database later if it is missing).
    match tokio::time::timeout(STARTUP_DB_WAIT, influx.ensure_database()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!("cannot create the InfluxDB database yet: {e}; writes will retry")
        }
        Err(_) => tracing::warn!(
            "InfluxDB did not answer within {} s; writes will retry",
            STARTUP_DB_WAIT.as_secs()
        ),
    }

    let mut stats = Stats::default();
    let mut pipeline = Pipeline::new(cfg.batch.clone());
    let mut actions = Vec::new();
    let mut write: Option<Write> = None;
    let mut gate = Gate::new(&cfg.validation);
    let topics = subscriptions(me.share_group.as_deref());
    let mut rejects = RejectLog::new();
    let mut mqtt_retry = Retry::new(Backoff::new(mqtt.reconnect_initial, mqtt.reconnect_max));
    let mut stop_by: Option<Instant> = None;
    let rollups = cfg
        .billing
        .rollups
        .then(|| tokio::spawn(keep_rollups(cfg.clone())));
    let mut health = tokio::time::interval(me.health_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    loop {
        for action in actions.drain(..) {
            match action {
                Action::Write(body, hours) => {
                    write = Some(Box::pin(write_splitting(influx.clone(), body, hours)))
                }
                Action::Ack(pkid) => {
                    let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
                    p.pkid = pkid;
                    if let Err(e) = client.try_ack(&p) {
                        tracing::warn!(
                            "cannot acknowledge a message: {e}; the broker will redeliver it"
                        );
                    }
                }
            }
        }
        if pipeline.done() {
            break;
        }
        let deadline = pipeline.deadline().map(Instant::from_std);
        let reconnect_at = mqtt_retry.waiting_until().map(Instant::from_std);
        // While stopping, the event loop only carries the last acks out; new messages
        // are left to the broker.
        let read = reconnect_at.is_none() && (stop_by.is_some() || !pipeline.paused());
        tokio::select! {
            biased;
            _ = &mut shutdown, if stop_by.is_none() => {
                stop_by = Some(Instant::now() + STOP_TIMEOUT);
                pipeline.stop(std::time::Instant::now(), &mut actions);
            }
            _ = sleep_until(stop_by), if stop_by.is_some() => {
                tracing::warn!(unacknowledged = pipeline.pending(), "stop timed out; the broker keeps what was not acknowledged");
                break;
            }
            outcome = async { write.as_mut().expect("guarded").await }, if write.is_some() => {
                write = None;
                match pipeline.written(outcome, std::time::Instant::now(), &mut actions) {
                    Report::Quiet => {}
                    Report::Failed { failed, error } => tracing::warn!(
                        failures = failed.failures,
                        pending = pipeline.pending(),
                        "InfluxDB write failed: {error}; retrying in {} ms (messages stay unacknowledged)",
                        failed.delay.as_millis()
                    ),
                    Report::Recovered { failures } => {
                        tracing::info!(failures, "InfluxDB accepts writes again")
                    }
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                pipeline.tick(std::time::Instant::now(), &mut actions);
            }
            _ = health.tick(), if stop_by.is_none() => {
                let mut point = Vec::new();
                stats.encode(&pipeline.stats, pipeline.pending(), &me.id, now_ms(), &mut point);
                pipeline.add(&point, 1, None, std::time::Instant::now(), &mut actions);
                tracing::info!(
                    messages = stats.messages_in,
                    rejected = stats.rejected_total(),
                    points = pipeline.stats.points_written,
                    pending = pipeline.pending(),
                    write_errors = pipeline.stats.write_errors,
                    "health"
                );
            }
            _ = sleep_until(reconnect_at), if reconnect_at.is_some() => {
                mqtt_retry.ready(std::time::Instant::now());
            }
            ev = conn.poll(), if read => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    pipeline.connected();
                    stats.connected = true;
                    tracing::info!(session_present = ack.session_present, "connected to the MQTT broker: {peer}");
                    mqtt_retry.succeeded();
                    let filters = topics.iter().map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                    if let Err(e) = client.try_subscribe_many(filters) {
                        tracing::error!("cannot subscribe to {topics:?}: {e}");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => tracing::info!(?topics, "subscribed"),
                Ok(Event::Incoming(Packet::Publish(p))) if stop_by.is_none() => {
                    receive(&mut gate, &mut stats, &mut rejects, &p, &mut |lines, points, hour| {
                        let pkid = (p.qos != QoS::AtMostOnce).then_some(p.pkid);
                        if let Some(h) = hour {
                            pipeline.usage_hour(h);
                        }
                        pipeline.add(lines, points, pkid, std::time::Instant::now(), &mut actions);
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    // Events read before the failure belong to the old connection; the
                    // broker redelivers the messages among them.
                    if let Some(el) = conn.eventloop() {
                        el.state.events.clear();
                    }
                    stats.connected = false;
                    if stop_by.is_some() {
                        break;
                    }
                    let f = mqtt_retry.failed(std::time::Instant::now());
                    if f.log {
                        tracing::warn!(failures = f.failures, "{}; retrying in {} ms", peer.explain(&e), f.delay.as_millis());
                    }
                }
            },
        }
    }

    if let Some(r) = rollups {
        r.abort();
    }
    // Carry the last acks out before the disconnect, which follows them in the queue.
    conn.logout(&client, Duration::from_secs(1)).await;
    tracing::info!(
        messages = stats.messages_in,
        points = pipeline.stats.points_written,
        unacknowledged = pipeline.pending(),
        "stopped"
    );
    Ok(())
}

/// Where [`receive`] hands a message's lines: the lines, their point count, and the hour
/// its `usage` points fall in.
type AddLines<'a> = dyn FnMut(&[u8], usize, Option<u64>) + 'a;

/// Validates one message and hands its lines (none if rejected) to `add`, with the hour
/// its `usage` points end in: rejected messages are acknowledged in order too, so a bad
/// message is not redelivered forever.
fn receive(
    gate: &mut Gate,
    stats: &mut Stats,
    rejects: &mut RejectLog,
    p: &Publish,
    add: &mut AddLines,
) {
    let now = now_ms();
    match gate.admit(&p.topic, &p.payload, now) {
        Ok(Admitted::Sample { points, sample }) => {
            stats.messages_in += 1;
            let hour = (!sample.usage.is_empty()).then(|| rollup::hour_of(sample.ts_ms));
            add(gate.lines(), points, hour);
        }
        Ok(Admitted::Status {
            cluster,
            node,
            status,
        }) => {
            stats.status_in += 1;
            let mut lines = Vec::new();
            let points = encode_status(&cluster, &node, &status, now, &mut lines);
            add(&lines, points, None);
        }
        Err(r) => {
            stats.messages_in += 1;
            stats.reject(r.reason);
            rejects.log(r.reason, &p.topic, &r.detail);
            add(&[], 0, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_at_line_ends_until_one_line_is_left() {
        let body = b"a 1\nbb 2\nccc 3\n";
        let (x, y) = split_lines(body);
        assert_eq!((x, y), (&b"a 1\nbb 2\n"[..], &b"ccc 3\n"[..]));
        let (x, y) = split_lines(x);
        assert_eq!((x, y), (&b"a 1\n"[..], &b"bb 2\n"[..]));
        // Halving always makes progress: both parts are non-empty while lines remain.
        let body = b"one-long-line 1\nx 2\n";
        let (x, y) = split_lines(body);
        assert!(!x.is_empty() && !y.is_empty(), "{x:?} {y:?}");
    }

    #[test]
    fn subscription_topics() {
        assert_eq!(
            subscriptions(None),
            ["nodewatt/v1/+/+/sample", "nodewatt/v1/+/+/status"]
        );
        assert_eq!(
            subscriptions(Some("g1")),
            [
                "$share/g1/nodewatt/v1/+/+/sample",
                "$share/g1/nodewatt/v1/+/+/status"
            ]
        );
    }
}
