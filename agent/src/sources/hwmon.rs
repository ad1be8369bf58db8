//! hwmon sensors (`<sys>/class/hwmon/hwmon*`): temperatures, fans, and power and energy
//! meters such as ACPI `power_meter`, which gives whole-node power on many servers.

use std::path::Path;

use nodewatt_wire::{HwmonSensor, Sample, SensorKind};

use super::{Inventory, Source, SourceError, TickMs};
use crate::sysfs::{self, AttrFile};

struct Channel {
    chip: String,
    device: String,
    sensor: String,
    label: Option<String>,
    kind: SensorKind,
    file: Result<AttrFile, String>,
}

pub struct Hwmon {
    channels: Vec<Channel>,
    chips: usize,
    absent: Option<String>,
}

/// Which attribute file carries a channel's value, and its kind.
/// Power meters expose either `powerN_input` or `powerN_average`; `input` wins.
fn classify(file: &str) -> Option<(String, SensorKind, u8)> {
    let (chan, attr) = file.split_once('_')?;
    let kind = if chan.starts_with("temp") {
        SensorKind::Temp
    } else if chan.starts_with("fan") {
        SensorKind::Fan
    } else if chan.starts_with("power") {
        SensorKind::Power
    } else if chan.starts_with("energy") {
        SensorKind::Energy
    } else {
        return None;
    };
    let digits = chan.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let rank = match (kind, attr) {
        (_, "input") => 0,
        (SensorKind::Power, "average") => 1,
        _ => return None,
    };
    Some((chan.to_string(), kind, rank))
}

/// Converts a raw hwmon value to the wire unit of its kind (sysfs-interface ABI units).
pub fn to_value(kind: SensorKind, raw: i64) -> (Option<f64>, Option<u64>) {
    match kind {
        SensorKind::Temp => (Some(raw as f64 / 1000.0), None), // millidegree C
        SensorKind::Fan => (Some(raw as f64), None),           // RPM
        SensorKind::Power => (Some(raw as f64 / 1_000_000.0), None), // microwatt
        SensorKind::Energy => (None, u64::try_from(raw).ok()), // microjoule
    }
}

/// A chip's name for people: `hwmonN/name`, else `hwmonN/device/name` (older drivers keep
/// their attributes in the parent device), else `hwmonN` itself.
fn chip_name(hwmon: &str, dir: &Path) -> String {
    [dir.join("name"), dir.join("device/name")]
        .iter()
        .find_map(|f| sysfs::read_string(f).ok().filter(|n| !n.trim().is_empty()))
        .map_or_else(|| hwmon.to_string(), |n| sysfs::clean_name(&n, hwmon))
}

/// A chip's identity across reboots, where `hwmonN` numbers follow the order drivers
/// loaded in (a two-socket node's chips can swap): its parent device, as the `device`
/// link resolves, `<parent>/<device>` (`platform/coretemp.0`, `pci0000:00/0000:00:18.3`),
/// as node_exporter names chips; `hwmonN` for a chip with no device.
fn chip_identity(hwmon: &str, dir: &Path) -> String {
    let Ok(dev) = std::fs::canonicalize(dir.join("device")) else {
        return hwmon.to_string();
    };
    let name = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
    };
    match (name(dev.parent()), name(Some(&dev))) {
        (Some(parent), Some(device)) => sysfs::clean_name(&format!("{parent}/{device}"), hwmon),
        _ => hwmon.to_string(),
    }
}

/// The channels of one chip, read (as node_exporter does) from `hwmonN/` and from
/// `hwmonN/device/`; a channel in both is read from `hwmonN/`.
fn chip_channels(hwmon: &str, dir: &Path) -> Vec<Channel> {
    let chip = chip_name(hwmon, dir);
    let device = chip_identity(hwmon, dir);
    // (channel, kind, rank, directory, file)
    let mut chosen: Vec<(String, SensorKind, u8, std::path::PathBuf, String)> = Vec::new();
    for attrs in [dir.to_path_buf(), dir.join("device")] {
        let Ok(entries) = sysfs::sorted_entries(&attrs) else {
            continue;
        };
        let from_hwmon: Vec<String> = chosen.iter().map(|c| c.0.clone()).collect();
        for (file, _) in entries {
            let Some((chan, kind, rank)) = classify(&file) else {
                continue;
            };
            if attrs != dir && from_hwmon.contains(&chan) {
                continue;
            }
            match chosen.iter_mut().find(|c| c.0 == chan) {
                Some(c) if rank < c.2 => *c = (chan, kind, rank, attrs.clone(), file),
                Some(_) => {}
                None => chosen.push((chan, kind, rank, attrs.clone(), file)),
            }
        }
    }
    chosen
        .into_iter()
        .map(|(chan, kind, _, attrs, file)| {
            let path = attrs.join(&file);
            let label = sysfs::read_string(&attrs.join(format!("{chan}_label")))
                .ok()
                .map(|l| sysfs::clean_name(&l, ""))
                .filter(|l| !l.is_empty());
            Channel {
                chip: chip.clone(),
                device: device.clone(),
                file: AttrFile::open(path.clone())
                    .map_err(|e| format!("{hwmon} ({chip}) {}", sysfs::describe(&path, &e))),
                sensor: chan,
                label,
                kind,
            }
        })
        .collect()
}

impl Hwmon {
    pub fn discover(sys_root: &Path) -> Hwmon {
        let class = sys_root.join("class/hwmon");
        match sysfs::sorted_entries(&class) {
            Ok(devices) => Hwmon {
                chips: devices.len(),
                channels: devices
                    .iter()
                    .flat_map(|(name, path)| chip_channels(name, path))
                    .collect(),
                absent: None,
            },
            Err(e) => Hwmon {
                channels: Vec::new(),
                chips: 0,
                absent: Some(format!("no hwmon class ({})", sysfs::describe(&class, &e))),
            },
        }
    }
}

impl Source for Hwmon {
    fn name(&self) -> &'static str {
        "hwmon"
    }

    fn inventory(&self) -> Inventory {
        let count = |k| self.channels.iter().filter(|c| c.kind == k).count();
        Inventory {
            devices: self.channels.iter().filter(|c| c.file.is_ok()).count() as u32,
            summary: format!(
                "{} chips: {} temperature, {} fan, {} power, {} energy sensors",
                self.chips,
                count(SensorKind::Temp),
                count(SensorKind::Fan),
                count(SensorKind::Power),
                count(SensorKind::Energy)
            ),
            problems: self
                .channels
                .iter()
                .filter_map(|c| c.file.as_ref().err().cloned())
                .collect(),
            unavailable: self.absent.clone(),
        }
    }

    fn read(&mut self, _at: TickMs, out: &mut Sample) -> Result<u32, SourceError> {
        if let Some(why) = &self.absent {
            return Err(SourceError(why.clone()));
        }
        let mut good = 0;
        for c in &self.channels {
            let mut s = HwmonSensor {
                chip: c.chip.clone(),
                device: c.device.clone(),
                sensor: c.sensor.clone(),
                label: c.label.clone(),
                kind: c.kind,
                value: None,
                energy_uj: None,
                error: None,
            };
            match c.file.as_ref().map(|f| (f, f.read_i64())) {
                Ok((_, Ok(raw))) => {
                    (s.value, s.energy_uj) = to_value(c.kind, raw);
                    good += 1;
                }
                // Sensors that are switched off answer ENODATA or EIO on every read.
                Ok((f, Err(e))) => s.error = Some(sysfs::describe(f.path(), &e)),
                Err(why) => s.error = Some(why.clone()),
            }
            out.hwmon.push(s);
        }
        Ok(good)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{empty_sample, fixture_copy};

    #[test]
    fn classifies_attribute_files() {
        assert_eq!(
            classify("temp1_input"),
            Some(("temp1".into(), SensorKind::Temp, 0))
        );
        assert_eq!(
            classify("power1_average"),
            Some(("power1".into(), SensorKind::Power, 1))
        );
        assert_eq!(
            classify("energy12_input"),
            Some(("energy12".into(), SensorKind::Energy, 0))
        );
        assert_eq!(classify("temp1_label"), None);
        assert_eq!(classify("temp1_max"), None);
        assert_eq!(classify("fan1_average"), None);
        assert_eq!(classify("in0_input"), None);
        assert_eq!(classify("temperature_input"), None);
    }

    #[test]
    fn converts_units() {
        assert_eq!(to_value(SensorKind::Temp, 45_500), (Some(45.5), None));
        assert_eq!(to_value(SensorKind::Temp, -5_000), (Some(-5.0), None));
        assert_eq!(
            to_value(SensorKind::Power, 412_000_000),
            (Some(412.0), None)
        );
        assert_eq!(to_value(SensorKind::Energy, 9_000), (None, Some(9_000)));
        assert_eq!(to_value(SensorKind::Energy, -1), (None, None));
    }

    /// (chip, device, sensor, label, value, energy_uj, has error) of every sensor read.
    type Row = (
        String,
        String,
        String,
        Option<String>,
        Option<f64>,
        Option<u64>,
        bool,
    );

    fn rows(h: &mut Hwmon) -> Vec<Row> {
        let mut s = empty_sample();
        h.read(0, &mut s).unwrap();
        s.hwmon
            .into_iter()
            .map(|x| {
                let err = x.error.is_some();
                (
                    x.chip,
                    x.device,
                    x.sensor,
                    x.label,
                    x.value,
                    x.energy_uj,
                    err,
                )
            })
            .collect()
    }

    #[test]
    fn reads_every_chip_of_the_fixture() {
        let fx = fixture_copy();
        let mut h = Hwmon::discover(&fx.sys());
        let inv = h.inventory();
        assert_eq!(
            inv.summary,
            "7 chips: 5 temperature, 2 fan, 1 power, 2 energy sensors"
        );
        // fan2 of nct6775 reads as no number, like a switched-off sensor: an error, not 0.
        assert_eq!(h.read(0, &mut empty_sample()).unwrap(), 9);
        let row = |chip: &str, dev: &str, sensor: &str, label: Option<&str>, v, e, err| -> Row {
            (
                chip.into(),
                dev.into(),
                sensor.into(),
                label.map(Into::into),
                v,
                e,
                err,
            )
        };
        assert_eq!(
            rows(&mut h),
            [
                // No `device` link (a virtual chip): named and identified by hwmonN.
                row("acpitz", "hwmon0", "temp1", None, Some(27.8), None, false),
                row(
                    "coretemp",
                    "platform/coretemp.0",
                    "temp1",
                    Some("Package id 0"),
                    Some(52.0),
                    None,
                    false
                ),
                row(
                    "coretemp",
                    "platform/coretemp.0",
                    "temp2",
                    Some("Core 0"),
                    Some(49.0),
                    None,
                    false
                ),
                row(
                    "nct6775",
                    "platform/nct6775.656",
                    "fan1",
                    None,
                    Some(1830.0),
                    None,
                    false
                ),
                row(
                    "nct6775",
                    "platform/nct6775.656",
                    "fan2",
                    None,
                    None,
                    None,
                    true
                ),
                row(
                    "power_meter",
                    "device:00/ACPI0000:00",
                    "power1",
                    None,
                    Some(412.5),
                    None,
                    false
                ),
                row(
                    "amd_energy",
                    "platform/amd_energy.0",
                    "energy1",
                    Some("Esocket0"),
                    None,
                    Some(123_456_789),
                    false
                ),
                row(
                    "amd_energy",
                    "platform/amd_energy.0",
                    "energy2",
                    Some("Ecore000"),
                    None,
                    Some(98_765),
                    false
                ),
                // An older driver: name and sensors in the parent device (`device/`).
                row(
                    "w83627ehf",
                    "platform/w83627ehf.2576",
                    "temp1",
                    None,
                    Some(38.0),
                    None,
                    false
                ),
                // Sensors in hwmonN/ and no `name` anywhere: named hwmonN, still read.
                row(
                    "hwmon6",
                    "platform/i5k_amb.0",
                    "temp1",
                    None,
                    Some(61.0),
                    None,
                    false
                ),
            ]
        );
    }

    /// hwmonN numbers follow driver load order: renumbered chips keep their identity.
    #[test]
    fn chips_keep_their_identity_when_hwmon_numbers_change() {
        let fx = fixture_copy();
        let before = rows(&mut Hwmon::discover(&fx.sys()));
        let class = fx.sys().join("class/hwmon");
        let link = |n: &str| std::fs::read_link(class.join(n)).unwrap();
        let (one, two) = (link("hwmon1"), link("hwmon2"));
        for (n, target) in [("hwmon1", two), ("hwmon2", one)] {
            std::fs::remove_file(class.join(n)).unwrap();
            std::os::unix::fs::symlink(target, class.join(n)).unwrap();
        }
        let mut after = rows(&mut Hwmon::discover(&fx.sys()));
        let mut before = before;
        before.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        after.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        assert_eq!(before, after);
    }
}
