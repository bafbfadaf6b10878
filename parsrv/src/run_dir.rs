//! The run directory (`/run/parsrv`, or `PARSRV_RUN_DIR`): what a new process picks up
//! beside the pins (the control sockets, each spawner's record, the handlers' notify
//! sockets, a refused program's verifier log). Only root may write it, and root refuses one
//! that someone else could have planted things in.

use std::{fs, io, path::PathBuf};

use crate::error::{Error, Result};

/// Where it is unless [`RUN_DIR_ENV`] says otherwise.
pub const RUN_DIR: &str = "/run/parsrv";
pub const RUN_DIR_ENV: &str = "PARSRV_RUN_DIR";

pub fn run_dir() -> PathBuf {
    std::env::var_os(RUN_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

/// Refuses a run directory root should not trust: one that another user owns or may write
/// (a planted record or socket there would make root act on it). One that does not exist
/// yet is fine: parsrv creates it, 0711 (see `ControlSocket::bind_at`).
pub fn check_run_dir() -> Result<()> {
    let path = run_dir();
    let meta = match fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
    };
    let why = if !meta.is_dir() {
        Some("not a directory".to_owned())
    } else {
        crate::kernel::untrusted_because(&meta)
    };
    match why {
        Some(why) => Err(Error::UntrustedPath { path, why }),
        None => Ok(()),
    }
}
