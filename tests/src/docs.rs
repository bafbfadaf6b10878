//! The docs' fenced blocks, as the tests that check them read them: the pages (the README,
//! `docs/`, `bench/README.md`), their blocks by info string, and the `parsrv` commands of a
//! shell block. Shared by `parsrv/tests/docs_commands.rs` (every command parses) and the
//! privileged `docs` tests (the blocks that start a group run as written); the former
//! includes this file by path, so it needs nothing but `shlex`.

use std::path::{Path, PathBuf};

/// The workspace's root (both crates that read the docs sit one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The README, every page under docs/, and the benchmarks' README.
pub fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md"), root().join("bench/README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The fenced blocks of `text` whose info string is `lang`: (first line's number, text).
pub fn blocks(text: &str, lang: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut open: Option<(usize, bool, String)> = None;
    for (n, line) in text.lines().enumerate() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some((
                    n + 2,
                    info.split_whitespace().next().unwrap_or("") == lang,
                    String::new(),
                ))
            }
            (Some((first, wanted, body)), Some(_)) => {
                if *wanted {
                    found.push((*first, std::mem::take(body)));
                }
                open = None;
            }
            (Some((_, _, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    found
}

/// The `parsrv` commands of a shell block, as argv (continued lines joined, comments and
/// what follows a `|` or `&&` left out).
pub fn parsrv_commands(block: &str) -> Vec<Vec<String>> {
    block
        .replace("\\\n", " ")
        .lines()
        .filter_map(|line| {
            let words = shlex::split(line)?;
            let words: Vec<String> = words
                .into_iter()
                .take_while(|w| !w.starts_with('#') && w != "|" && w != "&&")
                .collect();
            let program = words.first()?;
            (program == "parsrv" || program.ends_with("/parsrv")).then_some(words)
        })
        .collect()
}

/// The commands of a transcript block (lines `$ parsrv ...`), as argv.
pub fn transcript_commands(block: &str) -> Vec<Vec<String>> {
    block
        .lines()
        .filter_map(|line| line.strip_prefix("$ "))
        .flat_map(parsrv_commands)
        .collect()
}
