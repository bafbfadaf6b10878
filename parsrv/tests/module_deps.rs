//! Which of parsrv's top-level modules use which (`crate::MODULE` in their code, comments and
//! test modules left out), so that they stay layered: no module reaches back, through any
//! chain of others, to a module that uses it. A handler is launched by the socket-activation
//! protocol, not the other way round; the kernel-features report uses the programs, the
//! programs do not use it; a cluster agent's metrics are the cluster's, served by the generic
//! metrics server; the control protocol carries the status models (`status`), not the
//! agent's; a config file's keys are parsed by the group's own flags (`spec`), not by the
//! command line's model; the run directory is its own module, below the control sockets
//! and the programs' verifier logs.

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

/// The strongly connected sets of `uses` with more than one module (Tarjan's algorithm):
/// each is a circle of imports.
fn circles(uses: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct Walk<'a> {
        uses: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        circles: Vec<BTreeSet<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, module: &'a str) {
            let n = self.index.len();
            self.index.insert(module, n);
            self.low.insert(module, n);
            self.stack.push(module);
            for other in &self.uses[module] {
                let other = other.as_str();
                if !self.index.contains_key(other) {
                    self.visit(other);
                    let low = self.low[module].min(self.low[other]);
                    self.low.insert(module, low);
                } else if self.stack.contains(&other) {
                    let low = self.low[module].min(self.index[other]);
                    self.low.insert(module, low);
                }
            }
            if self.low[module] == self.index[module] {
                let at = self.stack.iter().position(|m| *m == module).unwrap();
                let set: BTreeSet<String> = self.stack.drain(at..).map(str::to_owned).collect();
                if set.len() > 1 {
                    self.circles.push(set);
                }
            }
        }
    }
    let mut walk = Walk {
        uses,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        circles: Vec::new(),
    };
    for module in uses.keys() {
        if !walk.index.contains_key(module.as_str()) {
            walk.visit(module);
        }
    }
    walk.circles
}

#[test]
fn no_module_reaches_back_to_one_that_uses_it() {
    let uses = uses();
    let found = circles(&uses);
    let explained: Vec<String> = found
        .iter()
        .map(|set| {
            let edges: Vec<String> = set
                .iter()
                .map(|m| {
                    let within: Vec<&str> = uses[m]
                        .iter()
                        .filter(|o| set.contains(*o))
                        .map(String::as_str)
                        .collect();
                    format!("{m} -> {}", within.join(", "))
                })
                .collect();
            edges.join("; ")
        })
        .collect();
    assert!(found.is_empty(), "import circles: {explained:?}");
}

#[test]
fn a_circle_is_found() {
    let uses: BTreeMap<String, BTreeSet<String>> = [
        ("a", &["b"][..]),
        ("b", &["c"]),
        ("c", &["a"]),
        ("d", &["a"]),
        ("e", &[]),
    ]
    .into_iter()
    .map(|(m, o)| (m.to_owned(), o.iter().map(|s| s.to_string()).collect()))
    .collect();
    let expected: BTreeSet<String> = ["a", "b", "c"].map(str::to_owned).into();
    assert_eq!(circles(&uses), vec![expected]);
}
