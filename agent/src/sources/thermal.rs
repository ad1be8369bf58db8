//! Thermal zones (`<sys>/class/thermal/thermal_zone*`): firmware and SoC temperatures.

use std::path::Path;

use nodewatt_wire::{Sample, ThermalZone};

use super::{Inventory, Source, SourceError, TickMs};
use crate::sysfs::{self, AttrFile};

struct Zone {
    zone: String,
    zone_type: String,
    temp: Result<AttrFile, String>,
}

pub struct Thermal {
    zones: Vec<Zone>,
    absent: Option<String>,
}

impl Thermal {
    pub fn discover(sys_root: &Path) -> Thermal {
        let class = sys_root.join("class/thermal");
        let entries = match sysfs::sorted_entries(&class) {
            Ok(e) => e,
            Err(e) => {
                return Thermal {
                    zones: Vec::new(),
                    absent: Some(format!(
                        "no thermal class ({})",
                        sysfs::describe(&class, &e)
                    )),
                }
            }
        };
        let zones = entries
            .into_iter()
            .filter(|(name, _)| name.starts_with("thermal_zone"))
            .map(|(zone, path)| {
                let temp_path = path.join("temp");
                Zone {
                    zone_type: sysfs::clean_name(
                        &sysfs::read_string(&path.join("type")).unwrap_or_default(),
                        "unknown",
                    ),
                    temp: AttrFile::open(temp_path.clone())
                        .map_err(|e| format!("{zone} {}", sysfs::describe(&temp_path, &e))),
                    zone,
                }
            })
            .collect();
        Thermal {
            zones,
            absent: None,
        }
    }
}

impl Source for Thermal {
    fn name(&self) -> &'static str {
        "thermal"
    }

    fn inventory(&self) -> Inventory {
        let types: Vec<&str> = self.zones.iter().map(|z| z.zone_type.as_str()).collect();
        Inventory {
            devices: self.zones.iter().filter(|z| z.temp.is_ok()).count() as u32,
            summary: match self.zones.len() {
                0 => "no thermal zones".to_string(),
                n => format!("{n} zones: {}", types.join(", ")),
            },
            problems: self
                .zones
                .iter()
                .filter_map(|z| z.temp.as_ref().err().cloned())
                .collect(),
            unavailable: self.absent.clone(),
        }
    }

    fn read(&mut self, _at: TickMs, out: &mut Sample) -> Result<u32, SourceError> {
        if let Some(why) = &self.absent {
            return Err(SourceError(why.clone()));
        }
        let mut good = 0;
        for z in &self.zones {
            let (temp_c, error) = match &z.temp {
                // Millidegrees Celsius; disabled zones fail every read (EINVAL, ENODATA).
                Ok(f) => match f.read_i64() {
                    Ok(milli) => {
                        good += 1;
                        (Some(milli as f64 / 1000.0), None)
                    }
                    Err(e) => (None, Some(sysfs::describe(f.path(), &e))),
                },
                Err(why) => (None, Some(why.clone())),
            };
            out.thermal.push(ThermalZone {
                zone: z.zone.clone(),
                zone_type: z.zone_type.clone(),
                temp_c,
                error,
            });
        }
        Ok(good)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{empty_sample, fixture_copy};

    #[test]
    fn reads_zones_of_the_fixture() {
        let fx = fixture_copy();
        let mut t = Thermal::discover(&fx.sys());
        assert_eq!(t.inventory().summary, "2 zones: acpitz, x86_pkg_temp");
        let mut s = empty_sample();
        assert_eq!(t.read(0, &mut s).unwrap(), 2);
        let got: Vec<(&str, &str, Option<f64>)> = s
            .thermal
            .iter()
            .map(|z| (z.zone.as_str(), z.zone_type.as_str(), z.temp_c))
            .collect();
        assert_eq!(
            got,
            [
                ("thermal_zone0", "acpitz", Some(27.8)),
                ("thermal_zone1", "x86_pkg_temp", Some(-3.5)),
            ]
        );
    }

    #[test]
    fn bad_value_is_an_error_per_zone() {
        let fx = fixture_copy();
        let mut t = Thermal::discover(&fx.sys());
        fx.write("sys/class/thermal/thermal_zone1/temp", "n/a\n");
        let mut s = empty_sample();
        assert_eq!(t.read(0, &mut s).unwrap(), 1);
        assert_eq!(s.thermal[1].temp_c, None);
        assert!(s.thermal[1]
            .error
            .as_deref()
            .unwrap()
            .contains("not an integer"));
    }
}
