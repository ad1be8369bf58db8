//! The collector's batching and acknowledgement logic as a state machine without I/O:
//! events in (a message, a write's outcome, a (re)connect, the time, a stop), actions out
//! (write this batch, acknowledge that packet). `serve` only moves bytes between it, the
//! broker and InfluxDB, so every ordering below is unit-tested with event sequences.
//!
//! The rules it keeps:
//! - a message is acknowledged only after the batch holding it was written, and batches are
//!   written and acknowledged in arrival order (one write at a time);
//! - an acknowledgement belongs to the connection it arrived on: after a reconnect the
//!   broker redelivers what was not acknowledged, and an old packet id is never sent on the
//!   new connection, where it may name another message;
//! - at most `max_pending_messages` are held unacknowledged: past it the caller stops
//!   reading from the broker (`paused`), which keeps them;
//! - a failed write is retried with backoff, never dropped; at a stop each batch gets one
//!   more try and what fails stays unacknowledged for the broker to redeliver.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use nodewatt_common::backoff::{Backoff, Failed, Retry};

use crate::config::BatchConfig;

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this line protocol, then report with [`Pipeline::written`]. Before each
    /// try, mark these hours as written into (`usage` points end in them; `rollup`).
    Write(Bytes, Vec<u64>),
    /// Send a PubAck for this packet id on the current connection.
    Ack(u16),
}

/// How a write ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Written; `refused` lines were refused by InfluxDB as bad data and dropped.
    Written { refused: usize },
    /// Not written (unreachable, overloaded, ...): the same batch is tried again.
    Failed(String),
}

/// What a write's end is worth saying in the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Quiet,
    /// A failure, the first and then at powers of two; the same batch is retried.
    Failed {
        failed: Failed,
        error: String,
    },
    /// Written after `failures` failed tries.
    Recovered {
        failures: u32,
    },
}

/// Counters for the collector's health point.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct WriteStats {
    pub points_written: u64,
    pub points_refused: u64,
    pub batches_written: u64,
    pub write_errors: u64,
    pub last_write_ms: u64,
    pub last_batch_points: u64,
}

#[derive(Debug, Default)]
struct Open {
    body: Vec<u8>,
    points: usize,
    /// (connection generation, packet id) of each message, in arrival order.
    acks: Vec<(u64, u16)>,
    /// Ends of the hours its `usage` points fall in, sorted.
    hours: Vec<u64>,
    started: Option<Instant>,
}

#[derive(Debug)]
struct Sealed {
    body: Bytes,
    points: usize,
    acks: Vec<(u64, u16)>,
    hours: Vec<u64>,
}

/// Sealed batches held, the one being written included. Beyond it the open batch keeps
/// growing; `max_pending_messages` bounds the messages it can hold.
const MAX_SEALED: usize = 2;

#[derive(Debug)]
pub struct Pipeline {
    cfg: BatchConfig,
    open: Open,
    sealed: VecDeque<Sealed>,
    /// The front sealed batch is being written, since this instant.
    writing: Option<Instant>,
    retry: Retry,
    generation: u64,
    pending: usize,
    stopping: bool,
    /// Stopped with batches unwritten (InfluxDB failed at the stop): they stay unacked.
    abandoned: bool,
    /// The memory of the last written batch, empty, for the next open one: a drain fills
    /// megabytes per batch, and fresh memory costs a page fault per 4 KiB and regrowing.
    spare: Vec<u8>,
    pub stats: WriteStats,
}

impl Pipeline {
    pub fn new(cfg: BatchConfig) -> Pipeline {
        Pipeline::with_backoff(Backoff::new(cfg.retry_initial, cfg.retry_max), cfg)
    }

    pub fn with_backoff(backoff: Backoff, cfg: BatchConfig) -> Pipeline {
        Pipeline {
            cfg,
            open: Open::default(),
            sealed: VecDeque::new(),
            writing: None,
            retry: Retry::new(backoff),
            generation: 0,
            pending: 0,
            stopping: false,
            abandoned: false,
            spare: Vec::new(),
            stats: WriteStats::default(),
        }
    }

    /// A new connection to the broker: acknowledgements of earlier ones are void.
    pub fn connected(&mut self) {
        self.generation += 1;
    }

    /// Messages received and not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Stop reading from the broker until writes catch up.
    pub fn paused(&self) -> bool {
        self.pending >= self.cfg.max_pending_messages
    }

    /// Appends a message's lines (may be none: a rejected message is acknowledged in
    /// order too) and its packet id (none for QoS 0 and the collector's own points).
    pub fn add(
        &mut self,
        lines: &[u8],
        points: usize,
        pkid: Option<u16>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.open.body.extend_from_slice(lines);
        self.open.points += points;
        if let Some(pkid) = pkid {
            self.open.acks.push((self.generation, pkid));
            self.pending += 1;
        }
        self.open.started.get_or_insert(now);
        self.tick(now, out);
    }

    /// The next [`add`](Self::add) carries `usage` points in the hour ending at `hour`.
    pub fn usage_hour(&mut self, hour: u64) {
        if let Err(i) = self.open.hours.binary_search(&hour) {
            self.open.hours.insert(i, hour);
        }
    }

    /// When [`tick`](Self::tick) has something to do next, if nothing else happens.
    pub fn deadline(&self) -> Option<Instant> {
        let flush = self
            .open
            .started
            .filter(|_| self.sealed.len() < MAX_SEALED)
            .map(|t| t + self.cfg.flush_interval);
        let retry = self
            .retry
            .waiting_until()
            .filter(|_| self.writing.is_none());
        match (flush, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Seals the open batch when it is full or old enough, and starts the next write when
    /// none is running and no retry wait is in the way.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let full =
            self.open.points >= self.cfg.max_points || self.open.body.len() >= self.cfg.max_bytes;
        let old = self
            .open
            .started
            .is_some_and(|t| now.duration_since(t) >= self.cfg.flush_interval);
        if (full || old || self.stopping) && self.open.started.is_some() {
            self.seal();
        }
        if self.writing.is_some() || self.abandoned || !self.retry.ready(now) {
            return;
        }
        // Batches with no lines (only rejected messages) need no write.
        while let Some(front) = self.sealed.front() {
            if !front.body.is_empty() {
                self.writing = Some(now);
                out.push(Action::Write(front.body.clone(), front.hours.clone()));
                return;
            }
            let empty = self.sealed.pop_front().expect("front exists");
            self.acknowledge(empty.acks, out);
        }
    }

    fn seal(&mut self) {
        if self.sealed.len() >= MAX_SEALED && !self.stopping {
            return;
        }
        let open = std::mem::take(&mut self.open);
        self.open.body = std::mem::take(&mut self.spare);
        self.sealed.push_back(Sealed {
            body: Bytes::from(open.body),
            points: open.points,
            acks: open.acks,
            hours: open.hours,
        });
    }

    fn acknowledge(&mut self, acks: Vec<(u64, u16)>, out: &mut Vec<Action>) {
        self.pending -= acks.len();
        out.extend(
            acks.into_iter()
                .filter(|(generation, _)| *generation == self.generation)
                .map(|(_, pkid)| Action::Ack(pkid)),
        );
    }

    /// The write started by the last [`Action::Write`] ended. Returns what is worth a
    /// log line.
    pub fn written(&mut self, outcome: Outcome, now: Instant, out: &mut Vec<Action>) -> Report {
        let Some(started) = self.writing.take() else {
            return Report::Quiet;
        };
        match outcome {
            Outcome::Written { refused } => {
                let failures = self.retry.succeeded();
                let batch = self.sealed.pop_front().expect("a batch was being written");
                // The write's copy of the body is gone by now, so its memory is ours again.
                if let Ok(mut body) = batch.body.try_into_mut() {
                    body.clear();
                    self.spare = body.into();
                }
                let points = batch.points.saturating_sub(refused) as u64;
                self.stats.points_written += points;
                self.stats.points_refused += refused as u64;
                self.stats.batches_written += 1;
                self.stats.last_batch_points = points;
                self.stats.last_write_ms = now.duration_since(started).as_millis() as u64;
                self.acknowledge(batch.acks, out);
                self.tick(now, out);
                match failures {
                    0 => Report::Quiet,
                    n => Report::Recovered { failures: n },
                }
            }
            Outcome::Failed(error) => {
                self.stats.write_errors += 1;
                let failed = self.retry.failed(now);
                if self.stopping {
                    // Nothing waits on a dead InfluxDB at a stop: the broker keeps the
                    // unacknowledged messages for the next start.
                    self.abandoned = true;
                }
                if failed.log {
                    Report::Failed { failed, error }
                } else {
                    Report::Quiet
                }
            }
        }
    }

    /// Stop: seal what is open and write it (one more try for each batch; a retry wait in
    /// progress ends the stop at once). Then [`done`](Self::done) says when to leave.
    pub fn stop(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.stopping = true;
        if self.writing.is_none() && self.retry.waiting_until().is_some() {
            self.abandoned = true;
        }
        self.tick(now, out);
    }

    /// Stopped and nothing left to write (or nothing that could be written).
    pub fn done(&self) -> bool {
        self.stopping
            && self.writing.is_none()
            && (self.abandoned || (self.sealed.is_empty() && self.open.started.is_none()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> BatchConfig {
        BatchConfig {
            max_points: 3,
            max_bytes: 1 << 20,
            flush_interval: Duration::from_millis(500),
            max_pending_messages: 4,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(100),
        }
    }

    struct T {
        p: Pipeline,
        t0: Instant,
        out: Vec<Action>,
    }

    impl T {
        fn new() -> T {
            let mut p = Pipeline::with_backoff(
                Backoff::with_seed(Duration::from_millis(100), Duration::from_millis(100), 1),
                cfg(),
            );
            p.connected();
            T {
                p,
                t0: Instant::now(),
                out: Vec::new(),
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn msg(&mut self, ms: u64, line: &str, pkid: u16) -> Vec<Action> {
            let now = self.at(ms);
            self.p
                .add(line.as_bytes(), 1, Some(pkid), now, &mut self.out);
            std::mem::take(&mut self.out)
        }
        fn tick(&mut self, ms: u64) -> Vec<Action> {
            let now = self.at(ms);
            self.p.tick(now, &mut self.out);
            std::mem::take(&mut self.out)
        }
        fn written(&mut self, ms: u64, outcome: Outcome) -> Vec<Action> {
            let now = self.at(ms);
            self.p.written(outcome, now, &mut self.out);
            std::mem::take(&mut self.out)
        }
        fn stop(&mut self, ms: u64) -> Vec<Action> {
            let now = self.at(ms);
            self.p.stop(now, &mut self.out);
            std::mem::take(&mut self.out)
        }
    }

    fn write(body: &str) -> Action {
        Action::Write(Bytes::copy_from_slice(body.as_bytes()), Vec::new())
    }
    const OK: Outcome = Outcome::Written { refused: 0 };
    fn down() -> Outcome {
        Outcome::Failed("connection refused".into())
    }

    #[test]
    fn acks_only_after_the_write_and_in_order() {
        let mut t = T::new();
        assert_eq!(t.msg(0, "a\n", 1), []);
        assert_eq!(t.msg(10, "b\n", 2), []);
        assert_eq!(t.tick(499), [], "not yet old");
        assert_eq!(t.p.deadline(), Some(t.at(500)));
        assert_eq!(t.tick(500), [write("a\nb\n")]);
        // More arrives while the write runs: batched, not written alongside.
        assert_eq!(t.msg(600, "c\n", 3), []);
        assert_eq!(t.tick(1200), [], "one write at a time");
        assert_eq!(t.p.pending(), 3);
        assert_eq!(
            t.written(1300, OK),
            [Action::Ack(1), Action::Ack(2), write("c\n")]
        );
        assert_eq!(t.written(1400, OK), [Action::Ack(3)]);
        assert_eq!(t.p.pending(), 0);
        assert_eq!(t.p.stats.points_written, 3);
        assert_eq!(t.p.stats.batches_written, 2);
    }

    #[test]
    fn a_full_batch_is_written_at_once() {
        let mut t = T::new();
        t.msg(0, "a\n", 1);
        t.msg(0, "b\n", 2);
        assert_eq!(t.msg(0, "c\n", 3), [write("a\nb\nc\n")]);
    }

    #[test]
    fn reconnect_mid_batch_drops_only_the_old_connections_acks() {
        let mut t = T::new();
        t.msg(0, "a\n", 1);
        t.msg(0, "b\n", 2);
        // The connection drops while the batch is open; the broker will redeliver 1 and 2.
        t.p.connected();
        assert_eq!(t.msg(10, "a\n", 7), [write("a\nb\na\n")]);
        assert_eq!(t.written(20, OK), [Action::Ack(7)]);
        assert_eq!(t.p.pending(), 0, "old acks are settled, not leaked");
    }

    #[test]
    fn reconnect_during_a_write_skips_its_acks() {
        let mut t = T::new();
        for (i, l) in ["a\n", "b\n"].iter().enumerate() {
            t.msg(0, l, i as u16 + 1);
        }
        assert_eq!(t.tick(500), [write("a\nb\n")]);
        t.p.connected();
        assert_eq!(t.msg(600, "c\n", 1), []);
        // Packet id 1 of the old connection must not be acked: on this one it is "c".
        assert_eq!(t.written(700, OK), []);
        assert_eq!(t.tick(1100), [write("c\n")]);
        assert_eq!(t.written(1200, OK), [Action::Ack(1)]);
    }

    #[test]
    fn failed_writes_retry_the_same_batch_with_backoff_and_keep_acks() {
        let mut t = T::new();
        t.msg(0, "a\n", 1);
        assert_eq!(t.tick(500), [write("a\n")]);
        let report = t.p.written(down(), t.at(510), &mut t.out);
        assert!(
            matches!(&report, Report::Failed { error, failed } if error == "connection refused" && failed.failures == 1),
            "the first failure is logged: {report:?}"
        );
        assert!(t.out.is_empty());
        let retry = t.p.deadline().expect("a retry is scheduled");
        assert!(retry > t.at(510) && retry <= t.at(610), "{retry:?}");
        assert_eq!(t.tick(515), [], "waits for the backoff");
        t.msg(520, "b\n", 2);
        let now = retry.duration_since(t.t0).as_millis() as u64 + 1;
        assert_eq!(t.tick(now), [write("a\n")], "same batch again, in order");
        let report = t.p.written(OK, t.at(now + 1), &mut t.out);
        assert_eq!(report, Report::Recovered { failures: 1 });
        assert_eq!(t.out, [Action::Ack(1)]);
        assert_eq!(t.p.stats.write_errors, 1);
    }

    #[test]
    fn each_batch_names_the_hours_its_usage_falls_in_on_every_try() {
        let mut t = T::new();
        t.p.usage_hour(7_200_000);
        t.msg(0, "u1\n", 1);
        t.p.usage_hour(3_600_000);
        t.p.usage_hour(7_200_000);
        t.msg(10, "u2\n", 2);
        let hours = vec![3_600_000, 7_200_000];
        let first = Action::Write(Bytes::from_static(b"u1\nu2\n"), hours.clone());
        assert_eq!(t.tick(500), std::slice::from_ref(&first));
        // The next batch starts without them.
        t.msg(600, "x\n", 3);
        t.written(700, down());
        let retry = t.p.deadline().unwrap().duration_since(t.t0).as_millis() as u64 + 1;
        assert_eq!(t.tick(retry), [first], "a retry marks the same hours again");
        assert_eq!(t.written(retry + 1, OK), [Action::Ack(1), Action::Ack(2)]);
        assert_eq!(t.tick(retry + 600), [write("x\n")]);
    }

    #[test]
    fn refused_lines_are_counted_not_retried() {
        let mut t = T::new();
        t.msg(0, "a\n", 1);
        t.msg(0, "bad\n", 2);
        t.tick(500);
        assert_eq!(
            t.written(510, Outcome::Written { refused: 1 }),
            [Action::Ack(1), Action::Ack(2)]
        );
        assert_eq!(t.p.stats.points_written, 1);
        assert_eq!(t.p.stats.points_refused, 1);
    }

    #[test]
    fn pauses_at_max_pending_and_resumes_when_written() {
        let mut t = T::new();
        t.p.cfg.max_points = 100;
        for i in 1..=4 {
            t.msg(0, "x\n", i);
        }
        assert!(t.p.paused());
        assert_eq!(t.tick(500), [write("x\nx\nx\nx\n")]);
        assert!(t.p.paused(), "still unacknowledged");
        assert_eq!(t.written(510, OK).len(), 4);
        assert!(!t.p.paused());
    }

    #[test]
    fn rejected_messages_without_lines_are_acked_in_order_without_a_write() {
        let mut t = T::new();
        t.p.add(b"", 0, Some(5), t.at(0), &mut t.out);
        assert_eq!(t.tick(500), [Action::Ack(5)]);
        // Behind a batch that is being written, they wait for it.
        t.msg(600, "a\n", 6);
        assert_eq!(t.tick(1100), [write("a\n")]);
        t.p.add(b"", 0, Some(7), t.at(1200), &mut t.out);
        assert_eq!(t.tick(1700), []);
        assert_eq!(t.written(1800, OK), [Action::Ack(6), Action::Ack(7)]);
    }

    #[test]
    fn shutdown_while_influxdb_is_down_ends_without_acks() {
        let mut t = T::new();
        t.msg(0, "a\n", 1);
        t.tick(500);
        t.written(510, down());
        t.msg(520, "b\n", 2);
        // A stop during the retry wait: no more tries, nothing acknowledged.
        assert_eq!(t.stop(530), []);
        assert!(t.p.done());
        assert_eq!(t.p.pending(), 2, "left for the broker to redeliver");
    }

    #[test]
    fn shutdown_during_a_write_gives_each_batch_one_more_try() {
        let mut t = T::new();
        t.msg(0, "a\n", 1);
        t.tick(500);
        t.msg(600, "b\n", 2);
        assert_eq!(t.stop(610), [], "the write in flight finishes first");
        assert!(!t.p.done());
        assert_eq!(t.written(620, OK), [Action::Ack(1), write("b\n")]);
        assert!(!t.p.done());
        assert_eq!(t.written(630, down()), []);
        assert!(t.p.done(), "a failure at a stop is not retried");
    }

    #[test]
    fn shutdown_writes_the_open_batch_at_once() {
        let mut t = T::new();
        t.msg(0, "a\n", 1);
        assert_eq!(t.stop(1), [write("a\n")]);
        assert_eq!(t.written(2, OK), [Action::Ack(1)]);
        assert!(t.p.done());
        let mut idle = T::new();
        idle.stop(0);
        assert!(idle.p.done(), "nothing held: done at once");
    }

    #[test]
    fn sealed_batches_are_bounded_while_influxdb_is_down() {
        let mut t = T::new();
        t.msg(0, "a\n", 1);
        t.tick(500);
        t.written(501, down());
        // Health points (no acks) keep arriving through a long outage.
        for s in 1..100u64 {
            t.p.add(b"h\n", 1, None, t.at(s * 1000), &mut t.out);
            t.p.tick(t.at(s * 1000 + 600), &mut t.out);
            let writes = t
                .out
                .iter()
                .filter(|a| matches!(a, Action::Write(..)))
                .count();
            t.out.clear();
            if writes == 1 {
                t.written(s * 1000 + 601, down());
            }
        }
        assert!(t.p.sealed.len() <= MAX_SEALED, "{}", t.p.sealed.len());
    }

    #[test]
    fn a_written_batch_leaves_its_memory_to_a_later_one() {
        let mut t = T::new();
        t.p.cfg.max_points = 100;
        let line = "x".repeat(1000) + "\n";
        for i in 1..=50 {
            t.msg(0, &line, i);
        }
        let writes = t.tick(500);
        assert_eq!(writes, [write(&line.repeat(50))]);
        t.msg(600, "a\n", 51);
        // While the write holds its body, there is nothing to take back.
        drop(writes);
        assert_eq!(t.written(700, OK).len(), 50);
        assert_eq!(t.tick(1100), [write("a\n")]);
        assert!(t.p.open.body.is_empty());
        assert!(t.p.open.body.capacity() >= 50 * line.len());
        assert_eq!(t.written(1200, OK), [Action::Ack(51)]);
    }

    #[test]
    fn a_write_outcome_with_no_write_running_is_ignored() {
        let mut t = T::new();
        assert_eq!(t.written(0, OK), []);
        assert_eq!(t.p.stats, WriteStats::default());
    }
}
