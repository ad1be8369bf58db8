//! Critical GPU events (XID errors, ECC errors), counted by kind and code per sample.
//!
//! NVML queues events in an event set; the NVML thread drains it without waiting at each
//! sample, so every event is counted in the span it arrived in (an exporter that keeps
//! only the last XID hides repeats).

use nodewatt_wire::{count_event, GpuEventKind, GpuEvents};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{EventSet, Nvml};

use super::gpu::GpuReader;

/// At most this many events are taken per sample, so an event storm cannot hold the
/// NVML thread; the rest wait in NVML's queue for the next sample.
const MAX_PER_SAMPLE: usize = 10_000;

/// The XID NVML gives when it could not tell which.
const XID_UNKNOWN: u64 = 999;

pub struct Events<'n> {
    set: Option<EventSet<'n>>,
    /// Raw device handle per GPU index, to tell which GPU an event belongs to.
    handles: Vec<(usize, usize)>,
    /// Why events are not counted, where they are not (for `check`).
    pub unavailable: Option<String>,
}

fn wanted() -> EventTypes {
    EventTypes::CRITICAL_XID_ERROR
        | EventTypes::DOUBLE_BIT_ECC_ERROR
        | EventTypes::SINGLE_BIT_ECC_ERROR
}

/// Kind and code of one event; `None` for types not counted.
pub fn classify(types: EventTypes, xid: Option<XidError>) -> Option<(GpuEventKind, u64)> {
    if types.contains(EventTypes::CRITICAL_XID_ERROR) {
        let code = match xid {
            Some(XidError::Value(v)) => v,
            _ => XID_UNKNOWN,
        };
        Some((GpuEventKind::Xid, code))
    } else if types.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
        Some((GpuEventKind::DoubleBitEcc, 0))
    } else if types.contains(EventTypes::SINGLE_BIT_ECC_ERROR) {
        Some((GpuEventKind::SingleBitEcc, 0))
    } else {
        None
    }
}

impl<'n> Events<'n> {
    /// Registers every GPU for the event types it supports among those counted, but
    /// those marked in `skip` (lost: NVML fails a set that holds one).
    pub fn register(nvml: &'n Nvml, gpus: &[GpuReader<'n>], skip: &[bool]) -> Events<'n> {
        let mut set = match nvml.create_event_set() {
            Ok(s) => s,
            Err(e) => {
                return Events {
                    set: None,
                    handles: Vec::new(),
                    unavailable: Some(format!("events not counted: {e}")),
                }
            }
        };
        let mut handles = Vec::new();
        let mut problems = Vec::new();
        for (i, d) in gpus.iter().map(GpuReader::device).enumerate() {
            if skip.get(i) == Some(&true) {
                continue;
            }
            let types = match d.supported_event_types() {
                Ok(t) => t & wanted(),
                Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => continue,
                Err(e) => {
                    problems.push(format!("GPU {i}: {e}"));
                    continue;
                }
            };
            if types.is_empty() {
                continue;
            }
            set = match d.register_events(types, set) {
                Ok(s) => s,
                Err(e) => {
                    // NVML freed the set: nothing more can be registered.
                    return Events {
                        set: None,
                        handles: Vec::new(),
                        unavailable: Some(format!("events not counted: GPU {i}: {}", e.error)),
                    };
                }
            };
            // SAFETY: the handle is only compared, never used to build a device.
            handles.push((unsafe { d.handle() } as usize, i));
        }
        Events {
            set: (!handles.is_empty()).then_some(set),
            handles,
            unavailable: (!problems.is_empty())
                .then(|| format!("events not counted for {}", problems.join("; "))),
        }
    }

    /// Whether any GPU's events are counted.
    pub fn counting(&self) -> bool {
        self.set.is_some()
    }

    /// Takes every queued event, counted per GPU position (as in `gpus`).
    pub fn drain(&self, counts: &mut [Vec<GpuEvents>]) -> Result<(), NvmlError> {
        let Some(set) = &self.set else { return Ok(()) };
        for _ in 0..MAX_PER_SAMPLE {
            let e = match set.wait(0) {
                Ok(e) => e,
                Err(NvmlError::Timeout) => return Ok(()),
                Err(e) => return Err(e),
            };
            // SAFETY: compared only.
            let handle = unsafe { e.device.handle() } as usize;
            let Some(&(_, i)) = self.handles.iter().find(|(h, _)| *h == handle) else {
                continue;
            };
            if let (Some((kind, code)), Some(list)) =
                (classify(e.event_type, e.event_data), counts.get_mut(i))
            {
                count_event(list, kind, code, 1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_classified_by_kind_and_code() {
        assert_eq!(
            classify(EventTypes::CRITICAL_XID_ERROR, Some(XidError::Value(79))),
            Some((GpuEventKind::Xid, 79))
        );
        assert_eq!(
            classify(EventTypes::CRITICAL_XID_ERROR, Some(XidError::Unknown)),
            Some((GpuEventKind::Xid, 999))
        );
        assert_eq!(
            classify(EventTypes::DOUBLE_BIT_ECC_ERROR, None),
            Some((GpuEventKind::DoubleBitEcc, 0))
        );
        assert_eq!(classify(EventTypes::PSTATE_CHANGE, None), None);
    }
}
