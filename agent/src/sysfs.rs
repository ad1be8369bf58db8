//! Small helpers for reading sysfs/procfs attribute files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// An attribute file opened once and re-read in place with `pread` at offset 0, which
/// makes sysfs regenerate the value: no path lookup or open on the sampling path.
#[derive(Debug)]
pub struct AttrFile {
    path: PathBuf,
    file: File,
}

impl AttrFile {
    pub fn open(path: PathBuf) -> io::Result<AttrFile> {
        let file = File::open(&path)?;
        Ok(AttrFile { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the whole value (attributes are small) and parses it as an unsigned integer.
    pub fn read_u64(&self) -> io::Result<u64> {
        let mut buf = [0u8; 64];
        let n = self.file.read_at(&mut buf, 0)?;
        parse_u64(&buf[..n])
    }

    pub fn read_i64(&self) -> io::Result<i64> {
        let mut buf = [0u8; 64];
        let n = self.file.read_at(&mut buf, 0)?;
        let s = std::str::from_utf8(&buf[..n]).map_err(|_| invalid("not UTF-8"))?;
        s.trim()
            .parse()
            .map_err(|_| invalid(&format!("not an integer: {:?}", s.trim())))
    }
}

pub fn parse_u64(bytes: &[u8]) -> io::Result<u64> {
    let s = std::str::from_utf8(bytes).map_err(|_| invalid("not UTF-8"))?;
    s.trim()
        .parse()
        .map_err(|_| invalid(&format!("not an unsigned integer: {:?}", s.trim())))
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// A name read from hardware made into a label the collector accepts (the wire's rule).
pub use nodewatt_wire::name::clean_label as clean_name;

/// Reads a short text attribute (a name, a label), trimmed.
pub fn read_string(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

pub fn read_u64(path: &Path) -> io::Result<u64> {
    parse_u64(&std::fs::read(path)?)
}

/// An operator-facing reason for an I/O error, naming the file.
pub fn describe(path: &Path, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::PermissionDenied => format!("{}: permission denied", path.display()),
        io::ErrorKind::NotFound => format!("{}: not found", path.display()),
        _ => format!("{}: {e}", path.display()),
    }
}

/// Directory entries sorted by name, so output order is stable across runs and machines.
pub fn sorted_entries(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    out.sort_by(|a, b| nodewatt_common::natural_cmp(&a.0, &b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_file_rereads_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("energy_uj");
        std::fs::write(&p, "123\n").unwrap();
        let f = AttrFile::open(p.clone()).unwrap();
        assert_eq!(f.read_u64().unwrap(), 123);
        std::fs::write(&p, "7\n").unwrap();
        assert_eq!(f.read_u64().unwrap(), 7);
        std::fs::write(&p, "x\n").unwrap();
        assert_eq!(f.read_u64().unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
