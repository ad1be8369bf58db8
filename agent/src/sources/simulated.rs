//! Simulated GPUs and RAPL domains, for tests, benchmarks and demos on machines without
//! the hardware. Only ever enabled by `[simulated] enabled = true`; every simulated GPU is
//! marked `simulated: true` in the message.
//!
//! Energy counters are a pure function of the sample time: the exact integral of the
//! configured power from the Unix epoch (as if the driver had loaded then), in integer
//! milliwatt-milliseconds. The energy between any two samples is therefore exactly
//! power × elapsed time, across agent restarts and on every node alike.

use nodewatt_wire::{Gpu, RaplDomain, Sample};

use super::{Inventory, Source, SourceError, TickMs};
use crate::config::{SimGpuConfig, SimRaplConfig, SimulatedConfig};

/// Piecewise-constant power that repeats every `period_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// (start offset in the period in ms, power in mW), first at 0, increasing.
    steps: Vec<(u64, u64)>,
    period_ms: u64,
}

fn watts_to_mw(w: f64) -> u64 {
    (w * 1000.0).round() as u64
}

impl Profile {
    pub fn constant(power_w: f64) -> Profile {
        Profile {
            steps: vec![(0, watts_to_mw(power_w))],
            period_ms: 1,
        }
    }

    pub fn from_config(g: &SimGpuConfig) -> Profile {
        match g.power_w {
            Some(p) => Profile::constant(p),
            None => Profile {
                steps: g
                    .profile
                    .iter()
                    .map(|s| (s.at.as_millis() as u64, watts_to_mw(s.power_w)))
                    .collect(),
                period_ms: g.period.map_or(1, |p| p.as_millis() as u64).max(1),
            },
        }
    }

    pub fn power_mw_at(&self, t_ms: u64) -> u64 {
        let off = t_ms % self.period_ms;
        self.steps
            .iter()
            .rev()
            .find(|(at, _)| *at <= off)
            .map_or(0, |s| s.1)
    }

    /// Energy within the first `off` ms of a period, in µJ (mW × ms).
    fn partial_uj(&self, off: u64) -> u128 {
        let ends = self
            .steps
            .iter()
            .skip(1)
            .map(|s| s.0)
            .chain([self.period_ms]);
        self.steps
            .iter()
            .zip(ends)
            .filter(|((start, _), _)| *start < off)
            .map(|((start, mw), end)| u128::from(*mw) * u128::from(end.min(off) - start))
            .sum()
    }

    /// Exact energy from the epoch to `t_ms`, in µJ.
    pub fn energy_uj_at(&self, t_ms: u64) -> u128 {
        let periods = u128::from(t_ms / self.period_ms);
        periods * self.partial_uj(self.period_ms) + self.partial_uj(t_ms % self.period_ms)
    }
}

struct SimGpu {
    index: u32,
    model: String,
    uuid: String,
    profile: Profile,
    mem_total_bytes: u64,
    tdp_mw: u64,
}

struct SimRapl {
    zone: String,
    name: String,
    profile: Profile,
    max_energy_range_uj: u64,
}

pub struct Simulated {
    gpus: Vec<SimGpu>,
    rapl: Vec<SimRapl>,
    /// The previous read's tick: capped time is per span.
    last: Option<TickMs>,
}

/// FNV-1a: a stable hash so simulated UUIDs differ per node yet never change.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl Simulated {
    pub fn new(cfg: &SimulatedConfig, node: &str) -> Simulated {
        let node_hash = fnv1a(node);
        let gpus = cfg
            .gpu
            .iter()
            .flat_map(|g| (0..g.count).map(move |_| g))
            .enumerate()
            .map(|(i, g)| SimGpu {
                index: i as u32,
                model: g.model.clone(),
                uuid: format!("GPU-5140a7ed-{:04x}-4000-8000-{node_hash:08x}{i:04x}", i),
                profile: Profile::from_config(g),
                mem_total_bytes: g.mem_total_bytes,
                tdp_mw: watts_to_mw(g.tdp_w).max(1),
            })
            .collect();
        let rapl = cfg
            .rapl
            .iter()
            .enumerate()
            .map(|(i, r): (usize, &SimRaplConfig)| SimRapl {
                zone: format!("sim-rapl:{i}"),
                name: r.name.clone(),
                profile: Profile::constant(r.power_w),
                max_energy_range_uj: r.max_energy_range_uj,
            })
            .collect();
        Simulated {
            gpus,
            rapl,
            last: None,
        }
    }
}

impl SimGpu {
    /// `last`: the previous read's tick.
    fn read(&self, at: TickMs, last: Option<TickMs>) -> Gpu {
        let mw = self.profile.power_mw_at(at);
        let power_w = mw as f64 / 1000.0;
        let util = (mw as f64 * 100.0 / self.tdp_mw as f64).min(100.0).round();
        Gpu {
            index: self.index,
            uuid: self.uuid.clone(),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + self.index),
            model: self.model.clone(),
            simulated: true,
            power_w: Some(power_w),
            power_max_w: None,
            energy_mj: Some((self.profile.energy_uj_at(at) / 1000) as u64),
            energy_delta_mj: None,
            temp_c: Some((30.0 + power_w * 0.05).round()),
            temp_max_c: None,
            mem_temp_c: Some((35.0 + power_w * 0.05).round()),
            util_pct: Some(util),
            mem_util_pct: Some((util / 2.0).round()),
            mem_used_bytes: Some((self.mem_total_bytes as f64 * util / 100.0) as u64),
            mem_total_bytes: Some(self.mem_total_bytes),
            sm_clock_mhz: Some(if util > 0.0 { 1980 } else { 345 }),
            mem_clock_mhz: Some(2619),
            // Idle below any load; power-capped at the TDP, like a real board.
            clock_event_reasons: Some(match mw {
                0 => 0x1,
                p if p >= self.tdp_mw => 0x4,
                _ => 0,
            }),
            ecc_corrected: Some(0),
            ecc_uncorrected: Some(0),
            power_limit_w: Some(self.tdp_mw as f64 / 1000.0),
            // Capped for the span when at the limit at its end (the profile's steps are
            // far longer than a span).
            power_capped_ms: last.map(|l| match mw >= self.tdp_mw {
                true => at.saturating_sub(l),
                false => 0,
            }),
            thermal_capped_ms: last.map(|_| 0),
            // A Hopper's GPM, rising with load.
            gpm: nodewatt_wire::Gpm {
                sm_active_pct: Some(util),
                sm_occupancy_pct: Some((util * 0.5).round()),
                tensor_active_pct: Some((util * 0.8).round()),
                dram_bw_pct: Some((util * 0.6).round()),
                ..nodewatt_wire::Gpm::default()
            },
            ..Gpu::default()
        }
    }
}

impl SimRapl {
    fn read(&self, at: TickMs) -> RaplDomain {
        // Wrapping modulo the range makes the wrap-corrected delta exact.
        let cur = (self.profile.energy_uj_at(at) % u128::from(self.max_energy_range_uj)) as u64;
        RaplDomain {
            zone: self.zone.clone(),
            name: self.name.clone(),
            parent: None,
            energy_uj: Some(cur),
            max_energy_range_uj: self.max_energy_range_uj,
            energy_delta_uj: None,
            power_w: None,
            error: None,
        }
    }
}

impl Source for Simulated {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn inventory(&self) -> Inventory {
        Inventory {
            devices: (self.gpus.len() + self.rapl.len()) as u32,
            summary: format!(
                "SIMULATED: {} GPUs, {} RAPL domains (not real hardware)",
                self.gpus.len(),
                self.rapl.len()
            ),
            ..Inventory::default()
        }
    }

    fn read(&mut self, at: TickMs, out: &mut Sample) -> Result<u32, SourceError> {
        let last = self.last.replace(at);
        out.gpus.extend(self.gpus.iter().map(|g| g.read(at, last)));
        out.rapl.extend(self.rapl.iter().map(|r| r.read(at)));
        Ok((self.gpus.len() + self.rapl.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::testutil::empty_sample;

    fn stepped() -> Profile {
        // 100 W for 30 s, then 650 W for 30 s.
        Profile {
            steps: vec![(0, 100_000), (30_000, 650_000)],
            period_ms: 60_000,
        }
    }

    #[test]
    fn constant_power_energy_is_power_times_time() {
        let p = Profile::constant(350.0);
        assert_eq!(p.energy_uj_at(0), 0);
        assert_eq!(p.energy_uj_at(1_000), 350_000_000);
        let t = 1_763_700_000_123;
        assert_eq!(p.energy_uj_at(t + 2_500) - p.energy_uj_at(t), 875_000_000);
    }

    #[test]
    fn profile_power_and_energy() {
        let p = stepped();
        assert_eq!(p.power_mw_at(0), 100_000);
        assert_eq!(p.power_mw_at(29_999), 100_000);
        assert_eq!(p.power_mw_at(30_000), 650_000);
        assert_eq!(p.power_mw_at(60_000), 100_000);
        assert_eq!(p.energy_uj_at(30_000), 3_000_000_000);
        assert_eq!(p.energy_uj_at(60_000), 3_000_000_000 + 19_500_000_000);
        // Across a step and a period boundary.
        assert_eq!(
            p.energy_uj_at(65_000) - p.energy_uj_at(25_000),
            5_000 * 100_000 + 30_000 * 650_000 + 5_000 * 100_000
        );
    }

    #[test]
    fn energy_is_additive_over_any_split() {
        let p = stepped();
        let (a, c) = (1_763_700_017_000u64, 1_763_700_311_000u64);
        for b in (a..=c).step_by(7_919) {
            let whole = p.energy_uj_at(c) - p.energy_uj_at(a);
            let parts =
                (p.energy_uj_at(b) - p.energy_uj_at(a)) + (p.energy_uj_at(c) - p.energy_uj_at(b));
            assert_eq!(whole, parts);
            // Bounded by min and max power times the span.
            let span = u128::from(c - a);
            assert!(whole >= span * 100_000 && whole <= span * 650_000);
        }
    }

    fn sim(text: &str) -> Simulated {
        let cfg = Config::parse(&format!(
            "[agent]\ncluster = \"c\"\nnode = \"n1\"\n[nvml]\nenabled = false\n[rapl]\nenabled = false\n[simulated]\nenabled = true\n{text}"
        ))
        .unwrap();
        Simulated::new(&cfg.simulated, "n1")
    }

    #[test]
    fn gpus_report_power_and_exact_energy() {
        let mut s = sim("[[simulated.gpu]]\ncount = 2\nmodel = \"Sim H100\"\npower_w = 350.0\n[[simulated.gpu]]\npower_w = 0.0\n");
        let mut a = empty_sample();
        assert_eq!(s.read(10_000, &mut a).unwrap(), 3);
        let mut b = empty_sample();
        s.read(11_000, &mut b).unwrap();
        assert_eq!(a.gpus.len(), 3);
        assert_eq!(
            a.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(a.gpus.iter().all(|g| g.simulated));
        assert_eq!(a.gpus[0].model, "Sim H100");
        assert_eq!(a.gpus[2].model, "Simulated GPU");
        assert_eq!(a.gpus[0].power_w, Some(350.0));
        assert_eq!(
            b.gpus[0].energy_mj.unwrap() - a.gpus[0].energy_mj.unwrap(),
            350_000
        );
        assert_eq!(a.gpus[2].util_pct, Some(0.0));
        assert_eq!(
            a.gpus[2].clock_event_reasons,
            Some(1),
            "idle GPU reports gpu_idle"
        );
        assert_ne!(a.gpus[0].uuid, a.gpus[1].uuid);
        assert_eq!(
            sim("[[simulated.gpu]]\npower_w = 1.0\n").gpus[0].uuid,
            s.gpus[0].uuid
        );
    }

    #[test]
    fn rapl_wraps_like_hardware_and_power_stays_exact() {
        // 120 W on a 10 J range: the counter wraps every 83.3 ms of simulated time.
        let mut s = sim("[[simulated.rapl]]\nname = \"package-0\"\npower_w = 120.0\nmax_energy_range_uj = 10000000\n");
        let mut deltas = crate::deltas::Deltas::default();
        let mut read = |at| {
            let mut x = empty_sample();
            x.ts_ms = at;
            s.read(at, &mut x).unwrap();
            deltas.apply(&mut x);
            x
        };
        let a = read(1_000_083);
        let b = read(1_000_088);
        let (ea, eb) = (a.rapl[0].energy_uj.unwrap(), b.rapl[0].energy_uj.unwrap());
        assert!(eb < ea, "this interval crosses the wrap: {ea} -> {eb}");
        assert_eq!(
            b.rapl[0].energy_delta_uj,
            Some(600_000),
            "120 W for 5 ms, exactly"
        );
        assert_eq!(b.rapl[0].power_w, Some(120.0));
        assert_eq!(b.rapl[0].name, "package-0");
    }
}
