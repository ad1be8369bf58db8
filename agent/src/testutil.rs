//! Test helpers: a private copy of the fixture node tree, and running code without root's
//! permission bypass.

use std::path::{Path, PathBuf};

use nodewatt_wire::Sample;

pub fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node")
}

pub struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    pub fn root(&self) -> &Path {
        self.dir.path()
    }
    pub fn sys(&self) -> PathBuf {
        self.root().join("sys")
    }
    pub fn proc(&self) -> PathBuf {
        self.root().join("proc")
    }
    pub fn write(&self, rel: &str, content: &str) {
        std::fs::write(self.root().join(rel), content).unwrap();
    }
    pub fn chmod(&self, rel: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.root().join(rel), std::fs::Permissions::from_mode(mode))
            .unwrap();
    }
}

/// A writable copy of the fixture tree (symlinks kept as symlinks, like sysfs).
pub fn fixture_copy() -> Fixture {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // Searchable by everyone, so `unprivileged` runs still reach the files.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    copy_tree(&fixture_root(), dir.path());
    Fixture { dir }
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let ft = entry.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if ft.is_dir() {
            std::fs::create_dir(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Runs `f` as an unprivileged user for file access: as root (where permission bits do not
/// apply) the thread's filesystem uid is switched to `nobody`, which also drops the file
/// capabilities, and switched back after. Panics if that cannot be arranged, so a test
/// relying on it can never pass vacuously.
pub fn unprivileged<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: setfsuid only changes this thread's filesystem credentials.
    unsafe {
        if libc::geteuid() != 0 {
            return f();
        }
        libc::setfsuid(65534);
        assert_eq!(libc::setfsuid(u32::MAX), 65534, "setfsuid(nobody) failed");
        let out = f();
        libc::setfsuid(0);
        assert_eq!(libc::setfsuid(u32::MAX), 0, "setfsuid(root) failed");
        out
    }
}

pub fn empty_sample() -> Sample {
    Sample::new("test", n("c"), n("n"), 1000, 0)
}

/// A name of any wire name type, for tests: `n::<Project>("p")`, or inferred.
pub fn n<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().unwrap()
}
