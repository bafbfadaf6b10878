//! The "Where the truth lives" table of `docs/design.md` names what the code uses: every map,
//! program and link name in it is one that parsrv-common declares, and every path in it is
//! one the code builds. A renamed map or a moved pin or socket breaks this test, not a
//! reader's understanding of where to look.

use std::{collections::BTreeSet, path::Path};

use parsrv::{control, dataplane, spawner};
use parsrv_common::{audit, cluster, lookup, reuseport, scope, udp};

/// The table's rows.
fn rows() -> Vec<String> {
    let design = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/design.md");
    let text = std::fs::read_to_string(&design).expect("docs/design.md");
    let section = text
        .split("## Where the truth lives")
        .nth(1)
        .expect("a \"Where the truth lives\" section");
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // the header and its rule
        .map(str::to_owned)
        .collect()
}

/// The `code spans` of a row.
fn spans(row: &str) -> Vec<&str> {
    row.split('`').skip(1).step_by(2).collect()
}

/// The kernel's own names the table uses (not parsrv's).
const KERNEL_NAMES: &[&str] = &["SO_INCOMING_CPU"];

/// Map, program and link names the code declares, as pinned or shown.
fn declared_names() -> BTreeSet<&'static str> {
    use cluster::names as c;
    use lookup::names as l;
    use reuseport::names as r;
    BTreeSet::from([
        r::PROGRAM,
        r::SOCKETS,
        r::SLOT_BY_COOKIE,
        r::SLOT_COUNTERS,
        r::GLOBAL_COUNTERS,
        r::CONFIG,
        r::DISPATCH_TABLE,
        r::AFFINITY_COUNTERS,
        r::QUEUE_ALERTS,
        l::PROGRAM,
        l::LINK,
        l::RULES,
        l::SLOT_LISTEN,
        l::COUNTERS,
        c::PROGRAM,
        c::LINK,
        c::CONFIG,
        c::CLIENTS,
        c::HOSTS,
        c::PEER_MACS,
        c::DECISIONS,
        audit::names::PROGRAM,
        udp::names::PROGRAM,
        udp::names::SOCKETS,
        udp::names::SLOT_BY_COOKIE,
        udp::names::CONFIG,
        udp::names::SLOT_COUNTERS,
        udp::names::FLOW_PROGRAM,
        udp::names::FLOWS,
        udp::names::QUIC_PROGRAM,
        udp::names::FIRST_FLIGHTS,
        udp::names::TABLE_COUNTERS,
    ])
}

/// Paths the code builds, with their variable parts spelled as the table spells them.
fn built_paths() -> BTreeSet<String> {
    // The table gives the defaults; a test run may have moved them.
    let run_dir = parsrv::run_dir::run_dir().display().to_string();
    let bpffs = dataplane::pins::root().display().to_string();
    let as_documented = |path: &Path| {
        path.display()
            .to_string()
            .replacen(&run_dir, parsrv::run_dir::RUN_DIR, 1)
            .replacen(&bpffs, "/sys/fs/bpf/parsrv", 1)
    };
    let group_dir = as_documented(&dataplane::pins::group_dir("GROUP")) + "/";
    BTreeSet::from([
        group_dir.clone(),
        format!("{group_dir}{}", reuseport::names::PROGRAM),
        format!("/sys/fs/bpf/parsrv/{}INODE/", scope::NETNS_PREFIX),
        as_documented(&dataplane::cluster::pin_dir("NAME", 65535)).replace("65535", "HOST") + "/",
        as_documented(&control::socket_path("GROUP")),
        as_documented(&control::spawner_socket_path(4294967295)).replace("4294967295", "PID"),
        as_documented(&spawner::record_path("GROUP")),
    ])
}

#[test]
fn every_name_and_path_in_the_truth_table_is_the_codes() {
    let rows = rows();
    assert!(rows.len() >= 10, "the table was not found whole: {rows:?}");
    let names = declared_names();
    let paths = built_paths();
    let mut checked = 0;
    for row in &rows {
        for span in spans(row) {
            if span.starts_with('/') {
                assert!(
                    paths.contains(span),
                    "docs/design.md names the path `{span}`, which the code does not build; \
                     it builds {paths:#?}"
                );
                checked += 1;
            } else if let Some(prefix) = span.strip_suffix('*') {
                assert!(
                    names.iter().any(|n| n.starts_with(prefix)),
                    "no declared name starts with `{prefix}`"
                );
                checked += 1;
            } else if KERNEL_NAMES.contains(&span) {
                continue;
            } else if span
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                || span.starts_with("parsrv_")
            {
                assert!(
                    names.contains(span),
                    "docs/design.md names `{span}`, which parsrv-common does not declare"
                );
                checked += 1;
            }
        }
    }
    // Every kind of entry was met: the parsing did not silently skip the table.
    assert!(checked >= 20, "only {checked} names and paths checked");
}

#[test]
fn a_name_the_code_does_not_declare_is_caught() {
    let names = declared_names();
    assert!(!names.contains("SLOTS"));
    assert!(names.contains("SOCKETS"));
    // The drift the issue found: a cluster directory without its host.
    let paths = built_paths();
    assert!(!paths.contains("/sys/fs/bpf/parsrv/_cluster-NAME/"));
    assert!(paths.contains("/sys/fs/bpf/parsrv/_cluster-NAME-HOST/"));
}
