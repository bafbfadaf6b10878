//! What the agent offers and runs on its own host: its control socket (`parsrv cluster
//! status`, `parsrv cluster drain`) and the routing hooks (`ready`, `draining`).

use super::Shared;
use crate::{
    control::{self, Request, Response},
    error::{Error, Result},
};

/// Runs a routing hook (`ready` or `draining`), logging its outcome.
pub(super) async fn run_hook(command: &[String], what: &str) {
    let Some((program, args)) = command.split_first() else {
        return;
    };
    match tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
    {
        Ok(out) if out.status.success() => log::info!("{what} command {command:?} done"),
        Ok(out) => log::error!(
            "{what} command {command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => log::error!("{what} command {command:?} could not start: {e}"),
    }
}

/// Where `parsrv cluster status` finds the agent of cluster `name`.
pub fn control_path(name: &str) -> std::path::PathBuf {
    control_path_in(&crate::run_dir::run_dir(), name)
}

/// [`control_path`] in run directory `run_dir` (a test's hosts each have their own).
pub fn control_path_in(run_dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    run_dir.join(format!("cluster-{name}.sock"))
}

pub(super) fn control_listener(name: &str) -> Result<control::ControlSocket> {
    let path = control_path(name);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(Error::Rejected(format!(
            "an agent of cluster '{name}' already runs on this host ({}): stop it first",
            path.display()
        )));
    }
    control::ControlSocket::bind_at(path)
}

/// Answers `parsrv cluster status` and `parsrv cluster drain`, over the control protocol
/// every parsrv socket speaks.
pub(super) async fn serve_control(agent: Shared, control: control::ControlSocket) {
    control
        .serve(move |request| {
            let agent = agent.clone();
            async move {
                match request {
                    Request::Status => Response::ClusterStatus(Box::new(agent.borrow().status())),
                    Request::Drain => {
                        let command = agent.borrow_mut().withdraw();
                        run_hook(&command, "draining").await;
                        Response::Done("draining".into())
                    }
                    other => Response::Failed(control::ControlError::WrongSocket {
                        request: other.verb(),
                        fix: "a cluster agent takes `status` and `drain`; a group's requests go \
                              to its spawner (`parsrv status`, `parsrv group ...`)"
                            .into(),
                    }),
                }
            }
        })
        .await
}
