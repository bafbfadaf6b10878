//! A group's keys: read into the model by the command line's parser, each key's place kept so
//! that the model's problems are told at the key, in the file's words; and the model written
//! back as keys (the file form `parsrv group show` prints).

use std::{collections::BTreeMap, ops::Range};

use serde::Serialize;
use toml::Spanned;

use crate::{
    error::Error,
    spec::{flags, GroupSpec},
};

/// A group as written in the file: its keys, each with where it is.
pub(super) type RawGroup = BTreeMap<String, Spanned<toml::Value>>;

/// Where each key of a group is in the file's text (for a problem's line and column).
pub(super) type Spans = BTreeMap<String, Range<usize>>;

/// Reads a group's keys into the model with the command line's parser, keeping where each
/// key was.
pub(super) fn to_spec(
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
pub(super) fn file_words(e: &Error) -> String {
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
pub(super) fn locate_problem(
    e: &Error,
    spans: &Spans,
    group: Range<usize>,
) -> (Range<usize>, String) {
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
    use super::super::tests::{checked, messages, TWO};
    use super::*;
    use crate::spec;

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
        spec.spare = 1;
        spec.udp_mode = spec::UdpMode::Flow;
        spec.receive_buffer = 65536;
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
