//! RAPL energy counters from the powercap class (`<sys>/class/powercap/*/energy_uj`).
//!
//! Every zone with an `energy_uj` file is a domain: packages, `dram`, `psys`, `core`,
//! `uncore` and the MMIO interface alike. Since Linux 5.10 `energy_uj` is readable by
//! root only; such a domain is reported with its reason, never as zero.

use std::path::Path;

use nodewatt_wire::{RaplDomain, Sample};

use super::{Inventory, Source, SourceError, TickMs};
use crate::sysfs::{self, AttrFile};

const PERMISSION_HINT: &str =
    "energy_uj is root-only since Linux 5.10: run the agent as root or with CAP_DAC_READ_SEARCH";

struct Domain {
    zone: String,
    name: String,
    parent: Option<String>,
    max_energy_range_uj: u64,
    energy: Result<AttrFile, String>,
}

pub struct Rapl {
    domains: Vec<Domain>,
    absent: Option<String>,
}

impl Rapl {
    pub fn discover(sys_root: &Path) -> Rapl {
        let class = sys_root.join("class/powercap");
        let entries = match sysfs::sorted_entries(&class) {
            Ok(e) => e,
            Err(e) => {
                return Rapl {
                    domains: Vec::new(),
                    absent: Some(format!(
                        "no powercap zones ({}; is the intel_rapl_common module loaded?)",
                        sysfs::describe(&class, &e)
                    )),
                }
            }
        };
        let domains = entries
            .into_iter()
            .filter(|(_, path)| path.join("energy_uj").exists())
            .map(|(zone, path)| open_domain(zone, &path))
            .collect();
        Rapl {
            domains,
            absent: None,
        }
    }
}

fn open_domain(zone: String, path: &Path) -> Domain {
    let name = sysfs::clean_name(
        &sysfs::read_string(&path.join("name")).unwrap_or_default(),
        &zone,
    );
    let max_energy_range_uj = sysfs::read_u64(&path.join("max_energy_range_uj")).unwrap_or(0);
    let energy_path = path.join("energy_uj");
    let energy = AttrFile::open(energy_path.clone()).map_err(|e| {
        let mut why = format!("{zone} ({name}) {}", sysfs::describe(&energy_path, &e));
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            why = format!("{why} ({PERMISSION_HINT})");
        }
        why
    });
    Domain {
        parent: parent_zone(&zone),
        zone,
        name,
        max_energy_range_uj,
        energy,
    }
}

/// `intel-rapl:0:1` is a subzone of `intel-rapl:0`; `intel-rapl:0` has no parent.
fn parent_zone(zone: &str) -> Option<String> {
    let (head, _) = zone.rsplit_once(':')?;
    head.contains(':').then(|| head.to_string())
}

impl Domain {
    /// The raw counter; deltas and power are derived in `crate::deltas`.
    fn read(&self) -> RaplDomain {
        let mut out = RaplDomain {
            zone: self.zone.clone(),
            name: self.name.clone(),
            parent: self.parent.clone(),
            energy_uj: None,
            max_energy_range_uj: self.max_energy_range_uj,
            energy_delta_uj: None,
            power_w: None,
            error: None,
        };
        let file = match &self.energy {
            Ok(f) => f,
            Err(why) => {
                out.error = Some(why.clone());
                return out;
            }
        };
        match file.read_u64() {
            Ok(cur) => out.energy_uj = Some(cur),
            Err(e) => out.error = Some(sysfs::describe(file.path(), &e)),
        }
        out
    }
}

impl Source for Rapl {
    fn name(&self) -> &'static str {
        "rapl"
    }

    fn inventory(&self) -> Inventory {
        let readable = self.domains.iter().filter(|d| d.energy.is_ok()).count();
        let names: Vec<String> = self
            .domains
            .iter()
            .map(|d| format!("{} {}", d.zone, d.name))
            .collect();
        Inventory {
            devices: readable as u32,
            summary: match self.domains.len() {
                0 => "no RAPL domains".to_string(),
                n => format!("{n} domains: {}", names.join(", ")),
            },
            problems: self
                .domains
                .iter()
                .filter_map(|d| d.energy.as_ref().err().cloned())
                .collect(),
            unavailable: self.absent.clone(),
        }
    }

    fn read(&mut self, _at: TickMs, out: &mut Sample) -> Result<u32, SourceError> {
        if let Some(why) = &self.absent {
            return Err(SourceError(why.clone()));
        }
        out.rapl.extend(self.domains.iter().map(Domain::read));
        Ok(out.rapl.iter().filter(|d| d.energy_uj.is_some()).count() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{empty_sample, fixture_copy, unprivileged};

    #[test]
    fn parent_zones() {
        assert_eq!(
            parent_zone("intel-rapl:0:1").as_deref(),
            Some("intel-rapl:0")
        );
        assert_eq!(parent_zone("intel-rapl:0"), None);
        assert_eq!(parent_zone("intel-rapl-mmio:0"), None);
        assert_eq!(parent_zone("intel-rapl"), None);
    }

    #[test]
    fn reads_every_domain_of_the_fixture() {
        let fx = fixture_copy();
        let mut rapl = Rapl::discover(&fx.sys());
        let inv = rapl.inventory();
        assert_eq!(inv.devices, 5, "{inv:?}");
        assert!(inv.problems.is_empty() && inv.unavailable.is_none());

        let mut s = empty_sample();
        assert_eq!(rapl.read(1_000, &mut s).unwrap(), 5);
        let zones: Vec<(&str, &str, Option<&str>)> = s
            .rapl
            .iter()
            .map(|d| (d.zone.as_str(), d.name.as_str(), d.parent.as_deref()))
            .collect();
        assert_eq!(
            zones,
            [
                ("intel-rapl:0", "package-0", None),
                ("intel-rapl:0:0", "core", Some("intel-rapl:0")),
                ("intel-rapl:0:1", "dram", Some("intel-rapl:0")),
                ("intel-rapl:1", "package-1", None),
                ("intel-rapl:2", "psys", None),
            ]
        );
        assert_eq!(s.rapl[0].energy_uj, Some(262_143_000_000));
        assert_eq!(s.rapl[0].max_energy_range_uj, 262_143_328_850);
        assert!(
            s.rapl.iter().all(|d| d.power_w.is_none()),
            "no rate on the first read"
        );
    }

    #[test]
    fn rereads_the_counter_in_place_each_tick() {
        let fx = fixture_copy();
        let mut rapl = Rapl::discover(&fx.sys());
        rapl.read(1_000, &mut empty_sample()).unwrap();
        // package-0 wrapped: the raw value is reported as is (deltas handle the wrap).
        fx.write("sys/class/powercap/intel-rapl:0/energy_uj", "171150\n");
        let mut s = empty_sample();
        rapl.read(3_000, &mut s).unwrap();
        assert_eq!(s.rapl[0].energy_uj, Some(171_150));
        assert_eq!(s.rapl[0].power_w, None, "derived later, in deltas");
    }

    #[test]
    fn unreadable_counter_is_reported_not_zero() {
        let fx = fixture_copy();
        fx.chmod("sys/class/powercap/intel-rapl:1/energy_uj", 0o000);
        let rapl = unprivileged(|| Rapl::discover(&fx.sys()));
        let mut rapl = rapl;
        let inv = rapl.inventory();
        assert_eq!(inv.devices, 4);
        assert_eq!(inv.problems.len(), 1, "{inv:?}");
        assert!(
            inv.problems[0].contains("intel-rapl:1 (package-1)"),
            "{inv:?}"
        );
        assert!(inv.problems[0].contains("permission denied"), "{inv:?}");
        assert!(inv.problems[0].contains("CAP_DAC_READ_SEARCH"), "{inv:?}");

        let mut s = empty_sample();
        assert_eq!(rapl.read(1_000, &mut s).unwrap(), 4);
        let pkg1 = &s.rapl[3];
        assert_eq!(pkg1.energy_uj, None);
        assert!(pkg1.error.as_deref().unwrap().contains("permission denied"));
    }

    #[test]
    fn missing_powercap_is_unavailable_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut rapl = Rapl::discover(dir.path());
        let why = rapl.inventory().unavailable.unwrap();
        assert!(
            why.contains("class/powercap") && why.contains("not found"),
            "{why}"
        );
        assert!(rapl.read(0, &mut empty_sample()).is_err());
    }
}
