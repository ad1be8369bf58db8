//! The processes under a proc root (`[agent] proc_root`), for `check`: which slurmd, and
//! which agent, run on this node. Read once per check, never while sampling.

use std::io::Read;
use std::path::{Path, PathBuf};

/// One process: its pid, its directory under the proc root, and its arguments (the
/// program first; an empty argument is kept, as it shifts the options after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub dir: PathBuf,
    pub args: Vec<String>,
}

impl Process {
    /// The kernel's name of its program. Any user may set it: pair it with [`Self::uid`].
    pub fn comm(&self) -> String {
        read(&self.dir.join("comm"))
            .map(|b| String::from_utf8_lossy(&b).trim_end().to_string())
            .unwrap_or_default()
    }

    /// Who owns it.
    pub fn uid(&self) -> Option<u32> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.dir).map(|m| m.uid()).ok()
    }

    /// Its environment, `None` where it cannot be read (another user's, unless root).
    pub fn environ(&self) -> Option<Vec<String>> {
        read(&self.dir.join("environ")).map(|b| nul_separated(&b))
    }
}

/// The processes under `proc_root`, in no order; one that ends while read is left out.
pub fn list(proc_root: &Path) -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            let args = nul_separated(&read(&e.path().join("cmdline"))?);
            Some(Process {
                pid,
                dir: e.path(),
                args,
            })
        })
        .collect()
}

/// A /proc file, bounded (cmdline and environ are at most a few pages).
fn read(path: &Path) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// NUL-terminated strings (the last NUL may be missing); empty ones are kept.
fn nul_separated(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    bytes
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_read_with_their_arguments_and_environment() {
        let root = tempfile::tempdir().unwrap();
        for (name, cmdline, environ) in [
            (
                "7",
                &b"slurmd\0-L\0\0-f\0/x.conf\0"[..],
                Some(&b"A=1\0B=\0"[..]),
            ),
            ("8", b"kworker", None),
            ("self", b"not-a-pid\0", None),
        ] {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("cmdline"), cmdline).unwrap();
            std::fs::write(d.join("comm"), "slurmd\n").unwrap();
            if let Some(env) = environ {
                std::fs::write(d.join("environ"), env).unwrap();
            }
        }
        let mut ps = list(root.path());
        ps.sort_by_key(|p| p.pid);
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].args, ["slurmd", "-L", "", "-f", "/x.conf"]);
        assert_eq!(ps[0].comm(), "slurmd");
        assert_eq!(ps[0].environ().unwrap(), ["A=1", "B="]);
        assert_eq!(ps[1].args, ["kworker"]);
        assert_eq!(ps[1].environ(), None);
        assert!(list(&root.path().join("none")).is_empty());
        assert_eq!(nul_separated(b""), Vec::<String>::new());
    }
}
