//! The agent's side of the MQTT link as a state machine without I/O: events in (a sample,
//! connected, a packet written, a PubAck, the connection lost, a stop), messages to send
//! out. `publish::run` only moves them between this, the sampler and rumqttc.
//!
//! rumqttc tells us a publish's packet id only when it writes it (`Outgoing::Publish`), in
//! the order the publishes were handed over; `awaiting` keeps that order, so each packet
//! id is matched to the sample it carries, and a PubAck removes exactly that sample.

use std::collections::VecDeque;

use nodewatt_wire::{OutboxStats, Sample, Status};

use super::outbox::Outbox;

/// What a message handed to the client carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tag {
    /// The outbox entry with this id.
    Sample(u64),
    /// The node's retained online/offline status.
    Status,
}

/// A QoS 1 message for the caller to hand to the MQTT client, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Send {
    pub tag: Tag,
    pub payload: Vec<u8>,
}

impl Send {
    /// Status messages are retained: a dashboard opened later still sees the node's state.
    pub fn retain(&self) -> bool {
        self.tag == Tag::Status
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct PublishStats {
    pub acked: u64,
    pub merges: u64,
    pub reconnects: u64,
    /// PubAcks that matched no sample in flight (duplicates, or from a broken broker).
    pub stray_acks: u64,
    /// Every sample the sampler sent was taken in (spooled or saved, if configured): the
    /// sampler's final state may be saved.
    pub drained: bool,
}

#[derive(Debug)]
pub struct Link {
    outbox: Outbox,
    /// Tags of messages handed to the client whose packet id is not known yet, oldest first.
    awaiting: VecDeque<Tag>,
    /// Packet ids of status messages awaiting their PubAck.
    status_pkids: Vec<u16>,
    connected: bool,
    stats: PublishStats,
    /// Job totals moved out of a merged sample that was too large (see `fit`).
    carry: Vec<nodewatt_wire::JobTotal>,
    /// Spool records of acknowledged samples, for the caller to release.
    released: Vec<std::ops::Range<u64>>,
}

/// The retained status message; `ts_ms` is none in the last will (the broker sends it
/// later, at a time the agent cannot know).
pub fn status_payload(online: bool, ts_ms: Option<u64>, reason: &str) -> Vec<u8> {
    let s = Status {
        online,
        agent: Some(crate::sampler::AGENT.to_string()),
        ts_ms,
        reason: Some(reason.to_string()),
    };
    serde_json::to_vec(&s).expect("status serialises")
}

impl Link {
    pub fn new(outbox: Outbox) -> Link {
        Link {
            outbox,
            awaiting: VecDeque::new(),
            status_pkids: Vec::new(),
            connected: false,
            stats: PublishStats::default(),
            carry: Vec::new(),
            released: Vec::new(),
        }
    }

    /// Samples held (waiting or in flight).
    pub fn queued(&self) -> usize {
        self.outbox.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outbox.is_empty()
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn stats(&self) -> PublishStats {
        PublishStats {
            merges: self.outbox.merges,
            ..self.stats
        }
    }

    /// Everything not acknowledged, oldest first (saved at shutdown).
    pub fn unacknowledged(&self) -> Vec<&Sample> {
        self.outbox.samples()
    }

    /// A new sample from the sampler.
    pub fn sample(&mut self, sample: Sample, out: &mut Vec<Send>) {
        self.spooled(sample, 0..0, out);
    }

    /// A new sample, held on disk by these spool records.
    pub fn spooled(&mut self, sample: Sample, records: std::ops::Range<u64>, out: &mut Vec<Send>) {
        self.outbox.push_spooled(sample, records);
        self.fill(out);
    }

    /// Spool records of delivered samples, since the last call.
    pub fn take_released(&mut self) -> Vec<std::ops::Range<u64>> {
        std::mem::take(&mut self.released)
    }

    /// The outbox as a spool snapshot: (last record, sample), oldest first.
    pub fn spool_snapshot(&self) -> Vec<(u64, &Sample)> {
        self.outbox.spooled()
    }

    /// ConnAck: the node is online; everything unacknowledged goes out again, oldest first.
    pub fn connected(&mut self, now_ms: u64, out: &mut Vec<Send>) {
        self.connected = true;
        self.awaiting.clear();
        self.status_pkids.clear();
        self.outbox.reset_in_flight();
        self.send_status(true, Some(now_ms), "connected", out);
        self.fill(out);
    }

    /// The client wrote the oldest handed-over message with this packet id.
    pub fn written(&mut self, pkid: u16) {
        match self.awaiting.pop_front() {
            Some(Tag::Sample(id)) => self.outbox.assign_pkid(id, pkid),
            Some(Tag::Status) => self.status_pkids.push(pkid),
            None => {}
        }
    }

    /// PubAck: the sample with this packet id is delivered and leaves the outbox.
    pub fn acked(&mut self, pkid: u16, out: &mut Vec<Send>) {
        if let Some(spooled) = self.outbox.ack(pkid) {
            self.stats.acked += 1;
            if !spooled.is_empty() {
                self.released.push(spooled);
            }
        } else if let Some(i) = self.status_pkids.iter().position(|p| *p == pkid) {
            self.status_pkids.swap_remove(i);
        } else {
            // A duplicate must not remove another sample; nothing is lost by ignoring it.
            self.stats.stray_acks += 1;
        }
        self.fill(out);
    }

    /// The connection is gone: nothing is in flight any more; all of it is sent again
    /// after the next ConnAck.
    pub fn lost(&mut self) {
        if self.connected {
            self.stats.reconnects += 1;
        }
        self.connected = false;
        self.outbox.reset_in_flight();
        self.awaiting.clear();
        self.status_pkids.clear();
    }

    /// The client did not take a message handed to it (its queue was full): it waits for
    /// the next chance.
    pub fn refused(&mut self, tag: Tag) {
        if let Some(i) = self.awaiting.iter().rposition(|t| *t == tag) {
            self.awaiting.remove(i);
        }
        if let Tag::Sample(id) = tag {
            self.outbox.release(id);
        }
    }

    /// Stopping: the offline status, if there is a connection to send it on.
    pub fn stop(&mut self, now_ms: u64, out: &mut Vec<Send>) {
        if self.connected {
            self.send_status(false, Some(now_ms), "stopped", out);
        }
    }

    fn send_status(&mut self, online: bool, ts_ms: Option<u64>, reason: &str, out: &mut Vec<Send>) {
        self.awaiting.push_back(Tag::Status);
        out.push(Send {
            tag: Tag::Status,
            payload: status_payload(online, ts_ms, reason),
        });
    }

    /// Hands waiting samples over, up to the in-flight limit.
    fn fill(&mut self, out: &mut Vec<Send>) {
        if !self.connected {
            return;
        }
        let stats = OutboxStats {
            len: self.outbox.len() as u32,
            merges: self.outbox.merges,
            reconnects: self.stats.reconnects,
        };
        while let Some((id, sample)) = self.outbox.take_next() {
            sample.outbox = Some(stats);
            let mut payload = sample.to_json().into_bytes();
            // Merged samples can outgrow a packet: shaped again, the totals that do not
            // fit ride on the next ones.
            if payload.len() > super::MAX_MESSAGE_BYTES || !self.carry.is_empty() {
                let done = super::fit::fit(sample, &mut self.carry, super::MAX_MESSAGE_BYTES);
                if done.unattributed {
                    tracing::error!("a merged sample too large for one message: its usage is sent as _unattributed");
                }
                payload = sample.to_json().into_bytes();
            }
            self.awaiting.push_back(Tag::Sample(id));
            out.push(Send {
                tag: Tag::Sample(id),
                payload,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;

    fn sample(seq: u64) -> Sample {
        let mut s = Sample::new("a", n("c"), n("n1"), 1000, 0);
        s.seq = seq;
        s.ts_ms = 1_000 + seq;
        s
    }

    fn seqs(sends: &[Send]) -> Vec<Option<u64>> {
        sends
            .iter()
            .map(|s| match s.tag {
                Tag::Status => None,
                Tag::Sample(_) => {
                    Some(Sample::from_json(&s.payload).expect("a sample payload").seq)
                }
            })
            .collect()
    }

    fn link(capacity: usize, in_flight: usize) -> (Link, Vec<Send>) {
        (Link::new(Outbox::new(capacity, in_flight)), Vec::new())
    }

    fn held(l: &Link) -> Vec<u64> {
        l.unacknowledged().iter().map(|s| s.seq).collect()
    }

    #[test]
    fn nothing_is_sent_before_the_connection_and_all_of_it_after() {
        let (mut l, mut out) = link(10, 8);
        l.sample(sample(0), &mut out);
        l.sample(sample(1), &mut out);
        assert!(out.is_empty(), "offline: samples wait");
        l.connected(5, &mut out);
        assert_eq!(seqs(&out), [None, Some(0), Some(1)], "status first");
        assert!(out[0].retain() && !out[1].retain());
    }

    #[test]
    fn a_puback_removes_exactly_the_sample_its_packet_id_carried() {
        let (mut l, mut out) = link(10, 8);
        l.connected(0, &mut out);
        for s in 0..3 {
            l.sample(sample(s), &mut out);
        }
        // The client writes status, 0, 1, 2 with packet ids 1..=4.
        for pkid in 1..=4 {
            l.written(pkid);
        }
        l.acked(3, &mut out); // sample 1
        assert_eq!(held(&l), [0, 2]);
        l.acked(1, &mut out); // the status message
        assert_eq!(held(&l), [0, 2]);
        assert_eq!(l.stats().acked, 1);
        assert_eq!(l.stats().stray_acks, 0, "the status ack is expected");
    }

    #[test]
    fn a_duplicate_puback_removes_nothing_else() {
        let (mut l, mut out) = link(10, 8);
        l.connected(0, &mut out);
        l.written(1); // status
        l.sample(sample(0), &mut out);
        l.written(2);
        l.acked(2, &mut out);
        l.sample(sample(1), &mut out);
        l.acked(2, &mut out);
        assert_eq!(held(&l), [1], "sample 1 has no packet id yet: untouched");
        l.written(3);
        l.acked(2, &mut out);
        assert_eq!(held(&l), [1]);
        assert_eq!(l.stats().stray_acks, 2);
        l.acked(3, &mut out);
        assert!(l.is_empty());
    }

    #[test]
    fn reconnect_mid_flight_resends_everything_unacknowledged_in_order() {
        let (mut l, mut out) = link(10, 2);
        l.connected(0, &mut out);
        for s in 0..4 {
            l.sample(sample(s), &mut out);
        }
        assert_eq!(seqs(&out), [None, Some(0), Some(1)], "two in flight");
        out.clear();
        l.written(1);
        l.written(2); // sample 0; sample 1 was handed over but never written
        l.lost();
        assert!(!l.is_connected());
        l.sample(sample(4), &mut out);
        assert!(out.is_empty());
        // An ack for the old connection's packet id, late: matches nothing now.
        l.acked(2, &mut out);
        assert_eq!(held(&l), [0, 1, 2, 3, 4]);
        l.connected(10, &mut out);
        assert_eq!(seqs(&out), [None, Some(0), Some(1)]);
        assert_eq!(l.stats().reconnects, 1);
        // Packet ids on the new connection continue; they match the resent samples.
        l.written(5);
        l.written(6);
        l.acked(6, &mut out);
        assert_eq!(held(&l), [1, 2, 3, 4]);
    }

    #[test]
    fn a_refused_handover_is_retried_later_without_shifting_packet_ids() {
        let (mut l, mut out) = link(10, 8);
        l.connected(0, &mut out);
        l.sample(sample(0), &mut out);
        l.sample(sample(1), &mut out);
        // The client took the status and sample 0, then refused sample 1.
        let Tag::Sample(_) = out[2].tag else { panic!() };
        l.refused(out[2].tag);
        out.clear();
        l.written(1);
        l.written(2);
        l.acked(2, &mut out);
        // The ack freed a slot: sample 1 goes out again.
        assert_eq!(seqs(&out), [Some(1)]);
        l.written(3);
        l.acked(3, &mut out);
        assert!(l.is_empty());
    }

    #[test]
    fn stop_sends_the_offline_status_only_when_connected() {
        let (mut l, mut out) = link(10, 8);
        l.stop(5, &mut out);
        assert!(out.is_empty());
        l.connected(0, &mut out);
        out.clear();
        l.stop(5, &mut out);
        let status: Status = serde_json::from_slice(&out[0].payload).unwrap();
        assert!(!status.online);
        assert_eq!(status.reason.as_deref(), Some("stopped"));
    }

    #[test]
    fn samples_carry_the_outbox_state() {
        let (mut l, mut out) = link(10, 8);
        l.sample(sample(0), &mut out);
        l.connected(0, &mut out);
        let s = Sample::from_json(&out[1].payload).unwrap();
        assert_eq!(s.outbox.map(|o| o.len), Some(1));
    }
}
