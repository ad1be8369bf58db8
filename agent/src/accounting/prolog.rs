//! Where Slurm's prolog and epilog write the job registry, for `check`: found from
//! slurm.conf and the scripts it names, which are read but never run (a site's prolog
//! may do anything). nodewatt's scripts (config/slurm/) write to
//! `${NODEWATT_JOBS_DIR:-/run/nodewatt/jobs}`; a site's own prolog may set that variable
//! and call them, directly, through a wrapper, or from a directory of scripts.
//!
//! This reads shell without running it, so it knows the forms docs/slurm.md shows
//! (`NODEWATT_JOBS_DIR=/x exec /etc/nodewatt/slurm/prolog`, `export NODEWATT_JOBS_DIR=/x`,
//! `run-parts /etc/slurm/prolog.d`, `for f in /etc/slurm/prolog.d/*`), and says so when
//! a value comes from something only the shell knows.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Where slurm.conf is looked for when `SLURM_CONF` is not set: Debian's path, older
/// packages' path, and the copies slurmd keeps in configless mode.
pub const CONF_PATHS: &[&str] = &[
    "/etc/slurm/slurm.conf",
    "/etc/slurm-llnl/slurm.conf",
    "/run/slurm/conf/slurm.conf",
    "/var/spool/slurmd/conf-cache/slurm.conf",
];

const VAR: &str = "NODEWATT_JOBS_DIR";
/// Scripts and slurm.conf files are small; anything bigger (a binary) is read this far.
const MAX_READ: u64 = 256 * 1024;
/// Wrapper depth and files per script followed, so a hostile or cyclic tree ends.
const MAX_DEPTH: usize = 4;
const MAX_NAMED: usize = 64;
const MAX_FILES: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Prolog,
    Epilog,
}

impl Hook {
    /// The slurm.conf parameter.
    pub fn parameter(self) -> &'static str {
        match self {
            Hook::Prolog => "Prolog",
            Hook::Epilog => "Epilog",
        }
    }
}

/// The `Prolog` or `Epilog` values (the parameter may be given more than once; keys are
/// case-insensitive) and the `Include` files of one slurm.conf text.
pub fn conf_values(text: &str, hook: Hook) -> (Vec<String>, Vec<String>) {
    let (mut values, mut includes) = (Vec::new(), Vec::new());
    // A line ending in a backslash goes on.
    let joined = text.replace("\\\n", " ");
    for line in joined.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.eq_ignore_ascii_case("include") {
            let rest = line[first.len()..].trim();
            if !rest.is_empty() {
                includes.push(unquote(rest).to_owned());
            }
            continue;
        }
        for word in line.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                if k.eq_ignore_ascii_case(hook.parameter()) && !v.is_empty() {
                    values.push(unquote(v).to_owned());
                }
            }
        }
    }
    (values, includes)
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    s
}

/// What one script says about the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// nodewatt's own prolog or epilog: it writes to `$NODEWATT_JOBS_DIR`, or this.
    Ours { default: String },
    /// Another script: the NODEWATT_JOBS_DIR it sets, if any, and the absolute paths it
    /// names (what it may run).
    Other {
        sets: Option<Assignment>,
        paths: Vec<String>,
    },
}

/// A script's last assignment of NODEWATT_JOBS_DIR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub value: String,
    /// `export V=x`, `V=x command`, `env V=x command`, or `V=x` with `export V` or
    /// `set -a`: the commands it runs see it. A bare `V=x` stays in the shell.
    pub exported: bool,
}

impl Assignment {
    /// The value, when the text alone says it (no `$var`, `$(...)` or backquotes).
    pub fn literal(&self) -> Option<&str> {
        (!self.value.contains(['$', '`'])).then_some(self.value.as_str())
    }
}

/// Reads a script's text (without running it).
pub fn script(text: &str) -> Script {
    let code: Vec<&str> = text.lines().map(without_comment).collect();
    let ours = code.iter().find_map(|l| {
        l.trim()
            .strip_prefix("dir=${NODEWATT_JOBS_DIR:-")
            .and_then(|rest| rest.split_once('}'))
            .map(|(default, _)| default.to_owned())
    });
    if let Some(default) = ours {
        return Script::Ours { default };
    }
    let exports_all = code.iter().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.windows(2)
            .any(|p| p[0] == "set" && p[1].starts_with('-') && p[1].contains('a'))
            || w.windows(2).any(|p| p[0] == "export" && p[1] == VAR)
    });
    let mut sets = None;
    for line in &code {
        // One statement at a time: `a; b`, `a && b`.
        for statement in line.split([';', '&', '|']) {
            let words: Vec<&str> = statement.split_whitespace().collect();
            for (i, w) in words.iter().enumerate() {
                let Some(value) = w.strip_prefix(VAR).and_then(|r| r.strip_prefix('=')) else {
                    continue;
                };
                let before = i.checked_sub(1).map(|j| words[j]);
                let prefix = i + 1 < words.len();
                sets = Some(Assignment {
                    value: unquote(value).to_owned(),
                    exported: exports_all || before == Some("export") || prefix,
                });
            }
        }
    }
    let mut paths: Vec<String> = Vec::new();
    for line in &code {
        for token in line.split(|c: char| c.is_whitespace() || "=;&|()<>\"'`".contains(c)) {
            let token = token.trim_end_matches(['}', ',']);
            if token.starts_with('/')
                && !["/dev/", "/proc/", "/sys/"]
                    .iter()
                    .any(|p| token.starts_with(p))
                && sets.as_ref().is_none_or(|a| a.value != token)
                && !paths.iter().any(|p| p == token)
                && paths.len() < MAX_NAMED
            {
                paths.push(token.to_owned());
            }
        }
    }
    Script::Other { sets, paths }
}

/// The line up to a `#` that starts a word (`${#x}` and `a#b` are not comments).
fn without_comment(line: &str) -> &str {
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        if c == '#' && prev.is_whitespace() {
            return &line[..i];
        }
        prev = c;
    }
    line
}

/// One of nodewatt's scripts that slurmd runs through a Prolog or Epilog value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    pub script: PathBuf,
    /// Where it writes, or why the text alone cannot tell.
    pub writes: Result<PathBuf, String>,
}

/// What one Prolog or Epilog value of slurm.conf leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: String,
    /// Why slurmd cannot run it (missing, not executable).
    pub broken: Option<String>,
    pub reached: Vec<Reached>,
}

/// The slurm.conf this node's Slurm reads: `SLURM_CONF` if set, else the first of
/// [`CONF_PATHS`] that exists.
pub fn find_conf(slurm_conf: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = slurm_conf {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(format!(
                "SLURM_CONF names {}, which is not a file",
                p.display()
            ))
        };
    }
    CONF_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no slurm.conf in {}", CONF_PATHS.join(", ")))
}

/// The `hook` values of `conf` (and the files it includes), each followed to the
/// nodewatt scripts it runs.
pub fn entries(conf: &Path, hook: Hook) -> Result<Vec<Entry>, String> {
    let mut values = Vec::new();
    conf_tree(conf, hook, &mut values, 0)?;
    // Values are fully qualified paths; Slurm 21.08 and later also take globs.
    Ok(values
        .into_iter()
        .map(|value| {
            let files = expand(Path::new(&value));
            let broken = if files.is_empty() {
                Some(format!("{value} does not exist"))
            } else {
                files
                    .iter()
                    .find(|f| !executable(f))
                    .map(|f| format!("{} is not executable: slurmd cannot run it", f.display()))
            };
            let mut walk = Walk::default();
            for f in &files {
                walk.follow(f, None, 0);
            }
            Entry {
                value,
                broken,
                reached: walk.reached,
            }
        })
        .collect())
}

fn conf_tree(
    conf: &Path,
    hook: Hook,
    values: &mut Vec<String>,
    depth: usize,
) -> Result<(), String> {
    let text = read_capped(conf).map_err(|e| format!("cannot read {}: {e}", conf.display()))?;
    let (mut found, includes) = conf_values(&text, hook);
    values.append(&mut found);
    if depth < MAX_DEPTH {
        for inc in includes {
            // Relative includes are relative to slurm.conf's directory.
            let base = conf.parent().unwrap_or(Path::new("/"));
            for f in expand(&base.join(inc)) {
                conf_tree(&f, hook, values, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// A walk from one Prolog or Epilog value through the scripts it names.
#[derive(Default)]
struct Walk {
    /// Wrappers already read: each once, so cycles end and a wide tree stays bounded.
    seen: std::collections::HashSet<PathBuf>,
    reached: Vec<Reached>,
}

impl Walk {
    /// Follows `file` to nodewatt's scripts it runs; `inherited` is the
    /// NODEWATT_JOBS_DIR its caller exported to it.
    fn follow(&mut self, file: &Path, inherited: Option<&Assignment>, depth: usize) {
        if depth > MAX_DEPTH || self.seen.len() >= MAX_FILES {
            return;
        }
        let Ok(text) = read_capped(file) else { return };
        if text.contains('\0') {
            return; // a program, not a script
        }
        match script(&text) {
            Script::Ours { default } => {
                let writes = match inherited {
                    None => Ok(PathBuf::from(default)),
                    Some(a) => a.literal().map(PathBuf::from).ok_or_else(|| {
                        format!(
                            "{VAR} is set from {:?}, which only the shell knows",
                            a.value
                        )
                    }),
                };
                let r = Reached {
                    script: file.to_owned(),
                    writes,
                };
                if !self.reached.contains(&r) {
                    self.reached.push(r);
                }
            }
            Script::Other { sets, paths } => {
                if !self.seen.insert(file.to_owned()) {
                    return;
                }
                let hands_on = match &sets {
                    Some(a) if a.exported => Some(a),
                    _ => inherited,
                };
                let before = self.reached.len();
                for p in paths {
                    for f in expand(Path::new(&p)) {
                        self.follow(&f, hands_on, depth + 1);
                    }
                }
                // A bare assignment never reaches what the script runs.
                if let Some(a) = sets.filter(|a| !a.exported) {
                    for r in &mut self.reached[before..] {
                        if let Ok(w) = &r.writes {
                            r.writes = Err(format!(
                                "{} sets {VAR}={} but does not export it, so {} writes to {}",
                                file.display(),
                                a.value,
                                r.script.display(),
                                w.display()
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// The files a named path stands for: itself, a directory's files (run-parts), or a
/// glob's matches in its last component.
fn expand(path: &Path) -> Vec<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let listed = |dir: &Path, keep: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| !n.starts_with('.') && keep(n))
            })
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .take(MAX_NAMED)
            .collect();
        files.sort();
        files
    };
    if name.contains(['*', '?']) {
        return listed(path.parent().unwrap_or(Path::new("/")), &|n| glob(name, n));
    }
    if path.is_dir() {
        return listed(path, &|_| true);
    }
    if path.is_file() {
        vec![path.to_owned()]
    } else {
        Vec::new()
    }
}

/// `*` and `?` matching, as the shell does within one path component.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(file).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

fn read_capped(file: &Path) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(file)?
        .take(MAX_READ)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Whether two paths name the same directory: through symlinks (`/var/run` is `/run`)
/// where they exist, and by their components where they do not (yet).
pub fn same_dir(a: &Path, b: &Path) -> bool {
    resolved(a) == resolved(b)
}

fn resolved(p: &Path) -> PathBuf {
    // The longest existing ancestor, resolved, and the rest as written.
    let mut rest = Vec::new();
    let mut head = p.to_path_buf();
    loop {
        if let Ok(real) = head.canonicalize() {
            let mut out = real;
            for c in rest.iter().rev() {
                out.push(c);
            }
            return out
                .components()
                .filter(|c| *c != Component::CurDir)
                .collect();
        }
        match (head.file_name().map(|n| n.to_owned()), head.parent()) {
            (Some(n), Some(parent)) => {
                rest.push(n);
                head = parent.to_path_buf();
            }
            _ => return p.components().filter(|c| *c != Component::CurDir).collect(),
        }
    }
}

/// The `check` verdict for one hook: what is fine, or the problem and what to do.
pub fn verdict(
    hook: Hook,
    conf: &Path,
    entries: &[Entry],
    jobs_dir: &Path,
) -> Result<String, String> {
    let param = hook.parameter();
    let ours = match hook {
        Hook::Prolog => "config/slurm/prolog",
        Hook::Epilog => "config/slurm/epilog",
    };
    if entries.is_empty() {
        return Err(format!(
            "{} sets no {param}: no job reaches the registry; install {ours} (docs/slurm.md)",
            conf.display()
        ));
    }
    if let Some(why) = entries.iter().find_map(|e| e.broken.as_ref()) {
        return Err(format!("{param} in {}: {why}", conf.display()));
    }
    let reached: Vec<&Reached> = entries.iter().flat_map(|e| &e.reached).collect();
    let values = entries
        .iter()
        .map(|e| e.value.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(r) = reached
        .iter()
        .find(|r| r.writes.as_ref().is_ok_and(|w| same_dir(w, jobs_dir)))
    {
        return Ok(format!(
            "{} writes to {} ({param}={values} in {})",
            r.script.display(),
            jobs_dir.display(),
            conf.display()
        ));
    }
    let Some(first) = reached.first() else {
        return Err(format!(
            "{param}={values} in {} does not run nodewatt's {} ({ours}): no job reaches the registry; see docs/slurm.md",
            conf.display(),
            hook.parameter().to_lowercase()
        ));
    };
    Err(match &first.writes {
        Ok(w) => format!(
            "{} ({param}={values} in {}) writes to {}, but [jobs] dir is {}: set [jobs] dir, or {VAR} in a wrapper (docs/slurm.md)",
            first.script.display(),
            conf.display(),
            w.display(),
            jobs_dir.display()
        ),
        Err(why) => format!(
            "{param}={values} in {}: {why}; [jobs] dir is {}",
            conf.display(),
            jobs_dir.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = include_str!("../../../config/slurm/prolog");
    const OURS_EPILOG: &str = include_str!("../../../config/slurm/epilog");

    #[test]
    fn slurm_conf_values_are_case_insensitive_repeatable_and_quoted() {
        let text = "# Prolog=/commented\nControlMachine=x\nprolog=/a/p1 # the first\n\
                    PROLOG=\"/b/p2\"\nEpilog=/e\nPrologFlags=Alloc\nInclude /etc/slurm/more.conf\n\
                    NodeName=n1 CPUs=8 \\\n  Prolog=/c/p3\n";
        let (values, includes) = conf_values(text, Hook::Prolog);
        assert_eq!(values, ["/a/p1", "/b/p2", "/c/p3"]);
        assert_eq!(includes, ["/etc/slurm/more.conf"]);
        assert_eq!(conf_values(text, Hook::Epilog).0, ["/e"]);
    }

    #[test]
    fn our_scripts_are_known_by_their_registry_line() {
        for text in [OURS, OURS_EPILOG] {
            assert_eq!(
                script(text),
                Script::Ours {
                    default: "/run/nodewatt/jobs".into()
                }
            );
        }
    }

    #[test]
    fn a_wrapper_hands_its_exported_directory_on() {
        let cases = [
            (
                "NODEWATT_JOBS_DIR=/x exec /etc/nodewatt/slurm/prolog\n",
                true,
            ),
            (
                "export NODEWATT_JOBS_DIR=/x\n/etc/nodewatt/slurm/prolog \"$@\"\n",
                true,
            ),
            (
                "NODEWATT_JOBS_DIR='/x'\nexport NODEWATT_JOBS_DIR\n/etc/nodewatt/slurm/prolog\n",
                true,
            ),
            (
                "set -a\nNODEWATT_JOBS_DIR=/x\n/etc/nodewatt/slurm/prolog\n",
                true,
            ),
            (
                "env NODEWATT_JOBS_DIR=/x /etc/nodewatt/slurm/prolog || true\n",
                true,
            ),
            ("NODEWATT_JOBS_DIR=/x\n/etc/nodewatt/slurm/prolog\n", false),
            ("NODEWATT_JOBS_DIR=/x; /etc/nodewatt/slurm/prolog\n", false),
        ];
        for (text, exported) in cases {
            let Script::Other { sets, paths } = script(text) else {
                panic!("{text}")
            };
            assert_eq!(
                sets,
                Some(Assignment {
                    value: "/x".into(),
                    exported
                }),
                "{text}"
            );
            assert!(
                paths.contains(&"/etc/nodewatt/slurm/prolog".to_owned()),
                "{text}"
            );
            assert!(!paths.contains(&"/x".to_owned()), "{text}");
        }
    }

    #[test]
    fn comments_and_computed_values_are_not_taken_for_paths() {
        let Script::Other { sets, paths } =
            script("#!/bin/sh\n# NODEWATT_JOBS_DIR=/old /opt/old/prolog\nexport NODEWATT_JOBS_DIR=$BASE/jobs\nrun-parts /etc/slurm/prolog.d >/dev/null 2>&1\n")
        else {
            panic!()
        };
        assert_eq!(paths, ["/etc/slurm/prolog.d"]);
        let sets = sets.unwrap();
        assert_eq!(sets.literal(), None);
        assert!(sets.exported);
    }

    #[test]
    fn globs_match_within_a_component() {
        assert!(glob("*", "a"));
        assert!(glob("*.sh", "10-nodewatt.sh"));
        assert!(!glob("*.sh", "10-nodewatt.sh.bak"));
        assert!(glob("p?olog*", "prolog"));
        assert!(!glob("p?olog", "prolog2"));
    }

    fn install(dir: &Path, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A site prolog that runs a directory of scripts, one of them a wrapper that moves
    /// the registry, as slurm.conf names it.
    #[test]
    fn a_prolog_is_followed_through_wrappers_and_directories() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let ours = install(root, "nodewatt/prolog", OURS);
        install(
            root,
            "prolog.d/50-nodewatt",
            &format!(
                "#!/bin/sh\nNODEWATT_JOBS_DIR={}/jobs exec {}\n",
                root.display(),
                ours.display()
            ),
        );
        install(root, "prolog.d/10-other", "#!/bin/sh\necho hi >/dev/null\n");
        let site = install(
            root,
            "site-prolog",
            &format!(
                "#!/bin/bash\nfor f in {}/prolog.d/*; do \"$f\"; done\nexit 0\n",
                root.display()
            ),
        );
        let conf = install(
            root,
            "slurm.conf",
            &format!("Prolog={}\nInclude more.conf\n", site.display()),
        );
        install(root, "more.conf", &format!("Epilog={}\n", ours.display()));

        let prolog = entries(&conf, Hook::Prolog).unwrap();
        assert_eq!(prolog.len(), 1);
        assert_eq!(prolog[0].broken, None);
        assert_eq!(
            prolog[0].reached,
            [Reached {
                script: ours.clone(),
                writes: Ok(root.join("jobs")),
            }]
        );
        let ok = verdict(Hook::Prolog, &conf, &prolog, &root.join("jobs")).unwrap();
        assert!(
            ok.starts_with(&format!("{} writes to ", ours.display())),
            "{ok}"
        );
        let wrong = verdict(
            Hook::Prolog,
            &conf,
            &prolog,
            Path::new("/run/nodewatt/jobs"),
        );
        assert!(wrong.unwrap_err().contains(&format!(
            "writes to {}, but [jobs] dir is /run/nodewatt/jobs",
            root.join("jobs").display()
        )),);

        // The epilog, from the included file, writes the default.
        let epilog = entries(&conf, Hook::Epilog).unwrap();
        assert_eq!(epilog[0].reached[0].writes, Ok("/run/nodewatt/jobs".into()));
        assert!(verdict(
            Hook::Epilog,
            &conf,
            &epilog,
            Path::new("/run/nodewatt/jobs/")
        )
        .is_ok());
    }

    #[test]
    fn what_slurm_cannot_run_or_never_reaches_us_is_a_problem() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let jobs = Path::new("/run/nodewatt/jobs");
        let conf = install(root, "slurm.conf", "ClusterName=x\n");
        let none = entries(&conf, Hook::Prolog).unwrap();
        assert!(verdict(Hook::Prolog, &conf, &none, jobs)
            .unwrap_err()
            .contains("sets no Prolog"));

        let other = install(root, "other", "#!/bin/sh\nexit 0\n");
        std::fs::write(&conf, format!("Prolog={}\n", other.display())).unwrap();
        let e = entries(&conf, Hook::Prolog).unwrap();
        assert!(verdict(Hook::Prolog, &conf, &e, jobs)
            .unwrap_err()
            .contains("does not run nodewatt's prolog"));

        std::fs::write(&conf, format!("Prolog={}/missing\n", root.display())).unwrap();
        let e = entries(&conf, Hook::Prolog).unwrap();
        assert!(verdict(Hook::Prolog, &conf, &e, jobs)
            .unwrap_err()
            .contains("does not exist"));

        let ours = install(root, "ours", OURS);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&conf, format!("Prolog={}\n", ours.display())).unwrap();
        let e = entries(&conf, Hook::Prolog).unwrap();
        assert!(verdict(Hook::Prolog, &conf, &e, jobs)
            .unwrap_err()
            .contains("is not executable"));

        // A wrapper that forgets `export`: our prolog writes the default, not /x.
        let ours = install(root, "ours", OURS);
        let wrapper = install(
            root,
            "wrapper",
            &format!("#!/bin/sh\nNODEWATT_JOBS_DIR=/x\n{}\n", ours.display()),
        );
        std::fs::write(&conf, format!("Prolog={}\n", wrapper.display())).unwrap();
        let e = entries(&conf, Hook::Prolog).unwrap();
        let why = verdict(Hook::Prolog, &conf, &e, Path::new("/x")).unwrap_err();
        assert!(
            why.contains("sets NODEWATT_JOBS_DIR=/x but does not export it"),
            "{why}"
        );
    }

    #[test]
    fn a_cycle_of_scripts_ends() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        install(d.path(), "a", &format!("#!/bin/sh\n{}\n", b.display()));
        install(d.path(), "b", &format!("#!/bin/sh\n{}\n", a.display()));
        let mut walk = Walk::default();
        walk.follow(&a, None, 0);
        assert!(walk.reached.is_empty());
        assert_eq!(walk.seen.len(), 2);
    }

    #[test]
    fn directories_compare_through_symlinks_and_trailing_slashes() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("run");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("var-run")).unwrap();
        assert!(same_dir(
            &real.join("nodewatt/jobs"),
            &d.path().join("var-run/nodewatt/jobs/")
        ));
        assert!(same_dir(
            Path::new("/nonexistent/a/"),
            Path::new("/nonexistent/./a")
        ));
        assert!(!same_dir(
            Path::new("/nonexistent/a"),
            Path::new("/nonexistent/b")
        ));
    }
}
