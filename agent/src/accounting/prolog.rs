//! Where Slurm's prolog and epilog write the job registry, for `check`: found from
//! slurm.conf and the scripts it names, which are read but never run (a site's prolog
//! may do anything). nodewatt's scripts (config/slurm/) write to
//! `${NODEWATT_JOBS_DIR:-/run/nodewatt/jobs}`; a site's own prolog may set that variable
//! and call them, directly, through a wrapper, or from a directory of scripts.
//!
//! Shell is read without running it, statement by statement: sourced files
//! (`. /etc/default/x`), `V=x cmd` (for `cmd` only), `export`/`declare -x`/`set -a`,
//! `${V:-x}`, `case` branches, `run-parts` directories and globs. What only the shell
//! could resolve (`$BASE/jobs`, different values in different branches) is said to be
//! unknown rather than guessed: a wrong "ok" would hide unbilled jobs.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Where slurm.conf is looked for when neither `SLURM_CONF` nor a running slurmd names
/// one: the copies slurmd keeps in configless mode, Debian's path, older packages' path.
const CONF_PATHS: &[&str] = &[
    // Where slurmd keeps a configless cluster's config: the one in use when there.
    "/run/slurm/conf/slurm.conf",
    "/var/spool/slurmd/conf-cache/slurm.conf",
    "/etc/slurm/slurm.conf",
    "/etc/slurm-llnl/slurm.conf",
];

const VAR: &str = "NODEWATT_JOBS_DIR";
/// Scripts and slurm.conf files are small; anything bigger (a binary) is read this far.
const MAX_READ: u64 = 256 * 1024;
/// Wrapper depth and files per script followed, so a hostile or cyclic tree ends.
const MAX_DEPTH: usize = 4;
const MAX_NAMED: usize = 64;
const MAX_FILES: usize = 256;
const MAX_LISTED: usize = 1024;

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
fn conf_values(text: &str, hook: Hook) -> (Vec<String>, Vec<String>) {
    let (mut values, mut includes) = (Vec::new(), Vec::new());
    // A line ending in a backslash goes on.
    let joined = text.replace("\\\n", " ");
    for line in joined.lines() {
        // Slurm takes `Prolog = /x` as `Prolog=/x`.
        let line = tighten(line.split('#').next().unwrap_or(""));
        let line = line.trim();
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

/// The line without blanks around its `=`s.
fn tighten(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '=' {
            out.truncate(out.trim_end().len());
            out.push('=');
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
        } else {
            out.push(c);
        }
    }
    out
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
enum Script {
    /// nodewatt's own prolog or epilog: it writes to `$NODEWATT_JOBS_DIR`, or this.
    Ours {
        hook: Hook,
        default: String,
    },
    Other(Wrapper),
}

/// A script that is not ours: a site's prolog, or a wrapper around ours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Wrapper {
    /// Its assignments of NODEWATT_JOBS_DIR, in text order.
    sets: Vec<Assignment>,
    /// `export V`, `declare -x V` or `set -a`: its assignments reach what it runs.
    exports: bool,
    /// The files it sources (`. f`, `source f`): their assignments are its own.
    sources: Vec<String>,
    /// The absolute paths it names otherwise: what it may run.
    paths: Vec<String>,
}

/// One assignment of NODEWATT_JOBS_DIR.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Assignment {
    value: String,
    scope: Scope,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// `export V=x`, `declare -x V=x`: what the script runs sees it.
    Exported,
    /// `V=x` alone: it stays in the shell unless the script exports V.
    Shell,
    /// `V=x command`, `env V=x command`: only that command (the paths it names) sees it.
    Prefix(Vec<String>),
}

/// The value NODEWATT_JOBS_DIR has for a script or what it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Env {
    Unset,
    Dir(String),
    /// Only the shell could say (why).
    Unknown(String),
}

impl Env {
    /// `value` assigned where the variable was `self`: a literal, or `$V`, `${V}`,
    /// `${V:-x}`, `${V-x}`; anything else only the shell knows.
    fn assign(&self, value: &str) -> Env {
        let value = unquote(value);
        // Empty is unset to our scripts (`${NODEWATT_JOBS_DIR:-...}`): also `unset V`.
        if value.is_empty() {
            return Env::Unset;
        }
        if !value.contains(['$', '`']) {
            return Env::Dir(value.to_owned());
        }
        let inner = value
            .strip_prefix("${")
            .and_then(|v| v.strip_suffix('}'))
            .or_else(|| value.strip_prefix('$'))
            .and_then(|v| v.strip_prefix(VAR));
        match inner {
            Some("") => self.clone(),
            Some(rest) => match rest.strip_prefix(":-").or_else(|| rest.strip_prefix('-')) {
                Some(default) if !default.contains(['$', '`']) => match self {
                    Env::Unset => Env::Dir(default.to_owned()),
                    // `:-` also takes the default for an empty value: never ours.
                    other => other.clone(),
                },
                _ => Env::Unknown(format!("{VAR}={value}, which only the shell knows")),
            },
            None => Env::Unknown(format!("{VAR}={value}, which only the shell knows")),
        }
    }
}

/// Reads a script's text (without running it).
fn script(text: &str) -> Script {
    let code: Vec<&str> = text.lines().map(without_comment).collect();
    let ours_default = code.iter().find_map(|l| {
        l.trim()
            .strip_prefix("dir=${NODEWATT_JOBS_DIR:-")
            .and_then(|rest| rest.split_once('}'))
            .map(|(default, _)| default.to_owned())
    });
    if let Some(default) = ours_default {
        // The prolog takes the start instant, the epilog the end.
        let takes = |v: &str| code.iter().any(|l| l.trim().starts_with(v));
        if takes("start_ms=$(date") != takes("end_ms=$(date") {
            let hook = if takes("start_ms=$(date") {
                Hook::Prolog
            } else {
                Hook::Epilog
            };
            return Script::Ours { hook, default };
        }
    }
    let mut w = Wrapper::default();
    let named = |list: &mut Vec<String>, token: &str| {
        if token.starts_with('/')
            && !["/dev/", "/proc/", "/sys/"]
                .iter()
                .any(|p| token.starts_with(p))
            && !list.iter().any(|p| p == token)
            && list.len() < MAX_NAMED
        {
            list.push(token.to_owned());
        }
    };
    // Blocks opened (if, case, loops, functions, braces): an `exit` or `exec` at depth 0
    // that no `&&` or `||` makes conditional ends the script.
    let mut depth: usize = 0;
    let mut ended = false;
    for line in &code {
        if ended {
            break;
        }
        for piece in line.split(';') {
            let raw: Vec<&str> = piece.split_whitespace().collect();
            let opens = match raw.first().copied() {
                Some("if" | "case" | "for" | "while" | "until" | "{" | "(") => true,
                // `f() {`; a `{` on its own line counts itself.
                Some(w) if w.ends_with("()") || raw.get(1) == Some(&"()") => raw.contains(&"{"),
                _ => false,
            };
            if opens {
                depth += 1;
            }
            if depth == 0 && !piece.contains("&&") && !piece.contains("||") {
                let words = command(piece);
                let runs_on = |w: &&str| !w.starts_with(['>', '<']) && !w.contains(">");
                match words.first().copied() {
                    Some("exit") => ended = true,
                    Some("exec") if words[1..].iter().any(runs_on) => ended = true,
                    _ => {}
                }
            }
            if matches!(
                raw.first().copied(),
                Some("fi" | "esac" | "done" | "}" | ")")
            ) {
                depth = depth.saturating_sub(1);
            }
            for statement in piece.split(['&', '|']) {
                let words = command(statement);
                let first = words.first().copied().unwrap_or("");
                let declares_export = matches!(first, "export" | "declare" | "typeset" | "local")
                    && (first == "export"
                        || words.iter().any(|w| w.starts_with('-') && w.contains('x')))
                    && !words.contains(&"-n");
                if declares_export && words.contains(&VAR) {
                    w.exports = true;
                }
                if first == "set" && words.iter().any(|w| w.starts_with('-') && w.contains('a')) {
                    w.exports = true;
                }
                // Paths the statement names, as `word` tokens.
                let paths: Vec<String> = words
                    .iter()
                    .flat_map(|w| w.split(['=', '(', ')', '<', '>', '"', '\'', '`', '{', '}', ',']))
                    .filter(|t| t.starts_with('/'))
                    .map(str::to_owned)
                    .collect();
                let unexports = (first == "unset" || (first == "export" && words.contains(&"-n")))
                    && words.contains(&VAR);
                if unexports {
                    w.sets.push(Assignment {
                        value: String::new(),
                        scope: Scope::Exported,
                    });
                    continue;
                }
                if matches!(first, "." | "source") {
                    if let Some(f) = words.get(1) {
                        named(&mut w.sources, unquote(f));
                    }
                    continue;
                }
                // Assignments before the command word (`V=x cmd`, `env V=x cmd`), or after
                // `export` / `declare -x`.
                for (i, word) in words.iter().enumerate() {
                    let Some(value) = word.strip_prefix(VAR).and_then(|r| r.strip_prefix('='))
                    else {
                        continue;
                    };
                    let scope = if declares_export {
                        Scope::Exported
                    } else if words[i + 1..].iter().any(|w| !w.contains('=')) {
                        Scope::Prefix(
                            paths
                                .iter()
                                .filter(|p| *p != unquote(value))
                                .cloned()
                                .collect(),
                        )
                    } else {
                        Scope::Shell
                    };
                    w.sets.push(Assignment {
                        value: value.to_owned(),
                        scope,
                    });
                }
                for p in &paths {
                    if !w.sets.iter().any(|a| unquote(&a.value) == p) {
                        named(&mut w.paths, p);
                    }
                }
            }
            if ended {
                break;
            }
        }
    }
    Script::Other(w)
}

/// A statement's words from its command on: shell keywords and `case` patterns
/// before it (`then`, `do`, `gpu*)`) are not the command.
fn command(statement: &str) -> Vec<&str> {
    let mut words: Vec<&str> = statement.split_whitespace().collect();
    if words.first() == Some(&"case") {
        let after_in = words
            .iter()
            .position(|w| *w == "in")
            .map_or(words.len(), |i| i + 1);
        words.drain(..after_in);
    }
    let start = words
        .iter()
        .position(|w| {
            let keyword = matches!(
                *w,
                "then" | "do" | "else" | "elif" | "if" | "while" | "until" | "!" | "{" | "(" | "in"
            );
            // A `case` pattern such as `gpu*)`.
            let pattern = w.ends_with(')') && !w.contains(['$', '(']);
            !keyword && !pattern
        })
        .unwrap_or(words.len());
    words[start..].to_vec()
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
    /// Our prolog or our epilog.
    pub hook: Hook,
    /// Where it writes, or why the text alone cannot tell.
    pub writes: Result<PathBuf, String>,
}

/// What one Prolog or Epilog value of slurm.conf leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: String,
    /// The slurm.conf (or included file) that sets it.
    pub conf: PathBuf,
    /// Why slurmd cannot run it (missing, not executable, a directory).
    pub broken: Option<String>,
    pub reached: Vec<Reached>,
    /// Files on the way that could not be read (check not run as root?).
    pub unreadable: Vec<String>,
    /// Files on the way not followed, and why (run-parts would skip them; not root's).
    pub skipped: Vec<String>,
    /// Files on the way that group or others may write.
    pub writable: Vec<String>,
}

/// The slurm.conf this node's Slurm reads: `SLURM_CONF` if set (the operator's choice),
/// else the one the running slurmd reads ([`slurmd_confs`]), else the first of
/// [`CONF_PATHS`] that exists.
pub fn find_conf(
    slurm_conf: Option<&Path>,
    slurmd: &[Result<PathBuf, String>],
) -> Result<PathBuf, String> {
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
    let slurmd: Vec<&PathBuf> = slurmd
        .iter()
        .map(|r| r.as_ref())
        .collect::<Result<_, _>>()
        .map_err(|e| e.clone())?;
    match slurmd[..] {
        [] => {}
        [p] if p.is_file() => return Ok(p.to_owned()),
        [p] => {
            return Err(format!(
                "the running slurmd reads {}, which is not a file",
                p.display()
            ))
        }
        ref several => {
            let list: Vec<String> = several.iter().map(|p| p.display().to_string()).collect();
            return Err(format!(
                "the running slurmd processes read different files ({})",
                list.join(", ")
            ));
        }
    }
    CONF_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no slurm.conf in {}", CONF_PATHS.join(", ")))
}

/// The slurm.conf files the slurmd processes under `proc_root` read, sorted, each once:
/// a `-f FILE` on the command line, else `SLURM_CONF` in the environment (slurmd's
/// order); an error where that cannot be known. A slurmd that names neither, or is
/// configless (`--conf-server`), reads the built-in path or its cached copy
/// ([`CONF_PATHS`]) and adds nothing. Only processes owned by root (or whoever runs
/// check) count: any user may name a process `slurmd`.
pub fn slurmd_confs(proc_root: &Path) -> Vec<Result<PathBuf, String>> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut out: Vec<_> = crate::procs::list(proc_root)
        .into_iter()
        .filter(|p| p.comm() == "slurmd" && p.uid().is_some_and(|u| u == 0 || u == me))
        .filter_map(|p| {
            let environ = p.environ();
            let args: Vec<&str> = p.args.iter().map(String::as_str).collect();
            let env: Vec<&str> = environ.iter().flatten().map(String::as_str).collect();
            let pid = p.pid;
            match slurmd_conf(&args, &env) {
                Said::Default => None,
                Said::Conf(conf) if Path::new(&conf).is_absolute() => Some(Ok(PathBuf::from(conf))),
                Said::Conf(conf) => Some(Err(format!(
                    "slurmd (pid {pid}) reads {conf}, relative to a directory check cannot know: set SLURM_CONF to its full path"
                ))),
                Said::Environment if environ.is_none() => Some(Err(format!(
                    "slurmd (pid {pid}) may name its slurm.conf in its environment, which check cannot read: run check as root, or set SLURM_CONF"
                ))),
                Said::Environment => None,
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What one slurmd's arguments and environment say of its slurm.conf.
#[derive(Debug, PartialEq, Eq)]
enum Said {
    /// `-f FILE`, or `SLURM_CONF`.
    Conf(String),
    /// The built-in path, or configless (its cached copy).
    Default,
    /// Nothing on the command line; the environment was empty or unreadable.
    Environment,
}

/// The slurm.conf of one slurmd from its arguments (the program first) and environment,
/// in slurmd's order: configless (`--conf-server`, `SLURM_CONF_SERVER`), else `-f FILE`
/// (`-fFILE`, or a cluster of flags ending in `f`: getopt's rules, with the other
/// options that take a value skipped with it), else `SLURM_CONF`.
fn slurmd_conf(args: &[&str], env: &[&str]) -> Said {
    // slurmd's short options with a value, and long ones with a separate value.
    const SHORT: &str = "dfLnN";
    const LONG: [&str; 6] = [
        "conf",
        "conf-server",
        "authinfo",
        "extra",
        "instance-id",
        "instance-type",
    ];
    let mut conf = None;
    let mut i = 1;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == "--" {
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let name = long.split('=').next().unwrap_or_default();
            if name == "conf-server" {
                return Said::Default;
            }
            if !long.contains('=') && LONG.contains(&long) {
                i += 1;
            }
            continue;
        }
        let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
            continue;
        };
        for (j, c) in flags.char_indices() {
            if c == 'F' {
                break; // an optional value, attached
            }
            if SHORT.contains(c) {
                let rest = &flags[j + c.len_utf8()..];
                let value = if rest.is_empty() {
                    i += 1;
                    args.get(i - 1).copied()
                } else {
                    Some(rest)
                };
                if c == 'f' {
                    conf = value.map(str::to_string);
                }
                break;
            }
        }
    }
    let var = |k: &str| {
        env.iter()
            .find_map(|v| v.strip_prefix(k)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
    };
    if var("SLURM_CONF_SERVER").is_some() {
        return Said::Default;
    }
    match conf.filter(|c| !c.is_empty()) {
        Some(c) => Said::Conf(c),
        None => match var("SLURM_CONF") {
            Some(c) => Said::Conf(c.to_string()),
            None => Said::Environment,
        },
    }
}

/// The `hook` values of `conf` (and the files it includes), each followed to the
/// nodewatt scripts it runs.
pub fn entries(conf: &Path, hook: Hook) -> Result<Vec<Entry>, String> {
    let mut values = Vec::new();
    conf_tree(conf, hook, &mut values, 0)?;
    Ok(values
        .into_iter()
        .map(|(value, conf)| {
            // A fully qualified program; Slurm 21.08 and later also take a glob.
            let path = Path::new(&value);
            let globbed = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(['*', '?']));
            let files = if globbed || path.is_file() {
                expand(path, Listing::Glob)
            } else {
                Vec::new()
            };
            let broken = if path.is_dir() {
                Some(format!(
                    "{value} is a directory: slurmd runs a program (or a glob's)"
                ))
            } else if globbed && files.is_empty() {
                Some(format!("{value} matches no file"))
            } else if path.exists() && !globbed && files.is_empty() {
                Some(format!("{value} is not a regular file"))
            } else if files.is_empty() {
                Some(format!("{value} does not exist"))
            } else {
                files
                    .iter()
                    .find(|f| !executable(f))
                    .map(|f| format!("{} is not executable: slurmd cannot run it", f.display()))
            };
            let mut walk = Walk::default();
            for f in &files {
                walk.follow(f, &Env::Unset, 0);
            }
            Entry {
                value,
                conf,
                broken,
                reached: walk.reached,
                unreadable: walk.unreadable,
                skipped: walk.skipped,
                writable: walk.writable,
            }
        })
        .collect())
}

fn conf_tree(
    conf: &Path,
    hook: Hook,
    values: &mut Vec<(String, PathBuf)>,
    depth: usize,
) -> Result<(), String> {
    let text = read_capped(conf).map_err(|e| format!("cannot read {}: {e}", conf.display()))?;
    let (found, includes) = conf_values(&text, hook);
    values.extend(found.into_iter().map(|v| (v, conf.to_owned())));
    if depth < MAX_DEPTH {
        for inc in includes {
            // Relative includes are relative to slurm.conf's directory.
            let base = conf.parent().unwrap_or(Path::new("/"));
            for f in expand(&base.join(inc), Listing::Glob) {
                conf_tree(&f, hook, values, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// A walk from one Prolog or Epilog value through the scripts it names.
#[derive(Default)]
struct Walk {
    /// Files already read: each once, so cycles end and a wide tree stays bounded.
    seen: std::collections::HashSet<PathBuf>,
    reached: Vec<Reached>,
    unreadable: Vec<String>,
    skipped: Vec<String>,
    writable: Vec<String>,
}

impl Walk {
    /// Reads a file once; `None` if read before, unreadable, untrusted or a program.
    fn read(&mut self, file: &Path) -> Option<String> {
        if self.seen.len() >= MAX_FILES || !self.seen.insert(file.to_owned()) {
            return None;
        }
        match owner(file) {
            Ok(mode) if mode & 0o022 != 0 => {
                self.writable
                    .push(format!("{} (mode {:o})", file.display(), mode & 0o7777))
            }
            Ok(_) => {}
            Err(why) => {
                self.skipped.push(format!("{}: {why}", file.display()));
                return None;
            }
        }
        match read_capped(file) {
            Ok(text) if !text.contains('\0') => Some(text),
            Ok(_) => None, // a program, not a script
            Err(e) => {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    self.unreadable.push(format!("{}: {e}", file.display()));
                }
                None
            }
        }
    }

    /// Follows `file` to nodewatt's scripts it runs, with NODEWATT_JOBS_DIR as `env`.
    fn follow(&mut self, file: &Path, env: &Env, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        let Some(text) = self.read(file) else { return };
        let w = match script(&text) {
            Script::Ours { hook, default } => {
                let writes = match env {
                    Env::Unset => Ok(PathBuf::from(default)),
                    Env::Dir(d) => Ok(PathBuf::from(d)),
                    Env::Unknown(why) => Err(why.clone()),
                };
                self.reached.push(Reached {
                    script: file.to_owned(),
                    hook,
                    writes,
                });
                return;
            }
            Script::Other(w) => w,
        };
        // What it sources sets its variables: those assignments come first.
        let mut sets = Vec::new();
        let mut exports = w.exports;
        for f in &w.sources {
            for f in expand(Path::new(f), Listing::Glob) {
                if let Some(Script::Other(s)) = self.read(&f).map(|t| script(&t)) {
                    exports |= s.exports;
                    sets.extend(s.sets);
                }
            }
        }
        sets.extend(w.sets.iter().cloned());
        // The shell's own value, and whether what it runs gets it.
        let mut own = env.clone();
        let mut values = Vec::new();
        let mut exported = false;
        for a in sets.iter().filter(|a| !matches!(a.scope, Scope::Prefix(_))) {
            own = own.assign(&a.value);
            exported |= exports || a.scope == Scope::Exported;
            if !values.contains(&own) {
                values.push(own.clone());
            }
        }
        if values.len() > 1 {
            // Set to different values (in branches, say): only running it would tell.
            let said: Vec<&str> = sets
                .iter()
                .filter(|a| !matches!(a.scope, Scope::Prefix(_)))
                .map(|a| match a.value.as_str() {
                    "" => "(unset)",
                    v => v,
                })
                .collect();
            own = Env::Unknown(format!(
                "{VAR} to {}, and which one holds only the shell knows",
                said.join(" or ")
            ));
        }
        // What this script made unknown is said to be its doing.
        let here = |e: Env| match e {
            Env::Unknown(why) if !matches!(env, Env::Unknown(w) if *w == why) => {
                Env::Unknown(format!("{} sets {why}", file.display()))
            }
            e => e,
        };
        let own = here(own);
        let handed = if exported || values.is_empty() {
            own.clone()
        } else {
            env.clone()
        };
        let before = self.reached.len();
        for p in &w.paths {
            let prefixed = sets.iter().rev().find_map(|a| match &a.scope {
                Scope::Prefix(to) if to.iter().any(|t| t == p) => Some(here(own.assign(&a.value))),
                _ => None,
            });
            let listed = Path::new(p).is_dir();
            for f in expand(Path::new(p), Listing::RunParts) {
                if listed {
                    if let Some(why) = run_parts_skips(&f) {
                        self.skipped.push(format!("{}: {why}", f.display()));
                        continue;
                    }
                }
                self.follow(&f, prefixed.as_ref().unwrap_or(&handed), depth + 1);
            }
        }
        // A bare assignment never reaches what the script runs.
        if let (false, Env::Dir(d)) = (exported, &own) {
            if own != *env {
                for r in &mut self.reached[before..] {
                    if let Ok(w) = &r.writes {
                        r.writes = Err(format!(
                            "{} sets {VAR}={d} but does not export it, so {} writes to {}",
                            file.display(),
                            r.script.display(),
                            w.display()
                        ));
                    }
                }
            }
        }
    }
}

/// How a named directory is read: as slurm.conf's glob, or as `run-parts` runs one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listing {
    Glob,
    RunParts,
}

/// The files a named path stands for: itself, a glob's matches in its last component,
/// or (in a script) a directory's scripts as Debian's `run-parts` picks them: names of
/// letters, digits, `_` and `-` only (no `.dpkg-old`, `~` or `.sh`), executable.
fn expand(path: &Path, listing: Listing) -> Vec<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let listed = |dir: &Path, keep: &dyn Fn(&str, &Path) -> bool| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            // Entries looked at, not matches: a named /home must not walk a filesystem.
            .take(MAX_LISTED)
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && keep(n, p))
                    && p.is_file()
            })
            .take(MAX_NAMED)
            .collect();
        files.sort();
        files
    };
    if name.contains(['*', '?']) {
        return listed(path.parent().unwrap_or(Path::new("/")), &|n, _| {
            glob(name, n)
        });
    }
    if path.is_dir() {
        return match listing {
            Listing::Glob => Vec::new(),
            Listing::RunParts => listed(path, &|_, _| true),
        };
    }
    if path.is_file() {
        vec![path.to_owned()]
    } else {
        Vec::new()
    }
}

/// Why Debian's `run-parts` would not run a file of the directory it is given.
fn run_parts_skips(file: &Path) -> Option<&'static str> {
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        Some("run-parts runs only names of letters, digits, _ and - (no dot)")
    } else if !executable(file) {
        Some("not executable, so run-parts skips it")
    } else {
        None
    }
}

/// Only files root (or whoever runs check) owns are followed: slurmd runs the prolog as
/// root, so a file another user could have planted says nothing about it. Its mode.
fn owner(file: &Path) -> Result<u32, String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let m = std::fs::metadata(file).map_err(|e| e.to_string())?;
    if m.uid() == 0 || m.uid() == me {
        Ok(m.mode())
    } else {
        Err(format!("owned by uid {}, not root: not followed", m.uid()))
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
fn same_dir(a: &Path, b: &Path) -> bool {
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
    let (ours, without) = match hook {
        Hook::Prolog => ("config/slurm/prolog", "no job reaches the registry"),
        Hook::Epilog => (
            "config/slurm/epilog",
            "no job's end reaches the registry, so jobs are billed until their files go",
        ),
    };
    if entries.is_empty() {
        return Err(format!(
            "{} sets no {param}: {without}; install {ours} (docs/slurm.md)",
            conf.display()
        ));
    }
    // Where each value is set, for the messages.
    let values = entries
        .iter()
        .map(|e| format!("{param}={} in {}", e.value, e.conf.display()))
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(why) = entries.iter().find_map(|e| e.broken.as_ref()) {
        return Err(format!("{values}: {why}"));
    }
    if let Some(w) = entries.iter().flat_map(|e| &e.writable).next() {
        return Err(format!(
            "{values}: {w} may be written by group or others, who could then run anything as root in every job's {} and bill work to another project: chmod go-w",
            param.to_lowercase()
        ));
    }
    let all: Vec<&Reached> = entries.iter().flat_map(|e| &e.reached).collect();
    let reached: Vec<&Reached> = all.iter().copied().filter(|r| r.hook == hook).collect();
    if let Some(r) = reached
        .iter()
        .find(|r| r.writes.as_ref().is_ok_and(|w| same_dir(w, jobs_dir)))
    {
        return Ok(format!(
            "{} writes to {} ({values})",
            r.script.display(),
            jobs_dir.display(),
        ));
    }
    let Some(first) = reached.first() else {
        if let Some(other) = all.first() {
            return Err(format!(
                "{values} runs {}, nodewatt's {}, not its {}: see docs/slurm.md",
                other.script.display(),
                other.hook.parameter().to_lowercase(),
                param.to_lowercase()
            ));
        }
        if let Some(why) = entries.iter().flat_map(|e| &e.unreadable).next() {
            return Err(format!("{values}: cannot read {why}; run check as root"));
        }
        let skipped: Vec<&str> = entries
            .iter()
            .flat_map(|e| &e.skipped)
            .map(String::as_str)
            .take(3)
            .collect();
        let skipped = if skipped.is_empty() {
            String::new()
        } else {
            format!(" (not followed: {})", skipped.join("; "))
        };
        return Err(format!(
            "{values} does not run nodewatt's {} ({ours}): {without}{skipped}; see docs/slurm.md",
            param.to_lowercase()
        ));
    };
    Err(match &first.writes {
        Ok(w) => format!(
            "{} ({values}) writes to {}, but [jobs] dir is {}: set [jobs] dir, or {VAR} in a wrapper (docs/slurm.md)",
            first.script.display(),
            w.display(),
            jobs_dir.display()
        ),
        Err(why) => format!("{values}: {why}; [jobs] dir is {}", jobs_dir.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = include_str!("../../../config/slurm/prolog");
    const OURS_EPILOG: &str = include_str!("../../../config/slurm/epilog");

    #[test]
    fn slurmds_conf_is_its_f_option_else_its_slurm_conf() {
        let env = ["PATH=/bin", "SLURM_CONF=/env/slurm.conf"];
        let f = |args: &[&str], env: &[&str]| slurmd_conf(args, env);
        let conf = |c: &str| Said::Conf(c.into());
        assert_eq!(f(&["slurmd", "-D"], &env), conf("/env/slurm.conf"));
        assert_eq!(f(&["slurmd", "-D"], &["PATH=/bin"]), Said::Environment);
        assert_eq!(f(&["slurmd", "-D"], &[""]), Said::Environment);
        for args in [
            &["slurmd", "-D", "-f", "/opt/s.conf"][..],
            &["slurmd", "-f/opt/s.conf", "-D"],
            &["slurmd", "-Df", "/opt/s.conf"],
            &["slurmd", "-vvDf/opt/s.conf"],
            &["slurmd", "-N", "-f", "-f", "/opt/s.conf"],
            &["slurmd", "-L", "", "-f", "/opt/s.conf"],
            &["slurmd", "--conf", "-f x", "-f", "/opt/s.conf"],
            &["slurmd", "-f", "/first.conf", "-f", "/opt/s.conf"],
        ] {
            assert_eq!(f(args, &env), conf("/opt/s.conf"), "{args:?}");
        }
        // Values of other options, an optional value, and what follows `--`.
        for args in [
            &["slurmd", "-L", "-f"][..],
            &["slurmd", "-Lf", "-D"],
            &["slurmd", "-F-f", "-D"],
            &["slurmd", "--", "-f", "/opt/s.conf"],
            &["slurmd", "-f"],
            &["slurmd", "-f", ""],
        ] {
            assert_eq!(f(args, &env), conf("/env/slurm.conf"), "{args:?}");
        }
        // Configless: the cached copy, whatever else is said.
        for (args, env) in [
            (
                &["slurmd", "--conf-server", "ctl", "-f", "/opt/s.conf"][..],
                &env[..],
            ),
            (&["slurmd", "--conf-server=ctl:6817"], &env),
            (&["slurmd", "-f", "/opt/s.conf"], &["SLURM_CONF_SERVER=ctl"]),
        ] {
            assert_eq!(f(args, env), Said::Default, "{args:?} {env:?}");
        }
    }

    #[test]
    fn the_running_slurmds_confs_are_found_under_proc() {
        let proc = tempfile::tempdir().unwrap();
        let ps: [(&str, &str, &str, Option<&str>); 8] = [
            (
                "100",
                "slurmd\n",
                "/usr/sbin/slurmd\0-D\0-f\0/opt/slurm/etc/slurm.conf\0",
                Some(""),
            ),
            (
                "101",
                "slurmd\n",
                "/usr/sbin/slurmd\0-D\0",
                Some("PATH=/bin\0SLURM_CONF=/etc/site/slurm.conf\0"),
            ),
            (
                "102",
                "slurmstepd\n",
                "slurmstepd\0-f\0/not/slurmd.conf\0",
                Some(""),
            ),
            (
                "103",
                "slurmd\n",
                "/usr/sbin/slurmd\0-D\0",
                Some("PATH=/bin\0"),
            ),
            (
                "104",
                "slurmd\n",
                "slurmd\0-f/opt/slurm/etc/slurm.conf\0",
                None,
            ),
            ("105", "slurmd\n", "slurmd\0--conf-server\0ctl\0", None),
            (
                "self",
                "slurmd\n",
                "slurmd\0-f\0/not/a/pid.conf\0",
                Some(""),
            ),
            (
                "106",
                "slurmd\n",
                "slurmd\0",
                Some("SLURM_CONF=/etc/site/slurm.conf\0"),
            ),
        ];
        for (pid, comm, cmdline, environ) in ps {
            let d = proc.path().join(pid);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("comm"), comm).unwrap();
            std::fs::write(d.join("cmdline"), cmdline).unwrap();
            if let Some(env) = environ {
                std::fs::write(d.join("environ"), env).unwrap();
            }
        }
        let found = slurmd_confs(proc.path());
        assert_eq!(
            found,
            [
                Ok(PathBuf::from("/etc/site/slurm.conf")),
                Ok(PathBuf::from("/opt/slurm/etc/slurm.conf")),
            ]
        );
        assert_eq!(slurmd_confs(&proc.path().join("none")), []);

        // A relative -f, and an environment check cannot read, are said, not guessed.
        let rel = proc.path().join("107");
        std::fs::create_dir(&rel).unwrap();
        std::fs::write(rel.join("comm"), "slurmd\n").unwrap();
        std::fs::write(rel.join("cmdline"), "slurmd\0-f\0etc/slurm.conf\0").unwrap();
        let unreadable = proc.path().join("108");
        std::fs::create_dir(&unreadable).unwrap();
        std::fs::write(unreadable.join("comm"), "slurmd\n").unwrap();
        std::fs::write(unreadable.join("cmdline"), "slurmd\0-D\0").unwrap();
        let said: Vec<String> = slurmd_confs(proc.path())
            .into_iter()
            .filter_map(Result::err)
            .collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[0].contains("pid 107) reads etc/slurm.conf, relative"),
            "{said:?}"
        );
        assert!(
            said[1].contains("pid 108) may name its slurm.conf in its environment"),
            "{said:?}"
        );

        // Any user may name a process slurmd: only root's (or check's own) count.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            for pid in ["107", "108"] {
                std::fs::remove_dir_all(proc.path().join(pid)).unwrap();
            }
            let planted = proc.path().join("109");
            std::fs::create_dir(&planted).unwrap();
            std::fs::write(planted.join("comm"), "slurmd\n").unwrap();
            std::fs::write(planted.join("cmdline"), "slurmd\0-f\0/tmp/planted.conf\0").unwrap();
            std::os::unix::fs::chown(&planted, Some(1000), None).unwrap();
            assert_eq!(slurmd_confs(proc.path()), found);
        }

        // SLURM_CONF first, then the one slurmd reads; several are for the operator.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.conf"), dir.path().join("b.conf"));
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        assert_eq!(find_conf(None, &[Ok(a.clone())]), Ok(a.clone()));
        assert_eq!(find_conf(Some(&b), &[Ok(a.clone())]), Ok(b.clone()));
        assert_eq!(find_conf(Some(&b), &[Err("unknown".into())]), Ok(b.clone()));
        assert_eq!(
            find_conf(None, &[Ok(a.clone()), Err("unknown".into())]),
            Err("unknown".into())
        );
        let err = find_conf(None, &[Ok(a.clone()), Ok(b.clone())]).unwrap_err();
        assert!(
            err.contains("different files") && err.contains("b.conf"),
            "{err}"
        );
        let gone = dir.path().join("gone.conf");
        let err = find_conf(None, &[Ok(gone)]).unwrap_err();
        assert!(err.contains("gone.conf, which is not a file"), "{err}");
    }

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
    fn our_scripts_are_known_by_their_registry_line_and_what_they_record() {
        for (text, hook) in [(OURS, Hook::Prolog), (OURS_EPILOG, Hook::Epilog)] {
            assert_eq!(
                script(text),
                Script::Ours {
                    hook,
                    default: "/run/nodewatt/jobs".into()
                }
            );
        }
    }

    fn wrapper(text: &str) -> Wrapper {
        match script(text) {
            Script::Other(w) => w,
            ours => panic!("{ours:?}"),
        }
    }

    #[test]
    fn assignments_are_read_with_what_they_reach() {
        let prolog = "/etc/nodewatt/slurm/prolog".to_owned();
        let at = |v: &str, scope| Assignment {
            value: v.into(),
            scope,
        };
        let cases = [
            (
                "NODEWATT_JOBS_DIR=/x exec /etc/nodewatt/slurm/prolog\n",
                at("/x", Scope::Prefix(vec![prolog.clone()])),
            ),
            (
                "env NODEWATT_JOBS_DIR=/x /etc/nodewatt/slurm/prolog || true\n",
                at("/x", Scope::Prefix(vec![prolog.clone()])),
            ),
            (
                "export NODEWATT_JOBS_DIR=/x\n/etc/nodewatt/slurm/prolog \"$@\"\n",
                at("/x", Scope::Exported),
            ),
            (
                "export A=1 NODEWATT_JOBS_DIR=/x\n/etc/nodewatt/slurm/prolog\n",
                at("/x", Scope::Exported),
            ),
            (
                "declare -x NODEWATT_JOBS_DIR=\"/x\"\n/etc/nodewatt/slurm/prolog\n",
                at("\"/x\"", Scope::Exported),
            ),
            (
                "NODEWATT_JOBS_DIR=/x\n/etc/nodewatt/slurm/prolog\n",
                at("/x", Scope::Shell),
            ),
            (
                "NODEWATT_JOBS_DIR=/x; /etc/nodewatt/slurm/prolog\n",
                at("/x", Scope::Shell),
            ),
        ];
        for (text, want) in cases {
            let w = wrapper(text);
            assert_eq!(w.sets, [want], "{text}");
            assert_eq!(w.paths, std::slice::from_ref(&prolog), "{text}");
        }
        assert!(wrapper("NODEWATT_JOBS_DIR='/x'\nexport NODEWATT_JOBS_DIR\n").exports);
        assert!(wrapper("set -a\nNODEWATT_JOBS_DIR=/x\n").exports);
        assert!(!wrapper("NODEWATT_JOBS_DIR=/x\n").exports);
    }

    #[test]
    fn values_resolve_from_the_text_or_say_the_shell_knows() {
        let unset = Env::Unset;
        let set = Env::Dir("/outer".into());
        assert_eq!(unset.assign("'/x'"), Env::Dir("/x".into()));
        assert_eq!(
            unset.assign("${NODEWATT_JOBS_DIR:-/x}"),
            Env::Dir("/x".into())
        );
        assert_eq!(set.assign("${NODEWATT_JOBS_DIR:-/x}"), set);
        assert_eq!(set.assign("\"$NODEWATT_JOBS_DIR\""), set);
        assert!(matches!(unset.assign("$BASE/jobs"), Env::Unknown(_)));
        assert!(matches!(unset.assign("$(cat /etc/x)"), Env::Unknown(_)));
        assert!(matches!(
            unset.assign("${NODEWATT_JOBS_DIR:-$B}"),
            Env::Unknown(_)
        ));
    }

    #[test]
    fn comments_and_sourced_files_are_not_taken_for_what_it_runs() {
        let w = wrapper(
            "#!/bin/sh\n# NODEWATT_JOBS_DIR=/old /opt/old/prolog\n. /etc/default/nodewatt\n\
             source \"/etc/site/env\"\nrun-parts /etc/slurm/prolog.d >/dev/null 2>&1\n",
        );
        assert_eq!(w.paths, ["/etc/slurm/prolog.d"]);
        assert_eq!(w.sources, ["/etc/default/nodewatt", "/etc/site/env"]);
        assert!(w.sets.is_empty());
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
        let ours_epilog = install(root, "nodewatt/epilog", OURS_EPILOG);
        install(
            root,
            "more.conf",
            &format!("Epilog={}\n", ours_epilog.display()),
        );

        let prolog = entries(&conf, Hook::Prolog).unwrap();
        assert_eq!(prolog.len(), 1);
        assert_eq!(prolog[0].broken, None);
        assert_eq!(
            prolog[0].reached,
            [Reached {
                script: ours.clone(),
                hook: Hook::Prolog,
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

    /// The forms a site's prolog takes that once gave a wrong verdict.
    #[test]
    fn site_prologs_are_read_as_the_shell_would_run_them() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let ours = install(root, "nodewatt/prolog", OURS);
        let epilog = install(root, "nodewatt/epilog", OURS_EPILOG);
        let conf = root.join("slurm.conf");
        let verdict_of = |prolog: &str| {
            std::fs::write(&conf, format!("Prolog={prolog}\n")).unwrap();
            let e = entries(&conf, Hook::Prolog).unwrap();
            verdict(Hook::Prolog, &conf, &e, Path::new("/scratch/jobs"))
        };
        let site = |name: &str, body: &str| {
            install(root, name, &format!("#!/bin/sh\n{body}"))
                .display()
                .to_string()
        };

        // Its variables in a sourced file.
        install(root, "default", "export NODEWATT_JOBS_DIR=/scratch/jobs\n");
        let p = site(
            "sourcing",
            &format!(". {}/default\nexec {}\n", root.display(), ours.display()),
        );
        assert!(verdict_of(&p).is_ok(), "{:?}", verdict_of(&p));

        // Ours, but the epilog: swapped in slurm.conf.
        let why = verdict_of(&epilog.display().to_string()).unwrap_err();
        assert!(why.contains("nodewatt's epilog, not its prolog"), "{why}");

        // run-parts skips names with dots and files not executable: a stale copy that
        // would say the right directory does not count.
        let dir = root.join("prolog.d");
        install(
            root,
            "prolog.d/50-nodewatt.dpkg-old",
            &format!("NODEWATT_JOBS_DIR=/scratch/jobs exec {}\n", ours.display()),
        );
        let live = install(
            root,
            "prolog.d/50-nodewatt",
            &format!("exec {}\n", ours.display()),
        );
        let p = site("parts", &format!("run-parts {}\n", dir.display()));
        let why = verdict_of(&p).unwrap_err();
        assert!(
            why.contains("writes to /run/nodewatt/jobs, but [jobs] dir is /scratch/jobs"),
            "{why}"
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o644)).unwrap();
        let why = verdict_of(&p).unwrap_err();
        assert!(why.contains("does not run nodewatt's prolog"), "{why}");

        // slurmd runs a program, not a directory.
        let why = verdict_of(&dir.display().to_string()).unwrap_err();
        assert!(why.contains("is a directory"), "{why}");

        // Set in branches: only running it would tell.
        let p = site(
            "branches",
            &format!(
                "case $(hostname) in gpu*) export NODEWATT_JOBS_DIR=/scratch/jobs ;; *) export NODEWATT_JOBS_DIR=/other ;; esac\nexec {}\n",
                ours.display()
            ),
        );
        let why = verdict_of(&p).unwrap_err();
        assert!(
            why.contains(&format!(
                "{p} sets NODEWATT_JOBS_DIR to /scratch/jobs or /other"
            )),
            "{why}"
        );
        let p = site(
            "computed",
            &format!(
                "export NODEWATT_JOBS_DIR=$BASE/jobs\nexec {}\n",
                ours.display()
            ),
        );
        let why = verdict_of(&p).unwrap_err();
        assert!(
            why.contains(&format!(
                "{p} sets NODEWATT_JOBS_DIR=$BASE/jobs, which only the shell knows"
            )),
            "{why}"
        );

        // A prefix belongs to its own command only.
        let p = site(
            "prefix",
            &format!(
                "NODEWATT_JOBS_DIR=/scratch/jobs /usr/bin/logger started\nexec {}\n",
                ours.display()
            ),
        );
        assert!(verdict_of(&p)
            .unwrap_err()
            .contains("writes to /run/nodewatt/jobs"));

        // A default in the wrapper's own expansion.
        let p = site(
            "defaulted",
            &format!(
                "export NODEWATT_JOBS_DIR=${{NODEWATT_JOBS_DIR:-/scratch/jobs}}\nexec {}\n",
                ours.display()
            ),
        );
        assert!(verdict_of(&p).is_ok(), "{:?}", verdict_of(&p));
    }

    /// What a newcomer's trial found: lines after an `exit`, Slurm's `Prolog = x`, files
    /// others may write, and what is said of what was not followed.
    #[test]
    fn what_the_shell_never_reaches_and_what_others_may_write_are_problems() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let ours = install(root, "nodewatt/prolog", OURS);
        let conf = root.join("slurm.conf");
        let verdict_of = |line: &str| {
            std::fs::write(&conf, format!("{line}\n")).unwrap();
            let e = entries(&conf, Hook::Prolog).unwrap();
            verdict(Hook::Prolog, &conf, &e, Path::new("/scratch/jobs"))
        };
        let site = |name: &str, body: &str| {
            install(root, name, &format!("#!/bin/sh\n{body}"))
                .display()
                .to_string()
        };
        let call = format!("NODEWATT_JOBS_DIR=/scratch/jobs {}\n", ours.display());

        // Appended after the site's `exit 0`, or after an `exec` of another program.
        for before in ["exit 0\n", "exec /usr/bin/true\n"] {
            let p = site("site", &format!("mkdir -p /x || exit 0\n{before}{call}"));
            let why = verdict_of(&format!("Prolog={p}")).unwrap_err();
            assert!(
                why.contains("does not run nodewatt's prolog"),
                "{before}: {why}"
            );
        }
        // Conditional exits and an exec of redirections only do not end it.
        let p = site(
            "site",
            &format!("[ -d /x ] || exit 0\nif true; then exit 0; fi\nexec >/dev/null 2>&1\n{call}"),
        );
        assert!(verdict_of(&format!("Prolog={p}")).is_ok());
        // `Prolog = x`, as Slurm allows.
        assert!(verdict_of(&format!("Prolog = {p}")).is_ok());

        // Unset before the call: the shipped default.
        let p = site(
            "site",
            &format!(
                "export NODEWATT_JOBS_DIR=/scratch/jobs\nunset NODEWATT_JOBS_DIR\n{}\n",
                ours.display()
            ),
        );
        assert!(verdict_of(&format!("Prolog={p}")).is_err());

        // A wrapper others may write.
        use std::os::unix::fs::PermissionsExt;
        let p = site("open", &call);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = verdict_of(&format!("Prolog={p}")).unwrap_err();
        assert!(why.contains("may be written by group or others"), "{why}");

        // What was not followed is named.
        install(root, "parts/50-nodewatt.sh", &call);
        let p = site(
            "parts-site",
            &format!("run-parts {}/parts\n", root.display()),
        );
        let why = verdict_of(&format!("Prolog={p}")).unwrap_err();
        assert!(
            why.contains("50-nodewatt.sh: run-parts runs only names"),
            "{why}"
        );

        // Not a program, no match, and the file that sets the value.
        let why = verdict_of("Prolog=/dev/zero").unwrap_err();
        assert!(why.contains("/dev/zero is not a regular file"), "{why}");
        let why = verdict_of(&format!("Prolog={}/none.d/*", root.display())).unwrap_err();
        assert!(why.contains("matches no file"), "{why}");
        install(root, "more.conf", "Prolog=/nonexistent\n");
        let why = verdict_of("Include more.conf").unwrap_err();
        assert!(
            why.contains(&format!("in {}/more.conf", root.display())),
            "{why}"
        );

        // Without an epilog, jobs are billed until their files go.
        let e = entries(&conf, Hook::Epilog).unwrap();
        let why = verdict(Hook::Epilog, &conf, &e, Path::new("/x")).unwrap_err();
        assert!(why.contains("no job's end reaches the registry"), "{why}");
    }

    /// A file another user owns says nothing of what root runs.
    #[test]
    fn files_others_could_have_planted_are_not_followed() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to give a file to another user");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let ours = install(d.path(), "prolog", OURS);
        let planted = install(d.path(), "planted", &format!("exec {}\n", ours.display()));
        std::os::unix::fs::chown(&planted, Some(65534), None).unwrap();
        let mut walk = Walk::default();
        walk.follow(&planted, &Env::Unset, 0);
        assert!(walk.reached.is_empty());
        std::os::unix::fs::chown(&planted, Some(0), None).unwrap();
        let mut walk = Walk::default();
        walk.follow(&planted, &Env::Unset, 0);
        assert_eq!(walk.reached.len(), 1);
    }

    use proptest::prelude::*;

    proptest! {
        /// Any text, shell-like or not, reads without a panic.
        #[test]
        fn any_text_reads_without_a_panic(
            words in proptest::collection::vec(
                prop_oneof![
                    proptest::string::string_regex("[ -~\t\n]{0,12}").unwrap(),
                    proptest::sample::select(vec![
                        "NODEWATT_JOBS_DIR=", "export", ";", "&&", "|", "\n", "#", ". ", "case",
                        "in", "x)", "${NODEWATT_JOBS_DIR:-", "}", "$", "/", "dir=${NODEWATT_JOBS_DIR:-",
                        "start_ms=$(date", "Prolog=", "Include", "\\\n", "é", "\u{0}",
                    ]).prop_map(str::to_owned),
                ],
                0..40,
            )
        ) {
            let text = words.concat();
            let _ = script(&text);
            let _ = conf_values(&text, Hook::Prolog);
            let _ = Env::Dir("/d".into()).assign(&text);
            let _ = without_comment(&text);
        }
    }

    #[test]
    fn a_cycle_of_scripts_ends() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        install(d.path(), "a", &format!("#!/bin/sh\n{}\n", b.display()));
        install(d.path(), "b", &format!("#!/bin/sh\n{}\n", a.display()));
        let mut walk = Walk::default();
        walk.follow(&a, &Env::Unset, 0);
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
