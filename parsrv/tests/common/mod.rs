//! Reading parsrv's own source as code, for the tests that check rules over it
//! (`module_deps`, `proc_reads`): which bytes are code, comment or literal, and the files.

use std::path::{Path, PathBuf};

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
pub fn code_outside_tests(text: &str) -> String {
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

/// Every `.rs` file under `dir`.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
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
