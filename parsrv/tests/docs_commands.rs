//! The docs' commands and config files are read by this binary's own parsers: every
//! `parsrv` line in a shell block (```` ```sh ````) of the README, `docs/` and
//! `bench/README.md` parses with the CLI, and every config file in a ```` ```toml ```` block
//! checks clean but for what depends on the host it is checked on. A renamed flag, verb or
//! key breaks this test, not a reader's copy-paste.

use clap::Parser as _;
use parsrv::{cli::Cli, config_file};

#[path = "../../tests/src/docs.rs"]
mod docs;
use docs::{blocks, pages, parsrv_commands, root, transcript_commands};

/// Parses `argv` with the CLI; help and version requests count as parsed.
fn refusal(argv: &[String]) -> Option<String> {
    use clap::error::ErrorKind;
    match Cli::try_parse_from(argv) {
        Ok(_) => None,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => None,
        Err(e) => Some(e.to_string().lines().next().unwrap_or_default().to_owned()),
    }
}

#[test]
fn every_parsrv_command_in_the_docs_parses() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let shell = blocks(&text, "sh").into_iter().flat_map(|(line, block)| {
            parsrv_commands(&block)
                .into_iter()
                .map(move |argv| (line, argv))
        });
        // Transcripts sit in plain blocks: `$ parsrv check --config bad.toml`.
        let transcripts = blocks(&text, "").into_iter().flat_map(|(line, block)| {
            transcript_commands(&block)
                .into_iter()
                .map(move |argv| (line, argv))
        });
        for (line, argv) in shell.chain(transcripts) {
            checked += 1;
            if let Some(why) = refusal(&argv) {
                wrong.push(format!(
                    "{} (block at line {line}): {argv:?}: {why}",
                    page.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "commands in the docs this parsrv refuses:\n{}",
        wrong.join("\n")
    );
    // The docs show the CLI in action: a parser that found nothing checked nothing.
    assert!(
        checked >= 10,
        "only {checked} parsrv commands found in the docs' sh blocks"
    );
}

/// What a config check says about the host rather than the file: a program not installed
/// here, CPUs or users this machine lacks, addresses not on it.
const HOST_DEPENDENT: [&str; 5] = [
    "not found in PATH",
    "no such user",
    "not a CPU this process may use",
    "not on this host",
    "no such interface",
];

#[test]
fn every_config_file_in_the_docs_checks_clean() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for (line, block) in blocks(&text, "toml") {
            checked += 1;
            let result = config_file::check_text(&page, &block);
            for problem in result.problems.iter().filter(|p| !p.warning) {
                if !HOST_DEPENDENT.iter().any(|h| problem.message.contains(h)) {
                    wrong.push(format!(
                        "{} (block at line {line}), its line {}: {}",
                        page.display(),
                        problem.line,
                        problem.message
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "config files in the docs with problems:\n{}",
        wrong.join("\n")
    );
    assert!(checked >= 2, "only {checked} toml blocks found in the docs");
}

/// The synopsis in docs/cli.md (`parsrv group resize GROUP N`, `[--json]`): every verb it
/// names exists, and every flag it shows is one of that verb's.
#[test]
fn the_synopsis_names_only_verbs_and_flags_that_exist() {
    use clap::CommandFactory as _;
    let text = std::fs::read_to_string(root().join("docs/cli.md")).unwrap();
    let (_, synopsis) = blocks(&text, "")
        .into_iter()
        .find(|(_, b)| b.starts_with("parsrv run"))
        .expect("docs/cli.md starts its synopsis block with `parsrv run`");
    // Built, so that clap's own flags (`--version`, `--help`) are there too.
    let mut cli = Cli::command();
    cli.build();
    let mut verbs = 0;
    let mut wrong = Vec::new();
    // Indented lines continue the line above.
    let mut lines: Vec<String> = Vec::new();
    for line in synopsis.lines() {
        let line = line.split(" # ").next().unwrap();
        match (line.starts_with(char::is_whitespace), lines.last_mut()) {
            (true, Some(last)) => last.push_str(line),
            _ => lines.push(line.to_owned()),
        }
    }
    for line in lines.iter().filter(|l| l.starts_with("parsrv ")) {
        let mut command = &cli;
        let mut words = line.split_whitespace().skip(1).peekable();
        while let Some(word) = words.next_if(|w| w.chars().all(|c| c.is_ascii_lowercase())) {
            match command.find_subcommand(word) {
                Some(sub) => command = sub,
                None => wrong.push(format!("{line}: no verb {word:?}")),
            }
        }
        verbs += 1;
        for flag in line
            .split(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .filter_map(|w| w.strip_prefix("--"))
            .filter(|f| !f.is_empty())
        {
            if !command.get_arguments().any(|a| a.get_long() == Some(flag)) {
                wrong.push(format!("{line}: {} has no --{flag}", command.get_name()));
            }
        }
    }
    assert!(wrong.is_empty(), "the synopsis says:\n{}", wrong.join("\n"));
    assert!(verbs >= 15, "only {verbs} synopsis lines");
}

/// The flags table of docs/cli.md (rows that start with a flag) has a row for every flag of
/// `parsrv run`, and every row is one of its flags: a new setting is its field in the model
/// and its row here, and this test says when the row is missing.
#[test]
fn the_flags_table_lists_every_flag_of_parsrv_run() {
    use clap::CommandFactory as _;
    let text = std::fs::read_to_string(root().join("docs/cli.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("| `--"))
        .filter_map(|rest| rest.split(['`', ' ']).next())
        .map(str::to_owned)
        .collect();
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("a run verb");
    let flags: std::collections::BTreeSet<String> = run
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .filter(|long| *long != "help")
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = flags.difference(&documented).collect();
    let unknown: Vec<&String> = documented.difference(&flags).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "docs/cli.md's flags table: no row for {missing:?}; rows for flags `parsrv run` lacks: {unknown:?}"
    );
}
