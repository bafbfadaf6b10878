//! What the kernel says of a socket: a listener's accept queue (TCP_INFO), a UDP socket's
//! receive buffer (SO_MEMINFO), its cookie, inode and marks, and a process's listeners.

use std::{
    io, mem,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use crate::procfs;

/// A listener's accept queue as the kernel reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueDepth {
    /// Established connections waiting for accept() (`sk_ack_backlog`).
    pub depth: u32,
    /// `sk_max_ack_backlog`: min(listen backlog, net.core.somaxconn). The queue is full
    /// above this: it holds `capacity + 1`.
    pub capacity: u32,
}

impl QueueDepth {
    /// Connections it can still take before the kernel calls it full.
    pub fn free(&self) -> u32 {
        (self.capacity + 1).saturating_sub(self.depth)
    }
}

/// A UDP socket's receive buffer as the kernel accounts it (SO_MEMINFO).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiveBuffer {
    /// Bytes its queued datagrams hold (`sk_rmem_alloc`: their truesize, not their payload).
    pub used: u32,
    /// `sk_rcvbuf`: the most `used` may reach.
    pub size: u32,
    /// Datagrams the kernel dropped at it since it was created (`sk_drops`): its buffer was
    /// full (Udp RcvbufErrors), or a checksum or filter refused them.
    pub drops: u32,
}

/// A socket's receive buffer, read with SO_MEMINFO (Linux 4.6+): exact and lock-free.
pub fn receive_buffer(fd: BorrowedFd<'_>) -> io::Result<ReceiveBuffer> {
    // SK_MEMINFO_VARS is 9 since Linux 4.x: RMEM_ALLOC, RCVBUF, ..., DROPS last.
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ReceiveBuffer {
        used: info[0],
        size: info[1],
        drops: info[8],
    })
}

/// Several accept queues together: what waits in them, and what they hold (the sum of
/// `capacity + 1`), for a group's occupancy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Occupancy {
    pub queued: u32,
    pub capacity: u32,
}

impl Occupancy {
    pub fn of(queues: impl IntoIterator<Item = QueueDepth>) -> Self {
        queues
            .into_iter()
            .fold(Occupancy::default(), |sum, q| Occupancy {
                queued: sum.queued + q.depth,
                capacity: sum.capacity + q.capacity + 1,
            })
    }
}

/// Reads a listener's queue with getsockopt(TCP_INFO): on a LISTEN socket, tcpi_unacked is
/// sk_ack_backlog and tcpi_sacked is sk_max_ack_backlog. Exact and lock-free.
pub fn queue_depth(fd: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    let info = tcp_info(fd)?;
    Ok(QueueDepth {
        depth: info.tcpi_unacked,
        capacity: info.tcpi_sacked,
    })
}

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: buffer and length describe a tcp_info.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// TCP's state of the socket (`TCP_LISTEN`, `TCP_CLOSE`, ...), from TCP_INFO.
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    Ok(tcp_info(fd)?.tcpi_state)
}

/// `TCP_LISTEN` in the kernel's `enum tcp_state` (include/net/tcp_states.h).
pub const TCP_LISTEN: u8 = 10;

/// A `SOL_SOCKET` option of a plain-number type.
fn socket_option<T: Copy + Default>(fd: BorrowedFd<'_>, name: libc::c_int) -> io::Result<T> {
    let mut value = T::default();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: buffer and length describe one T.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A socket's `SO_INCOMING_CPU` (-1 unless set): on a listener, parsrv's "no handler"
/// mark ([`parsrv_common::reuseport::NO_HANDLER_MARK`]).
pub fn incoming_cpu(fd: BorrowedFd<'_>) -> io::Result<i32> {
    socket_option(fd, libc::SO_INCOMING_CPU)
}

/// Sets a socket's `SO_INCOMING_CPU` (see [`incoming_cpu`]); any value is taken.
pub fn set_incoming_cpu(fd: BorrowedFd<'_>, cpu: i32) -> io::Result<()> {
    // SAFETY: the value is an i32 of the given length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&cpu as *const i32).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The socket's cookie, created on first use: the program finds listeners by cookie, and
/// `skc_cookie` stays 0 until something asks for it.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    socket_option(fd, libc::SO_COOKIE)
}

/// The inode number of a socket (as /proc shows it: `socket:[INODE]`).
pub fn socket_inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd)?.st_ino)
}

/// The listening TCP sockets process `pid` holds, as (inode, local address): each socket
/// among its fds (/proc/PID/fd) is looked at through a copy taken with pidfd_getfd
/// (SO_ACCEPTCONN, getsockname). The cost follows the process's own fds, not the host's
/// sockets: /proc/net/tcp lists every socket of the namespace, and reading it under a busy
/// server's tens of thousands of connections held the spawner for seconds.
pub fn listening_sockets(pid: u32) -> Vec<(u64, String)> {
    let sockets: Vec<(RawFd, u64)> = procfs::socket_fds(pid).collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    // SAFETY: plain syscall; the result is checked and owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Vec::new();
    }
    // SAFETY: a fresh fd from pidfd_open.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    sockets
        .into_iter()
        .filter_map(|(number, inode)| {
            // SAFETY: plain syscall; the result is checked and owned below.
            let copy =
                unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), number, 0) };
            if copy < 0 {
                return None;
            }
            // SAFETY: a fresh fd from pidfd_getfd.
            let socket = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(copy as RawFd) });
            let tcp = socket.r#type().ok()? == socket2::Type::STREAM
                && socket
                    .protocol()
                    .ok()?
                    .is_none_or(|p| p == socket2::Protocol::TCP);
            let listening =
                nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::AcceptConn)
                    .ok()?;
            let local = socket.local_addr().ok()?.as_socket()?;
            (tcp && listening).then(|| (inode, local.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_listening_sockets_with_addresses() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let found = listening_sockets(std::process::id());
        for listener in [&v4, &v6] {
            let inode = socket_inode(std::os::fd::AsFd::as_fd(listener)).unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            assert!(
                found.contains(&(inode, addr.clone())),
                "{addr} not in {found:?}"
            );
        }
    }

    #[test]
    fn queue_depth_of_a_fresh_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let before = queue_depth(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        assert_eq!(before.depth, 0);
        assert!(before.capacity > 0);
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // The handshake completes in the kernel: one connection waits for accept().
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while queue_depth(std::os::fd::AsFd::as_fd(&listener))
            .unwrap()
            .depth
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "connection never queued"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let cookie = socket_cookie(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(
            socket_cookie(std::os::fd::AsFd::as_fd(&listener)).unwrap(),
            cookie
        );
    }
}
