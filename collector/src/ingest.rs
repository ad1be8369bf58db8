//! The collector's pipeline: MQTT messages in, validated and encoded into batches, written
//! to InfluxDB, and only then acknowledged, in order.
//!
//! At-least-once from broker to database: the MQTT session is persistent (clean session
//! off, stable client id), acks are manual and sent only after the batch holding the
//! message was accepted. If the collector dies, the broker redelivers what was not
//! acknowledged; a message written twice overwrites itself (same series and timestamp).
//! Acks from before a reconnect are not sent on the new connection: the broker redelivers
//! those messages, which costs a rewrite, never a loss.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use nodewatt_common::backoff::Backoff;
use nodewatt_wire::TOPIC_ROOT;
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use crate::config::{BatchConfig, Config};
use crate::influx::{Influx, WriteError};
use crate::lineproto::encode_status;
use crate::stats::Stats;
use crate::validate::{Admitted, Gate, Reason};

/// The largest packet MQTT can carry (remaining length 268,435,455 plus header). The
/// collector accepts anything the broker delivers and rejects oversized payloads itself
/// (counted, acknowledged): a packet over the client's own limit would drop the
/// connection, and the broker would redeliver it on every reconnect, forever.
const MQTT_MAX_PACKET: usize = 268_435_460;

/// Line protocol plus the messages it came from, acknowledged once it is written.
#[derive(Default)]
struct Batch {
    body: Vec<u8>,
    points: usize,
    /// (connection generation, packet id) of each message, in arrival order.
    acks: Vec<(u64, u16)>,
    started: Option<Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.body.is_empty() && self.acks.is_empty()
    }
    fn is_full(&self, cfg: &BatchConfig) -> bool {
        self.points >= cfg.max_points || self.body.len() >= cfg.max_bytes
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

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

fn subscriptions(share_group: Option<&str>) -> Vec<String> {
    let prefix = share_group.map_or(String::new(), |g| format!("$share/{g}/"));
    ["sample", "status"]
        .iter()
        .map(|k| format!("{prefix}{TOPIC_ROOT}/+/+/{k}"))
        .collect()
}

/// Writes batches in order, retrying until InfluxDB accepts each, then acknowledges its
/// messages in order.
// The shared handles go away when batching and acks become a state machine without I/O.
#[allow(clippy::too_many_arguments)]
async fn writer(
    influx: Arc<Influx>,
    mut batches: mpsc::Receiver<Batch>,
    client: AsyncClient,
    generation: Arc<AtomicU64>,
    stats: Arc<Stats>,
    drained: Arc<Notify>,
    cfg: BatchConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(cfg.retry_initial, cfg.retry_max);
    let mut failures = 0u32;
    while let Some(batch) = batches.recv().await {
        if !batch.body.is_empty() {
            loop {
                let started = Instant::now();
                match write_splitting(&influx, &batch.body, &stats).await {
                    Ok(()) => {
                        if failures > 0 {
                            tracing::info!(failures, "InfluxDB accepts writes again");
                        }
                        failures = 0;
                        backoff.reset();
                        stats.points_written.fetch_add(batch.points as u64, Relaxed);
                        stats.batches_written.fetch_add(1, Relaxed);
                        stats
                            .last_write_ms
                            .store(started.elapsed().as_millis() as u64, Relaxed);
                        stats.last_batch_points.store(batch.points as u64, Relaxed);
                        break;
                    }
                    Err(e) => {
                        failures += 1;
                        stats.write_errors.fetch_add(1, Relaxed);
                        let delay = backoff.next_delay();
                        if failures.is_power_of_two() {
                            tracing::warn!(
                                failures,
                                pending = stats.pending.load(Relaxed),
                                "InfluxDB write failed: {e}; retrying in {} ms (messages stay unacknowledged)",
                                delay.as_millis()
                            );
                        }
                        // At shutdown the messages stay unacknowledged: the broker keeps
                        // them for the next start. Nothing waits on a dead InfluxDB.
                        if *stop.borrow() {
                            return;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
        }
        let current = generation.load(Relaxed);
        stats.pending.fetch_sub(batch.acks.len() as u64, Relaxed);
        drained.notify_one();
        for (gen, pkid) in batch.acks {
            if gen == current {
                let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                if client.ack(&p).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes a batch; where InfluxDB refuses it (400: a line it will not take; 413: too
/// large), halves it until the refused lines are alone, counts and drops only those, and
/// writes the rest. Rewriting lines InfluxDB already took (a 1.x partial write) is
/// harmless: same series and time overwrite. A failure worth retrying is returned.
async fn write_splitting(influx: &Influx, body: &[u8], stats: &Stats) -> Result<(), String> {
    let mut todo: Vec<&[u8]> = vec![body];
    while let Some(part) = todo.pop() {
        match influx.write(part).await {
            Ok(()) => {}
            Err(WriteError::Refused { message, .. }) => {
                let lines = part
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .count();
                if lines <= 1 {
                    stats.points_refused.fetch_add(1, Relaxed);
                    let shown = String::from_utf8_lossy(&part[..part.len().min(300)]);
                    tracing::error!("InfluxDB refused a point, dropped: {message}; line: {shown}");
                    continue;
                }
                let (a, b) = split_lines(part);
                todo.push(b);
                todo.push(a);
            }
            Err(WriteError::Retry(e)) => return Err(e),
        }
    }
    Ok(())
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

/// Runs until `shutdown` resolves; then writes what it holds and acknowledges it.
pub async fn serve(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let influx = Arc::new(Influx::new(&cfg.influxdb)?);
    let mqtt = cfg.mqtt.clone().unwrap_or_default();
    let mut options = mqtt.options(&format!("nodewatt-collector-{}", cfg.collector.id))?;
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MQTT_MAX_PACKET, 64 * 1024);
    // Acks must never wait on a full request channel.
    let (client, mut eventloop) = AsyncClient::new(options, cfg.batch.max_pending_messages + 1024);

    match influx.ensure_database().await {
        Ok(()) => {}
        Err(e) => tracing::warn!("cannot create the InfluxDB database yet: {e}; writes will retry"),
    }

    let stats = Arc::new(Stats::default());
    let generation = Arc::new(AtomicU64::new(0));
    let drained = Arc::new(Notify::new());
    let (tx, rx) = mpsc::channel::<Batch>(2);
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer_task = tokio::spawn(writer(
        influx,
        rx,
        client.clone(),
        generation.clone(),
        stats.clone(),
        drained.clone(),
        cfg.batch.clone(),
        stop_rx,
    ));

    let mut gate = Gate::new(&cfg.validation);
    let topics = subscriptions(cfg.collector.share_group.as_deref());
    let mut batch = Batch::default();
    let mut rejects = RejectLog::new();
    let mut backoff = Backoff::new(mqtt.reconnect_initial, mqtt.reconnect_max);
    let mut retry_at: Option<Instant> = None;
    let mut failures = 0u32;
    let mut health = tokio::time::interval(cfg.collector.health_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    loop {
        let paused = stats.pending.load(Relaxed) >= cfg.batch.max_pending_messages as u64;
        let due = !batch.is_empty()
            && (batch.is_full(&cfg.batch)
                || batch
                    .started
                    .is_some_and(|t| t.elapsed() >= cfg.batch.flush_interval));
        let flush_at = batch.started.map(|t| t + cfg.batch.flush_interval);
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            permit = tx.reserve(), if due => {
                if let Ok(permit) = permit {
                    permit.send(std::mem::take(&mut batch));
                }
            }
            _ = drained.notified(), if paused => {}
            _ = health.tick() => {
                let now = now_ms();
                stats.encode(&cfg.collector.id, now, &mut batch.body);
                batch.points += 1;
                batch.started.get_or_insert_with(Instant::now);
                tracing::info!(
                    messages = stats.messages_in.load(Relaxed),
                    rejected = stats.rejected_total(),
                    points = stats.points_written.load(Relaxed),
                    pending = stats.pending.load(Relaxed),
                    write_errors = stats.write_errors.load(Relaxed),
                    "health"
                );
            }
            _ = async { tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)).await }, if flush_at.is_some() && !due => {}
            _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)).await }, if retry_at.is_some() => {
                retry_at = None;
            }
            ev = eventloop.poll(), if retry_at.is_none() && !paused => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    generation.fetch_add(1, Relaxed);
                    stats.connected.store(true, Relaxed);
                    tracing::info!(session_present = ack.session_present, "connected to the MQTT broker");
                    failures = 0;
                    backoff.reset();
                    let filters = topics.iter().map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                    if let Err(e) = client.try_subscribe_many(filters) {
                        tracing::error!("cannot subscribe to {topics:?}: {e}");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => tracing::info!(?topics, "subscribed"),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = now_ms();
                    match gate.admit(&p.topic, &p.payload, now) {
                        Ok(Admitted::Sample { points, .. }) => {
                            stats.messages_in.fetch_add(1, Relaxed);
                            batch.body.extend_from_slice(gate.lines());
                            batch.points += points;
                        }
                        Ok(Admitted::Status { cluster, node, status }) => {
                            stats.status_in.fetch_add(1, Relaxed);
                            batch.points += encode_status(&cluster, &node, &status, now, &mut batch.body);
                        }
                        Err(r) => {
                            stats.messages_in.fetch_add(1, Relaxed);
                            stats.reject(r.reason);
                            rejects.log(r.reason, &p.topic, &r.detail);
                        }
                    }
                    // Rejected messages are acknowledged too, in order, so a bad message
                    // is not redelivered forever.
                    if p.qos != QoS::AtMostOnce {
                        batch.acks.push((generation.load(Relaxed), p.pkid));
                        stats.pending.fetch_add(1, Relaxed);
                    }
                    batch.started.get_or_insert_with(Instant::now);
                }
                Ok(_) => {}
                Err(e) => {
                    stats.connected.store(false, Relaxed);
                    failures += 1;
                    let delay = backoff.next_delay();
                    if failures.is_power_of_two() {
                        tracing::warn!(failures, "MQTT connection failed: {e}; retrying in {} ms", delay.as_millis());
                    }
                    retry_at = Some(Instant::now() + delay);
                }
            },
        }
    }

    // Hand over what we hold, let the writer finish (one attempt per batch: it retries
    // nothing once stopped), then leave. Every wait is bounded.
    let _ = stop_tx.send(true);
    if !batch.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(batch)).await;
    }
    drop(tx);
    let finish = async {
        // Keep the event loop moving so the final acks reach the broker.
        while !writer_task.is_finished() {
            tokio::select! {
                ev = eventloop.poll() => if ev.is_err() { break },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), finish).await;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    tracing::info!(
        messages = stats.messages_in.load(Relaxed),
        points = stats.points_written.load(Relaxed),
        "stopped"
    );
    Ok(())
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
