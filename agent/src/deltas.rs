//! Per-interval energy from cumulative counters: the additive `*_delta_*` fields and RAPL's
//! mean power. Kept here, on the agent, because only the agent sees every sample of a node
//! in order (collectors may share a subscription and each see only some).
//!
//! The previous values are saved at stop and resumed at the next start on the same boot,
//! so the span across a restart is measured too. No delta is given where a reset or an
//! unseen wrap is evident or possible: NVML energy that went back, or rose by more than a
//! GPU can draw over the span, was reset (driver reload); a RAPL counter over a span in
//! which a package at its maximum power could pass the wrap point twice is ambiguous. A
//! reset whose counter climbed back within the bound is not detectable from the values.

use std::collections::HashMap;

use nodewatt_wire::{MaxPower, Sample};
use serde::{Deserialize, Serialize};

use crate::counter::step;

/// Counter values of the previous sample, by device.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deltas {
    last_ts: Option<u64>,
    gpu_mj: HashMap<String, u64>,
    rapl_uj: HashMap<String, u64>,
}

impl Deltas {
    /// The previous sample's time.
    pub fn last_ts(&self) -> Option<u64> {
        self.last_ts
    }

    /// Fills `span_ms`, GPU `energy_delta_mj`, RAPL `energy_delta_uj` and `power_w` from the
    /// advance of each counter since the previous call. A device seen for the first time,
    /// unreadable last time, or whose counter reset gets no delta: nothing is guessed.
    pub fn apply(&mut self, s: &mut Sample) {
        let span = self.last_ts.map(|t| s.ts_ms.saturating_sub(t));
        s.span_ms = span.unwrap_or(0);
        self.last_ts = Some(s.ts_ms);
        let max = MaxPower::default();
        let span_ms = u128::from(s.span_ms);
        // At most this much energy (µJ) over the span, per GPU and per RAPL domain.
        let gpu_max_uj = u128::from(max.gpu_w) * span_ms * 1000;
        let rapl_max_uj = u128::from(max.cpu_w) * span_ms * 1000;

        let mut gpu_mj = HashMap::with_capacity(s.gpus.len());
        for g in &mut s.gpus {
            let Some(cur) = g.energy_mj else { continue };
            let key = format!("{}/{}", g.index, g.uuid);
            g.energy_delta_mj = self
                .gpu_mj
                .get(&key)
                .and_then(|prev| step(*prev, cur, None).delta())
                .filter(|mj| u128::from(*mj) * 1000 <= gpu_max_uj);
            gpu_mj.insert(key, cur);
        }
        self.gpu_mj = gpu_mj;

        let mut rapl_uj = HashMap::with_capacity(s.rapl.len());
        for d in &mut s.rapl {
            let Some(cur) = d.energy_uj else { continue };
            let wrap_at = (d.max_energy_range_uj > 0).then_some(d.max_energy_range_uj);
            let unambiguous = wrap_at.is_none_or(|w| rapl_max_uj < u128::from(w));
            d.energy_delta_uj = self
                .rapl_uj
                .get(&d.zone)
                .filter(|_| unambiguous)
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

    /// A real package's range: 262 kJ, at least 262 s at 1 kW.
    const RANGE: u64 = 262_143_328_850;

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
            max_energy_range_uj: RANGE,
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
        run(&mut d, 1_000, Some(10_000), Some(RANGE - 100_000));
        // Two seconds later (a tick was skipped); RAPL wrapped.
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
    fn long_spans_give_deltas_only_where_no_reset_or_wrap_can_hide() {
        let mut d = Deltas::default();
        run(&mut d, 1_000, Some(10_000), Some(500));
        // 10 s later a GPU gained 30 kJ: 3 kW is impossible, so the counter was reset
        // and climbed back.
        let s = run(&mut d, 11_000, Some(30_010_000), Some(600));
        assert_eq!(s.gpus[0].energy_delta_mj, None);
        assert_eq!(s.rapl[0].energy_delta_uj, Some(100));
        // Within what 2 kW can draw, the GPU delta stands.
        let s = run(&mut d, 21_000, Some(30_010_000 + 19_000_000), Some(700));
        assert_eq!(s.gpus[0].energy_delta_mj, Some(19_000_000));
        // After 300 s a package at 1 kW could have passed the wrap point twice.
        let s = run(&mut d, 321_000, Some(49_010_000), Some(800));
        assert_eq!(s.rapl[0].energy_delta_uj, None);
    }

    #[test]
    fn saved_and_resumed_counters_measure_the_gap() {
        let mut d = Deltas::default();
        run(&mut d, 1_000, Some(10_000), None);
        let saved = serde_json::to_string(&d).unwrap();
        let mut back: Deltas = serde_json::from_str(&saved).unwrap();
        let s = run(&mut back, 4_000, Some(1_210_000), None);
        assert_eq!(
            (s.span_ms, s.gpus[0].energy_delta_mj),
            (3_000, Some(1_200_000))
        );
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
