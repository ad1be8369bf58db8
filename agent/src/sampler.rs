//! Builds the enabled sources from the config and turns one tick into one [`Sample`].

use std::time::Instant;

use nodewatt_wire::{NodeName, Sample, SourceStatus};

use crate::accounting::{ledger::Ledger, Accountant};
use crate::cadence::{Aggregate, Cadence};
use crate::config::Config;
use crate::deltas::Deltas;
use crate::sources::{
    cpu::CpuSource,
    hwmon::Hwmon,
    nvml::{NvmlOptions, NvmlSource},
    rapl::Rapl,
    simulated::Simulated,
    thermal::Thermal,
    Inventory, Source, TickMs,
};

pub const AGENT: &str = concat!("nodewatt-agent/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(String);

/// Creates every enabled source. A source that is enabled but cannot even be set up
/// because of the configuration (a missing root) is an error, never silently skipped;
/// hardware that is simply absent is reported by the source itself.
pub fn build_sources(cfg: &Config, node: &str) -> Result<Vec<Box<dyn Source>>, BuildError> {
    let a = &cfg.agent;
    for (key, root) in [
        ("agent.sys_root", &a.sys_root),
        ("agent.proc_root", &a.proc_root),
    ] {
        if !root.is_dir() {
            return Err(BuildError(format!(
                "{key} {} is not a directory",
                root.display()
            )));
        }
    }
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    if cfg.nvml.enabled {
        sources.push(Box::new(NvmlSource::start(NvmlOptions {
            library: cfg.nvml.library.clone(),
            timeout: cfg.nvml_timeout(),
            processes: cfg.nvml.processes,
        })));
    }
    if cfg.simulated.enabled {
        tracing::warn!("simulated source enabled: its GPUs and RAPL domains are not real hardware");
        sources.push(Box::new(Simulated::new(&cfg.simulated, node)));
    }
    if cfg.cpu.enabled {
        let cpu = CpuSource::open(&a.proc_root, cfg.cgroup_root(), cfg.cpu.job_cgroups.clone())
            .map_err(|e| BuildError(format!("cpu source: {e}")))?;
        sources.push(Box::new(cpu));
    }
    if cfg.rapl.enabled {
        sources.push(Box::new(Rapl::discover(&a.sys_root)));
    }
    if cfg.hwmon.enabled {
        sources.push(Box::new(Hwmon::discover(&a.sys_root)));
    }
    if cfg.thermal.enabled {
        sources.push(Box::new(Thermal::discover(&a.sys_root)));
    }
    Ok(sources)
}

/// The sampler's state saved at stop, resumed at the next start on the same boot.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// `/proc/sys/kernel/random/boot_id`: counters are only continuous within one boot.
    pub boot_id: String,
    pub cluster: NodeName,
    pub node: NodeName,
    /// The next sample's sequence number.
    pub seq: u64,
    /// When the continuous measurement began (the first run's start).
    pub origin_ms: u64,
    pub deltas: Deltas,
    pub ledger: Option<Ledger>,
    /// Job totals not sent yet.
    #[serde(default)]
    pub pending_totals: Vec<nodewatt_wire::JobTotal>,
    /// Sampled but not published yet: the usage window (telemetry is empty whenever a
    /// state is taken, right after a message).
    #[serde(default)]
    pub aggregate: Aggregate,
}

pub struct Sampler {
    sources: Vec<Box<dyn Source>>,
    accountant: Option<Accountant>,
    /// Last error per source, so a failure is logged when it starts or changes, not on
    /// every tick.
    last_error: Vec<Option<String>>,
    deltas: Deltas,
    template: Sample,
    /// Job totals that did not fit in earlier messages (`publish::fit`).
    pending_totals: Vec<nodewatt_wire::JobTotal>,
    cadence: Cadence,
    aggregate: Aggregate,
}

impl Sampler {
    pub fn new(
        sources: Vec<Box<dyn Source>>,
        cluster: NodeName,
        node: NodeName,
        interval_ms: u64,
        agent_start_ms: u64,
    ) -> Sampler {
        Sampler {
            accountant: None,
            // Start-up already logged unavailable sources; their first failing sample
            // must not log the same reason again.
            last_error: sources.iter().map(|s| s.inventory().unavailable).collect(),
            deltas: Deltas::default(),
            pending_totals: Vec::new(),
            cadence: Cadence::every_sample(interval_ms),
            aggregate: Aggregate::default(),
            sources,
            template: Sample::new(AGENT, cluster, node, interval_ms, agent_start_ms),
        }
    }

    pub fn inventories(&self) -> Vec<(&'static str, Inventory)> {
        self.sources
            .iter()
            .map(|s| (s.name(), s.inventory()))
            .collect()
    }

    /// Publishes telemetry and usage at these instants instead of every sample.
    pub fn with_cadence(mut self, c: Cadence) -> Sampler {
        self.cadence = c;
        self
    }

    /// Samples the tick at `at`; returns the message to publish when one is due
    /// ([`Cadence`]).
    pub fn tick(&mut self, at: TickMs) -> Option<Sample> {
        let s = self.sample(at);
        self.publishable(s, false)
    }

    fn publishable(&mut self, s: Sample, stop: bool) -> Option<Sample> {
        let mut m = self.aggregate.push(s, self.cadence, stop)?;
        self.fit(&mut m);
        Some(m)
    }

    /// Reads every source for the tick at `at` (one sample, not yet a message); the
    /// sequence number advances by one.
    pub fn sample(&mut self, at: TickMs) -> Sample {
        let mut s = self.template.clone();
        s.ts_ms = at;
        self.template.seq += 1;
        for (i, src) in self.sources.iter_mut().enumerate() {
            let started = Instant::now();
            let result = src.read(at, &mut s);
            let read_us = started.elapsed().as_micros() as u64;
            let (ok, devices, error) = match result {
                Ok(n) => (true, n, None),
                Err(e) => (false, 0, Some(e.0)),
            };
            if error != self.last_error[i] {
                match &error {
                    Some(e) => tracing::warn!(source = src.name(), "{e}"),
                    None => tracing::info!(source = src.name(), "source recovered"),
                }
                self.last_error[i] = error.clone();
            }
            s.sources.push(SourceStatus {
                name: src.name().to_string(),
                ok,
                read_us,
                devices,
                error,
            });
        }
        self.deltas.apply(&mut s);
        if let Some(a) = self.accountant.as_mut() {
            a.account(&mut s);
        }
        s
    }

    fn fit(&mut self, s: &mut Sample) {
        let done = crate::publish::fit::fit(
            s,
            &mut self.pending_totals,
            crate::publish::MAX_MESSAGE_BYTES,
        );
        if done.unattributed {
            tracing::error!(
                usage_entries = s.usage.len(),
                "a sample too large for one message: its usage is sent as _unattributed"
            );
        }
    }

    /// Attributes each sample's energy to the jobs of the registry.
    pub fn with_accounting(mut self, cfg: &Config, agent_start_ms: u64) -> Sampler {
        if cfg.jobs.enabled {
            self.accountant = Some(Accountant::new(
                cfg.jobs.dir.clone(),
                cfg.jobs.owner_uid,
                cfg.agent.proc_root.clone(),
                Ledger::new(agent_start_ms, cfg.jobs.totals_interval.as_millis() as u64),
            ));
        }
        self
    }

    /// Continues where an earlier run on the same boot stopped: the same sequence numbers,
    /// counters, jobs and job totals, so the span across the restart is measured and
    /// billed like any other. Refused (the caller starts afresh) when the state is not
    /// this node's, from another boot, or from the future.
    pub fn resume(&mut self, st: State, boot_id: Option<&str>, now_ms: u64) -> Result<u64, String> {
        if st.cluster != self.template.cluster || st.node != self.template.node {
            return Err(format!("it is of node {}/{}", st.cluster, st.node));
        }
        // Totals not sent yet are facts about the past whatever happens to the rest.
        self.pending_totals = st.pending_totals;
        if boot_id != Some(st.boot_id.as_str()) {
            return Err("the node rebooted since (boot id differs)".into());
        }
        let last = st.deltas.last_ts().ok_or("it has no sample")?;
        if last >= now_ms || st.origin_ms > last {
            return Err(format!("its last sample ({last} ms) is not in the past"));
        }
        match (self.accountant.as_mut(), st.ledger) {
            (Some(a), Some(l)) => a.resume(l),
            (Some(_), None) => return Err("it has no job accounting".into()),
            _ => {}
        }
        self.template.seq = st.seq;
        self.template.agent_start_ms = st.origin_ms;
        self.deltas = st.deltas;
        self.aggregate = st.aggregate;
        Ok(now_ms - last)
    }

    /// What [`Sampler::resume`] needs after a restart.
    pub fn state(&self, boot_id: String) -> State {
        State {
            boot_id,
            cluster: self.template.cluster.clone(),
            node: self.template.node.clone(),
            seq: self.template.seq,
            origin_ms: self.template.agent_start_ms,
            deltas: self.deltas.clone(),
            ledger: self.accountant.as_ref().map(|a| a.ledger().clone()),
            pending_totals: self.pending_totals.clone(),
            aggregate: self.aggregate.clone(),
        }
    }

    /// The last message before a stop, at `at` (not a tick): it publishes everything
    /// sampled, bills up to the stop and carries every running job's total.
    pub fn finish(&mut self, at: TickMs) -> Sample {
        let mut s = self.sample(at);
        if let Some(a) = self.accountant.as_mut() {
            for t in a.running_totals() {
                if !s
                    .job_totals
                    .iter()
                    .any(|x| x.job == t.job && x.since_ms == t.since_ms)
                {
                    s.job_totals.push(t);
                }
            }
        }
        self.publishable(s, true)
            .expect("a stop publishes what was sampled")
    }

    /// Where the job registry is read from, when accounting is on.
    pub fn registry_dir(&self) -> Option<&std::path::Path> {
        self.accountant.as_ref().map(|a| a.registry_dir())
    }

    /// Reads every source once without publishing (so the first published sample has
    /// rates); the sequence number is left alone.
    pub fn prime(&mut self, at: TickMs) {
        self.sample(at);
        self.template.seq -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;

    const T: u64 = 1_763_700_000_000;

    fn sampler() -> Sampler {
        Sampler::new(Vec::new(), n("c"), n("n1"), 1000, T)
    }

    fn total(job: &str) -> nodewatt_wire::JobTotal {
        nodewatt_wire::JobTotal {
            job: n(job),
            project: n("p"),
            user: n("u"),
            start_ms: T,
            since_ms: T,
            until_ms: T + 1_000,
            ended: true,
            gpus: Vec::new(),
            amounts: Default::default(),
        }
    }

    /// A run that took three samples and stopped, as its state was saved.
    fn stopped_run() -> State {
        let mut first = sampler();
        for i in 0..3 {
            first.tick(T + i * 1_000);
        }
        first.pending_totals.push(total("7"));
        first.state("boot-a".into())
    }

    #[test]
    fn a_resumed_run_continues_seq_origin_and_counters() {
        let mut again = Sampler::new(Vec::new(), n("c"), n("n1"), 1000, T + 10_000);
        let gap = again
            .resume(stopped_run(), Some("boot-a"), T + 5_500)
            .unwrap();
        assert_eq!(gap, 3_500);
        let s = again.tick(T + 6_000).unwrap();
        assert_eq!(
            (s.seq, s.agent_start_ms),
            (3, T),
            "one continuous measurement"
        );
        assert_eq!(s.span_ms, 4_000, "the gap is a span like any other");
        assert_eq!(
            s.job_totals.len(),
            1,
            "the total not sent before the stop goes now"
        );
    }

    #[test]
    fn another_boot_another_node_or_a_future_state_is_refused() {
        let refused = |st: State, boot: &str, now: u64| {
            let mut again = Sampler::new(Vec::new(), n("c"), n("n1"), 1000, now);
            let why = again.resume(st, Some(boot), now).unwrap_err();
            let s = again.tick(now + 1_000).unwrap();
            (why, s)
        };
        let (why, s) = refused(stopped_run(), "boot-b", T + 5_000);
        assert!(why.contains("rebooted"), "{why}");
        assert_eq!(
            (s.seq, s.span_ms),
            (0, 0),
            "afresh: no delta across a reboot"
        );
        assert_eq!(
            s.job_totals.len(),
            1,
            "totals not sent yet are kept even so"
        );
        let (why, _) = refused(stopped_run(), "boot-a", T + 1_000);
        assert!(why.contains("not in the past"), "{why}");
        let mut other = stopped_run();
        other.node = n("n2");
        let (why, s) = refused(other, "boot-a", T + 5_000);
        assert!(why.contains("n2"), "{why}");
        assert!(
            s.job_totals.is_empty(),
            "another node's totals are not ours"
        );
    }
}
