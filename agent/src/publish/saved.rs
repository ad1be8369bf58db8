//! The outbox saved at a clean stop and loaded at the next start, so a restart loses no
//! unacknowledged sample.

use nodewatt_wire::Sample;

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

/// Writes samples as JSON lines, atomically and synced.
pub fn save(path: &std::path::Path, samples: &[&Sample]) -> std::io::Result<()> {
    let mut text = String::new();
    for s in samples {
        text.push_str(&s.to_json());
        text.push('\n');
    }
    nodewatt_common::write_atomic(path, text.as_bytes(), true)
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
