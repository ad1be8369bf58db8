//! Keeping every message within the MQTT packet limit, so no sample can become a poison
//! pill that the client refuses and the outbox retries forever.
//!
//! A node running thousands of jobs makes large samples: one usage entry per job, and at
//! each totals interval one total per job. In order, until the message fits:
//! 1. usage entries beyond [`MAX_USAGE_ENTRIES`] are folded per (project, user): the
//!    collector stores usage per owner anyway, so nothing billed changes (the `jobs`
//!    count of such points is left out);
//! 2. job totals beyond [`MAX_TOTALS`] (or all, if still too large) wait for the next
//!    messages: totals are cumulative, a later one of a job supersedes an earlier one,
//!    and ended jobs' totals go first;
//! 3. as a last resort the usage is folded into `_unattributed`: energy is kept, only its
//!    attribution is lost, and that is logged as an error.

use std::collections::HashMap;

use nodewatt_wire::{Amounts, JobTotal, Project, Sample, Usage};

/// Usage entries one message carries before they are folded per owner.
pub const MAX_USAGE_ENTRIES: usize = 512;
/// Job totals one message carries; the rest follow in the next ones.
pub const MAX_TOTALS: usize = 256;

/// What [`fit`] had to do.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fitted {
    pub folded: bool,
    pub unattributed: bool,
}

/// Folds usage entries per (project, user), in order of first appearance.
pub fn fold_by_owner(usage: &mut Vec<Usage>) {
    let mut out: Vec<Usage> = Vec::new();
    let mut index: HashMap<(Project, Option<nodewatt_wire::User>), usize> = HashMap::new();
    for u in usage.drain(..) {
        let i = *index
            .entry((u.project.clone(), u.user.clone()))
            .or_insert_with(|| {
                out.push(Usage {
                    job: None,
                    project: u.project.clone(),
                    user: u.user.clone(),
                    amounts: Amounts::default(),
                });
                out.len() - 1
            });
        out[i].amounts.add(&u.amounts);
    }
    *usage = out;
}

/// Adds `more` to `pending`, keeping one total per job run (the latest) and the order in
/// which they go out: ended jobs first, then the longest waiting.
pub fn queue_totals(pending: &mut Vec<JobTotal>, more: impl IntoIterator<Item = JobTotal>) {
    for t in more {
        match pending
            .iter_mut()
            .find(|p| p.job == t.job && p.since_ms == t.since_ms)
        {
            Some(p) if (t.ended, t.until_ms) >= (p.ended, p.until_ms) => *p = t,
            Some(_) => {}
            None => pending.push(t),
        }
    }
    pending.sort_by_key(|t| (!t.ended, t.until_ms));
}

/// Shapes `s` to serialise within `limit` bytes; totals that do not fit are added to
/// `pending`, and the first [`MAX_TOTALS`] of `pending` ride along.
pub fn fit(s: &mut Sample, pending: &mut Vec<JobTotal>, limit: usize) -> Fitted {
    let mut done = Fitted::default();
    queue_totals(pending, s.job_totals.drain(..));
    if s.usage.len() > MAX_USAGE_ENTRIES {
        fold_by_owner(&mut s.usage);
        done.folded = true;
    }
    let mut take = pending.len().min(MAX_TOTALS);
    // The common case, a few jobs, is far below any limit: no trial serialisation.
    let small = s.usage.len() + take <= 64;
    loop {
        s.job_totals = pending[..take].to_vec();
        if small || s.to_json().len() <= limit {
            break;
        }
        if take > 0 {
            take /= 2;
            continue;
        }
        if s.usage.len() > 1 {
            let mut all = Amounts::default();
            for u in &s.usage {
                all.add(&u.amounts);
            }
            s.usage = vec![Usage {
                job: None,
                project: Project::unattributed(),
                user: None,
                amounts: all,
            }];
            done.unattributed = true;
            continue;
        }
        break; // devices alone exceed the limit: nothing billing-related is left to move
    }
    pending.drain(..take);
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;

    fn total(job: &str, until: u64, ended: bool) -> JobTotal {
        JobTotal {
            job: n(job),
            project: n("p"),
            user: n("u"),
            start_ms: 1,
            since_ms: 1,
            until_ms: until,
            ended,
            gpus: vec![],
            amounts: Amounts::default(),
        }
    }

    fn usage(i: usize) -> Usage {
        Usage {
            job: Some(n(&i.to_string())),
            project: n(&format!("proj-{}", i % 7)),
            user: Some(n(&format!("user.{}@corp.example", i % 5))),
            amounts: Amounts {
                gpu_uj: i as u64,
                ..Amounts::default()
            },
        }
    }

    #[test]
    fn a_later_total_supersedes_and_ended_ones_go_first() {
        let mut p = Vec::new();
        queue_totals(&mut p, [total("1", 10, false), total("2", 5, false)]);
        queue_totals(&mut p, [total("1", 20, false), total("2", 4, false)]);
        queue_totals(&mut p, [total("3", 30, true)]);
        let got: Vec<(&str, u64)> = p.iter().map(|t| (t.job.as_str(), t.until_ms)).collect();
        assert_eq!(got, [("3", 30), ("2", 5), ("1", 20)]);
    }

    #[test]
    fn two_thousand_jobs_fit_and_every_total_goes_out() {
        let mut s = crate::testutil::empty_sample();
        s.usage = (0..2_000).map(usage).collect();
        let before: u64 = s.usage.iter().map(|u| u.amounts.gpu_uj).sum();
        s.job_totals = (0..2_000)
            .map(|i| total(&i.to_string(), 9, i % 2 == 0))
            .collect();
        assert!(s.to_json().len() > 256 * 1024, "too large as it was");
        let mut pending = Vec::new();
        let done = fit(&mut s, &mut pending, 256 * 1024);
        assert!(done.folded && !done.unattributed);
        assert!(s.to_json().len() <= 256 * 1024);
        assert_eq!(s.usage.len(), 35, "7 projects x 5 users");
        assert_eq!(
            s.usage.iter().map(|u| u.amounts.gpu_uj).sum::<u64>(),
            before
        );
        assert!(s.job_totals.iter().all(|t| t.ended), "ended first");
        let mut sent = s.job_totals.len();
        while !pending.is_empty() {
            let mut next = crate::testutil::empty_sample();
            fit(&mut next, &mut pending, 256 * 1024);
            assert!(!next.job_totals.is_empty());
            sent += next.job_totals.len();
        }
        assert_eq!(sent, 2_000);
    }

    #[test]
    fn as_a_last_resort_usage_is_kept_as_unattributed() {
        let mut s = crate::testutil::empty_sample();
        s.usage = (0..400).map(usage).collect();
        let before: u64 = s.usage.iter().map(|u| u.amounts.gpu_uj).sum();
        let mut pending = vec![total("1", 5, true)];
        let done = fit(&mut s, &mut pending, 2_000);
        assert!(done.unattributed);
        assert_eq!(s.usage.len(), 1);
        assert_eq!(s.usage[0].amounts.gpu_uj, before);
        assert_eq!(pending.len(), 1, "the total waits");
    }
}
