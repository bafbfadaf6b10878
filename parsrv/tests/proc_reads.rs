//! /proc is read through one module, `procfs`: no other file of parsrv/src names a /proc path
//! (`"/proc...` or `/proc/{...}`) in its code, comments and `#[cfg(test)]` items left out.
//! `"/proc/self/exe"` may stay where it is: a program to exec, not a read.

use std::path::Path;

mod common;
use common::{code_outside_tests, rust_files};

/// The only file that may build /proc paths.
const PROCFS: &str = "procfs.rs";

/// What starts a /proc path in code.
const PATTERNS: [&str; 2] = ["\"/proc", "/proc/{"];

/// Allowed anywhere: the spawner runs it.
const OWN_EXECUTABLE: &str = "\"/proc/self/exe\"";

/// Where in `text` a /proc path starts in code: (line, the line).
fn proc_paths(text: &str) -> Vec<(usize, String)> {
    code_outside_tests(text)
        .lines()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.replace(OWN_EXECUTABLE, "");
            PATTERNS.iter().any(|pattern| line.contains(pattern))
        })
        .map(|(number, line)| (number + 1, line.trim().to_owned()))
        .collect()
}

#[test]
fn only_procfs_names_proc_paths() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for file in rust_files(&src) {
        let hits = proc_paths(&std::fs::read_to_string(&file).unwrap());
        let name = file.strip_prefix(&src).unwrap().display().to_string();
        if name == PROCFS {
            // The reading itself works: the module that reads /proc is seen doing it.
            assert!(hits.len() > 5, "{name}: {hits:?}");
            continue;
        }
        found.extend(
            hits.into_iter()
                .map(|(line, code)| format!("{name}:{line}: {code}")),
        );
    }
    assert!(
        found.is_empty(),
        "read /proc through parsrv::procfs, not here:\n{}",
        found.join("\n")
    );
}

#[test]
fn comments_literals_and_test_items_are_told_from_code() {
    let text = r##"
// fs::read("/proc/1/stat") in a comment
/* and "/proc/{pid}" in /* a nested */ block */
#[cfg(test)]
mod tests;
#[cfg(test)]
fn helper() -> &'static str { let brace = '{'; "/proc/self/status" }
fn lifetime<'a>(x: &'a str) -> &'a str { x }
const RAW: &str = r#"a "quote" and } brace"#;
const OWN: &str = "/proc/self/exe";
fn read(pid: u32) -> String { format!("/proc/{pid}/comm") }
#[cfg(test)]
mod more_tests {
    const ALSO: &str = "/proc/locks";
}
const AFTER: &str = "/proc/sys";
"##;
    let hits: Vec<usize> = proc_paths(text).into_iter().map(|(line, _)| line).collect();
    assert_eq!(hits, [11, 16]);
}
