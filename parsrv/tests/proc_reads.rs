//! /proc is read through one module, `procfs`: no other file of parsrv/src names a /proc path
//! (`"/proc...` or `/proc/{...}`) in its code, comments and `#[cfg(test)]` items left out.
//! `"/proc/self/exe"` may stay where it is: a program to exec, not a read.

use std::path::{Path, PathBuf};

/// The only file that may build /proc paths.
const PROCFS: &str = "procfs.rs";

/// What starts a /proc path in code.
const PATTERNS: [&str; 2] = ["\"/proc", "/proc/{"];

/// Allowed anywhere: the spawner runs it.
const OWN_EXECUTABLE: &str = "\"/proc/self/exe\"";

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Code,
    Comment,
    Literal,
}

/// What each byte of Rust source is: code, comment, or inside a string or char literal.
fn classify(text: &[u8]) -> Vec<Kind> {
    let mut kinds = vec![Kind::Code; text.len()];
    let mut i = 0;
    let at = |i: usize| text.get(i).copied().unwrap_or(0);
    while i < text.len() {
        let start = i;
        if at(i) == b'/' && at(i + 1) == b'/' {
            while i < text.len() && at(i) != b'\n' {
                i += 1;
            }
            kinds[start..i].fill(Kind::Comment);
        } else if at(i) == b'/' && at(i + 1) == b'*' {
            let mut depth = 0;
            loop {
                if i >= text.len() {
                    break;
                } else if at(i) == b'/' && at(i + 1) == b'*' {
                    depth += 1;
                    i += 2;
                } else if at(i) == b'*' && at(i + 1) == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            kinds[start..i.min(text.len())].fill(Kind::Comment);
        } else if at(i) == b'r' && starts_raw_string(text, i) {
            // r"...", r#"..."#: no escapes, it ends at a quote and as many #.
            let hashes = text[i + 1..].iter().take_while(|&&b| b == b'#').count();
            let body = i + 2 + hashes;
            let close = [b"\"".as_slice(), "#".repeat(hashes).as_bytes()].concat();
            let body_end = text[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(text.len(), |p| body + p);
            kinds[body..body_end].fill(Kind::Literal);
            i = (body_end + close.len()).min(text.len());
        } else if at(i) == b'"' {
            i += 1;
            while i < text.len() && at(i) != b'"' {
                i += if at(i) == b'\\' { 2 } else { 1 };
            }
            kinds[start + 1..i.min(text.len())].fill(Kind::Literal);
            i += 1;
        } else if at(i) == b'\''
            && (at(i + 1) == b'\\' || at(i + 1 + utf8_width(at(i + 1))) == b'\'')
        {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            i += 1;
            while i < text.len() && at(i) != b'\'' {
                i += if at(i) == b'\\' { 2 } else { 1 };
            }
            kinds[start + 1..i.min(text.len())].fill(Kind::Literal);
            i += 1;
        } else {
            i += 1;
        }
    }
    kinds
}

/// Whether the `r` at `i` starts a raw string (`r"`, `r#"`, `br"`), not an identifier
/// (`r#type`, `bar"`).
fn starts_raw_string(text: &[u8], i: usize) -> bool {
    let ident = |at: Option<usize>| {
        at.and_then(|at| text.get(at))
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
    };
    let before = i.checked_sub(1);
    let prefix_ok =
        !ident(before) || (before.is_some_and(|b| text[b] == b'b') && !ident(i.checked_sub(2)));
    let hashes = text[i + 1..].iter().take_while(|&&b| b == b'#').count();
    prefix_ok && text.get(i + 1 + hashes) == Some(&b'"')
}

/// How many bytes the UTF-8 character that starts with `first` takes.
fn utf8_width(first: u8) -> usize {
    match first {
        0..0x80 => 1,
        0xC0..0xE0 => 2,
        0xE0..0xF0 => 3,
        _ => 4,
    }
}

/// `text` with comments and `#[cfg(test)]` items (a module, a function, `mod tests;`)
/// blanked, lines kept where they were.
fn code_outside_tests(text: &str) -> String {
    let bytes = text.as_bytes();
    let kinds = classify(bytes);
    let mut kept: Vec<u8> = bytes
        .iter()
        .zip(&kinds)
        .map(|(&b, &k)| {
            if k == Kind::Comment && b != b'\n' {
                b' '
            } else {
                b
            }
        })
        .collect();
    let attribute = b"#[cfg(test)]";
    let mut from = 0;
    while let Some(found) = kept[from..]
        .windows(attribute.len())
        .position(|w| w == attribute)
    {
        let start = from + found;
        from = start + attribute.len();
        if kinds[start] != Kind::Code {
            continue;
        }
        // The item ends at its `;`, or at the brace that closes its first `{`; a `}` that
        // closes a block around it ends it too.
        let mut depth = 0usize;
        let end = (from..bytes.len())
            .filter(|&i| kinds[i] == Kind::Code)
            .find_map(|i| match bytes[i] {
                b';' if depth == 0 => Some(i + 1),
                b'{' => {
                    depth += 1;
                    None
                }
                b'}' if depth == 0 => Some(i),
                b'}' if depth == 1 => Some(i + 1),
                b'}' => {
                    depth -= 1;
                    None
                }
                _ => None,
            })
            .unwrap_or(bytes.len());
        for b in &mut kept[start..end] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
        from = end;
    }
    String::from_utf8(kept).expect("blanking keeps UTF-8: only whole characters are replaced")
}

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

fn sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
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
    files
}

#[test]
fn only_procfs_names_proc_paths() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for file in sources() {
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
