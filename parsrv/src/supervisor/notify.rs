//! A handler's side of systemd's notify protocol (`--notify`): each slot has a datagram
//! socket at a path under the run directory (`RUN_DIR/notify/GROUP/SLOT`, the same for a
//! spawner that adopts the group), passed to its exec handler as NOTIFY_SOCKET. A
//! `READY=1` from the handler's process or any process it started (its session: see
//! `process::place_handler`) makes it ready.
//!
//! Not an abstract address (`@parsrv-notify/...`, as before): anyone in the network
//! namespace can bind an abstract name first, and then no handler of that slot could ever
//! say it is ready. The path is in directories only root can write; the socket belongs to
//! the handler's user (`--user`) with mode 0600, so only that user and root can send on it.

use std::{
    cell::Cell,
    io,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    rc::Rc,
};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixCredentials,
};
use tokio::io::unix::AsyncFd;

use crate::{procfs::process_group, spec::Credentials};

/// Where the slots' sockets are: a directory per group in `RUN_DIR/notify`. Handlers
/// that run as `--user` must reach their socket through these and the run directory, so
/// each is 0711: others may pass through, not list or write.
pub fn notify_dir() -> PathBuf {
    crate::run_dir::run_dir().join("notify")
}

/// A slot's notify socket; the task reading it runs until the slot is dropped.
pub struct NotifySocket {
    path: PathBuf,
    /// The handler (process group) that last said READY=1.
    said_ready: Rc<Cell<Option<u32>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl NotifySocket {
    /// Binds slot `slot`'s socket of `group` and starts reading it (inside a LocalSet). The
    /// socket belongs to `user` (root without one), the only one besides root that may send
    /// on it.
    pub fn bind(group: &str, slot: u32, user: Option<Credentials>) -> io::Result<NotifySocket> {
        let dir = notify_dir().join(group);
        for traversable in [crate::run_dir::run_dir(), notify_dir(), dir.clone()] {
            create_traversable(&traversable)?;
        }
        let path = dir.join(slot.to_string());
        // A socket left by a spawner that died: the adopting one takes the same path.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = UnixDatagram::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if let Some(user) = user {
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))?;
        }
        socket.set_nonblocking(true)?;
        // The kernel then attaches each sender's pid to what it sends.
        setsockopt(&socket, sockopt::PassCred, &true)?;
        // SAFETY: the socket is owned by the AsyncFd for its whole life.
        let socket =
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE)? };
        let said_ready = Rc::new(Cell::new(None));
        let reader = tokio::task::spawn_local(read(socket, said_ready.clone()));
        Ok(NotifySocket {
            path,
            said_ready,
            reader,
        })
    }

    /// NOTIFY_SOCKET's value for the handler.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether handler `pid` (or a process it started) said READY=1.
    pub fn said_ready(&self, pid: u32) -> bool {
        self.said_ready.get() == Some(pid)
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.reader.abort();
        // An adopting spawner binds the path anew: a file left here is only untidy.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates `dir` (root's, 0711) if it is missing, and makes it 0711 if it is not.
fn create_traversable(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(0o711).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
}

async fn read(socket: AsyncFd<UnixDatagram>, said_ready: Rc<Cell<Option<u32>>>) {
    use std::os::fd::AsRawFd;
    let mut buffer = [0u8; 4096];
    loop {
        let Ok(mut guard) = socket.readable().await else {
            return;
        };
        let mut space = nix::cmsg_space!(UnixCredentials);
        let mut iov = [io::IoSliceMut::new(&mut buffer)];
        let received = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT,
        )
        .map(|message| {
            let sender = message.cmsgs().ok().and_then(|mut cmsgs| {
                cmsgs.find_map(|c| match c {
                    ControlMessageOwned::ScmCredentials(creds) => Some(creds.pid() as u32),
                    _ => None,
                })
            });
            (message.bytes, sender)
        });
        match received {
            Ok((len, Some(sender))) => {
                let text = String::from_utf8_lossy(&buffer[..len]);
                if text.lines().any(|line| line == "READY=1") {
                    // The sender's process group is the handler's, whichever of its
                    // processes sent it. A sender gone already (systemd-notify exits at
                    // once) counts as itself.
                    said_ready.set(Some(process_group(sender).unwrap_or(sender)));
                }
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(_) => return,
        }
    }
}
