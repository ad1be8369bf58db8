//! A budget of new series per node: a node whose messages would create more new series
//! (measurement plus tag set) in one window than it may is rejected, counted and logged,
//! so one broken or hostile node cannot blow up InfluxDB's index for everyone.
//!
//! Pure: it sees the encoded lines and the clock, nothing else. Memory is bounded by the
//! series seen within the last two windows (older ones are forgotten, and count as new if
//! they come back).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

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

/// Hashes a set of series hashes by taking them as they are: they are outputs of a
/// randomly keyed SipHash already, as unpredictable to a node as hashing them again.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; anything else is folded in, never lost.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type SeriesSet = HashSet<u64, BuildHasherDefault<Prehashed>>;

#[derive(Default)]
struct Node {
    /// Series seen in this window and in the previous one.
    current: SeriesSet,
    previous: SeriesSet,
    window: u64,
    new_in_window: usize,
}

pub struct SeriesBudget {
    max_new: usize,
    window_ms: u64,
    hasher: std::collections::hash_map::RandomState,
    /// By cluster, then node: looked up by reference, without copying the names.
    nodes: HashMap<NodeName, HashMap<NodeName, Node>>,
    /// Scratch space of [`admit`](Self::admit), kept between messages.
    hashes: Vec<u64>,
    fresh: Vec<u64>,
}

impl SeriesBudget {
    pub fn new(max_new: usize, window_ms: u64) -> SeriesBudget {
        SeriesBudget {
            max_new,
            window_ms: window_ms.max(1),
            hasher: Default::default(),
            nodes: HashMap::new(),
            hashes: Vec::new(),
            fresh: Vec::new(),
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
        let hasher = &self.hasher;
        self.hashes.clear();
        // Line ends found with SIMD (memchr); only the keys are scanned byte by byte.
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', lines).chain([lines.len()]) {
            let line = &lines[start..end];
            start = end + 1;
            if !line.is_empty() {
                self.hashes.push(hasher.hash_one(series_key(line)));
            }
        }
        if !self.nodes.contains_key(node.0.as_str()) {
            self.nodes.insert(node.0.clone(), HashMap::new());
        }
        let cluster = self.nodes.get_mut(node.0.as_str()).expect("inserted");
        if !cluster.contains_key(node.1.as_str()) {
            cluster.insert(node.1.clone(), Node::default());
        }
        let n = cluster.get_mut(node.1.as_str()).expect("inserted");
        if window != n.window {
            n.previous = if window == n.window + 1 {
                std::mem::take(&mut n.current)
            } else {
                SeriesSet::default()
            };
            n.current.clear();
            n.window = window;
            n.new_in_window = 0;
        }
        self.fresh.clear();
        self.fresh.extend(
            self.hashes
                .iter()
                .copied()
                .filter(|h| !n.current.contains(h) && !n.previous.contains(h)),
        );
        self.fresh.sort_unstable();
        self.fresh.dedup();
        let fresh = self.fresh.len();
        if n.new_in_window + fresh > self.max_new {
            return Err(invalid(
                Reason::SeriesBudget,
                format!(
                    "{}/{} would create {} new series, {} already this window (at most {} per {} s)",
                    node.0,
                    node.1,
                    fresh,
                    n.new_in_window,
                    self.max_new,
                    self.window_ms / 1000
                ),
            ));
        }
        n.new_in_window += fresh;
        // Known series move to the current window so they are not forgotten while in use.
        n.current.extend(self.hashes.iter().copied());
        Ok(fresh)
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
    fn every_non_empty_line_counts_with_or_without_a_final_newline() {
        let (c, n) = (name("c"), name("n"));
        let mut b = SeriesBudget::new(10, 60_000);
        assert_eq!(b.admit((&c, &n), b"", 0), Ok(0));
        assert_eq!(b.admit((&c, &n), b"a x=1 1\n\nb x=1 1", 0), Ok(2));
        assert_eq!(b.admit((&c, &n), b"\nc x=1 1\na y=2 2\n", 0), Ok(1));
        assert_eq!(b.admit((&c, &n), b"d\\ e x=1 1", 0), Ok(1));
        assert_eq!(b.admit((&c, &n), b"d\\ e y=2 2\n", 0), Ok(0));
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
