//! `parsrv upgrade`: have a spawner re-execute the binary at its path and wait until the new
//! image adopts its groups.

use super::group::done;
use crate::{
    control::{self, Request, Response},
    error::{Error, Result},
};

/// Asks the spawner to re-execute itself, then waits until the new image answers for
/// every group it had.
pub(super) fn upgrade(spawner: Option<u32>) -> Result<()> {
    let pid = control::resolve_spawner(spawner)?;
    let groups: Vec<(String, u64)> = control::running_groups()
        .into_iter()
        .filter_map(|name| match control::request(&name, &Request::Status) {
            Ok(Response::Status(status)) if status.spawner_pid == pid => {
                Some((name, status.spawner_started_ms))
            }
            _ => None,
        })
        .collect();
    done(
        format!("spawner {pid}"),
        control::request_spawner(pid, &Request::Upgrade)?,
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for (name, before) in groups {
        loop {
            match control::request(&name, &Request::Status) {
                Ok(Response::Status(status)) if status.spawner_started_ms != before => {
                    println!(
                        "group {name}: adopted by the new image (parsrv {}), handlers {:?}",
                        status.spawner_version,
                        status
                            .handlers
                            .iter()
                            .filter_map(|h| h.pid)
                            .collect::<Vec<_>>()
                    );
                    break;
                }
                // A runtime failure (exit 1), not a usage error.
                _ if std::time::Instant::now() > deadline => {
                    return Err(Error::io(format!("waiting for spawner {pid}'s new image"))(
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "group {name} was not adopted within 60 s: see the spawner's log"
                            ),
                        ),
                    ))
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }
    Ok(())
}
