//! The control socket: a Unix socket per running group (root-only) through which other
//! `parsrv` commands talk to the spawner. One JSON request line, one JSON response line.

use std::{
    fs,
    io::{self, BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    run_dir::run_dir,
    status::GroupStatus,
};

/// Longest request line a spawner reads.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long the spawner waits for a request line, and a status client for its answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for a change (resize, restart: handlers start and drain).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// The group's settings, as a config file would give them.
    Show,
    /// Stop the group (draining if it was started so) and forget it.
    Remove,
    /// To a spawner's own socket: start these groups (all or none).
    Add {
        groups: Vec<crate::spec::GroupSpec>,
    },
    /// Grow or shrink the group to this many handlers (within its MIN..MAX).
    Resize {
        handlers: u32,
    },
    /// Replace every handler, one at a time.
    Restart,
    /// The dispatch table's entries (client affinity), of one client if given.
    Affinity {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<std::net::IpAddr>,
    },
    /// To a spawner's own socket: execute the parsrv binary at its path again, in this
    /// process; the new image adopts every group.
    Upgrade,
    /// To a cluster agent's socket: withdraw this host from the cluster (its `draining`
    /// hook), as SIGTERM does, but stay up and keep the table in step.
    Drain,
    /// The free places in the accept queues of the group's sockets that take connections
    /// (what a cluster agent shares as its host's load).
    Room,
}

impl Request {
    /// Its name on the wire.
    pub fn verb(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| Some(v.get("command")?.as_str()?.to_owned()))
            .unwrap_or_default()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Status(Box<GroupStatus>),
    /// A cluster agent's answer to `status`.
    ClusterStatus(Box<crate::status::cluster::ClusterStatus>),
    Spec(Box<crate::spec::GroupSpec>),
    Affinity(Vec<crate::status::AffinityEntry>),
    /// The answer to `room`.
    Room(i32),
    /// The change was made; what happened.
    Done(String),
    /// The spawner did not do what was asked, and why.
    Failed(ControlError),
}

/// Why a spawner did not do what a request asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "kebab-case")]
pub enum ControlError {
    /// The request cannot be done as asked (bad input, out of range, a conflict); the
    /// spawner changed nothing.
    #[error("{0}")]
    Refused(String),
    /// The request was not understood.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// This socket does not take that request.
    #[error("`{request}` is not taken here: {fix}")]
    WrongSocket { request: String, fix: String },
    /// The group is being removed and takes no more requests.
    #[error("group {group} is stopping")]
    Stopping { group: String },
    /// The spawner tried and failed; the message says what it kept.
    #[error("{0}")]
    Failed(String),
}

impl ControlError {
    /// Whether the request was bad input (so the client exits with a usage error).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ControlError::Refused(_)
                | ControlError::BadRequest(_)
                | ControlError::WrongSocket { .. }
        )
    }
}

impl From<Error> for ControlError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidOption { .. } | Error::Rejected(_) => {
                ControlError::Refused(e.to_string())
            }
            other => ControlError::Failed(other.to_string()),
        }
    }
}

pub fn socket_path(group: &str) -> PathBuf {
    run_dir().join(format!("{group}.sock"))
}

/// A spawner's own socket (for `parsrv group add`), apart from groups' names.
pub fn spawner_socket_path(pid: u32) -> PathBuf {
    run_dir().join("spawners").join(format!("{pid}.sock"))
}

/// Pids of the spawners that answer, sorted.
pub fn running_spawners() -> Vec<u32> {
    let Ok(entries) = fs::read_dir(run_dir().join("spawners")) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter(|e| is_live(&e.path()))
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".sock")?.parse().ok())
        .collect();
    pids.sort();
    pids
}

/// The spawner a request is for: the one named, or the only one running.
pub fn resolve_spawner(pid: Option<u32>) -> Result<u32> {
    let running = running_spawners();
    let known = if running.is_empty() {
        "none is running".to_string()
    } else {
        running
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (pid, running.as_slice()) {
        (Some(pid), _) if running.contains(&pid) => Ok(pid),
        (None, [only]) => Ok(*only),
        (None, [_, _, ..]) => Err(Error::Rejected(format!(
            "several spawners are running ({known}): choose one with --spawner PID"
        ))),
        (which, _) => Err(Error::NoSpawner {
            which: which.map_or(String::new(), |p| format!(" with pid {p}")),
            known,
        }),
    }
}

/// Whether a spawner answers at `path`.
pub fn is_live(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// If a spawner answers at `path`: `Some` of its pid (SO_PEERCRED; `None` if unreadable).
pub fn answering_pid(path: &Path) -> Option<Option<u32>> {
    let stream = UnixStream::connect(path).ok()?;
    Some(
        nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|cred| cred.pid() as u32),
    )
}

/// Names of the groups whose spawners answer, sorted.
pub fn running_groups() -> Vec<String> {
    let Ok(entries) = fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| is_live(&e.path()))
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".sock")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// The group a command is about: the one named, or the only one running.
pub fn resolve_group(name: Option<&str>) -> Result<String> {
    let running = running_groups();
    let known = if running.is_empty() {
        "none is running".to_string()
    } else {
        running.join(", ")
    };
    match name {
        Some(name) if running.iter().any(|r| r == name) => Ok(name.to_owned()),
        Some(name) => Err(Error::GroupNotRunning {
            which: format!(" named '{name}'"),
            known,
        }),
        None => match running.as_slice() {
            [only] => Ok(only.clone()),
            [] => Err(Error::GroupNotRunning {
                which: String::new(),
                known,
            }),
            [first, ..] => Err(Error::GroupAmbiguous {
                first: first.clone(),
                known,
            }),
        },
    }
}

/// Sends one request to the spawner of `group` and returns its answer.
pub fn request(group: &str, request: &Request) -> Result<Response> {
    request_at(
        &socket_path(group),
        &format!("the spawner of group '{group}'"),
        request,
    )
}

/// Sends one request to spawner `pid`'s own socket.
pub fn request_spawner(pid: u32, request: &Request) -> Result<Response> {
    request_at(
        &spawner_socket_path(pid),
        &format!("spawner {pid}"),
        request,
    )
}

/// Sends one request to the control socket at `path` (`whom` names its owner in errors).
pub fn request_at(path: &Path, whom: &str, request: &Request) -> Result<Response> {
    let talk = || -> io::Result<Response> {
        let mut stream = UnixStream::connect(path)?;
        let wait = match request {
            Request::Status => CLIENT_TIMEOUT,
            _ => CHANGE_TIMEOUT,
        };
        stream.set_read_timeout(Some(wait))?;
        stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        let mut line = serde_json::to_string(request)?;
        line.push('\n');
        stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        Ok(serde_json::from_str(&answer)?)
    };
    talk().map_err(Error::io(format!(
        "talking to {whom} at {}",
        path.display()
    )))
}

/// The spawner's end: removed from the file system when dropped.
pub struct ControlSocket {
    path: PathBuf,
    listener: tokio::net::UnixListener,
}

impl ControlSocket {
    /// Binds the group's control socket, replacing a stale file (the caller has checked
    /// that no spawner answers there). Must be called inside a tokio runtime.
    pub fn bind(group: &str) -> Result<Self> {
        Self::bind_at(socket_path(group))
    }

    /// Binds this spawner's own socket, after removing those of spawners that died
    /// without cleaning up (SIGKILL).
    pub fn bind_spawner() -> Result<Self> {
        let own = spawner_socket_path(std::process::id());
        if let Ok(entries) = fs::read_dir(own.parent().expect("in a directory")) {
            for entry in entries.flatten() {
                if entry.path() != own && !is_live(&entry.path()) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Self::bind_at(own)
    }

    /// Binds a control socket at `path` (a cluster agent's), replacing a stale file: the
    /// caller has checked that nobody answers there.
    pub fn bind_at(path: PathBuf) -> Result<Self> {
        let dir = path.parent().expect("socket paths have a directory");
        fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        // The run directory may be passed through by others (0711), for handlers running
        // as --user to reach their notify socket (`supervisor::notify`); what is in it is
        // root's alone (records and sockets 0600, subdirectories 0700).
        let _ = fs::set_permissions(run_dir(), fs::Permissions::from_mode(0o711));
        if dir != run_dir() {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        match fs::remove_file(&path) {
            Ok(()) => log::warn!("removed stale control socket {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", path.display()))(e)),
        }
        let listener = tokio::net::UnixListener::bind(&path).map_err(Error::io(format!(
            "binding control socket {}",
            path.display()
        )))?;
        let socket = ControlSocket { path, listener };
        fs::set_permissions(&socket.path, fs::Permissions::from_mode(0o600))
            .map_err(Error::io(format!("restricting {}", socket.path.display())))?;
        Ok(socket)
    }

    /// Serves requests forever, each connection in a task of its own (a restart may take
    /// a while; status requests are answered meanwhile). Must run inside a LocalSet.
    pub async fn serve<F, Fut>(&self, answer: F)
    where
        F: Fn(Request) -> Fut + Clone + 'static,
        Fut: std::future::Future<Output = Response> + 'static,
    {
        loop {
            let stream = accept_from_root(&self.listener).await;
            let answer = answer.clone();
            tokio::task::spawn_local(async move {
                use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
                let (reader, mut writer) = stream.into_split();
                let mut line = String::new();
                let read = tokio::time::timeout(
                    CLIENT_TIMEOUT,
                    tokio::io::BufReader::new(reader.take(MAX_REQUEST)).read_line(&mut line),
                )
                .await;
                let response = match read {
                    Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                        Ok(request) => answer(request).await,
                        Err(e) => Response::Failed(ControlError::BadRequest(e.to_string())),
                    },
                    _ => return,
                };
                let mut out = serde_json::to_string(&response).expect("serializable");
                out.push('\n');
                // A client that went away is its own problem.
                let _ =
                    tokio::time::timeout(CLIENT_TIMEOUT, writer.write_all(out.as_bytes())).await;
            });
        }
    }
}

/// The next connection to a control socket from a root process. The socket file is root's
/// and 0600 already; the peer's credentials (SO_PEERCRED) are checked all the same, in case
/// the file's mode or its directory's ever change. A failed accept (EMFILE: the spawner is
/// out of descriptors) waits a moment rather than spinning on a queue it cannot empty.
pub async fn accept_from_root(listener: &tokio::net::UnixListener) -> tokio::net::UnixStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match stream.peer_cred() {
                Ok(peer) if peer.uid() == 0 => return stream,
                Ok(peer) => log::warn!(
                    "refused a control connection from uid {} (pid {:?}): only root may ask",
                    peer.uid(),
                    peer.pid()
                ),
                Err(e) => log::warn!("refused a control connection: SO_PEERCRED: {e}"),
            },
            Err(e) => {
                log::warn!("accepting on a control socket: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// How long a control socket waits after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_from_bad_input_are_refusals_and_the_rest_failures() {
        let usage = ControlError::from(Error::Rejected("taken".into()));
        assert_eq!(usage, ControlError::Refused("taken".into()));
        assert!(usage.is_usage());
        let failed = ControlError::from(Error::NoEbpfObject);
        assert!(matches!(failed, ControlError::Failed(_)) && !failed.is_usage());
        assert!(!ControlError::Stopping { group: "g".into() }.is_usage());
    }

    #[test]
    fn requests_and_responses_are_tagged_json() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        let error = serde_json::to_string(&Response::Failed(ControlError::Failed("x".into())));
        assert_eq!(error.unwrap(), r#"{"failed":{"failed":"x"}}"#);
        assert_eq!(Request::Restart.verb(), "restart");
        assert_eq!(
            serde_json::to_string(&Request::Resize { handlers: 3 }).unwrap(),
            r#"{"command":"resize","handlers":3}"#
        );
    }
}
