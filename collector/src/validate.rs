//! Every message is parsed into the wire contract before anything is written: size,
//! topic, schema and names (while deserialising), payload against topic, then
//! `nodewatt_wire::check_sample` (ranges, time windows, entry counts, physics,
//! conservation), then the node's series budget. `serve` and `validate` both go through
//! [`Gate`]. A rejected message is counted by reason and never written.

use nodewatt_wire::{
    check_sample, check_status, invalid, NodeName, Sample, Status, Topic, TopicKind, ValidSample,
};
pub use nodewatt_wire::{Invalid as Rejected, Reason};

use crate::config::ValidationConfig;
use crate::lineproto::encode_sample;
use crate::series::SeriesBudget;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub wire: nodewatt_wire::Limits,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Sample(Box<ValidSample>),
    Status {
        cluster: NodeName,
        node: NodeName,
        status: Status,
    },
}

fn size(payload: &[u8], limits: &Limits) -> Result<(), Rejected> {
    if payload.len() > limits.max_bytes {
        return Err(invalid(
            Reason::TooLarge,
            format!("{} bytes, limit {}", payload.len(), limits.max_bytes),
        ));
    }
    Ok(())
}

/// A message from the broker.
pub fn validate(
    topic: &str,
    payload: &[u8],
    now_ms: u64,
    limits: &Limits,
) -> Result<Message, Rejected> {
    size(payload, limits)?;
    let t = Topic::parse(topic)?;
    match t.kind {
        TopicKind::Status => {
            let status: Status = serde_json::from_slice(payload)
                .map_err(|e| Rejected::from(nodewatt_wire::WireError::Json(e)))?;
            check_status(&status, now_ms, &limits.wire)?;
            Ok(Message::Status {
                cluster: t.cluster,
                node: t.node,
                status,
            })
        }
        TopicKind::Sample => {
            let s = Sample::from_json(payload)?;
            if s.cluster != t.cluster || s.node != t.node {
                return Err(invalid(
                    Reason::NodeMismatch,
                    format!(
                        "topic says {}/{}, payload says {}/{}",
                        t.cluster, t.node, s.cluster, s.node
                    ),
                ));
            }
            Ok(Message::Sample(Box::new(check_sample(
                s,
                now_ms,
                &limits.wire,
            )?)))
        }
    }
}

/// Everything a message passes before it is written, shared by `serve` and `validate`:
/// the wire contract, then (for samples) the node's new-series budget, checked on the
/// sample's encoded lines. An admitted sample's lines are in [`Gate::lines`].
pub struct Gate {
    limits: Limits,
    series: SeriesBudget,
    lines: Vec<u8>,
}

/// What a [`Gate`] let through.
pub enum Admitted {
    /// Its `points` lines are in [`Gate::lines`].
    Sample {
        sample: Box<ValidSample>,
        points: usize,
    },
    Status {
        cluster: NodeName,
        node: NodeName,
        status: Status,
    },
}

impl Gate {
    pub fn new(v: &ValidationConfig) -> Gate {
        Gate {
            limits: v.limits(),
            series: SeriesBudget::new(
                v.max_new_series_per_node,
                v.series_window.as_millis() as u64,
            ),
            lines: Vec::new(),
        }
    }

    /// A message from the broker.
    pub fn admit(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Admitted, Rejected> {
        match validate(topic, payload, now_ms, &self.limits)? {
            Message::Sample(s) => {
                let points = self.encode(&s, now_ms)?;
                Ok(Admitted::Sample { sample: s, points })
            }
            Message::Status {
                cluster,
                node,
                status,
            } => Ok(Admitted::Status {
                cluster,
                node,
                status,
            }),
        }
    }

    /// A sample without a topic (`validate` reading `run --stdout`).
    pub fn admit_line(&mut self, payload: &[u8], now_ms: u64) -> Result<ValidSample, Rejected> {
        let s = validate_line(payload, now_ms, &self.limits)?;
        self.encode(&s, now_ms)?;
        Ok(s)
    }

    /// Encodes into `lines` and charges the node's series budget; returns the points.
    fn encode(&mut self, s: &ValidSample, now_ms: u64) -> Result<usize, Rejected> {
        self.lines.clear();
        let points = encode_sample(s, &mut self.lines);
        self.series
            .admit((&s.cluster, &s.node), &self.lines, now_ms)?;
        Ok(points)
    }

    /// The line protocol of the last admitted sample.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }
}

/// A sample without a topic (`nodewatt-collector validate` reading `run --stdout`): the
/// same checks as [`validate`], with the payload's own node standing for its topic.
pub fn validate_line(
    payload: &[u8],
    now_ms: u64,
    limits: &Limits,
) -> Result<ValidSample, Rejected> {
    size(payload, limits)?;
    let s = Sample::from_json(payload)?;
    check_sample(s, now_ms, &limits.wire)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodewatt_wire::Gpu;

    const NOW: u64 = 1_763_700_000_000;
    const LIMITS: Limits = Limits {
        max_bytes: 64 * 1024,
        wire: nodewatt_wire::Limits {
            max_future_ms: 300_000,
            max_age_ms: 7 * 86_400_000,
            max_power: nodewatt_wire::MaxPower {
                gpu_w: 2_000,
                cpu_w: 1_000,
                dram_w: 500,
                other_w: 20_000,
                node_w: 100_000,
            },
            max_jobs: 4_096,
        },
    };
    const TOPIC: &str = "nodewatt/v1/c1/n1/sample";

    fn sample() -> Sample {
        let name = |v: &str| NodeName::new(v).unwrap();
        let mut s = Sample::new(
            "nodewatt-agent/0.1.0",
            name("c1"),
            name("n1"),
            1000,
            NOW - 60_000,
        );
        s.ts_ms = NOW;
        s.gpus.push(Gpu {
            index: 0,
            uuid: "GPU-1".into(),
            pci_bus_id: "0".into(),
            model: "H100".into(),
            power_w: Some(300.0),
            ..Gpu::default()
        });
        s
    }

    fn reason(topic: &str, payload: &[u8]) -> Reason {
        validate(topic, payload, NOW, &LIMITS).unwrap_err().reason
    }

    #[test]
    fn accepts_a_good_sample() {
        let json = sample().to_json();
        assert!(matches!(
            validate(TOPIC, json.as_bytes(), NOW, &LIMITS),
            Ok(Message::Sample(_))
        ));
        assert!(validate_line(json.as_bytes(), NOW, &LIMITS).is_ok());
    }

    #[test]
    fn rejects_by_reason() {
        let payload = sample().to_json();
        assert_eq!(reason(TOPIC, &vec![b' '; 70_000]), Reason::TooLarge);
        assert_eq!(reason(TOPIC, b"{nope"), Reason::Json);
        let v2 = payload.replace("\"schema\":1", "\"schema\":2");
        assert_eq!(reason(TOPIC, v2.as_bytes()), Reason::Schema);
        assert_eq!(reason("other/topic", payload.as_bytes()), Reason::Topic);
        assert_eq!(
            reason("nodewatt/v1/c1/n 1/sample", payload.as_bytes()),
            Reason::Name
        );
        let err =
            validate("nodewatt/v1/c1/n2/sample", payload.as_bytes(), NOW, &LIMITS).unwrap_err();
        assert_eq!(err.reason, Reason::NodeMismatch);
        assert!(
            err.detail.contains("c1/n2") && err.detail.contains("c1/n1"),
            "{}",
            err.detail
        );
        let mut s = sample();
        s.ts_ms = NOW + 301_000;
        assert_eq!(reason(TOPIC, s.to_json().as_bytes()), Reason::Timestamp);
        // The same checks without a topic.
        assert_eq!(
            validate_line(s.to_json().as_bytes(), NOW, &LIMITS)
                .unwrap_err()
                .reason,
            Reason::Timestamp
        );
    }

    #[test]
    fn the_gate_charges_each_nodes_series_budget() {
        let payload = sample().to_json();
        let v = ValidationConfig {
            max_new_series_per_node: 2,
            ..ValidationConfig::default()
        };
        let mut gate = Gate::new(&v);
        // agent + gpu: two new series, within the budget; written lines are kept.
        match gate.admit(TOPIC, payload.as_bytes(), NOW) {
            Ok(Admitted::Sample { points, .. }) => assert_eq!(points, 2),
            _ => panic!("admitted"),
        }
        assert_eq!(gate.lines().iter().filter(|b| **b == b'\n').count(), 2);
        // The same series again cost nothing; one more is over.
        assert!(gate.admit_line(payload.as_bytes(), NOW).is_ok());
        let mut s = sample();
        s.gpus[0].uuid = "GPU-2".into();
        assert_eq!(
            gate.admit(TOPIC, s.to_json().as_bytes(), NOW)
                .err()
                .map(|e| e.reason),
            Some(Reason::SeriesBudget)
        );
    }

    #[test]
    fn old_samples_from_an_outage_are_accepted() {
        let mut s = sample();
        s.ts_ms = NOW - 3 * 86_400_000;
        s.agent_start_ms = s.ts_ms - 1000;
        assert!(validate(TOPIC, s.to_json().as_bytes(), NOW, &LIMITS).is_ok());
    }

    #[test]
    fn status_messages() {
        let ok = br#"{"online":false,"reason":"connection lost"}"#;
        let m = validate("nodewatt/v1/c1/n1/status", ok, NOW, &LIMITS).unwrap();
        assert!(
            matches!(m, Message::Status { ref node, ref status, .. } if node == "n1" && !status.online)
        );
        let bad = br#"{"online":true,"reason":"x\ny"}"#;
        assert_eq!(reason("nodewatt/v1/c1/n1/status", bad), Reason::Name);
        let old = br#"{"online":true,"ts_ms":5}"#;
        assert_eq!(reason("nodewatt/v1/c1/n1/status", old), Reason::Timestamp);
    }
}
