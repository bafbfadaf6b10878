//! A handler's side of systemd's notify protocol (`--notify`): each slot has a datagram
//! socket at an abstract address (`@parsrv-notify/GROUP/SLOT`: no file to clean up, private
//! to the network namespace, the same for the spawner that adopts the group), passed to
//! its exec handler as NOTIFY_SOCKET. A `READY=1` from the handler's process or any process
//! it started (its session: see `process::place_handler`) makes it ready.

use std::{
    cell::Cell,
    io,
    os::unix::net::{SocketAddr, UnixDatagram},
    rc::Rc,
};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixCredentials,
};
use tokio::io::unix::AsyncFd;

/// A slot's notify socket; the task reading it runs until the slot is dropped.
pub struct NotifySocket {
    address: String,
    /// The handler (process group) that last said READY=1.
    said_ready: Rc<Cell<Option<u32>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl NotifySocket {
    /// Binds slot `slot`'s socket of `group` and starts reading it (inside a LocalSet).
    pub fn bind(group: &str, slot: u32) -> io::Result<NotifySocket> {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("parsrv-notify/{group}/{slot}");
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name)?)?;
        socket.set_nonblocking(true)?;
        // The kernel then attaches each sender's pid to what it sends.
        setsockopt(&socket, sockopt::PassCred, &true)?;
        // SAFETY: the socket is owned by the AsyncFd for its whole life.
        let socket =
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE)? };
        let said_ready = Rc::new(Cell::new(None));
        let reader = tokio::task::spawn_local(read(socket, said_ready.clone()));
        Ok(NotifySocket {
            address: format!("@{name}"),
            said_ready,
            reader,
        })
    }

    /// NOTIFY_SOCKET's value for the handler.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Whether handler `pid` (or a process it started) said READY=1.
    pub fn said_ready(&self, pid: u32) -> bool {
        self.said_ready.get() == Some(pid)
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
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
                    // A sender gone already (systemd-notify exits at once) counts as itself.
                    said_ready.set(Some(process_group(sender).unwrap_or(sender)));
                }
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(_) => return,
        }
    }
}

/// The process group of `pid` (field 5 of /proc/PID/stat): a handler's, whichever of its
/// processes sent the message.
fn process_group(pid: u32) -> Option<u32> {
    super::process::stat_field(pid, 5)?.parse().ok()
}
