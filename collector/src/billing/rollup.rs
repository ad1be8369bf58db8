//! Hourly rollups of `usage`: what lets a month's bill read hours instead of every point.
//!
//! InfluxDB 1.x reads a series with a cursor of its own per shard, and `usage` has one
//! series per (node, project, user): a month of 1,000 shared nodes is about 100,000 series
//! and took a minute to sum even at one point per hour (docs/benchmarks.md). A rollup sums
//! one hour of `usage` across nodes, here with checked integers, and writes it back:
//!
//! - `usage_hourly` (cluster, project, user) and `usage_hourly_node` (cluster, node): the
//!   six sums and `rolled_ms`, at the hour's end (an hour is (end - 1 h, end], like a bill);
//! - `usage_hour_state`, no tags, at the same instant: `rolled_ms` (when the read of the
//!   hour's `usage` began), `rows`, `node_rows` and `points` (what it summed).
//!
//! A rollup is used only if it provably holds every point of its hour:
//! - before each write request with `usage` for an hour, the collector writes that hour's
//!   `usage_hour_state written_ms` = now (a request of its own, which must succeed first;
//!   `ingest`), then the `usage` at once;
//! - both requests end within the write timeout T, so a write whose marker says t is
//!   visible by t + 2T or failed; another collector's older marker can overwrite it, older
//!   by at most one request (T);
//! - so an hour whose `rolled_ms` is more than `settle` (at least 3T plus a minute;
//!   config) after its stored `written_ms` was complete when it was read.
//!
//! Each row carries its rollup's `rolled_ms` and the state counts the rows, so a rollup
//! written twice at once, or in part, is seen and not used. Any hour not provably
//! complete, and the parts of a period that are not whole hours, are read from `usage`
//! itself: a rollup changes how fast a bill is, never what it says.

use std::collections::BTreeMap;

use super::{add_to, columns, complete, count, Groups, Sums, FIELDS};
use crate::influx::Influx;
use crate::lineproto::{line, Value};

pub const HOUR_MS: u64 = 3_600_000;

/// The end of the hour holding a `usage` point at `ts_ms`: hours are (end - 1 h, end].
pub fn hour_of(ts_ms: u64) -> u64 {
    ts_ms.div_ceil(HOUR_MS).saturating_mul(HOUR_MS)
}

pub const STATE: &str = "usage_hour_state";
pub const BY_OWNER: &str = "usage_hourly";
pub const BY_NODE: &str = "usage_hourly_node";

/// The marker line a collector writes for an hour before writing `usage` into it.
pub fn written_line(out: &mut Vec<u8>, hour: u64, now_ms: u64) {
    line(
        out,
        STATE,
        &[],
        &[("written_ms", Value::I(now_ms as i64))],
        hour,
    );
}

/// What `usage_hour_state` says about one hour.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HourState {
    pub written_ms: Option<u64>,
    pub rolled_ms: Option<u64>,
    pub rows: Option<u64>,
    pub node_rows: Option<u64>,
}

impl HourState {
    /// The rollup's `rolled_ms` and row counts, if it holds every point of its hour.
    pub fn usable(&self, settle_ms: u64) -> Option<Rolled> {
        let rolled_ms = self.rolled_ms?;
        let fresh = self
            .written_ms
            .is_none_or(|w| w.saturating_add(settle_ms) < rolled_ms);
        fresh.then_some(Rolled {
            rolled_ms,
            rows: self.rows?,
            node_rows: self.node_rows?,
        })
    }

    /// Written into and not usable, and writes have been quiet for `settle`: a rollup
    /// made now would be usable.
    pub fn due(&self, now_ms: u64, settle_ms: u64) -> bool {
        self.written_ms
            .is_some_and(|w| w.saturating_add(settle_ms) < now_ms)
            && self.usable(settle_ms).is_none()
    }
}

/// A usable rollup of one hour: what its rows must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rolled {
    pub rolled_ms: u64,
    pub rows: u64,
    pub node_rows: u64,
}

pub type States = BTreeMap<u64, HourState>;

/// `usage_hour_state` over (from, to].
pub fn states_query(from_ms: u64, to_ms: u64) -> String {
    format!(
        "SELECT \"written_ms\", \"rolled_ms\", \"rows\", \"node_rows\" FROM \"{STATE}\" WHERE time > {from_ms}ms AND time <= {to_ms}ms"
    )
}

/// Hour states from [`states_query`]'s answer. A value that is not a count is an error.
pub fn parse_states(v: &serde_json::Value) -> Result<States, String> {
    complete(v)?;
    let mut states = States::new();
    for series in v["results"][0]["series"].as_array().into_iter().flatten() {
        let cols = columns(series)?;
        let at = |c: &str| cols.iter().position(|x| *x == c);
        let time = at("time").ok_or("usage_hour_state answer without time")?;
        for row in series["values"].as_array().into_iter().flatten() {
            let hour = row[time]
                .as_u64()
                .ok_or_else(|| format!("usage_hour_state time {} is not ms", row[time]))?;
            let name = || format!("usage_hour_state at {hour} ms");
            let get = |c: &str| -> Result<Option<u64>, String> {
                match at(c).map(|i| &row[i]) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(x) => count(x, c, &name).map(Some),
                }
            };
            states.insert(
                hour,
                HourState {
                    written_ms: get("written_ms")?,
                    rolled_ms: get("rolled_ms")?,
                    rows: get("rows")?,
                    node_rows: get("node_rows")?,
                },
            );
        }
    }
    Ok(states)
}

/// How a period (from, to] is read: whole hours with a usable rollup from the rollup,
/// everything else from `usage`, in as few (a, b] ranges as possible.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub hours: BTreeMap<u64, Rolled>,
    pub raw: Vec<(u64, u64)>,
}

pub fn split(from_ms: u64, to_ms: u64, states: &States, settle_ms: u64) -> Split {
    let mut s = Split::default();
    let mut at = from_ms;
    // The end of the first whole hour after `from`.
    let mut hour = hour_of(from_ms.saturating_add(HOUR_MS));
    while hour <= to_ms {
        if let Some(r) = states.get(&hour).and_then(|st| st.usable(settle_ms)) {
            if at < hour - HOUR_MS {
                push_range(&mut s.raw, at, hour - HOUR_MS);
            }
            s.hours.insert(hour, r);
            at = hour;
        }
        hour += HOUR_MS;
    }
    if at < to_ms {
        push_range(&mut s.raw, at, to_ms);
    }
    s
}

/// Appends (a, b], joined to the last range where they touch.
pub fn push_range(ranges: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    match ranges.last_mut() {
        Some(last) if last.1 == a => last.1 = b,
        _ => ranges.push((a, b)),
    }
}

/// Which rollup a bill grouped by these tags reads, if any.
pub fn table_for(tags: &[&str]) -> Option<&'static str> {
    match tags {
        ["project"] | ["user"] => Some(BY_OWNER),
        ["node"] => Some(BY_NODE),
        _ => None,
    }
}

/// The rows of `table` over (from, to], with their `rolled_ms`.
pub fn rows_query(table: &str, from_ms: u64, to_ms: u64) -> String {
    let tags = if table == BY_NODE {
        "\"cluster\", \"node\""
    } else {
        "\"cluster\", \"project\", \"user\""
    };
    let fields: Vec<String> = FIELDS.iter().map(|(f, _)| format!("\"{f}\"")).collect();
    format!(
        "SELECT \"rolled_ms\", {} FROM \"{table}\" WHERE time > {from_ms}ms AND time <= {to_ms}ms GROUP BY {tags}",
        fields.join(", ")
    )
}

/// Adds the rows of the `hours` wanted from a [`rows_query`] answer to `groups`, keyed by
/// `tags` (`project` rows only where `project` is given). Returns the hours whose rows do
/// not match their state (another rollup's rows, or fewer or more than it wrote): those
/// are left out, to be read from `usage`.
pub fn add_rows(
    groups: &mut Groups,
    v: &serde_json::Value,
    table: &str,
    tags: &[&'static str],
    project: Option<&str>,
    hours: &BTreeMap<u64, Rolled>,
) -> Result<Vec<u64>, String> {
    complete(v)?;
    struct Row<'a> {
        hour: u64,
        key: Vec<String>,
        rolled_ms: Option<u64>,
        sums: Sums,
        project: &'a str,
    }
    let mut rows = Vec::new();
    for series in v["results"][0]["series"].as_array().into_iter().flatten() {
        let cols = columns(series)?;
        let at = |c: &str| {
            cols.iter()
                .position(|x| *x == c)
                .ok_or(format!("{table} answer without column {c}"))
        };
        let (time, rolled) = (at("time")?, at("rolled_ms")?);
        let field_cols: Vec<usize> = FIELDS
            .iter()
            .map(|(f, _)| at(f))
            .collect::<Result<_, _>>()?;
        let tag = |t: &str| series["tags"][t].as_str().unwrap_or_default();
        let key: Vec<String> = tags.iter().map(|t| tag(t).to_string()).collect();
        for row in series["values"].as_array().into_iter().flatten() {
            let Some(hour) = row[time].as_u64().filter(|h| hours.contains_key(h)) else {
                continue;
            };
            let name = || format!("{table} {key:?} at {hour} ms");
            let sums = Sums::from_columns(|k| count(&row[field_cols[k]], FIELDS[k].0, &name))?;
            rows.push(Row {
                hour,
                key: key.clone(),
                rolled_ms: row[rolled].as_u64(),
                sums,
                project: tag("project"),
            });
        }
    }
    // Each hour: every row from its rollup, as many as it wrote.
    let mut seen: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
    for r in &rows {
        let e = seen.entry(r.hour).or_default();
        e.0 += 1;
        e.1 |= r.rolled_ms != Some(hours[&r.hour].rolled_ms);
    }
    let bad: Vec<u64> = hours
        .iter()
        .filter(|(h, want)| {
            let (n, mixed) = seen.get(h).copied().unwrap_or_default();
            let expect = if table == BY_NODE {
                want.node_rows
            } else {
                want.rows
            };
            mixed || n != expect
        })
        .map(|(h, _)| *h)
        .collect();
    for r in rows {
        if bad.binary_search(&r.hour).is_ok() || project.is_some_and(|p| p != r.project) {
            continue;
        }
        add_to(groups, r.key, &r.sums)?;
    }
    Ok(bad)
}

/// The sums of `usage` per series and hour over the hours ending at `first` ..= `last`:
/// what rollups are made of. InfluxQL's buckets are [start, start + 1 h); an offset of
/// 1 ns makes them (end - 1 h, end]. One query for many hours: its cost is mostly one
/// cursor per series of the shard, whatever the hours.
pub fn hours_query(first: u64, last: u64) -> String {
    let sums: Vec<String> = FIELDS
        .iter()
        .map(|(f, alias)| format!("SUM(\"{f}\") AS {alias}"))
        .collect();
    format!(
        "SELECT {}, COUNT(\"energy_uj\") AS points FROM \"usage\" WHERE time > {}ms AND time <= {last}ms GROUP BY time(1h, 1ns), \"cluster\", \"node\", \"project\", \"user\" fill(none)",
        sums.join(", "),
        first - HOUR_MS
    )
}

/// At most this many hours are rolled up by one query.
pub const MAX_HOURS_PER_QUERY: u64 = 24;

/// What rollups summed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub hours: u64,
    pub rows: u64,
    pub node_rows: u64,
    pub points: u64,
    pub energy_uj: u64,
}

/// The lines of the rollups of the hours ending at `first` ..= `last` from
/// [`hours_query`]'s answer, read from `rolled_ms` on: per hour, the rows of both tables,
/// then its state (an hour without `usage` gets a state with no rows). Sums that pass
/// 2^63 (what InfluxDB can store) are an error, never a wrapped row.
pub fn roll(
    first: u64,
    last: u64,
    rolled_ms: u64,
    v: &serde_json::Value,
    out: &mut Vec<u8>,
) -> Result<Summary, String> {
    complete(v)?;
    #[derive(Default)]
    struct Hour {
        by_owner: Groups,
        by_node: Groups,
        points: u64,
    }
    let mut hours: BTreeMap<u64, Hour> = BTreeMap::new();
    for series in v["results"][0]["series"].as_array().into_iter().flatten() {
        let cols = columns(series)?;
        let tag = |t: &str| series["tags"][t].as_str().unwrap_or_default().to_string();
        let time = cols
            .iter()
            .position(|x| *x == "time")
            .ok_or("usage answer without time")?;
        for row in series["values"].as_array().into_iter().flatten() {
            // The bucket starts 1 ns after the previous hour's end (ms: that end).
            let start = row[time]
                .as_u64()
                .ok_or_else(|| format!("usage answer time {} is not ms", row[time]))?;
            let hour = start / HOUR_MS * HOUR_MS + HOUR_MS;
            if !(first..=last).contains(&hour) {
                return Err(format!(
                    "usage answer for the hour to {hour} ms, not asked for"
                ));
            }
            let name = || {
                format!(
                    "usage cluster={} node={} project={} user={} in the hour to {hour} ms",
                    tag("cluster"),
                    tag("node"),
                    tag("project"),
                    tag("user")
                )
            };
            let get = |c: &str| -> Result<u64, String> {
                let i = cols
                    .iter()
                    .position(|x| *x == c)
                    .ok_or(format!("usage answer without column {c}"))?;
                count(&row[i], c, &name)
            };
            let sums = Sums::from_columns(|k| get(FIELDS[k].1))?;
            let h = hours.entry(hour).or_default();
            h.points += get("points")?;
            add_to(
                &mut h.by_owner,
                vec![tag("cluster"), tag("project"), tag("user")],
                &sums,
            )?;
            add_to(&mut h.by_node, vec![tag("cluster"), tag("node")], &sums)?;
        }
    }
    let mut total = Summary::default();
    let mut hour = first;
    while hour <= last {
        let h = hours.remove(&hour).unwrap_or_default();
        for (table, groups, keys) in [
            (BY_OWNER, &h.by_owner, &["cluster", "project", "user"][..]),
            (BY_NODE, &h.by_node, &["cluster", "node"][..]),
        ] {
            for (key, sums) in groups {
                let fields = sums_fields(sums, rolled_ms)
                    .ok_or_else(|| format!("{table} {key:?} at {hour} ms passes 2^63"))?;
                let tags: Vec<(&str, &str)> = keys
                    .iter()
                    .zip(key)
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (*k, v.as_str()))
                    .collect();
                line(out, table, &tags, &fields, hour);
                if table == BY_OWNER {
                    total.energy_uj = total.energy_uj.saturating_add(sums.energy_uj());
                }
            }
        }
        let n = |x: usize| Value::I(x as i64);
        line(
            out,
            STATE,
            &[],
            &[
                ("rolled_ms", Value::I(rolled_ms as i64)),
                ("rows", n(h.by_owner.len())),
                ("node_rows", n(h.by_node.len())),
                ("points", Value::I(h.points as i64)),
            ],
            hour,
        );
        total.hours += 1;
        total.rows += h.by_owner.len() as u64;
        total.node_rows += h.by_node.len() as u64;
        total.points += h.points;
        hour += HOUR_MS;
    }
    Ok(total)
}

/// A row's fields as InfluxDB stores them (signed 64 bits), or `None` past that.
fn sums_fields(s: &Sums, rolled_ms: u64) -> Option<Vec<(&'static str, Value<'static>)>> {
    let i = |x: u64| i64::try_from(x).ok().map(Value::I);
    Some(vec![
        ("energy_gpu_uj", i(s.gpu_uj)?),
        ("energy_cpu_uj", i(s.cpu_uj)?),
        ("energy_dram_uj", i(s.dram_uj)?),
        ("energy_other_uj", i(s.other_uj)?),
        ("energy_uj", i(s.energy_uj())?),
        ("gpu_ms", i(s.gpu_ms)?),
        ("cpu_us", i(s.cpu_us)?),
        ("rolled_ms", i(rolled_ms)?),
    ])
}

/// What [`roll_hours`] did: the hours rolled up, and an error for each run of hours that
/// failed (left without a usable rollup, so read from `usage`).
#[derive(Debug, Default)]
pub struct Rolls {
    pub done: Summary,
    pub failed: Vec<String>,
}

/// Rolls up the given hour ends (sorted): each run of consecutive hours, at most
/// [`MAX_HOURS_PER_QUERY`] at a time, is read with one query and written with one
/// request. A run that fails does not stop the later ones: one bad hour must not hold
/// every newer hour on raw reads.
pub async fn roll_hours(influx: &Influx, hours: &[u64]) -> Rolls {
    let mut r = Rolls::default();
    let mut i = 0;
    while i < hours.len() {
        let first = hours[i];
        let mut last = first;
        while i + 1 < hours.len()
            && hours[i + 1] == last + HOUR_MS
            && (last + HOUR_MS - first) / HOUR_MS < MAX_HOURS_PER_QUERY
        {
            i += 1;
            last = hours[i];
        }
        i += 1;
        match roll_run(influx, first, last).await {
            Ok(s) => {
                let t = &mut r.done;
                t.hours += s.hours;
                t.rows += s.rows;
                t.node_rows += s.node_rows;
                t.points += s.points;
                t.energy_uj = t.energy_uj.saturating_add(s.energy_uj);
            }
            Err(e) => r
                .failed
                .push(format!("the hours ending {first}..={last} ms: {e}")),
        }
    }
    r
}

async fn roll_run(influx: &Influx, first: u64, last: u64) -> Result<Summary, String> {
    let rolled_ms = nodewatt_common::now_ms();
    let v = influx.query(&hours_query(first, last)).await?;
    let mut out = Vec::new();
    let s = roll(first, last, rolled_ms, &v, &mut out)?;
    influx.write(&out).await.map_err(|e| e.to_string())?;
    Ok(s)
}

/// The hours written into since their last rollup and quiet for `settle`, oldest first,
/// among those of the last `lookback`.
pub async fn due_hours(
    influx: &Influx,
    now_ms: u64,
    lookback_ms: u64,
    settle_ms: u64,
) -> Result<Vec<u64>, String> {
    let v = influx
        .query(&states_query(now_ms.saturating_sub(lookback_ms), now_ms))
        .await?;
    Ok(parse_states(&v)?
        .into_iter()
        .filter(|(_, st)| st.due(now_ms, settle_ms))
        .map(|(h, _)| h)
        .collect())
}

/// What [`roll_range`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeReport {
    pub rolled: u64,
    pub points: u64,
    /// Already usable, left alone.
    pub usable: u64,
    /// Written into less than `settle` ago: a rollup now would not be usable yet.
    pub settling: u64,
    /// Not ended yet: left for later.
    pub future: u64,
    /// One error per run of hours that failed.
    pub failed: Vec<String>,
}

/// Rolls up every whole hour of (from, to] that has no usable rollup (every one with
/// `all`): the backfill of data older than the markers, or after `rollups` was off.
pub async fn roll_range(
    influx: &Influx,
    from_ms: u64,
    to_ms: u64,
    settle_ms: u64,
    all: bool,
) -> Result<RangeReport, String> {
    let states = parse_states(&influx.query(&states_query(from_ms, to_ms)).await?)?;
    let now = nodewatt_common::now_ms();
    let mut r = RangeReport::default();
    let mut todo = Vec::new();
    let mut hour = hour_of(from_ms.saturating_add(HOUR_MS));
    while hour <= to_ms {
        let st = states.get(&hour).copied().unwrap_or_default();
        if hour > now {
            r.future += 1;
        } else if st
            .written_ms
            .is_some_and(|w| w.saturating_add(settle_ms) >= now)
        {
            r.settling += 1;
        } else if !all && st.usable(settle_ms).is_some() {
            r.usable += 1;
        } else {
            todo.push(hour);
        }
        hour += HOUR_MS;
    }
    let rolls = roll_hours(influx, &todo).await;
    r.rolled = rolls.done.hours;
    r.points = rolls.done.points;
    r.failed = rolls.failed;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = HOUR_MS;
    const SETTLE: u64 = 600_000;

    fn rolled(at: u64) -> HourState {
        HourState {
            written_ms: Some(at - SETTLE - 1),
            rolled_ms: Some(at),
            rows: Some(2),
            node_rows: Some(1),
        }
    }

    #[test]
    fn hours_end_on_the_hour_and_hold_their_end() {
        assert_eq!(hour_of(H), H);
        assert_eq!(hour_of(H + 1), 2 * H);
        assert_eq!(hour_of(2 * H - 1), 2 * H);
    }

    #[test]
    fn a_rollup_is_usable_only_when_read_settle_after_the_last_write() {
        let mut st = rolled(10 * H);
        assert!(st.usable(SETTLE).is_some());
        st.written_ms = Some(10 * H - SETTLE);
        assert!(
            st.usable(SETTLE).is_none(),
            "a write settle before the read"
        );
        assert!(!st.due(10 * H, SETTLE), "still settling");
        assert!(st.due(10 * H + 1, SETTLE));
        st.written_ms = Some(11 * H);
        assert!(st.usable(SETTLE).is_none(), "a write after the rollup");
        // Rolled up by `rollup` without any marker (data older than markers): usable.
        st.written_ms = None;
        assert!(st.usable(SETTLE).is_some());
        assert!(!st.due(20 * H, SETTLE), "nothing written, nothing due");
        // Written, never rolled: due once quiet.
        let fresh = HourState {
            written_ms: Some(5 * H),
            ..HourState::default()
        };
        assert!(fresh.usable(SETTLE).is_none());
        assert!(fresh.due(5 * H + SETTLE + 1, SETTLE));
        // A state without row counts (a partial write of the state) is not usable.
        st.rows = None;
        assert!(st.usable(SETTLE).is_none());
    }

    #[test]
    fn a_period_reads_usable_hours_from_rollups_and_the_rest_raw() {
        let states: States = [
            (3 * H, rolled(4 * H)),
            (4 * H, rolled(5 * H)),
            (6 * H, rolled(7 * H)),
        ]
        .into_iter()
        .collect();
        // (1.5 h, 6.5 h]: edges raw, hour 5 (no rollup) raw, hours 3, 4, 6 rolled.
        let s = split(H + H / 2, 6 * H + H / 2, &states, SETTLE);
        assert_eq!(
            s.hours.keys().copied().collect::<Vec<_>>(),
            [3 * H, 4 * H, 6 * H]
        );
        assert_eq!(
            s.raw,
            [(H + H / 2, 2 * H), (4 * H, 5 * H), (6 * H, 6 * H + H / 2)]
        );
        // Aligned period, all rolled: nothing raw.
        let s = split(2 * H, 4 * H, &states, SETTLE);
        assert_eq!(s.raw, []);
        assert_eq!(s.hours.len(), 2);
        // No rollups: one raw range, whatever the alignment.
        assert_eq!(
            split(7, 9 * H + 5, &States::new(), SETTLE).raw,
            [(7, 9 * H + 5)]
        );
        // Shorter than an hour inside one: raw.
        assert_eq!(
            split(3 * H - 10, 3 * H - 5, &states, SETTLE).raw,
            [(3 * H - 10, 3 * H - 5)]
        );
        // A stale rollup is read raw.
        let mut stale = states.clone();
        stale.get_mut(&(4 * H)).unwrap().written_ms = Some(5 * H);
        let s = split(2 * H, 4 * H, &stale, SETTLE);
        assert_eq!(s.raw, [(3 * H, 4 * H)]);
    }

    fn answer(series: &str) -> serde_json::Value {
        serde_json::from_str(&format!(
            r#"{{"results":[{{"statement_id":0,"series":[{series}]}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_rollup_sums_nodes_with_checked_integers_and_counts_its_rows() {
        let row = |node: &str, p: &str, gpu: u64, points: u64| {
            format!(
                r#"{{"name":"usage","tags":{{"cluster":"c","node":"{node}","project":"{p}","user":"u"}},"columns":["time","gpu_uj","cpu_uj","dram_uj","other_uj","gpu_ms","cpu_us","points"],"values":[[7200000,{gpu},1,2,3,4,5,{points}]]}}"#
            )
        };
        let v = answer(
            &[
                row("n1", "p", 10, 60),
                row("n2", "p", 20, 60),
                row("n2", "q", 7, 3),
            ]
            .join(","),
        );
        let mut out = Vec::new();
        let s = roll(3 * H, 4 * H, 99, &v, &mut out).unwrap();
        assert_eq!(
            s,
            Summary {
                hours: 2,
                rows: 2,
                node_rows: 2,
                points: 123,
                energy_uj: (10 + 6) + (20 + 6) + (7 + 6),
            }
        );
        let text = String::from_utf8(out).unwrap();
        let t = 3 * H;
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                format!("usage_hourly,cluster=c,project=p,user=u energy_gpu_uj=30i,energy_cpu_uj=2i,energy_dram_uj=4i,energy_other_uj=6i,energy_uj=42i,gpu_ms=8i,cpu_us=10i,rolled_ms=99i {t}"),
                format!("usage_hourly,cluster=c,project=q,user=u energy_gpu_uj=7i,energy_cpu_uj=1i,energy_dram_uj=2i,energy_other_uj=3i,energy_uj=13i,gpu_ms=4i,cpu_us=5i,rolled_ms=99i {t}"),
                format!("usage_hourly_node,cluster=c,node=n1 energy_gpu_uj=10i,energy_cpu_uj=1i,energy_dram_uj=2i,energy_other_uj=3i,energy_uj=16i,gpu_ms=4i,cpu_us=5i,rolled_ms=99i {t}"),
                format!("usage_hourly_node,cluster=c,node=n2 energy_gpu_uj=27i,energy_cpu_uj=2i,energy_dram_uj=4i,energy_other_uj=6i,energy_uj=39i,gpu_ms=8i,cpu_us=10i,rolled_ms=99i {t}"),
                format!("usage_hour_state rolled_ms=99i,rows=2i,node_rows=2i,points=123i {t}"),
                format!("usage_hour_state rolled_ms=99i,rows=0i,node_rows=0i,points=0i {}", t + H),
            ],
            "an hour without usage is rolled up empty"
        );
        // An answer for an hour not asked for is an error.
        let err = roll(4 * H, 5 * H, 99, &v, &mut Vec::new()).unwrap_err();
        assert!(err.contains("not asked for"), "{err}");
        // Rows that pass what InfluxDB stores are an error, not a wrapped row.
        let big = i64::MAX as u64 / 2 + 1;
        let v = answer(&[row("n1", "p", big, 1), row("n2", "p", big, 1)].join(","));
        let err = roll(3 * H, 3 * H, 99, &v, &mut Vec::new()).unwrap_err();
        assert!(
            err.contains("usage_hourly") && err.contains("2^63"),
            "{err}"
        );
        // A wrapped (negative) sum from InfluxDB names its series.
        let v = answer(&row("n1", "p", 0, 1).replace("[7200000,0,", "[7200000,-5,"));
        let err = roll(3 * H, 3 * H, 99, &v, &mut Vec::new()).unwrap_err();
        assert!(err.contains("node=n1"), "{err}");
    }

    #[test]
    fn rows_of_another_rollup_or_a_missing_row_send_the_hour_to_raw() {
        let series = |p: &str, rows: &str| {
            format!(
                r#"{{"name":"usage_hourly","tags":{{"cluster":"c","project":"{p}","user":"u"}},"columns":["time","rolled_ms","energy_gpu_uj","energy_cpu_uj","energy_dram_uj","energy_other_uj","gpu_ms","cpu_us"],"values":[{rows}]}}"#
            )
        };
        let r = |hour: u64, rolled: u64, gpu: u64| format!("[{hour},{rolled},{gpu},0,0,0,1,0]");
        let v = answer(
            &[
                series(
                    "p",
                    &[r(H, 7, 1), r(2 * H, 8, 10), r(3 * H, 9, 100)].join(","),
                ),
                series(
                    "q",
                    &[r(H, 7, 2), r(2 * H, 1, 20), r(4 * H, 5, 1000)].join(","),
                ),
            ]
            .join(","),
        );
        let want = |rolled_ms| Rolled {
            rolled_ms,
            rows: 2,
            node_rows: 0,
        };
        // Hour 1: both rows of rollup 7. Hour 2: q's row is another rollup's. Hour 3: one
        // row of two. Hour 4 is not asked for.
        let hours = [(H, want(7)), (2 * H, want(8)), (3 * H, want(9))]
            .into_iter()
            .collect();
        let mut g = Groups::new();
        let bad = add_rows(&mut g, &v, BY_OWNER, &["project"], None, &hours).unwrap();
        assert_eq!(bad, [2 * H, 3 * H]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[&vec!["p".to_string()]].gpu_uj, 1);
        assert_eq!(g[&vec!["q".to_string()]].gpu_uj, 2);
        // One project: counted over all rows, summed over its own.
        let mut g = Groups::new();
        let bad = add_rows(&mut g, &v, BY_OWNER, &["user"], Some("q"), &hours).unwrap();
        assert_eq!(bad, [2 * H, 3 * H]);
        assert_eq!(g.len(), 1);
        assert_eq!(g[&vec!["u".to_string()]].gpu_uj, 2);
    }

    #[test]
    fn states_parse_and_refuse_what_is_not_a_count() {
        let v = answer(
            r#"{"name":"usage_hour_state","columns":["time","written_ms","rolled_ms","rows","node_rows"],"values":[[3600000,5,null,null,null],[7200000,1,9,2,1]]}"#,
        );
        let s = parse_states(&v).unwrap();
        assert_eq!(s[&H].written_ms, Some(5));
        assert_eq!(s[&H].rolled_ms, None);
        assert_eq!(
            s[&(2 * H)].usable(0),
            Some(Rolled {
                rolled_ms: 9,
                rows: 2,
                node_rows: 1
            })
        );
        let v = answer(
            r#"{"name":"usage_hour_state","columns":["time","written_ms","rolled_ms","rows","node_rows"],"values":[[3600000,-5,null,null,null]]}"#,
        );
        assert!(parse_states(&v).unwrap_err().contains("written_ms"));
        assert_eq!(parse_states(&answer("")).unwrap(), States::new());
    }
}
