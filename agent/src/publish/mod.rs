//! Publishing samples over MQTT with nothing lost.
//!
//! rumqttc's `publish()` only queues, and on reconnect it drops what the broker had not
//! acknowledged, so the [`Outbox`] is the source of truth: a sample leaves it only on its
//! PubAck, and after every (re)connect all unacknowledged samples are sent again, oldest
//! first. Which PubAck frees which sample is decided by [`link::Link`], a state machine
//! without I/O; [`run`] only moves messages between it, the sampler and rumqttc, and
//! retries failed connections with backoff and jitter (rumqttc has none). The sampling
//! thread only ever hands samples over a channel: it never waits for the network.

pub mod fit;
pub mod link;
pub mod outbox;
mod saved;
pub mod spool;
pub mod spooler;

use std::future::Future;
use std::time::Duration;

use nodewatt_common::backoff::{Backoff, Retry};
use nodewatt_common::connection::{Connection, Peer};
use nodewatt_common::{now_ms, sleep_until};
use nodewatt_wire::{sample_topic, status_topic, NodeName, Sample};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

pub use link::PublishStats;
use link::{status_payload, Link, Send, Tag};
use outbox::Outbox;
pub use saved::{load_saved, save};
pub use spooler::{Recovered, Spooler};

/// A sample from the sampler, with the sampler's state after it (JSON) when the state is
/// kept across restarts: spooled in one record, so a crash cannot leave one without the
/// other.
pub struct Sampled {
    pub sample: Sample,
    pub state: Option<Vec<u8>>,
}

/// Large enough for a node with many GPUs and processes; rumqttc's default is 10 KiB.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;
/// A sample's JSON at most: the packet less its header and topic (`fit` keeps to it).
pub const MAX_MESSAGE_BYTES: usize = MAX_PACKET_BYTES - 1024;

pub struct PublisherSettings {
    pub options: MqttOptions,
    /// The broker, for messages.
    pub peer: Peer,
    pub cluster: NodeName,
    pub node: NodeName,
    pub outbox_capacity: usize,
    pub max_in_flight: usize,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Unacknowledged samples are saved here at shutdown and resent after a restart.
    pub state_file: Option<std::path::PathBuf>,
    /// The opened spool and the samples it held at start, oldest first.
    pub spool: Option<(Spooler, Vec<Recovered>)>,
}

/// Hands messages to the client in order; if it refuses one (its queue is full: not
/// expected, it holds more than the in-flight limit), that one and the rest wait.
fn hand_over(client: &AsyncClient, topics: &Topics, link: &mut Link, sends: &mut Vec<Send>) {
    let mut refused = false;
    for send in sends.drain(..) {
        if !refused {
            let topic = match send.tag {
                Tag::Sample(_) => &topics.sample,
                Tag::Status => &topics.status,
            };
            match client.try_publish(topic, QoS::AtLeastOnce, send.retain(), send.payload) {
                Ok(()) => continue,
                Err(e) => {
                    tracing::warn!("cannot hand a message to the MQTT client: {e}");
                    refused = true;
                }
            }
        }
        link.refused(send.tag);
    }
}

struct Topics {
    sample: String,
    status: String,
}

/// Feeds one event from rumqttc to the link.
fn on_event(link: &mut Link, ev: &Event, sends: &mut Vec<Send>) {
    match ev {
        Event::Outgoing(Outgoing::Publish(pkid)) => link.written(*pkid),
        Event::Incoming(Packet::PubAck(ack)) => link.acked(ack.pkid, sends),
        _ => {}
    }
}

/// How long a stop waits for the sampler's last sample and its delivery.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Publishes samples from `samples` until, once `samples` is closed, every sample has been
/// acknowledged. When `shutdown` resolves it goes on until `samples` closes (the sampler
/// sends its last sample) and delivers what it can, for at most [`STOP_GRACE`]. Then it
/// marks the node offline (at most 2 s) and saves what is unacknowledged.
pub async fn run(
    settings: PublisherSettings,
    mut samples: UnboundedReceiver<Sampled>,
    shutdown: impl Future<Output = ()>,
) -> PublishStats {
    let PublisherSettings {
        mut options,
        peer,
        cluster,
        node,
        outbox_capacity,
        max_in_flight,
        reconnect_initial,
        reconnect_max,
        state_file,
        spool,
    } = settings;
    let topics = Topics {
        sample: sample_topic(&cluster, &node),
        status: status_topic(&cluster, &node),
    };
    options
        // The outbox re-sends after a reconnect; a broker-side session would only duplicate.
        .set_clean_session(true)
        .set_inflight(max_in_flight.clamp(1, u16::MAX as usize) as u16)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_last_will(LastWill::new(
            &topics.status,
            status_payload(false, None, "connection lost"),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, eventloop) = AsyncClient::new(options, max_in_flight + 8);
    let mut conn = Connection::new(eventloop);
    let mut link = Link::new(Outbox::new(outbox_capacity, max_in_flight));
    let mut sends = Vec::new();
    if let Some(path) = &state_file {
        let saved = load_saved(path, &cluster, &node);
        if !saved.is_empty() {
            tracing::info!(
                samples = saved.len(),
                "resending samples saved by the previous run"
            );
        }
        for s in saved {
            link.sample(s, &mut sends);
        }
    }
    let mut spool = spool.map(|(spooler, recovered)| {
        for r in recovered {
            link.spooled(r.sample, r.seq..r.seq + 1, &mut sends);
        }
        spooler
    });
    let mut retry = Retry::new(Backoff::new(reconnect_initial, reconnect_max));
    let mut samples_open = true;
    let mut stop_by: Option<Instant> = None;
    tokio::pin!(shutdown);

    loop {
        hand_over(&client, &topics, &mut link, &mut sends);
        // Stopping while disconnected: waiting would deliver nothing; the rest is saved.
        if !samples_open && (link.is_empty() || (stop_by.is_some() && !link.is_connected())) {
            break;
        }
        let reconnect_at = retry.waiting_until().map(Instant::from_std);
        tokio::select! {
            biased;
            _ = &mut shutdown, if stop_by.is_none() => {
                stop_by = Some(Instant::now() + STOP_GRACE);
            }
            _ = sleep_until(stop_by), if stop_by.is_some() => break,
            msg = samples.recv(), if samples_open => match msg {
                Some(Sampled { sample, state }) => match spool.as_mut() {
                    Some(sp) => sp.add(sample, state, &mut link, &mut sends),
                    None => link.sample(sample, &mut sends),
                },
                None => samples_open = false,
            },
            _ = sleep_until(reconnect_at), if reconnect_at.is_some() => {
                retry.ready(std::time::Instant::now());
            }
            ev = conn.poll(), if reconnect_at.is_none() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let failures = retry.succeeded();
                    if failures > 0 {
                        tracing::info!(queued = link.queued(), "connected to the MQTT broker again: {peer}");
                    } else {
                        tracing::info!("connected to the MQTT broker: {peer}");
                    }
                    link.connected(now_ms(), &mut sends);
                }
                Ok(ev) => {
                    on_event(&mut link, &ev, &mut sends);
                    if let Some(sp) = spool.as_mut() {
                        sp.release(&mut link);
                    }
                }
                Err(e) => {
                    lost(conn.eventloop().expect("a failed poll leaves no connect in flight"), &mut link, &mut sends);
                    let f = retry.failed(std::time::Instant::now());
                    // Quiet during long outages: first failure, then at powers of two.
                    if f.log {
                        tracing::warn!(
                            failures = f.failures,
                            queued = link.queued(),
                            "{}; retrying in {} ms",
                            peer.explain(&e),
                            f.delay.as_millis()
                        );
                    }
                }
            },
        }
    }

    if link.is_connected() {
        link.stop(now_ms(), &mut sends);
        hand_over(&client, &topics, &mut link, &mut sends);
        // The status and the disconnect go out before it returns.
        conn.logout(&client, Duration::from_secs(2)).await;
    }
    if let Some(sp) = spool.as_mut() {
        sp.close(&mut link);
    }
    // With a spool, what is unacknowledged is on disk already.
    if let Some(path) = state_file.filter(|_| !link.is_empty() && spool.is_none()) {
        let samples = link.unacknowledged();
        match save(&path, &samples) {
            Ok(()) => {
                tracing::info!(samples = samples.len(), file = %path.display(), "saved unacknowledged samples")
            }
            Err(e) => {
                tracing::error!(file = %path.display(), "cannot save {} unacknowledged samples: {e}", samples.len())
            }
        }
    }
    PublishStats {
        drained: !samples_open,
        ..link.stats()
    }
}

/// The connection failed. rumqttc may still hold events it read before the failure
/// (PubAcks the broker did send); they belong to this connection, so the link sees them
/// before it forgets what was in flight, and none is mistaken for the next connection's.
fn lost(eventloop: &mut EventLoop, link: &mut Link, sends: &mut Vec<Send>) {
    for ev in std::mem::take(&mut eventloop.state.events) {
        on_event(link, &ev, sends);
    }
    // A publish held back for a packet id collision belongs to the old connection too.
    eventloop.state.collision = None;
    link.lost();
    sends.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;
    use rumqttc::PubAck;

    #[test]
    fn acks_read_before_a_failure_count_for_the_old_connection_only() {
        let (_client, mut eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 8);
        let mut link = Link::new(Outbox::new(10, 8));
        let mut sends = Vec::new();
        link.connected(0, &mut sends);
        for seq in 0..2 {
            let mut s = Sample::new("a", n("c"), n("n1"), 1000, 0);
            s.seq = seq;
            link.sample(s, &mut sends);
        }
        link.written(1); // status
        link.written(2); // sample 0
        link.written(3); // sample 1
                         // rumqttc read the ack for sample 0 in the same read as the failure.
        eventloop
            .state
            .events
            .push_back(Event::Incoming(Packet::PubAck(PubAck::new(2))));
        lost(&mut eventloop, &mut link, &mut sends);
        assert!(
            eventloop.state.events.is_empty(),
            "nothing left for the next connection"
        );
        let held: Vec<u64> = link.unacknowledged().iter().map(|s| s.seq).collect();
        assert_eq!(held, [1], "sample 0 was delivered; sample 1 is sent again");
        assert!(
            sends.is_empty(),
            "nothing is handed over while disconnected"
        );
    }
}
