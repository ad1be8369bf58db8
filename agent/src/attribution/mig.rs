//! A MIG GPU's energy and time among its MIG devices: NVML gives power and energy only
//! for the whole GPU, so each device's share is estimated, then billed to the jobs that
//! hold it like a whole GPU's.
//!
//! - Energy goes to GPU instances by slices × SM activity (GPM, of that instance, over the
//!   span; under 1 % counts as none): a busy instance pays for the power it draws. Where
//!   an instance has no GPM, or no instance was active in the span, it goes by slices, and the slices no instance
//!   holds go to `_idle`. The limit: by activity, the board's static power follows the
//!   activity too, so an active tenant pays for idle neighbours' share of it.
//! - GPU time goes by slices: a 3-slice instance of a 7-slice GPU for an hour is 3/7 of
//!   a GPU-hour; the slices no instance holds are `_idle`'s.
//! - Compute instances of one GPU instance share its GPM and slices: they split its
//!   share evenly.
//!
//! Every split is integer largest-remainder apportionment, so the devices' and idle's
//! parts sum exactly to the GPU's measured energy and span.

use super::{apportion, IDLE_BELOW_PERMILLE};

/// One MIG device of a GPU, as attribution needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigShare {
    pub uuid: String,
    pub gpu_instance_id: u32,
    /// Slices of its GPU instance.
    pub slices: Option<u32>,
    /// SM activity of its GPU instance over the span, ‰ (GPM).
    pub active_permille: Option<u32>,
    /// Tensor activity of its GPU instance over the span, ‰ (GPM).
    pub tensor_permille: Option<u32>,
}

/// Each MIG device's part of a GPU's energy (µJ) and time (ms), in the order given, and
/// what goes to `_idle`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigSplit {
    pub devices: Vec<(u64, u64)>,
    pub idle: (u64, u64),
}

/// A GPU instance: its slices, its activity and the positions of its MIG devices.
struct Instance {
    id: u32,
    slices: Option<u32>,
    active: Option<u32>,
    devices: Vec<usize>,
}

/// Activity that counts for weighing, ‰: none under [`IDLE_BELOW_PERMILLE`], at most all.
fn active(permille: u32) -> u32 {
    match permille {
        p if p < IDLE_BELOW_PERMILLE => 0,
        p => p.min(1000),
    }
}

/// Splits `energy_uj` and `span_ms` of a GPU of `total_slices` (when known) among `mig`.
pub fn split(
    energy_uj: u64,
    span_ms: u64,
    mig: &[MigShare],
    total_slices: Option<u32>,
) -> MigSplit {
    let mut instances: Vec<Instance> = Vec::new();
    for (i, m) in mig.iter().enumerate() {
        match instances.iter_mut().find(|g| g.id == m.gpu_instance_id) {
            Some(g) => g.devices.push(i),
            None => instances.push(Instance {
                id: m.gpu_instance_id,
                slices: m.slices,
                active: m.active_permille,
                devices: vec![i],
            }),
        }
    }
    // By slices, with the unheld ones idle; without every instance's slices, evenly and
    // with no idle part (the layout is unknown), and activity is not weighed either.
    let slices: Option<Vec<u64>> = instances.iter().map(|g| g.slices.map(u64::from)).collect();
    let by_slices: Vec<u64> = match &slices {
        Some(s) => {
            let idle = total_slices.map_or(0, |t| u64::from(t).saturating_sub(s.iter().sum()));
            s.iter().copied().chain([idle]).collect()
        }
        None => instances.iter().map(|_| 1).chain([0]).collect(),
    };
    let by_activity: Option<Vec<u64>> = slices
        .and(
            instances
                .iter()
                .zip(&by_slices)
                // Under 1 % is noise, as for whole GPUs: it must not draw the board's
                // whole energy to one instance.
                .map(|(g, &s)| g.active.map(|a| u64::from(active(a)) * s))
                .chain([Some(0)])
                .collect::<Option<Vec<_>>>(),
        )
        .filter(|w| w.iter().any(|&x| x > 0));
    let energy = apportion(energy_uj, by_activity.as_deref().unwrap_or(&by_slices));
    let time = apportion(span_ms, &by_slices);

    let mut devices = vec![(0, 0); mig.len()];
    for (k, g) in instances.iter().enumerate() {
        let even = vec![1; g.devices.len()];
        let e = apportion(energy[k], &even);
        let t = apportion(time[k], &even);
        for (j, &d) in g.devices.iter().enumerate() {
            devices[d] = (e[j], t[j]);
        }
    }
    let idle = instances.len();
    MigSplit {
        devices,
        idle: (energy[idle], time[idle]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dev(gi: u32, slices: Option<u32>, active_permille: Option<u32>) -> MigShare {
        MigShare {
            uuid: format!("MIG-{gi}"),
            gpu_instance_id: gi,
            slices,
            active_permille,
            tensor_permille: None,
        }
    }

    #[test]
    fn by_activity_where_every_instance_has_gpm() {
        // 3 slices at 90 % and 4 slices at 15 %: 270 : 60.
        let s = split(
            330_000,
            1_000,
            &[dev(1, Some(3), Some(900)), dev(2, Some(4), Some(150))],
            Some(7),
        );
        assert_eq!(s.devices, [(270_000, 429), (60_000, 571)]);
        assert_eq!(s.idle, (0, 0), "all 7 slices are held");
    }

    #[test]
    fn time_and_unheld_slices_go_by_slices_energy_by_activity() {
        // A 3-slice and a 1-slice instance on a 7-slice GPU: 3 slices are unheld.
        let s = split(
            700_000,
            7_000,
            &[dev(1, Some(3), Some(500)), dev(2, Some(1), Some(0))],
            Some(7),
        );
        assert_eq!(s.devices, [(700_000, 3_000), (0, 1_000)]);
        assert_eq!(s.idle, (0, 3_000), "by activity no energy is idle");
    }

    #[test]
    fn by_slices_without_gpm_or_activity() {
        for active in [None, Some(0)] {
            let s = split(
                700_000,
                7_000,
                &[dev(1, Some(3), active), dev(2, Some(1), Some(0))],
                Some(7),
            );
            assert_eq!(s.devices, [(300_000, 3_000), (100_000, 1_000)]);
            assert_eq!(s.idle, (300_000, 3_000), "the 3 unheld slices");
        }
    }

    #[test]
    fn activity_under_one_percent_is_no_activity() {
        // 0.5 % on one instance, nothing on the other: by slices, not all to the first.
        let s = split(
            700_000,
            7_000,
            &[dev(1, Some(3), Some(5)), dev(2, Some(1), Some(0))],
            Some(7),
        );
        assert_eq!(s.devices, [(300_000, 3_000), (100_000, 1_000)]);
        // A value past 100 % (a driver glitch) weighs as 100 %.
        let s = split(
            400,
            1,
            &[dev(1, Some(1), Some(u32::MAX)), dev(2, Some(1), Some(1000))],
            Some(2),
        );
        assert_eq!(s.devices, [(200, 1), (200, 0)]);
    }

    #[test]
    fn compute_instances_share_their_gpu_instance_evenly() {
        let mut a = dev(1, Some(4), None);
        let mut b = dev(1, Some(4), None);
        a.uuid = "MIG-a".into();
        b.uuid = "MIG-b".into();
        let s = split(701, 7_000, &[a, dev(2, Some(3), None), b], Some(7));
        assert_eq!(s.devices, [(201, 2_000), (300, 3_000), (200, 2_000)]);
        assert_eq!(s.idle, (0, 0));
    }

    #[test]
    fn unknown_layout_splits_evenly_with_no_idle_part() {
        let s = split(
            1_000,
            100,
            &[dev(1, None, Some(900)), dev(2, Some(4), Some(100))],
            Some(7),
        );
        assert_eq!(s.devices, [(500, 50), (500, 50)], "a size unknown: evenly");
        assert_eq!(s.idle, (0, 0));
        let s = split(
            1_000,
            100,
            &[dev(1, Some(3), None), dev(2, Some(4), None)],
            None,
        );
        assert_eq!(s.devices, [(429, 43), (571, 57)], "no total: no idle part");
    }

    proptest! {
        #[test]
        fn conserves_energy_and_time(
            energy in 0u64..u64::MAX / 2,
            span in 0u64..10_000_000,
            devs in proptest::collection::vec((0u32..8, proptest::option::of(1u32..8), proptest::option::of(0u32..=1000)), 0..10),
            total in proptest::option::of(1u32..64),
        ) {
            let mig: Vec<MigShare> = devs.iter().map(|&(gi, s, a)| dev(gi, s, a)).collect();
            let s = split(energy, span, &mig, total);
            prop_assert_eq!(s.devices.len(), mig.len());
            let e: u128 = s.devices.iter().map(|d| u128::from(d.0)).sum::<u128>() + u128::from(s.idle.0);
            let t: u128 = s.devices.iter().map(|d| u128::from(d.1)).sum::<u128>() + u128::from(s.idle.1);
            prop_assert_eq!(e, u128::from(energy));
            prop_assert_eq!(t, u128::from(span));
        }
    }
}
