//! Which of parsrv's top-level modules use which (`crate::MODULE` in their code, comments and
//! test modules left out), so that the import circles broken once stay broken: a handler is
//! launched by the socket-activation protocol, not the other way round; the kernel-features
//! report uses the programs, the programs do not use it; a cluster agent's metrics are the
//! cluster's, served by the generic metrics server.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

mod common;
use common::{code_outside_tests, rust_files};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code of a module's files, comments and `#[cfg(test)]` items left out.
fn code_of(module: &str) -> String {
    let dir = src().join(module);
    let files = match dir.is_dir() {
        true => rust_files(&dir),
        false => vec![src().join(format!("{module}.rs"))],
    };
    files
        .iter()
        .map(|file| code_outside_tests(&std::fs::read_to_string(file).unwrap()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every top-level module and the others its code names.
fn uses() -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = std::fs::read_dir(src())
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let name = name.strip_suffix(".rs").unwrap_or(&name).to_owned();
            (name != "lib" && name != "main").then_some(name)
        })
        .collect();
    modules
        .iter()
        .map(|module| {
            let code = code_of(module);
            // `crate::other` anywhere, including inside `use crate::{..., other, ...}`.
            let grouped: String = code
                .split("crate::{")
                .skip(1)
                .filter_map(|rest| rest.split('}').next())
                .collect::<Vec<_>>()
                .join(",");
            let named = modules
                .iter()
                .filter(|other| *other != module)
                .filter(|other| {
                    let named_at = |(at, m): (usize, &str)| {
                        !code[at + m.len()..]
                            .chars()
                            .next()
                            .is_some_and(|c| c.is_alphanumeric() || c == '_')
                    };
                    code.match_indices(&format!("crate::{other}")).any(named_at)
                        || grouped
                            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                            .any(|w| w == other.as_str())
                })
                .cloned()
                .collect();
            (module.clone(), named)
        })
        .collect()
}

#[test]
fn the_circles_once_broken_stay_broken() {
    let uses = uses();
    // The reading itself works: these uses exist.
    for (module, other) in [
        ("handler", "activation"),
        ("features", "dataplane"),
        ("cluster", "metrics"),
    ] {
        assert!(
            uses[module].contains(other),
            "{module} no longer uses {other}: {:?}",
            uses[module]
        );
    }
    for (module, other) in [
        ("activation", "handler"),
        ("dataplane", "features"),
        ("metrics", "cluster"),
    ] {
        assert!(
            !uses[module].contains(other),
            "{module} uses {other} again, which uses it: a circle"
        );
    }
}
