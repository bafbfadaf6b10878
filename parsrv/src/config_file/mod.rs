//! The config file (TOML): any number of groups under one spawner.
//!
//! ```toml
//! metrics = "127.0.0.1:9100"      # optional: Prometheus metrics for every group
//!
//! [[group]]
//! name = "web"
//! listen = "127.0.0.1:8080"
//! handler = "exec"                # echo | http | exec
//! command = ["uvicorn", "--fd", "3", "app:app"]
//! handlers = "2..8"               # or a count: 4
//! ```
//!
//! Every key of a group is a flag of `parsrv run` (`when_full` is `--when-full`; a switch
//! such as `drain` is a boolean): a group's keys are turned into those flags and parsed by
//! the very parser of the command line into the one model, [`GroupSpec`], and checked by
//! the same code, so both reject a bad value with the same words. Unknown keys are errors.
//! Problems are reported all at once, each with its line and column.

mod conflicts;
mod keys;

use std::{
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

pub use self::keys::to_toml;
use self::keys::{locate_problem, to_spec, RawGroup};
use crate::{
    cluster::ClusterSpec,
    error::{Error, Result},
    spec::{self, GroupSpec},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    metrics: Option<Spanned<String>>,
    #[serde(default, rename = "group")]
    groups: Vec<Spanned<RawGroup>>,
    cluster: Option<Spanned<toml::Value>>,
}

/// A valid config file.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub groups: Vec<GroupSpec>,
    /// This host's place in a cluster (`parsrv cluster run` reads it; `parsrv run` does not).
    pub cluster: Option<ClusterSpec>,
}

/// One problem in a file, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// A warning does not make the file invalid.
    pub warning: bool,
}

/// What `check` found.
#[derive(Debug)]
pub struct Checked {
    pub file: Option<ConfigFile>,
    pub problems: Vec<Problem>,
}

impl ConfigFile {
    /// Reads and checks `path`; any error (not warnings) fails, naming the first problem
    /// and how many there are.
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let checked = check(path)?;
        let errors: Vec<&Problem> = checked.problems.iter().filter(|p| !p.warning).collect();
        match (checked.file, errors.first()) {
            (Some(file), None) => Ok(file),
            (_, first) => Err(Error::Rejected(format!(
                "{}: {} problem{} (`parsrv check --config {0}` lists them){}",
                path.display(),
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                first.map_or(String::new(), |p| format!(
                    "; first at {}:{}: {}",
                    p.line, p.column, p.message
                )),
            ))),
        }
    }
}

/// Reads and checks a config file without touching the kernel.
pub fn check(path: &Path) -> Result<Checked> {
    let text =
        std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))?;
    Ok(check_text(path, &text))
}

/// Checks config text (`path` only names it).
pub fn check_text(path: &Path, text: &str) -> Checked {
    let locate = |span: Range<usize>| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    };
    let mut problems = Vec::new();
    let mut problem = |span: Range<usize>, message: String, warning: bool| {
        let (line, column) = locate(span);
        problems.push(Problem {
            line,
            column,
            message,
            warning,
        });
    };
    let raw: RawFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let message = e.message().trim().to_owned();
            problem(e.span().unwrap_or(0..0), syntax_fix(&message), false);
            return Checked {
                file: None,
                problems,
            };
        }
    };
    let metrics = raw
        .metrics
        .as_ref()
        .and_then(|m| match spec::parse_listen(m.get_ref()) {
            Ok(addr) => Some(addr),
            Err(_) => {
                problem(
                    m.span(),
                    format!(
                        "invalid metrics '{}': expected ADDR:PORT, e.g. 127.0.0.1:9100",
                        m.get_ref()
                    ),
                    false,
                );
                None
            }
        });
    if raw.groups.is_empty() {
        problem(
            0..0,
            "no [[group]]: define at least one group".into(),
            false,
        );
    }
    let mut groups = Vec::new();
    let mut seen = conflicts::Seen::new();
    for group in &raw.groups {
        let (spec, spans) = match to_spec(group.get_ref(), group.span()) {
            Ok(found) => found,
            Err((span, message)) => {
                problem(span, message, false);
                continue;
            }
        };
        let name = spec.name.clone();
        for e in spec.problems() {
            let (span, message) = locate_problem(&e, &spans, group.span());
            problem(span, format!("group '{name}': {message}"), false);
        }
        let here = spans["name"].clone();
        for (span, message) in conflicts::with_earlier(&spec, &spans, &here, &seen, locate) {
            problem(span, message, false);
        }
        seen.insert(name, (here, spec.clone()));
        groups.push(spec);
    }
    let cluster = raw.cluster.as_ref().and_then(|section| {
        match ClusterSpec::deserialize(section.get_ref().clone()) {
            Ok(spec) => {
                for message in spec.problems() {
                    problem(section.span(), format!("[cluster]: {message}"), false);
                }
                Some(spec)
            }
            Err(e) => {
                problem(
                    section.span(),
                    format!("[cluster]: {}", e.message().trim()),
                    false,
                );
                None
            }
        }
    });
    let valid = problems.iter().all(|p| p.warning);
    Checked {
        file: valid.then(|| ConfigFile {
            path: path.to_owned(),
            metrics,
            groups,
            cluster,
        }),
        problems,
    }
}

/// Adds the fix to toml's own messages where it helps.
fn syntax_fix(message: &str) -> String {
    if message.starts_with("unknown field") {
        format!("{message} (a typo? unknown keys are errors)")
    } else {
        message.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::{keys::file_words, *};

    pub(super) fn checked(text: &str) -> Checked {
        check_text(Path::new("test.toml"), text)
    }

    pub(super) fn messages(text: &str) -> Vec<String> {
        checked(text)
            .problems
            .iter()
            .map(|p| format!("{}:{}: {}", p.line, p.column, p.message))
            .collect()
    }

    pub(super) const TWO: &str = r#"
metrics = "127.0.0.1:9100"

[[group]]
name = "web"
listen = "127.0.0.1:8080"
handler = "http"
handlers = "2..6"

[[group]]
name = "echo"
listen = "[::1]:7000"
handler = "echo"
"#;

    #[test]
    fn a_valid_file_gives_groups_with_defaults() {
        let file = checked(TWO).file.unwrap();
        assert_eq!(file.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(file.groups.len(), 2);
        assert_eq!(
            file.groups[0].handlers,
            spec::HandlerRange { min: 2, max: 6 }
        );
        let echo = &file.groups[1];
        assert_eq!(
            (echo.handlers.to_string(), echo.backlog, echo.threads),
            ("4".into(), 128, 1)
        );
        assert_eq!(
            (echo.grace, echo.ready_timeout, echo.drain),
            (5.0, 10.0, false)
        );
    }

    #[test]
    fn every_problem_is_located_and_worded_like_the_flags() {
        let found = messages(
            r#"
[[group]]
name = "web"
listen = "127.0.0.1:8080"
handler = "http"
backlog = 0
threads = 0

[[group]]
name = "web"
listen = "127.0.0.1:8080"
handler = "echo"
"#,
        );
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(
            found[0],
            "6:11: group 'web': invalid backlog '0': must be at least 1 (the accept-queue length of each socket)"
        );
        assert_eq!(
            found[1],
            "7:11: group 'web': invalid threads '0': must be 1 to 1024 accepting threads per handler"
        );
        assert_eq!(
            found[2],
            "10:8: group name 'web' is used twice (first at 3:8): names must be unique"
        );
        // Two names on one address.
        let same_address = messages(
            "[[group]]\nname = \"a\"\nlisten = \"127.0.0.1:8080\"\nhandler = \"http\"\n\
             [[group]]\nname = \"b\"\nlisten = \"127.0.0.1:8080\"\nhandler = \"http\"\n",
        );
        assert_eq!(
            same_address,
            ["7:10: groups 'a' (2:8) and 'b' both listen on 127.0.0.1:8080: one address and port is one group; merge them, or give one another port"]
        );
        // The same words as the flag, with the key instead of the flag.
        let flag = Error::InvalidOption {
            option: "--backlog",
            value: "0".into(),
            reason: "must be at least 1 (the accept-queue length of each socket)".into(),
        };
        assert!(found[0].ends_with(&file_words(&flag)));
    }

    #[test]
    fn syntax_types_unknown_keys_and_ranges_are_located() {
        let cases = [
            ("[[group]\nname = 1", 1),
            ("[[group]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nhandler = \"http\"\nbaclog = 3\n", 5),
            ("[[group]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nhandler = \"http\"\nbacklog = \"x\"\n", 5),
            ("[[group]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nhandler = \"http\"\nbacklog = -1\n", 5),
            ("[[group]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nhandler = \"ftp\"\n", 4),
            ("[[group]]\nname = \"a\"\nlisten = \"nowhere\"\nhandler = \"http\"\n", 3),
        ];
        for (text, line) in cases {
            let problems = checked(text).problems;
            assert_eq!(problems.len(), 1, "{text}: {problems:?}");
            assert_eq!(problems[0].line, line, "{text}: {problems:?}");
            assert!(checked(text).file.is_none());
        }
        assert!(checked(cases[1].0).problems[0]
            .message
            .contains("unknown keys are errors"));
        assert!(checked("").problems[0]
            .message
            .contains("define at least one group"));
    }
}
