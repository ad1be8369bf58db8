//! MQTT topics: `nodewatt/v1/<cluster>/<node>/sample` and `.../status`.

use crate::check::{invalid, Invalid, Reason};
use crate::name::NodeName;

pub const TOPIC_ROOT: &str = "nodewatt/v1";

pub fn sample_topic(cluster: &str, node: &str) -> String {
    format!("{TOPIC_ROOT}/{cluster}/{node}/sample")
}

pub fn status_topic(cluster: &str, node: &str) -> String {
    format!("{TOPIC_ROOT}/{cluster}/{node}/status")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Sample,
    Status,
}

/// A nodewatt topic, its names parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub cluster: NodeName,
    pub node: NodeName,
    pub kind: TopicKind,
}

impl Topic {
    pub fn parse(topic: &str) -> Result<Topic, Invalid> {
        let not_ours = || {
            let shown: String = topic.chars().take(120).collect();
            invalid(Reason::Topic, format!("not a nodewatt topic: {shown:?}"))
        };
        let rest = topic
            .strip_prefix(TOPIC_ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(not_ours)?;
        let mut parts = rest.split('/');
        let (Some(cluster), Some(node), Some(kind), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(not_ours());
        };
        let kind = match kind {
            "sample" => TopicKind::Sample,
            "status" => TopicKind::Status,
            _ => return Err(not_ours()),
        };
        let name =
            |v: &str| NodeName::new(v).map_err(|e| invalid(Reason::Name, format!("topic: {e}")));
        Ok(Topic {
            cluster: name(cluster)?,
            node: name(node)?,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        assert_eq!(sample_topic("c1", "n-1"), "nodewatt/v1/c1/n-1/sample");
        let t = Topic::parse("nodewatt/v1/c1/n-1/sample").unwrap();
        assert_eq!(
            (t.cluster.as_str(), t.node.as_str(), t.kind),
            ("c1", "n-1", TopicKind::Sample)
        );
        assert_eq!(
            Topic::parse(&status_topic("c", "n")).unwrap().kind,
            TopicKind::Status
        );
        for bad in [
            "nodewatt/v1/c/n",
            "nodewatt/v1/c/n/sample/x",
            "nodewatt/v2/c/n/sample",
            "nodewatt/v1/c/n/other",
            "nodewatt/v1c/n/sample",
        ] {
            assert_eq!(
                Topic::parse(bad).unwrap_err().reason,
                Reason::Topic,
                "{bad}"
            );
        }
        for bad in [
            "nodewatt/v1//n/sample",
            "nodewatt/v1/c/n x/sample",
            "nodewatt/v1/c/n'/status",
        ] {
            assert_eq!(Topic::parse(bad).unwrap_err().reason, Reason::Name, "{bad}");
        }
    }
}
