//! The one table between a group's settings and their written forms. Each field of
//! [`GroupSpec`] is a flag of `parsrv run` (its clap `arg`), a key of a config file and a
//! field of the JSON (its serde name, which is the flag's id): a key is its flag without the
//! dashes (`when_full` is `--when-full`), a switch is a boolean (`drain = true` is
//! `--drain`, `autoscale = false` is `--no-autoscale`), a repeated KEY=VALUE flag is a
//! table (`env = { A = "1" }` is `--env A=1`), the program after `--` is `command = [...]`.
//!
//! Keys become flags here and are parsed by the command line's own parser, so a config file,
//! `parsrv group add` and `parsrv run` accept and refuse the same values with the same words;
//! [`to_args`] is the way back, from a spec to the flags that give it.

use clap::{error::ErrorKind, ArgAction, Args as _, FromArgMatches as _};

use super::GroupSpec;

/// The flags of a group: one per setting of [`GroupSpec`].
pub fn settings() -> Vec<clap::Arg> {
    GroupSpec::augment_args(clap::Command::new("group"))
        .get_arguments()
        .filter(|a| a.get_id() != "help")
        .cloned()
        .collect()
}

/// The key of a flag (`--ready-timeout` -> `ready_timeout`; `--no-autoscale` ->
/// `autoscale`), or `command` for the program after `--` (`--handler exec` problems).
pub fn key_of(flag: &str) -> String {
    let long = flag.trim_start_matches("--");
    settings()
        .iter()
        .find(|a| a.get_long() == Some(long) || a.get_id() == long)
        .map_or_else(|| "command".to_owned(), |a| a.get_id().to_string())
}

/// Why a group's keys do not give a spec: the key at fault, and the message in the file's
/// words.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

/// The spec that `keys` (a config file's group, or the serde form of a spec) give, read by
/// `parsrv run`'s parser.
pub fn from_keys<'a>(
    keys: impl IntoIterator<Item = (&'a str, &'a toml::Value)>,
) -> Result<GroupSpec, KeyError> {
    let mut argv = vec!["run".to_owned()];
    argv.extend(args_of_keys(keys)?);
    parse_flags(argv).map_err(|e| clap_error_in_keys(&e))
}

/// The group that `argv` (a command name, then a group's flags) gives, read by the same clap
/// arguments as `parsrv run`'s (which flattens [`GroupSpec`]'s).
fn parse_flags(argv: Vec<String>) -> Result<GroupSpec, clap::Error> {
    let matches = GroupSpec::augment_args(clap::Command::new("run")).try_get_matches_from(argv)?;
    Ok(GroupSpec::from_arg_matches(&matches)?.named())
}

/// The flags that give `spec` (for `parsrv run`, and the tests' group builder).
pub fn to_args(spec: &GroupSpec) -> Vec<String> {
    let toml::Value::Table(keys) = toml::Value::try_from(spec).expect("a spec is plain data")
    else {
        unreachable!("a struct serializes to a table");
    };
    args_of_keys(keys.iter().map(|(k, v)| (k.as_str(), v))).expect("a spec's own keys are known")
}

/// The flags that `keys` stand for.
fn args_of_keys<'a>(
    keys: impl IntoIterator<Item = (&'a str, &'a toml::Value)>,
) -> Result<Vec<String>, KeyError> {
    let settings = settings();
    let mut args = Vec::new();
    let mut command: Vec<String> = Vec::new();
    for (key, value) in keys {
        let error = |message: String| KeyError {
            key: key.to_owned(),
            message,
        };
        let Some(setting) = settings.iter().find(|a| a.get_id() == key) else {
            let known: Vec<String> = settings
                .iter()
                .map(|a| format!("`{}`", a.get_id()))
                .collect();
            return Err(error(format!(
                "unknown field `{key}`, expected one of {} (a typo? unknown keys are errors)",
                known.join(", ")
            )));
        };
        let wrong = |what: &str| error(format!("invalid {key}: expected {what}"));
        let long = setting.get_long().unwrap_or_default();
        match (setting.get_action(), value) {
            (ArgAction::SetTrue | ArgAction::SetFalse, toml::Value::Boolean(on)) => {
                // A switch's flag sets the value opposite to its default.
                if *on == matches!(setting.get_action(), ArgAction::SetTrue) {
                    args.push(format!("--{long}"));
                }
            }
            (ArgAction::SetTrue | ArgAction::SetFalse, _) => return Err(wrong("true or false")),
            (_, toml::Value::Array(items)) if setting.is_last_set() => {
                for item in items {
                    let word = item.as_str().ok_or_else(|| wrong("an array of strings"))?;
                    command.push(word.to_owned());
                }
            }
            (_, _) if setting.is_last_set() => return Err(wrong("an array of strings")),
            // A setting given more than once (`listen = ["A", "B"]` is `--listen A --listen B`).
            (ArgAction::Append, toml::Value::Array(items)) => {
                for item in items {
                    let text = item
                        .as_str()
                        .ok_or_else(|| wrong("a string or an array of strings"))?;
                    args.push(format!("--{long}={text}"));
                }
            }
            // A setting of KEY=VALUE pairs (`env = { A = "1" }` is `--env A=1`).
            (ArgAction::Append, toml::Value::Table(entries)) => {
                for (name, item) in entries {
                    let text = item.as_str().ok_or_else(|| wrong("a table of strings"))?;
                    args.push(format!("--{long}={name}={text}"));
                }
            }
            (_, toml::Value::String(text)) => args.push(format!("--{long}={text}")),
            (_, scalar @ (toml::Value::Integer(_) | toml::Value::Float(_))) => {
                args.push(format!("--{long}={scalar}"))
            }
            (_, _) => return Err(wrong("a string or a number")),
        }
    }
    if !command.is_empty() {
        args.push("--".into());
        args.extend(command);
    }
    Ok(args)
}

/// A parse error of the flags a group's keys became, told with the key.
fn clap_error_in_keys(e: &clap::Error) -> KeyError {
    use clap::error::{ContextKind, ContextValue};
    let flag = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg.clone(),
        Some(ContextValue::Strings(args)) => args.first().cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let key = key_of(flag.split([' ', '=']).next().unwrap_or(""));
    let message = match (e.kind(), e.get(ContextKind::InvalidValue)) {
        (ErrorKind::MissingRequiredArgument, _) => format!("missing field `{key}`"),
        (_, Some(ContextValue::String(value))) => {
            let reason = std::error::Error::source(e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| match e.get(ContextKind::ValidValue) {
                    Some(ContextValue::Strings(valid)) => {
                        format!("expected one of {}", valid.join(", "))
                    }
                    _ => "not a valid value".into(),
                });
            format!("invalid {key} '{value}': {reason}")
        }
        _ => e.kind().to_string(),
    };
    KeyError { key, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{CpuList, HandlerKind, HandlerRange, Policy, WhenFull};

    #[test]
    fn a_spec_gives_flags_that_parse_back_to_it() {
        let plain = GroupSpec::new("127.0.0.1:8080".parse().unwrap(), HandlerKind::Echo);
        let every = GroupSpec {
            name: "every-setting".into(),
            handlers: HandlerRange { min: 2, max: 6 },
            autoscale: false,
            backlog: 7,
            threads: 3,
            policy: Policy::LeastLoaded,
            when_full: WhenFull::Refuse,
            cpus: CpuList(vec![0, 2, 3]),
            user: Some("root:root".into()),
            grace: 0.5,
            ready_timeout: 2.25,
            stall_after: 0.25,
            spare: 2,
            drain: true,
            command: vec!["sh".into(), "-c".into(), "exec --not-a-flag".into()],
            ..GroupSpec::new("[::1]:9".parse().unwrap(), HandlerKind::Exec)
        };
        for spec in [plain, every] {
            let mut argv = vec!["parsrv".to_owned(), "run".to_owned()];
            argv.extend(to_args(&spec));
            // `parsrv run`'s parser, and the one a config file's keys go through.
            assert_eq!(
                crate::cli::Cli::try_parse_group(argv.clone()).unwrap(),
                spec
            );
            assert_eq!(parse_flags(argv[1..].to_vec()).unwrap(), spec);
        }
    }

    #[test]
    fn keys_are_flags_without_dashes() {
        assert_eq!(key_of("--ready-timeout"), "ready_timeout");
        assert_eq!(key_of("--no-autoscale"), "autoscale");
        assert_eq!(key_of("--when-full"), "when_full");
        assert_eq!(key_of("handler exec"), "command");
        let off = toml::Value::Boolean(false);
        let keys = [("autoscale", &off)];
        assert_eq!(args_of_keys(keys).unwrap(), ["--no-autoscale"]);
        let typo = toml::Value::Integer(1);
        let err = args_of_keys([("baclog", &typo)]).unwrap_err();
        assert_eq!(err.key, "baclog");
        assert!(err.message.contains("unknown keys are errors"), "{err:?}");
    }
}
