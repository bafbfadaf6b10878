//! `parsrv man DIR`: the man pages, generated from the command line's own model
//! (clap_mangen): parsrv(8), and a page per verb as git and systemd name theirs
//! (parsrv-run(8), parsrv-group-add(8), ...). Section 8: parsrv is a daemon root runs.

use std::{fs, path::Path};

use clap::CommandFactory as _;

use super::Cli;
use crate::error::{Error, Result};

pub fn man(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let mut cli = Cli::command();
    cli.build();
    for (name, command) in pages(&cli, "parsrv") {
        let path = dir.join(format!("{name}.8"));
        let mut page = Vec::new();
        clap_mangen::Man::new(command.name(name.clone()))
            .section("8")
            .render(&mut page)
            .map_err(Error::io(format!("rendering {name}(8)")))?;
        fs::write(&path, page).map_err(Error::io(format!("writing {}", path.display())))?;
    }
    Ok(())
}

/// `command` and every verb under it that a user types (hidden ones and clap's `help` left
/// out), each with its page's name.
fn pages(command: &clap::Command, name: &str) -> Vec<(String, clap::Command)> {
    let mut all = vec![(name.to_owned(), command.clone())];
    let verbs = command.get_subcommands();
    for verb in verbs.filter(|v| !v.is_hide_set() && v.get_name() != "help") {
        all.extend(pages(verb, &format!("{name}-{}", verb.get_name())));
    }
    all
}
