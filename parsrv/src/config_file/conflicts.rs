//! The rules between a file's groups: one name each, no address and port that two groups
//! could both match, and no two dynamic users of one uid.

use std::{collections::BTreeMap, ops::Range};

use super::keys::Spans;
use crate::spec::{self, GroupSpec};

/// The groups read so far, by name: where each name is, and the group.
pub(super) type Seen = BTreeMap<String, (Range<usize>, GroupSpec)>;

/// What `spec` (its keys at `spans`, its name at `here`) conflicts with among the groups
/// `seen` before it, each with where it points; `locate` turns a place in the text into a
/// line and column.
pub(super) fn with_earlier(
    spec: &GroupSpec,
    spans: &Spans,
    here: &Range<usize>,
    seen: &Seen,
    locate: impl Fn(Range<usize>) -> (usize, usize),
) -> Vec<(Range<usize>, String)> {
    let name = spec.name.clone();
    let mut found = Vec::new();
    if let Some((first, _)) = seen.get(&name) {
        let (line, column) = locate(first.clone());
        found.push((
            here.clone(),
            format!("group name '{name}' is used twice (first at {line}:{column}): names must be unique"),
        ));
    }
    for (other, (span, others)) in seen {
        if other == &name {
            continue;
        }
        let (line, column) = locate(span.clone());
        let Some((theirs, ours)) = others.overlap_with(spec) else {
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
        found.push((spans["listen"].clone(), message));
    }
    // Two dynamic users of one number would be one user: their handlers could reach
    // each other's (spec::dynamic_user). 65,536 uids: rare, but not impossible.
    if let Some((other, (span, _))) = seen.iter().find(|(other, (_, others))| {
        *other != &name
            && [spec, others]
                .iter()
                .all(|g| g.user.as_deref() == Some(spec::dynamic_user::DYNAMIC))
            && spec::dynamic_user::credentials_of(other)
                == spec::dynamic_user::credentials_of(&name)
    }) {
        let (line, column) = locate(span.clone());
        found.push((
            here.clone(),
            format!(
                "groups '{other}' ({line}:{column}) and '{name}' would have one dynamic uid, {} \
                 (their names hash alike): rename one",
                spec::dynamic_user::credentials_of(&name).uid
            ),
        ));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::super::tests::messages;
    use crate::spec;

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
}
