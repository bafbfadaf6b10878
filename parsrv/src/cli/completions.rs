//! `parsrv completions SHELL`: the shell's completion script, generated from the command
//! line's own model (clap_complete), so that it knows every verb and flag of this binary.

use clap::CommandFactory as _;

use super::Cli;
use crate::error::Result;

pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    clap_complete::generate(shell, &mut Cli::command(), "parsrv", &mut std::io::stdout());
    Ok(())
}
