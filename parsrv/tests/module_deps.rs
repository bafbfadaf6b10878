//! Which of parsrv's top-level modules use which (`crate::MODULE` in their code, comments and
//! test modules left out), so that the import circles broken once stay broken: a handler is
//! launched by the socket-activation protocol, not the other way round; the kernel-features
//! report uses the programs, the programs do not use it; a cluster agent's metrics are the
//! cluster's, served by the generic metrics server.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code of a module's files: line comments removed, and everything from a
/// `#[cfg(test)]` on (the test modules sit at the end of each file).
fn code_of(module: &str) -> String {
    let mut files = Vec::new();
    let dir = src().join(module);
    if dir.is_dir() {
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
    } else {
        files.push(src().join(format!("{module}.rs")));
    }
    let mut code = String::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.split("#[cfg(test)]").next().unwrap();
        for line in text.lines() {
            code.push_str(line.split("//").next().unwrap());
            code.push('\n');
        }
    }
    code
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
