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

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{
    cluster::ClusterSpec,
    error::{Error, Result},
    spec::{self, flags, GroupSpec},
};

/// A group as written in the file: its keys, each with where it is.
type RawGroup = BTreeMap<String, Spanned<toml::Value>>;

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
    let mut seen: BTreeMap<String, (Range<usize>, GroupSpec)> = BTreeMap::new();
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
        if let Some((first, _)) = seen.get(&name) {
            let (line, column) = locate(first.clone());
            problem(
                here.clone(),
                format!("group name '{name}' is used twice (first at {line}:{column}): names must be unique"),
                false,
            );
        }
        for (other, (span, others)) in &seen {
            if other == &name {
                continue;
            }
            let (line, column) = locate(span.clone());
            let Some((theirs, ours)) = others.overlap_with(&spec) else {
                continue;
            };
            let wildcard = |l: &spec::Listen| l.is_single() && l.addr.is_unspecified();
            let message = if theirs == ours {
                format!(
                    "groups '{other}' ({line}:{column}) and '{name}' both listen on {ours}: one \
                     address and port is one group; merge them, or give one another port"
                )
            } else if wildcard(&theirs) || wildcard(&ours) {
                format!(
                    "groups '{other}' ({theirs}, {line}:{column}) and '{name}' ({ours}) share port {}: \
                     the kernel keeps 127.0.0.1, 0.0.0.0 and [::] as separate reuseport groups, and \
                     a wildcard address cannot be bound beside a specific one on the same port; use \
                     one address for the port, or different ports",
                    ours.first_port.max(theirs.first_port)
                )
            } else {
                format!(
                    "groups '{other}' ({theirs}, {line}:{column}) and '{name}' ({ours}) overlap: a \
                     connection to an address and port in both would match two groups; give each \
                     its own addresses or ports"
                )
            };
            problem(spans["listen"].clone(), message, false);
        }
        // Two dynamic users of one number would be one user: their handlers could reach
        // each other's (spec::dynamic_user). 65,536 uids: rare, but not impossible.
        if let Some((other, (span, _))) = seen.iter().find(|(other, (_, others))| {
            *other != &name
                && [&spec, others]
                    .iter()
                    .all(|g| g.user.as_deref() == Some(spec::dynamic_user::DYNAMIC))
                && spec::dynamic_user::credentials_of(other)
                    == spec::dynamic_user::credentials_of(&name)
        }) {
            let (line, column) = locate(span.clone());
            problem(
                here.clone(),
                format!(
                    "groups '{other}' ({line}:{column}) and '{name}' would have one dynamic uid, {} \
                     (their names hash alike): rename one",
                    spec::dynamic_user::credentials_of(&name).uid
                ),
                false,
            );
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

/// Two addresses on one port that the kernel would put in different reuseport groups while
/// one covers the other: a wildcard beside a specific address of the same family, or the
/// dual-stack [::] beside anything IPv4.
type Spans = BTreeMap<String, Range<usize>>;

/// Reads a group's keys into the model with the command line's parser, keeping where each
/// key was.
fn to_spec(
    raw: &RawGroup,
    group: Range<usize>,
) -> std::result::Result<(GroupSpec, Spans), (Range<usize>, String)> {
    let spans: Spans = raw.iter().map(|(k, v)| (k.clone(), v.span())).collect();
    if !raw.contains_key("name") {
        return Err((group, "missing field `name`".into()));
    }
    flags::from_keys(raw.iter().map(|(k, v)| (k.as_str(), v.get_ref())))
        .map(|spec| (spec, spans.clone()))
        .map_err(|e| (spans.get(&e.key).cloned().unwrap_or(group), e.message))
}

/// A model error in the file's words: the key, not the flag (`backlog`, not `--backlog`).
fn file_words(e: &Error) -> String {
    match e {
        Error::InvalidOption {
            option,
            value,
            reason,
        } => {
            format!("invalid {} '{value}': {reason}", flags::key_of(option))
        }
        other => other.to_string(),
    }
}

/// Where a model problem points: the key it is about, or the group.
fn locate_problem(e: &Error, spans: &Spans, group: Range<usize>) -> (Range<usize>, String) {
    let span = match e {
        Error::InvalidOption { option, .. } => spans.get(&flags::key_of(option)).cloned(),
        _ => None,
    };
    (span.unwrap_or(group), file_words(e))
}

/// The file form of groups (what `parsrv group show` prints): every key, explicitly; the
/// spec's own serde form.
pub fn to_toml(groups: &[GroupSpec]) -> String {
    #[derive(Serialize)]
    struct OutFile<'a> {
        group: &'a [GroupSpec],
    }
    toml::to_string(&OutFile { group: groups }).expect("serializable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(text: &str) -> Checked {
        check_text(Path::new("test.toml"), text)
    }

    fn messages(text: &str) -> Vec<String> {
        checked(text)
            .problems
            .iter()
            .map(|p| format!("{}:{}: {}", p.line, p.column, p.message))
            .collect()
    }

    const TWO: &str = r#"
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

    #[test]
    fn overlapping_addresses_on_one_port_are_explained() {
        let text = r#"
[[group]]
name = "any"
listen = "0.0.0.0:8080"
handler = "http"

[[group]]
name = "local"
listen = "127.0.0.1:8080"
handler = "http"

[[group]]
name = "other-port"
listen = "127.0.0.1:8081"
handler = "http"
"#;
        let found = messages(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("9:10: groups 'any' (0.0.0.0:8080, 3:8) and 'local'"),
            "{found:?}"
        );
        assert!(found[0].contains("separate reuseport groups"));
    }

    #[test]
    fn groups_whose_prefixes_or_port_ranges_overlap_are_refused() {
        let text = r#"
[[group]]
name = "range"
listen = ["127.0.0.2:8080", "127.0.0.0/29:9000-9009"]
handlers = 2
handler = "http"

[[group]]
name = "inside"
listen = "127.0.0.5:9005"
handler = "http"
"#;
        let found = messages(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("10:10: groups 'range' (127.0.0.0/29:9000-9009, 3:8) and 'inside' (127.0.0.5:9005) overlap"),
            "{found:?}"
        );
    }

    #[test]
    fn two_dynamic_users_of_one_number_are_refused() {
        // "g2183" and "g3100" hash to one uid (found by search); "g1" to another.
        let group = |name: &str, port: u16, user: &str| {
            format!(
                "[[group]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n\
                 handler = \"http\"\nuser = \"{user}\"\n"
            )
        };
        let same = spec::dynamic_user::credentials_of("g2183");
        assert_eq!(same, spec::dynamic_user::credentials_of("g3100"));
        let text = [
            group("g2183", 8080, "dynamic"),
            group("g3100", 8081, "dynamic"),
        ]
        .join("\n");
        let found = messages(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(&format!(
                "8:8: groups 'g2183' (2:8) and 'g3100' would have one dynamic uid, {}",
                same.uid
            )),
            "{found:?}"
        );
        // Controls: names that hash apart, and one of the two as a named user.
        let apart = [
            group("g2183", 8080, "dynamic"),
            group("g1", 8081, "dynamic"),
        ]
        .join("\n");
        assert!(messages(&apart).is_empty(), "{:?}", messages(&apart));
        let named = [
            group("g2183", 8080, "dynamic"),
            group("g3100", 8081, "root"),
        ]
        .join("\n");
        assert!(messages(&named).is_empty(), "{:?}", messages(&named));
    }

    #[test]
    fn several_addresses_round_trip_through_the_file_form() {
        let text = r#"
[[group]]
name = "two"
listen = ["127.0.0.2:8080", "[::1]:8000-8099"]
handlers = 2
handler = "http"
"#;
        let file = checked(text).file.expect("valid");
        let spec = &file.groups[0];
        assert_eq!(spec.listen_text(), "127.0.0.2:8080 [::1]:8000-8099");
        let again = checked(&to_toml(&file.groups))
            .file
            .expect("its own form is valid");
        assert_eq!(&again.groups[0], spec);
        assert!(to_toml(&file.groups).contains(r#"listen = ["127.0.0.2:8080", "[::1]:8000-8099"]"#));
    }

    #[test]
    fn every_setting_is_one_flag_one_key_and_one_json_field() {
        let mut spec = GroupSpec::new("127.0.0.1:1".parse().unwrap(), spec::HandlerKind::Exec);
        (spec.cpus, spec.user) = (spec::CpuList(vec![0]), Some("root".into()));
        spec.command = vec!["true".into()];
        spec.env = vec!["A=1".parse().unwrap()];
        let keys: Vec<String> = match toml::Value::try_from(&spec).unwrap() {
            toml::Value::Table(table) => table.keys().cloned().collect(),
            other => panic!("{other:?}"),
        };
        let mut flag_ids: Vec<String> = flags::settings()
            .iter()
            .map(|a| a.get_id().to_string())
            .collect();
        let mut json: Vec<String> = match serde_json::to_value(&spec).unwrap() {
            serde_json::Value::Object(fields) => fields.keys().cloned().collect(),
            other => panic!("{other:?}"),
        };
        let mut keys = keys;
        for list in [&mut keys, &mut flag_ids, &mut json] {
            list.sort();
        }
        assert_eq!(keys, flag_ids);
        assert_eq!(json, flag_ids);
        // A switch's key is a boolean; other values are not taken for one.
        let drain = |value: &str| {
            messages(&format!(
                "[[group]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nhandler = \"http\"\ndrain = {value}\n"
            ))
        };
        assert!(drain("true").is_empty());
        assert_eq!(
            drain("\"yes\""),
            ["5:9: invalid drain: expected true or false"]
        );
    }

    #[test]
    fn show_output_reads_back_as_the_same_groups() {
        let mut groups = checked(TWO).file.unwrap().groups;
        groups[1].cpus = spec::CpuList(vec![0]);
        groups[1].user = Some("root".into());
        groups[1].drain = true;
        groups[1].autoscale = false;
        groups[0].affinity = spec::Affinity::Client;
        groups[0].affinity_prefix = spec::ClientPrefix { v4: 24, v6: 48 };
        groups[0].affinity_timeout = 60.0;
        groups[0].affinity_table = 1024;
        groups[0].affinity_when_full = spec::AffinityWhenFull::Keep;
        let text = to_toml(&groups);
        assert!(text.contains("affinity_prefix = \"24,48\""), "{text}");
        let again = checked(&text);
        assert!(again.problems.is_empty(), "{:?}\n{text}", again.problems);
        assert_eq!(again.file.unwrap().groups, groups);
    }
}
