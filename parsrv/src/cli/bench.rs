//! `parsrv bench`: hand over to the parsrv-bench binary built beside this one.

use crate::error::{Error, Result};

/// Execs parsrv-bench from this binary's directory.
pub(super) fn bench(args: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(Error::io("finding this binary"))?;
    let bench = exe.with_file_name("parsrv-bench");
    if !bench.is_file() {
        return Err(Error::Io {
            context: format!("{} is not built", bench.display()),
            source: std::io::Error::other(
                "build it with `cargo xtask bench` (or cargo build -p parsrv-bench)",
            ),
        });
    }
    let error = std::process::Command::new(&bench).args(args).exec();
    Err(Error::io(format!("running {}", bench.display()))(error))
}
