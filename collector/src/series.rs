//! A budget of new series per node: a node whose messages would create more new series
//! (measurement plus tag set) in one window than it may is rejected, counted and logged,
//! so one broken or hostile node cannot blow up InfluxDB's index for everyone.
//!
//! Pure: it sees the encoded lines and the clock, nothing else. Memory is bounded by the
//! series seen within the last two windows (older ones are forgotten, and count as new if
//! they come back).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;

use nodewatt_wire::{invalid, Invalid, NodeName, Reason};

/// The series key of one line: everything before the first unescaped space.
pub fn series_key(line: &[u8]) -> &[u8] {
    let mut i = 0;
    while i < line.len() {
        match line[i] {
            b'\\' => i += 2,
            b' ' => return &line[..i],
            _ => i += 1,
        }
    }
    line
}

#[derive(Default)]
struct Node {
    /// Series seen in this window and in the previous one.
    current: HashSet<u64>,
    previous: HashSet<u64>,
    window: u64,
    new_in_window: usize,
}

pub struct SeriesBudget {
    max_new: usize,
    window_ms: u64,
    hasher: std::collections::hash_map::RandomState,
    nodes: HashMap<(NodeName, NodeName), Node>,
}

impl SeriesBudget {
    pub fn new(max_new: usize, window_ms: u64) -> SeriesBudget {
        SeriesBudget {
            max_new,
            window_ms: window_ms.max(1),
            hasher: Default::default(),
            nodes: HashMap::new(),
        }
    }

    /// Admits the lines of one message of `node` (all or nothing), returning how many
    /// new series it brought.
    pub fn admit(
        &mut self,
        node: (&NodeName, &NodeName),
        lines: &[u8],
        now_ms: u64,
    ) -> Result<usize, Invalid> {
        let window = now_ms / self.window_ms;
        let hashes: Vec<u64> = lines
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| self.hasher.hash_one(series_key(l)))
            .collect();
        let key = (node.0.clone(), node.1.clone());
        let n = self.nodes.entry(key).or_default();
        if window != n.window {
            n.previous = if window == n.window + 1 {
                std::mem::take(&mut n.current)
            } else {
                HashSet::new()
            };
            n.current.clear();
            n.window = window;
            n.new_in_window = 0;
        }
        let mut fresh: Vec<u64> = hashes
            .iter()
            .copied()
            .filter(|h| !n.current.contains(h) && !n.previous.contains(h))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        if n.new_in_window + fresh.len() > self.max_new {
            return Err(invalid(
                Reason::SeriesBudget,
                format!(
                    "{}/{} would create {} new series, {} already this window (at most {} per {} s)",
                    node.0,
                    node.1,
                    fresh.len(),
                    n.new_in_window,
                    self.max_new,
                    self.window_ms / 1000
                ),
            ));
        }
        n.new_in_window += fresh.len();
        // Known series move to the current window so they are not forgotten while in use.
        n.current.extend(hashes);
        Ok(fresh.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(v: &str) -> NodeName {
        NodeName::new(v).unwrap()
    }

    #[test]
    fn keys_stop_at_the_first_unescaped_space() {
        assert_eq!(
            series_key(b"gpu,model=A\\ B,node=n1 power_w=1 5"),
            b"gpu,model=A\\ B,node=n1"
        );
        assert_eq!(series_key(b"x"), b"x");
        assert_eq!(series_key(b"trailing\\"), b"trailing\\");
    }

    #[test]
    fn a_node_gets_its_budget_and_no_more() {
        let (c, n1, n2) = (name("c"), name("n1"), name("n2"));
        let mut b = SeriesBudget::new(3, 60_000);
        let lines = |tags: &[&str]| {
            tags.iter()
                .map(|t| format!("usage,project={t} x=1i 1\n"))
                .collect::<String>()
                .into_bytes()
        };
        assert_eq!(b.admit((&c, &n1), &lines(&["a", "b"]), 0), Ok(2));
        // The same series again are free.
        assert_eq!(b.admit((&c, &n1), &lines(&["a", "b", "a"]), 1), Ok(0));
        let err = b.admit((&c, &n1), &lines(&["x", "y"]), 2).unwrap_err();
        assert_eq!(err.reason, Reason::SeriesBudget);
        assert!(err.detail.contains("c/n1"), "{}", err.detail);
        // All or nothing: the rejected message recorded none of its series.
        assert_eq!(b.admit((&c, &n1), &lines(&["x"]), 3), Ok(1));
        // Another node has its own budget.
        assert_eq!(b.admit((&c, &n2), &lines(&["x", "y", "z"]), 4), Ok(3));
        // A new window, a new budget; series in use are still known.
        assert_eq!(
            b.admit((&c, &n1), &lines(&["a", "p", "q", "r"]), 60_000),
            Ok(3)
        );
        // Two windows later, unseen series are forgotten.
        assert_eq!(b.admit((&c, &n1), &lines(&["b"]), 180_000), Ok(1));
    }
}
