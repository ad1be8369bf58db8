//! Per-interval energy from cumulative counters: the additive `*_delta_*` fields and RAPL's
//! mean power. Kept here, on the agent, because only the agent sees every sample of a node
//! in order (collectors may share a subscription and each see only some).

use std::collections::HashMap;

use nodewatt_wire::Sample;

use crate::counter::step;

/// Counter values of the previous sample, by device.
#[derive(Debug, Default)]
pub struct Deltas {
    last_ts: Option<u64>,
    gpu_mj: HashMap<String, u64>,
    rapl_uj: HashMap<String, u64>,
}

impl Deltas {
    /// Fills `span_ms`, GPU `energy_delta_mj`, RAPL `energy_delta_uj` and `power_w` from the
    /// advance of each counter since the previous call. A device seen for the first time,
    /// unreadable last time, or whose counter reset gets no delta: nothing is guessed.
    pub fn apply(&mut self, s: &mut Sample) {
        let span = self.last_ts.map(|t| s.ts_ms.saturating_sub(t));
        s.span_ms = span.unwrap_or(0);
        self.last_ts = Some(s.ts_ms);

        let mut gpu_mj = HashMap::with_capacity(s.gpus.len());
        for g in &mut s.gpus {
            let Some(cur) = g.energy_mj else { continue };
            let key = format!("{}/{}", g.index, g.uuid);
            g.energy_delta_mj = self
                .gpu_mj
                .get(&key)
                .and_then(|prev| step(*prev, cur, None).delta());
            gpu_mj.insert(key, cur);
        }
        self.gpu_mj = gpu_mj;

        let mut rapl_uj = HashMap::with_capacity(s.rapl.len());
        for d in &mut s.rapl {
            let Some(cur) = d.energy_uj else { continue };
            let wrap_at = (d.max_energy_range_uj > 0).then_some(d.max_energy_range_uj);
            d.energy_delta_uj = self
                .rapl_uj
                .get(&d.zone)
                .and_then(|prev| step(*prev, cur, wrap_at).delta());
            d.power_w = match (d.energy_delta_uj, span) {
                (Some(uj), Some(ms)) if ms > 0 => Some(uj as f64 / (ms as f64 * 1000.0)),
                _ => None,
            };
            rapl_uj.insert(d.zone.clone(), cur);
        }
        self.rapl_uj = rapl_uj;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodewatt_wire::{Gpu, RaplDomain};

    fn sample(ts: u64, gpu_mj: Option<u64>, rapl_uj: Option<u64>) -> Sample {
        let mut s = crate::testutil::empty_sample();
        s.ts_ms = ts;
        s.gpus.push(Gpu {
            index: 0,
            uuid: "GPU-a".into(),
            energy_mj: gpu_mj,
            ..Gpu::default()
        });
        s.rapl.push(RaplDomain {
            zone: "intel-rapl:0".into(),
            name: "package-0".into(),
            parent: None,
            energy_uj: rapl_uj,
            max_energy_range_uj: 1_000_000,
            energy_delta_uj: None,
            power_w: None,
            error: None,
        });
        s
    }

    fn run(d: &mut Deltas, ts: u64, g: Option<u64>, r: Option<u64>) -> Sample {
        let mut s = sample(ts, g, r);
        d.apply(&mut s);
        s
    }

    #[test]
    fn first_sample_has_no_deltas() {
        let s = run(&mut Deltas::default(), 1_000, Some(5), Some(5));
        assert_eq!(s.span_ms, 0);
        assert_eq!(s.gpus[0].energy_delta_mj, None);
        assert_eq!(s.rapl[0].energy_delta_uj, None);
        assert_eq!(s.rapl[0].power_w, None);
    }

    #[test]
    fn deltas_and_power_over_the_span() {
        let mut d = Deltas::default();
        run(&mut d, 1_000, Some(10_000), Some(900_000));
        // Two seconds later (a tick was skipped); RAPL wrapped at 1 J.
        let s = run(&mut d, 3_000, Some(710_000), Some(100_000));
        assert_eq!(s.span_ms, 2_000);
        assert_eq!(s.gpus[0].energy_delta_mj, Some(700_000));
        assert_eq!(s.rapl[0].energy_delta_uj, Some(200_000));
        assert_eq!(s.rapl[0].power_w, Some(0.1));
    }

    #[test]
    fn resets_and_gaps_give_no_delta_then_resume() {
        let mut d = Deltas::default();
        run(&mut d, 1_000, Some(10_000), Some(500));
        let s = run(&mut d, 2_000, Some(3), None); // driver reload; RAPL unreadable
        assert_eq!(s.gpus[0].energy_delta_mj, None);
        assert_eq!(s.rapl[0].energy_delta_uj, None);
        let s = run(&mut d, 3_000, Some(53), Some(700));
        assert_eq!(
            s.gpus[0].energy_delta_mj,
            Some(50),
            "counts again from the reset"
        );
        assert_eq!(s.rapl[0].energy_delta_uj, None, "no baseline after a gap");
        let s = run(&mut d, 4_000, Some(53), Some(900));
        assert_eq!(s.rapl[0].energy_delta_uj, Some(200));
    }

    #[test]
    fn a_replaced_gpu_starts_a_new_baseline() {
        let mut d = Deltas::default();
        run(&mut d, 1_000, Some(10_000), None);
        let mut s = sample(2_000, Some(20_000), None);
        s.gpus[0].uuid = "GPU-b".into();
        d.apply(&mut s);
        assert_eq!(s.gpus[0].energy_delta_mj, None);
    }
}
