//! The sampler's state file: saved at stop, read (and removed) at the next start. Removed
//! once read, so a state is resumed at most once: a run that dies without saving leaves
//! nothing that a later start could take for a clean stop.

use std::path::Path;

use crate::sampler::State;

/// This boot's id from `<proc_root>/sys/kernel/random/boot_id`.
pub fn boot_id(proc_root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join("sys/kernel/random/boot_id")).ok()?;
    let id = text.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// The saved state, if there is a readable one; the file is removed either way.
pub fn take(path: &Path) -> Result<Option<State>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let parsed = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a saved agent state: {e}", path.display()));
    std::fs::remove_file(path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    parsed.map(Some)
}

/// Writes the state atomically, synced.
pub fn save(path: &Path, state: &State) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    nodewatt_common::write_atomic(path, &bytes, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;

    #[test]
    fn a_state_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let st = State {
            boot_id: "b".into(),
            cluster: n("c"),
            node: n("n1"),
            seq: 7,
            origin_ms: 1,
            deltas: Default::default(),
            ledger: Some(crate::accounting::ledger::Ledger::new(1, 60_000)),
            pending_totals: Vec::new(),
            aggregate: Default::default(),
        };
        save(&path, &st).unwrap();
        assert_eq!(take(&path).unwrap(), Some(st));
        assert_eq!(take(&path).unwrap(), None);
        std::fs::write(&path, "{").unwrap();
        assert!(take(&path).unwrap_err().contains("not a saved agent state"));
        assert!(!path.exists());
    }

    #[test]
    fn boot_id_from_proc() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(boot_id(dir.path()), None);
        std::fs::create_dir_all(dir.path().join("sys/kernel/random")).unwrap();
        std::fs::write(dir.path().join("sys/kernel/random/boot_id"), "abc-1\n").unwrap();
        assert_eq!(boot_id(dir.path()).as_deref(), Some("abc-1"));
    }
}
