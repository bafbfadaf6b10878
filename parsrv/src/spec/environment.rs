//! The environment a group's handlers get: a handler runs code parsrv does not control,
//! so it does not inherit the spawner's environment (root's HOME, and whatever secrets the
//! spawner was started with). It gets a few variables any program expects from parsrv's own
//! environment ([`INHERITED`]), the group's `--env` / `env = { ... }`, and the variables
//! of the socket-activation protocol, which parsrv sets last.

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Variables handlers take from parsrv's environment, when set there: where programs are,
/// and the locale and time zone to speak in.
pub const INHERITED: [&str; 4] = ["PATH", "LANG", "LANGUAGE", "TZ"];

/// Prefixes of inherited variables (the locale's categories).
pub const INHERITED_PREFIXES: [&str; 1] = ["LC_"];

/// Variables parsrv sets for handlers itself; a group may not set them.
pub const RESERVED: [&str; 4] = ["LISTEN_", "NOTIFY_SOCKET", "PARSRV_", "WATCHDOG_"];

/// The group's own variables for its handlers, `KEY=VALUE` on the command line, a table in
/// the config file (`env = { KEY = "VALUE" }`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandlerEnv(pub BTreeMap<String, String>);

/// One `--env KEY=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvVar {
    pub key: String,
    pub value: String,
}

impl FromStr for EnvVar {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("'{text}': expected KEY=VALUE"))?;
        Ok(EnvVar {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

impl HandlerEnv {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn from_vars(vars: &[EnvVar]) -> Self {
        HandlerEnv(
            vars.iter()
                .map(|v| (v.key.clone(), v.value.clone()))
                .collect(),
        )
    }

    /// What is wrong with `vars`: (variable, why).
    pub fn problems_of(vars: &[EnvVar]) -> Vec<(String, String)> {
        let mut problems = Self::from_vars(vars).problems();
        let mut seen = std::collections::BTreeSet::new();
        for var in vars {
            if !seen.insert(&var.key) {
                problems.push((var.key.clone(), "given twice".into()));
            }
        }
        problems
    }

    /// What is wrong with the variables: (variable, why).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for (key, value) in &self.0 {
            let well_formed = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !well_formed {
                problems.push((
                    key.clone(),
                    "not a variable name (letters, digits and _, not starting with a digit)".into(),
                ));
            } else if let Some(reserved) = RESERVED.iter().find(|r| key.starts_with(*r)) {
                problems.push((
                    key.clone(),
                    format!("parsrv sets {reserved}* for handlers itself (socket activation)"),
                ));
            }
            if value.contains('\0') {
                problems.push((key.clone(), "a value cannot hold a NUL byte".into()));
            }
        }
        problems
    }

    /// The whole environment of a handler of this group, before parsrv adds the
    /// socket-activation variables: the inherited ones from `parent`, then the group's.
    pub fn for_handlers(
        &self,
        parent: impl IntoIterator<Item = (String, String)>,
    ) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = parent
            .into_iter()
            .filter(|(key, _)| {
                INHERITED.contains(&key.as_str())
                    || INHERITED_PREFIXES.iter().any(|p| key.starts_with(p))
            })
            .collect();
        env.extend(self.0.clone());
        env
    }
}

/// `--env` values as the config file writes them: a table, `env = { KEY = "VALUE" }`
/// (serde's `with` for the spec's field).
pub mod as_table {
    use super::*;

    pub fn serialize<S: Serializer>(vars: &[EnvVar], serializer: S) -> Result<S::Ok, S::Error> {
        vars.iter()
            .map(|v| (v.key.as_str(), v.value.as_str()))
            .collect::<BTreeMap<_, _>>()
            .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<EnvVar>, D::Error> {
        Ok(BTreeMap::<String, String>::deserialize(deserializer)?
            .into_iter()
            .map(|(key, value)| EnvVar { key, value })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HandlerEnv {
        HandlerEnv(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn handlers_get_the_inherited_few_and_their_own_and_nothing_else() {
        let parent = [
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("LC_TIME", "C"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
            ("TZ", "UTC"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let got = env(&[("APP_MODE", "prod"), ("TZ", "Europe/Paris")]).for_handlers(parent);
        let keys: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(keys, ["APP_MODE", "LC_TIME", "PATH", "TZ"]);
        assert_eq!(got["TZ"], "Europe/Paris", "the group's own wins");
    }

    #[test]
    fn names_values_and_reserved_variables_are_checked() {
        assert!(env(&[("GOOD_1", "x=y")]).problems().is_empty());
        for bad in ["", "1X", "A-B", "A B"] {
            assert_eq!(env(&[(bad, "v")]).problems().len(), 1, "{bad:?}");
        }
        for reserved in ["LISTEN_FDS", "NOTIFY_SOCKET", "PARSRV_SLOT"] {
            let problems = env(&[(reserved, "1")]).problems();
            assert!(problems[0].1.contains("parsrv sets"), "{problems:?}");
        }
        assert_eq!(env(&[("A", "a\0b")]).problems().len(), 1);
        assert_eq!("A=b=c".parse::<EnvVar>().unwrap().value, "b=c");
        assert!("A".parse::<EnvVar>().is_err());
    }
}
