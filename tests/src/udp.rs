//! UDP reuseport groups built by hand, for the tests and benchmarks of the udp-datagram
//! program (`parsrv::dataplane::udp`): sockets with chosen receive buffers, the kernel's
//! per-socket accounting (SO_MEMINFO), and datagrams from many flows.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use parsrv::dataplane::udp::DatagramSteering;
use socket2::{Domain, Socket, Type};

/// SO_RCVBUF asked of a small socket (the kernel doubles it: 8,192 bytes, room for 9
/// datagrams of 32 bytes on loopback, whose truesize is 832 bytes each on 6.18).
pub const SMALL_BUFFER: usize = 4096;
/// SO_RCVBUFFORCE of a large one: tens of thousands of small datagrams fit in it unread.
pub const LARGE_BUFFER: usize = 32 << 20;

/// A reuseport group of UDP sockets on 127.0.0.1 (non-blocking), socket `i` with receive
/// buffer `buffers[i]` (SO_RCVBUF up to [`SMALL_BUFFER`], SO_RCVBUFFORCE above), and its
/// address.
pub fn udp_group(buffers: &[usize]) -> (Vec<Socket>, SocketAddr) {
    let mut sockets = Vec::new();
    let mut addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    for &size in buffers {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        socket.set_reuse_port(true).unwrap();
        if size > SMALL_BUFFER {
            force_receive_buffer(socket.as_fd(), size);
        } else {
            socket.set_recv_buffer_size(size).unwrap();
        }
        socket.set_nonblocking(true).unwrap();
        socket.bind(&addr.into()).unwrap();
        addr = socket.local_addr().unwrap().as_socket().unwrap();
        sockets.push(socket);
    }
    (sockets, addr)
}

/// The udp-datagram program on `sockets` (slot i = socket i), attached to their group.
pub fn steer_udp(sockets: &[Socket]) -> DatagramSteering {
    let mut steering = DatagramSteering::load(None).expect("the udp-datagram program loads");
    for (slot, socket) in sockets.iter().enumerate() {
        steering.register(slot as u32, socket).unwrap();
    }
    steering.attach(&sockets[0]).unwrap();
    steering
}

fn force_receive_buffer(fd: BorrowedFd<'_>, size: usize) {
    let value = size as libc::c_int;
    // SAFETY: an int option of an open socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of_val(&value) as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

/// What the kernel accounts for one socket (SO_MEMINFO).
#[derive(Clone, Copy, Debug)]
pub struct Meminfo {
    /// `sk_rmem_alloc`: bytes its queued datagrams hold.
    pub rmem: u32,
    /// `sk_rcvbuf`.
    pub rcvbuf: u32,
    /// `sk_drops`: datagrams the kernel dropped at it.
    pub drops: u32,
}

pub fn meminfo(fd: BorrowedFd<'_>) -> Meminfo {
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
    assert_eq!(rc, 0, "SO_MEMINFO: {}", std::io::Error::last_os_error());
    // SK_MEMINFO_RMEM_ALLOC, SK_MEMINFO_RCVBUF, SK_MEMINFO_DROPS.
    Meminfo {
        rmem: info[0],
        rcvbuf: info[1],
        drops: info[8],
    }
}

/// Sends `per_flow` datagrams of 32 bytes to `addr` from each of `flows` client sockets
/// (each its own 4-tuple, so its own hash), round by round, reading nothing. One pass:
/// bounded by its count.
pub fn send_datagrams(addr: SocketAddr, flows: usize, per_flow: usize) {
    let clients: Vec<UdpSocket> = (0..flows)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for round in 0..per_flow {
        for (flow, client) in clients.iter().enumerate() {
            let payload = format!("{flow:08}:{round:08}:0123456789abcd");
            client.send_to(payload.as_bytes(), addr).unwrap();
        }
    }
}
