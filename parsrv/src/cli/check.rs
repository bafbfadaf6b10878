//! `parsrv check`: every problem of a config file, with line and column, without touching the
//! kernel.

use crate::error::{Error, Result};

pub(super) fn check(path: &std::path::Path) -> Result<()> {
    let checked = crate::config_file::check(path)?;
    for problem in &checked.problems {
        println!(
            "{}:{}:{}: {}{}",
            path.display(),
            problem.line,
            problem.column,
            if problem.warning { "warning: " } else { "" },
            problem.message
        );
    }
    match checked.file {
        Some(file) => {
            println!(
                "{}: valid, {} group{}: {}",
                path.display(),
                file.groups.len(),
                if file.groups.len() == 1 { "" } else { "s" },
                file.groups
                    .iter()
                    .map(|g| g.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for group in &file.groups {
                if let Some(memory) = group.table_memory() {
                    println!("{}: {memory}", group.name);
                }
            }
            Ok(())
        }
        None => Err(Error::Rejected(format!(
            "{}: {} problem{}: fix them and check again",
            path.display(),
            checked.problems.len(),
            if checked.problems.len() == 1 { "" } else { "s" }
        ))),
    }
}
