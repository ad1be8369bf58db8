//! Publishing samples over MQTT with nothing lost.
//!
//! rumqttc's `publish()` only queues, and on reconnect it drops what the broker had not
//! acknowledged, so the [`Outbox`] is the source of truth: a sample leaves it only on its
//! PubAck, and after every (re)connect all unacknowledged samples are sent again, oldest
//! first. rumqttc has no reconnect backoff, so failed connections wait with exponential
//! backoff and jitter. The sampling thread only ever hands samples over a channel: it
//! never waits for the network.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use nodewatt_common::backoff::Backoff;
use nodewatt_wire::{sample_topic, status_topic, NodeName, OutboxStats, Sample, Status};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use crate::queue::Outbox;

/// Large enough for a node with many GPUs and processes; rumqttc's default is 10 KiB.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

pub struct PublisherSettings {
    pub options: MqttOptions,
    pub cluster: NodeName,
    pub node: NodeName,
    pub outbox_capacity: usize,
    pub max_in_flight: usize,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Unacknowledged samples are saved here at shutdown and resent after a restart.
    pub state_file: Option<std::path::PathBuf>,
}

/// Samples saved by an earlier run of this agent (same cluster and node), oldest first;
/// the file is removed once read. Lines that are not such samples are skipped and counted.
pub fn load_saved(path: &std::path::Path, cluster: &str, node: &str) -> Vec<Sample> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut skipped = 0;
    let samples: Vec<Sample> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| match Sample::from_json(l.as_bytes()) {
            Ok(s) if s.cluster == cluster && s.node == node => Some(s),
            _ => {
                skipped += 1;
                None
            }
        })
        .collect();
    if skipped > 0 {
        tracing::warn!(file = %path.display(), skipped, "saved samples that are not this node's were dropped");
    }
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(file = %path.display(), "cannot remove the saved outbox: {e}");
    }
    samples
}

/// Writes samples as JSON lines, atomically (a temporary file renamed into place).
pub fn save(path: &std::path::Path, samples: &[&Sample]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    for s in samples {
        writeln!(f, "{}", s.to_json())?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[derive(Debug, Default, Clone, Copy)]
pub struct PublishStats {
    pub acked: u64,
    pub merges: u64,
    pub reconnects: u64,
}

fn status_payload(online: bool, ts_ms: Option<u64>, reason: &str) -> Vec<u8> {
    let s = Status {
        online,
        agent: Some(crate::sampler::AGENT.to_string()),
        ts_ms,
        reason: Some(reason.to_string()),
    };
    serde_json::to_vec(&s).expect("status serialises")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a packet id the client reports next belongs to: a sample, or a status message.
type Awaiting = VecDeque<Option<u64>>;

struct Link {
    client: AsyncClient,
    sample_topic: String,
    status_topic: String,
    outbox: Outbox,
    awaiting: Awaiting,
    connected: bool,
    stats: PublishStats,
}

impl Link {
    /// Hands waiting samples to the client, up to the in-flight limit.
    fn fill(&mut self) {
        if !self.connected {
            return;
        }
        let len = self.outbox.len() as u32;
        let stats = OutboxStats {
            len,
            merges: self.outbox.merges,
            reconnects: self.stats.reconnects,
        };
        while let Some((id, sample)) = self.outbox.take_next() {
            sample.outbox = Some(stats);
            let payload = sample.to_json();
            match self
                .client
                .try_publish(&self.sample_topic, QoS::AtLeastOnce, false, payload)
            {
                Ok(()) => self.awaiting.push_back(Some(id)),
                Err(e) => {
                    // The request channel holds more than the in-flight limit: not expected.
                    tracing::warn!("cannot hand sample to the MQTT client: {e}");
                    self.outbox.release(id);
                    return;
                }
            }
        }
    }

    fn publish_status(&mut self, online: bool, reason: &str) {
        let payload = status_payload(online, Some(now_ms()), reason);
        if self
            .client
            .try_publish(&self.status_topic, QoS::AtLeastOnce, true, payload)
            .is_ok()
        {
            self.awaiting.push_back(None);
        }
    }

    fn lost(&mut self) {
        if self.connected {
            self.stats.reconnects += 1;
        }
        self.connected = false;
        self.outbox.reset_in_flight();
        self.awaiting.clear();
    }
}

/// Publishes samples from `samples` until `shutdown` resolves, or, once `samples` is
/// closed, until every sample has been acknowledged. Then marks the node offline.
pub async fn run(
    settings: PublisherSettings,
    mut samples: UnboundedReceiver<Sample>,
    shutdown: impl Future<Output = ()>,
) -> PublishStats {
    let PublisherSettings {
        mut options,
        cluster,
        node,
        outbox_capacity,
        max_in_flight,
        reconnect_initial,
        reconnect_max,
        state_file,
    } = settings;
    let status = status_topic(&cluster, &node);
    options
        // The outbox re-sends after a reconnect; a broker-side session would only duplicate.
        .set_clean_session(true)
        .set_inflight(max_in_flight.clamp(1, u16::MAX as usize) as u16)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_last_will(LastWill::new(
            &status,
            status_payload(false, None, "connection lost"),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut eventloop) = AsyncClient::new(options, max_in_flight + 8);
    let mut link = Link {
        client,
        sample_topic: sample_topic(&cluster, &node),
        status_topic: status,
        outbox: Outbox::new(outbox_capacity, max_in_flight),
        awaiting: VecDeque::new(),
        connected: false,
        stats: PublishStats::default(),
    };
    if let Some(path) = &state_file {
        let saved = load_saved(path, &cluster, &node);
        if !saved.is_empty() {
            tracing::info!(
                samples = saved.len(),
                "resending samples saved by the previous run"
            );
        }
        for s in saved {
            link.outbox.push(s);
        }
    }
    let mut backoff = Backoff::new(reconnect_initial, reconnect_max);
    let mut retry_at: Option<Instant> = None;
    let mut failures = 0u32;
    let mut samples_open = true;
    tokio::pin!(shutdown);

    loop {
        if !samples_open && link.outbox.is_empty() {
            break;
        }
        let wait_retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            msg = samples.recv(), if samples_open => match msg {
                Some(s) => {
                    link.outbox.push(s);
                    link.fill();
                }
                None => samples_open = false,
            },
            _ = wait_retry => retry_at = None,
            ev = eventloop.poll(), if retry_at.is_none() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if failures > 0 {
                        tracing::info!(queued = link.outbox.len(), "connected to the MQTT broker again");
                    } else {
                        tracing::info!("connected to the MQTT broker");
                    }
                    failures = 0;
                    backoff.reset();
                    link.connected = true;
                    link.publish_status(true, "connected");
                    link.fill();
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(Some(id)) = link.awaiting.pop_front() {
                        link.outbox.assign_pkid(id, pkid);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if link.outbox.ack(ack.pkid) {
                        link.stats.acked += 1;
                    }
                    link.fill();
                }
                Ok(_) => {}
                Err(e) => {
                    link.lost();
                    failures += 1;
                    let delay = backoff.next_delay();
                    // Quiet during long outages: first failure, then at powers of two.
                    if failures.is_power_of_two() {
                        tracing::warn!(
                            failures,
                            queued = link.outbox.len(),
                            "MQTT connection failed: {e}; retrying in {} ms",
                            delay.as_millis()
                        );
                    }
                    retry_at = Some(Instant::now() + delay);
                }
            },
        }
    }

    if link.connected {
        link.publish_status(false, "stopped");
        let _ = link.client.try_disconnect();
        // Let the event loop write the status and the disconnect.
        let flush = async {
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
    }
    if let Some(path) = state_file.filter(|_| !link.outbox.is_empty()) {
        let samples = link.outbox.samples();
        match save(&path, &samples) {
            Ok(()) => {
                tracing::info!(samples = samples.len(), file = %path.display(), "saved unacknowledged samples")
            }
            Err(e) => {
                tracing::error!(file = %path.display(), "cannot save {} unacknowledged samples: {e}", samples.len())
            }
        }
    }
    link.stats.merges = link.outbox.merges;
    link.stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;

    fn sample(node: &str, seq: u64) -> Sample {
        let mut s = Sample::new("a", n("c"), n(node), 1000, 0);
        s.seq = seq;
        s.ts_ms = 1_000 + seq;
        s
    }

    #[test]
    fn saved_samples_come_back_once_and_only_for_this_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let (a, b, other) = (sample("n1", 0), sample("n1", 1), sample("n2", 2));
        save(&path, &[&a, &b, &other]).unwrap();
        std::fs::write(
            &path,
            std::fs::read_to_string(&path).unwrap() + "not json\n",
        )
        .unwrap();
        let back = load_saved(&path, "c", "n1");
        assert_eq!(back, vec![a, b]);
        assert!(!path.exists(), "read once");
        assert!(load_saved(&path, "c", "n1").is_empty());
    }
}
